"""``ccidemu readers``: the host's card readers, to pick a ``--card pcsc:`` or ``usb:`` spec."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ccidemu.errors import ConfigError

_EPILOG = """\
examples:
  ccidemu readers                  the readers of the host's pcscd, their state and ATR
  ccidemu readers --json           the same as JSON (index, name, state, present, atr, spec)
  ccidemu readers --usb            USB CCID readers, for --card usb:VID:PID[:SERIAL]
                                   (readable without pcscd; opening one needs it stopped)
  PCSCLITE_CSOCK_NAME=/path/pcscd.comm ccidemu readers   another pcscd's readers

A reader is chosen by exact name (--card 'pcsc:Virtual PCD 00 00'), by index in this list
(--card pcsc:0), by a regular expression searched in the names (--card pcsc:YubiKey), or
all of them (--card 'pcsc:*').
"""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "readers", help="list the host's card readers (PC/SC; USB CCID with --usb) for --card",
        description="List the host's smart card readers with the state of each and the ATR of "
        "the card in it: the readers of pcscd (for --card pcsc:...), or with --usb the USB "
        "CCID readers on the bus (for --card usb:...).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--usb", action="store_true",
                   help="list USB CCID readers (pyusb) instead of pcscd's readers")
    p.set_defaults(func=run)


def _pcsc() -> list[dict[str, Any]]:
    from vmc.backends.pcsc import PcscError, list_pcsc_readers

    try:
        readers = list_pcsc_readers()
    except PcscError as exc:
        raise ConfigError(f"cannot list the PC/SC readers: {exc} (is pcscd running?)") from None
    return [{"index": r.index, "name": r.name, "spec": f"pcsc:{r.name}",
             "state": list(r.state), "present": r.present,
             "atr": r.atr.hex().upper() if r.atr else None} for r in readers]


def _usb() -> list[dict[str, Any]]:
    from vmc.backends.usb import list_usb_readers

    return [{"spec": r.spec, "device": r.name, "product": r.product, "level": r.level,
             "features": f"{r.features:08X}", "protocols": r.protocols,
             "max_message_length": r.max_message_length, "problem": r.problem}
            for r in list_usb_readers()]


def run(args: argparse.Namespace) -> int:
    rows = _usb() if args.usb else _pcsc()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no USB CCID readers" if args.usb else "no PC/SC readers")
        return 0
    for row in rows:
        if args.usb:
            print(f"{row['spec']}  {row['device']}  {row['product'] or ''}".rstrip())
            print(f"    {row['level']} level, {row['protocols']}, dwFeatures {row['features']}"
                  + (f"\n    not usable: {row['problem']}" if row["problem"] else ""))
        else:
            state = " ".join(s.lower() for s in row["state"]) or "-"
            print(f"{row['index']}: {row['name']}")
            print(f"    {state}" + (f", ATR {row['atr']}" if row["atr"] else ""))
    return 0
