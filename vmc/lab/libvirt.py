"""A private libvirtd, and the tiny test guest (:mod:`vmc.lab.guest`) run by it.

What it reproduces (docs/DEPLOY.md, docs/PROTOCOL.md "libvirt"): the system libvirtd of a
libvirt host, running as root, whose qemu driver starts QEMU as the unprivileged
``libvirt-qemu`` user, so that QEMU's ccid-card-passthru chardev meets the permissions it
meets on such a host.

Private: libvirtd runs in a mount namespace of its own (``unshare --mount``) in which a
directory of ours is bind-mounted over each of the fixed paths of a root libvirtd
(:data:`SYSTEM_DIRS`: its configuration, state, cache, runtime and log directories).  Its
sockets are in that directory too (``unix_sock_dir``), so virsh reaches it with
``qemu:///system?socket=...`` and a host's own libvirt (its configuration, its domains, its
daemon if one runs) is never seen nor touched.  What stays on the host: the ``libvirt-qemu``
user with its groups ``libvirt-qemu`` and ``kvm`` (:func:`ensure_qemu_user` creates them when
missing, as Debian's libvirt-daemon-system does) and, where the host has none, the empty
mount points of :data:`SYSTEM_DIRS` (an empty directory is what the package would create).

``qemu.conf`` suits a machine with no systemd, no virtlogd, no cgroup delegation:
``stdio_handler = "file"`` (QEMU's output to the domain log without virtlogd),
``cgroup_controllers = []``, ``namespaces = []``, ``security_driver = "none"`` and
``dynamic_ownership = 0`` (libvirt leaves the owners of our files alone: :class:`LibvirtGuest`
makes the guest's kernel, initrd and log files readable and writable for ``libvirt-qemu``
itself).  It sets no ``user``/``group``: QEMU runs as libvirt's default, ``libvirt-qemu``.
The namespace also hides ``/dev/kvm`` (:data:`KVM_DEVICE`): the domains are TCG.

:class:`LibvirtGuest` is the guest of :mod:`vmc.lab.guest` defined and started through
``virsh``: ttyS0 (console) and ttyS2 (pcscd's log) are ``<serial type='file'>``, and the
command channel ttyS1 is a ``<serial type='unix'>`` with ``<source mode='connect'>``: the host
listens on a unix socket before ``virsh start``, so QEMU connects while it starts and no byte
the guest writes is lost.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from vmc.lab.guest import QEMU, GuestError, GuestImage, SerialGuest, tail

logger = logging.getLogger(__name__)

LIBVIRTD = os.environ.get("CCIDEMU_LIBVIRTD", "libvirtd")  # override to test a skip
VIRSH = os.environ.get("CCIDEMU_VIRSH", "virsh")
QEMU_DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")

#: Debian packages that provide what :func:`missing_libvirt_tools` looks for.
LIBVIRT_HOST_PACKAGES = "libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients"

#: The user libvirt's qemu driver runs QEMU as (its built-in default on Debian), and the
#: groups it has: its own, and ``kvm`` (the group a ccidemu socket is given for it).
QEMU_USER = "libvirt-qemu"
QEMU_GROUPS = ("libvirt-qemu", "kvm")

#: A root libvirtd's fixed directories: our ``root / name`` is bind-mounted over each.
SYSTEM_DIRS = {
    "etc": Path("/etc/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "run": Path("/run/libvirt"),
    "log": Path("/var/log/libvirt"),
}

#: Hidden from libvirtd (an empty root-only file is bind-mounted over it in its namespace):
#: libvirt probes QEMU with CAP_DAC_OVERRIDE, so a /dev/kvm that only root may open (no udev
#: rule gave it to group kvm) looks usable to the probe but not to ``libvirt-qemu``, and
#: libvirt then throws its capabilities cache away and probes QEMU again (seconds each) on
#: every lookup, making one ``virsh define`` take a minute.  The test domains are TCG anyway.
KVM_DEVICE = Path("/dev/kvm")

#: libvirt's XML namespace for ``<qemu:commandline>`` (QEMU arguments libvirt has no XML for).
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)


class LibvirtError(GuestError):
    """libvirtd did not start, or a virsh command failed."""


# --------------------------------------------------------------------------- host checks


def missing_libvirt_tools() -> list[str]:
    """What this host lacks to run the private libvirtd (empty when everything is there)."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root (a system libvirtd and the libvirt-qemu user need it)")
    for tool in (LIBVIRTD, VIRSH, "unshare", "mount", "useradd", "groupadd", "usermod"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not QEMU_DRIVER.exists():
        missing.append(f"{QEMU_DRIVER} (libvirt-daemon-driver-qemu)")
    if not missing:
        proc = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True,
                              timeout=30, check=False)
        if proc.returncode != 0:
            missing.append(f"mount namespaces (unshare --mount: {proc.stderr.strip()})")
    return missing


