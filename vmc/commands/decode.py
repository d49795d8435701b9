"""``ccidemu decode``: turn VSCard, CCID, APDU, ATR, BER-TLV, vdagent or usbmon pcap bytes into
text.

Input is FILE (or stdin), hex or binary (auto-detected unless ``--hex``/``--binary``).
Hex input may contain whitespace, newlines, colons and ``#`` comments.  A decode error
prints ``decode error: ...`` with the byte offset (and the line for per-line modes)
after everything decoded before it, and exits 1.  Secret APDU data (PINs, keys, management
key authentication; :mod:`ccidemu.redact`) is shown only with ``--show-secrets``.
"""

from __future__ import annotations

import argparse
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ccidemu.apdu import describe_command, describe_response, parse_command, parse_response
from ccidemu.atr import describe_atr, parse_atr, qemu_accepts
from ccidemu.ccid import (
    CcidDataBlock,
    CcidIccPowerOn,
    CcidMessage,
    CcidXfrBlock,
    decode_ccid,
    describe_ccid,
)
from ccidemu.errors import ConfigError, DecodeError
from ccidemu.pcap import ccid_records
from ccidemu.redact import Redactor
from ccidemu.tlv import describe_tlv
from ccidemu.vdagent import (
    CHUNK_HEADER_SIZE,
    VdAgentMessage,
    VdAgentMessageType,
    VdagentStream,
    decode_announce_capabilities,
)
from ccidemu.vsc import VscApdu, VscAtr, VscCardRemove, decode_vsc, describe_vsc

_MODES = ("auto", "vsc", "ccid", "apdu", "rapdu", "atr", "tlv", "pcap", "vdagent")
_HEX_CHARS = frozenset(string.hexdigits + string.whitespace + ":")
_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")

_EPILOG = """\
modes (--as):
  vsc    a VSCard stream (QEMU ccid-card-passthru chardev), ATR and APDU payloads decoded
  ccid   a stream of USB CCID bulk messages; XfrBlock/DataBlock payloads as APDUs/ATRs
  apdu   one command APDU per line      rapdu  one response APDU per line
  atr    one ATR                        tlv    a BER-TLV tree
  pcap   a usbmon pcap (e.g. QEMU -device usb-ccid,pcap=FILE): CCID exchanges
  vdagent  the other spicevmc stream (-chardev spicevmc,name=vdagent): VDIChunk headers
         and the VDAgentMessages they carry (never guessed by auto)
  auto   (default) guess from the bytes: pcap magic, VSCard header, ATR, else APDUs

example: ccidemu decode --as vsc fixtures/samples/qemu-session.hex
"""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "decode",
        help="decode VSCard, CCID, APDU, ATR or vdagent bytes into readable text",
        description="Decode protocol bytes (hex or binary, from FILE or stdin) into text.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--as", dest="mode", choices=_MODES, default="auto", help="what the bytes are"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--hex", dest="form", action="store_const", const="hex",
                      help="input is hex text")
    form.add_argument("--binary", dest="form", action="store_const", const="binary",
                      help="input is raw bytes")
    parser.add_argument(
        "--little-endian", action="store_true",
        help="VSCard headers are little-endian (the form inside SPICE's smartcard channel)",
    )
    parser.add_argument(
        "--show-secrets", action="store_true",
        help="show the data of secret-bearing APDUs (VERIFY, CHANGE REFERENCE DATA, RESET "
        "RETRY COUNTER, SET MANAGEMENT KEY, IMPORT KEY, symmetric GENERAL AUTHENTICATE); "
        "hidden by default",
    )
    parser.add_argument("file", metavar="FILE", nargs="?", help="input file (default: stdin)")
    parser.set_defaults(func=run, form=None)


# --- input -------------------------------------------------------------------------------


def _read_input(name: str | None) -> bytes:
    if name is None or name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror or exc}") from None


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0]


