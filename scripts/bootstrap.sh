#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root): system packages,
# a .venv that sees Debian's python3-nftables, and the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(nftables iptables python3-nftables python3-venv iproute2 procps wrk ca-certificates)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages ${missing[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv must come from Debian's python3 so --system-site-packages sees python3-nftables.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import nftables" 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# kubectl is not a Debian package: its built-in kustomize builds deploy/ for the deploy tests and the demo.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "bootstrap: warning: kubectl not found; the deploy tests skip, and make demo and the full-system test fail, until it is installed" >&2
fi

stamp=.venv/.lightpath-installed
# constraints.txt pins every dependency (scripts/lock.py writes it), so every machine gets the same versions.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  touch "$stamp"
fi
