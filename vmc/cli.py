"""The ``ccidemu`` console script: a thin argparse front over the subcommand modules.

Errors a user can meet end in one line on stderr and exit status 1, never a traceback: our
own errors (``CcidemuError``: bad options, files, peers), and the operating system's
(``OSError``: a busy port, a missing socket, an unwritable directory).  Output cut short by
a closed pipe (``ccidemu decode ... | head``) ends quietly.  Global options (``-v``, ``-q``)
may come before or after the subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ccidemu import __version__
from ccidemu.errors import CcidemuError
from ccidemu.trace import TRAFFIC
from vmc.commands import COMMANDS

log = logging.getLogger("ccidemu")

logging.addLevelName(TRAFFIC, "TRAFFIC")

_VERBOSE_HELP = "more log output: -v info, -vv debug (APDUs decoded), -vvv traffic (raw frames)"


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v/-q on the top parser and on every subcommand's (not overriding the top's)."""
    default: object = 0 if top else argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="count", default=default, help=_VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true",
                        default=False if top else argparse.SUPPRESS,
                        help="only warnings and errors")


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _all_parsers(sub)
    return found


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; only the ``selected`` subcommand's module is imported (all when
    None, e.g. for ``ccidemu completion``)."""
    parser = argparse.ArgumentParser(
        prog="ccidemu",
        description="Userspace CCID smartcard emulator: virtual readers and cards for QEMU "
        "guests (ccid-card-passthru), the host's pcscd, and tests.",
        epilog="Run 'ccidemu COMMAND --help' for the options and examples of one command.",
    )
    parser.add_argument("--version", action="version", version=f"ccidemu {__version__}")
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if selected is None or name == selected:
            module = importlib.import_module(module_name)
            module.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    for name in list(sub.choices):
        if selected is None or name == selected:
            for child in _all_parsers(sub.choices[name]):
                if not any("-v" in a.option_strings for a in child._actions):
                    _add_global_options(child, top=False)
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


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        text = f"{exc.filename}: {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in args_list if a in COMMANDS), None)
    parser = build_parser(selected) if selected is not None else build_parser("")
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    prefix = f"ccidemu {args.command}: error:"
    try:
        return func(args)
    except CcidemuError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly; stdout must not be flushed again
        # at exit, so point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"{prefix} {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
