"""ccidemu.pcap: pcapng (SHB/IDB/EPB/SPB, both byte orders, if_tsresol), streaming reads."""

from __future__ import annotations

import contextlib
import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.ccid import CcidDataBlock, CcidXfrBlock, SlotStatus, encode_ccid
from ccidemu.errors import DecodeError
from ccidemu.pcap import ccid_exchanges, iter_usb_packets, pair_exchanges
from tests.codecs.test_pcap import exchange_file, pcap, usbmon

h = bytes.fromhex


def _block(order: str, kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack(order + "II", kind, total) + body + struct.pack(order + "I", total)


def _usbmon_body(record: bytes) -> tuple[int, int, bytes]:
    """(ts_sec, ts_usec, usbmon bytes) of one classic pcap record from test_pcap.usbmon."""
    sec, usec, incl, _ = struct.unpack_from("<IIII", record)
    return sec, usec, record[16 : 16 + incl]


def pcapng(records: list[bytes], *, order: str = "<", link: int = 220, tsresol: int | None = None,
           simple: bool = False) -> bytes:
    shb = _block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    options = b""
    if tsresol is not None:
        options = struct.pack(order + "HH", 9, 1) + bytes([tsresol, 0, 0, 0]) + bytes(4)
    idb = _block(order, 1, struct.pack(order + "HHI", link, 0, 0) + options)
    out = shb + idb
    for record in records:
        sec, usec, body = _usbmon_body(record)
        if simple:
            out += _block(order, 3, struct.pack(order + "I", len(body)) + body)
            continue
        unit = 10 ** (tsresol or 6)
        stamp = sec * unit + usec * unit // 1_000_000
        out += _block(order, 6, struct.pack(order + "IIIII", 0, stamp >> 32, stamp & 0xFFFFFFFF,
                                            len(body), len(body)) + body)
    return out


XFR = CcidXfrBlock(0, 1, h("00a4040007a0000000031010"))
ANSWER = CcidDataBlock(0, 1, SlotStatus(), h("9000"))
RECORDS = [usbmon("S", 3, 0x02, encode_ccid(XFR), ts=(5, 250)),
           usbmon("C", 3, 0x81, encode_ccid(ANSWER), ts=(5, 900))]


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("tsresol", [None, 9])
def test_pcapng_exchanges(order: str, tsresol: int | None) -> None:
    records = [usbmon("S", 3, 0x02, encode_ccid(XFR), ts=(5, 250), order=order),
               usbmon("C", 3, 0x81, encode_ccid(ANSWER), ts=(5, 900), order=order)]
    # usbmon() writes its pcap record header little-endian only when order is "<"
    fixed = [struct.pack("<IIII", *struct.unpack(order + "IIII", r[:16])) + r[16:]
             for r in records]
    data = pcapng(fixed, order=order, tsresol=tsresol)
    packets = list(iter_usb_packets(data))
    assert [p.timestamp for p in packets] == [pytest.approx(5.00025), pytest.approx(5.0009)]
    (ex,) = ccid_exchanges(data)
    assert ex.apdu == XFR.data and ex.response_data == h("9000")


def test_simple_packet_blocks_and_classic_agree() -> None:
    assert [ex.apdu for ex in ccid_exchanges(pcapng(RECORDS, simple=True))] == [XFR.data]
    assert ccid_exchanges(exchange_file())[1].apdu == XFR.data


def test_non_usbmon_interface_is_reported() -> None:
    bad: list[tuple[str, str]] = []
    assert list(iter_usb_packets(pcapng(RECORDS, link=1), on_bad=lambda *a: bad.append(a))) == []
    assert "link type 1" in bad[0][1]


@pytest.mark.parametrize(("data", "match"), [
    (pcapng(RECORDS)[:-3], "ends inside a block"),
    (_block("<", 1, bytes(16)), "not a pcap or pcapng"),
    (pcapng(RECORDS)[:8] + h("00112233"), "byte-order magic"),
])
def test_bad_pcapng(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        list(iter_usb_packets(data))


def test_reads_from_an_open_stream_in_pieces() -> None:
    data = pcap(RECORDS * 3)

    class Trickle(io.RawIOBase):
        pos = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            out = data[self.pos : self.pos + min(n, 3) if n > 0 else self.pos + 3]
            self.pos += len(out)
            return out

    got = list(iter_usb_packets(Trickle()))  # type: ignore[arg-type]
    assert got == list(iter_usb_packets(data))


def test_pairing_window_gives_up_on_unanswered_commands() -> None:
    from ccidemu.ccid import CcidDirection
    from ccidemu.pcap import CcidRecord

    def cmd(seq: int) -> CcidRecord:
        return CcidRecord(0.0, CcidDirection.PC_TO_RDR, CcidXfrBlock(0, seq, b"\x00\xa4\x00\x00"))

    def rsp(seq: int) -> CcidRecord:
        return CcidRecord(0.0, CcidDirection.RDR_TO_PC, CcidDataBlock(0, seq, SlotStatus(),
                                                                      b"\x90\x00"))
    stream = [cmd(0)] + [x for s in range(1, 6) for x in (cmd(s), rsp(s))]
    out = list(pair_exchanges(stream, window=2))
    assert [(e.command.message.seq, e.response is None) for e in out] == [  # type: ignore[union-attr]
        (0, True), (1, False), (2, False), (3, False), (4, False), (5, False)]
    # a reused slot and seq: the first command was never answered
    out = list(pair_exchanges([cmd(7), cmd(7), rsp(7)]))
    assert [e.response is None for e in out] == [True, False]


@settings(max_examples=150)
@given(st.binary(max_size=300))
def test_garbage_pcapng_raises_only_decode_error(blob: bytes) -> None:
    with contextlib.suppress(DecodeError):
        list(iter_usb_packets(pcapng([])[:28] + blob))
    with contextlib.suppress(DecodeError):
        list(iter_usb_packets(b"\x0a\x0d\x0d\x0a" + blob))
