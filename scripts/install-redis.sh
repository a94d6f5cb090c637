#!/usr/bin/env bash
# Makes redis-server (7.x) available for the global-limit tests and `make demo-cluster`.
# Run through `make redis` (make test and make demo-cluster do).
#
#  - $SLUICE_REDIS_SERVER (if set) or redis-server on PATH, version >= 7.0: nothing to do.
#    (7.0 is the floor because Debian 12's package is 7.0.15; Valkey 7.2+/8 also works,
#    its binary answers to --version the same way.)
#  - Otherwise, as root with apt-get: installs Debian/Ubuntu's redis-server package (running
#    `apt-get update` first if the package lists do not know it). The package's postinst
#    may start a system Redis on 127.0.0.1:6379; Sluice never uses it (make demo-cluster
#    runs its own Redis on 6380 under .run/redis, the tests start theirs on free ports), so
#    this script stops and disables that service when it was this script that installed
#    the package, rather than leave an unasked-for daemon behind.
#  - Otherwise: exits 1 saying how to install it.
set -euo pipefail

MIN_MAJOR=7

# Prints the X.Y.Z version of a redis-server binary, or nothing.
version_of() {
  "$1" --version 2>/dev/null | sed -n 's/.* v=\([0-9][0-9.]*\).*/\1/p' | head -n1
}

# Succeeds if the binary $1 exists and is at least $MIN_MAJOR.0.
good_enough() {
  local bin=$1 version
  [[ -n "$bin" && -x "$bin" ]] || return 1
  version=$(version_of "$bin")
  [[ -n "$version" ]] || return 1
  (( ${version%%.*} >= MIN_MAJOR )) || {
    echo "install-redis: $bin is Redis $version; Sluice needs $MIN_MAJOR.0 or newer" >&2
    return 1
  }
  echo "install-redis: using $bin (Redis $version)"
}

if [[ -n "${SLUICE_REDIS_SERVER:-}" ]]; then
  if good_enough "$SLUICE_REDIS_SERVER"; then exit 0; fi
  echo "install-redis: SLUICE_REDIS_SERVER=$SLUICE_REDIS_SERVER is not a usable redis-server" \
       ">= $MIN_MAJOR.0; unset it to use (or install) the one on PATH" >&2
  exit 1
fi

if good_enough "$(command -v redis-server || true)"; then exit 0; fi

how_to() {
  cat >&2 <<MSG
install-redis: redis-server $MIN_MAJOR.x is needed (the global limits keep their counters in Redis)
and none was found on PATH. Install it, then run make again:
  Debian/Ubuntu:  sudo apt-get install redis-server     (Debian 12 has 7.0; Ubuntu 24.04 has 7.0)
  Fedora/RHEL:    sudo dnf install redis                (or valkey: sudo dnf install valkey)
  macOS:          brew install redis
or point SLUICE_REDIS_SERVER at a redis-server (or valkey-server) binary >= $MIN_MAJOR.0:
  make test SLUICE_REDIS_SERVER=/opt/redis/bin/redis-server
Only the server binary is used; nothing needs to be running.
MSG
}

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  how_to
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
candidate=$(apt-cache policy redis-server 2>/dev/null | sed -n 's/^ *Candidate: *//p')
if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
  echo "install-redis: apt-get update (the package lists do not know redis-server)"
  apt-get update -q
fi
echo "install-redis: apt-get install redis-server"
apt-get install -y -q --no-install-recommends redis-server

# The package may have started (and enabled) a system Redis on 6379: Sluice does not use it.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  systemctl disable --now redis-server >/dev/null 2>&1 || true
  echo "install-redis: stopped and disabled the system redis-server service (Sluice runs its" \
       "own Redis; re-enable it with: systemctl enable --now redis-server)"
elif command -v service >/dev/null && service redis-server status >/dev/null 2>&1; then
  service redis-server stop >/dev/null 2>&1 || true
  echo "install-redis: stopped the system redis-server service (Sluice runs its own Redis)"
fi

if good_enough "$(command -v redis-server || true)"; then exit 0; fi
echo "install-redis: apt installed redis-server, but no redis-server >= $MIN_MAJOR.0 is on PATH" \
     "(apt-cache policy redis-server: candidate $candidate)" >&2
how_to
exit 1
