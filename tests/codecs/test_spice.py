"""The SPICE client engine (ccidemu.spice) against spice-protocol and spice-server.

Vectors are written out by hand from spice-protocol ``spice/protocol.h`` and ``spice/enums.h``
(layouts, little-endian, packed) and spice-common ``spice.proto`` (bodies); the ones marked
"QEMU 7.2" are bytes captured from Debian's QEMU 7.2 / libspice-server 0.15.1 (docs/PROTOCOL.md,
"SPICE").  Paired tests run the engine against tests/spice_fake.py, an independent server.
"""

from __future__ import annotations

import struct

import construct
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu import spice
from ccidemu.card import BuiltinTestCard
from ccidemu.errors import ConfigError, DecodeError, EncodeError
from ccidemu.spice import (
    Ack,
    AckSync,
    AttachChannels,
    ChannelClosed,
    ChannelMessage,
    ChannelReady,
    ChannelsList,
    ClientDisconnecting,
    Disconnecting,
    LinkMess,
    LinkReply,
    LinkResult,
    MainInit,
    Migrate,
    Notify,
    OpenSmartcardChannel,
    Ping,
    Pong,
    ServerNotice,
    SessionClosed,
    SetAck,
    SmartcardData,
    SmartcardReady,
    SpiceChannelConnection,
    SpiceChannelType,
    SpiceError,
    SpiceFailure,
    SpiceLinkErr,
    SpiceMessage,
    SpiceMsg,
    SpiceMsgMain,
    SpiceNotAServerError,
    SpiceProtocolError,
    SpiceSmartcardClient,
    SpiceStream,
    VscData,
    WaitForChannels,
    caps_from_bits,
    caps_to_words,
    decode_link_mess,
    decode_server_message,
    encode_client_message,
    encode_data_header,
    encode_link_mess,
    encode_link_reply,
    encode_server_message,
    encrypt_ticket,
    has_cap,
)
from tests.spice_fake import (
    FakeServerConnection,
    FakeSpiceServer,
    decrypt_ticket,
    link_reply,
    public_der,
    server_key,
)
from vmc.session import PowerOn, Transmit, VscSession

H = bytes.fromhex
MAIN = SpiceChannelType.MAIN
SMARTCARD = SpiceChannelType.SMARTCARD

# protocol.h SpiceLinkHeader ("REDQ", 2, 2, size 22) + SpiceLinkMess (connection 0, channel
# type 1 id 0, 1 common cap word, 0 channel words, caps at offset 18) + common caps 0x0b
# (PROTOCOL_AUTH_SELECTION | AUTH_SPICE | MINI_HEADER).
MAIN_LINK = H("52454451 02000000 02000000 16000000"
              "00000000 01 00 01000000 00000000 12000000 0b000000")
# The smartcard channel of session 0x17da8aeb (type 8).
SMARTCARD_LINK = H("52454451 02000000 02000000 16000000"
                   "eb8ada17 08 00 01000000 00000000 12000000 0b000000")

# QEMU 7.2: the main channel's link reply (size 0xba = 178 + 2 words; error 0; a DER RSA key;
# 1 common word 0x0b, 1 channel word 0x0f = every SPICE_MAIN_CAP; caps at offset 0xb2 = 178).
QEMU_PUBKEY = H(
    "30819f300d06092a864886f70d010101050003818d0030818902818100ce97018ec812dbff4d03e570beb18a"
    "f6e19a2c51c206e6d65208169607c9dba8c53404514f03c2682d9e12f2d68dec33de62157a1abb0e62b4e28b"
    "2ef5960cd2303a2cd53be43f66b54712af604cf79c64a7b257a704924328624431b0e75e4021aec0a7f5a136"
    "c1eb84b02aea10611afafae35e2be1d801cf7c5fdad14595250203010001"
)
QEMU_MAIN_REPLY = (H("52454451 02000000 02000000 ba000000 00000000") + QEMU_PUBKEY
                   + H("01000000 01000000 b2000000 0b000000 0f000000"))
# QEMU 7.2, main channel after the link (mini header: u16 type, u32 size).
QEMU_INIT = H("6700 20000000 f89ba53d 00000000 01000000 01000000 00000000 0a000000"
              "38771200 00000000")
