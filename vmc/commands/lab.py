"""``ccidemu lab``: boot the tiny QEMU guest with a card in its reader; run a command in it
or get a shell there (:mod:`vmc.lab.vm`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from vmc.config import DEFAULT_CARD
from vmc.lab.errors import LabError
from vmc.lab.guest import cache_root
from vmc.lab.progress import TerminalProgress
from vmc.lab.vm import (
    LabVm,
    check_card_spec,
    missing_prerequisites,
    remove_workdir,
    short_workdir,
)

log = logging.getLogger(__name__)

_EPILOG = """\
The guest is a Debian kernel and a small initramfs with busybox, pcscd, libccid, OpenSC
(opensc-tool, pkcs11-tool, pkcs15-tool, piv-tool) and pcsc-tools (pcsc_scan), all taken from
this host's packages.  It is built on first use (about 70 MB downloaded with apt-get, then
cached in $CCIDEMU_CACHE/guest or ~/.cache/ccidemu/guest) and boots in a few seconds without
KVM.  QEMU's usb-ccid reader gets the card from a 'ccidemu serve' that lab starts itself.
Needs: qemu-system-x86 (usb-ccid, ccid-card-passthru), busybox-static, apt, pcscd, libccid,
opensc, pcsc-tools.

examples:
  ccidemu lab --run 'opensc-tool -n'                 the demo PIV card: OpenSC names it
  ccidemu lab --card cac: --run 'pkcs15-tool -c'      the demo CAC card's certificates
  ccidemu lab --card piv:/path/to/card.toml --run 'pkcs11-tool -L'
  ccidemu lab --card test: --run 'opensc-tool -s 80E0000003010203'
  ccidemu lab                                        a shell in the guest ('exit' leaves)

With --run the output of the command (stdout and stderr merged) goes to stdout, its exit
status to stderr, and lab exits with that status.  In the shell, Ctrl-C interrupts the
guest's command and Ctrl-] leaves at once; lab exits with the shell's status.  Input that is
not a terminal is typed into the shell, then 'exit':
  printf 'pcsc_scan -r\\npkcs15-tool -D\\n' | ccidemu lab
"""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="boot a tiny QEMU guest with a card in its reader: run a command or get a shell",
        description="Boot the tiny QEMU test guest (built and cached on first use) with an "
        "emulated card in its usb-ccid reader, served by ccidemu serve; run one command in "
        "it (--run) or get an interactive shell with pcscd, OpenSC and pcsc-tools.  The first "
        "thing to try: it proves that the whole chain works on this machine.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--card", default=DEFAULT_CARD, metavar="SPEC",
                   help=f"the card in the guest's reader (default {DEFAULT_CARD}, the demo PIV "
                   "card; cac:, test:, piv:DIR, piv:PROFILE.toml, cac:DIR, replay:TRACE ...)")
    p.add_argument("--run", metavar="CMD",
                   help="run CMD in the guest's shell (busybox sh) and exit with its status; "
                   "without it: an interactive shell")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="the guest kills --run's command after SECONDS (status 137; default "
                   "600)")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="keep the guest's logs (console, QEMU, pcscd, commands, serve.log) in "
                   "DIR (default: a temporary directory, removed unless something failed)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory with the logs (its name is printed)")
    p.add_argument("--rebuild", action="store_true",
                   help="build the guest again even if the cached one is current")
    p.add_argument("--cache", type=Path, metavar="DIR",
                   help=f"guest cache directory (default {cache_root()})")
    p.add_argument("--memory", type=int, default=512, metavar="MB",
                   help="guest memory (default 512)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.verbose == 0 and not args.quiet:
        logging.getLogger("vmc.lab").setLevel(logging.WARNING)
    # a bad spec or a missing prerequisite fails before anything is made, built or booted
    check_card_spec(args.card)
    problem = missing_prerequisites()
    if problem is not None:
        raise LabError(problem)
    workdir = args.workdir or short_workdir()
    progress = TerminalProgress(sys.stderr)
    vm = LabVm(args.card, workdir, cache=args.cache, memory_mb=args.memory)
    ok = False
    with _stop_on_signals():
        try:
            if args.rebuild:
                vm.prepare(progress, force=True)
            if not args.quiet:
                progress.step(f"guest cache {args.cache or cache_root()}")
            vm.start(progress if not args.quiet else None)
            progress.close()
            status = _run_command(vm, args) if args.run is not None else _shell(vm, args)
            ok = True
            return status
        finally:
            vm.close()
            progress.close()
            if args.workdir is None:
                if (ok and not args.keep) or not any(workdir.iterdir()):
                    remove_workdir(workdir)
                else:
                    print(f"ccidemu lab: logs kept in {workdir}", file=sys.stderr)


def _run_command(vm: LabVm, args: argparse.Namespace) -> int:
    result = vm.run(args.run, timeout=args.timeout)
    sys.stdout.write(result.output)
    if result.output and not result.output.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    what = "killed after the timeout (status 137)" if result.status == 137 else (
        f"exited with status {result.status}")
    print(f"ccidemu lab: {shlex.quote(args.run)} {what}", file=sys.stderr)
    return result.status if 0 <= result.status <= 255 else 1


def _shell(vm: LabVm, args: argparse.Namespace) -> int:
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    rows = cols = None
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(stdout)
        rows, cols = size.lines, size.columns
    assert vm.guest is not None
    print(f"ccidemu lab: a shell in the guest, {vm.card} in its reader (pcscd, opensc-tool, "
          "pkcs11-tool, pkcs15-tool, piv-tool, pcsc_scan); 'exit' or Ctrl-D leaves, Ctrl-] "
          "aborts", file=sys.stderr)
    sys.stdout.flush()
    with _raw_terminal(stdin):
        status = vm.interact(stdin, stdout, rows=rows, cols=cols)
    if status is None:
        print("\r\nccidemu lab: left the guest (Ctrl-])", file=sys.stderr)
        return 130
    return status if 0 <= status <= 255 else 1


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """Keys go to the guest as typed (its pseudo-terminal echoes and edits lines)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end lab like Ctrl-C, so that QEMU and ccidemu serve (in their own
    sessions) are stopped rather than left running."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
