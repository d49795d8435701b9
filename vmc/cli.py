"""The ``ccidemu`` console script: a thin argparse front over the subcommand modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from ccidemu import __version__
from ccidemu.errors import CcidemuError
from ccidemu.trace import TRAFFIC
from vmc.commands import COMMANDS

log = logging.getLogger("ccidemu")

logging.addLevelName(TRAFFIC, "TRAFFIC")


def _build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccidemu",
        description="Userspace CCID smartcard emulator: virtual readers and cards for QEMU "
        "guests (ccid-card-passthru), the host's pcscd, and tests.",
        epilog="Run 'ccidemu COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"ccidemu {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output: -v info, -vv debug (APDUs decoded), -vvv traffic (raw frames)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == selected:
            module = importlib.import_module(module_name)
            module.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else {0: logging.INFO, 1: logging.INFO, 2: logging.DEBUG}.get(
        verbose, TRAFFIC
    )
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in args_list if a in COMMANDS), None)
    parser = _build_parser(selected)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CcidemuError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