QEMU_PING = H("0400 0c000000 01000000 8ecd2748 00000000")
QEMU_CHANNELS = H("6800 08000000 02000000 0800 0300")  # smartcard 0, inputs 0
# QEMU 7.2, smartcard channel: VSCard Error(reader 0, SUCCESS) little-endian in message 101.
QEMU_VSC_ERROR = H("6500 10000000 02000000 00000000 04000000 00000000")


def drain_channel(conn: SpiceChannelConnection) -> list[object]:
    out: list[object] = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def drain(client: SpiceSmartcardClient) -> list[object]:
    out: list[object] = []
    while (event := client.next_event()) is not None:
        out.append(event)
    return out


# ------------------------------------------------------------------------------ vectors


def test_link_mess_vectors() -> None:
    main = LinkMess(0, MAIN, 0, (0x0B,))
    assert encode_link_mess(main) == MAIN_LINK
    assert decode_link_mess(MAIN_LINK) == (main, len(MAIN_LINK))
    card = LinkMess(0x17DA8AEB, SMARTCARD, 0, (0x0B,))
    assert encode_link_mess(card) == SMARTCARD_LINK
    assert decode_link_mess(SMARTCARD_LINK)[0] == card


def test_engine_sends_the_link_vector_and_our_caps() -> None:
    conn = SpiceChannelConnection(MAIN)
    conn.start(0.0)
    assert conn.data_to_send() == MAIN_LINK
    assert caps_from_bits((0x0B,)) == spice.CLIENT_COMMON_CAPS
    plain = SpiceChannelConnection(SMARTCARD, connection_id=0x17DA8AEB, mini_header=False)
    plain.start(0.0)
    assert plain.data_to_send() == SMARTCARD_LINK[:-4] + H("03000000")  # no MINI_HEADER bit


def test_qemu_link_reply_vector() -> None:
    stream = SpiceStream()
    stream.receive_data(QEMU_MAIN_REPLY)
    reply = stream.next_event()
    assert reply == LinkReply(SpiceLinkErr.OK, QEMU_PUBKEY, (0x0B,), (0x0F,))
    assert isinstance(reply, LinkReply) and reply.error is SpiceLinkErr.OK
    assert stream.mini is True and stream.next_event() is None
    assert encode_link_reply(reply) == QEMU_MAIN_REPLY  # round trip of a real reply


def test_link_refusal_vectors() -> None:
    # reds_send_link_error: the header and a whole zeroed SpiceLinkReply but for the error.
    refusal = H("52454451 02000000 02000000 b2000000 09000000") + bytes(162 + 12)
    assert link_reply(9) == refusal
    stream = SpiceStream()
    stream.receive_data(refusal)
    assert stream.next_event() == LinkReply(SpiceLinkErr.CHANNEL_NOT_AVAILABLE, bytes(162))
    stream.receive_data(b"x")  # nothing may follow a refused link
    with pytest.raises(DecodeError, match="after the link ended"):
        stream.next_event()


@pytest.mark.parametrize(("wire", "code"), [
    (H("00000000"), SpiceLinkErr.OK),
    (H("07000000"), SpiceLinkErr.PERMISSION_DENIED),
    (H("08000000"), SpiceLinkErr.BAD_CONNECTION_ID),
    (H("2a000000"), 42),  # unknown codes are kept as ints
])
def test_link_result_vectors(wire: bytes, code: int) -> None:
    stream = SpiceStream()
    stream.receive_data(QEMU_MAIN_REPLY + wire)
    stream.next_event()
    result = stream.next_event()
    assert result == LinkResult(code)
    assert isinstance(result, LinkResult)
    assert type(result.error) is (SpiceLinkErr if code != 42 else int)


