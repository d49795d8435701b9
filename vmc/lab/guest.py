"""A tiny Linux guest: real pcscd + libccid + OpenSC behind QEMU's usb-ccid.

How it is built (docs/PROTOCOL.md, "A real QEMU guest"): the Debian kernel package that
``linux-image-amd64`` depends on is fetched with ``apt-get download`` and unpacked
(``dpkg-deb``); the initramfs holds busybox-static, pcscd, the libccid bundle, the OpenSC tools,
their ``ldd`` libraries (plus ``libpcsclite.so.1`` and ``libgcc_s.so.1``, which are loaded at run
time), the four USB modules and :data:`INIT_SCRIPT`.  It is packed with ``busybox cpio -o -H
newc | gzip -1`` and cached under ``$CCIDEMU_CACHE/guest`` (default
``$XDG_CACHE_HOME/ccidemu/guest``, that is ``~/.cache/ccidemu/guest``), keyed by the versions of
every package that went in and by this module's guest layout.

How it runs: QEMU (TCG) with three serial ports.  ttyS0 is the kernel console (to a file),
ttyS1 is a command channel on QEMU's stdio, ttyS2 carries pcscd's ``--debug --apdu`` log (to a
file).  The guest's /init starts pcscd, prints ``<<<READY>>>`` on ttyS1 and then serves
commands: the host writes ``SECONDS BASE64-SCRIPT`` lines; the guest runs each script (stdout
and stderr merged) in its own session under a watchdog that SIGKILLs the whole process group
after SECONDS, and answers with the output, a newline and ``<<<END:STATUS>>>``.  One boot
(about 6 s under TCG) serves any number of commands.

Run ``python -m vmc.lab.guest`` (or ``tools/build-guest``) to build or refresh the cache.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fcntl
import hashlib
import logging
import lzma
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

logger = logging.getLogger(__name__)

QEMU = os.environ.get("CCIDEMU_QEMU", "qemu-system-x86_64")  # override to test a skip
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")

#: Bump when the guest's layout or /init changes in a way the cache key would not see.
LAYOUT_VERSION = 4

#: Packages whose files go into the initramfs; their versions key the cache.
GUEST_PACKAGES = (
    "busybox-static", "pcscd", "libccid", "libpcsclite1", "opensc", "opensc-pkcs11",
    "pcsc-tools", "libgcc-s1", "libc6", "libssl3", "libusb-1.0-0",
)

#: Host executables the guest needs, installed at the same path in the guest.
GUEST_PROGRAMS = (
    "/usr/sbin/pcscd", "/usr/bin/opensc-tool", "/usr/bin/pkcs11-tool", "/usr/bin/pkcs15-tool",
    "/usr/bin/pcsc_scan", "/usr/bin/piv-tool",
    # Guest.interact(): util-linux's script (bsdutils) makes its pseudo-terminal, coreutils'
    # env --default-signal undoes the SIGINT a background command starts with ignored
    # (both Essential; busybox's env stays behind this one)
    "/usr/bin/script", "/usr/bin/env",
)

#: Shared objects loaded with dlopen() (ldd cannot see them), installed at the same path.
GUEST_PLUGINS = (
    "/usr/lib/pcsc/drivers/ifd-ccid.bundle/Contents/Linux/libccid.so",
    str(LIBDIR / "opensc-pkcs11.so"),
    str(LIBDIR / "pkcs11" / "opensc-pkcs11.so"),
    str(LIBDIR / "libpcsclite.so.1"),
    # Without it pcscd aborts when its first client leaves (pthread_cancel unwinding).
    str(LIBDIR / "libgcc_s.so.1"),
)

GUEST_DATA = (
    "/usr/lib/pcsc/drivers/ifd-ccid.bundle/Contents/Info.plist",
    "/etc/opensc/opensc.conf",
    "/etc/opensc.conf",
)

#: Loaded in this order with busybox insmod (the kernel package has no modules.dep).
KERNEL_MODULES = ("usb-common", "usbcore", "xhci-hcd", "xhci-pci")
#: The 9p modules for :attr:`Guest.share_host` (docs/PROTOCOL.md, "A real QEMU guest"), in
#: load order; always in the initramfs, loaded only when the kernel command line asks.
HOST_SHARE_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                      "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p")

READY_MARKER = "<<<READY>>>"
END_RE = re.compile(rb"\n<<<END:(-?\d+)>>>\n")

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/pcscd /root /var
ln -s /run /var/run
say() { echo "ccidemu-guest: $*"; }
for m in MODULES; do insmod /modules/$m.ko || say "insmod $m failed"; done
# The host's files, read-only, at /host (Guest(share_host=True)): a chroot there runs the
# host's programs next to the guest's devices.  /host/tmp and /host/run are the guest's own
# (writable); the host's /tmp stays visible at /host-tmp.
if grep -qw ccidemu.host=1 /proc/cmdline; then
  for m in SHARE_MODULES; do insmod /modules/$m.ko || say "insmod $m failed"; done
  mkdir -p /host
  if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 host /host; then
    mkdir -p /host-tmp && mount -o bind /host/tmp /host-tmp
    mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys &&
      mount -o bind /dev /host/dev && mount -t tmpfs tmpfs /host/tmp &&
      mount -t tmpfs tmpfs /host/run || say "mounts under /host failed"
  else
    say "mounting the host's files failed"
  fi
fi
# as many usb-ccid devices as the command line says (ccidemu.readers=N, default 1): pcscd
# sees only those there when it starts (no udevd for hotplug)
want=1
for arg in $(cat /proc/cmdline); do case $arg in ccidemu.readers=*) want=${arg#*=};; esac; done
i=0
until [ $(cat /sys/bus/usb/devices/*/idVendor 2>/dev/null | grep -c 08e6) -ge $want ]; do
  i=$((i + 1)); [ $i -gt 400 ] && { say "fewer than $want usb-ccid devices after 20 s"; break; }
  sleep 0.05
done
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
# Through a pipe so that pcscd does not colour its log for a terminal.
(pcscd --foreground --debug --apdu 2>&1 | cat >/dev/ttyS2) &
i=0
until [ -S /run/pcscd/pcscd.comm ]; do
  i=$((i + 1)); [ $i -gt 200 ] && { say "pcscd did not start"; break; }
  sleep 0.05
done
say "ready"
exec 3<>/dev/ttyS1
echo "<<<READY>>>" >&3
while IFS= read -r line <&3; do
  secs=${line%% *}
  echo "${line#* }" | base64 -d >/tmp/cmd.sh
  # In its own session so that the whole process group dies at the timeout (busybox
  # timeout would kill only the shell and leave e.g. opensc-tool running).
  setsid sh /tmp/cmd.sh >/tmp/out 2>&1 </dev/null &
  pid=$!
  (sleep "$secs"; kill -KILL -"$pid") 2>/dev/null &
  watchdog=$!
  wait "$pid"
  rc=$?
  kill "$watchdog" 2>/dev/null
  cat /tmp/out >&3
  printf '\n<<<END:%d>>>\n' "$rc" >&3
done
say "command channel closed"
poweroff -f
"""


