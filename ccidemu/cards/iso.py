"""The ISO/IEC 7816-4 applet dispatcher shared by emulated cards (PIV, CAC).

Theory of operation: a card feeds every command APDU's bytes to
:meth:`IsoDispatcher.process` and returns what it gives back.  The dispatcher

1. parses the command (ISO/IEC 7816-3:2006 section 12.1.3); a malformed one gets 6700;
2. checks the class byte (ISO/IEC 7816-4:2013 section 5.4.1): an unknown class gets
   6E00, secure messaging 6882, a logical channel other than 0 6881;
3. answers GET RESPONSE (``xx C0 00 00 Le``, section 5.3 / 7.6.1) from the pending
   response (nothing pending: 6985); any other command drops what was pending;
4. looks the instruction up (unknown: 6D00) and joins command chains (CLA bit b5,
   section 5.1.1.1): each non-last link is answered 9000, a link that does not continue
   the chain gets 6883, a chain sent to an instruction that does not take chains 6884;
5. calls the handler with the (joined) :class:`~ccidemu.apdu.CommandApdu`; the handler
   returns the response data or raises :class:`~ccidemu.errors.StatusWordError`;
6. sends at most Ne bytes (Ne absent = 256, or 65536 for an extended command); the rest
   stays pending and the answer ends in ``61xx`` (xx = bytes left, 00 = 256 or more).

Any other exception a handler raises is logged and answered 6F00: nothing escapes.

Steps 3 and 6 follow :class:`ResponseRules`.  The default is ISO/IEC 7816-4 as above; a card
that must answer like libcacard's CAC emulation (``docs/DESIGN.md``, "CAC") takes
:data:`T0_RULES`: no Le field means Ne = 0, an answer longer than Ne is held back whole
(only ``61xx`` is sent, the T=0 way: ISO/IEC 7816-3:2006 section 12.2.3), and GET
RESPONSE with nothing pending is 6A88, whatever its P1 P2 and data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from ccidemu.apdu import (
    CLA_CHAINING,
    MAX_EXTENDED_NC,
    MAX_EXTENDED_NE,
    MAX_SHORT_NE,
    ChainAssembler,
    ChainError,
    CommandApdu,
    InsName,
    parse_command,
)
from ccidemu.errors import DecodeError, StatusWordError
from ccidemu.redact import redact_command
from ccidemu.sw import SW, sw_bytes

log = logging.getLogger(__name__)

#: A command handler: the parsed (and de-chained) command in, the response data out.
Handler = Callable[[CommandApdu], bytes]

#: A plain int: compared with every command's INS (an enum member lookup costs more).
INS_GET_RESPONSE = int(InsName.GET_RESPONSE)

_OK = b"\x90\x00"


@dataclass(frozen=True, slots=True)
class ResponseRules:
    """How answers are sized (step 6) and GET RESPONSE is answered (step 3)."""

    #: Ne of a command without Le field; None: 256, or 65536 for an extended command.
    absent_ne: int | None = None
    #: An answer longer than Ne sends its first Ne bytes with 61xx; False: none of them.
    partial: bool = True
    #: GET RESPONSE with nothing pending.
    nothing_pending_sw: int = SW.CONDITIONS_NOT_SATISFIED
    #: GET RESPONSE must have P1 P2 = 00 00 and no data field (else 6A86 / 6700).
    strict_get_response: bool = True


#: ISO/IEC 7816-4:2013 sections 5.1 and 5.3.
ISO_RULES = ResponseRules()
#: T=0 style, as libcacard 2.8 answers (vcard_response_new, card_7816.c GET RESPONSE).
T0_RULES = ResponseRules(absent_ne=0, partial=False, nothing_pending_sw=SW.REFERENCE_NOT_FOUND,
                         strict_get_response=False)


class IsoDispatcher:
    """Routes command APDUs to per-instruction handlers; see the module docstring.

    ``handlers`` maps INS to a handler; ``chaining`` lists the instructions that accept
    command chains; ``classes`` the accepted CLA values with b5 (chaining) cleared;
    ``rules`` how answers are sized and GET RESPONSE answered.
    """

    def __init__(
        self,
        handlers: Mapping[int, Handler],
        *,
        chaining: Collection[int] = (),
        classes: Collection[int] = (0x00,),
        max_chain: int = MAX_EXTENDED_NC,  # the largest extended Nc
        rules: ResponseRules = ISO_RULES,
    ) -> None:
        self._handlers = dict(handlers)
        self._chaining = frozenset(chaining)
        self._classes = frozenset(classes)
        # every CLA accepted as is: the classes with and without the chaining bit
        self._accepted = frozenset(c | b for c in self._classes for b in (0, CLA_CHAINING)
                                   if c | b != 0xFF)
        self._chain = ChainAssembler(max_length=max_chain)
        self._pending = b""
        self.rules = rules
        absent = rules.absent_ne
        self._absent_short = MAX_SHORT_NE if absent is None else absent
        self._absent_extended = MAX_EXTENDED_NE if absent is None else absent
        self._partial = rules.partial

    def reset(self) -> None:
        """Forget pending command chains and responses (card reset)."""
        self._chain.reset()
        self._pending = b""

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU; always returns data + SW1 SW2, never raises."""
        # one function for the whole path (steps 1-6): this runs for every APDU
        try:
            try:
                cmd = parse_command(apdu)
            except DecodeError as exc:
                shown, _ = redact_command(bytes(apdu))
                log.debug("malformed command APDU %s: %s", shown.hex(), exc)
                self._pending = b""
                return sw_bytes(SW.WRONG_LENGTH)
            cla, ins = cmd.cla, cmd.ins
            if cla not in self._accepted:
                self._pending = b""
                return sw_bytes(self._class_error(cla))
            chain_pending = self._chain.pending
            if ins == INS_GET_RESPONSE and not chain_pending:
                return self._get_response(cmd)
            self._pending = b""
            handler = self._handlers.get(ins)
            if handler is None:
                self._chain.reset()
                return sw_bytes(SW.INS_NOT_SUPPORTED)
            if cla & CLA_CHAINING or chain_pending:
                if ins not in self._chaining:
                    self._chain.reset()
                    return sw_bytes(SW.COMMAND_CHAINING_NOT_SUPPORTED)
                try:
                    joined = self._chain.feed(cmd)
                except ChainError as exc:
                    return sw_bytes(exc.sw)
                if joined is None:
                    return _OK
                cmd = joined
            data = handler(cmd)
            limit = cmd.ne or (self._absent_extended if cmd.extended else self._absent_short)
            if len(data) <= limit:  # step 6, the common case inline
                return data + _OK
            return self._send(data, limit if self._partial else 0)
        except StatusWordError as exc:
            self._pending = b""
            return sw_bytes(exc.sw)
        except Exception:
            log.exception("card handler failed on %s", bytes(apdu[:4]).hex())
            self._pending = b""
            self._chain.reset()
            return sw_bytes(SW.NO_PRECISE_DIAGNOSIS)

    def _class_error(self, cla: int) -> int:
        if cla & 0xE0 == 0:  # first interindustry class (ISO/IEC 7816-4 table 2)
            if cla & 0x0C:
                return SW.SECURE_MESSAGING_NOT_SUPPORTED
            if cla & 0x03:
                return SW.LOGICAL_CHANNEL_NOT_SUPPORTED
        return SW.CLA_NOT_SUPPORTED

    def _send(self, data: bytes, limit: int) -> bytes:
        if len(data) <= limit:
            self._pending = b""
            return data + _OK
        self._pending = data[limit:]
        left = min(len(self._pending), 256) & 0xFF
        return data[:limit] + bytes((0x61, left))

    def _get_response(self, cmd: CommandApdu) -> bytes:
        """GET RESPONSE (ISO/IEC 7816-4:2013 section 7.6.1): P1 P2 = 00 00."""
        if not self._pending:
            return sw_bytes(self.rules.nothing_pending_sw)
        if self.rules.strict_get_response and (cmd.p1 or cmd.p2 or cmd.data):
            self._pending = b""
            return sw_bytes(SW.INCORRECT_P1P2 if cmd.p1 or cmd.p2 else SW.WRONG_LENGTH)
        limit = cmd.ne or (self._absent_extended if cmd.extended else self._absent_short)
        return self._send(self._pending, limit)
