"""ccidemu.pcap: usbmon pcap files (link types 220 and 189) and the CCID exchanges inside."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.ccid import (
    CcidDataBlock,
    CcidDirection,
    CcidIccPowerOn,
    CcidNotifySlotChange,
    CcidSlotStatus,
    CcidXfrBlock,
    CommandStatus,
    SlotState,
    SlotStatus,
    encode_ccid,
)
from ccidemu.errors import DecodeError
from ccidemu.pcap import TransferType, ccid_exchanges, ccid_records, iter_usb_packets

h = bytes.fromhex


def usbmon(
    urb_type: str, xfer: int, ep: int, data: bytes, *, length: int | None = None,
    order: str = "<", mmapped: bool = True, ts: tuple[int, int] = (1, 0), dev: int = 5,
    flag_data: bytes = b"=",
) -> bytes:
    """One pcap record with a usbmon header, QEMU-style unless told otherwise."""
    header_size = 64 if mmapped else 48
    length = len(data) if length is None else length
    hdr = struct.pack(
        order + "QBBBBHccqiiII8s", 7, ord(urb_type), xfer, ep, dev, 1, b"\0", flag_data,
        ts[0], ts[1], 0, length, len(data) + header_size, bytes(8),
    )
    if mmapped:
        hdr += struct.pack(order + "iiII", 0, 0, 0, 0)
    body = hdr + data
    return struct.pack(order + "IIII", ts[0], ts[1], len(body), header_size + length) + body


def pcap(records: list[bytes], *, order: str = "<", link: int = 220, nsec: bool = False) -> bytes:
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 4160, link) + b"".join(records)


XFR = CcidXfrBlock(0, 1, h("00a4040007a0000000031010"))
ANSWER = CcidDataBlock(0, 1, SlotStatus(), h("9000"))


def test_vector_qemu_file() -> None:
    """A file as QEMU 7.2's hw/usb/pcap.c writes it on a little-endian host."""
    data_bytes = encode_ccid(CcidXfrBlock(0, 1, h("80e2000001")))  # 15 bytes
    # pcap header: magic A1B2C3D4, v2.4, snaplen 4096+64, link type 220; one record:
    # urb id 42, 'S', bulk, ep 02 OUT, dev 5, bus 1, flag_data '=', ts 1.000016,
    # length 15, len_cap 79 (QEMU counts its 64-byte header), zero tail, then data
    wire = h(
        "d4c3b2a1 0200 0400 00000000 00000000 40100000 dc000000"
        "01000000 10000000 4f000000 4f000000"
        "2a00000000000000 53 03 02 05 0100 00 3d"
        "0100000000000000 10000000 00000000"
        "0f000000 4f000000 0000000000000000"
        "00000000 00000000 00000000 00000000"
    ) + data_bytes
    (packet,) = list(iter_usb_packets(wire))
    assert packet.urb_id == 42 and packet.urb_type == "S"
    assert packet.transfer_type is TransferType.BULK
    assert packet.endpoint == 0x02 and not packet.is_in and packet.endpoint_number == 2
    assert packet.device == 5 and packet.bus == 1
    assert packet.timestamp == pytest.approx(1.000016)
    assert packet.length == 15 and packet.data == data_bytes and not packet.truncated
    assert wire == pcap([usbmon("S", 3, 0x02, data_bytes, ts=(1, 16))]).replace(
        b"\x07" + bytes(7), b"\x2a" + bytes(7), 1
    )


def exchange_file(order: str = "<", mmapped: bool = True, link: int = 220) -> bytes:
    kw = {"order": order, "mmapped": mmapped}
    return pcap(
        [
            usbmon("S", 3, 0x02, encode_ccid(CcidIccPowerOn(0, 0)), **kw),  # type: ignore[arg-type]
            usbmon("C", 3, 0x02, b"", length=0, flag_data=b">", **kw),  # type: ignore[arg-type]
            usbmon("S", 3, 0x81, b"", length=4096, flag_data=b"<", **kw),  # type: ignore[arg-type]
            usbmon("C", 3, 0x81, encode_ccid(CcidDataBlock(0, 0, SlotStatus(), h("3b0a"))),
                   **kw),  # type: ignore[arg-type]
            usbmon("C", 1, 0x83, h("5003"), **kw),  # type: ignore[arg-type]
            usbmon("S", 3, 0x02, encode_ccid(XFR), **kw),  # type: ignore[arg-type]
            usbmon("C", 3, 0x81, encode_ccid(ANSWER), **kw),  # type: ignore[arg-type]
        ],
        order=order,
        link=link,
    )


@pytest.mark.parametrize(
    ("order", "mmapped", "link"),
    [("<", True, 220), (">", True, 220), ("<", False, 189), (">", False, 189)],
)
def test_exchanges_both_orders_and_link_types(order: str, mmapped: bool, link: int) -> None:
    exchanges = ccid_exchanges(exchange_file(order, mmapped, link))
    assert [ex.command.message for ex in exchanges] == [CcidIccPowerOn(0, 0), XFR]
    assert exchanges[0].response_data == h("3b0a")
    assert exchanges[1].apdu == XFR.data and exchanges[1].response_data == h("9000")
    assert not any(ex.truncated for ex in exchanges)
    records = ccid_records(exchange_file(order, mmapped, link))
    assert [r.direction for r in records] == [
        CcidDirection.PC_TO_RDR, CcidDirection.RDR_TO_PC, CcidDirection.INTERRUPT,
        CcidDirection.PC_TO_RDR, CcidDirection.RDR_TO_PC,
    ]
    assert records[2].message == CcidNotifySlotChange(
        (SlotState(True, True), SlotState(False), SlotState(False), SlotState(False))
    )


