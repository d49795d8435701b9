"""vmc.fakeqemu: the core against docs/PROTOCOL.md, "VSCard" byte for byte, the adapters
against a small card-side peer (ccidemu.vsc + BuiltinTestCard) over real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.ccid import (
    CcidDataBlock,
    CcidError,
    CcidEscape,
    CcidEscapeResponse,
    CcidGetSlotStatus,
    CcidIccPowerOff,
    CcidIccPowerOn,
    CcidMessage,
    CcidNotifySlotChange,
    CcidSecure,
    CcidSlotStatus,
    CcidXfrBlock,
    CommandStatus,
    IccStatus,
    SlotState,
)
from ccidemu.errors import CardError
from ccidemu.vsc import (
    VscApdu,
    VscAtr,
    VscCardRemove,
    VscConnection,
    VscError,
    VscFlush,
    VscInit,
    VscMessage,
    VscReaderAdd,
    VscReaderRemove,
    encode_vsc,
)
from vmc.cli import main
from vmc.fakeqemu import AsyncFakeQemu, FakeQemu, FakeQemuCore

H = bytes.fromhex


INIT_FROM_QEMU = H("00000001 ffffffff 0000000c 56534344 00000002 00000000")
OUR_INIT = H("00000001 00000000 0000000c 56534344 00000002 00000000")
READER_ADD = H("00000003 00000000 0000000f 7673632d746573742d726561646572")
SUCCESS = H("00000002 00000000 00000004 00000000")
GENERAL_ERROR = H("00000002 00000000 00000004 00000001")
ATR = H("3b8f8001804f0ca000000306030001000000006a")
ATR_MSG = H("00000005 00000000 00000014") + ATR
SELECT = H("00a4040007a0000000031010")


def drain(core: FakeQemuCore, reader_id: int = 0) -> list[CcidMessage]:
    out = []
    while (msg := core.next_ccid(reader_id)) is not None:
        out.append(msg)
    return out


def inserted_core(mode: str = "client") -> FakeQemuCore:
    core = FakeQemuCore("client" if mode == "client" else "server")
    core.connected()
    core.receive_data(OUR_INIT + READER_ADD + ATR_MSG)
    core.data_to_send()
    drain(core)
    return core


def test_protocol_notes_trace_client_mode() -> None:
    """docs/PROTOCOL.md, "VSCard", 'What QEMU 7.2 does', byte for byte."""
    core = FakeQemuCore("client")
    core.connected()
    assert core.data_to_send() == INIT_FROM_QEMU  # unsolicited Init
    core.receive_data(OUR_INIT)
    assert core.data_to_send() == INIT_FROM_QEMU  # one reply per Init
    core.receive_data(READER_ADD)
    assert core.data_to_send() == SUCCESS
    assert core.reader_name() == "vsc-test-reader"
    core.receive_data(ATR_MSG)
    assert core.data_to_send() == SUCCESS
    assert core.card_present() and core.atr() == ATR
    assert drain(core) == [CcidNotifySlotChange((SlotState(True, True),) + (SlotState(False),) * 3)]
    # the guest's XfrBlock becomes a VSC APDU on reader 0
    core.send_ccid(CcidXfrBlock(0, 7, SELECT))
    assert core.data_to_send() == H("00000007 00000000 0000000c") + SELECT
    assert drain(core) == []
    core.receive_data(H("00000007 00000000 00000002 9000"))
    (answer,) = drain(core)
    assert answer == CcidDataBlock(0, 7, data=H("9000"))
    assert core.data_to_send() == b""


def test_server_mode_waits_for_the_peer() -> None:
    core = FakeQemuCore("server")
    core.connected()
    assert core.data_to_send() == b""
    core.receive_data(OUR_INIT + OUR_INIT)
    assert core.data_to_send() == INIT_FROM_QEMU * 2


def test_split_input_is_handled() -> None:
    core = FakeQemuCore("server")
    wire = OUR_INIT + READER_ADD + ATR_MSG
    for i in range(len(wire)):
        core.receive_data(wire[i : i + 1])
    assert core.data_to_send() == INIT_FROM_QEMU + SUCCESS + SUCCESS
    assert [type(m) for m in core.received] == [VscInit, VscReaderAdd, VscAtr]


@pytest.mark.parametrize(
    "atr",
    [
        pytest.param(H("3b0a") + b"ccidemu-TC", id="builtin-test-card"),
        pytest.param(ATR, id="protocol-notes"),
    ],
)
def test_good_atr(atr: bytes) -> None:
    core = FakeQemuCore("server")
    core.receive_data(encode_vsc(VscAtr(0, atr)))
    assert core.data_to_send() == SUCCESS


@pytest.mark.parametrize(
    "atr",
    [
        pytest.param(H("3a0a") + b"ccidemu-TC", id="bad-TS"),
        pytest.param(H("3b0f") + bytes(40), id="over-40-bytes"),
        pytest.param(H("3b"), id="too-short"),
        pytest.param(H("3b8f80"), id="interface-bytes-missing"),
    ],
)
def test_bad_atr_is_refused(atr: bytes) -> None:
    core = FakeQemuCore("server")
    core.receive_data(encode_vsc(VscAtr(0, atr)))
    assert core.data_to_send() == GENERAL_ERROR
    assert not core.card_present()


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(H("00000008 00000000 00000000"), id="flush"),
        pytest.param(H("00000009 00000000 00000000"), id="flush-complete"),
        pytest.param(H("00000063 00000000 00000001 ff"), id="unknown-type"),
    ],
)
def test_general_error_for_flush_and_unknown(wire: bytes) -> None:
    core = FakeQemuCore("server")
    core.receive_data(wire)
    assert core.data_to_send() == GENERAL_ERROR


def test_power_on_answers_from_cached_atr() -> None:
    core = inserted_core()
    core.send_ccid(CcidIccPowerOn(0, 1))
    assert drain(core) == [CcidDataBlock(0, 1, data=ATR)]
    assert core.data_to_send() == b""  # never reaches the card side
    core.send_ccid(CcidGetSlotStatus(0, 2))
    (status,) = drain(core)
    assert isinstance(status, CcidSlotStatus)
    assert status.status.icc_status is IccStatus.PRESENT_ACTIVE


def test_power_off_makes_transfers_fail() -> None:
    core = inserted_core()
    core.send_ccid(CcidIccPowerOff(0, 1))
    (off,) = drain(core)
    assert isinstance(off, CcidSlotStatus) and off.status.icc_status is IccStatus.PRESENT_INACTIVE
    core.send_ccid(CcidXfrBlock(0, 2, SELECT))
    (answer,) = drain(core)
    assert isinstance(answer, CcidDataBlock)
    assert answer.status.failed and answer.status.error is CcidError.ICC_MUTE
    assert core.data_to_send() == b""


def test_no_card() -> None:
    core = FakeQemuCore("server")
    core.send_ccid(CcidIccPowerOn(0, 1))
    core.send_ccid(CcidXfrBlock(0, 2, SELECT))
    core.send_ccid(CcidGetSlotStatus(0, 3))
    power, xfr, status = drain(core)
    assert isinstance(power, CcidDataBlock) and power.data == b""
    assert power.status.icc_status is IccStatus.ABSENT
    assert power.status.error is CcidError.ICC_MUTE
    assert isinstance(xfr, CcidDataBlock) and xfr.status.error is CcidError.ICC_MUTE
    assert isinstance(status, CcidSlotStatus) and status.status.icc_status is IccStatus.ABSENT


def test_second_command_while_busy() -> None:
    core = inserted_core()
    core.send_ccid(CcidXfrBlock(0, 1, SELECT))
    core.send_ccid(CcidXfrBlock(0, 2, SELECT))
    (busy,) = drain(core)
    assert isinstance(busy, CcidDataBlock) and busy.seq == 2
    assert busy.status.command_status is CommandStatus.FAILED
    assert busy.status.error is CcidError.CMD_SLOT_BUSY
    assert core.data_to_send() == H("00000007 00000000 0000000c") + SELECT  # only one APDU


def test_vsc_error_fails_the_transmit() -> None:
    core = inserted_core()
    core.send_ccid(CcidXfrBlock(0, 4, SELECT))
    core.receive_data(encode_vsc(VscError(0, 1)))
    (answer,) = drain(core)
    assert isinstance(answer, CcidDataBlock) and answer.seq == 4 and answer.data == b""
    assert answer.status.failed
    assert core.data_to_send() == H("00000007 00000000 0000000c") + SELECT  # no reply to Error


def test_oversized_response_is_a_hardware_error() -> None:
    core = inserted_core()
    core.send_ccid(CcidXfrBlock(0, 1, SELECT))
    core.receive_data(encode_vsc(VscApdu(0, bytes(375))))
    (answer,) = drain(core)
    assert isinstance(answer, CcidDataBlock) and answer.status.error is CcidError.HW_ERROR


def test_card_remove_and_reinsert() -> None:
    core = inserted_core()
    core.send_ccid(CcidXfrBlock(0, 1, SELECT))
    core.data_to_send()
    core.receive_data(encode_vsc(VscCardRemove(0)))
    assert core.data_to_send() == SUCCESS
    assert not core.card_present()
    notify, flushed = drain(core)
    assert notify == CcidNotifySlotChange((SlotState(False, True),) + (SlotState(False),) * 3)
    assert isinstance(flushed, CcidDataBlock) and flushed.seq == 1 and flushed.data == b""
    core.receive_data(ATR_MSG)
    assert core.data_to_send() == SUCCESS and core.card_present()


def test_reader_remove() -> None:
    core = inserted_core()
    core.receive_data(encode_vsc(VscReaderRemove(0)))
    assert core.data_to_send() == SUCCESS
    assert not core.card_present()


def test_escape_is_refused() -> None:
    core = inserted_core()
    core.send_ccid(CcidEscape(0, 9, b"\x01"))
    (answer,) = drain(core)
    assert isinstance(answer, CcidEscapeResponse)
    assert answer.status.failed and answer.status.error is CcidError.CMD_NOT_SUPPORTED


def test_multi_reader_ids() -> None:
    core = FakeQemuCore("server", multi_reader=True)
    for name in ("a", "b", "c"):
        core.receive_data(encode_vsc(VscReaderAdd.with_name(0, name)))
    assert core.data_to_send() == b"".join(
        H(f"00000002 0000000{i} 00000004 00000000") for i in range(3)
    )
    assert core.readers == [0, 1, 2]
    core.receive_data(encode_vsc(VscAtr(2, ATR)))
    assert core.card_present(2) and not core.card_present(0)
    core.send_ccid(CcidXfrBlock(0, 1, SELECT), reader_id=2)
    assert core.data_to_send() == (
        H("00000002 00000002 00000004 00000000") + H("00000007 00000002 0000000c") + SELECT
    )
    core.receive_data(encode_vsc(VscReaderRemove(1)))
    assert core.readers == [0, 2]


def test_multi_reader_remove_keeps_the_notification() -> None:
    """A removed reader's last NotifySlotChange (card out) still reaches the guest."""
    a, b = socket.socketpair()
    with FakeQemu.from_socket(a, "server", multi_reader=True) as qemu:
        b.sendall(encode_vsc(VscReaderAdd.with_name(0, "a")) + encode_vsc(VscAtr(0, ATR))
                  + encode_vsc(VscReaderRemove(0)))
        b.close()
        qemu.wait_closed()
        assert qemu.core.readers == []
        inserted, removed = qemu.notifications(0)
        assert inserted.states[0] == SlotState(present=True, changed=True)
        assert removed.states[0] == SlotState(present=False, changed=True)
        assert qemu.notifications(0) == []