@pytest.mark.parametrize(("wire", "message"), [
    (QEMU_INIT, MainInit(0x3DA59BF8, 0, 1, 1, 0, 10, 0x127738, 0)),
    (QEMU_CHANNELS, ChannelsList(((8, 0), (3, 0)))),
    (QEMU_PING, Ping(1, 0x4827CD8E)),
    (H("0400 10000000 02000000 0100000000000000 00000000"), Ping(2, 1, bytes(4))),
    (H("0300 08000000 07000000 14000000"), SetAck(7, 20)),
    (H("0600 0c000000 0100000000000000 07000000"),
     Disconnecting(1, SpiceLinkErr.PERMISSION_DENIED)),
    (H("0700 1c000000 0200000000000000 01000000 02000000 00000000 03000000 616263 00"),
     Notify(2, 1, 2, 0, b"abc")),
    (H("0500 15000000 02 0100 0500000000000000 0800 0900000000000000"),
     WaitForChannels(((1, 0, 5), (8, 0, 9)))),
    (H("0100 04000000 03000000"), Migrate(3)),
    (H("7100 05000000 0102030405"), SpiceMessage(SpiceMsgMain.NAME, H("0102030405"))),
])
def test_main_channel_message_vectors(wire: bytes, message: spice.ServerMessage) -> None:
    type_, size = struct.unpack_from("<HI", wire)
    assert size == len(wire) - 6
    raw = SpiceMessage(type_, wire[6:])
    assert decode_server_message(MAIN, raw) == message
    assert encode_server_message(message) == raw


def test_smartcard_data_vector() -> None:
    raw = SpiceMessage(101, QEMU_VSC_ERROR[6:])
    assert decode_server_message(SMARTCARD, raw) == SmartcardData(H(
        "02000000 00000000 04000000 00000000"))
    assert decode_server_message(MAIN, raw) == raw  # 101 on the main channel: MIGRATE_BEGIN


@pytest.mark.parametrize(("message", "wire"), [
    (Pong(1, 0x4827CD8E), H("0300 0c000000 01000000 8ecd274800000000")),
    (AckSync(7), H("0100 04000000 07000000")),
    (Ack(), H("0200 00000000")),
    (AttachChannels(), H("6800 00000000")),
    (ClientDisconnecting(5, 0), H("0600 0c000000 0500000000000000 00000000")),
    (SmartcardData(H("03000000 00000000 00000000")), H("6500 0c000000 03000000 00000000"
                                                       "00000000")),
])
def test_client_message_vectors(message: spice.ClientMessage, wire: bytes) -> None:
    encoded = encode_client_message(message)
    assert encode_data_header(encoded.type, len(encoded.data), mini=True) + encoded.data == wire


def test_full_header_vector() -> None:
    # protocol.h SpiceDataHeader: u64 serial, u16 type, u32 size, u32 sub_list.
    assert encode_data_header(3, 12, mini=False, serial=5) == H(
        "0500000000000000 0300 0c000000 00000000")
    stream = SpiceStream()
    reply = link_reply(0, common=0x03, pub_key=QEMU_PUBKEY)  # no MINI_HEADER offered
    stream.receive_data(reply + H("00000000") + H("0900000000000000 0400 0c000000 00000000")
                        + QEMU_PING[6:])
    assert stream.mini is False
    events = [stream.next_event() for _ in range(3)]
    assert events[2] == SpiceMessage(4, QEMU_PING[6:], serial=9)


def test_hot_headers_match_declarations() -> None:
    for hot, fmt, sample in (
        (spice._MINI_HEADER_HOT, spice._MINI_HEADER, {"type": 0x1234, "size": 0x89ABCDEF}),
        (spice._DATA_HEADER_HOT, spice._DATA_HEADER,
         {"serial": 2**63 + 5, "type": 7, "size": 9, "sub_list": 0x10}),
    ):
        assert hot.pack(*sample.values()) == fmt.build(sample)
    assert spice._LINK_HEADER_HOT.pack(b"REDQ", 2, 2, 22) == spice._LINK_HEADER.build(
        {"major": 2, "minor": 2, "size": 22})


def test_caps_words() -> None:
    assert caps_to_words([0, 1, 3]) == (0x0B,)
    assert caps_to_words([33]) == (0, 2)
    assert has_cap((0, 2), 33) and not has_cap((0, 2), 32) and not has_cap((), 1)
    assert caps_from_bits((0x0F, 1)) == {0, 1, 2, 3, 32}
    with pytest.raises(EncodeError):
        caps_to_words([-1])


def test_ticket_is_oaep_sha1_of_password_and_nul() -> None:
    key = server_key()
    ticket = encrypt_ticket(public_der(key), b"s3cret")
    assert len(ticket) == 128
    assert decrypt_ticket(key, ticket) == b"s3cret\0"
    assert encrypt_ticket(public_der(key), b"s3cret") != ticket  # OAEP is randomised
    with pytest.raises(DecodeError, match="not a DER public key"):
        encrypt_ticket(bytes(162), b"")


