"""QEMU's side of the VSCard channel, driving a ``ccidemu serve``: the whole card path of a
VM (ccid-card-passthru and the usb-ccid slot, :class:`vmc.fakeqemu.FakeQemu`) without a VM.

:func:`open_channel` starts a fake QEMU listening on a unix socket the way QEMU's
``-chardev socket,server=on`` does, a ``ccidemu serve --connect`` to it (in this process,
:class:`~vmc.lab.inprocess.ServeThread`, or as a subprocess,
:class:`~vmc.lab.serve.ServeProcess`), waits for the card and powers it on::

    with open_channel(["piv:"], workdir) as channel:
        piv = PivClient(channel.session())
        piv.select()

Every APDU then crosses the VSCard protocol and the daemon's runtime exactly as a guest's
would (docs/PROTOCOL.md, "VSCard").

For a real VM (your own image): :func:`open_qemu_card` starts ``ccidemu serve --listen`` on a
unix socket and gives the QEMU options (:func:`qemu_card_args`) that connect a usb-ccid
reader to it; QEMU reconnects when the daemon restarts.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Sequence
from pathlib import Path

from ccidemu.client import CardSession
from ccidemu.piv_client import PivClient
from vmc.addr import UnixAddress
from vmc.fakeqemu import FakeQemu, FakeQemuListener
from vmc.lab.errors import LabError
from vmc.lab.guest import ChardevMode
from vmc.lab.inprocess import ServeThread
from vmc.lab.serve import DaemonError, ServeProcess

__all__ = ["QemuCard", "ServeMode", "VscardChannel", "open_channel", "open_qemu_card",
           "qemu_card_args"]

#: Generous: a loaded CI machine, RSA key generation in the card.
TIMEOUT = 30.0


class ServeMode(enum.Enum):
    """Where ``ccidemu serve`` runs."""

    IN_PROCESS = "inprocess"
    SUBPROCESS = "subprocess"


class VscardChannel:
    """A fake QEMU connected to a running ``ccidemu serve``; reader 0 holds a powered card.

    ``qemu`` is the :class:`~vmc.fakeqemu.FakeQemu` (CCID level: ``power_on``,
    ``transmit``, ``notifications``...), ``serve`` the daemon (``request``/``insert``/
    ``remove`` in process; ``ctl_json`` as a subprocess), ``atr`` the card's ATR.
    """

    def __init__(self, qemu: FakeQemu, serve: ServeThread | ServeProcess, atr: bytes) -> None:
        self.qemu = qemu
        self.serve = serve
        self.atr = atr

    def transmit(self, apdu: bytes) -> bytes:
        """One APDU through the channel as is (no chaining, no GET RESPONSE)."""
        return self.qemu.transmit(apdu, timeout=TIMEOUT)

    def session(self) -> CardSession:
        """A :class:`~ccidemu.client.CardSession` over the channel (chaining, GET RESPONSE)."""
        return CardSession(self.transmit, atr=self.atr)

    def piv(self) -> PivClient:
        """A :class:`~ccidemu.piv_client.PivClient` over the channel, PIV selected."""
        client = PivClient(self.session())
        client.select()
        return client

    def reinsert(self, card: str | None = None) -> bytes:
        """Take the card out and put it (or a new ``card`` spec) back; power it on; the ATR.

        A new spec gets a new card object: fresh state.
        """
        if isinstance(self.serve, ServeThread):
            self.serve.remove()
            self.qemu.wait_removed(timeout=TIMEOUT)
            self.serve.insert(card)
        else:
            self.serve.ctl_ok("remove", "vm1")
            self.qemu.wait_removed(timeout=TIMEOUT)
            self.serve.ctl_ok("insert", "vm1", *(["--card", card] if card else []))
        self.qemu.wait_card(timeout=TIMEOUT)
        self.atr = self.qemu.power_on(timeout=TIMEOUT)
        return self.atr


@contextlib.contextmanager
def open_channel(cards: Sequence[str], workdir: Path, *,
                 mode: ServeMode = ServeMode.IN_PROCESS, state_dir: Path | None = None,
                 trace: Path | None = None, extra_args: Sequence[str] = ()
                 ) -> Iterator[VscardChannel]:
    """A fake QEMU and a ``ccidemu serve`` with ``cards`` (reader 0 is the first card's,
    powered on); everything stopped afterwards.

    ``workdir`` holds the chardev socket (keep its path short: unix socket paths have 107
    bytes at most) and, for a subprocess, its control socket and ``serve.log``.
    ``extra_args``: more ``ccidemu serve`` options (subprocess only).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "vsc.sock"
    if len(str(path)) > 100:
        raise LabError(f"{path}: too long for a unix socket; use a shorter directory")
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(FakeQemuListener(UnixAddress(path)))
        serve: ServeThread | ServeProcess
        if mode is ServeMode.IN_PROCESS:
            if extra_args:
                raise LabError("extra_args are options of a ccidemu serve subprocess")
            serve = ServeThread(cards=cards, connect=[UnixAddress(path)], state_dir=state_dir,
                                trace=trace)
            serve.start()
            stack.callback(serve.stop)
        else:
            args = [*(["--state-dir", str(state_dir)] if state_dir else []), *extra_args]
            process = ServeProcess(workdir, path, ChardevMode.QEMU_SERVER, cards=cards,
                                   trace=trace, extra_args=args, verbose=2)
            try:
                process.start(timeout=TIMEOUT)
            except DaemonError as exc:
                raise LabError(str(exc)) from None
            stack.callback(process.stop)
            serve = process
        try:
            qemu = stack.enter_context(listener.accept(timeout=TIMEOUT))
            qemu.wait_card(timeout=TIMEOUT)
            atr = qemu.power_on(timeout=TIMEOUT)
        except (TimeoutError, OSError) as exc:
            log = serve.log_tail() if isinstance(serve, ServeProcess) else ""
            raise LabError(f"ccidemu serve did not bring its card to the fake QEMU: {exc}"
                           + (f"\n{log}" if log else "")) from None
        yield VscardChannel(qemu, serve, atr)


