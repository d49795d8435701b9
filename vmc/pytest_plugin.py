"""The pytest plugin of ccidemu: emulated smart cards for your project's tests.

Installed with the package (entry point ``pytest11``: ``ccidemu``); docs/TESTING.md has the
guide and examples.  Every fixture uses the card spec of :func:`ccidemu_card_spec`: the test's
``@pytest.mark.ccidemu_card("SPEC")``, else ``--ccidemu-card SPEC``, else the ini option
``ccidemu_card``, else ``piv:`` (the demo PIV card).  Each test gets a fresh card: state is
kept in memory only, never shared between tests.

==========================  ===============================================================
fixture                     what the test gets
==========================  ===============================================================
``ccidemu_card_spec``       the spec (str); override the fixture to choose cards yourself
``ccidemu_card``            the card object (:class:`ccidemu.card.Card`), in this process
``ccidemu_session``         a :class:`ccidemu.client.CardSession` over it (chaining, 61xx)
``ccidemu_piv``             a :class:`ccidemu.piv_client.PivClient` over it, PIV selected
``ccidemu_vscard``          QEMU's side of the VSCard channel driving a ``ccidemu serve``
                            with the card (:class:`vmc.lab.channel.VscardChannel`); in
                            process, or a subprocess with ``--ccidemu-serve subprocess``
``ccidemu_qemu_card``       a ``ccidemu serve`` listening for a QEMU VM you boot yourself
                            with its ``.qemu_args`` (:class:`vmc.lab.channel.QemuCard`)
``ccidemu_pcsc``            a PC/SC reader of a private pcscd (socket-activated, vpcd on
                            free ports, never the host's pcscd) holding the card
                            (:class:`PcscReader`); marked ``ccidemu_pcscd``
``ccidemu_guest``           the tiny QEMU guest (pcscd, libccid, OpenSC, pcsc-tools) with
                            the card in its reader (:class:`GuestShell`: ``run``,
                            ``check``); one boot per session; marked ``ccidemu_qemu``
``ccidemu_guest_image``     that guest's kernel and initramfs (built and cached on first
                            use), e.g. to boot with ``ccidemu_qemu_card``; marked
                            ``ccidemu_qemu``
==========================  ===============================================================

The heavy fixtures skip their test, with the reason on one line, when the host lacks what
they need (pcscd and vsmartcard's vpcd; QEMU, busybox, apt and the guest's packages); select
or deselect them with ``-m ccidemu_qemu`` / ``-m "not ccidemu_qemu"`` (and ``ccidemu_pcscd``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ccidemu.card import Card
    from ccidemu.client import CardSession
    from ccidemu.piv_client import PivClient
    from vmc.lab.channel import QemuCard, ServeMode, VscardChannel
    from vmc.lab.guest import CommandResult, GuestImage
    from vmc.lab.pcscd import PcscdHarness
    from vmc.lab.vm import LabVm

DEFAULT_SPEC = "piv:"
_SERVE_MODES = ("inprocess", "subprocess")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ccidemu", "ccidemu emulated smart cards")
    group.addoption("--ccidemu-card", metavar="SPEC", default=None,
                    help="card spec of the ccidemu fixtures (default: the ini option "
                    f"ccidemu_card, else {DEFAULT_SPEC}); a test's "
                    "@pytest.mark.ccidemu_card(SPEC) wins")
    group.addoption("--ccidemu-serve", choices=_SERVE_MODES, default=None,
                    help="where ccidemu_vscard runs ccidemu serve (default: the ini option "
                    "ccidemu_serve, else inprocess)")
    parser.addini("ccidemu_card", f"card spec of the ccidemu fixtures (default {DEFAULT_SPEC})",
                  default=DEFAULT_SPEC)
    parser.addini("ccidemu_serve", "inprocess or subprocess: where ccidemu_vscard runs "
                  "ccidemu serve", default="inprocess")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ccidemu_card(spec): the card spec of this test's "
                            "ccidemu fixtures (piv:, cac:, piv:DIR, ...)")
    config.addinivalue_line("markers", "ccidemu_pcscd: the test uses a private pcscd "
                            "(ccidemu_pcsc; set by the ccidemu plugin)")
    config.addinivalue_line("markers", "ccidemu_qemu: the test boots the QEMU guest "
                            "(ccidemu_guest; set by the ccidemu plugin)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of the heavy fixtures (before ``-m`` selects)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "ccidemu_pcsc" in names:
            item.add_marker("ccidemu_pcscd")
        if "ccidemu_guest" in names or "ccidemu_guest_image" in names:
            item.add_marker("ccidemu_qemu")


# --------------------------------------------------------------------------- cards


@pytest.fixture
def ccidemu_card_spec(request: pytest.FixtureRequest) -> str:
    """The card spec of this test's ccidemu fixtures (see the module docstring)."""
    marker = request.node.get_closest_marker("ccidemu_card")
    if marker is not None:
        if len(marker.args) != 1 or not isinstance(marker.args[0], str):
            raise pytest.UsageError("ccidemu_card takes one card spec, e.g. "
                                    "@pytest.mark.ccidemu_card(\"cac:\")")
        return marker.args[0]
    option = request.config.getoption("ccidemu_card")
    if option:
        return str(option)
    return str(request.config.getini("ccidemu_card") or DEFAULT_SPEC)