#: Debian packages that provide what :func:`missing_host_tools` looks for.
GUEST_HOST_PACKAGES = (
    "qemu-system-x86 busybox-static pcscd libccid opensc opensc-pkcs11 pcsc-tools apt dpkg"
)


class GuestError(Exception):
    """The guest could not be built or did not behave (a test-infrastructure failure)."""


# --------------------------------------------------------------------------- host checks


def missing_host_tools() -> list[str]:
    """What this host lacks to build and boot the guest (empty when everything is there)."""
    missing = [t for t in (QEMU, "busybox", "apt-get", "dpkg-deb", "ldd", "gzip")
               if shutil.which(t) is None]
    missing += [p for p in (*GUEST_PROGRAMS, *GUEST_PLUGINS) if not Path(p).exists()]
    if shutil.which(QEMU) is not None:
        try:
            out = subprocess.run(
                [QEMU, "-device", "help"], capture_output=True, text=True, timeout=30, check=False
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            missing.append(f"{QEMU} -device help ({exc})")
        else:
            for dev in ("usb-ccid", "ccid-card-passthru", "qemu-xhci"):
                if f'"{dev}"' not in out:
                    missing.append(f"QEMU device {dev} (package qemu-system-common?)")
    return missing


#: QEMU modules a :attr:`ChardevMode.SPICE` guest needs (Debian's qemu-system-x86 has them).
SPICE_MODULES = ("ui-spice-core", "chardev-spice")


def missing_spice_support() -> list[str]:
    """What this host's QEMU lacks for ``-spice`` and ``-chardev spicevmc`` (empty if none)."""
    moddir = Path(os.environ.get("QEMU_MODULE_DIR", str(LIBDIR / "qemu")))
    return [f"QEMU module {name} ({moddir}/{name}.so)" for name in SPICE_MODULES
            if not (moddir / f"{name}.so").exists()]


# --------------------------------------------------------------------------- image build


class BuildProgress(Protocol):
    """What :func:`build_guest` reports while it builds (``ccidemu lab`` shows it)."""

    def step(self, text: str) -> None:
        """A new phase of the build begins (``text`` says which)."""

    def transfer(self, done: int, total: int | None) -> None:
        """``done`` bytes of the kernel package downloaded, of ``total`` (None: unknown)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs paths (inside the cache)."""

    kernel: Path
    initrd: Path
    key: str


def cache_root() -> Path:
    """``$CCIDEMU_CACHE/guest``, else ``$XDG_CACHE_HOME/ccidemu/guest`` (``~/.cache/...``)."""
    env = os.environ.get("CCIDEMU_CACHE")
    if env:
        return Path(env) / "guest"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ccidemu" / "guest"


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _package_version(name: str) -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", name],
        capture_output=True, text=True, timeout=30, check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else "absent"


def _kernel_package() -> str:
    """The versioned kernel image package ``linux-image-amd64`` depends on."""
    for attempt in range(2):
        proc = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        found = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", proc.stdout)
        if found:
            return str(found[0])
        if attempt == 0:
            logger.info("apt-cache knows no linux-image-amd64: running apt-get update")
            _run(["apt-get", "update", "-q"], timeout=300)
    raise GuestError("cannot find the kernel package that linux-image-amd64 depends on")


def _cache_key(kernel_package: str) -> str:
    h = hashlib.sha256()
    h.update(f"layout={LAYOUT_VERSION}\nkernel={kernel_package}\n".encode())
    for name in GUEST_PACKAGES:
        h.update(f"{name}={_package_version(name)}\n".encode())
    h.update(INIT_SCRIPT.encode())
    h.update(repr((GUEST_PROGRAMS, GUEST_PLUGINS, GUEST_DATA, KERNEL_MODULES,
                   HOST_SHARE_MODULES)).encode())
    return f"{kernel_package.removeprefix('linux-image-')}-{h.hexdigest()[:16]}"


def _package_size(name: str) -> int | None:
    """The download size apt knows for a package (``apt-cache show``'s Size), or None."""
    try:
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", name],
                             capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^Size:\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else None


def _download(kernel_package: str, cwd: Path, progress: BuildProgress | None) -> None:
    """``apt-get download`` into ``cwd``; with ``progress``, the growing file is reported."""
    cmd = ["apt-get", "download", "-q", kernel_package]
    if progress is None:
        _run(cmd, cwd=cwd, timeout=300)
        return
    total = _package_size(kernel_package)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while True:
            try:
                status = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise GuestError(f"{' '.join(cmd)} timed out after 300 s") from None
            done = sum(p.stat().st_size for p in cwd.glob(f"{kernel_package}_*.deb*")
                       if p.is_file())
            progress.transfer(done, total)
        if status != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise GuestError(f"{' '.join(cmd)} failed ({status}): {text}")
    done = sum(p.stat().st_size for p in cwd.glob(f"{kernel_package}_*.deb"))
    progress.transfer(done, total or done)


def _fetch_kernel(kernel_package: str, dest: Path, progress: BuildProgress | None = None
                  ) -> None:
    """Download and unpack the kernel image and the USB modules into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="ccidemu-kernel-") as tmp_name:
        tmp = Path(tmp_name)
        # apt-get download writes into the current directory; as root it warns that the _apt
        # sandbox user cannot write there, which is harmless.
        os.chmod(tmp, 0o755)
        if progress is not None:
            progress.step(f"downloading {kernel_package}")
        try:
            _download(kernel_package, tmp, progress)
        except GuestError as exc:  # stale package lists: the mirror dropped that version
            logger.info("%s; running apt-get update and retrying", exc)
            if progress is not None:
                progress.step("apt-get update (the package lists are stale)")
            _run(["apt-get", "update", "-q"], timeout=300)
            if progress is not None:
                progress.step(f"downloading {kernel_package}")
            _download(kernel_package, tmp, progress)
        if progress is not None:
            progress.step("unpacking the kernel and its USB modules")
        debs = sorted(tmp.glob(f"{kernel_package}_*.deb"))
        if not debs:
            raise GuestError(f"apt-get download {kernel_package} produced no .deb")
        names = _run(
            ["sh", "-c", f"dpkg-deb --fsys-tarfile '{debs[0]}' | tar -t"], timeout=120
        ).splitlines()
        wanted = [n for n in names if re.search(r"/boot/vmlinuz-", n)]
        for mod in (*KERNEL_MODULES, *HOST_SHARE_MODULES):
            hits = [n for n in names if re.search(rf"/kernel/.*/{mod}\.ko(\.xz)?$", n)]
            if not hits:
                raise GuestError(f"kernel package {kernel_package} has no module {mod}")
            wanted.append(hits[0])
        if not wanted or "vmlinuz" not in wanted[0]:
            raise GuestError(f"kernel package {kernel_package} has no /boot/vmlinuz")
        unpacked = tmp / "x"
        unpacked.mkdir()
        subprocess.run(
            ["sh", "-c", f"dpkg-deb --fsys-tarfile '{debs[0]}' | tar -x -C '{unpacked}' \"$@\"",
             "sh", *wanted],
            check=True, timeout=120, capture_output=True,
        )
        shutil.copyfile(unpacked / wanted[0], dest / "vmlinuz")
        modules = dest / "modules"
        modules.mkdir()
        for mod, member in zip((*KERNEL_MODULES, *HOST_SHARE_MODULES), wanted[1:],
                               strict=True):
            data = (unpacked / member).read_bytes()
            if member.endswith(".xz"):
                data = lzma.decompress(data)  # busybox insmod cannot read .ko.xz
            (modules / f"{mod}.ko").write_bytes(data)


def _ldd(path: str) -> list[str]:
    out = _run(["ldd", path], timeout=30)
    libs: list[str] = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    return libs


def _install(root: Path, host_path: str) -> None:
    """Copy a host file to the same path under ``root`` (symlinks resolved)."""
    target = root / host_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copyfile(os.path.realpath(host_path), target)
        shutil.copymode(os.path.realpath(host_path), target)


def _build_initrd(root: Path, modules: Path, out: Path) -> None:
    for name in ("bin", "sbin", "lib", "lib64"):  # mirror the host's merged /usr
        host = Path("/") / name
        if host.is_symlink():
            (root / "usr" / os.readlink(host).removeprefix("usr/")).mkdir(
                parents=True, exist_ok=True
            )
            (root / name).symlink_to(os.readlink(host))
        else:
            (root / name).mkdir(parents=True, exist_ok=True)
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "root", "usr/bin", "usr/sbin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _install(root, "/bin/busybox")
    libs: set[str] = set()
    for prog in (*GUEST_PROGRAMS, *GUEST_PLUGINS):
        _install(root, prog)
        libs.update(_ldd(prog))
    for lib in sorted(libs):
        _install(root, lib)
    for data in GUEST_DATA:
        if Path(data).exists():
            _install(root, data)
    shutil.copytree(modules, root / "modules")
    init = root / "init"
    init.write_text(INIT_SCRIPT.replace("SHARE_MODULES", " ".join(HOST_SHARE_MODULES))
                    .replace("MODULES", " ".join(KERNEL_MODULES)))
    init.chmod(0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    subprocess.run(
        ["sh", "-c", "find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > \"$1\"", "sh",
         str(out)],
        cwd=root, check=True, timeout=120,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_guest(cache: Path | None = None, *, force: bool = False,
                progress: BuildProgress | None = None) -> GuestImage:
    """Build (or reuse from the cache) the guest kernel and initramfs.

    ``progress`` is told each phase of a build and the download's progress (nothing when
    the cached guest is current)."""
    cache = cache or cache_root()
    kernel_package = _kernel_package()
    key = _cache_key(kernel_package)
    final = cache / key
    with _locked(cache / ".lock"):
        if force and final.exists():
            shutil.rmtree(final)
        if not (final / "initrd.gz").exists():
            started = time.monotonic()
            work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache))
            try:
                _fetch_kernel(kernel_package, work, progress)
                if progress is not None:
                    progress.step("collecting pcscd, libccid, OpenSC, pcsc-tools and their "
                                  "libraries into the initramfs")
                _build_initrd(work / "root", work / "modules", work / "initrd.gz")
                shutil.rmtree(work / "root")
                work.rename(final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            logger.info("built guest %s in %.1f s", key, time.monotonic() - started)
        (final / ".used").touch()
        _prune(cache, key)
    return GuestImage(kernel=final / "vmlinuz", initrd=final / "initrd.gz", key=key)


#: A cached guest not used for this long is removed; so are all but the newest few.  Another
#: checkout (another version of this file, another key) may be booting one right now: never
#: remove a guest just because it is not this checkout's.
CACHE_UNUSED_DAYS = 7
CACHE_KEEP = 4


def _prune(cache: Path, key: str) -> None:
    """Remove guests unused for CACHE_UNUSED_DAYS, and all but the CACHE_KEEP newest (with
    the cache lock held)."""
    def used(path: Path) -> float:
        stamp = path / ".used"
        return (stamp if stamp.exists() else path).stat().st_mtime

    entries = [p for p in cache.iterdir()
               if p.is_dir() and p.name != key and not p.name.startswith(".build-")]
    entries.sort(key=used, reverse=True)
    cutoff = time.time() - CACHE_UNUSED_DAYS * 86400
    for index, old in enumerate(entries):
        if index >= CACHE_KEEP - 1 or used(old) < cutoff:
            logger.info("removing the cached guest %s (not used lately)", old.name)
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- running


class ChardevMode(enum.Enum):
    """Who listens on the ccid-card-passthru socket."""

    #: QEMU listens (``server=on,wait=off``); the daemon runs ``--connect unix:PATH``.
    QEMU_SERVER = "server"
    #: QEMU connects (``reconnect=1``); the daemon runs ``--listen unix:PATH``.
    QEMU_CLIENT = "client"
    #: No socket: the chardev is SPICE's (``-chardev spicevmc,name=smartcard``), reached as a
    #: SPICE client of the guest's ``-spice`` server (:class:`SpiceOptions`).
    SPICE = "spice"


@dataclass(frozen=True)
class SpiceOptions:
    """QEMU's ``-spice`` server for :attr:`ChardevMode.SPICE` (docs/PROTOCOL.md, "SPICE").

    ``port``/``tls_port`` on ``addr``; ``password`` None means ``disable-ticketing=on``, else
    it is passed as a ``-object secret`` file (0600, in the guest's workdir).  ``x509_dir``
    holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` for the TLS port.
    """

    port: int | None = None
    password: str | None = field(default=None, repr=False)
    tls_port: int | None = None
    x509_dir: Path | None = None
    addr: str = "127.0.0.1"

    def qemu_args(self, workdir: Path) -> list[str]:
        parts = [f"addr={self.addr}"]
        if self.port is not None:
            parts.append(f"port={self.port}")
        if self.tls_port is not None:
            parts.append(f"tls-port={self.tls_port}")
            if self.x509_dir is not None:
                parts.append(f"x509-dir={self.x509_dir}")
        args: list[str] = []
        if self.password is None:
            parts.append("disable-ticketing=on")
        else:
            secret = workdir / "spice-password"
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.password)
            args += ["-object", f"secret,id=spicepw,file={secret}"]
            parts.append("password-secret=spicepw")
        return [*args, "-spice", ",".join(parts)]


@dataclass(frozen=True)
class CommandResult:
    status: int
    output: str


class SerialGuest:
    """A running guest's command channel and log files, whoever runs the VM.

    The command protocol of :data:`INIT_SCRIPT` (``run()`` shell commands, read the answers)
    over a byte stream that a subclass moves: it implements :meth:`start`, :meth:`close`,
    :meth:`_send` and :meth:`_read_some` (which appends what arrived to ``_buffer`` and to the
    transcript, and raises :class:`GuestError` at the deadline or when the VM is gone).
    """

    #: How :meth:`diagnostics` names the file at ``qemu_log_path``.
    qemu_log_label = "QEMU stderr"

    def __init__(self, image: GuestImage, workdir: Path, *, memory_mb: int = 512) -> None:
        self.image = image
        self.workdir = workdir
        self.memory_mb = memory_mb
        self.console_path = workdir / "console.log"
        self.pcscd_log_path = workdir / "pcscd.log"
        self.qemu_log_path = workdir / "qemu.log"
        self.transcript_path = workdir / "commands.log"
        self._buffer = b""
        self.boot_seconds = 0.0

    # ----------------------------------------------------------------- for subclasses

    def start(self, timeout: float = 60) -> None:
        """Boot; return once pcscd runs and the command channel answers."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the VM (idempotent)."""
        raise NotImplementedError

    def _send(self, data: bytes) -> None:
        """Write ``data`` to the guest's command channel (raise GuestError if not running)."""
        raise NotImplementedError

    def _read_some(self, deadline: float, what: str) -> None:
        """Wait (until ``deadline``) for bytes from the command channel and keep them."""
        raise NotImplementedError

    def _received(self, chunk: bytes) -> None:
        self._buffer += chunk
        with self.transcript_path.open("ab") as fh:
            fh.write(chunk)

    def _wait_ready(self, started: float, deadline: float) -> None:
        """Read until the guest's ``<<<READY>>>`` line; record the boot time."""
        while READY_MARKER.encode() not in self._buffer:
            self._read_some(deadline, "boot")
        self._buffer = self._buffer.split(READY_MARKER.encode() + b"\n", 1)[-1]
        self.boot_seconds = time.monotonic() - started
        logger.info("guest ready in %.1f s", self.boot_seconds)

    # ----------------------------------------------------------------- commands and logs

    def run(self, script: str, timeout: float = 20) -> CommandResult:
        """Run a shell script in the guest (busybox sh, stdout+stderr merged).

        The guest kills the script after ``timeout`` seconds (status 137); the host waits a
        little longer for the answer and raises :class:`GuestError` if none comes.
        """
        secs = max(1, int(timeout + 0.999))
        line = f"{secs} {base64.b64encode(script.encode()).decode()}\n".encode()
        with self.transcript_path.open("ab") as fh:
            fh.write(f"\n### host> {script!r} (timeout {secs} s)\n".encode())
        self._send(line)
        deadline = time.monotonic() + secs + 15
        while (m := END_RE.search(self._buffer)) is None:
            self._read_some(deadline, f"command {script!r}")
        output = self._buffer[: m.start()].decode("utf-8", "replace")
        self._buffer = self._buffer[m.end():]
        return CommandResult(int(m.group(1)), output)

    def check(self, script: str, timeout: float = 20) -> str:
        """Like :meth:`run` but raise :class:`GuestError` unless the status is 0."""
        result = self.run(script, timeout)
        if result.status != 0:
            raise GuestError(
                f"guest command {script!r} failed with status {result.status}:\n{result.output}"
            )
        return result.output

    def pcscd_log(self) -> str:
        """pcscd's --debug --apdu log so far (streamed live on ttyS2)."""
        try:
            return self.pcscd_log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_pcscd_log(self, pattern: str, since: int = 0, timeout: float = 15) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the pcscd log after offset ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.pcscd_log(), since)
            if m:
                return m
            if time.monotonic() > deadline:
                raise GuestError(
                    f"{pattern!r} not in the guest's pcscd log after {timeout} s; tail:\n"
                    + tail(self.pcscd_log()[since:], 30)
                )
            time.sleep(0.1)

    def wait_card(self, timeout: float = 20) -> str:
        """Poll ``opensc-tool -a`` in the guest until it prints an ATR; return its output."""
        script = (
            f"i=0; while [ $i -lt {int(timeout * 4)} ]; do "
            "opensc-tool -a 2>&1 >/tmp/atr && { cat /tmp/atr; exit 0; }; "
            "i=$((i + 1)); sleep 0.25; done; cat /tmp/atr; exit 1"
        )
        return self.check(script, timeout + 5)

    def diagnostics(self) -> str:
        parts = []
        for label, path in (
            ("serial console", self.console_path),
            (self.qemu_log_label, self.qemu_log_path),
            ("pcscd log", self.pcscd_log_path),
            ("command channel", self.transcript_path),
        ):
            with contextlib.suppress(OSError):
                parts.append(f"--- {label} ({path}), tail:\n"
                             + tail(path.read_bytes().decode("utf-8", "replace"), 25))
        return "\n".join(parts)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Guest(SerialGuest):
    """One running QEMU guest: ``run()`` shell commands in it, read its pcscd log.

    ``vsc_socket`` is the unix socket of QEMU's ccid-card-passthru chardev.  In
    :attr:`ChardevMode.QEMU_SERVER` mode QEMU creates it; in :attr:`ChardevMode.QEMU_CLIENT`
    mode the daemon must already listen there when :meth:`start` is called; in
    :attr:`ChardevMode.SPICE` mode (with ``spice``) the chardev is ``spicevmc`` and the
    ``-spice`` server is QEMU's.

    ``readers``: the number of usb-ccid devices, each with its own chardev; the first uses
    ``vsc_socket``, the others :attr:`vsc_sockets` (``vsc1.sock``, ... beside it).
    ``share_host``: give the guest the host's files read-only at ``/host`` (9p, with the
    guest's own ``/proc``, ``/sys``, ``/dev``, ``/tmp`` and ``/run`` mounted inside), so that
    ``chroot /host`` runs the host's programs next to the guest's devices; the host's own
    ``/tmp`` is at ``/host-tmp`` (bind a directory of it into ``/host/tmp`` to use it there).
    """

    def __init__(
        self,
        image: GuestImage,
        workdir: Path,
        vsc_socket: Path,
        mode: ChardevMode,
        *,
        pcap: Path | None = None,
        memory_mb: int = 512,
        spice: SpiceOptions | None = None,
        readers: int = 1,
        share_host: bool = False,
    ) -> None:
        if (mode is ChardevMode.SPICE) != (spice is not None):
            raise GuestError("SpiceOptions go with ChardevMode.SPICE, and only with it")
        if spice is not None and readers != 1:
            raise GuestError("a SPICE guest has one reader (one spicevmc smartcard chardev)")
        super().__init__(image, workdir, memory_mb=memory_mb)
        self.spice = spice
        self.vsc_socket = vsc_socket
        self.mode = mode
        self.pcap = pcap
        self.share_host = share_host
        #: one chardev socket per usb-ccid device, the first is ``vsc_socket``
        self.vsc_sockets = [vsc_socket] + [vsc_socket.with_name(f"vsc{i}.sock")
                                           for i in range(1, readers)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._selector: selectors.DefaultSelector | None = None

    def qemu_command(self) -> list[str]:
        spice: list[str] = []
        devices: list[str] = ["-device", "qemu-xhci,id=xhci"]
        for i, path in enumerate(self.vsc_sockets):
            name = "vsc" if i == 0 else f"vsc{i}"
            if self.mode is ChardevMode.QEMU_SERVER:
                vsc = f"socket,id={name},path={path},server=on,wait=off"
            elif self.mode is ChardevMode.QEMU_CLIENT:
                vsc = f"socket,id={name},path={path},reconnect=1"
            else:  # one reader: QEMU 7.2 takes one spicevmc smartcard chardev
                assert self.spice is not None and i == 0
                vsc = f"spicevmc,id={name},name=smartcard"
                spice = self.spice.qemu_args(self.workdir)
            ccid = "usb-ccid,bus=xhci.0" + (f",pcap={self.pcap}" if self.pcap and i == 0 else "")
            devices += ["-device", ccid, "-chardev", vsc,
                        "-device", f"ccid-card-passthru,chardev={name}"]
        append = "console=ttyS0 panic=-1 quiet"
        if len(self.vsc_sockets) > 1:
            append += f" ccidemu.readers={len(self.vsc_sockets)}"
        if self.share_host:
            devices += ["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on"]
            append += " ccidemu.host=1"
        return [
            QEMU, "-accel", "tcg", "-cpu", "max", "-machine", "q35", "-m", str(self.memory_mb),
            "-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", append,
            "-serial", f"file:{self.console_path}",
            "-serial", "stdio",
            "-serial", f"file:{self.pcscd_log_path}",
            *devices, *spice,
        ]

    def start(self, timeout: float = 60) -> None:
        """Boot; return once pcscd runs and the command channel answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.qemu_command()
        logger.info("starting %s", " ".join(cmd))
        started = time.monotonic()
        with self.qemu_log_path.open("wb") as qemu_log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=qemu_log,
                start_new_session=True,
            )
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)
        self._wait_ready(started, started + timeout)

    def _send(self, data: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise GuestError("guest is not running")
        self._proc.stdin.write(data)
        self._proc.stdin.flush()

    def _read_some(self, deadline: float, what: str) -> None:
        assert self._proc is not None and self._selector is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestError(f"guest timed out during {what}\n{self.diagnostics()}")
        for _key, _ev in self._selector.select(min(remaining, 0.5)):
            assert self._proc.stdout is not None
            chunk = self._proc.stdout.read(65536)
            if chunk:
                self._received(chunk)
                return
            if chunk is not None:  # EOF
                self._proc.wait(timeout=10)
                raise GuestError(
                    f"QEMU exited ({self._proc.returncode}) during {what}\n{self.diagnostics()}"
                )
        if self._proc.poll() is not None:
            raise GuestError(
                f"QEMU exited ({self._proc.returncode}) during {what}\n{self.diagnostics()}"
            )

    def interact(self, stdin: int, stdout: int, *, rows: int | None = None,
                 cols: int | None = None, escape: bytes | None = b"\x1d") -> int | None:
        """An interactive shell in the guest, on the command channel: the bytes read from
        the file descriptor ``stdin`` are typed into it, its output is written to ``stdout``.

        The guest runs busybox ``sh -i`` in a pseudo-terminal of its own (util-linux
        ``script``), so that line editing, echo and Ctrl-C work there while the serial line
        stays raw; ``rows``/``cols`` set its size.  Returns the shell's exit status once it
        exits (``exit`` or Ctrl-D; at the end of a ``stdin`` that is no terminal, ``exit`` is
        typed: the last command's status), after which :meth:`run` works again; None when
        the ``escape`` byte (Ctrl-], like telnet's) was read: the shell is left running, and
        only :meth:`close` is safe then.  Put a terminal
        ``stdin`` into raw mode first (``tty.setraw``) so that keys reach the guest as typed.
        """
        if self._proc is None or self._proc.stdin is None or self._proc.stdout is None:
            raise GuestError("guest is not running")
        size = f"stty rows {int(rows)} cols {int(cols)}\n" if rows and cols else ""
        script = INTERACTIVE_SCRIPT.replace("SIZE\n", size)
        line = f"{INTERACTIVE_TIMEOUT} {base64.b64encode(script.encode()).decode()}\n".encode()
        with self.transcript_path.open("ab") as fh:
            fh.write(b"\n### host> (interactive shell)\n")
        self._proc.stdin.write(line)
        self._proc.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self._proc.stdout, selectors.EVENT_READ, "guest")
        selector.register(stdin, selectors.EVENT_READ, "user")
        pending, self._buffer = self._buffer, b""
        try:
            while True:
                m = END_RE.search(pending) or _END_AT_START_RE.match(pending)
                if m:
                    _write_all(stdout, pending[: m.start()])
                    self._buffer = pending[m.end():]
                    return int(m.group(1))
                cut = _marker_prefix_at(pending)
                _write_all(stdout, pending[:cut])
                pending = pending[cut:]
                events = selector.select(0.5)
                if not events and pending:  # a lone "<" that stayed alone: not the marker
                    _write_all(stdout, pending)
                    pending = b""
                for key, _ in events:
                    if key.data == "guest":
                        chunk = self._proc.stdout.read(65536)
                        if chunk is None:
                            continue
                        if not chunk:
                            _write_all(stdout, pending)
                            self._proc.wait(timeout=10)
                            raise GuestError(f"QEMU exited ({self._proc.returncode}) during "
                                             f"the interactive shell\n{self.diagnostics()}")
                        with self.transcript_path.open("ab") as fh:
                            fh.write(chunk)
                        pending += chunk
                        continue
                    typed = os.read(stdin, 4096)
                    if not typed:  # end of input (a pipe, a file): leave as ``exit`` does,
                        selector.unregister(stdin)  # with the last command's status
                        typed = b"\rexit\r"
                    elif escape and escape in typed:
                        self._proc.stdin.write(typed.split(escape, 1)[0])
                        self._proc.stdin.flush()
                        return None
                    self._proc.stdin.write(typed)
                    self._proc.stdin.flush()
        finally:
            selector.close()

    def close(self) -> None:
        """Stop QEMU: ``poweroff -f`` in the guest, else SIGTERM, else SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._selector is not None:
            self._selector.close()
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            poweroff = base64.b64encode(b"poweroff -f").decode()
            proc.stdin.write(f"5 {poweroff}\n".encode())
            proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):  # QEMU flushes its files on SIGTERM
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def boot_guest(
    image: GuestImage, workdir: Path, mode: ChardevMode, *, pcap: bool = False,
    spice: SpiceOptions | None = None, readers: int = 1, share_host: bool = False,
) -> Iterator[Guest]:
    """Boot a guest in ``workdir`` (socket ``vsc.sock``, pcap ``usb.pcap``); stop it after.

    ``spice``: the ``-spice`` server of a :attr:`ChardevMode.SPICE` guest; ``readers`` and
    ``share_host``: see :class:`Guest`.
    """
    guest = Guest(
        image, workdir, workdir / "vsc.sock", mode, pcap=workdir / "usb.pcap" if pcap else None,
        spice=spice, readers=readers, share_host=share_host,
    )
    try:
        guest.start()
        yield guest
    finally:
        guest.close()


#: What :meth:`Guest.interact` runs in the guest: ``sh -i`` in a pseudo-terminal (util-linux
#: ``script``) on the command channel's serial line.  ``script`` gives the pty the line's
#: settings (so the line is made sane first: the pty then echoes, ends lines with CR LF and
#: turns Ctrl-C into SIGINT), keeps the line raw while it runs, and ``-e`` exits with the
#: shell's status; the line is raw again for the command channel afterwards.  The command
#: loop starts every command in the background, so with SIGINT and SIGQUIT ignored (POSIX
#: sh without job control), which the shell would keep for what it runs: env resets them,
#: and Ctrl-C stops the guest's command, not nothing (by its path: busybox sh would run its
#: own env applet for a bare ``env``).  The line is
#: the command loop's fd 3, duplicated rather than opened: opening it would make it this
#: session's controlling terminal, and the kernel hangs up a serial controlling terminal
#: (every open file of it, the command loop's too) when its session leader exits.
INTERACTIVE_SCRIPT = r"""grep -qs ' /dev/pts ' /proc/mounts || {
  mkdir -p /dev/pts && mount -t devpts devpts /dev/pts; }
exec <&3 >&3 2>&3
stty sane
SIZE
cd /root
export PS1='ccidemu-guest# ' TERM=vt100 SHELL=/bin/sh
script -q -e -c '/usr/bin/env --default-signal=INT,QUIT sh -i' /dev/null
rc=$?
stty raw -echo
exit $rc
"""
#: The guest's watchdog for an interactive shell: ten days.
INTERACTIVE_TIMEOUT = 864_000
#: The end marker at the very start of the output (END_RE wants a newline before it).
_END_AT_START_RE = re.compile(rb"<<<END:(-?\d+)>>>\n")
_MARKER_PREFIX_RE = re.compile(rb"<(<(<(E(N(D(:(-?\d*(>(>(>)?)?)?)?)?)?)?)?)?)?")


def _marker_prefix_at(data: bytes) -> int:
    """Where the end of ``data`` could be the start of an end marker cut short (len: nowhere)."""
    for i in range(max(0, len(data) - 24), len(data)):
        if data[i] == 0x3C and _MARKER_PREFIX_RE.fullmatch(data, i):
            return i - 1 if i and data[i - 1] == 0x0A else i
    return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the end-to-end test guest (cached).")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cache", type=Path, help="cache directory (default: %(default)s)",
                        default=cache_root())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = missing_host_tools()
    if missing:
        logger.error("missing on this host: %s", ", ".join(missing))
        return 1
    started = time.monotonic()
    image = build_guest(args.cache, force=args.force)
    logger.info("kernel %s\ninitrd %s (%d bytes)\n%.1f s", image.kernel, image.initrd,
                image.initrd.stat().st_size, time.monotonic() - started)
    return 0


# --------------------------------------------------------------------------- test card

#: Test card echo command (``80 E0``): answers 01 02 03 90 00.
ECHO = "80E0000003010203"


def wait_apdus_work(guest: SerialGuest, timeout: float = 20) -> str:
    """Send the echo APDU from the guest until it gets the test card's answer."""
    script = (
        f"i=0; while [ $i -lt {int(timeout * 2)} ]; do "
        f"opensc-tool -s {ECHO} >/tmp/o 2>&1 && grep -q '^01 02 03' /tmp/o && "
        "{ cat /tmp/o; exit 0; }; i=$((i + 1)); sleep 0.5; done; cat /tmp/o; exit 1"
    )
    return guest.check(script, timeout + 10)


if __name__ == "__main__":
    sys.exit(main())
