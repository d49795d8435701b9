"""``ccidemu serve``: serve virtual readers to QEMU VMs over ccid-card-passthru chardev sockets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from ccidemu.cards import CardOptions
from vmc.addr import parse_address
from vmc.control import parse_control_option
from vmc.daemon import DEFAULT_CARD, DEFAULT_CONNECT, Daemon, ServeConfig

log = logging.getLogger(__name__)

_EPILOG = """\
QEMU as chardev server (libvirt <smartcard mode='passthrough' type='tcp'> with
source mode='bind'):  -chardev socket,id=ccid,host=127.0.0.1,port=2001,server=on,wait=off
  -device usb-ccid -device ccid-card-passthru,chardev=ccid
  ->  ccidemu serve --connect tcp:127.0.0.1:2001
QEMU as chardev client:  -chardev socket,id=ccid,path=/run/vm1.sock,reconnect=1
  ->  ccidemu serve --listen unix:/run/vm1.sock   (start ccidemu first)
Cards:  --card piv:DIR, --card cac:DIR (the CAC card libcacard / ccid-card-emulated give
guests, from cert1.crt + cert1.key ...), --card cac: (the demo CAC card), --card test:
"""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve virtual readers to QEMU over chardev sockets",
        description="Attach virtual smartcard readers to QEMU VMs through the VSCard protocol "
        "of QEMU's ccid-card-passthru chardev.  One session per VM connection; each --card "
        "adds one reader (with its own card instance) to every session.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--connect", action="append", default=[], metavar="ADDR",
                   help="connect to QEMU's chardev server (tcp:HOST:PORT or unix:PATH); retried "
                   "with backoff and after disconnects; repeatable")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="accept QEMU chardev clients (tcp:HOST:PORT or unix:PATH, created mode "
                   "0600); one session per connection; repeatable")
    p.add_argument("--card", action="append", default=[], metavar="SPEC",
                   help=f"a card per session, one reader each (default {DEFAULT_CARD}); "
                   "repeatable")
    p.add_argument("--control", metavar="ADDR",
                   help="control socket for 'ccidemu ctl' (default "
                   "$XDG_RUNTIME_DIR/ccidemu/control.sock; 'none' to disable)")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="append every APDU exchange to FILE as JSON Lines")
    p.add_argument("--trace-secrets", action="store_true",
                   help="keep PINs (VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER data) "
                   "in the trace instead of redacting them")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where cards persist changed state")
    p.add_argument("--read-only", action="store_true", help="never write card state to disk")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --listen tcp: address that other hosts can reach (any host "
                   "that reaches it gets the cards); without it only loopback is accepted")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    connect = [parse_address(a) for a in args.connect]
    listen = [parse_address(a) for a in args.listen]
    if not connect and not listen:
        connect = [parse_address(DEFAULT_CONNECT)]
    return ServeConfig(
        connect=connect,
        listen=listen,
        cards=list(args.card) or [DEFAULT_CARD],
        control=parse_control_option(args.control),
        trace=args.trace,
        trace_secrets=args.trace_secrets,
        allow_remote=args.allow_remote,
        card_options=CardOptions(state_dir=args.state_dir, read_only=args.read_only),
    )


async def _serve(config: ServeConfig) -> None:
    daemon = Daemon(config)
    await daemon.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.request_stop)
    log.info("ready")
    await daemon.run()


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    asyncio.run(_serve(config))
    return 0