@pytest.fixture
def ccidemu_card(ccidemu_card_spec: str) -> Card:
    """A fresh card object for the spec (state in memory, this test's alone)."""
    from ccidemu.cards import CardOptions, open_card

    return open_card(ccidemu_card_spec, CardOptions())


@pytest.fixture
def ccidemu_session(ccidemu_card: Card) -> CardSession:
    """A :class:`~ccidemu.client.CardSession` with the card (powered on: ``.atr``)."""
    from ccidemu.client import CardSession

    return CardSession(ccidemu_card)


@pytest.fixture
def ccidemu_piv(ccidemu_session: CardSession) -> PivClient:
    """A :class:`~ccidemu.piv_client.PivClient` with the card, the PIV application selected."""
    from ccidemu.piv_client import PivClient

    client = PivClient(ccidemu_session)
    client.select()
    return client


# --------------------------------------------------------------------------- VSCard


def _short_dir(prefix: str) -> Path:
    """A private directory whose path is short enough for unix sockets."""
    base = Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base if len(str(base)) <= 40 else "/tmp"))


@pytest.fixture
def ccidemu_serve_mode(request: pytest.FixtureRequest) -> ServeMode:
    """Where :func:`ccidemu_vscard` runs ``ccidemu serve``; override (or parametrize) it."""
    from vmc.lab.channel import ServeMode

    value = request.config.getoption("ccidemu_serve") or request.config.getini("ccidemu_serve")
    if value not in _SERVE_MODES:
        raise pytest.UsageError(f"ccidemu_serve = {value!r}: give inprocess or subprocess")
    return ServeMode(value)


@pytest.fixture
def ccidemu_vscard(ccidemu_card_spec: str, ccidemu_serve_mode: ServeMode
                   ) -> Iterator[VscardChannel]:
    """A fake QEMU (ccid-card-passthru + usb-ccid) connected to a ``ccidemu serve`` that
    serves the card; reader 0 holds it, powered on.  ``.session()``, ``.piv()``,
    ``.transmit()``, ``.qemu`` (CCID level), ``.serve``."""
    from vmc.lab.channel import open_channel

    workdir = _short_dir("ccidemu-vsc-")
    try:
        with open_channel([ccidemu_card_spec], workdir, mode=ccidemu_serve_mode) as channel:
            yield channel
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def ccidemu_qemu_card(ccidemu_card_spec: str) -> Iterator[QemuCard]:
    """A ``ccidemu serve`` (in this process) listening on a unix socket with the card, for
    a QEMU VM the test boots itself with ``.qemu_args`` (see docs/TESTING.md)."""
    from vmc.lab.channel import open_qemu_card

    workdir = _short_dir("ccidemu-vm-")
    try:
        with open_qemu_card([ccidemu_card_spec], workdir) as card:
            yield card
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- PC/SC


