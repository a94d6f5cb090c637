#!/usr/bin/env bash
# Makes promtool (Prometheus 2.x or 3.x) available for the operators' rules and dashboard
# checks (`make ops`, which `make test` runs). Mirrors scripts/install-redis.sh:
#
#  - $SLUICE_PROMTOOL (if set) or promtool on PATH, version >= 2.37: nothing to do.
#    (Tested with Debian 12's 2.42.0; 2.37, Prometheus's first long-term-support release,
#    is the floor.)
#  - Otherwise, as root with apt-get: installs Debian/Ubuntu's `prometheus` package, which
#    ships /usr/bin/promtool (running `apt-get update` first if the package lists do not
#    know it), without recommends (no node exporter). The package is the whole Prometheus
#    server, and its postinst would start it on :9090: Sluice only wants promtool, so the
#    install runs under a policy-rc.d that forbids starting services (unless one is already
#    in place), then stops and disables the service if it runs anyway, and checks that
#    nothing listens on 9090.
#  - Otherwise: exits 1 saying how to install it.
set -euo pipefail

MIN_MAJOR=2
MIN_MINOR=37

# Prints the X.Y.Z version of a promtool binary, or nothing.
version_of() {
  "$1" --version 2>&1 | sed -n 's/^promtool, version \([0-9][0-9.]*\).*/\1/p' | head -n1
}

# Succeeds if the binary $1 exists and is at least $MIN_MAJOR.$MIN_MINOR.
good_enough() {
  local bin=$1 version major minor
  [[ -n "$bin" && -x "$bin" ]] || return 1
  version=$(version_of "$bin")
  [[ -n "$version" ]] || return 1
  major=${version%%.*}
  minor=${version#*.}
  minor=${minor%%.*}
  if (( major < MIN_MAJOR || (major == MIN_MAJOR && minor < MIN_MINOR) )); then
    echo "install-promtool: $bin is promtool $version; Sluice's rules need $MIN_MAJOR.$MIN_MINOR or newer" >&2
    return 1
  fi
  echo "install-promtool: using $bin (promtool $version)"
}

if [[ -n "${SLUICE_PROMTOOL:-}" ]]; then
  if good_enough "$SLUICE_PROMTOOL"; then exit 0; fi
  echo "install-promtool: SLUICE_PROMTOOL=$SLUICE_PROMTOOL is not a usable promtool" \
       ">= $MIN_MAJOR.$MIN_MINOR; unset it to use (or install) the one on PATH" >&2
  exit 1
fi

if good_enough "$(command -v promtool || true)"; then exit 0; fi

how_to() {
  cat >&2 <<MSG
install-promtool: promtool >= $MIN_MAJOR.$MIN_MINOR is needed (it checks and unit-tests ops/prometheus/
and parses the Grafana dashboard's queries) and none was found on PATH. Install it, then run
make again:
  Debian/Ubuntu:  sudo apt-get install --no-install-recommends prometheus   (ships /usr/bin/promtool;
                  then: sudo systemctl disable --now prometheus, Sluice needs no server)
  macOS:          brew install prometheus
  elsewhere:      promtool is in every Prometheus release archive (prometheus-X.Y.Z.<os>-<arch>.tar.gz)
or point SLUICE_PROMTOOL at a promtool binary >= $MIN_MAJOR.$MIN_MINOR:
  make test SLUICE_PROMTOOL=/opt/prometheus/promtool
Only the promtool binary is used; no Prometheus needs to be running.
MSG
}

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  how_to
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
candidate=$(apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: *//p')
if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
  echo "install-promtool: apt-get update (the package lists do not know prometheus)"
  apt-get update -q
  candidate=$(apt-cache policy prometheus 2>/dev/null | sed -n 's/^ *Candidate: *//p')
fi

# Forbid service starts during the install (invoke-rc.d and deb-systemd-invoke both ask
# /usr/sbin/policy-rc.d; 101 = action forbidden), unless the machine already has a policy.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\n# Written by Sluice scripts/install-promtool.sh for the install only.\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  own_policy=1
  trap 'rm -f "$policy"' EXIT
fi

echo "install-promtool: apt-get install prometheus (for /usr/bin/promtool; its server is not started)"
apt-get install -y -q --no-install-recommends prometheus

if (( own_policy )); then
  rm -f "$policy"
  trap - EXIT
fi

# Whatever the policy did, leave no Prometheus server running, nor enabled for the next boot:
# Sluice needs none.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
else
  if command -v service >/dev/null && service prometheus status >/dev/null 2>&1; then
    service prometheus stop >/dev/null 2>&1 || true
  fi
  # No systemd running (a container): remove the boot-time links the postinst made.
  if command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true
  fi
  if command -v update-rc.d >/dev/null && [[ -e /etc/init.d/prometheus ]]; then
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
echo "install-promtool: the prometheus service is not running and is disabled (only promtool" \
     "is used; re-enable it with: systemctl enable --now prometheus)"
if command -v ss >/dev/null && ss -Hltn 'sport = :9090' 2>/dev/null | grep -q .; then
  echo "install-promtool: warning: something listens on :9090 after the install:" >&2
  ss -Hltnp 'sport = :9090' >&2 || true
fi

if good_enough "$(command -v promtool || true)"; then exit 0; fi
echo "install-promtool: apt installed prometheus, but no promtool >= $MIN_MAJOR.$MIN_MINOR is on PATH" \
     "(apt-cache policy prometheus: candidate $candidate)" >&2
how_to
exit 1
