#!/usr/bin/env bash
# Set up ccidemu on a fresh Debian 12 machine: system packages (when missing; needs root or
# sudo), a virtual environment in .venv, and the package.  Idempotent and quiet when nothing
# is missing.
#   bootstrap.sh            everything the test suite needs: QEMU, pcscd, the real clients,
#                           compilers for pyscard, the package with its extras and dev tools
#   bootstrap.sh --runtime  only what 'ccidemu serve' needs (tools/run-main): Python and the
#                           package without extras
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=0
if [ "${1:-}" = "--runtime" ]; then
  RUNTIME=1
fi

# Runtime and test peers: QEMU + busybox build the tiny guest; pcscd, libccid, OpenSC,
# pcsc-tools, vpcd and yubico-piv-tool are the real clients the tests talk to;
# libpcsclite-dev, gcc, python3-dev and swig build pyscard; libcacard-dev, pkg-config and
# libnss3-tools (certutil, pk12util) let the CAC tests drive the real libcacard side by side;
# libvirt-daemon, its qemu driver and libvirt-clients (virsh) run the guest under a private
# libvirtd (tests/e2e/test_libvirt.py; no service is started by installing them).
if ((RUNTIME)); then
  PACKAGES=(python3 python3-venv libssl3)
else
PACKAGES=(
  python3 python3-venv python3-dev gcc swig libpcsclite-dev openssl
  qemu-system-x86 busybox-static pcscd libccid opensc pcsc-tools vsmartcard-vpcd yubico-piv-tool
  libcacard-dev pkg-config libnss3-tools
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing system packages: ${missing[*]}" >&2
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || {
      echo "bootstrap: need root or sudo to install: ${missing[*]}" >&2
      exit 1
    }
    SUDO=(sudo)
  fi
  # sudo resets the environment, so DEBIAN_FRONTEND is set by env(1) after it.  On a freshly
  # booted VM unattended-upgrades or cloud-init may hold apt's locks for minutes:
  # DPkg::Lock::Timeout makes 'install' wait for the dpkg lock, but 'update' does not wait for
  # the lists lock (apt 2.6), so it is retried (5 minutes at most).
  APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600)
  for attempt in $(seq 30); do
    "${APT[@]}" update && break
    ((attempt < 30)) || exit 1
    echo "bootstrap: apt-get update failed (apt locked by another process?); retrying in 10 s" >&2
    sleep 10
  done
  "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
fi

PY=/usr/bin/python3
stamp=.venv/.ccidemu-installed
runtime_stamp=.venv/.ccidemu-runtime
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PY" -m venv .venv
fi
if ((RUNTIME)); then
  # the full set-up covers the runtime one
  if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
    exit 0
  fi
  if [ ! -f "$runtime_stamp" ] || [ pyproject.toml -nt "$runtime_stamp" ]; then
    echo "bootstrap: installing ccidemu into .venv" >&2
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e .
    touch "$runtime_stamp"
  fi
  exit 0
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing ccidemu and its dependencies into .venv" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev,pcsc,usb]"
  touch "$stamp"
fi
