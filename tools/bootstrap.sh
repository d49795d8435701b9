#!/usr/bin/env bash
# Set up everything ccidemu needs on a fresh Debian 12 machine: system packages
# (when missing; needs root or sudo), a virtual environment in .venv, and the
# package with its extras.  Idempotent and quiet when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Runtime and test peers: QEMU + busybox build the tiny guest; pcscd, libccid, OpenSC,
# pcsc-tools, vpcd and yubico-piv-tool are the real clients the tests talk to;
# libpcsclite-dev, gcc, python3-dev and swig build pyscard.
PACKAGES=(
  python3 python3-venv python3-dev gcc swig libpcsclite-dev openssl
  qemu-system-x86 busybox-static pcscd libccid opensc pcsc-tools vsmartcard-vpcd yubico-piv-tool
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing system packages: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=/usr/bin/python3
stamp=.venv/.ccidemu-installed
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing ccidemu and its dependencies into .venv" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev,pcsc,usb]"
  touch "$stamp"
fi
