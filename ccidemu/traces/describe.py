"""One log line per APDU exchange, and the TRAFFIC log level.  Pure."""

from __future__ import annotations

from ccidemu.apdu import ins_label
from ccidemu.redact import Redactor, Shown
from ccidemu.sw import sw_meaning

__all__ = ["TRAFFIC", "describe_exchange"]

#: Log level below DEBUG for raw frame dumps (``-vvv``; ``vmc.cli`` names it TRAFFIC).
TRAFFIC = 5


def describe_exchange(
    command: bytes,
    response: bytes,
    *,
    secrets: bool = False,
    redactor: Redactor | None = None,
    shown: Shown | None = None,
) -> str:
    """One log line for an APDU exchange: INS name, command and answer (redacted), SW meaning.

    ``shown``: the exchange as a :class:`~ccidemu.redact.Redactor` already redacted it.
    """
    if shown is None:
        shown = (redactor or Redactor(secrets)).exchange(command, response)
    ins = ins_label(command[0], command[1]) if len(command) >= 2 else "short command"
    cut = len(command) - len(shown.command)
    text = f"{ins}: {shown.command.hex().upper()}"
    text += f" [{cut} data bytes redacted] -> " if cut else " -> "
    if len(response) >= 2:
        sw = int.from_bytes(response[-2:], "big")
        data = response[:-2]
        text += f"{sw:04X} ({sw_meaning(sw)})"
        if data and len(shown.response) == 2:
            text += f" +{len(data)} bytes [redacted]"
        elif data:
            text += f" +{len(data)} bytes {data[:32].hex().upper()}"
            if len(data) > 32:
                text += "..."
    else:
        text += f"bad response {response.hex().upper()!r}"
    return text
