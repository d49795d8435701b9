"""``ccidemu serve``: serve virtual readers to QEMU VMs over ccid-card-passthru chardev sockets."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

from ccidemu.cards import CardOptions
from ccidemu.errors import ConfigError
from vmc import systemd
from vmc.addr import UnixAddress, parse_address
from vmc.config import (
    DEFAULT_CARD,
    DEFAULT_CONNECT,
    ServeConfig,
    SocketOptions,
    check_patterns,
    parse_group,
    parse_owner,
    parse_socket_mode,
)
from vmc.control import parse_control_option
from vmc.daemon import Daemon
from vmc.spice import add_spice_arguments, check_one_card, target_from_args
from vmc.touch import TouchSetting, parse_touch

log = logging.getLogger(__name__)

_EPILOG = """\
examples:
  QEMU as chardev server (libvirt <smartcard mode='passthrough' type='tcp'> with
  <source mode='bind'>):
    qemu-system-x86_64 ... -device qemu-xhci -device usb-ccid \\
      -chardev socket,id=ccid,host=127.0.0.1,port=2001,server=on,wait=off \\
      -device ccid-card-passthru,chardev=ccid
    ccidemu serve --connect tcp:127.0.0.1:2001 --card piv:
  QEMU as chardev client (start ccidemu first):
    ccidemu serve --listen unix:/run/ccidemu/vm1.sock --card piv:/etc/ccidemu/vm1
    qemu-system-x86_64 ... -device qemu-xhci -device usb-ccid \\
      -chardev socket,id=ccid,path=/run/ccidemu/vm1.sock,reconnect=1 \\
      -device ccid-card-passthru,chardev=ccid
  QEMU run by libvirt (user libvirt-qemu, group kvm):
    ccidemu serve --listen unix:/run/ccidemu/vm1.sock --socket-group kvm --socket-mode 0660
  QEMU's SPICE server (-spice port=5930,addr=127.0.0.1 -chardev spicevmc,id=ccid,name=smartcard
  -device usb-ccid -device ccid-card-passthru,chardev=ccid; libvirt type='spicevmc'):
    ccidemu serve --spice 127.0.0.1:5930 --spice-password-file /etc/ccidemu/vm1.spice --card piv:
  many VMs from a file (see docs/CONFIG.md; 'ccidemu ctl reload' or SIGHUP re-reads it):
    ccidemu serve --config /etc/ccidemu/serve.toml

  a real card in a host reader, through pcscd ('ccidemu readers' lists them):
    ccidemu serve --listen unix:/run/ccidemu/vm1.sock --card 'pcsc:Yubico YubiKey'
  every host reader, one per VM endpoint (each endpoint its own usb-ccid in QEMU):
    ccidemu serve --listen unix:/run/a.sock --listen unix:/run/b.sock --card 'pcsc:*'
  a USB CCID reader without pcscd (stop pcscd first: it takes every CCID reader):
    ccidemu serve --listen unix:/run/ccidemu/vm1.sock --card usb:08e6:3437
  a real card compared APDU by APDU with the emulated PIV card (differences in the log and
  with --trace in the trace):
    ccidemu serve --card pcsc:0 --compare piv:/etc/ccidemu/expected --trace cmp.jsonl