@dataclass(frozen=True)
class ProcessIds:
    """A process's user, group and supplementary groups (``/proc/PID/status``)."""

    uid: int
    gid: int
    groups: frozenset[int]


def ensure_qemu_user() -> ProcessIds:
    """Create the ``libvirt-qemu`` user and its groups if missing (idempotent); its ids."""
    for group in QEMU_GROUPS:
        if not _exists(grp.getgrnam, group):
            logger.info("adding system group %s", group)
            _add(["groupadd", "--system", group], grp.getgrnam, group)
    if not _exists(pwd.getpwnam, QEMU_USER):
        logger.info("adding system user %s", QEMU_USER)
        _add(["useradd", "--system", "--gid", QEMU_GROUPS[0], "--groups", QEMU_GROUPS[1],
              "--home-dir", str(SYSTEM_DIRS["lib"]), "--no-create-home",
              "--shell", "/usr/sbin/nologin", "--comment", "Libvirt Qemu", QEMU_USER],
             pwd.getpwnam, QEMU_USER)
    user = pwd.getpwnam(QEMU_USER)
    kvm = grp.getgrnam(QEMU_GROUPS[1])
    if QEMU_USER not in kvm.gr_mem and kvm.gr_gid != user.pw_gid:
        logger.info("adding %s to group %s", QEMU_USER, kvm.gr_name)
        _checked(["usermod", "--append", "--groups", kvm.gr_name, QEMU_USER])
    groups = {g.gr_gid for g in grp.getgrall() if QEMU_USER in g.gr_mem}
    return ProcessIds(user.pw_uid, user.pw_gid, frozenset(groups | {user.pw_gid}))


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _add(cmd: Sequence[str], lookup: Callable[[str], object], name: str) -> None:
    """Run groupadd/useradd; another test run adding the same name first is no failure."""
    try:
        _checked(cmd)
    except LibvirtError:
        if not _exists(lookup, name):
            raise