@dataclass
class PcscReader:
    """A reader of a private pcscd holding the test's card (through ``ccidemu vpcd``).

    ``env`` points PC/SC clients at this pcscd (``PCSCLITE_CSOCK_NAME``); :meth:`run` runs
    one with it.  This process's environment has it too for the session, so that pyscard
    (or any libpcsclite user) in the test talks to it.  ``name`` is the reader's name,
    ``pkcs11_module`` OpenSC's PKCS#11 module, ``harness`` the
    :class:`vmc.lab.pcscd.PcscdHarness`.
    """

    harness: PcscdHarness
    spec: str
    name: str = ""
    pkcs11_module: Path = field(default_factory=Path)

    @property
    def env(self) -> dict[str, str]:
        return self.harness.env

    @property
    def socket(self) -> Path:
        return self.harness.socket_path

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a PC/SC client with :attr:`env`; ``check``: fail the test when it fails."""
        return self.harness.run(*argv, check=check, timeout=timeout, input=input)

    def bridge_log(self) -> str:
        bridge = self.harness.bridge
        return bridge.log() if bridge is not None else ""


@pytest.fixture(scope="session")
def _ccidemu_pcscd() -> Iterator[PcscdHarness]:
    from vmc.lab.pcscd import VPCD_DRIVER, PcscdHarness, missing_peers

    missing = missing_peers(tools=("pcscd", "opensc-tool"), files=(VPCD_DRIVER,))
    if missing:
        pytest.skip(f"ccidemu_pcsc needs what this host lacks: {', '.join(missing)} "
                    "(Debian: apt-get install pcscd vsmartcard-vpcd opensc)")
    workdir = _short_dir("ccidemu-pcscd-")
    harness = PcscdHarness(workdir)
    try:
        harness.start_pcscd()
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"ccidemu_pcsc: a private pcscd did not start: {str(exc).splitlines()[0]}")
    saved = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ["PCSCLITE_CSOCK_NAME"] = str(harness.socket_path)
    try:
        yield harness
    finally:
        if saved is None:
            os.environ.pop("PCSCLITE_CSOCK_NAME", None)
        else:
            os.environ["PCSCLITE_CSOCK_NAME"] = saved
        harness.stop_bridge()
        harness.stop_pcscd()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def ccidemu_pcsc(_ccidemu_pcscd: PcscdHarness, ccidemu_card_spec: str) -> Iterator[PcscReader]:
    """A PC/SC reader holding a fresh card (see :class:`PcscReader`)."""
    from vmc.lab.pcscd import OPENSC_PKCS11, READER
    from vmc.lab.vm import check_card_spec

    check_card_spec(ccidemu_card_spec)  # a bad spec: its ConfigError, not a bridge timeout
    harness = _ccidemu_pcscd
    if harness.proc is None or harness.proc.poll() is not None:
        harness.restart_pcscd()
    harness.start_bridge(ccidemu_card_spec)
    try:
        yield PcscReader(harness, ccidemu_card_spec, READER, OPENSC_PKCS11)
    finally:
        harness.stop_bridge()


# --------------------------------------------------------------------------- QEMU guest


@dataclass
class GuestShell:
    """The guest with the test's card in its reader: :meth:`run` shell commands there."""

    vm: LabVm

    def run(self, command: str, timeout: float = 60) -> CommandResult:
        """Run ``command`` (busybox sh, stdout and stderr merged); ``.status``, ``.output``."""
        return self.vm.run(command, timeout)

    def check(self, command: str, timeout: float = 60) -> str:
        """Like :meth:`run`; the output, or the test fails when the status is not 0."""
        result = self.run(command, timeout)
        if result.status != 0:
            pytest.fail(f"{command!r} exited with status {result.status} in the guest:\n"
                        f"{result.output}", pytrace=False)
        return result.output

    @property
    def workdir(self) -> Path:
        """The guest's logs: console.log, qemu.log, pcscd.log, commands.log, serve/."""
        return self.vm.workdir

    def pcscd_log(self) -> str:
        """The guest's pcscd log (``--debug --apdu``)."""
        guest = self.vm.guest
        return guest.pcscd_log() if guest is not None else ""


class _GuestPool:
    """One guest for the session; each test gets its card inserted fresh."""

    def __init__(self) -> None:
        self.vm: LabVm | None = None
        self.workdir: Path | None = None
        self.failed: str | None = None
        self.served = 0

    def get(self, spec: str) -> LabVm:
        from vmc.lab.vm import LabVm, missing_prerequisites

        if self.failed is not None:
            pytest.skip(self.failed)
        if self.vm is None:
            problem = missing_prerequisites()
            if problem is not None:
                self.failed = f"ccidemu_guest: {problem}"
                pytest.skip(self.failed)
            self.workdir = _short_dir("ccidemu-guest-")
            vm = LabVm(spec, self.workdir)
            vm.start()
            self.vm = vm
        else:
            self.vm.insert(spec)
        self.served += 1
        return self.vm

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
        if self.workdir is not None and not os.environ.get("CCIDEMU_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def _ccidemu_guest_pool() -> Iterator[_GuestPool]:
    pool = _GuestPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def ccidemu_guest_image() -> GuestImage:
    """The tiny guest's kernel and initramfs (``.kernel``, ``.initrd``), built from this
    host's Debian packages on first use and cached (``$CCIDEMU_CACHE/guest`` or
    ``~/.cache/ccidemu/guest``); skips when the host cannot build it."""
    from vmc.lab.guest import build_guest
    from vmc.lab.vm import missing_prerequisites

    problem = missing_prerequisites()
    if problem is not None:
        pytest.skip(f"ccidemu_guest_image: {problem}")
    return build_guest()


@pytest.fixture
def ccidemu_guest(_ccidemu_guest_pool: _GuestPool, ccidemu_card_spec: str) -> GuestShell:
    """The QEMU guest with a fresh card in its reader, seen by the guest's pcscd."""
    return GuestShell(_ccidemu_guest_pool.get(ccidemu_card_spec))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test of the guest or PC/SC fixtures shows their logs' tails."""
    report = yield
    if report.failed:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        shell = funcargs.get("ccidemu_guest")
        if isinstance(shell, GuestShell) and shell.vm.guest is not None:
            report.sections.append(("ccidemu guest", shell.vm.guest.diagnostics()))
            if shell.vm.serve is not None:
                report.sections.append(("ccidemu serve (guest)", shell.vm.serve.log_tail(40)))
        reader = funcargs.get("ccidemu_pcsc")
        if isinstance(reader, PcscReader):
            report.sections.append(("ccidemu pcscd and bridge", reader.harness.diagnostics()))
    return report