def test_not_spice_and_version_errors() -> None:
    stream = SpiceStream()
    stream.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(SpiceNotAServerError, match="not a SPICE server") as info:
        stream.next_event()
    assert info.value.failure is SpiceFailure.NOT_SPICE and isinstance(info.value, DecodeError)
    stream = SpiceStream()
    stream.receive_data(H("52454451 01000000 03000000 b2000000"))
    with pytest.raises(SpiceProtocolError, match=r"protocol 1\.3") as vinfo:
        stream.next_event()
    assert vinfo.value.failure is SpiceFailure.VERSION_MISMATCH


def test_oversized_frames_refused_before_buffering() -> None:
    stream = SpiceStream()
    stream.receive_data(H("52454451 02000000 02000000 01100000"))  # 4097 > 4096
    with pytest.raises(DecodeError, match="exceeds the cap"):
        stream.next_event()
    stream = SpiceStream(max_length=100)
    stream.receive_data(QEMU_MAIN_REPLY + H("00000000") + H("0400 65000000"))
    assert stream.next_event() and stream.next_event()
    with pytest.raises(DecodeError, match="101 exceeds the cap of 100"):
        stream.next_event()
    assert stream.buffered == 0


def test_short_bodies_are_decode_errors() -> None:
    for type_ in (SpiceMsg.PING, SpiceMsg.SET_ACK, SpiceMsg.NOTIFY, SpiceMsg.DISCONNECTING,
                  SpiceMsg.WAIT_FOR_CHANNELS, SpiceMsg.MIGRATE):
        with pytest.raises(DecodeError):
            decode_server_message(MAIN, SpiceMessage(type_, b"\x05"))
    with pytest.raises(DecodeError):
        decode_server_message(MAIN, SpiceMessage(SpiceMsgMain.INIT, bytes(31)))
    with pytest.raises(DecodeError):
        decode_server_message(MAIN, SpiceMessage(SpiceMsgMain.CHANNELS_LIST, H("03000000 0800")))


# ------------------------------------------------------------------------------ properties

_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_server_messages = st.one_of(
    st.builds(Ping, _u32, _u64, st.binary(max_size=40)),
    st.builds(SetAck, _u32, _u32),
    st.builds(Disconnecting, _u64, _u32.map(lambda v: spice._known(SpiceLinkErr, v))),
    st.builds(Notify, _u64, _u32, _u32, _u32, st.binary(max_size=30)),
    st.builds(WaitForChannels, st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255),
                                                  _u64), max_size=4).map(tuple)),
    st.builds(Migrate, _u32),
    st.builds(MainInit, *[_u32] * 8),
    st.builds(ChannelsList, st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)),
                                     max_size=6).map(tuple)),
    st.builds(SpiceMessage, st.integers(120, 65535), st.binary(max_size=40)),
)


@given(_server_messages)
def test_server_message_round_trip(message: spice.ServerMessage) -> None:
    assert decode_server_message(MAIN, encode_server_message(message)) == message


@given(st.builds(LinkMess, _u32, st.integers(0, 255), st.integers(0, 255),
                 st.lists(_u32, max_size=3).map(tuple), st.lists(_u32, max_size=3).map(tuple)))
def test_link_mess_round_trip(mess: LinkMess) -> None:
    wire = encode_link_mess(mess)
    assert decode_link_mess(wire + b"tail") == (mess, len(wire))


def _server_stream(messages: list[spice.ServerMessage], mini: bool) -> bytes:
    out = link_reply(0, common=0x0B if mini else 0x03, pub_key=QEMU_PUBKEY) + H("00000000")
    for serial, message in enumerate(messages, 1):
        raw = encode_server_message(message)
        out += encode_data_header(raw.type, len(raw.data), mini=mini, serial=serial) + raw.data
    return out


@settings(max_examples=60)
@given(st.lists(_server_messages, max_size=8), st.booleans(), st.data())
def test_chunking_changes_nothing(messages: list[spice.ServerMessage], mini: bool,
                                  data: st.DataObject) -> None:
    wire = _server_stream(messages, mini)
    whole = SpiceStream()
    whole.receive_data(wire)
    expected = list(iter(whole.next_event, None))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    chunked = SpiceStream()
    got: list[object] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        chunked.receive_data(wire[a:b])
        got.extend(iter(chunked.next_event, None))
    assert got == expected
    assert len(expected) == 2 + len(messages)
    bodies = [SpiceMessage(m.type, m.data) for m in expected[2:] if isinstance(m, SpiceMessage)]
    assert [decode_server_message(MAIN, m) for m in bodies] == messages


