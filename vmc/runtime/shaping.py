"""Keep every answer within what QEMU's usb-ccid can carry to the guest (docs/PROTOCOL.md,
"usb-ccid": "Answers QEMU 7.2 loses").

QEMU 7.2's usb-ccid sends an answer to the guest as one CCID DataBlock: a 10-byte header, the
response data and SW1 SW2.  Two sizes go wrong:

* a DataBlock of exactly 64 bytes (a 54-byte response: 52 data bytes + SW1 SW2) fills one
  USB packet and is never ended by a short or zero-length packet: the guest's next APDU then
  fails ("Not enough data received"), and the answers belong to the previous command until
  pcscd drops the card;
* a DataBlock beyond the 384-byte bulk-in buffer (a response over 374 bytes) becomes a
  hardware error.

The :class:`ResponseShaper` of a reader answers such a response in parts, the way ISO/IEC
7816-4 section 5.3.4 lets a card do: the first part of the data with ``61 xx`` (xx more bytes
to fetch), the rest kept for the GET RESPONSE the guest sends next (OpenSC, yubico-piv-tool
and the Windows smart card stack do), every part itself of a size the device carries.  The
card never sees those GET RESPONSEs.  Where it is not safe it does nothing:

* a response whose status is neither 9000 nor 61xx (a warning or an error with data, such as
  62xx or 63xx): turning it into 61xx would hide the status until the end of the chain; it is
  passed on as it is (and the 54-byte fault may still bite);
* a command that is not answered by our GET RESPONSE (the guest moves on): the rest is
  dropped, as a card drops pending data, and the command goes to the card.

A card's own chaining (its answer ends in 61xx) keeps working: our last part ends in the
card's 61xx, and the guest's next GET RESPONSE goes to the card.  A passed-through card is
never disturbed: it had finished its answer before we split it.
"""

from __future__ import annotations

__all__ = ["LOST_SIZE", "MAX_RESPONSE", "ResponseShaper", "is_get_response"]

#: The response size QEMU 7.2's usb-ccid loses (a 64-byte DataBlock).
LOST_SIZE = 64 - 10
#: The largest response usb-ccid's 384-byte bulk-in buffer carries.
MAX_RESPONSE = 384 - 10
_CHUNK = 256  # data bytes per part of a long answer (short APDU Ne)


def is_get_response(command: bytes) -> bool:
    """``xx C0 00 00 [Le]`` (ISO/IEC 7816-4 section 7.6.1)."""
    return len(command) in (4, 5) and command[1] == 0xC0 and command[2:4] == b"\x00\x00"


def _fits(size: int) -> bool:
    return size != LOST_SIZE and size <= MAX_RESPONSE


class ResponseShaper:
    """One reader's response splitting (see the module docstring)."""

    __slots__ = ("_rest", "_sw", "acted", "enabled")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.acted = 0  # responses split (for the once-per-session log line)
        self._rest = b""  # data still to hand out
        self._sw = b""  # the card's final status word

    @property
    def pending(self) -> bool:
        return bool(self._sw)

    def reset(self) -> None:
        self._rest = self._sw = b""

    def intercept(self, command: bytes) -> bytes | None:
        """Our answer to ``command`` when it fetches a part we kept; else None (the command
        goes to the card, and what we kept is dropped)."""
        if not self._sw:
            return None
        if not is_get_response(command):
            self.reset()
            return None
        le = command[4] if len(command) == 5 else 0
        return self._part(le or 256)

    def shape(self, command: bytes, response: bytes) -> bytes:
        """The card answered ``command`` with ``response``: what the guest gets now."""
        if not self.enabled or _fits(len(response)) or len(response) < 2:
            return response
        sw = response[-2:]
        if sw != b"\x90\x00" and sw[0] != 0x61:
            return response  # a status a 61xx would hide: leave it (module docstring)
        self.acted += 1
        self._rest, self._sw = response[:-2], sw
        return self._part(_CHUNK)

    def _part(self, wanted: int) -> bytes:
        rest, sw = self._rest, self._sw
        size = min(wanted, len(rest))
        if size == len(rest) and _fits(size + 2):  # the last part
            self.reset()
            return rest + sw
        size = min(size, _CHUNK)
        if size + 2 == LOST_SIZE:
            size -= 1
        part, self._rest = rest[:size], rest[size:]
        left = len(self._rest)
        return part + bytes((0x61, left if left < 256 else 0))