def _looks_like_hex(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    body = "".join(_strip_comment(line) for line in text.splitlines())
    return any(c in string.hexdigits for c in body) and all(c in _HEX_CHARS for c in body)


def _hex_lines(raw: bytes) -> list[tuple[int, bytes]]:
    """(line number, bytes) for each non-empty line of hex text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("hex input is not text") from None
    out: list[tuple[int, bytes]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        digits = "".join(_strip_comment(line).replace(":", " ").split())
        if not digits:
            continue
        try:
            out.append((number, bytes.fromhex(digits)))
        except ValueError:
            bad = next((c for c in digits if c not in string.hexdigits), None)
            what = f"character {bad!r}" if bad else f"odd number of hex digits ({len(digits)})"
            raise DecodeError(f"line {number}: not hex: {what}") from None
    return out


# --- per-mode decoders -------------------------------------------------------------------

Out = Callable[[str], None]


class _Secrets:
    """Redaction of the APDUs of one decode run: one Redactor per reader or slot."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self._redactors: dict[int, Redactor] = {}

    def see(self, key: int, data: bytes, *, response: bool) -> bytes:
        """The bytes of an APDU to show (in stream order: each APDU is seen once)."""
        redactor = self._redactors.setdefault(key, Redactor(self.show))
        shown, _ = redactor.response(data) if response else redactor.command(data)
        return shown


def _describe_apdu(data: bytes, *, response: bool, hidden: bool = False) -> str:
    """One line for a command or response APDU (``hidden``: its data is a secret).

    DecodeError if it does not parse.
    """
    if response:
        return describe_response(parse_response(data), hide_data=hidden)
    return describe_command(parse_command(data), hide_data=hidden)


def _apdu_lines(label: str, data: bytes, *, response: bool, hidden: bool) -> list[str]:
    """Decoding of a command or response APDU, indented; the error text if it does not parse."""
    try:
        return [f"    {label}: {_describe_apdu(data, response=response, hidden=hidden)}"]
    except DecodeError as exc:
        return [f"    {label}: not a valid APDU: {exc}"]


def _atr_lines(data: bytes) -> list[str]:
    try:
        return ["    " + line for line in describe_atr(parse_atr(data)).splitlines()]
    except DecodeError as exc:
        verdict = qemu_accepts(data)
        return [
            f"    ATR does not follow ISO/IEC 7816-3: {exc}",
            "    QEMU ccid-card-passthru: " + ("accepts" if verdict is None else verdict),
        ]


def _decode_vsc(
    data: bytes, out: Out, byteorder: Literal["big", "little"], secrets: _Secrets
) -> int:
    view = memoryview(data)  # slices without copying the rest of the input
    pos = 0
    count = 0
    expect_response = False
    while pos < len(data):
        try:
            msg, used = decode_vsc(view[pos:], byteorder)
        except DecodeError as exc:
            raise DecodeError(f"VSCard message #{count + 1}: {exc}", offset=pos) from None
        count += 1
        if isinstance(msg, VscApdu):
            # Commands go QEMU -> card, responses back: they alternate on one reader.
            is_response = expect_response or len(msg.data) < 4
            shown = secrets.see(msg.reader_id, msg.data, response=is_response)
            out(f"#{count} @{pos}: {describe_vsc(msg, max_hex=None, data=shown)}")
            label = "response" if is_response else "command"
            for line in _apdu_lines(label, msg.data, response=is_response,
                                    hidden=shown != msg.data):
                out(line)
            expect_response = not is_response
        else:
            out(f"#{count} @{pos}: {describe_vsc(msg, max_hex=None)}")
        if isinstance(msg, VscAtr):
            expect_response = False
            for line in _atr_lines(msg.atr):
                out(line)
        elif isinstance(msg, VscCardRemove):
            expect_response = False
        pos += used
    out(f"{count} VSCard messages, {len(data)} bytes")
    return 0


class _CcidDecoder:
    """CCID messages to text: APDU/ATR payloads decoded (DataBlock after IccPowerOn = ATR)."""

    def __init__(self, out: Out, secrets: _Secrets) -> None:
        self._out = out
        self._secrets = secrets
        self._last_command: dict[int, object] = {}

    def message(self, prefix: str, msg: CcidMessage, suffix: str = "") -> None:
        out = self._out
        if isinstance(msg, CcidXfrBlock | CcidIccPowerOn):
            self._last_command[msg.slot] = msg
        atr = isinstance(msg, CcidDataBlock) and isinstance(
            self._last_command.get(msg.slot), CcidIccPowerOn)
        apdu = isinstance(msg, CcidXfrBlock | CcidDataBlock) and bool(msg.data) and not atr
        if not apdu:
            out(f"{prefix}{describe_ccid(msg)}{suffix}")
            if atr and isinstance(msg, CcidDataBlock) and msg.data:
                for line in _atr_lines(msg.data):
                    out(line)
            return
        assert isinstance(msg, CcidXfrBlock | CcidDataBlock)
        response = isinstance(msg, CcidDataBlock)
        shown = self._secrets.see(msg.slot, msg.data, response=response)
        out(f"{prefix}{describe_ccid(msg, data=shown)}{suffix}")
        for line in _apdu_lines("response" if response else "command", msg.data,
                                response=response, hidden=shown != msg.data):
            out(line)


def _decode_ccid(data: bytes, out: Out, secrets: _Secrets) -> int:
    pos = 0
    count = 0
    decoder = _CcidDecoder(out, secrets)
    view = memoryview(data)  # slices without copying the rest of the input
    while pos < len(data):
        try:
            msg, used = decode_ccid(view[pos:])
        except DecodeError as exc:
            raise DecodeError(f"CCID message #{count + 1}: {exc}", offset=pos) from None
        count += 1
        decoder.message(f"#{count} @{pos}: ", msg)
        pos += used
    out(f"{count} CCID messages, {len(data)} bytes")
    return 0


def _decode_pcap(data: bytes, out: Out, secrets: _Secrets) -> int:
    records = ccid_records(data)
    decoder = _CcidDecoder(out, secrets)
    for number, record in enumerate(records, start=1):
        cut = " [truncated by the capture]" if record.truncated else ""
        decoder.message(f"#{number} t={record.timestamp:.6f} ", record.message, cut)
    out(f"{len(records)} CCID messages")
    return 0


def _decode_per_line(
    lines: list[tuple[int, bytes]], out: Out, secrets: _Secrets, *, response: bool
) -> int:
    for number, chunk in lines:
        shown = secrets.see(0, chunk, response=response)
        try:
            text = _describe_apdu(chunk, response=response, hidden=shown != chunk)
        except DecodeError as exc:
            raise DecodeError(f"line {number}: {exc}") from None
        cut = f" [{len(chunk) - len(shown)} bytes redacted]" if shown != chunk else ""
        out(f"{shown.hex().upper()}{cut}\n    {text}")
    return 0


def _decode_vdagent(data: bytes, out: Out) -> int:
    """spice-protocol vd_agent.h: chunks (port, size) carrying per-port VDAgentMessages."""
    stream = VdagentStream()
    stream.receive_data(data)
    pos = 0
    chunks = messages = 0
    while True:
        try:
            event = stream.next_event()
        except DecodeError as exc:
            raise DecodeError(f"vdagent chunk #{chunks + 1}: {exc}", offset=pos) from None
        if event is None:
            break
        if isinstance(event, VdAgentMessage):
            messages += 1
            out(f"    {_describe_vdagent_message(event)}")
            continue
        chunks += 1
        port = getattr(event.port, "name", event.port)
        out(f"#{chunks} @{pos}: chunk port={port} size={len(event.data)}")
        pos += CHUNK_HEADER_SIZE + len(event.data)
    if stream.buffered:
        raise DecodeError(f"{stream.buffered} bytes at the end do not complete a chunk or "
                          "message", offset=pos)
    out(f"{chunks} vdagent chunks, {messages} messages, {len(data)} bytes")
    return 0


def _describe_vdagent_message(msg: VdAgentMessage) -> str:
    kind = msg.type.name if isinstance(msg.type, VdAgentMessageType) else f"type {msg.type}"
    head = f"message {kind} protocol={msg.protocol} opaque={msg.opaque} size={len(msg.data)}"
    if msg.type == VdAgentMessageType.ANNOUNCE_CAPABILITIES:
        try:
            request, caps = decode_announce_capabilities(msg.data)
        except DecodeError as exc:
            return f"{head}: malformed capabilities: {exc}"
        names = sorted(getattr(c, "name", str(c)) for c in caps)
        return f"{head} request={int(request)} caps={','.join(names) or '-'}"
    shown = msg.data[:32].hex() + ("..." if len(msg.data) > 32 else "")
    return f"{head} {shown}".rstrip()


def _guess_mode(data: bytes) -> str:
    if data[:4] in _PCAP_MAGICS:
        return "pcap"
    if len(data) >= 12:
        for order in ("big", "little"):
            if 1 <= int.from_bytes(data[:4], order) <= 9:
                return "vsc"
    if data[:1] in (b"\x3b", b"\x3f"):
        try:
            parse_atr(data)
            return "atr"
        except DecodeError:
            pass
    return "apdu"


def run(args: argparse.Namespace) -> int:
    raw = _read_input(args.file)

    def out(text: str) -> None:
        print(text)

    try:
        return _run(args, raw, out)
    except DecodeError as exc:
        sys.stdout.flush()
        print(f"decode error: {exc}", file=sys.stderr)
        if args.mode == "auto":
            print(_what_was_tried(raw, args.form), file=sys.stderr)
        return 1


def _what_was_tried(raw: bytes, form: str | None) -> str:
    """For auto mode's failures: what the input looked like and what was ruled out."""
    text = form == "hex" or (form is None and _looks_like_hex(raw))
    head = raw[:16]
    shown = (repr(head.decode("ascii", "replace")) if text else head.hex(" ")) + (
        "..." if len(raw) > 16 else "")
    return (f"  the input: {len(raw)} bytes of {'hex text' if text else 'binary data'}, "
            f"starting {shown}\n"
            "  tried, in order: usbmon pcap (no pcap magic), VSCard stream (first word not a "
            "message type 1-9 in either byte order), ATR (no TS 3B/3F or not an ATR), then "
            "command APDUs per line, which failed as shown\n"
            "  give --as vsc|ccid|apdu|rapdu|atr|tlv|pcap|vdagent to say what it is, and "
            "--hex or --binary if the form was guessed wrong")


def _run(args: argparse.Namespace, raw: bytes, out: Out) -> int:
    mode: str = args.mode
    form: str | None = args.form
    secrets = _Secrets(args.show_secrets)
    if mode == "pcap" or (mode == "auto" and form != "hex" and raw[:4] in _PCAP_MAGICS):
        return _decode_pcap(raw, out, secrets)
    if form is None:
        form = "hex" if _looks_like_hex(raw) else "binary"
    if form == "hex":
        lines = _hex_lines(raw)
        data = b"".join(chunk for _, chunk in lines)
    else:
        data = raw
        lines = [(1, raw)] if raw else []
    if not data:
        raise DecodeError("no input bytes")
    if mode == "auto":
        mode = _guess_mode(data)
        out(f"(decoding as {mode}; use --as to choose)")
    byteorder: Literal["big", "little"] = "little" if args.little_endian else "big"
    if mode == "vsc":
        return _decode_vsc(data, out, byteorder, secrets)
    if mode == "ccid":
        return _decode_ccid(data, out, secrets)
    if mode == "pcap":
        return _decode_pcap(data, out, secrets)
    if mode in ("apdu", "rapdu"):
        return _decode_per_line(lines, out, secrets, response=mode == "rapdu")
    if mode == "atr":
        out(describe_atr(parse_atr(data)))
        return 0
    if mode == "tlv":
        out(describe_tlv(data))
        return 0
    if mode == "vdagent":
        return _decode_vdagent(data, out)
    raise ConfigError(f"unknown mode {mode!r}")  # argparse choices make this unreachable
