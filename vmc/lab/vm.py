"""The tiny QEMU guest with a card in its reader: what ``ccidemu lab`` and the pytest
plugin's ``ccidemu_guest`` fixture run.

:class:`LabVm` checks the host (QEMU with usb-ccid, busybox, apt and the guest's programs;
:func:`missing_prerequisites` names what is missing and the Debian packages that bring it),
builds or reuses the cached guest (:func:`vmc.lab.guest.build_guest`, in
``$CCIDEMU_CACHE/guest`` or ``~/.cache/ccidemu/guest``), boots it with QEMU as the chardev
server, starts ``ccidemu serve --connect`` with the card (a subprocess,
:class:`vmc.lab.serve.ServeProcess`, its log in ``serve/serve.log``) and waits until the
guest's pcscd sees the card.  Then :meth:`LabVm.run` runs commands in the guest,
:meth:`LabVm.insert` swaps the card for a fresh one, :meth:`LabVm.interact` gives a shell.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ccidemu.cards import CardOptions, open_card
from vmc.lab import guest as guest_module
from vmc.lab.errors import LabError
from vmc.lab.guest import (
    GUEST_HOST_PACKAGES,
    BuildProgress,
    ChardevMode,
    CommandResult,
    Guest,
    GuestError,
    GuestImage,
    build_guest,
    missing_host_tools,
)
from vmc.lab.serve import DaemonError, ServeProcess

__all__ = ["LabVm", "check_card_spec", "missing_prerequisites"]

#: What :func:`vmc.lab.guest.missing_host_tools` may name -> the Debian package with it.
_PACKAGES = {
    "busybox": "busybox-static", "apt-get": "apt", "dpkg-deb": "dpkg", "ldd": "libc-bin",
    "gzip": "gzip", "/usr/sbin/pcscd": "pcscd", "/usr/bin/opensc-tool": "opensc",
    "/usr/bin/pkcs11-tool": "opensc", "/usr/bin/pkcs15-tool": "opensc",
    "/usr/bin/piv-tool": "opensc", "/usr/bin/pcsc_scan": "pcsc-tools",
    "/usr/bin/script": "bsdutils", "libccid.so": "libccid", "opensc-pkcs11.so": "opensc-pkcs11",
    "libpcsclite.so.1": "libpcsclite1", "libgcc_s.so.1": "libgcc-s1",
}


def missing_prerequisites() -> str | None:
    """None when this host can build and boot the guest, else one line naming what is
    missing and the Debian packages to install."""
    missing = missing_host_tools()
    if not missing:
        return None
    packages: list[str] = []
    for item in missing:
        if item == guest_module.QEMU or item.startswith(("QEMU device", guest_module.QEMU)):
            name = "qemu-system-x86"
        else:
            name = _PACKAGES.get(item) or _PACKAGES.get(Path(item).name) or ""
        if name and name not in packages:
            packages.append(name)
    install = " ".join(packages) if packages else GUEST_HOST_PACKAGES
    return (f"the QEMU guest needs what this host lacks: {', '.join(missing)} "
            f"(Debian: apt-get install {install})")


def check_card_spec(spec: str) -> str:
    """Open the card once here (ConfigError naming what is wrong), before any boot."""
    card = open_card(spec, CardOptions())
    return card.name


class LabVm:
    """The guest with one card in its reader (see the module docstring).

    ``workdir``: a short directory (unix sockets) for the guest's logs (``console.log``,
    ``qemu.log``, ``pcscd.log``, ``commands.log``) and ``serve/``.  ``image``: a built
    guest (default: built or taken from the cache in :meth:`start`).
    """

    def __init__(self, card: str, workdir: Path, *, image: GuestImage | None = None,
                 cache: Path | None = None, serve_args: Sequence[str] = (),
                 memory_mb: int = 512) -> None:
        self.card = card
        self.workdir = workdir
        self.image = image
        self.cache = cache
        self.serve_args = tuple(serve_args)
        self.memory_mb = memory_mb
        self.guest: Guest | None = None
        self.serve: ServeProcess | None = None

    def prepare(self, progress: BuildProgress | None = None, *, force: bool = False
                ) -> GuestImage:
        """Check the card spec and the host, build the guest (or take it from the cache)."""
        check_card_spec(self.card)
        problem = missing_prerequisites()
        if problem is not None:
            raise LabError(problem)
        if self.image is None or force:
            try:
                self.image = build_guest(self.cache, force=force, progress=progress)
            except GuestError as exc:
                raise LabError(f"building the guest failed: {_first_line(exc)}") from None
            except OSError as exc:
                raise LabError(f"building the guest failed: {exc}") from None
        return self.image

    def start(self, progress: BuildProgress | None = None, timeout: float = 120) -> None:
        """Prepare, boot, start ``ccidemu serve`` and wait until the guest sees the card."""
        image = self.prepare(progress)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if progress is not None:
            progress.step("booting the guest (QEMU, no KVM needed)")
        guest = Guest(image, self.workdir, self.workdir / "vsc.sock", ChardevMode.QEMU_SERVER,
                      memory_mb=self.memory_mb)
        self.guest = guest
        try:
            guest.start(timeout=timeout)
            if progress is not None:
                progress.step(f"starting ccidemu serve with --card {self.card}")
            self.serve = ServeProcess(self.workdir / "serve", guest.vsc_socket,
                                      ChardevMode.QEMU_SERVER, cards=[self.card],
                                      extra_args=self.serve_args, verbose=2)
            self.serve.start(timeout=60)
            if progress is not None:
                progress.step("waiting for the guest's pcscd to see the card")
            guest.wait_card(timeout=60)
        except (GuestError, DaemonError) as exc:
            self.close()
            raise LabError(f"{_first_line(exc)} (logs in {self.workdir})") from None

    def _running(self) -> tuple[Guest, ServeProcess]:
        if self.guest is None or self.serve is None:
            raise LabError("the lab VM is not running (call start first)")
        return self.guest, self.serve

    def run(self, command: str, timeout: float = 60) -> CommandResult:
        """Run a shell command in the guest (busybox sh; stdout and stderr merged)."""
        guest, _ = self._running()
        try:
            return guest.run(command, timeout)
        except GuestError as exc:
            raise LabError(f"{_first_line(exc)} (logs in {self.workdir})") from None

    def insert(self, card: str | None = None, timeout: float = 60) -> None:
        """Take the card out and insert a fresh one (``card``: another spec; None: the
        same spec again, with fresh state); returns once the guest's pcscd sees it."""
        guest, serve = self._running()
        if card is not None:
            check_card_spec(card)
        try:
            serve.ctl_ok("remove", "vm1")
            guest.check(  # until the guest's pcscd saw the card leave
                f"i=0; while opensc-tool -a >/dev/null 2>&1; do i=$((i + 1)); "
                f"[ $i -gt {int(timeout * 4)} ] && exit 1; sleep 0.25; done", timeout + 5)
            serve.ctl_ok("insert", "vm1", *(["--card", card] if card else []))
            guest.wait_card(timeout=timeout)
        except (GuestError, DaemonError) as exc:
            raise LabError(f"{_first_line(exc)} (logs in {self.workdir})") from None
        if card is not None:
            self.card = card

    def interact(self, stdin: int, stdout: int, *, rows: int | None = None,
                 cols: int | None = None) -> int | None:
        """An interactive shell in the guest (:meth:`vmc.lab.guest.Guest.interact`)."""
        guest, _ = self._running()
        try:
            return guest.interact(stdin, stdout, rows=rows, cols=cols)
        except GuestError as exc:
            raise LabError(f"{_first_line(exc)} (logs in {self.workdir})") from None

    def close(self) -> None:
        """Stop ``ccidemu serve`` and the guest."""
        serve, self.serve = self.serve, None
        guest, self.guest = self.guest, None
        if serve is not None:
            serve.stop()
        if guest is not None:
            guest.close()

    def __enter__(self) -> LabVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def short_workdir(prefix: str = "ccidemu-lab-") -> Path:
    """A new private directory with a short path (unix sockets live there)."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 40:
        base = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove_workdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
