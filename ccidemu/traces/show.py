"""``ccidemu trace show``: a readable listing of a trace, with filters.  Pure.

Each exchange is one line (number, time, reader, INS name, command, status word and its
meaning, response size), followed, where the objects are known, by the decoded BER-TLV of
the answer: PIV data objects read with GET DATA (NIST SP 800-73-4 part 1 section 3 and
table 3; part 2 section 3.1.2), the PIV application property template of SELECT (part 2
section 3.1.1), GENERAL AUTHENTICATE's dynamic authentication template (7C, part 2 section
3.2.4) and generated public keys (7F49, part 2 section 3.3.2).  Secret data stays as the
trace holds it (redacted when recorded unless ``--trace-secrets``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ccidemu.apdu import ins_label
from ccidemu.errors import ConfigError, DecodeError
from ccidemu.sw import sw_meaning
from ccidemu.tlv import Tlv, ber_decode, ber_find
from ccidemu.traces.model import Exchange, PowerEvent, Record

__all__ = ["Filter", "describe_record", "describe_tlv_named", "parse_filter", "record_json"]

#: SP 800-73-4 part 1 table 3: PIV data objects (BER-TLV tags of GET DATA's 5C).
PIV_OBJECTS: dict[int, str] = {
    0x5FC107: "Card Capability Container", 0x5FC102: "Card Holder Unique Identifier",
    0x5FC105: "X.509 Certificate for PIV Authentication (9A)",
    0x5FC103: "Cardholder Fingerprints", 0x5FC106: "Security Object",
    0x5FC108: "Cardholder Facial Image", 0x5FC109: "Printed Information",
    0x5FC10A: "X.509 Certificate for Digital Signature (9C)",
    0x5FC10B: "X.509 Certificate for Key Management (9D)",
    0x5FC101: "X.509 Certificate for Card Authentication (9E)",
    0x5FC10C: "Key History Object", 0x5FC121: "Cardholder Iris Images",
    0x5FC122: "Biometric Information Templates Group Template",
    0x5FC123: "Secure Messaging Certificate Signer", 0x7E: "Discovery Object",
    0x7F61: "Biometric Information Templates Group Template",
    **{0x5FC10D + i: f"Retired X.509 Certificate for Key Management {i + 1} ({0x82 + i:02X})"
       for i in range(20)},
}

#: Tags inside PIV objects and templates (SP 800-73-4 part 1 appendix A; part 2 tables).
PIV_TAGS: dict[int, str] = {
    0x53: "data object", 0x70: "certificate", 0x71: "CertInfo", 0x72: "MSCUID",
    0xFE: "error detection code", 0x30: "FASC-N", 0x32: "organizational identifier",
    0x33: "DUNS", 0x34: "GUID", 0x35: "expiration date", 0x36: "cardholder UUID",
    0x3E: "issuer asymmetric signature", 0xEE: "buffer length", 0xF0: "card identifier",
    0xF1: "capability container version", 0xF2: "capability grammar version",
    0xF3: "applications CardURL", 0xF4: "PKCS#15", 0xF5: "registered data model number",
    0xF6: "access control rule table", 0xF7: "card APDUs", 0xFA: "redirection tag",
    0xFB: "capability tuples", 0xFC: "status tuples", 0xFD: "next CCC",
    0xC1: "keys with on-card certificates", 0xC2: "keys with off-card certificates",
    0x4F: "application identifier", 0x5F2F: "PIN usage policy",
    0x61: "application property template", 0x79: "coexistent tag allocation authority",
    0x50: "application label", 0x5F50: "uniform resource locator",
    0xAC: "cryptographic algorithms", 0x80: "algorithm / witness", 0x06: "object identifier",
    0x7C: "dynamic authentication template", 0x81: "challenge", 0x82: "response",
    0x85: "exponentiation", 0x7F49: "public key", 0x86: "EC point",
}

#: Yubico's PIV extension instructions (Yubico PIV tool documentation), CLA 00.
_YUBICO_INS = {0xFD: "GET VERSION", 0xF8: "GET SERIAL", 0xFF: "SET MANAGEMENT KEY",
               0xFE: "IMPORT ASYMMETRIC KEY", 0xF9: "ATTEST", 0xFB: "RESET",
               0xFA: "SET PIN RETRIES", 0xF7: "GET METADATA"}
#: CAC (GSC-IS 2.1, as libcacard emulates it), CLA 80.
_CAC_INS = {0x52: "CAC READ BUFFER", 0x56: "CAC GET PROPERTIES", 0x4C: "CAC GET ACR",
            0x42: "CAC SIGN/DECRYPT"}


def instruction(command: bytes) -> str:
    if len(command) < 2:
        return "short command"
    cla, ins = command[0], command[1]
    label = ins_label(cla, ins)
    if cla < 0x80 and label.startswith("INS ") and ins in _YUBICO_INS:
        return _YUBICO_INS[ins]
    if cla == 0x80 and ins in _CAC_INS:
        return _CAC_INS[ins]
    return label


@dataclass(frozen=True)
class Filter:
    """Which records ``trace show`` lists (all conditions must hold)."""

    readers: frozenset[str] = frozenset()
    ins: frozenset[int] = frozenset()
    status: tuple[tuple[int, int], ...] = ()  # (value, mask) pairs: 61xx -> (0x6100, 0xFF00)
    not_status: tuple[tuple[int, int], ...] = ()
    since: float | None = None
    until: float | None = None
    power: bool = True  # list power events too

    def keeps(self, record: Record) -> bool:
        if self.readers and record.reader not in self.readers:
            return False
        t = record.t
        if self.since is not None and (t is None or t < self.since):
            return False
        if self.until is not None and (t is None or t > self.until):
            return False
        if isinstance(record, PowerEvent):
            return self.power and not self.ins and not self.status and not self.not_status
        if self.ins and (len(record.command) < 2 or record.command[1] not in self.ins):
            return False
        sw = record.sw
        if self.status and (sw is None or not any(sw & m == v for v, m in self.status)):
            return False
        return not (self.not_status and sw is not None
                    and any(sw & m == v for v, m in self.not_status))


def _status_pattern(text: str) -> tuple[int, int]:
    if not re.fullmatch(r"[0-9a-fA-Fx]{4}", text):
        raise ConfigError(f"status {text!r}: four hex digits, x for any (9000, 61xx, 6A8x)")
    value = int("".join("0" if c in "xX" else c for c in text), 16)
    mask = int("".join("0" if c in "xX" else "F" for c in text), 16)
    return value, mask


def parse_filter(
    readers: Sequence[str] = (), ins: Sequence[str] = (), status: Sequence[str] = (),
    since: float | None = None, until: float | None = None,
) -> Filter:
    """A :class:`Filter` from option values; ConfigError for a bad one.

    ``ins``: hex bytes (``a4``, ``cb``).  ``status``: ``9000``, ``61xx``, or ``!9000`` for
    "anything but"; several values are alternatives.
    """
    ins_set: set[int] = set()
    for item in ins:
        for part in item.split(","):
            try:
                value = int(part, 16)
            except ValueError:
                raise ConfigError(f"INS {part!r} is not a hex byte") from None
            if not 0 <= value <= 0xFF:
                raise ConfigError(f"INS {part!r} is not a byte")
            ins_set.add(value)
    wanted: list[tuple[int, int]] = []
    unwanted: list[tuple[int, int]] = []
    for item in status:
        for part in item.split(","):
            if part.startswith("!"):
                unwanted.append(_status_pattern(part[1:]))
            else:
                wanted.append(_status_pattern(part))
    return Filter(frozenset(readers), frozenset(ins_set), tuple(wanted), tuple(unwanted),
                  since, until)


def _name(tag: int, context: dict[int, str]) -> str:
    return context.get(tag) or PIV_TAGS.get(tag) or ""


def describe_tlv_named(data: bytes, indent: str = "      ") -> list[str]:
    """BER-TLV ``data`` as an indented tree with PIV names; [] when it is not BER-TLV."""
    try:
        tlvs = ber_decode(data)
    except DecodeError:
        return []
    lines: list[str] = []

    def walk(items: Iterable[Tlv], depth: int) -> None:
        for tlv in items:
            pad = indent + "  " * depth
            label = _name(tlv.tag, {})
            label = f" {label}" if label else ""
            if tlv.constructed and tlv.tag not in (0x53,):
                try:
                    kids = tlv.children()
                except DecodeError:
                    kids = None
                if kids is not None:
                    lines.append(f"{pad}{tlv.tag:X}{label} ({len(tlv.value)} bytes)")
                    walk(kids, depth + 1)
                    continue
            if tlv.tag == 0x53:  # the object's own template: primitive by tag class, BER inside
                try:
                    inner = ber_decode(tlv.value)
                except DecodeError:
                    inner = None
                if inner:
                    lines.append(f"{pad}53{label} ({len(tlv.value)} bytes)")
                    walk(inner, depth + 1)
                    continue
            value = tlv.value.hex().upper()
            shown = value if len(value) <= 64 else f"{value[:64]}... ({len(tlv.value)} bytes)"
            lines.append(f"{pad}{tlv.tag:X}{label}: {shown}")

    walk(tlvs, 0)
    return lines


def _object_of(command: bytes) -> int | None:
    """The PIV object a GET DATA (00 CB 3F FF, data 5C tag) asks for."""
    if len(command) < 7 or command[1] != 0xCB or command[2:4] != b"\x3f\xff":
        return None
    try:
        tag_bytes = ber_find(command[5 : 5 + command[4]], 0x5C)
    except DecodeError:
        return None
    if not tag_bytes:
        return None
    return int.from_bytes(tag_bytes, "big")


def _decodable(command: bytes, data: bytes) -> str | None:
    """What the response data is, when it is a known TLV structure."""
    if len(command) < 2 or not data:
        return None
    ins = command[1]
    obj = _object_of(command)
    if obj is not None:
        return PIV_OBJECTS.get(obj, f"object {obj:X}")
    if ins == 0xA4 and data[:1] == b"\x61":
        return "application property template"
    if ins == 0x87 and data[:1] == b"\x7c":
        return "dynamic authentication template"
    if ins == 0x47 and data[:2] == b"\x7f\x49":
        return "generated public key"
    return None


def _hex(data: bytes, limit: int = 40) -> str:
    text = data.hex().upper()
    return text if len(text) <= limit * 2 else f"{text[: limit * 2]}..."


def describe_record(number: int, record: Record, *, decode: bool = True) -> Iterator[str]:
    """The listing lines of one record."""
    t = f"{record.t:10.6f}" if record.t is not None else "         -"
    reader = f" [{record.reader}]" if record.reader is not None else ""
    if isinstance(record, PowerEvent):
        atr = f" ATR {record.atr.hex().upper()}" if record.atr is not None else ""
        error = f" error: {record.error}" if record.error else ""
        yield f"{number:6d} {t}{reader} power {record.kind.value}{atr}{error}"
        return
    command = record.command
    name = instruction(command)
    marks = []
    if record.command_redacted:
        marks.append("command redacted")
    if record.response_redacted:
        marks.append("response redacted")
    if record.truncated:
        marks.append("truncated by the capture")
    mark = f" [{', '.join(marks)}]" if marks else ""
    took = f" {record.duration * 1000:.3f} ms" if record.duration is not None else ""
    line = f"{number:6d} {t}{reader} {name}: {_hex(command)} -> "
    sw = record.sw
    if record.truncated:
        line += f"{len(record.response)} bytes captured"
    elif sw is None:
        line += f"no response ({record.error or 'none recorded'})"
    else:
        size = len(record.response) - 2
        line += f"{sw:04X} {sw_meaning(sw)}" + (f", {size} data bytes" if size else "")
    yield line + took + mark
    if not decode or record.response_redacted or sw is None or record.truncated:
        return
    data = record.response[:-2]
    what = _decodable(command, data)
    if what is None:
        return
    lines = describe_tlv_named(data)
    if lines:
        yield f"         {what}:"
        yield from lines


def record_json(number: int, record: Record) -> dict[str, Any]:
    """The JSON object ``trace show --json`` prints for one record."""
    import json

    from ccidemu.traces.jsonl import format_record

    obj: dict[str, Any] = {"number": number, **json.loads(format_record(record))}
    if isinstance(record, Exchange):
        obj["instruction"] = instruction(record.command)
        sw = record.sw
        if sw is not None and not record.truncated:
            obj["sw"] = f"{sw:04X}"
            obj["meaning"] = sw_meaning(sw)
            what = _decodable(record.command, record.response[:-2])
            if what is not None and not record.response_redacted:
                obj["object"] = what
    return obj
