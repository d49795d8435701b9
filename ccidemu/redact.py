"""Which APDUs carry secrets, and how they are shown in logs, traces and decodes.

Pure.  One rule set for every place that prints an APDU (``docs/SECURITY.md``, "Secrets"):
the daemon's logs and traces, the vpcd bridge, the fake QEMU side and ``ccidemu decode``.

Commands whose data field is a secret or proves knowledge of one (the data is cut to the
header and the Lc field, ISO/IEC 7816-3:2006 section 12.1.3):

=====  =====================================================  ============================
INS    command                                                source
=====  =====================================================  ============================
20     VERIFY (PIN; CAC VERIFY too)                           ISO/IEC 7816-4 11.5.6
24     CHANGE REFERENCE DATA (old and new PIN/PUK)            ISO/IEC 7816-4 11.5.7
2C     RESET RETRY COUNTER (PUK and new PIN)                  ISO/IEC 7816-4 11.5.10
FE     IMPORT ASYMMETRIC KEY (private key parts)              Yubico PIV extension
FF     SET MANAGEMENT KEY (the new key)                       Yubico PIV extension
86/87  GENERAL AUTHENTICATE, symmetric key (witness etc.)     SP 800-73-4 part 2 3.2.4
DB     PUT DATA of a PIN-protected PIV object (and the rest    SP 800-73-4 part 1 table 3
       of its command chain)
=====  =====================================================  ============================

The PIN-protected PIV objects (read access rule "PIN", SP 800-73-4 part 1 table 3) are the
fingerprints (5FC103), the facial image (5FC108), the printed information (5FC109, where
ykman keeps a PIN-protected management key) and the iris images (5FC121).

GENERAL AUTHENTICATE counts as symmetric when P2 is the card management key (9B) or P1 is a
symmetric algorithm (00 and 03 3DES, 08/0A/0C AES; SP 800-78-4 table 6-2).  Its *response*
(an encrypted witness, a challenge, an encrypted challenge) is a secret too: only SW1 SW2 is
shown, and so for a GET RESPONSE that continues such an answer (ISO/IEC 7816-4 section 5.3).
Secret responses too: GENERAL AUTHENTICATE with an 85 template (ECDH or X25519 key
agreement: the answer is the shared secret, SP 800-73-4 part 2 appendix A.5) and GET DATA
of a PIN-protected object.

Only what the user asks for with an explicit option (``--trace-secrets``, ``--show-secrets``,
``--log-secrets``) shows these bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccidemu.apdu import parse_command
from ccidemu.errors import DecodeError
from ccidemu.tlv import ber_decode, ber_decode_one

__all__ = [
    "PIN_PROTECTED_OBJECTS",
    "SECRET_INS",
    "SYMMETRIC_ALGORITHMS",
    "Redactor",
    "Shown",
    "is_secret_command",
    "redact_command",
    "redact_response",
    "secret_response",
]

#: Instructions whose command data field is always a secret (table in the module docstring).
SECRET_INS = frozenset({0x20, 0x24, 0x2C, 0xFE, 0xFF})
_GENERAL_AUTHENTICATE = frozenset({0x86, 0x87})
_GET_RESPONSE = 0xC0
_GET_DATA = 0xCB
_PUT_DATA = 0xDB
_CHAINING = 0x10  # CLA b5: not the last command of a chain (ISO/IEC 7816-4 5.1.1.1)
_MANAGEMENT_KEY = 0x9B
#: The PIN-protected PIV data objects (SP 800-73-4 part 1 table 3).
PIN_PROTECTED_OBJECTS = frozenset({0x5FC103, 0x5FC108, 0x5FC109, 0x5FC121})
_PROTECTED_TAG_LISTS = frozenset(b"\x5c\x03" + tag.to_bytes(3, "big")
                                 for tag in PIN_PROTECTED_OBJECTS)
#: SP 800-78-4 table 6-2: 3DES (00 default, 03), AES-128/192/256 (08, 0A, 0C).
SYMMETRIC_ALGORITHMS = frozenset({0x00, 0x01, 0x03, 0x08, 0x0A, 0x0C})


def _symmetric_auth(command: bytes | bytearray | memoryview) -> bool:
    return command[1] in _GENERAL_AUTHENTICATE and (
        command[3] == _MANAGEMENT_KEY or command[2] in SYMMETRIC_ALGORITHMS
    )


def _data_field(command: bytes | bytearray | memoryview) -> bytes:
    """The command's data field (short or extended Lc); empty when it does not parse."""
    try:
        return parse_command(bytes(command)).data
    except DecodeError:
        return b""


def _names_protected_object(command: bytes | bytearray | memoryview) -> bool:
    """GET DATA or PUT DATA whose tag list (5C 03 tag) names a PIN-protected object."""
    return _data_field(command)[:5] in _PROTECTED_TAG_LISTS