@given(st.binary(max_size=300), st.booleans())
def test_garbage_raises_only_decode_error(garbage: bytes, after_link: bool) -> None:
    stream = SpiceStream()
    if after_link:
        stream.receive_data(QEMU_MAIN_REPLY + H("00000000"))
        list(iter(stream.next_event, None))
    stream.receive_data(garbage)
    try:
        while (frame := stream.next_event()) is not None:
            if isinstance(frame, SpiceMessage):
                decode_server_message(MAIN, frame)
    except DecodeError:
        pass


@given(st.binary(max_size=200), st.sampled_from(["link", "main", "smartcard"]))
def test_session_never_raises_on_garbage(garbage: bytes, where: str) -> None:
    client, _server, _main, _card = _linked_session()
    if where == "link":
        client = SpiceSmartcardClient(b"", encrypt=_fake_encrypt)
        client.start(0.0)
        client.data_to_send(MAIN)
    channel = SMARTCARD if where == "smartcard" else MAIN
    client.receive_data(channel, garbage, 1.0)  # must not raise
    events = drain(client)
    closed = [e for e in events if isinstance(e, SessionClosed)]
    if closed:  # a failure is always one of ours, and bad bytes are a DecodeError
        assert isinstance(closed[0].error, SpiceError)
        if closed[0].error.failure is SpiceFailure.PROTOCOL:
            assert isinstance(closed[0].error, DecodeError)
    assert all(isinstance(e, VscData | ServerNotice | SessionClosed) for e in events)


def _fake_encrypt(pub_key: bytes, password: bytes) -> bytes:
    return bytes(128)


# ------------------------------------------------------------------------------ paired engine


def _pump_channel(conn: SpiceChannelConnection, server: FakeServerConnection,
                  now: float = 0.0) -> None:
    for _ in range(10):
        out = conn.data_to_send()
        if out:
            server.receive_data(out)
        back = server.data_to_send()
        if back:
            conn.receive_data(back, now)
        if not out and not back:
            return


@pytest.mark.parametrize("mini", [True, False])
@pytest.mark.parametrize("auth_selection", [True, False])
def test_channel_links_with_password(mini: bool, auth_selection: bool) -> None:
    fake = FakeSpiceServer(password=b"pw", mini_header=mini, auth_selection=auth_selection)
    server = fake.connection()
    conn = SpiceChannelConnection(MAIN, password=b"pw")
    conn.start(0.0)
    _pump_channel(conn, server)
    events = drain_channel(conn)
    assert isinstance(events[0], ChannelReady) and events[0].mini_header is mini
    assert events[1] == ChannelMessage(MainInit(0x1234ABCD, 0, 1, 1, 0, 10, 1234, 0))
    assert conn.ready and server.state == "ready" and server.mini is mini
    assert server.auth_selection is auth_selection


def test_wrong_password_is_a_clear_fatal_error() -> None:
    server = FakeSpiceServer(password=b"right").connection()
    conn = SpiceChannelConnection(MAIN, password=b"wrong")
    conn.start(0.0)
    _pump_channel(conn, server)
    [closed] = drain_channel(conn)
    assert isinstance(closed, ChannelClosed) and closed.error is not None
    assert closed.error.failure is SpiceFailure.WRONG_PASSWORD and closed.error.fatal
    assert "refused the password" in str(closed.error)
    assert "wrong" not in str(closed.error).replace("wrong SPICE", "")  # never the password


@pytest.mark.parametrize(("code", "failure", "text"), [
    (5, SpiceFailure.NEED_TLS, "requires TLS"),
    (6, SpiceFailure.NEED_PLAIN, "refuses TLS"),
    (9, SpiceFailure.CHANNEL_REFUSED, "CHANNEL_NOT_AVAILABLE at the link"),
    (4, SpiceFailure.VERSION_MISMATCH, "VERSION_MISMATCH"),
    (77, SpiceFailure.CHANNEL_REFUSED, "error 77"),
])
def test_link_refusals(code: int, failure: SpiceFailure, text: str) -> None:
    conn = SpiceChannelConnection(SMARTCARD, connection_id=5)
    conn.start(0.0)
    conn.receive_data(link_reply(code), 0.0)
    [closed] = drain_channel(conn)
    assert isinstance(closed, ChannelClosed) and closed.error is not None
    assert closed.error.failure is failure and text in str(closed.error)


