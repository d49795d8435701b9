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
=====  =====================================================  ============================

GENERAL AUTHENTICATE counts as symmetric when P2 is the card management key (9B) or P1 is a
symmetric algorithm (00 and 03 3DES, 08/0A/0C AES; SP 800-78-4 table 6-2).  Its *response*
(an encrypted witness, a challenge, an encrypted challenge) is a secret too: only SW1 SW2 is
shown, and so for a GET RESPONSE that continues such an answer (ISO/IEC 7816-4 section 5.3).

Only what the user asks for with an explicit option (``--trace-secrets``, ``--show-secrets``,
``--log-secrets``) shows these bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
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
_MANAGEMENT_KEY = 0x9B
#: SP 800-78-4 table 6-2: 3DES (00 default, 03), AES-128/192/256 (08, 0A, 0C).
SYMMETRIC_ALGORITHMS = frozenset({0x00, 0x01, 0x03, 0x08, 0x0A, 0x0C})


def _symmetric_auth(command: bytes | bytearray | memoryview) -> bool:
    return command[1] in _GENERAL_AUTHENTICATE and (
        command[3] == _MANAGEMENT_KEY or command[2] in SYMMETRIC_ALGORITHMS
    )


def is_secret_command(command: bytes | bytearray | memoryview) -> bool:
    """True when the data field of ``command`` is a secret (see the module docstring)."""
    if len(command) < 4 or command[0] == 0xFF:  # CLA FF: PPS / reader pseudo-APDUs
        return False
    return command[1] in SECRET_INS or _symmetric_auth(command)


def secret_response(command: bytes | bytearray | memoryview) -> bool:
    """True when the answer to ``command`` is a secret (symmetric GENERAL AUTHENTICATE)."""
    return len(command) >= 4 and command[0] != 0xFF and _symmetric_auth(command)


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

    __slots__ = ("_continues", "_pending", "secrets")

    def __init__(self, secrets: bool = False) -> None:
        self.secrets = secrets
        self._continues = False  # the last answer was secret and ended in 61xx
        self._pending = b""  # the command given to command(), for response()

    def exchange(self, command: bytes, response: bytes) -> Shown:
        """What to show of one exchange, in order."""
        if self.secrets:
            return Shown(command, response, False)
        shown_command, cut_command = redact_command(command)
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
        return redact_command(command)

    def response(self, response: bytes) -> tuple[bytes, bool]:
        """What to show of the answer to the last :meth:`command`."""
        command, self._pending = self._pending, b""
        shown = self.exchange(command, response)
        return shown.response, len(shown.response) != len(response)

    def reset(self) -> None:
        self._continues = False
        self._pending = b""
