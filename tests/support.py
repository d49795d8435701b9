"""Helpers shared by the test suites that drive real peers (tests/e2e, tests/pcscd)."""

from __future__ import annotations

import os
import re

from ccidemu.card import BuiltinTestCard

#: The built-in test card's ATR as ``opensc-tool -a`` prints it.
TEST_ATR_TEXT = ":".join(f"{b:02x}" for b in BuiltinTestCard.ATR)


def in_ci() -> bool:
    """Running in CI (``CI=true``, also 1 or yes): a missing peer fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


_RECEIVED_RE = re.compile(r"^Received \(SW1=0x([0-9a-fA-F]{2}), SW2=0x([0-9a-fA-F]{2})\)")
_HEX_PAIR_RE = re.compile(r"^[0-9A-Fa-f]{2}$")


def opensc_responses(output: str) -> list[bytes]:
    """The response APDUs (data + SW1 SW2) in the output of ``opensc-tool -s ... -s ...``.

    opensc-tool prints ``Received (SW1=0x90, SW2=0x00):`` and then a hex dump of the data,
    16 bytes a line followed by an ASCII column.  Keep the data short and make its first
    ASCII character non-hex (a byte below 0x20, shown as '.') so the columns cannot mix.
    """
    responses: list[bytes] = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = _RECEIVED_RE.match(line)
        if not m:
            continue
        data = bytearray()
        for row in lines[i + 1:]:
            if row.startswith(("Sending:", "Received")) or not row.strip():
                break
            for token in row.split():
                if not _HEX_PAIR_RE.match(token):
                    break
                data.append(int(token, 16))
        responses.append(bytes(data) + bytes.fromhex(m.group(1) + m.group(2)))
    return responses
