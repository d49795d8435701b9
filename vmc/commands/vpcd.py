"""``ccidemu vpcd``: put one card into vsmartcard's vpcd reader for the host's pcscd."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from ccidemu.card import Card
from ccidemu.cards import CardOptions, open_card
from ccidemu.errors import CcidemuError, ConfigError
from ccidemu.traces.writer import TraceWriter
from vmc.addr import parse_address
from vmc.touch import DelayedTouch
from vmc.vpcd import DEFAULT_VPCD_ADDRESS, VpcdBridge

log = logging.getLogger(__name__)

_DESCRIPTION = """\
Connect a card to vsmartcard's vpcd driver so that every PC/SC program on this host
(OpenSC, yubico-piv-tool, browsers, ssh) sees it in the reader "Virtual PCD 00 00".

Needs pcscd with the vsmartcard-vpcd driver (Debian: apt install pcscd vsmartcard-vpcd).
vpcd listens and the card connects: 127.0.0.1:35963 is reader "Virtual PCD 00 00",
35964 is "Virtual PCD 00 01".  The bridge reconnects by itself when pcscd restarts and
keeps the card (and its state: PIN tries, imported certificates) across reconnects.
"""

_EPILOG = """\
examples:
  ccidemu vpcd --card test:
  ccidemu vpcd --card piv:fixtures/certs --state-dir ~/.local/state/ccidemu/piv
  ccidemu vpcd --card piv:fixtures/certs --vpcd tcp:127.0.0.1:35964
  ccidemu vpcd --card cac:fixtures/cac --state-dir ~/.local/state/ccidemu/cac
  ccidemu vpcd --card piv: --trace piv.jsonl      # record every APDU (PINs redacted)
  ccidemu vpcd --card replay:piv.jsonl,match      # answer from a recorded trace
  ccidemu vpcd --card piv:fixtures/certs/card.toml --touch-delay 2   # see touch prompts
  opensc-tool -r 'Virtual PCD 00 00' -a     # then, in another terminal
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "vpcd",
        help="bridge a card to vsmartcard's vpcd for the host's pcscd",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--card", metavar="SPEC", default=None,
        help="the card to insert: test:, piv:DIR, piv:PROFILE.toml, cac:DIR, ... "
        "(default: piv: if the PIV card opens with its defaults, else test:)",
    )
    parser.add_argument(
        "--vpcd", metavar="tcp:HOST:PORT", default=str(DEFAULT_VPCD_ADDRESS),
        help=f"where vpcd listens (default: {DEFAULT_VPCD_ADDRESS})",
    )
    parser.add_argument(
        "--state-dir", metavar="DIR", type=Path, default=None,
        help="directory where the card keeps changed state (PIN, keys, certificates); "
        "default: in memory only",
    )
    parser.add_argument(
        "--read-only", action="store_true",
        help="never write card state to disk (changes live until the bridge exits)",
    )
    parser.add_argument(
        "--trace", type=Path, metavar="FILE",
        help="append every APDU exchange and power event to FILE (ccidemu trace, JSON Lines, "
        "created 0600; docs/TRACES.md)",
    )
    parser.add_argument(
        "--trace-secrets", action="store_true",
        help="write PINs, keys and management-key authentication data in the trace instead "
        "of redacting them",
    )
    parser.add_argument(
        "--touch-delay", metavar="SECONDS", type=float, default=None,
        help="cards with a touch button (PIV keys with a touch policy) are touched this many "
        "seconds after they ask (default: at once)",
    )
    parser.set_defaults(func=run)


def _open(spec: str | None, options: CardOptions) -> Card:
    if spec is not None:
        return open_card(spec, options)
    try:
        return open_card("piv:", options)
    except CcidemuError as exc:
        log.info("default PIV card not available (%s); using the built-in test card", exc)
        return open_card("test:", options)


def run(args: argparse.Namespace) -> int:
    address = parse_address(args.vpcd)
    if args.touch_delay is not None and args.touch_delay < 0:
        raise ConfigError("--touch-delay cannot be negative")
    touch = None if args.touch_delay is None else DelayedTouch(args.touch_delay)
    card = _open(args.card, CardOptions(state_dir=args.state_dir, read_only=args.read_only,
                                        touch=touch))
    trace = None
    if args.trace is not None:
        trace = TraceWriter(args.trace, source="ccidemu vpcd", secrets=args.trace_secrets,
                            reader=f"vpcd {address}")
    bridge = VpcdBridge(card, address, trace=trace)
    log.info("bridging card %s to vpcd at %s", card.name, address)

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        bridge.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    try:
        bridge.run()
    finally:
        bridge.close()
        if trace is not None:
            trace.close()
        summary = getattr(card, "summary", None)
        if callable(summary):
            log.info("%s", summary())
    if trace is not None and trace.failed:
        log.error("%s", trace.failed)
        return 1
    return 0
