"""``ccidemu decode``: every --as mode through vmc.cli.main, and clear errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.ccid import (
    CcidDataBlock,
    CcidIccPowerOn,
    CcidXfrBlock,
    encode_ccid,
)
from ccidemu.vsc import VscApdu, VscAtr, VscInit, encode_vsc
from tests.codecs.test_pcap import pcap, usbmon
from vmc.cli import main

ROOT = Path(__file__).resolve().parents[2]
SESSION = ROOT / "fixtures" / "samples" / "qemu-session.hex"
H = bytes.fromhex


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["-q", "decode", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def write(tmp_path: Path, name: str, data: bytes | str) -> str:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return str(path)


def test_vsc_sample_session(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--as", "vsc", str(SESSION))
    assert rc == 0
    assert "ReaderAdd reader=0 name='vsc-test-reader'" in out
    assert "Init reader=undefined version=0.0.2" in out
    assert "protocols: T=0, T=1" in out  # the ATR payload decoded
    assert "TCK = 6A" in out
    assert "command: SELECT (00 A4 04 00) case 3S Nc=7 data=A0000000031010" in out
    assert "response: 9000 success" in out
    assert "9 VSCard messages, 201 bytes" in out


def test_vsc_auto_detect_and_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, str(SESSION))
    assert rc == 0 and "(decoding as vsc" in out and "9 VSCard messages" in out
    binary = b"".join(
        encode_vsc(m)
        for m in (VscInit(0), VscAtr(0, BuiltinTestCard.ATR),
                  VscApdu(0, H("80E2000002")), VscApdu(0, H("00019000")))
    )
    rc, out, _ = run(capsys, "--as", "vsc", write(tmp_path, "s.bin", binary))
    assert rc == 0
    assert '"ccidemu-TC"' in out
    assert "command: proprietary INS E2 (80 E2 00 00) case 2S Ne=2" in out
    assert "response: 9000 success, 2 data bytes: 0001" in out


def test_vsc_little_endian(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = encode_vsc(VscApdu(0, H("00A4040000")), "little")
    path = write(tmp_path, "le.bin", data)
    rc, out, _ = run(capsys, "--as", "vsc", "--binary", "--little-endian", path)
    assert rc == 0 and "command: SELECT (00 A4 04 00) case 2S Ne=256" in out
    rc, _, err = run(capsys, "--as", "vsc", "--binary", path)  # read big-endian: wrong
    assert rc == 1 and "decode error:" in err


def test_ccid_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = b"".join(
        encode_ccid(m)
        for m in (
            CcidIccPowerOn(0, 1),
            CcidDataBlock(0, 1, data=BuiltinTestCard.ATR),
            CcidXfrBlock(0, 2, H("00A4040008F0636369646D7501")),
            CcidDataBlock(0, 2, data=H("9000")),
        )
    )
    rc, out, _ = run(capsys, "--as", "ccid", write(tmp_path, "c.hex", stream.hex(":")))
    assert rc == 0
    assert "PC_to_RDR_XfrBlock" in out
    assert '"ccidemu-TC"' in out  # DataBlock after IccPowerOn is the ATR
    assert "command: SELECT (00 A4 04 00) case 3S Nc=8" in out
    assert "response: 9000 success" in out
    assert "4 CCID messages" in out


def test_apdu_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = """# commands, one per line
00 A4 04 00 07 A0 00 00 00 03 10 10   # case 3S
00:b0:00:00:00
00B0000000012C
"""
    rc, out, _ = run(capsys, "--as", "apdu", write(tmp_path, "a.txt", text))
    assert rc == 0
    assert "SELECT (00 A4 04 00) case 3S Nc=7" in out
    assert "READ BINARY (00 B0 00 00) case 2S Ne=256" in out
    assert "READ BINARY (00 B0 00 00) case 2E Ne=300" in out


def test_rapdu_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--as", "rapdu", write(tmp_path, "r.txt", "6110\n63C2\nAABB9000\n"))
    assert rc == 0
    assert "6110 success, 16 bytes still available (GET RESPONSE)" in out
    assert "63C2 verification failed, 2 tries left" in out
    assert "9000 success, 2 data bytes: AABB" in out


def test_atr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "atr.txt", "3B 7A 18 00 00 73 66 74 65 20 63 64 31 34 34\n")
    rc, out, _ = run(capsys, "--as", "atr", path)
    assert rc == 0 and '"sfte cd144"' in out and "Di=12" in out
    rc, _, err = run(capsys, "--as", "atr", write(tmp_path, "bad.txt", "3b810150d1"))
    assert rc == 1 and "decode error:" in err and "TCK" in err


def test_tlv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--as", "tlv", write(tmp_path, "t.txt", "7C08 8200 8104 01020304"))
    assert rc == 0
    assert out.splitlines() == [
        "7C (8 bytes, constructed)", "  82 (0 bytes): ", "  81 (4 bytes): 01020304"
    ]


def test_pcap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        usbmon("S", 3, 0x02, encode_ccid(CcidXfrBlock(0, 5, H("00CB3FFF055C035FC10500")))),
        usbmon("C", 3, 0x81, encode_ccid(CcidDataBlock(0, 5, data=H("6A82"))), ts=(2, 0)),
    ]
    path = write(tmp_path, "c.pcap", pcap(records))
    for argv in (["--as", "pcap", path], [path]):  # explicit and auto-detected
        rc, out, _ = run(capsys, *argv)
        assert rc == 0
        assert "command: GET DATA (00 CB 3F FF) case 4S Nc=5 Ne=256" in out
        assert "response: 6A82 file or application not found" in out
        assert "2 CCID messages" in out


@pytest.mark.parametrize(
    ("mode", "text", "expected"),
    [
        ("vsc", "00000007 00000000 0000000c 00a404", "VSCard"),
        ("apdu", "00A4\n", "line 1"),
        ("apdu", "00A4040002AA\n", "short Lc 2"),
        ("rapdu", "90\n", "line 1"),
        ("tlv", "5303 0102", "runs past the data"),
        ("atr", "3C00", "TS 3C"),
        ("apdu", "00 A4 04 0\n", "odd number of hex digits"),
    ],
)
def test_decode_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, text: str, expected: str
) -> None:
    rc, _, err = run(capsys, "--as", mode, "--hex", write(tmp_path, "bad.txt", text))
    assert rc == 1
    assert err.startswith("decode error:")
    assert expected in err


def test_error_offset_in_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = SESSION.read_text()
    rc, out, err = run(capsys, "--as", "vsc", write(tmp_path, "s.hex", good + "\n00000007 0000"))
    assert rc == 1
    assert "9 VSCard messages" not in out and "#9 @187" in out  # good part still printed
    assert "decode error: VSCard message #10" in err and "at byte 201" in err


def test_garbage_binary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, write(tmp_path, "g.bin", b"\xff\xfe\x00"))
    assert rc == 1 and "decode error:" in err


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["-q", "decode", str(tmp_path / "nope.hex")])
    assert rc == 1  # ConfigError, logged by the CLI root


def _vd_chunk(port: int, body: bytes) -> bytes:
    """spice-protocol vd_agent.h VDIChunkHeader (u32 port, u32 size, little-endian) + body."""
    return struct.pack("<II", port, len(body)) + body


def _vd_message(type_: int, data: bytes, opaque: int = 0) -> bytes:
    """VDAgentMessage: u32 protocol (1), u32 type, u64 opaque, u32 size, then data."""
    return struct.pack("<IIQI", 1, type_, opaque, len(data)) + data


def test_vdagent_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    announce = _vd_message(6, struct.pack("<II", 1, 0x0F))  # request=1, caps bits 0..3
    clipboard = _vd_message(4, b"hello, guest", opaque=7)
    stream = (_vd_chunk(1, announce) + _vd_chunk(2, clipboard[:10])  # split mid-header
              + _vd_chunk(2, clipboard[10:]))
    rc, out, _ = run(capsys, "--as", "vdagent", write(tmp_path, "v.bin", stream))
    assert rc == 0, out
    assert out.splitlines() == [
        "#1 @0: chunk port=CLIENT size=28",
        "    message ANNOUNCE_CAPABILITIES protocol=1 opaque=0 size=8 request=1 "
        "caps=CLIPBOARD,MONITORS_CONFIG,MOUSE_STATE,REPLY",
        "#2 @36: chunk port=SERVER size=10",
        "#3 @54: chunk port=SERVER size=22",
        "    message CLIPBOARD protocol=1 opaque=7 size=12 " + b"hello, guest".hex(),
        "3 vdagent chunks, 2 messages, 84 bytes",
    ]
    rc, out, _ = run(capsys, "--as", "vdagent", write(tmp_path, "v.hex", stream.hex()))
    assert rc == 0 and "3 vdagent chunks, 2 messages" in out


def test_vdagent_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _vd_chunk(1, _vd_message(9, b""))
    rc, out, err = run(capsys, "--as", "vdagent", write(tmp_path, "t.bin", good + good[:5]))
    assert rc == 1 and "#1 @0: chunk port=CLIENT size=20" in out
    assert "decode error: 5 bytes at the end do not complete a chunk or message (at byte 28)" \
        in err
    huge = struct.pack("<II", 1, 0x7FFFFFFF)
    rc, out, err = run(capsys, "--as", "vdagent", write(tmp_path, "h.bin", good + huge))
    assert rc == 1
    assert "vdagent chunk #2: VDIChunk length 2147483647 exceeds the cap" in err
    assert "(at byte 28)" in err
