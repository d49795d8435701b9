"""``ccidemu ctl``: talk to a running ``ccidemu serve`` over its control socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vmc.control import control_request, parse_control_option


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "ctl",
        help="control a running 'ccidemu serve': list, insert, remove, stats",
        description="Query and control a running 'ccidemu serve' through its control socket "
        "(JSON Lines, see vmc/control.py).",
    )
    p.add_argument("--control", metavar="ADDR",
                   help="the daemon's control socket (default "
                   "$XDG_RUNTIME_DIR/ccidemu/control.sock)")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    sub = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="sessions and their readers")
    sub.add_parser("stats", help="counters: sessions, APDUs, bytes, errors, uptime")
    for name, text in (("remove", "remove the card of a reader"),
                       ("insert", "insert a card into a reader")):
        q = sub.add_parser(name, help=text)
        q.add_argument("session", type=int, metavar="SESSION", help="session id (see list)")
        q.add_argument("reader", type=int, nargs="?", default=0, metavar="READER",
                       help="reader index in the session (default 0)")
        if name == "insert":
            q.add_argument("--card", metavar="SPEC",
                           help="a new card for the reader (default: the reader's card)")
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
        return "no sessions"
    rows = [["SESSION", "MODE", "ADDRESS", "PEER", "READER", "ID", "CARD", "PRESENT", "APDUS"]]
    for s in sessions:
        state = s.get("peer") or ("-" if s.get("connected") else "(offline)")
        readers = s.get("readers") or [{}]
        for r in readers:
            rid = r.get("reader_id")
            rows.append([
                str(s.get("session")), str(s.get("mode")), str(s.get("address")), str(state),
                str(r.get("reader", "-")), "-" if rid is None else str(rid),
                str(r.get("card", "-")), "yes" if r.get("present") else "no",
                str(r.get("apdus", 0)),
            ])
    return _table(rows)


def format_stats(stats: dict[str, Any]) -> str:
    return "\n".join(f"{key:15} {value}" for key, value in stats.items())


def run(args: argparse.Namespace) -> int:
    address = parse_control_option(args.control)
    if address is None:
        print("ccidemu ctl: --control none leaves nothing to talk to", file=sys.stderr)
        return 2
    request: dict[str, Any] = {"cmd": args.ctl_command}
    if args.ctl_command in ("insert", "remove"):
        request["session"] = args.session
        request["reader"] = args.reader
        if args.ctl_command == "insert" and args.card is not None:
            request["card"] = args.card
    result = control_request(address, request)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.ctl_command == "stats":
        print(format_stats(result))
    else:
        print(format_sessions(result if args.ctl_command == "list" else [result]))
    return 0