def test_sasl_only_server_is_refused_clearly() -> None:
    conn = SpiceChannelConnection(MAIN)
    conn.start(0.0)
    conn.data_to_send()
    conn.receive_data(link_reply(0, common=0x0D, pub_key=QEMU_PUBKEY), 0.0)  # SASL, no SPICE
    [closed] = drain_channel(conn)
    assert isinstance(closed, ChannelClosed) and closed.error is not None
    assert closed.error.failure is SpiceFailure.AUTH_UNSUPPORTED and "only SASL" in str(
        closed.error)
    assert conn.data_to_send() == b""  # no ticket went out


def test_eof_before_reply_names_the_missing_channel() -> None:
    card = SpiceChannelConnection(SMARTCARD, connection_id=5)
    card.start(0.0)
    card.connection_lost(1.0)
    [closed] = drain_channel(card)
    assert isinstance(closed, ChannelClosed) and closed.error is not None
    assert closed.error.failure is SpiceFailure.CHANNEL_REFUSED
    assert "no SMARTCARD channel 0" in str(closed.error)
    main = SpiceChannelConnection(MAIN)
    main.start(0.0)
    main.connection_lost(1.0)
    [closed] = drain_channel(main)
    assert isinstance(closed, ChannelClosed) and closed.error is not None
    assert closed.error.failure is SpiceFailure.NOT_SPICE


def test_ping_answered_with_pong_and_set_ack_window() -> None:
    server = FakeSpiceServer().connection()
    conn = SpiceChannelConnection(MAIN)
    conn.start(0.0)
    _pump_channel(conn, server)
    drain_channel(conn)
    server.ping(9, 0x1122334455, pad=256_000)  # the net test's big ping
    server.send(3, struct.pack("<II", 4, 3))  # SET_ACK generation 4, window 3
    for i in range(7):
        server.send(113, struct.pack("<I", i))  # NAME messages, passed through
    _pump_channel(conn, server)
    pongs = server.messages(3)
    assert pongs == [struct.pack("<IQ", 9, 0x1122334455)] and conn.pings == 1
    assert server.messages(1) == [struct.pack("<I", 4)]  # ACK_SYNC(4)
    assert server.messages(2) == [b"", b""]  # an ACK after every 3 messages: 7 -> 2
    assert conn.acks == 2
    names = [e for e in drain_channel(conn) if isinstance(e, ChannelMessage)]
    assert len(names) == 7


def test_messages_before_link_result_are_protocol_errors() -> None:
    conn = SpiceChannelConnection(MAIN)
    conn.start(0.0)
    conn.receive_data(QEMU_MAIN_REPLY[:100], 0.0)
    conn.receive_data(QEMU_MAIN_REPLY[100:] + H("0000"), 0.0)
    assert conn.state is spice.ChannelState.AUTHENTICATING
    assert len(conn.data_to_send()) == len(MAIN_LINK) + 4 + 128  # link, AUTH_SPICE, ticket
    with pytest.raises(EncodeError):
        conn.send(Pong(1, 1))  # not before the link is up


def test_password_length_checked() -> None:
    with pytest.raises(ConfigError, match="at most 60 bytes"):
        SpiceSmartcardClient("x" * 61)
    SpiceSmartcardClient("x" * 60)


# ------------------------------------------------------------------------------ paired session


def _linked_session(
    *, fake: FakeSpiceServer | None = None, password: str = "",
    idle_timeout: float | None = None,
) -> tuple[SpiceSmartcardClient, FakeSpiceServer, FakeServerConnection, FakeServerConnection]:
    fake = fake or FakeSpiceServer()
    client = SpiceSmartcardClient(password, idle_timeout=idle_timeout)
    main = fake.connection()
    card = fake.connection()
    client.start(0.0)
    _pump_session(client, main, card)
    return client, fake, main, card


