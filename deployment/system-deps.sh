#!/usr/bin/env bash
# Installs the Debian packages named in deployment/apt-packages.txt that are missing.
# As root with apt-get: installs them (one `apt-get update` first). Otherwise: prints what is
# missing and how to install it, and exits 0 (the tests that need a missing package skip or
# refuse with that message themselves).
set -euo pipefail
list="$(dirname "$0")/apt-packages.txt"
mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$' || true)
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "system-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "system-deps: missing Debian packages: ${missing[*]} (install: sudo apt-get install ${missing[*]})" >&2
fi
