"""Answer-to-Reset: parsing, building and describing ATRs; QEMU's ATR acceptance rules.

Spec: ISO/IEC 7816-3:2006 section 8.2 (structure of the ATR):

    TS  T0  [TA1 TB1 TC1 TD1]  [TA2 TB2 TC2 TD2]  ...  historical bytes (K)  [TCK]

* TS (8.1): ``3B`` direct convention, ``3F`` inverse convention.
* T0 (8.2.2): high nibble Y1 says which of TA1 TB1 TC1 TD1 follow (b5..b8),
  low nibble K is the number of historical bytes (0-15).
* TDi (8.2.3): high nibble Y(i+1) for the next level, low nibble a protocol T.
* TCK (8.2.5): absent when only T=0 is indicated (possibly by default),
  present otherwise; the XOR of T0 .. TCK is zero.
* At most 32 bytes after TS: an ATR is at most 33 bytes.
* TA1 (8.3, tables 7 and 8): Fi (high nibble) and Di (low nibble); default 11.

:func:`qemu_accepts` mirrors the check QEMU's ``hw/usb/ccid-card-passthru.c``
applies to a VSC_ATR message (see that function for the rules and their quirks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ccidemu.errors import DecodeError, EncodeError

#: ISO/IEC 7816-3:2006 section 8.2.1: TS plus at most 32 characters.
MAX_ATR_LENGTH = 33
#: QEMU's ``MAX_ATR_SIZE`` in ccid-card-passthru.c ("from 7816-3").
QEMU_MAX_ATR_LENGTH = 40

TS_DIRECT = 0x3B
TS_INVERSE = 0x3F

# Table 7: Fi and f(max) in MHz by the high nibble of TA1 (None = RFU).
_FI: dict[int, tuple[int, float]] = {
    0x0: (372, 4), 0x1: (372, 5), 0x2: (558, 6), 0x3: (744, 8), 0x4: (1116, 12),
    0x5: (1488, 16), 0x6: (1860, 20), 0x9: (512, 5), 0xA: (768, 7.5), 0xB: (1024, 10),
    0xC: (1536, 15), 0xD: (2048, 20),
}
# Table 8: Di by the low nibble of TA1.
_DI: dict[int, int] = {0x1: 1, 0x2: 2, 0x3: 4, 0x4: 8, 0x5: 16, 0x6: 32, 0x7: 64,
                       0x8: 12, 0x9: 20}


def _check_byte(value: int | None, what: str) -> None:
    if value is not None and not 0 <= value <= 0xFF:
        raise EncodeError(f"{what} {value!r} is not a byte")


@dataclass(frozen=True, slots=True)
class InterfaceBytes:
    """One level i of interface bytes: TAi, TBi, TCi, TDi (None when absent)."""

    ta: int | None = None
    tb: int | None = None
    tc: int | None = None
    td: int | None = None

    @property
    def protocol(self) -> int | None:
        """The protocol T that TDi indicates (its low nibble), None without TDi."""
        return None if self.td is None else self.td & 0x0F

    @property
    def presence(self) -> int:
        """The Y nibble announcing this level: b1=TA, b2=TB, b3=TC, b4=TD."""
        return (
            (self.ta is not None)
            | (self.tb is not None) << 1
            | (self.tc is not None) << 2
            | (self.td is not None) << 3
        )


@dataclass(frozen=True, slots=True)
class Atr:
    """A parsed ATR.  ``interface[0]`` holds TA1 TB1 TC1 TD1, and so on."""

    ts: int
    t0: int
    interface: tuple[InterfaceBytes, ...]
    historical: bytes
    tck: int | None

    @property
    def convention(self) -> str:
        return "direct" if self.ts == TS_DIRECT else "inverse"

    @property
    def protocols(self) -> frozenset[int]:
        """The protocols the TDi bytes indicate; T=0 by default when none does.

        T=15 is not a transmission protocol (it qualifies global bytes) and is left out.
        """
        found = {lvl.protocol for lvl in self.interface if lvl.protocol is not None}
        found.discard(15)
        return frozenset(found or {0})

    @property
    def ta1(self) -> int | None:
        return self.interface[0].ta if self.interface else None

    @property
    def fi_di(self) -> tuple[int | None, int | None]:
        """(Fi, Di) from TA1 (default 11: Fi=372, Di=1); None for RFU values."""
        ta1 = 0x11 if self.ta1 is None else self.ta1
        fi = _FI.get(ta1 >> 4)
        return (fi[0] if fi else None, _DI.get(ta1 & 0x0F))

    def encode(self) -> bytes:
        out = bytearray((self.ts, self.t0))
        for lvl in self.interface:
            out.extend(b for b in (lvl.ta, lvl.tb, lvl.tc, lvl.td) if b is not None)
        out += self.historical
        if self.tck is not None:
            out.append(self.tck)
        return bytes(out)


def compute_tck(atr_without_tck: bytes) -> int:
    """TCK: the XOR of T0 up to the last byte before TCK (section 8.2.5); TS excluded."""
    tck = 0
    for b in atr_without_tck[1:]:
        tck ^= b
    return tck


def _tck_required(levels: Iterable[InterfaceBytes]) -> bool:
    return any(lvl.protocol not in (None, 0) for lvl in levels)


def parse_atr(data: bytes) -> Atr:
    """Decode an ATR (ISO/IEC 7816-3:2006 section 8.2).  DecodeError when malformed."""
    n = len(data)
    if n == 0:
        raise DecodeError("empty ATR")
    if n > MAX_ATR_LENGTH:
        raise DecodeError(f"ATR of {n} bytes is longer than {MAX_ATR_LENGTH} (section 8.2.1)")
    ts = data[0]
    if ts not in (TS_DIRECT, TS_INVERSE):
        raise DecodeError(f"TS {ts:02X} is neither 3B (direct) nor 3F (inverse)", offset=0)
    if n < 2:
        raise DecodeError("ATR truncated: no T0", offset=1)
    t0 = data[1]
    pos = 2
    levels: list[InterfaceBytes] = []
    y = t0 >> 4
    while True:
        values: list[int | None] = []
        for bit in range(4):
            if y & (1 << bit):
                if pos >= n:
                    name = "ABCD"[bit]
                    raise DecodeError(
                        f"ATR truncated in T{name}{len(levels) + 1}", offset=pos
                    )
                values.append(data[pos])
                pos += 1
            else:
                values.append(None)
        level = InterfaceBytes(*values)
        levels.append(level)
        if level.td is None:
            break
        y = level.td >> 4
    if levels[-1].presence == 0:  # no interface bytes at all
        levels.pop()
    k = t0 & 0x0F
    if pos + k > n:
        raise DecodeError(
            f"ATR truncated: {k} historical bytes announced, {n - pos} left", offset=pos
        )
    historical = bytes(data[pos : pos + k])
    pos += k
    tck: int | None = None
    if _tck_required(levels):
        if pos >= n:
            raise DecodeError("ATR truncated: TCK missing (a protocol other than T=0)", offset=pos)
        tck = data[pos]
        if compute_tck(data[: pos + 1]) != 0:
            expected = compute_tck(data[:pos])
            raise DecodeError(f"wrong TCK {tck:02X} (expected {expected:02X})", offset=pos)
        pos += 1
    if pos != n:
        raise DecodeError(f"{n - pos} trailing bytes after the ATR", offset=pos)
    return Atr(ts, t0, tuple(levels), historical, tck)


def build_atr(
    ts: int = TS_DIRECT,
    interface: Sequence[InterfaceBytes] = (),
    historical: bytes = b"",
    protocols: Sequence[int] | None = None,
) -> Atr:
    """Build a consistent ATR: T0, the Y nibbles of each TDi and TCK are computed.

    ``interface`` gives the bytes of each level; the low nibble of each ``td`` is its
    protocol (its high nibble is recomputed).  Every level but the last needs a
    ``td``.  ``protocols`` fills the TD protocol of levels 1, 2, ... (adding empty
    levels as needed), e.g. ``protocols=[0, 1]`` gives TD1=80 TD2=01.
    """
    if ts not in (TS_DIRECT, TS_INVERSE):
        raise EncodeError(f"TS {ts:#04x} must be 3B or 3F")
    if len(historical) > 15:
        raise EncodeError(f"{len(historical)} historical bytes (at most 15)")
    levels = list(interface)
    if protocols is not None:
        while len(levels) < len(protocols):
            levels.append(InterfaceBytes())
        for i, proto in enumerate(protocols):
            if not 0 <= proto <= 15:
                raise EncodeError(f"protocol T={proto} outside 0..15")
            given = levels[i].td
            if given is not None and given & 0x0F != proto:
                raise EncodeError(
                    f"level {i + 1}: TD says T={given & 0x0F}, protocols T={proto}"
                )
            levels[i] = InterfaceBytes(levels[i].ta, levels[i].tb, levels[i].tc, proto)
    fixed: list[InterfaceBytes] = []
    for i, lvl in enumerate(levels):
        for name in ("ta", "tb", "tc", "td"):
            _check_byte(getattr(lvl, name), f"{name.upper()}{i + 1}")
        if i + 1 < len(levels):
            if lvl.td is None:
                raise EncodeError(f"level {i + 1} needs TD{i + 1} since level {i + 2} follows")
            td: int | None = (levels[i + 1].presence << 4) | (lvl.td & 0x0F)
        else:
            td = None if lvl.td is None else lvl.td & 0x0F
        fixed.append(InterfaceBytes(lvl.ta, lvl.tb, lvl.tc, td))
    first = fixed[0].presence if fixed else 0
    t0 = (first << 4) | len(historical)
    atr = Atr(ts, t0, tuple(lvl for lvl in fixed if lvl.presence), bytes(historical), None)
    body = atr.encode()
    if _tck_required(fixed):
        atr = Atr(ts, t0, atr.interface, atr.historical, compute_tck(body))
    if len(atr.encode()) > MAX_ATR_LENGTH:
        raise EncodeError(f"ATR of {len(atr.encode())} bytes exceeds {MAX_ATR_LENGTH}")
    return atr


def qemu_accepts(atr: bytes) -> str | None:
    """None when QEMU 7.2's ccid-card-passthru accepts this ATR, else QEMU's reason.

    Facts from QEMU ``hw/usb/ccid-card-passthru.c`` (the VSC_ATR handler and its ATR
    check), reproduced including their quirks:

    * a payload over 40 bytes is refused ("ATR size exceeds spec");
    * under 2 bytes is refused; TS must be 3B or 3F;
    * interface bytes are counted for at most two TD levels; the "next Y" is read
      from the byte *after* TDi (not TDi itself), and while no TD is seen the same
      Y nibble is counted again on the second round;
    * the ATR is refused when shorter than 2 + K + counted interface bytes; longer
      is let through (so a TCK, or interface bytes QEMU missed, are fine).
    """
    n = len(atr)
    if n > QEMU_MAX_ATR_LENGTH:
        return f"ATR size {n} exceeds QEMU's maximum of {QEMU_MAX_ATR_LENGTH} bytes"
    if n < 2:
        return f"ATR of {n} bytes is shorter than TS T0"
    if atr[0] not in (TS_DIRECT, TS_INVERSE):
        return f"TS {atr[0]:02X} is not 3B or 3F"
    historical = atr[1] & 0x0F
    opt = 0
    rounds = 0
    y = atr[1] >> 4
    while y and rounds < 2 and opt + historical + 2 < n:
        rounds += 1
        opt += (y & 1) + (y >> 1 & 1) + (y >> 2 & 1)
        if y & 8:
            opt += 1
            # QEMU reads data[opt + 2]; out of range it cannot matter (the loop ends).
            y = atr[opt + 2] >> 4 if opt + 2 < n else 0
    if n < 2 + historical + opt:
        return (
            f"ATR inconsistent: {n} bytes but {historical} historical and "
            f"{opt} interface bytes announced"
        )
    return None


def _printable(data: bytes) -> bool:
    return bool(data) and all(0x20 <= b < 0x7F for b in data)


def describe_atr(atr: Atr) -> str:
    """A multi-line readable decoding of an ATR."""
    raw = atr.encode()
    lines = [f"ATR: {raw.hex(' ').upper()} ({len(raw)} bytes)"]
    lines.append(f"  TS  = {atr.ts:02X}  {atr.convention} convention")
    y1 = atr.t0 >> 4
    lines.append(
        f"  T0  = {atr.t0:02X}  Y1={y1:X}, K={atr.t0 & 0x0F} historical bytes"
    )
    protocol_context = None  # the protocol a level's bytes are for (from the previous TD)
    for i, lvl in enumerate(atr.interface, start=1):
        for name, value in (("TA", lvl.ta), ("TB", lvl.tb), ("TC", lvl.tc), ("TD", lvl.td)):
            if value is None:
                continue
            label = f"  {name}{i} = {value:02X}"
            note = ""
            if name == "TA" and i == 1:
                fi = _FI.get(value >> 4)
                di = _DI.get(value & 0x0F)
                fi_text = f"Fi={fi[0]} (fmax {fi[1]:g} MHz)" if fi else "Fi=RFU"
                note = f"{fi_text}, Di={di if di else 'RFU'}"
            elif name == "TC" and i == 1:
                note = f"extra guard time N={value}"
            elif name == "TA" and i == 2:
                note = f"specific mode, T={value & 0x0F}"
            elif name == "TC" and i == 2 and protocol_context == 0:
                note = f"T=0 waiting integer WI={value}"
            elif name == "TA" and protocol_context == 1:
                note = f"T=1 IFSC={value}"
            elif name == "TB" and protocol_context == 1:
                note = f"T=1 BWI={value >> 4}, CWI={value & 0x0F}"
            elif name == "TC" and protocol_context == 1:
                note = "T=1 error detection: " + ("CRC" if value & 1 else "LRC")
            elif name == "TD":
                note = f"T={value & 0x0F}, Y{i + 1}={value >> 4:X}"
            lines.append(f"{label}  {note}" if note else label)
        protocol_context = lvl.protocol
    if atr.ta1 is None:
        lines.append("  (TA1 absent: Fi=372, Di=1 by default)")
    lines.append("  protocols: " + ", ".join(f"T={t}" for t in sorted(atr.protocols)))
    if atr.historical:
        text = f"  historical bytes ({len(atr.historical)}): {atr.historical.hex(' ').upper()}"
        if _printable(atr.historical):
            text += f'  "{atr.historical.decode("ascii")}"'
        lines.append(text)
        category = atr.historical[0]
        if category in (0x00, 0x10, 0x80):
            kind = {0x00: "status indicator last", 0x10: "DIR data reference",
                    0x80: "compact-TLV objects"}[category]
            lines.append(f"    category indicator {category:02X}: {kind} (ISO/IEC 7816-4 8.1.1)")
    else:
        lines.append("  no historical bytes")
    if atr.tck is not None:
        lines.append(f"  TCK = {atr.tck:02X}  (checksum correct)")
    else:
        lines.append("  no TCK (only T=0 indicated)")
    reason = qemu_accepts(raw)
    lines.append("  QEMU ccid-card-passthru: " + ("accepts" if reason is None else reason))
    return "\n".join(lines)
