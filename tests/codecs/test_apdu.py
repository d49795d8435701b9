"""Command/response APDUs: ISO/IEC 7816-4:2013 section 5.1 (cases per ISO/IEC 7816-3:2006
section 12.1.3), command chaining (5.1.1.1), response chaining (61xx / 6Cxx)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.apdu import (
    ApduCase,
    ChainAssembler,
    ChainError,
    CommandApdu,
    InsName,
    ResponseApdu,
    describe_command,
    describe_response,
    get_response_command,
    ins_name,
    join_chain,
    parse_command,
    parse_response,
    reissue_with_le,
    split_chain,
)
from ccidemu.errors import DecodeError, EncodeError

H = bytes.fromhex

# (object, exact wire bytes, case): ISO/IEC 7816-3:2006 section 12.1.3
VECTORS = [
    pytest.param(CommandApdu(0x00, 0xA4, 0x04, 0x00), H("00A40400"), "1", id="case1"),
    pytest.param(CommandApdu(0x00, 0xB0, 0x00, 0x00, ne=8), H("00B0000008"), "2S", id="2S"),
    pytest.param(
        CommandApdu(0x00, 0xC0, 0x00, 0x00, ne=256), H("00C0000000"), "2S", id="2S-Le00=256"
    ),
    pytest.param(
        CommandApdu(0x00, 0xA4, 0x04, 0x00, H("A0000000031010")),
        H("00A4040007A0000000031010"), "3S", id="3S-select",
    ),
    pytest.param(
        CommandApdu(0x00, 0xA4, 0x04, 0x00, H("A000000308000010000100"), ne=256),
        H("00A404000BA00000030800001000010000"), "4S", id="4S-piv-select",
    ),
    pytest.param(
        CommandApdu(0x00, 0xCB, 0x3F, 0xFF, H("5C035FC105"), ne=255),
        H("00CB3FFF055C035FC105FF"), "4S", id="4S-Le-FF",
    ),
    pytest.param(
        CommandApdu(0x00, 0xB0, 0x00, 0x00, ne=0x1234), H("00B00000001234"), "2E", id="2E"
    ),
    pytest.param(
        CommandApdu(0x00, 0xB0, 0x00, 0x00, ne=65536), H("00B00000000000"), "2E",
        id="2E-Le0000=65536",
    ),
    pytest.param(
        CommandApdu(0x00, 0xB0, 0x00, 0x00, ne=257), H("00B00000000101"), "2E", id="2E-257"
    ),
    pytest.param(
        CommandApdu(0x00, 0xD6, 0x00, 0x00, bytes(300)),
        H("00D6000000012C") + bytes(300), "3E", id="3E",
    ),
    pytest.param(
        CommandApdu(0x00, 0x2A, 0x9E, 0x9A, bytes(256), ne=65536),
        H("002A9E9A000100") + bytes(256) + H("0000"), "4E", id="4E-Le0000",
    ),
    pytest.param(
        CommandApdu(0x00, 0x87, 0x07, 0x9A, H("7C00"), ne=0x200),
        H("008707 9A 000002 7C00 0200"), "4E", id="4E-big-Le",
    ),
    pytest.param(
        CommandApdu(0x80, 0xE0, 0x00, 0x00, H("0102"), ne=1, extended=True),
        H("80E00000 000002 0102 0001"), "4E", id="4E-forced-extended",
    ),
]


@pytest.mark.parametrize(("cmd", "wire", "case"), VECTORS)
def test_command_vectors(cmd: CommandApdu, wire: bytes, case: str) -> None:
    assert cmd.encode() == wire
    parsed = parse_command(wire)
    assert parsed == cmd
    assert parsed.case == ApduCase(case) == case
    assert parsed.encode() == wire
    assert parsed.nc == len(cmd.data)


def test_case4_without_le_is_case3() -> None:
    # Some hosts drop Le from a case 4 command: on the wire that is exactly case 3.
    cmd = parse_command(H("00A4040007A0000000031010"))
    assert cmd.case == "3S" and cmd.ne == 0 and cmd.nc == 7


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"", id="empty"),
        pytest.param(H("00A404"), id="short-header"),
        pytest.param(H("00A4040000FF"), id="short-Lc00"),  # 6 bytes: Lc=00
        pytest.param(H("00A4040002AA"), id="3S-truncated"),
        pytest.param(H("00A4040002AABBCCDD"), id="3S-trailing-bytes"),
        pytest.param(H("00B00000 0001"), id="2E-truncated"),
        pytest.param(H("00D60000 000000 AA"), id="3E-Lc0000"),
        pytest.param(H("00D60000 000003 AABB"), id="3E-truncated"),
        pytest.param(H("00D60000 000001 AA 00"), id="4E-one-byte-Le"),
        pytest.param(H("00D60000 000001 AA 000000"), id="4E-trailing"),
    ],
)
def test_malformed_commands(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_command(wire)


def test_lc00_error_names_offset() -> None:
    with pytest.raises(DecodeError) as info:
        parse_command(H("00A4040000FF"))
    assert info.value.offset == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cla": 0x100, "ins": 0, "p1": 0, "p2": 0},
        {"cla": 0, "ins": -1, "p1": 0, "p2": 0},
        {"cla": 0, "ins": 0, "p1": 0, "p2": 0, "data": bytes(65536)},
        {"cla": 0, "ins": 0, "p1": 0, "p2": 0, "ne": 65537},
        {"cla": 0, "ins": 0, "p1": 0, "p2": 0, "ne": 257, "extended": False},
        {"cla": 0, "ins": 0, "p1": 0, "p2": 0, "data": bytes(256), "extended": False},
    ],
)
def test_unencodable_commands(kwargs: dict[str, object]) -> None:
    with pytest.raises(EncodeError):
        CommandApdu(**kwargs)  # type: ignore[arg-type]


def test_response_apdu() -> None:
    rsp = parse_response(H("0102 9000"))
    assert rsp == ResponseApdu(H("0102"), 0x9000)
    assert (rsp.sw1, rsp.sw2) == (0x90, 0x00)
    assert rsp.encode() == H("01029000")
    assert parse_response(H("6A82")) == ResponseApdu(b"", 0x6A82)
    for bad in (b"", b"\x90"):
        with pytest.raises(DecodeError):
            parse_response(bad)


# --- command chaining (ISO/IEC 7816-4:2013 section 5.1.1.1) ----------------------------


def test_split_chain_vectors() -> None:
    cmd = CommandApdu(0x00, 0xDB, 0x3F, 0xFF, bytes(range(256)) * 2 + b"xyz", ne=256)
    links = split_chain(cmd)
    assert [link.encode()[:5] for link in links] == [
        H("10DB3FFFFF"), H("10DB3FFFFF"), H("00DB3FFF05"),
    ]
    assert [link.ne for link in links] == [0, 0, 256]
    assert links[-1].encode()[-1] == 0x00  # Le 00 on the last link only
    assert join_chain(links) == cmd
    assert split_chain(CommandApdu(0, 0xA4, 4, 0, b"ab")) == [CommandApdu(0, 0xA4, 4, 0, b"ab")]
    with pytest.raises(EncodeError):
        split_chain(CommandApdu(0x10, 0xDB, 0, 0, bytes(300)))


def test_chain_assembler() -> None:
    asm = ChainAssembler()
    plain = CommandApdu(0x00, 0xA4, 4, 0, b"x")
    assert asm.feed(plain) is plain
    assert asm.feed(CommandApdu(0x10, 0x87, 0x07, 0x9A, b"ab")) is None
    assert asm.pending
    assert asm.feed(CommandApdu(0x10, 0x87, 0x07, 0x9A, b"cd")) is None
    joined = asm.feed(CommandApdu(0x00, 0x87, 0x07, 0x9A, b"ef", ne=256))
    assert joined == CommandApdu(0x00, 0x87, 0x07, 0x9A, b"abcdef", ne=256)
    assert not asm.pending


def test_chain_assembler_rejects_mismatch() -> None:
    asm = ChainAssembler()
    asm.feed(CommandApdu(0x10, 0x87, 0x07, 0x9A, b"ab"))
    with pytest.raises(ChainError) as info:
        asm.feed(CommandApdu(0x00, 0x87, 0x07, 0x9C, b"cd"))
    assert info.value.sw == 0x6883
    assert isinstance(info.value, DecodeError)
    assert not asm.pending  # the broken chain is dropped


def test_chain_assembler_cap() -> None:
    asm = ChainAssembler(max_length=300)
    asm.feed(CommandApdu(0x10, 0xDB, 0x3F, 0xFF, bytes(255)))
    with pytest.raises(ChainError) as info:
        asm.feed(CommandApdu(0x10, 0xDB, 0x3F, 0xFF, bytes(255)))
    assert info.value.sw == 0x6700


def test_chain_cap_is_the_largest_extended_nc() -> None:
    # 300 x 255 + 1 bytes cannot make one command: 6700, not an EncodeError
    links = split_chain(CommandApdu(0, 0xDB, 0x3F, 0xFF, bytes(65535)))
    too_long = [CommandApdu(0x10, 0xDB, 0x3F, 0xFF, bytes(255))] * 300
    with pytest.raises(ChainError) as info:
        join_chain([*too_long, CommandApdu(0, 0xDB, 0x3F, 0xFF, b"x")])
    assert info.value.sw == 0x6700
    assert join_chain(links).nc == 65535
    asm = ChainAssembler(max_length=1 << 20)
    assert asm.feed(CommandApdu(0x10, 0xDB, 0, 0, bytes(65535))) is None
    with pytest.raises(ChainError):
        asm.feed(CommandApdu(0, 0xDB, 0, 0, b"x"))


def test_chain_keeps_the_extended_form() -> None:
    # a chain of extended links asks for an extended answer (Ne absent = 65536)
    links = [parse_command(H("10DB3FFF0000026162")), parse_command(H("00DB3FFF0000026364"))]
    joined = join_chain(links)
    assert joined.extended is True and joined.data == b"abcd"
    short = join_chain([parse_command(H("10DB3FFF026162")), parse_command(H("00DB3FFF0163"))])
    assert short.extended is None  # short links leave the form open, as before
    big = join_chain(split_chain(CommandApdu(0, 0xDB, 0, 0, bytes(300), ne=256)))
    assert big.extended is None and big.is_extended  # no EncodeError from extended=False


def test_join_chain_errors() -> None:
    with pytest.raises(ChainError):
        join_chain([CommandApdu(0x10, 0xDB, 0, 0, b"a")])
    with pytest.raises(ChainError):
        join_chain([])
    with pytest.raises(ChainError):
        join_chain([CommandApdu(0, 0xDB, 0, 0, b"a"), CommandApdu(0, 0xDB, 0, 0, b"b")])


# --- response chaining -------------------------------------------------------------------


def test_get_response_and_reissue() -> None:
    assert get_response_command(0x10).encode() == H("00C0000010")
    assert get_response_command(0x00).encode() == H("00C0000000")  # 6100: ask for 256
    assert get_response_command(0x05, cla=0x80).encode() == H("80C0000005")
    cmd = CommandApdu(0x00, 0xCB, 0x3F, 0xFF, H("5C035FC105"), ne=256)
    assert reissue_with_le(cmd, 0x08).encode() == H("00CB3FFF055C035FC10508")


def test_names_and_descriptions() -> None:
    assert ins_name(0xA4) == "SELECT"
    assert ins_name(InsName.GENERAL_AUTHENTICATE_ODD) == "GENERAL AUTHENTICATE"
    assert ins_name(0x47) == "GENERATE ASYMMETRIC KEY PAIR"
    assert ins_name(0xCB) == "GET DATA"
    assert ins_name(0x2C) == "RESET RETRY COUNTER"
    assert ins_name(0x99) == "INS 99"
    text = describe_command(parse_command(H("00A404000BA00000030800001000010000")))
    assert text == (
        "SELECT (00 A4 04 00) case 4S Nc=11 Ne=256 data=A000000308000010000100"
    )
    assert describe_command(CommandApdu(0x80, 0xE2, 0, 0, ne=2)).startswith(
        "proprietary INS E2 (80 E2 00 00)"
    )
    assert "[chained]" in describe_command(CommandApdu(0x10, 0xDB, 0x3F, 0xFF, b"a"))
    assert describe_response(parse_response(H("63C2"))) == "63C2 verification failed, 2 tries left"
    assert describe_response(parse_response(H("AB9000"))) == "9000 success, 1 data bytes: AB"


# --- properties ---------------------------------------------------------------------------

commands = st.builds(
    CommandApdu,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.one_of(st.binary(max_size=300), st.binary(min_size=250, max_size=600)),
    st.one_of(st.just(0), st.integers(1, 256), st.integers(1, 65536)),
    st.sampled_from([None, True]),
)


@settings(max_examples=200)
@given(commands)
def test_round_trip(cmd: CommandApdu) -> None:
    wire = cmd.encode()
    parsed = parse_command(wire)
    assert parsed == cmd
    assert parsed.case == cmd.case
    assert parsed.encode() == wire


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_garbage_raises_only_decode_error(data: bytes) -> None:
    try:
        cmd = parse_command(data)
    except DecodeError:
        return
    assert cmd.encode() == data  # whatever parses re-encodes to the same bytes
    # the fast constructor in parse_command only builds what __init__ would accept
    assert CommandApdu(cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data, cmd.ne, cmd.extended) == cmd


@settings(max_examples=100)
@given(commands, st.integers(1, 300))
def test_split_join_round_trip(cmd: CommandApdu, max_nc: int) -> None:
    if cmd.cla & 0x10:
        cmd = CommandApdu(cmd.cla & ~0x10, cmd.ins, cmd.p1, cmd.p2, cmd.data, cmd.ne)
    links = split_chain(cmd, max_nc)
    assert all(link.nc <= max_nc for link in links)
    assert all(link.chained for link in links[:-1]) and not links[-1].chained
    assert join_chain(links) == cmd