One VM per --connect/--listen; each --card is one reader of that VM.  QEMU's
ccid-card-passthru takes one reader per usb-ccid device: for two readers give the VM two
usb-ccid devices with two chardevs (two --listen/--connect addresses).
Cards:  --card piv:DIR, --card cac:DIR (the CAC card libcacard / ccid-card-emulated give
guests, from cert1.crt + cert1.key ...), --card cac: (the demo CAC card), --card test:,
--card pcsc:NAME|INDEX|REGEX, --card 'pcsc:*' (every PC/SC reader, present and plugged in
later, each given to one VM: the VM with the fewest so far), --card usb:VID:PID[:SERIAL]
"""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve virtual readers to QEMU over chardev sockets",
        description="Attach virtual smartcard readers to QEMU VMs through the VSCard protocol "
        "of QEMU's ccid-card-passthru chardev.  Each --connect/--listen address is one VM "
        "with its own cards and card state (kept across reconnects); one connection at a "
        "time per VM.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--connect", action="append", default=[], metavar="ADDR",
                   help="connect to QEMU's chardev server (tcp:HOST:PORT or unix:PATH); retried "
                   "with backoff and after disconnects; repeatable (one VM each)")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR",
                   help="accept QEMU's chardev client (tcp:HOST:PORT or unix:PATH, created mode "
                   "0600 unless --socket-mode); repeatable (one VM each)")
    p.add_argument("--card", action="append", default=[], metavar="SPEC",
                   help=f"a card for every VM, one reader each (default {DEFAULT_CARD}); "
                   "repeatable")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="a TOML file of VMs ([vm.NAME] tables: listen/connect, cards, ...); "
                   "re-read by 'ccidemu ctl reload' and SIGHUP")
    p.add_argument("--control", metavar="ADDR",
                   help="unix control socket for 'ccidemu ctl' (default "
                   "$XDG_RUNTIME_DIR/ccidemu/control.sock; 'none' to disable)")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="append every APDU exchange to FILE as JSON Lines (created 0600)")
    p.add_argument("--trace-secrets", action="store_true",
                   help="keep secrets (PINs, PUKs, management keys, authentication witnesses "
                   "and challenges, imported keys) in the trace instead of redacting them")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where cards keep what the guest changes (PIN, keys, objects); with "
                   "several VMs each gets a subdirectory")
    p.add_argument("--read-only", action="store_true",
                   help="never write card state (read what --state-dir has, keep changes in "
                   "memory)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --listen tcp: address that other hosts can reach (any host "
                   "that reaches it gets the cards); without it only loopback is accepted")
    p.add_argument("--socket-owner", metavar="USER",
                   help="owner of the --listen unix sockets (default: the daemon's user)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the --listen unix sockets (e.g. kvm for libvirt's QEMU)")
    p.add_argument("--socket-mode", metavar="MODE", default="0600",
                   help="mode of the --listen unix sockets (default 0600; 0660 with "
                   "--socket-group)")
    p.add_argument("--card-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a blocking (passthrough) card that takes longer for one APDU fails "
                   "that APDU (default 30)")
    p.add_argument("--touch", metavar="MODE", type=_touch, default=TouchSetting(),
                   help="how a PIV key with a touch policy is touched: auto (at once, the "
                   "default), delay:SECONDS (after a delay: the client's touch prompt shows), "
                   "button[:TIMEOUT] (when 'ccidemu ctl touch VM' presses it; no press within "
                   "TIMEOUT, default 15 s, answers 6985 as a YubiKey does)")
    add_spice_arguments(p)
    p.add_argument("--pcsc-exclusive", action="store_true",
                   help="pcsc: cards hold their reader exclusively (default: shared with the "
                   "host's other PC/SC programs)")
    p.add_argument("--pcsc-allow", action="append", default=[], metavar="REGEX",
                   help="the PC/SC readers the VMs may get (a regular expression searched in "
                   "the reader's name; repeatable; default: any)")
    p.add_argument("--compare", metavar="SPEC",
                   help="give every APDU of each VM's first card also to this card (e.g. "
                   "piv:DIR, opened in memory) and report the APDUs whose answers differ, in "
                   "the log and in the trace")
    p.add_argument("--no-usb-ccid-workaround", dest="usb_ccid_workaround",
                   action="store_false",
                   help="send every answer as the card gave it; by default an answer of 54 "
                   "bytes or over 374, which QEMU 7.2's usb-ccid loses or refuses, goes out "
                   "in parts through 61xx / GET RESPONSE (docs/PROTOCOL.md)")
    p.set_defaults(func=run)


def _touch(text: str) -> TouchSetting:
    try:
        return parse_touch(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    connect = [parse_address(a) for a in args.connect]
    listen = [parse_address(a) for a in args.listen]
    spice = target_from_args(args)
    if spice is not None:
        check_one_card(args.card or [DEFAULT_CARD])
    if not connect and not listen and spice is None and args.config is None:
        connect = [parse_address(DEFAULT_CONNECT)]
    socket = SocketOptions(
        owner=None if args.socket_owner is None else parse_owner(args.socket_owner,
                                                                 "--socket-owner"),
        group=None if args.socket_group is None else parse_group(args.socket_group,
                                                                 "--socket-group"),
        mode=parse_socket_mode(args.socket_mode, "--socket-mode"),
    )
    control = parse_control_option(args.control)
    return ServeConfig(
        connect=connect,
        listen=listen,
        cards=list(args.card) or [DEFAULT_CARD],
        control=control if isinstance(control, UnixAddress) else None,
        trace=args.trace,
        trace_secrets=args.trace_secrets,
        allow_remote=args.allow_remote,
        card_options=CardOptions(state_dir=args.state_dir, read_only=args.read_only),
        socket=socket,
        config_file=args.config,
        card_timeout=args.card_timeout,
        usb_ccid_workaround=args.usb_ccid_workaround,
        touch=args.touch,
        spice=spice,
        pcsc_exclusive=args.pcsc_exclusive,
        pcsc_allow=check_patterns(args.pcsc_allow, "--pcsc-allow"),
        compare=args.compare,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    daemon = Daemon(config)
    # Before start(): a signal that arrives while it runs must not kill the daemon (a SIGHUP
    # then is moot: start reads the file anyway; a SIGTERM stops it once started).
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    daemon.start()
    log.info("ready")
    systemd.notify(f"READY=1\nSTATUS=serving {len(daemon.vms)} VMs")
    try:
        daemon.serve_forever()
    finally:
        systemd.notify("STOPPING=1")
    return 0