def qemu_card_args(socket: Path, name: str = "ccidemu") -> list[str]:
    """QEMU options for a usb-ccid reader whose card is served on the unix ``socket``
    (QEMU connects, ``reconnect=1``): an xHCI controller, the reader, the chardev and
    ccid-card-passthru.  ``name`` prefixes the ids (several readers: several names)."""
    return [
        "-device", f"qemu-xhci,id={name}-xhci",
        "-device", f"usb-ccid,id={name}-ccid,bus={name}-xhci.0",
        "-chardev", f"socket,id={name},path={socket},reconnect=1",
        "-device", f"ccid-card-passthru,chardev={name}",
    ]


class QemuCard:
    """A ``ccidemu serve`` (in this process) listening for a VM's ccid-card-passthru.

    Start the VM with :attr:`qemu_args`; :meth:`connected` says when its QEMU is connected
    and the card inserted in its reader; ``serve`` takes control requests (``insert``,
    ``remove``, ``request({"cmd": "stats"})``); :attr:`atr` is the card's ATR.
    """

    def __init__(self, serve: ServeThread, socket: Path, atr: bytes) -> None:
        self.serve = serve
        self.socket = socket
        self.atr = atr
        self.qemu_args = qemu_card_args(socket)

    def status(self) -> dict[str, object]:
        """The VM as ``ccidemu ctl list`` shows it."""
        found: list[dict[str, object]] = self.serve.request({"cmd": "list"})
        return found[0]

    def connected(self) -> bool:
        """QEMU is connected and the card is inserted in its reader."""
        status = self.status()
        readers = status.get("readers")
        return bool(status.get("connected")) and isinstance(readers, list) and bool(
            readers and readers[0].get("inserted"))


@contextlib.contextmanager
def open_qemu_card(cards: Sequence[str], workdir: Path, *, state_dir: Path | None = None,
                   trace: Path | None = None) -> Iterator[QemuCard]:
    """A ``ccidemu serve --listen unix:WORKDIR/card.sock`` with ``cards`` (see
    :class:`QemuCard`); stopped afterwards."""
    from ccidemu.cards import CardOptions, open_card

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "card.sock"
    if len(str(path)) > 100:
        raise LabError(f"{path}: too long for a unix socket; use a shorter directory")
    atr = open_card(cards[0], CardOptions()).power_on()
    with ServeThread(cards=cards, listen=[UnixAddress(path)], state_dir=state_dir,
                     trace=trace) as serve:
        yield QemuCard(serve, path, atr)