def _pump_session(client: SpiceSmartcardClient, main: FakeServerConnection,
                  card: FakeServerConnection, now: float = 0.0) -> list[object]:
    events: list[object] = []
    for _ in range(20):
        moved = False
        for channel, server in ((MAIN, main), (SMARTCARD, card)):
            out = client.data_to_send(channel)
            if out:
                server.receive_data(out)
                moved = True
            back = server.data_to_send()
            if back:
                client.receive_data(channel, back, now)
                moved = True
        while (event := client.next_event()) is not None:
            events.append(event)
            if isinstance(event, OpenSmartcardChannel):
                client.smartcard_connected(now)
            moved = True
        if not moved:
            break
    return events


def test_session_setup_sequence() -> None:
    fake = FakeSpiceServer()
    client = SpiceSmartcardClient("")
    main, card = fake.connection(), fake.connection()
    client.start(0.0)
    events = _pump_session(client, main, card)
    assert events == [OpenSmartcardChannel(0x1234ABCD), SmartcardReady(0x1234ABCD)]
    assert client.ready and client.session_id == 0x1234ABCD
    assert client.channels == ((3, 0), (8, 0))
    assert main.messages(104) == [b""]  # ATTACH_CHANNELS
    assert card.conn_id == 0x1234ABCD and card.channel_type == 8
    assert client.next_timeout() is None  # no idle timeout asked for


def test_session_without_smartcard_channel_is_fatal() -> None:
    fake = FakeSpiceServer(smartcard_channel=False)
    client, _, _, _ = _linked_session(fake=fake)
    error = client.error
    assert error is not None and error.failure is SpiceFailure.NO_SMARTCARD_CHANNEL
    assert error.fatal and "offers: inputs 0" in str(error) and "spicevmc" in str(error)


def test_vscard_travels_inside_message_101_one_per_message() -> None:
    client, _fake, main, card = _linked_session()
    init = struct.pack("<III", 1, 0, 12) + b"VSCD" + struct.pack("<II", 2, 0)
    add = struct.pack("<III", 3, 0, 4) + b"test"
    remove = struct.pack("<III", 6, 0, 0)
    client.send_vsc(init + add + remove[:5])  # cut into messages; partial ones held
    client.send_vsc(remove[5:])
    events = _pump_session(client, main, card)
    assert card.messages(101) == [init, add, remove]
    assert events == [VscData(H("02000000 00000000 04000000 00000000"))] * 2
    card.send_vsc(7, 0, H("00a4040000"))
    assert _pump_session(client, main, card) == [VscData(H("07000000 00000000 05000000"
                                                           "00a4040000"))]


def test_vsc_before_ready_is_held() -> None:
    fake = FakeSpiceServer()
    client = SpiceSmartcardClient("")
    add = struct.pack("<III", 3, 0, 0)
    client.send_vsc(add)
    main, card = fake.connection(), fake.connection()
    client.start(0.0)
    _pump_session(client, main, card)
    assert card.messages(101) == [add]


def test_setup_and_idle_timeouts() -> None:
    client = SpiceSmartcardClient("", setup_timeout=5.0)
    client.start(100.0)
    assert client.next_timeout() == 105.0
    client.handle_timeout(104.9)
    assert not client.closed
    client.handle_timeout(105.0)
    [closed] = drain(client)
    assert isinstance(closed, SessionClosed) and closed.error is not None
    assert closed.error.failure is SpiceFailure.TIMEOUT and "SPICE port" in str(closed.error)
    assert not closed.error.fatal

    live, _, main, card = _linked_session(idle_timeout=30.0)
    main.ping(1, 2)
    _pump_session(live, main, card, now=20.0)
    assert live.next_timeout() == 50.0
    live.handle_timeout(49.0)
    assert not live.closed
    live.handle_timeout(50.0)
    assert live.error is not None and "silent for 30 s" in str(live.error)


def test_server_closing_main_closes_the_session_transiently() -> None:
    client, _, _main, _card = _linked_session()
    client.connection_lost(MAIN, 1.0)
    [closed] = drain(client)
    assert isinstance(closed, SessionClosed) and closed.error is not None
    assert closed.error.failure is SpiceFailure.CLOSED and not closed.error.fatal
    client.receive_data(SMARTCARD, QEMU_VSC_ERROR, 2.0)  # ignored after the end
    assert drain(client) == []