def _key_agreement(command: bytes | bytearray | memoryview) -> bool:
    """GENERAL AUTHENTICATE with an 85 (exponentiation) item in its 7C template."""
    data = _data_field(command)
    if b"\x85" not in data:  # the common signing template never has one
        return False
    try:
        outer, _ = ber_decode_one(data)
        return outer.tag == 0x7C and any(item.tag == 0x85 for item in ber_decode(outer.value))
    except DecodeError:
        return False


def is_secret_command(command: bytes | bytearray | memoryview) -> bool:
    """True when the data field of ``command`` is a secret (see the module docstring)."""
    if len(command) < 4 or command[0] == 0xFF:  # CLA FF: PPS / reader pseudo-APDUs
        return False
    ins = command[1]
    if ins == _PUT_DATA:
        return _names_protected_object(command)
    return ins in SECRET_INS or _symmetric_auth(command)


def secret_response(command: bytes | bytearray | memoryview) -> bool:
    """True when the answer to ``command`` is a secret: symmetric GENERAL AUTHENTICATE, key
    agreement, GET DATA of a PIN-protected object."""
    if len(command) < 4 or command[0] == 0xFF:
        return False
    ins = command[1]
    if ins == _GET_DATA:
        return _names_protected_object(command)
    if ins in _GENERAL_AUTHENTICATE:
        return _symmetric_auth(command) or _key_agreement(command)
    return False


def redact_command(command: bytes) -> tuple[bytes, bool]:
    """``(command, redacted)``: a secret command cut to header + Lc, anything else unchanged.

    Short Lc is one byte after the header; an extended Lc is ``00`` plus two bytes
    (ISO/IEC 7816-3:2006 section 12.1.3).  A command without a data field (a VERIFY asking
    for the retry counter) is kept whole.
    """
    if len(command) <= 5 or not is_secret_command(command):
        return command, False
    if command[4] == 0 and len(command) >= 7:  # 00 Lc1 Lc2 data..., or case 2E: 00 Le1 Le2
        return command[:7], len(command) > 7
    return command[:5], True


def redact_response(response: bytes) -> tuple[bytes, bool]:
    """``(SW1 SW2, redacted)`` of a secret response (data removed)."""
    if len(response) <= 2:
        return response, False
    return response[-2:], True


@dataclass(frozen=True, slots=True)
class Shown:
    """An exchange as it may be shown: the bytes to print and whether anything was cut."""

    command: bytes
    response: bytes
    redacted: bool


class Redactor:
    """Redaction for one reader's stream of exchanges (it remembers a secret answer that
    continues with GET RESPONSE).  ``secrets=True`` shows everything."""

    __slots__ = ("_chain", "_continues", "_pending", "secrets")

    def __init__(self, secrets: bool = False) -> None:
        self.secrets = secrets
        self._continues = False  # the last answer was secret and ended in 61xx
        self._chain = False  # a secret command chain (PUT DATA of a protected object) goes on
        self._pending = b""  # the command given to command(), for response()

    def exchange(self, command: bytes, response: bytes) -> Shown:
        """What to show of one exchange, in order."""
        if self.secrets:
            return Shown(command, response, False)
        shown_command, cut_command = self._redact_link(command)
        secret = secret_response(command) or (
            self._continues and len(command) >= 2 and command[1] == _GET_RESPONSE
        )
        self._continues = secret and len(response) >= 2 and response[-2] == 0x61
        if secret:
            shown_response, cut_response = redact_response(response)
        else:
            shown_response, cut_response = response, False
        return Shown(shown_command, shown_response, cut_command or cut_response)

    def command(self, command: bytes) -> tuple[bytes, bool]:
        """What to show of a command seen on its own; :meth:`response` shows its answer."""
        self._pending = command
        if self.secrets:
            return command, False
        return self._redact_link(command, peek=True)

    def response(self, response: bytes) -> tuple[bytes, bool]:
        """What to show of the answer to the last :meth:`command`."""
        command, self._pending = self._pending, b""
        shown = self.exchange(command, response)
        return shown.response, len(shown.response) != len(response)

    def _redact_link(self, command: bytes, *, peek: bool = False) -> tuple[bytes, bool]:
        """redact_command, and the later links of a secret PUT DATA chain (they carry no
        tag list of their own).  ``peek``: command() only looks; exchange() records."""
        in_chain = (self._chain and len(command) >= 4 and command[1] == _PUT_DATA
                    and command[0] != 0xFF)
        secret = in_chain or (len(command) > 4 and is_secret_command(command))
        if not peek:
            self._chain = secret and len(command) >= 4 and bool(command[0] & _CHAINING) and (
                command[1] == _PUT_DATA)
        if in_chain and len(command) > 5:
            if command[4] == 0 and len(command) >= 7:
                return command[:7], len(command) > 7
            return command[:5], True
        return redact_command(command)

    def reset(self) -> None:
        self._continues = False
        self._chain = False
        self._pending = b""
