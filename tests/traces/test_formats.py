# ruff: noqa: W291, E501  (the vectors keep the tools' trailing spaces and long lines)
"""Importers and exporters (ccidemu.traces.formats): vectors in each tool's layout, sniffing,
round trips, garbage raises only our error, chunked reading changes nothing.

The real tools make their own traces in tests/pcscd/test_traces_real.py and
tests/e2e/test_qemu_traces.py; these vectors pin the parsing rules line by line.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.traces import Exchange, PowerEvent, PowerKind, Problems, TraceFormatError
from ccidemu.traces.formats import IMPORTERS, export_lines, open_import, sniff
from ccidemu.traces.model import TraceHeader

H = bytes.fromhex
SELECT = H("00A4040009A00000030800001000")
SELECT_ANSWER = H("61114F0600001000010079074F05A0000003089000")

SPY_RAW = """\
7F01@>|1700000000|100000|SCardConnect
7F01@0x2BDE8B46
7F01@Virtual PCD 00 00
7F01@0x00000002
7F01@0x00000003
7F01@0x00000000
7F01@0x1A1A1A1A1A1A1A1A
7F01@0x2641E0E6
7F01@0x00000002
7F01@<|1700000000|100100|SCardConnect|Command successful.|0x00000000
7F01@>|1700000000|200000|SCardTransmit
7F01@0x2641E0E6
7F01@0x00000002
7F01@0x00000010
7F01@0x0000000E
7F01@00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 
7F01@0x00000001
7F01@0x00000010
7F01@0x00000015
7F01@61 11 4F 06 00 00 10 00 01 00 79 07 4F 05 A0 00 00 03 08 90 00 
7F01@<|1700000000|200500|SCardTransmit|Command successful.|0x00000000
7F01@>|1700000000|300000|SCardDisconnect
7F01@0x2641E0E6
7F01@0x00000002
7F01@<|1700000000|300010|SCardDisconnect|Command successful.|0x00000000
"""

SPY_TEXT = """\
SCardConnect
 i hContext: 0x2BDE8B46
 i szReader Virtual PCD 00 00
 i dwShareMode: SCARD_SHARE_SHARED (0x00000002)
 i dwPreferredProtocols: 0x00000003 (T=0, T=1)
 i phCard 0x00000000 (0)
 i pdwActiveProtocol 0x1A1A1A1A1A1A1A1A (1880844493789993498)
 o phCard 0x2641E0E6 (641851622)
 o dwActiveProtocol: T=1 (0x00000002)
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [0.000073]
SCardTransmit
 i hCard: 0x2641E0E6
 i pioSendPci.dwProtocol: 0x00000002
 i pioSendPci.cbPciLength: 0x00000010
 i bSendLength 0x0000000E (14)
 i bSendBuffer
 i  0000 00 A4 04 00 09 A0 00 00 03 08 00 00 10 00       ..............
 o pioRecvPci.dwProtocol: 0x00000001
 o pioRecvPci.cbPciLength: 0x00000010
 o bRecvLength 0x00000015 (21)
 o bRecvBuffer
 o  0000 61 11 4F 06 00 00 10 00 01 00 79 07 4F 05 A0 00 a.O.......y.O...
 o  0010 00 03 08 90 00                                  .....
 => Command successful. (SCARD_S_SUCCESS [0x00000000])  [0.000500]
"""

PCSCD = """\
00000001 winscard.c:258:SCardConnect() Attempting Connect to Virtual PCD 00 00 using protocol: 3
00000002 eventhandler.c:423:EHStatusHandlerThread() Card inserted into Virtual PCD 00 00
00000006 Card ATR: 3B 0A 63 63 69 64 65 6D 75 2D 54 43 
00000005 APDU: 00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 
00000500 SW: 61 11 4F 06 00 00 10 00 01 00 79 07 4F 05 A0 00 00 03 08 90 00 
00000138 eventhandler.c:358:EHStatusHandlerThread() Card Removed From Virtual PCD 00 00
"""

OPENSC = """\
P:1; T:0x14 19:42:17.800 [opensc-tool] card.c:1234:match_atr_table: ATR     : 3b:0a:63:63:69:64:65:6d:75:2d:54:43
P:1; T:0x14 19:42:17.803 [opensc-tool] reader-pcsc.c:325:pcsc_transmit: reader 'Virtual PCD 00 00'
P:1; T:0x14 19:42:17.803 [opensc-tool] reader-pcsc.c:326:pcsc_transmit: 
Outgoing APDU (14 bytes):
00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 ..............

