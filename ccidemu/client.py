"""The host side of a card: send command APDUs the way a reader driver and middleware do.

:class:`CardSession` talks to any card: a :class:`ccidemu.card.Card` object in this process,
or any ``transmit(apdu_bytes) -> response_bytes`` function (a :class:`vmc.fakeqemu.FakeQemu`'s
``transmit`` drives the card behind ``ccidemu serve`` over the VSCard channel; a pyscard
connection's can be wrapped the same way).  It does what ISO/IEC 7816-4:2013 leaves to the
host:

1. command chaining (section 5.1.1.1): data longer than ``max_nc`` goes out as a chain of
   commands with CLA bit b5 set on every link but the last; a link answered with anything
   but 9000 ends the chain and is the answer;
2. response chaining (section 5.3): ``61xx`` is followed by GET RESPONSE (``CLA C0 00 00 xx``)
   until the card has sent everything, the parts joined;
3. ``6Cxx`` ("wrong Le, exact length xx") re-sends the same command with Le = xx.

:meth:`CardSession.transmit` returns the final :class:`~ccidemu.apdu.ResponseApdu` whatever
its status word; :meth:`CardSession.send` returns the data of a 9000 answer and raises
:class:`ApduError` for any other.  Pure: no I/O besides the card's transmit function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ccidemu.apdu import (
    CLA_CHAINING,
    MAX_SHORT_NC,
    MAX_SHORT_NE,
    CommandApdu,
    get_response_command,
    parse_command,
    parse_response,
    reissue_with_le,
    split_chain,
)
from ccidemu.card import Card
from ccidemu.errors import CardError, CcidemuError, DecodeError
from ccidemu.sw import SW, sw_meaning

__all__ = ["ApduError", "CardSession", "Exchange", "Transmit"]

#: A card's transmit function: command APDU bytes in, response APDU bytes (data + SW) out.
Transmit = Callable[[bytes], bytes]

#: At most this many GET RESPONSE / 6Cxx rounds for one command (a card that keeps
#: announcing more data would otherwise keep the host busy for ever).
MAX_ROUNDS = 1024


class ApduError(CcidemuError):
    """The card answered a command with a status word other than 9000 (``sw``)."""

    def __init__(self, sw: int, command: CommandApdu | None = None, message: str = "") -> None:
        what = "" if command is None else (
            f"{command.cla:02X} {command.ins:02X} {command.p1:02X} {command.p2:02X}: ")
        super().__init__(message or f"{what}status word {sw:04X} ({sw_meaning(sw)})")
        self.sw = sw
        self.command = command

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF


@dataclass(frozen=True, slots=True)
class Exchange:
    """One command APDU on the wire and its answer, as the card saw them."""

    command: bytes
    response: bytes


class CardSession:
    """A host's session with one card: chaining, GET RESPONSE and 6Cxx handled.

    ``card`` is a :class:`~ccidemu.card.Card` (powered on here, its ATR in :attr:`atr`) or a
    transmit function (:attr:`atr` is then ``atr``, if given).  ``max_nc``: the most data
    bytes one command carries before chaining starts (255, the short form's limit);
    ``extended=True`` sends long data as one extended-length command instead.  Every wire
    exchange is kept in :attr:`exchanges` (``keep=0`` keeps none).
    """

    def __init__(self, card: Card | Transmit, *, max_nc: int = MAX_SHORT_NC,
                 extended: bool = False, atr: bytes | None = None, keep: int = 10_000) -> None:
        if isinstance(card, Card):
            self.card: Card | None = card
            self._transmit: Transmit = card.transmit
            self.atr = card.power_on() if atr is None else atr
        else:
            self.card = None
            self._transmit = card
            self.atr = atr if atr is not None else b""
        self.max_nc = max_nc
        self.extended = extended
        self.exchanges: list[Exchange] = []
        self._keep = keep

    def reset(self) -> bytes:
        """Power the card off and on again (a card object only); the new ATR."""
        if self.card is None:
            raise CardError("a transmit function cannot be reset; reconnect instead")
        self.card.power_off()
        self.atr = self.card.power_on()
        return self.atr

    def _wire(self, command: CommandApdu) -> tuple[bytes, int]:
        raw = command.encode()
        answer = bytes(self._transmit(raw))
        if self._keep:
            if len(self.exchanges) >= self._keep:
                del self.exchanges[: self._keep // 2]
            self.exchanges.append(Exchange(raw, answer))
        try:
            response = parse_response(answer)
        except DecodeError as exc:
            raise CardError(f"the card's answer {answer.hex()} is not a response APDU: "
                            f"{exc}") from None
        return response.data, response.sw

    def transmit(self, command: CommandApdu | bytes) -> tuple[bytes, int]:
        """Send one logical command; its whole answer: (data, status word), any status.

        ``command`` may be APDU bytes (parsed, so that chaining applies to them too).
        """
        if isinstance(command, bytes | bytearray | memoryview):
            command = parse_command(bytes(command))
        if len(command.data) > self.max_nc and self.extended:
            links = [CommandApdu(command.cla, command.ins, command.p1, command.p2,
                                 command.data, command.ne, True)]
        else:
            links = split_chain(command, self.max_nc)
        for link in links[:-1]:
            data, sw = self._wire(link)
            if sw != SW.OK:
                return data, sw
        current = links[-1]
        data, sw = self._wire(current)
        parts = [data]
        cla = command.cla & ~CLA_CHAINING
        for _ in range(MAX_ROUNDS):
            if sw >> 8 == 0x61:  # more data: fetch it
                current = get_response_command(sw & 0xFF, cla)
            elif sw >> 8 == 0x6C:  # wrong Le: the same command again with Le = SW2
                parts.pop()
                current = reissue_with_le(current, sw & 0xFF)
            else:
                return b"".join(parts), sw
            data, sw = self._wire(current)
            parts.append(data)
        raise CardError(f"the card still announces more data after {MAX_ROUNDS} rounds")

    def send(self, cla: int, ins: int, p1: int = 0, p2: int = 0, data: bytes = b"",
             ne: int = MAX_SHORT_NE) -> bytes:
        """One command; the data of its 9000 answer, else :class:`ApduError`.

        ``ne`` defaults to 256 (Le 00: "whatever you have"); 0 sends no Le field.
        """
        command = CommandApdu(cla, ins, p1, p2, bytes(data), ne)
        answer, sw = self.transmit(command)
        if sw != SW.OK:
            raise ApduError(sw, command)
        return answer