def test_path_source(tmp_path: Path) -> None:
    path = tmp_path / "ccid.pcap"
    path.write_bytes(exchange_file())
    assert len(ccid_exchanges(path)) == 2
    assert len(ccid_exchanges(str(path))) == 2


def test_truncated_response_at_256_bytes() -> None:
    long = CcidDataBlock(0, 2, SlotStatus(), bytes(range(256)) * 2 + h("9000"))
    wire = encode_ccid(long)
    cmd = CcidXfrBlock(0, 2, h("80e2000000"))
    file = pcap([
        usbmon("S", 3, 0x02, encode_ccid(cmd)),
        usbmon("C", 3, 0x81, wire[:256], length=len(wire)),  # QEMU keeps 256 bytes
        usbmon("S", 3, 0x02, encode_ccid(XFR)),
        usbmon("C", 3, 0x81, encode_ccid(ANSWER)),
    ])
    packets = list(iter_usb_packets(file))
    assert packets[1].truncated and packets[1].length == len(wire) and len(packets[1].data) == 256
    ex = ccid_exchanges(file)
    assert ex[0].truncated and ex[0].response is not None and ex[0].response.truncated
    assert ex[0].response_data == wire[10:256]
    assert not ex[1].truncated and ex[1].response_data == h("9000")


def test_message_split_over_transfers_and_time_extension() -> None:
    wire = encode_ccid(ANSWER)
    wait = CcidDataBlock(0, 1, SlotStatus(0, CommandStatus.TIME_EXTENSION, 1))
    file = pcap([
        usbmon("S", 3, 0x02, encode_ccid(XFR)),
        usbmon("C", 3, 0x81, encode_ccid(wait)),
        usbmon("C", 3, 0x81, wire[:7]),
        usbmon("C", 3, 0x81, wire[7:]),
    ])
    (ex,) = ccid_exchanges(file)
    assert ex.response is not None and ex.response.message == ANSWER


def test_bad_bulk_data_is_dropped_and_decoding_goes_on() -> None:
    over_long = h("6f ffffffff 00 01 000000")
    transfers = [
        encode_ccid(ANSWER) + encode_ccid(XFR),  # wrong direction: both dropped
        encode_ccid(XFR) + over_long + encode_ccid(XFR),  # the first one kept
        over_long[:4],  # half a header...
        h("00 00 00 00 00 00") + encode_ccid(XFR),  # ...completed over-long: all dropped
        h("62 01000000 00 01 00 0000 ff"),  # IccPowerOn with data: dropped
        encode_ccid(XFR),
    ]
    file = pcap([usbmon("S", 3, 0x02, t, ts=(i, 0)) for i, t in enumerate(transfers, 1)])
    records = ccid_records(file, max_length=4096)
    assert [(r.timestamp, r.message) for r in records] == [(2.0, XFR), (6.0, XFR)]


def test_unanswered_command_and_device_filter() -> None:
    file = pcap([
        usbmon("S", 3, 0x02, encode_ccid(XFR), dev=5),
        usbmon("C", 3, 0x81, encode_ccid(CcidSlotStatus(0, 9)), dev=6),
    ])
    (ex,) = ccid_exchanges(file, device=5)
    assert ex.response is None and ex.response_data is None
    assert len(ccid_records(file, device=6)) == 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (h("0a0d0d0a 1c000000 4d3c2b1a"), "pcapng"),
        (h("00112233") + bytes(20), "not a pcap"),
        (b"\xd4\xc3\xb2\xa1", "24 bytes"),
        (pcap([], link=1), "link type"),
        (pcap([usbmon("S", 3, 2, b"\x01")])[:-1], "truncated pcap record"),
        (pcap([])[:24] + h("01000000 00000000 04000000 04000000 00000000"), "shorter"),
    ],
)
def test_bad_files(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        list(iter_usb_packets(data))


def test_nanosecond_magic() -> None:
    (packet,) = list(iter_usb_packets(pcap([usbmon("S", 3, 2, b"", ts=(2, 500))], nsec=True)))
    assert packet.timestamp == pytest.approx(2.0000005)


@settings(max_examples=150)
@given(st.binary(max_size=200))
def test_garbage_after_header_raises_only_decode_error(blob: bytes) -> None:
    with contextlib.suppress(DecodeError):
        ccid_records(pcap([]) + blob)


@settings(max_examples=100)
@given(st.lists(st.binary(min_size=0, max_size=80), max_size=6))
def test_garbage_bulk_payloads_never_crash(payloads: list[bytes]) -> None:
    file = pcap([usbmon("C", 3, 0x81, p) for p in payloads])
    for record in ccid_records(file):
        assert record.direction is CcidDirection.RDR_TO_PC