def test_notify_and_disconnecting_reported() -> None:
    client, _, main, card = _linked_session()
    main.send(7, encode_server_message(Notify(0, 1, 2, 0, b"hello")).data)
    main.send(6, struct.pack("<QI", 0, 0))
    events = _pump_session(client, main, card)
    assert events == [ServerNotice(MAIN, "warning: hello"),
                      ServerNotice(MAIN, "server disconnecting: OK")]


def test_close_sends_disconnecting() -> None:
    client, _, main, _card = _linked_session()
    client.close(1.0)
    assert drain(client) == [SessionClosed(None)]
    main.receive_data(client.data_to_send(MAIN))
    assert main.messages(6) == [struct.pack("<QI", 0, 0)]


def test_paired_with_vsc_session_and_test_card() -> None:
    """VscSession (little-endian, no peer Init) over the engine, against the fake server."""
    client, fake, main, card = _linked_session()
    session = VscSession(["ccidemu"], byteorder="little", peer_init=False)
    test_card = BuiltinTestCard()

    def run_session(now: float) -> None:
        while (action := session.next_action()) is not None:
            if isinstance(action, PowerOn):
                session.power_on_done(action.token, test_card.power_on(), now)
            elif isinstance(action, Transmit):
                session.transmit_done(action.token, test_card.transmit(action.apdu), now)
        client.send_vsc(session.data_to_send())

    def step(now: float) -> None:
        for _ in range(5):
            run_session(now)
            for event in _pump_session(client, main, card, now):
                if isinstance(event, VscData):
                    session.receive_data(event.data, now)

    session.start(0.0)
    step(0.0)
    # The server dropped our Init; ReaderAdd was answered, the ATR reached "the device".
    assert fake.device == [(5, 0, BuiltinTestCard.ATR)]
    assert session.readers()[0].inserted
    card.send_vsc(7, 0, H("80E0000003 010203"))
    step(1.0)
    assert fake.device[-1] == (7, 0, H("010203 9000"))
    # A second ReaderAdd on the same connection gets no reader (spice-server/QEMU): a
    # session with two readers on a fresh connection keeps only the first.
    client, fake, main, card = _linked_session()
    session = VscSession(["a", "b"], byteorder="little", peer_init=False)
    session.start(0.0)
    step(0.0)
    assert [r.state.value for r in session.readers()] == ["added", "refused"]
    assert fake.device == [(5, 0, BuiltinTestCard.ATR)]


def test_fuzzed_smartcard_stream_closes_with_decode_error() -> None:
    client, _, _main, _card = _linked_session()
    client.receive_data(SMARTCARD, H("6500 ffffffff"), 1.0)  # a 4 GiB message
    [closed] = drain(client)
    assert isinstance(closed, SessionClosed)
    assert isinstance(closed.error, SpiceProtocolError) and isinstance(closed.error, DecodeError)
    assert "exceeds the cap" in str(closed.error)


def test_construct_errors_never_escape() -> None:
    with pytest.raises(DecodeError):
        spice.decode_link_reply_body(bytes(10))
    with pytest.raises(DecodeError):
        decode_link_mess(H("52454451 02000000 02000000 05000000") + bytes(5))
    with pytest.raises(EncodeError):
        encode_link_reply(LinkReply(0, b"short"))
    assert not issubclass(construct.ConstructError, DecodeError)


def test_an_over_long_vscard_message_of_ours_is_an_encode_error() -> None:
    fake = FakeSpiceServer()
    client = SpiceSmartcardClient("", max_length=100)
    main, card = fake.connection(), fake.connection()
    client.start(0.0)
    _pump_session(client, main, card)
    assert client.ready
    with pytest.raises(EncodeError, match="VSCard message length 101 exceeds the cap of 100"):
        client.send_vsc(struct.pack("<III", 7, 0, 101) + bytes(101))


def test_an_over_long_message_queued_before_ready_fails_the_session() -> None:
    fake = FakeSpiceServer()
    client = SpiceSmartcardClient("", max_length=100)
    client.send_vsc(struct.pack("<III", 7, 0, 101) + bytes(101))  # held: not up yet
    main, card = fake.connection(), fake.connection()
    client.start(0.0)
    events = _pump_session(client, main, card)  # must not raise
    assert isinstance(events[-1], SessionClosed) and client.error is not None
    assert "exceeds the cap of 100" in str(client.error)
    assert card.messages(101) == []
