#!/usr/bin/env bash
# Prints a new random tenant key and its SHA-256 digest (the only form the config holds).
# With an argument, prints the digest of that key instead.
set -euo pipefail
if [[ $# -gt 0 ]]; then
  key="$1"
else
  key="sk-sluice-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  echo "key:    $key"
fi
printf '%s' "$key" | sha256sum | cut -d' ' -f1 | sed 's/^/sha256: /'