P:1; T:0x14 19:42:17.808 [opensc-tool] reader-pcsc.c:335:pcsc_transmit: 
Incoming APDU (21 bytes):
61 11 4F 06 00 00 10 00 01 00 79 07 4F 05 A0 00 a.O.......y.O...
00 03 08 90 00 .....

"""

APDU4J = """\
# ATR: 3B0A63636964656D752D5443
# PROTOCOL: T=1
#
00A4040009A00000030800001000
# 5ms
61114F0600001000010079074F05A00000030890 00
00B0000000
# 3ms Transmit failed
"""

SCRIPTOR_SCRIPT = """\
# select PIV
reset
00 A4 04 00 09 A0 00 00 \\
03 08 00 00 10 00
00B0000000
exit
80 E0 00 00 01 AA
"""

SCRIPTOR_TRANSCRIPT = """\
Using T=1 protocol
> 00 A4 04 00 09 A0 00 00 03 08 00 00 10 00
< 61 11 4F 06 00 00 10 00 01 00 79 07 4F 05 A0 00 
00 03 08 90 00 : Normal processing.
> 00 CB 3F FF 03 5C 01 7E 00
< 6A 82 : File not found.
"""


def _import(text: str, format: str | None = None, strict: bool = True
            ) -> tuple[TraceHeader, list[Exchange | PowerEvent], Problems]:
    imported = open_import(io.BytesIO(text.encode()), format, strict=strict, name="f")
    return imported.header, list(imported.records), imported.problems


def exchanges(items: list[Exchange | PowerEvent]) -> list[tuple[bytes, bytes]]:
    return [(r.command, r.response) for r in items if isinstance(r, Exchange)]


@pytest.mark.parametrize(("text", "format"), [
    (SPY_RAW, "pcsc-spy"), (SPY_TEXT, "pcsc-spy"), (PCSCD, "pcscd"), (OPENSC, "opensc"),
    (APDU4J, "apdu4j"), (SCRIPTOR_TRANSCRIPT, "scriptor"),
])
def test_select_exchange_in_every_format(text: str, format: str) -> None:
    assert sniff(text.encode()) == format
    _header, items, _ = _import(text)
    assert exchanges(items)[0] == (SELECT, SELECT_ANSWER)
    first = next(r for r in items if isinstance(r, Exchange))
    if format in ("pcsc-spy", "pcscd", "opensc"):
        assert first.reader == "Virtual PCD 00 00"
    if format in ("pcscd", "pcsc-spy") and text is not SPY_TEXT:
        assert first.duration == pytest.approx(0.0005)


def test_pcsc_spy_raw_times_and_power() -> None:
    header, items, _ = _import(SPY_RAW)
    assert header.start == pytest.approx(1700000000.1)
    ex, off = items
    assert isinstance(ex, Exchange) and ex.t == pytest.approx(0.1)
    assert isinstance(off, PowerEvent) and off.t == pytest.approx(0.2)
    assert (off.kind, off.reader) == (PowerKind.OFF, "Virtual PCD 00 00")


def test_pcscd_insert_and_remove() -> None:
    _, items, _ = _import(PCSCD)
    first = items[0]
    assert isinstance(first, PowerEvent) and first.t == pytest.approx(9e-6)
    assert (first.kind, first.reader, first.atr) == (
        PowerKind.INSERT, "Virtual PCD 00 00", H("3B0A63636964656D752D5443"))
    assert isinstance(items[-1], PowerEvent) and items[-1].kind is PowerKind.REMOVE


def test_opensc_time_of_day_and_atr() -> None:
    _, items, _ = _import(OPENSC)
    assert isinstance(items[0], PowerEvent) and items[0].atr == H("3B0A63636964656D752D5443")
    ex = items[1]
    assert isinstance(ex, Exchange)
    assert ex.t == pytest.approx(0.003) and ex.duration == pytest.approx(0.005)


def test_apdu4j_header_durations_and_failure() -> None:
    header, items, _ = _import(APDU4J)
    assert header.atr == H("3B0A63636964656D752D5443") and header.protocol == "T=1"
    ok, failed = items
    assert isinstance(ok, Exchange) and ok.duration == 0.005
    assert failed == Exchange(H("00B0000000"), b"", t=0.005, duration=0.003,
                              error="Transmit failed")


def test_scriptor_script_commands_reset_exit() -> None:
    assert sniff(SCRIPTOR_SCRIPT.encode()) == "scriptor"
    _, items, _ = _import(SCRIPTOR_SCRIPT)
    assert items == [PowerEvent(PowerKind.RESET), Exchange(SELECT, b""),
                     Exchange(H("00B0000000"), b"")]  # nothing after exit


@pytest.mark.parametrize(("format", "text", "where"), [
    ("pcscd", PCSCD.replace("SW: 61 11", "SW: 6Z 11"), "f:5"),
    ("opensc", OPENSC.replace("(21 bytes)", "(29 bytes)"), "f:8"),
    ("apdu4j", APDU4J.replace("00B0000000", "00B000000"), "f:7"),
    ("scriptor", SCRIPTOR_SCRIPT.replace("00B0000000", "00B0 GG"), "f:5"),
    ("pcsc-spy", SPY_RAW.replace("7F01@00 A4 04 00 09", "7F01@00 Q4 04 00 09"), "f:11"),
    ("pcsc-spy", SPY_TEXT.replace(" i  0000 00 A4", " i  0000 00"), "f:11"),
])
def test_malformed_reported_with_position(format: str, text: str, where: str) -> None:
    with pytest.raises(TraceFormatError) as info:
        _import(text, format, strict=True)
    assert info.value.position == where
    _, _items, problems = _import(text, format, strict=False)
    assert problems.count >= 1 and problems.first[0].position == where


def _trickle(blob: bytes) -> io.RawIOBase:
    class Trickle(io.RawIOBase):
        pos = 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, offset: int, whence: int = 0) -> int:
            self.pos = offset
            return offset

        def read(self, n: int = -1) -> bytes:
            size = 1 + (self.pos * 7919) % 11
            out = blob[self.pos : self.pos + (min(size, n) if n > 0 else size)]
            self.pos += len(out)
            return out

    return Trickle()


@pytest.mark.parametrize("text", [SPY_RAW, SPY_TEXT, PCSCD, OPENSC, APDU4J, SCRIPTOR_SCRIPT,
                                  SCRIPTOR_TRANSCRIPT])
def test_chunked_reading_changes_nothing(text: str) -> None:
    whole = _import(text)
    imported = open_import(_trickle(text.encode()), None, name="f")  # type: ignore[arg-type]
    assert (imported.header, list(imported.records)) == whole[:2]


exchange_lists = st.lists(
    st.builds(Exchange, st.binary(min_size=4, max_size=40), st.binary(min_size=2, max_size=60),
              duration=st.integers(0, 5000).map(lambda ms: ms / 1000)), max_size=10)


@settings(max_examples=100, deadline=None)
@given(exchange_lists, st.sampled_from(["apdu4j", "scriptor", "ccidemu"]))
def test_export_import_round_trip(items: list[Exchange], format: str) -> None:
    header = TraceHeader(source="test", atr=H("3B0A63636964656D752D5443"))
    text = "\n".join(export_lines(format, header, items)) + "\n"
    got_header, got, _ = _import(text, format)
    assert exchanges(got) == [(e.command, e.response) for e in items]
    if format != "scriptor":
        assert got_header.atr == header.atr
    if format == "apdu4j":
        assert [e.duration for e in got if isinstance(e, Exchange)] == [
            e.duration for e in items]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(IMPORTERS)), st.binary(max_size=400) | st.text(max_size=400).map(
    str.encode))
def test_garbage_raises_only_our_error(format: str, blob: bytes) -> None:
    with contextlib.suppress(TraceFormatError):
        _import(blob.decode("utf-8", "replace") if format != "usbmon" else "", format)
    imported = open_import(io.BytesIO(blob), format, strict=False, name="g")
    list(imported.records)  # non-strict: never raises


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([SPY_RAW, SPY_TEXT, PCSCD, OPENSC, APDU4J, SCRIPTOR_TRANSCRIPT]),
       st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_mutated_real_layouts_raise_only_our_error(text: str, at: int, junk: bytes) -> None:
    blob = text.encode()
    at %= len(blob)
    mutated = blob[:at] + junk + blob[at + len(junk):]
    fmt = sniff(blob)
    with contextlib.suppress(TraceFormatError):
        imported = open_import(io.BytesIO(mutated), fmt, strict=True, name="m")
        list(imported.records)


def _lines(items: Iterator[str]) -> list[str]:
    return list(items)


def test_scriptor_export_skips_redacted_and_marks_resets() -> None:
    items: list[Exchange | PowerEvent] = [
             Exchange(H("0020008008"), H("9000"), command_redacted=True),
             PowerEvent(PowerKind.RESET), Exchange(SELECT, SELECT_ANSWER)]
    lines = _lines(export_lines("scriptor", TraceHeader(source="t"), items))
    assert "00 20 00 80 08" not in lines and "reset" in lines
    assert lines[-2:] == [" ".join(f"{b:02X}" for b in SELECT),
                          "# < " + " ".join(f"{b:02X}" for b in SELECT_ANSWER)]