def process_ids(pid: int) -> ProcessIds:
    """The real user, group and supplementary groups of a running process."""
    fields: dict[str, list[str]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return ProcessIds(int(fields["Uid"][0]), int(fields["Gid"][0]),
                      frozenset(int(g) for g in fields.get("Groups", [])))


def _checked(cmd: Sequence[str], timeout: float = 60) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise LibvirtError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


# --------------------------------------------------------------------------- libvirtd

_LIBVIRTD_CONF = """\
# ccidemu lab: a private libvirtd (vmc/lab/libvirt.py)
unix_sock_dir = "{sock}"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:{log}"
"""

_QEMU_CONF = """\
# ccidemu lab: a private libvirtd (vmc/lab/libvirt.py); QEMU runs as libvirt's default user
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
dynamic_ownership = 0
"""

# Runs in the new mount namespace: bind our directories over libvirt's, then become libvirtd.
_NAMESPACE_SCRIPT = """\
set -e
libvirtd=$1 conf=$2 pidfile=$3
shift 3
while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
exec "$libvirtd" -f "$conf" -p "$pidfile"
"""


class PrivateLibvirtd:
    """A root libvirtd with its own configuration, state, sockets and logs under ``root``.

    :meth:`start` creates the ``libvirt-qemu`` user if needed, writes the configuration and
    starts the daemon; :meth:`stop` destroys the domains still running and stops it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock_dir = root / "sock"
        self.conf = root / "etc" / "libvirtd.conf"
        self.log_path = root / "libvirtd.log"
        self.stderr_path = root / "libvirtd.stderr"
        self.pid_file = root / "libvirtd.pid"
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        self.qemu_user: ProcessIds | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def path(self, name: str) -> Path:
        """Our directory seen by libvirtd as ``SYSTEM_DIRS[name]``."""
        return self.root / name

    def domain_log_path(self, domain: str) -> Path:
        """The domain's log (``/var/log/libvirt/qemu/NAME.log`` to libvirtd): QEMU's command
        line and everything QEMU writes to stderr."""
        return self.path("log") / "qemu" / f"{domain}.log"

    def start(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise LibvirtError("libvirtd already running")
        self.qemu_user = ensure_qemu_user()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # QEMU (libvirt-qemu) opens files under run/ and lib/
        binds: list[str] = []
        for name, system in SYSTEM_DIRS.items():
            self.path(name).mkdir(exist_ok=True)
            if not system.is_dir():
                logger.info("creating the empty mount point %s", system)
                system.mkdir(parents=True, exist_ok=True)
            binds += [str(self.path(name)), str(system)]
        if KVM_DEVICE.exists():
            no_kvm = self.root / "no-kvm"
            no_kvm.write_bytes(b"")
            os.chmod(no_kvm, 0o600)
            binds += [str(no_kvm), str(KVM_DEVICE)]
        self.sock_dir.mkdir(mode=0o700, exist_ok=True)
        self.conf.write_text(_LIBVIRTD_CONF.format(sock=self.sock_dir, log=self.log_path))
        (self.path("etc") / "qemu.conf").write_text(_QEMU_CONF)
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
               _NAMESPACE_SCRIPT, "sh", shutil.which(LIBVIRTD) or LIBVIRTD, str(self.conf),
               str(self.pid_file), *binds]
        logger.info("starting a private libvirtd in %s", self.root)
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         start_new_session=True)
        try:
            self._wait_answer(self.proc, time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_answer(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        while True:
            if proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited with {proc.returncode} at start:\n"
                                   + self.diagnostics())
            probe = self.virsh("version", check=False, timeout=15)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd does not answer ({probe.stderr.strip()}):\n"
                                   + self.diagnostics())
            time.sleep(0.2)

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``virsh -c URI ARGS...``; raises :class:`LibvirtError` on failure if ``check``."""
        cmd = [VIRSH, "-q", "-c", self.uri, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def diagnostics(self) -> str:
        parts = []
        for label, path in (("libvirtd log", self.log_path),
                            ("libvirtd stderr", self.stderr_path)):
            with contextlib.suppress(OSError):
                parts.append(f"--- {label} ({path}), tail:\n"
                             + tail(path.read_bytes().decode("utf-8", "replace"), 25))
        return "\n".join(parts)

    def stop(self, timeout: float = 15) -> None:
        """Destroy the running domains, then stop libvirtd (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            running = self.virsh("list", "--name", check=False, timeout=30)
            for name in running.stdout.split():
                self.virsh("destroy", name, check=False, timeout=30)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # A QEMU that outlived its domain (libvirtd killed first), or a capabilities probe
        # that outlived libvirtd, would keep the namespace.
        for pid_file in [*(self.path("run") / "qemu").glob("*.pid"),
                         *(self.path("lib") / "qemu").glob("qmp-*/qmp.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"qemu" in cmdline and str(self.root).encode() in Path(
                        f"/proc/{pid}/mountinfo").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- guest


def _readable_by_all(path: Path) -> None:
    """Refuse a directory on ``path``'s way that ``libvirt-qemu`` could not traverse."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            raise LibvirtError(f"{parent} is not searchable by others: QEMU, running as "
                               f"{QEMU_USER}, could not reach {path}")


class LibvirtGuest(SerialGuest):
    """The test guest as a libvirt domain (``<domain type='qemu'>``, TCG) of ``libvirtd``.

    ``devices`` are elements added to ``<devices>`` (a ``<smartcard>``, say) and ``extra``
    elements added to ``<domain>`` (a ``<qemu:commandline>``) before ``virsh define``.
    ``workdir`` gets the guest's own copy of the kernel and initrd, its logs and the command
    channel's socket; it is made searchable for ``libvirt-qemu``, and its parents must be.
    ``readers``: how many usb-ccid devices the guest waits for before it starts pcscd (which
    sees no device plugged in later: the guest has no udevd).
    """

    qemu_log_label = "libvirt domain log"

    def __init__(
        self,
        libvirtd: PrivateLibvirtd,
        image: GuestImage,
        workdir: Path,
        name: str,
        *,
        devices: Sequence[ET.Element] = (),
        extra: Sequence[ET.Element] = (),
        memory_mb: int = 512,
        readers: int = 1,
    ) -> None:
        super().__init__(image, workdir, memory_mb=memory_mb)
        self.readers = readers
        self.libvirtd = libvirtd
        self.name = name
        self.devices = tuple(devices)
        self.extra = tuple(extra)
        self.qemu_log_path = libvirtd.domain_log_path(name)
        self.channel_path = workdir / "channel.sock"
        self.kernel = workdir / "vmlinuz"
        self.initrd = workdir / "initrd.gz"
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._defined = False

    def domain_xml(self) -> str:
        domain = ET.Element("domain", type="qemu")
        ET.SubElement(domain, "name").text = self.name
        ET.SubElement(domain, "memory", unit="MiB").text = str(self.memory_mb)
        ET.SubElement(domain, "vcpu").text = "1"
        os_ = ET.SubElement(domain, "os")
        ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
        ET.SubElement(os_, "kernel").text = str(self.kernel)
        ET.SubElement(os_, "initrd").text = str(self.initrd)
        ET.SubElement(os_, "cmdline").text = (
            f"console=ttyS0 panic=-1 quiet ccidemu.readers={self.readers}")
        ET.SubElement(domain, "cpu", mode="maximum")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            ET.SubElement(domain, event).text = "destroy"
        devices = ET.SubElement(domain, "devices")
        emulator = shutil.which(QEMU)
        if emulator:
            ET.SubElement(devices, "emulator").text = emulator
        ET.SubElement(devices, "controller", type="usb", model="qemu-xhci")
        for port, (kind, path) in enumerate((("file", self.console_path),
                                             ("unix", self.channel_path),
                                             ("file", self.pcscd_log_path))):
            serial = ET.SubElement(devices, "serial", type=kind)
            source = ET.SubElement(serial, "source", path=str(path))
            if kind == "unix":
                source.set("mode", "connect")
            ET.SubElement(serial, "target", port=str(port))
        devices.extend(self.devices)
        ET.SubElement(devices, "memballoon", model="none")
        domain.extend(self.extra)
        ET.indent(domain)
        return ET.tostring(domain, encoding="unicode")

    def _prepare_files(self) -> None:
        assert self.libvirtd.qemu_user is not None, "libvirtd not started"
        user = self.libvirtd.qemu_user
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, os.stat(self.workdir).st_mode | 0o755)
        _readable_by_all(self.workdir)
        for src, dst in ((self.image.kernel, self.kernel), (self.image.initrd, self.initrd)):
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o644)
        for log in (self.console_path, self.pcscd_log_path):
            log.write_bytes(b"")
            os.chown(log, user.uid, user.gid)
            os.chmod(log, 0o640)
        with contextlib.suppress(FileNotFoundError):
            self.channel_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.channel_path))
        os.chown(self.channel_path, user.uid, user.gid)
        os.chmod(self.channel_path, 0o600)
        listener.listen(1)
        self._listener = listener

    def start(self, timeout: float = 60) -> None:
        """Define and start the domain; return once pcscd runs and the channel answers."""
        started = time.monotonic()
        deadline = started + timeout
        self._prepare_files()
        xml_path = self.workdir / f"{self.name}.xml"
        xml_path.write_text(self.domain_xml())
        self.libvirtd.virsh("define", str(xml_path))
        self._defined = True
        logger.info("starting libvirt domain %s", self.name)
        self.libvirtd.virsh("start", self.name, timeout=max(1.0, deadline - time.monotonic()))
        self._accept(deadline)
        self._wait_ready(started, deadline)

    def _accept(self, deadline: float) -> None:
        assert self._listener is not None
        while not select.select([self._listener], [], [], 0.5)[0]:
            if not self.running():
                raise GuestError(f"domain {self.name} stopped before QEMU connected to the "
                                 f"command channel\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU did not connect to {self.channel_path}\n"
                                 + self.diagnostics())
        self._conn, _ = self._listener.accept()

    def running(self) -> bool:
        state = self.libvirtd.virsh("domstate", self.name, check=False, timeout=30)
        return state.returncode == 0 and state.stdout.strip() == "running"

    def _send(self, data: bytes) -> None:
        if self._conn is None:
            raise GuestError("guest is not running")
        self._conn.sendall(data)

    def _read_some(self, deadline: float, what: str) -> None:
        if self._conn is None:
            raise GuestError("guest is not running")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestError(f"guest timed out during {what}\n{self.diagnostics()}")
        if select.select([self._conn], [], [], min(remaining, 0.5))[0]:
            chunk = self._conn.recv(65536)
            if not chunk:
                raise GuestError(f"QEMU closed the command channel during {what}\n"
                                 + self.diagnostics())
            self._received(chunk)

    def qemu_pid(self) -> int:
        """QEMU's process id (from libvirt's pid file)."""
        return int((self.libvirtd.path("run") / "qemu" / f"{self.name}.pid").read_text())

    def domain_log(self) -> str:
        try:
            return self.qemu_log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_domain_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the domain log."""
        deadline = time.monotonic() + timeout
        while (m := re.search(pattern, self.domain_log())) is None:
            if time.monotonic() > deadline:
                raise GuestError(f"{pattern!r} not in {self.qemu_log_path} after {timeout} s; "
                                 "tail:\n" + tail(self.domain_log(), 30))
            time.sleep(0.1)
        return m

    def close(self) -> None:
        """Stop the domain (``poweroff -f`` in the guest, else ``virsh destroy``), undefine it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(b"5 cG93ZXJvZmYgLWY=\n")  # 5 s for base64 "poweroff -f"
            deadline = time.monotonic() + 10
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.2)
            conn.close()
        if self._defined:
            if self.running():
                self.libvirtd.virsh("destroy", self.name, check=False, timeout=30)
            self.libvirtd.virsh("undefine", self.name, check=False, timeout=30)
            self._defined = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.channel_path.unlink()


@contextlib.contextmanager
def boot_libvirt_guest(
    libvirtd: PrivateLibvirtd,
    image: GuestImage,
    workdir: Path,
    name: str,
    *,
    devices: Sequence[ET.Element] = (),
    extra: Sequence[ET.Element] = (),
    readers: int = 1,
) -> Iterator[LibvirtGuest]:
    """Start a :class:`LibvirtGuest` in ``workdir``; stop and undefine it after."""
    guest = LibvirtGuest(libvirtd, image, workdir, name, devices=devices, extra=extra,
                         readers=readers)
    try:
        guest.start()
        yield guest
    finally:
        guest.close()