def test_take_answer_and_notifications() -> None:
    core = inserted_core()
    seqs = [core.next_seq() for _ in range(2)]
    assert seqs == [0, 1]
    core.send_ccid(CcidGetSlotStatus(0, seqs[0]))
    core.send_ccid(CcidIccPowerOff(0, seqs[1]))
    core.receive_data(encode_vsc(VscCardRemove(0)))
    assert core.take_answer(0, 5) is None
    off = core.take_answer(0, seqs[1])
    assert isinstance(off, CcidSlotStatus) and off.seq == 1
    (removed,) = core.take_notifications()
    assert removed.states[0] == SlotState(present=False, changed=True)
    status = core.take_answer(0, seqs[0])
    assert isinstance(status, CcidSlotStatus) and status.seq == 0
    assert core.next_ccid() is None


# --- adapters against a card-side peer ---------------------------------------------------


class CardPeer(threading.Thread):
    """A minimal card side: Init, ReaderAdd, ATR, then answers APDUs from the test card."""

    def __init__(self, sock: socket.socket, *, fail_apdus: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.card = BuiltinTestCard()
        self.fail_apdus = fail_apdus
        self.received: list[VscMessage] = []

    def send(self, msg: VscMessage) -> None:
        self.sock.sendall(encode_vsc(msg))

    def run(self) -> None:
        conn = VscConnection()
        self.send(VscInit(0))
        self.send(VscReaderAdd.with_name(0, "vsc-test-reader"))
        self.send(VscAtr(0, self.card.power_on()))
        while data := self.sock.recv(65536):
            conn.receive_data(data)
            while (msg := conn.next_event()) is not None:
                self.received.append(msg)
                if isinstance(msg, VscApdu):
                    if self.fail_apdus:
                        self.send(VscError(0, 1))
                    else:
                        self.send(VscApdu(0, self.card.transmit(msg.data)))
        self.sock.close()


@pytest.fixture
def pair() -> Iterator[tuple[FakeQemu, CardPeer]]:
    a, b = socket.socketpair()
    peer = CardPeer(b)
    peer.start()
    qemu = FakeQemu.from_socket(a)
    yield qemu, peer
    qemu.close()
    peer.join(timeout=5)


def test_blocking_adapter(pair: tuple[FakeQemu, CardPeer]) -> None:
    qemu, peer = pair
    assert qemu.wait_card(timeout=5) == BuiltinTestCard.ATR
    assert qemu.power_on() == BuiltinTestCard.ATR
    assert qemu.transmit(H("00a4040008") + BuiltinTestCard.AID) == H("9000")
    assert qemu.transmit(H("80e0000003 010203")) == H("010203 9000")
    assert qemu.transmit(H("80e2000000"))[-2:] == H("9000")
    assert qemu.slot_status().icc_status is IccStatus.PRESENT_ACTIVE
    assert qemu.card_present()
    received = qemu.received
    assert [type(m) for m in received[:3]] == [VscInit, VscReaderAdd, VscAtr]
    # the peer got QEMU's unsolicited Init, the Init reply, then exactly three APDUs
    assert [type(m) for m in peer.received] == [VscInit, VscInit, VscError, VscError,
                                               VscApdu, VscApdu, VscApdu]
    assert len(qemu.notifications()) == 1


def test_blocking_adapter_power_off_and_failures() -> None:
    a, b = socket.socketpair()
    peer = CardPeer(b, fail_apdus=True)
    peer.start()
    with FakeQemu.from_socket(a) as qemu:
        qemu.wait_card()
        with pytest.raises(CardError, match="failed"):
            qemu.transmit(H("80e4000004"))
        qemu.power_off()
        with pytest.raises(CardError, match="ICC_MUTE"):
            qemu.transmit(H("80e4000004"))
    peer.join(timeout=5)


def test_listen_and_connect_over_unix_sockets(tmp_path: Path) -> None:
    # QEMU as chardev server: the card side connects
    path = tmp_path / "qemu.sock"
    with FakeQemu.listen(f"unix:{path}") as listener:
        card_sock = socket.socket(socket.AF_UNIX)
        card_sock.connect(str(path))
        peer = CardPeer(card_sock)
        peer.start()
        with listener.accept(timeout=5) as qemu:
            qemu.wait_card()
            assert qemu.transmit(H("80e4000004")) == H("00000001 9000")
        peer.join(timeout=5)
    assert isinstance(peer.received[0], VscInit)  # the reply to the peer's Init only
    assert sum(isinstance(m, VscInit) for m in peer.received) == 1

    # QEMU as chardev client: the card side listens
    path2 = tmp_path / "card.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path2))
    server.listen(1)
    with server:
        with FakeQemu.connect(f"unix:{path2}") as qemu:
            conn, _ = server.accept()
            peer = CardPeer(conn)
            peer.start()
            qemu.wait_card()
            assert qemu.transmit(H("80e0000001 aa")) == H("aa 9000")
        peer.join(timeout=5)
    assert sum(isinstance(m, VscInit) for m in peer.received) == 2  # unsolicited + reply


def test_timeout_when_no_card() -> None:
    a, b = socket.socketpair()
    with FakeQemu.from_socket(a) as qemu:
        with pytest.raises(TimeoutError):
            qemu.wait_card(timeout=0.1)
        with pytest.raises(CardError, match="ICC_MUTE"):
            qemu.transmit(H("00a4040000"))
        b.sendall(encode_vsc(VscFlush(0)))
        b.close()
        qemu.wait_closed()


def test_async_adapter(tmp_path: Path) -> None:
    path = tmp_path / "card.sock"

    async def scenario() -> list[bytes]:
        async def card_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            card = BuiltinTestCard()
            conn = VscConnection()
            writer.write(encode_vsc(VscInit(0)) + encode_vsc(VscAtr(0, card.power_on())))
            while data := await reader.read(65536):
                conn.receive_data(data)
                while (msg := conn.next_event()) is not None:
                    if isinstance(msg, VscApdu):
                        writer.write(encode_vsc(VscApdu(0, card.transmit(msg.data))))
            writer.close()

        server = await asyncio.start_unix_server(card_side, str(path))
        async with server:
            sessions = [await AsyncFakeQemu.connect(f"unix:{path}") for _ in range(10)]
            await asyncio.gather(*(s.wait_card() for s in sessions))
            answers = await asyncio.gather(
                *(s.transmit(H("80e0000001") + bytes([i])) for i, s in enumerate(sessions))
            )
            for s in sessions:
                await s.close()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [bytes([i]) + H("9000") for i in range(10)]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "card.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    peers: list[CardPeer] = []

    def serve() -> None:
        conn, _ = server.accept()
        peer = CardPeer(conn)
        peers.append(peer)
        peer.run()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    rc = main(["fake-qemu", "--connect", f"unix:{path}", "--timeout", "5",
               "--apdu", "80E0000002CAFE", "--apdu", "00B0000000"])
    thread.join(timeout=5)
    server.close()
    out = capsys.readouterr().out
    assert rc == 0
    assert f"ATR: {BuiltinTestCard.ATR.hex().upper()}" in out
    assert "< CAFE SW=9000" in out
    assert "SW=6E00" in out  # READ BINARY in class 00: the test card knows only class 80


def test_bad_slot_and_secure_are_refused() -> None:
    core = inserted_core()
    core.send_ccid(CcidGetSlotStatus(1, 1))  # usb-ccid has slot 0 only
    core.send_ccid(CcidSecure(0, 2, H("00")))  # QEMU answers Secure with an error
    bad_slot, secure = drain(core)
    assert isinstance(bad_slot, CcidSlotStatus) and bad_slot.status.failed
    assert bad_slot.status.error == 5  # bError = offset of bSlot (CCID 6.2.6)
    assert isinstance(secure, CcidDataBlock) and secure.status.failed
    assert secure.status.error is CcidError.CMD_NOT_SUPPORTED
