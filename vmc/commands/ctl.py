"""``ccidemu ctl``: talk to a running ``ccidemu serve`` over its control socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ccidemu.errors import CcidemuError
from vmc.control import control_request, parse_control_option

_EPILOG = """\
examples:
  ccidemu ctl list                      VMs, their listeners/connections and readers
  ccidemu ctl remove alice              take the card out of vm alice's reader 0
  ccidemu ctl insert 1 --card piv:/etc/ccidemu/other
  ccidemu ctl touch alice               press the touch button of alice's reader 0
                                        (serve --touch button)
  ccidemu ctl attach carol --listen unix:/run/ccidemu/carol.sock --card piv:
  ccidemu ctl detach carol              the guest sees its card and reader leave
  ccidemu ctl reload                    re-read serve --config FILE (like SIGHUP)
  ccidemu ctl --json stats
"""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "ctl",
        help="control a running 'ccidemu serve': list, insert, remove, attach, detach, reload",
        description="Query and control a running 'ccidemu serve' through its control socket "
        "(JSON Lines; the protocol is described in vmc/control.py).  A VM is named by its "
        "name or its number (see list).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--control", metavar="ADDR",
                   help="the daemon's control socket (default "
                   "$XDG_RUNTIME_DIR/ccidemu/control.sock)")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    sub = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = real_add(name, **kw)
        # --json and --control after the action too (ctl list --json), not overriding what
        # was given before it
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print the daemon's JSON answer (errors too)")
        q.add_argument("--control", metavar="ADDR", default=argparse.SUPPRESS,
                       help="the daemon's control socket")
        return q

    sub.add_parser = add_parser  # type: ignore[method-assign]
    sub.add_parser("list", help="VMs, their listeners and connections, and their readers")
    sub.add_parser("stats", help="counters: VMs, sessions, APDUs, bytes, errors, uptime")
    for name, text in (("remove", "remove the card of a reader"),
                       ("insert", "insert a card into a reader"),
                       ("touch", "press the touch button of a reader (serve --touch "
                        "button): the key waiting for a touch goes ahead")):
        q = sub.add_parser(name, help=text)
        q.add_argument("vm", metavar="VM", help="VM name or number (see list)")
        q.add_argument("reader", type=int, nargs="?", default=0, metavar="READER",
                       help="reader index of the VM (default 0)")
        if name == "insert":
            q.add_argument("--card", metavar="SPEC",
                           help="a new card for the reader (default: the reader's card)")
    q = sub.add_parser("attach", help="add a VM while the daemon runs")
    q.add_argument("vm", metavar="NAME", help="a name for the VM")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="ADDR", help="accept QEMU's chardev client here")
    where.add_argument("--connect", metavar="ADDR", help="connect to QEMU's chardev server")
    q.add_argument("--card", action="append", default=[], metavar="SPEC",
                   help="a card (one reader each; default piv:); repeatable")
    q.add_argument("--state-dir", metavar="DIR",
                   help="where its card state lives (default: the daemon's --state-dir/NAME)")
    q = sub.add_parser("detach", help="remove a VM (its guest sees the cards leave)")
    q.add_argument("vm", metavar="VM", help="VM name or number")
    sub.add_parser("reload", help="re-read the daemon's --config file (only changed VMs are "
                   "touched; a bad file changes nothing)")
    p.set_defaults(func=run)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_sessions(sessions: list[dict[str, Any]]) -> str:
    """The readable table of ``list`` (one line per reader)."""
    if not sessions:
        return "no VMs"
    rows = [["ID", "VM", "MODE", "ADDRESS", "PEER", "READER", "RID", "CARD", "PRESENT",
             "APDUS"]]
    for s in sessions:
        if s.get("peer"):
            state = str(s["peer"])
        elif s.get("connected"):
            state = "-"
        elif s.get("mode") == "listen" and s.get("listening", True):
            state = "(listening)"
        else:
            state = "(offline)"
        readers = s.get("readers") or [{}]
        for r in readers:
            rid = r.get("reader_id")
            rows.append([
                str(s.get("session")), str(s.get("vm", "-")), str(s.get("mode")),
                str(s.get("address")), state, str(r.get("reader", "-")),
                "-" if rid is None else str(rid), str(r.get("card", "-")),
                "yes" if r.get("present") else "no", str(r.get("apdus", 0)),
            ])
    return _table(rows)


def format_stats(stats: dict[str, Any]) -> str:
    return "\n".join(f"{key:15} {value}" for key, value in stats.items())


def _vm_key(text: str) -> dict[str, Any]:
    return {"session": int(text)} if text.isdigit() else {"vm": text}


def request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    command: str = args.ctl_command
    request: dict[str, Any] = {"cmd": command}
    if command in ("insert", "remove", "touch"):
        request.update(_vm_key(args.vm), reader=args.reader)
        if command == "insert" and args.card is not None:
            request["card"] = args.card
    elif command == "detach":
        request.update(_vm_key(args.vm))
    elif command == "attach":
        request["vm"] = args.vm
        if args.listen is not None:
            request["listen"] = args.listen
        else:
            request["connect"] = args.connect
        if args.card:
            request["cards"] = list(args.card)
        if args.state_dir is not None:
            request["state_dir"] = args.state_dir
    return request


def run(args: argparse.Namespace) -> int:
    address = parse_control_option(args.control)
    if address is None:
        print("ccidemu ctl: --control none leaves nothing to talk to", file=sys.stderr)
        return 2
    request = request_from_args(args)
    try:
        result = control_request(address, request, timeout=60)
    except CcidemuError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            return 1
        raise
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.ctl_command == "stats":
        print(format_stats(result))
    elif args.ctl_command == "reload":
        print("\n".join(f"{key}: {', '.join(value) or '-'}" for key, value in result.items()))
    elif args.ctl_command == "detach":
        print(f"detached {result.get('detached')}")
    elif args.ctl_command == "touch":
        print(f"vm {result.get('vm')} reader {result.get('reader')}: touched"
              + ("" if result.get("waiting") else
                 " (nothing was waiting: the next touch request takes it)"))
    elif args.ctl_command == "list":
        print(format_sessions(result))
    else:
        print(format_sessions([result]))
    return 0
