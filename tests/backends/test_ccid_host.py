"""The CCID host driver (ccidemu.ccid_host): byte for byte against a real session of the guest's
libccid with QEMU 7.2's usb-ccid (fixtures/samples/usb-ccid-libccid.txt), every exchange level
against the emulated reader of tests/backends/ccid_reader.py, time extensions, timeouts and
Abort, and device bytes that break the protocol (only DeviceError, never anything else)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccidemu.apdu import CommandApdu, parse_command
from ccidemu.card import BuiltinTestCard
from ccidemu.cards import open_card
from ccidemu.ccid import (
    CcidDataBlock,
    CcidGetParameters,
    CcidParameters,
    CcidSlotStatus,
    CommandStatus,
    ExchangeLevel,
    IccStatus,
    SlotStatus,
    T0Parameters,
    decode_ccid,
    encode_ccid,
    parse_ccid_descriptor,
)
from ccidemu.ccid_host import (
    Aborted,
    Answer,
    CcidHostDriver,
    DeviceError,
    DriverEvent,
    Exchange,
    Failed,
    HardwareError,
    PoweredOff,
    PoweredOn,
    SlotChanged,
    Status,
    TimedOut,
    TimeExtension,
    UnsupportedReader,
    check_reader,
    interrupt_event,
)
from tests.backends.ccid_reader import EmulatedReader, descriptor

H = bytes.fromhex
CAPTURE = Path(__file__).resolve().parents[2] / "fixtures" / "samples" / "usb-ccid-libccid.txt"
TEST_ATR = BuiltinTestCard.ATR
FINAL = (PoweredOn, Answer, Status, PoweredOff, Failed)


def _capture() -> tuple[bytes, list[tuple[str, bytes]]]:
    descriptors = b""
    frames = []
    for line in CAPTURE.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        kind, hexdata = line.split()
        if kind == "descriptors":
            descriptors = H(hexdata)
        else:
            frames.append((kind, H(hexdata)))
    return descriptors, frames


def _class_descriptor(descriptors: bytes) -> bytes:
    pos = 0
    while pos < len(descriptors):
        length, kind = descriptors[pos], descriptors[pos + 1]
        if kind == 0x21:
            return descriptors[pos:pos + length]
        pos += length
    raise AssertionError("no class descriptor")


def run(driver: CcidHostDriver, reader: EmulatedReader, *, chunk: int = 64,
        now: float = 0.0) -> tuple[DriverEvent, list[DriverEvent]]:
    """Move frames between driver and reader until the operation's result; (result, all)."""
    seen: list[DriverEvent] = []
    for _ in range(10000):
        while (frame := driver.data_to_send()) is not None:
            reader.bulk_out(frame)
        while (event := driver.next_event()) is not None:
            seen.append(event)
            if isinstance(event, FINAL):
                return event, seen
        data = reader.take(chunk)
        assert data, f"the reader has nothing to say; events {seen}"
        driver.receive_bulk(data, now)
    raise AssertionError("no result")


def powered(reader: EmulatedReader, response_timeout: float = 10.0) -> CcidHostDriver:
    driver = CcidHostDriver(reader.descriptor, response_timeout=response_timeout)
    driver.power_on(0.0)
    event, _ = run(driver, reader)
    assert isinstance(event, PoweredOn), event
    return driver


def transmit(driver: CcidHostDriver, reader: EmulatedReader, apdu: bytes, **kw: int) -> bytes:
    driver.transmit(apdu, 0.0)
    event, _ = run(driver, reader, **kw)
    assert isinstance(event, Answer), event
    return event.response


# --------------------------------------------------------------------------- the real session


def test_qemu_usb_ccid_descriptor_byte_for_byte() -> None:
    descriptors, _ = _capture()
    desc = parse_ccid_descriptor(_class_descriptor(descriptors))
    assert desc.version == "1.10" and desc.slots == 1
    assert int(desc.features) == 0x000104FE  # docs/PROTOCOL.md, "usb-ccid"
    assert desc.exchange_level == ExchangeLevel.TPDU and desc.protocols == 1
    assert desc.max_message_length == 65554 and desc.max_ifsd == 254
    assert check_reader(desc) == "TPDU"


def test_our_frames_are_libccids_and_qemus_answers_decode() -> None:
    """Each command libccid sent that our driver also sends (GetSlotStatus, IccPowerOn,
    XfrBlock) is byte-identical to ours at the same bSeq; QEMU's answers give the events."""
    descriptors, frames = _capture()
    desc = parse_ccid_descriptor(_class_descriptor(descriptors))
    checked = {0x65: 0, 0x62: 0, 0x6F: 0}
    driver = CcidHostDriver(desc)
    atr = b""
    for (kind, out), (kind2, answer) in itertools.pairwise(frames):
        if kind != "out" or kind2 != "in" or out[0] not in checked:
            continue
        seq = out[6]
        driver._seq = seq
        if out[0] == 0x65:
            driver.slot_status(0.0)
        elif out[0] == 0x62:
            driver.power_on(0.0)
        else:
            if driver.exchange is None:  # libccid skipped GetParameters; QEMU's T=0 default
                driver.exchange = Exchange.TPDU_T0
            driver.transmit(out[10:], 0.0)
        assert driver.data_to_send() == out
        driver.receive_bulk(answer, 0.0)
        message, _ = decode_ccid(answer)
        if out[0] == 0x62:  # power-on then asks for the parameters: give it QEMU's T=0
            assert driver.data_to_send() == encode_ccid(CcidGetParameters(0, seq + 1))
            driver.receive_bulk(encode_ccid(CcidParameters(
                0, seq + 1, SlotStatus(), 0, T0Parameters(0x11, 0, 0, 0x0A, 0))), 0.0)
            event = driver.next_event()
            assert isinstance(event, PoweredOn) and event.protocol == 0
            atr = event.atr
            driver._seq = seq + 1
        else:
            event = driver.next_event()
        if out[0] == 0x65:
            assert isinstance(message, CcidSlotStatus) and isinstance(event, Status)
            assert event.present == (message.status.icc_status != IccStatus.ABSENT)
        elif out[0] == 0x6F:
            assert isinstance(message, CcidDataBlock) and event == Answer(message.data)
        checked[out[0]] += 1
    assert atr == open_card("piv:").power_on()
    # pcscd powers the card on, off (reading the ATR) and on again for its first client
    assert checked[0x65] >= 5 and checked[0x62] >= 1 and checked[0x6F] >= 20, checked


def test_notify_slot_change_from_the_capture() -> None:
    _, frames = _capture()
    interrupts = [data for kind, data in frames if kind == "interrupt"]
    assert interrupts[0] == H("5003")
    assert interrupt_event(interrupts[0]) == SlotChanged(True, True)
    assert interrupt_event(H("5002")) == SlotChanged(False, True)
    assert interrupt_event(H("5001")) == SlotChanged(True, False)
    assert interrupt_event(H("5003"), slot=1) == SlotChanged(False, False)
    assert interrupt_event(H("5003"), slot=4) is None  # beyond the one byte sent
    assert interrupt_event(H("51000701")) == HardwareError(1)
    for bad in (H("50"), H("51"), H("510007"), H("")):
        with pytest.raises(DeviceError):
            interrupt_event(bad)


# --------------------------------------------------------------------------- levels


@pytest.mark.parametrize("level", ["short", "extended", "tpdu"])
def test_power_on_and_apdus_at_every_level(level: str) -> None:
    reader = EmulatedReader(BuiltinTestCard(), level)
    driver = CcidHostDriver(reader.descriptor)
    driver.power_on(0.0)
    event, _ = run(driver, reader)
    assert event == PoweredOn(TEST_ATR, 0)
    assert driver.exchange == {"short": Exchange.SHORT_APDU, "extended": Exchange.EXTENDED_APDU,
                               "tpdu": Exchange.TPDU_T0}[level]
    assert transmit(driver, reader, H("80E000000301020300")) == H("010203 9000")
    assert transmit(driver, reader, H("80E2000010")) == bytes(range(16)) + H("9000")
    assert transmit(driver, reader, H("00A4040008F0636369646D7501")) == H("9000")
    driver.slot_status(0.0)
    assert run(driver, reader)[0] == Status(True, True)
    driver.power_off(0.0)
    assert run(driver, reader)[0] == PoweredOff()
    driver.slot_status(0.0)
    assert run(driver, reader)[0] == Status(True, False)


def test_t0_tpdu_case_4_fetches_with_get_response() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu")
    driver = powered(reader)
    reader.commands.clear()
    # case 4: echo with Le; the TPDU goes without Le, the card says 61 03, GET RESPONSE 03
    assert transmit(driver, reader, H("80E000000301020300")) == H("010203 9000")
    sent = [c.data for c in reader.commands]  # type: ignore[union-attr]
    assert sent == [H("80E0000003010203"), H("00C0000003")]
    # Le smaller than the data: GET RESPONSE asks for Le bytes, the card says 61xx for the rest
    reader.commands.clear()
    assert transmit(driver, reader, H("80E000000401020304 02")) == H("0102 6102")
    assert [c.data for c in reader.commands] == [H("80E000000401020304"),  # type: ignore[union-attr]
                                                 H("00C0000002")]


def test_t0_tpdu_case_2_with_a_wrong_le_is_sent_again() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu")
    driver = powered(reader)
    reader.commands.clear()
    # the counter answers 4 bytes; Le 10 -> 6C 04 -> again with P3 04
    response = transmit(driver, reader, H("80E4000010"))
    assert response[-2:] == H("9000") and len(response) == 6
    assert [c.data for c in reader.commands] == [H("80E4000010"),  # type: ignore[union-attr]
                                                 H("80E4000004")]
    # case 1 goes with P3 = 00
    reader.commands.clear()
    assert transmit(driver, reader, H("80E40000")) == H("6C04")
    assert reader.commands[0].data == H("80E4000000")  # type: ignore[union-attr]


def test_t0_tpdu_a_piv_certificate_through_61xx() -> None:
    card = open_card("piv:")
    reader = EmulatedReader(card, "tpdu")
    driver = powered(reader)
    assert transmit(driver, reader, H("00A4040009A0000003080000100000"))[-2:] == H("9000")
    first = transmit(driver, reader, H("00CB3FFF055C035FC10500"))
    data, sw = bytearray(first[:-2]), first[-2:]
    while sw[0] == 0x61:
        part = transmit(driver, reader, H("00C00000") + sw[1:])
        data += part[:-2]
        sw = part[-2:]
    assert sw == H("9000")
    reference = open_card("piv:")
    reference.power_on()
    reference.transmit(H("00A4040009A00000030800001000"))
    answer = reference.transmit(H("00CB3FFF055C035FC10500"))
    whole = bytearray(answer[:-2])
    while answer[-2] == 0x61:
        answer = reference.transmit(H("00C00000") + answer[-1:])
        whole += answer[:-2]
    assert bytes(data) == bytes(whole) and len(data) > 700


class ExtendedEcho(BuiltinTestCard):
    """Answers an extended ``80 E0`` command with its data (the built-in card's is short)."""

    def transmit(self, apdu: bytes) -> bytes:
        command = parse_command(apdu)
        if command.ins == 0xE0 and command.is_extended:
            return command.data + H("9000")
        return super().transmit(apdu)


def _extended_echo(payload: bytes) -> bytes:
    return CommandApdu(0x80, 0xE0, 0, 0, payload, ne=65536, extended=True).encode()


def test_extended_level_chains_long_commands_and_answers() -> None:
    reader = EmulatedReader(ExtendedEcho(), "extended")  # dwMaxCCIDMessageLength 271
    driver = powered(reader)
    payload = bytes(i & 0xFF for i in range(1000))
    reader.commands.clear()
    assert transmit(driver, reader, _extended_echo(payload)) == payload + H("9000")
    levels = [c.level_parameter for c in reader.commands]  # type: ignore[union-attr]
    # 1009 command bytes in 261-byte blocks: begins (1), continues (3, 3), ends (2); the
    # 1002-byte answer in 261-byte parts: the host asks for each further one with 10
    assert levels == [1, 3, 3, 2, 0x10, 0x10, 0x10]
    chains: list[int] = []

    def note(frame: bytes) -> bytes:
        chains.append(frame[9])
        return frame

    reader.commands.clear()
    reader.corrupt = note
    assert transmit(driver, reader, _extended_echo(payload)) == payload + H("9000")
    assert chains == [0x10, 0x10, 0x10, 0x01, 0x03, 0x03, 0x02]  # bChainParameter


def test_t1_tpdu_with_chaining_both_ways_and_wtx() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu", protocol=1, ifsc=32, t1_wtx=1)
    reader.card = open_card("piv:")
    driver = powered(reader)
    assert driver.exchange == Exchange.TPDU_T1 and driver.protocol == 1
    # features have AUTO_IFSD: no S(IFS); the first block is our I(0) of the SELECT
    select = H("00A4040009A00000030800001000")
    response = transmit(driver, reader, select)
    direct = open_card("piv:")
    direct.power_on()
    # the application property template (tag 61), whole, as the card answers it directly
    assert response == direct.transmit(select) and response[:1] == H("61")
    assert response[-2:] == H("9000")
    blocks = reader.t1_blocks
    prologue = bytes((0x00, 0x00, len(select)))
    assert blocks[0] == prologue + select + bytes((_lrc(prologue + select),))
    assert blocks[1] == H("00E30102E0")  # S(WTX response) echoing the card's request
    # a 100-byte echo goes in blocks of IFSC 32: I(M) x3 then the last, each acknowledged
    reader.card = BuiltinTestCard()
    payload = bytes(range(100))
    start = len(blocks)
    assert transmit(driver, reader, H("80E0000064") + payload + H("00")) == payload + H("9000")
    pcbs = [b[1] for b in blocks[start:]]
    assert pcbs == [0x60, 0x20, 0x60, 0x00]  # I(1,M) I(0,M) I(1,M) I(0)
    # the card chains a 258-byte answer to our IFSD 254: we acknowledge with R(N(R))
    start = len(blocks)
    assert transmit(driver, reader, H("80E2000000")) == bytes(i & 0xFF for i in range(256)) + \
        H("9000")
    assert [b[1] for b in blocks[start:]] == [0x40, 0x90]  # I(1), then R(1) for the rest


def test_t1_recovers_from_a_corrupt_block_and_gives_up_after_three() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu", protocol=1)
    driver = powered(reader)
    flip = lambda b: b[:-1] + bytes((b[-1] ^ 0xFF,))  # noqa: E731 (a wrong LRC)
    reader.t1_faults.append(flip)
    assert transmit(driver, reader, H("80E0000003010203")) == H("010203 9000")
    assert reader.t1_blocks[-1][1] & 0xEF == 0x81  # we asked again: R-block, EDC error
    for _ in range(3):  # the card's answer, and its two repetitions
        reader.t1_faults.append(flip)
    driver.transmit(H("80E0000003010203"), 0.0)
    event, _ = run(driver, reader)
    assert isinstance(event, Failed) and "resynchronised" in event.reason
    assert any(b[1] == 0xC0 for b in reader.t1_blocks)  # S(RESYNCH request)
    reader.t1_faults.clear()
    assert transmit(driver, reader, H("80E0000003040506")) == H("040506 9000")


def test_t1_only_card_on_a_tpdu_reader_that_does_not_negotiate_is_refused() -> None:
    class T1Only(BuiltinTestCard):
        ATR = H("3B800181")  # TD1: T=1 only, TCK 81

    reader = EmulatedReader(T1Only(), "tpdu", protocol=1, features=0)
    driver = CcidHostDriver(reader.descriptor)
    driver.power_on(0.0)
    event, _ = run(driver, reader)
    assert isinstance(event, Failed) and event.unsupported
    assert "automatic parameters negotiation" in event.reason and "pcsc:" in event.reason


def test_t0_on_a_tpdu_reader_that_does_not_negotiate_gets_set_parameters() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu", features=0)
    driver = powered(reader)
    kinds = [type(c).__name__ for c in reader.commands]
    assert kinds == ["CcidIccPowerOn", "CcidGetParameters", "CcidSetParameters"]
    assert reader.commands[2].parameters == T0Parameters(0x11, 0, 0, 10, 0)  # type: ignore[union-attr]
    assert transmit(driver, reader, H("80E000000301020300")) == H("010203 9000")
    # case 3 (no Le): a T=0 card's 61xx goes to the application, which fetches it
    assert transmit(driver, reader, H("80E0000003010203")) == H("6103")


def test_character_level_readers_are_refused_saying_why() -> None:
    with pytest.raises(UnsupportedReader, match="characters"):
        CcidHostDriver(descriptor("character"))
    with pytest.raises(UnsupportedReader, match="neither T=0 nor T=1"):
        CcidHostDriver(descriptor("short", protocols=0))


def test_no_card_and_a_removed_card() -> None:
    reader = EmulatedReader(None, "short")
    driver = CcidHostDriver(reader.descriptor)
    driver.power_on(0.0)
    event, _ = run(driver, reader)
    assert event == Failed("IccPowerOn: no card in the reader", absent=True)
    reader.insert(BuiltinTestCard())
    assert interrupt_event(reader.interrupts.popleft()) == SlotChanged(True, True)
    driver.power_on(0.0)
    assert isinstance(run(driver, reader)[0], PoweredOn)
    reader.remove()
    driver.transmit(H("80E0000003010203"), 0.0)
    event, _ = run(driver, reader)
    assert event == Failed("XfrBlock: no card in the reader", absent=True)


# --------------------------------------------------------------------------- time


def test_time_extensions_move_the_deadline() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader, response_timeout=5.0)
    reader.time_extensions = 2
    driver.transmit(H("80E0000003010203"), 100.0)
    assert driver.deadline == 105.0
    reader.bulk_out(driver.data_to_send() or b"")
    extension = reader.take_transfer(100)
    driver.receive_bulk(extension, 104.0, transfer_end=True)  # the card asks for more time
    assert driver.next_event() == TimeExtension(1)
    assert driver.deadline == 109.0
    assert not driver.check_timeout(108.0)
    driver.receive_bulk(reader.take_transfer(100), 108.5, transfer_end=True)
    assert driver.next_event() == TimeExtension(1) and driver.deadline == 113.5
    driver.receive_bulk(reader.take_transfer(100), 113.0, transfer_end=True)
    assert driver.next_event() == Answer(H("010203 9000"))
    assert not driver.check_timeout(1000.0)  # nothing is due any more


def test_an_overdue_answer_times_out_and_is_aborted() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader, response_timeout=5.0)
    reader.mute = True
    driver.transmit(H("80E0000003010203"), 10.0)
    frame = driver.data_to_send()
    assert frame is not None
    reader.bulk_out(frame)
    assert not driver.check_timeout(14.9)
    assert driver.check_timeout(15.0)
    assert driver.next_event() == TimedOut(frame[6])
    value = driver.abort(15.0)
    abort_frame = driver.data_to_send()
    assert abort_frame is not None and abort_frame[0] == 0x72
    assert value == abort_frame[6] << 8 | 0  # wValue: bSeq << 8 | bSlot, section 5.3.1
    reader.bulk_out(abort_frame)
    # the aborted command's late answer (its bSeq) is dropped, then the Abort is confirmed
    late = CcidDataBlock(0, frame[6], SlotStatus(), H("9000"))
    driver.receive_bulk(encode_ccid(late) + reader.take(1000), 15.0)
    assert driver.next_event() == Aborted()
    assert not driver.busy
    reader.mute = False
    assert transmit(driver, reader, H("80E0000003040506")) == H("040506 9000")


# --------------------------------------------------------------------------- bad device bytes


def _answer_frame(driver: CcidHostDriver, reader: EmulatedReader) -> bytes:
    frame = driver.data_to_send()
    assert frame is not None
    reader.bulk_out(frame)
    return reader.take(100000)


def _other_seq(frame: bytes) -> bytes:
    return frame[:6] + bytes((frame[6] ^ 1,)) + frame[7:]


def _other_slot(frame: bytes) -> bytes:
    return frame[:5] + b"\x01" + frame[6:]


def _slot_status(frame: bytes) -> bytes:
    return encode_ccid(CcidSlotStatus(0, frame[6], SlotStatus()))


@pytest.mark.parametrize(("mutate", "text"), [(_other_seq, "bSeq"), (_other_slot, "slot 0"),
                                              (_slot_status, "answered XfrBlock with")])
def test_wrong_seq_wrong_slot_wrong_type(mutate: Callable[[bytes], bytes], text: str) -> None:
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader)
    driver.transmit(H("80E0000003010203"), 0.0)
    answer = _answer_frame(driver, reader)
    with pytest.raises(DeviceError, match=text):
        driver.receive_bulk(mutate(answer), 0.0)
    assert not driver.busy


def test_an_unasked_answer_is_our_error() -> None:
    driver = powered(EmulatedReader(BuiltinTestCard(), "short"))
    with pytest.raises(DeviceError, match="unasked"):
        driver.receive_bulk(encode_ccid(CcidSlotStatus(0, 9, SlotStatus())), 0.0)


def test_a_short_or_over_long_frame_is_our_error() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader)
    driver.transmit(H("80E0000003010203"), 0.0)
    answer = _answer_frame(driver, reader)
    driver.receive_bulk(answer[:7], 0.0)  # a short read: waits for more
    assert driver.busy and driver.next_event() is None
    driver.receive_bulk(answer[7:], 0.0)
    assert driver.next_event() == Answer(H("010203 9000"))
    driver.transmit(H("80E0000003010203"), 0.0)
    _answer_frame(driver, reader)
    with pytest.raises(DeviceError, match="dwLength"):
        driver.receive_bulk(H("80ffffff7f0001000000"), 0.0)  # a 2 GiB DataBlock announced
    with pytest.raises(DeviceError):
        driver.receive_bulk(H("6f00000000000100000000"), 0.0)  # a host command, inward
    value = driver.abort(0.0)  # resynchronised: a fresh stream
    assert value >> 8 == driver._seq - 1
    reader.bulk_out(driver.data_to_send() or b"")
    driver.receive_bulk(reader.take(1000), 0.0)
    assert driver.next_event() == Aborted()


@given(st.lists(st.binary(max_size=80), max_size=8))
def test_garbage_from_the_device_raises_only_device_error(chunks: list[bytes]) -> None:
    reader = EmulatedReader(BuiltinTestCard(), "tpdu")
    driver = powered(reader)
    driver.transmit(H("80E0000003010203"), 0.0)
    driver.data_to_send()
    for chunk in chunks:
        try:
            driver.receive_bulk(chunk, 0.0)
        except DeviceError:
            driver.abort(0.0)
            driver.data_to_send()
        while (event := driver.next_event()) is not None:
            assert isinstance(event, (*FINAL, TimeExtension, Aborted))
    with contextlib.suppress(DeviceError):
        interrupt_event(b"".join(chunks))


@given(st.data())
def test_corrupted_answers_give_an_answer_a_failure_or_device_error(data: st.DataObject) -> None:
    """Any one byte of any answer in a T=0 exchange changed (or cut): never anything but
    DeviceError or an event."""
    reader = EmulatedReader(open_card("test:"), "tpdu")
    driver = powered(reader)
    position = data.draw(st.integers(0, 40))
    value = data.draw(st.integers(0, 255))
    cut = data.draw(st.booleans())

    def corrupt(frame: bytes) -> bytes:
        if position >= len(frame):
            return frame
        if cut:
            return frame[:position]
        return frame[:position] + bytes((value,)) + frame[position + 1:]

    reader.corrupt = corrupt
    driver.transmit(H("80E000000301020300"), 0.0)
    for _ in range(20):
        while (frame := driver.data_to_send()) is not None:
            reader.bulk_out(frame)
        chunk = reader.take(64)
        if not chunk:
            break
        try:
            driver.receive_bulk(chunk, 0.0)
        except DeviceError:
            return
        event = driver.next_event()
        if event is not None and not isinstance(event, TimeExtension):
            assert isinstance(event, FINAL)
            return


@given(st.binary(min_size=1, max_size=300), st.integers(1, 64))
def test_chunking_changes_nothing(payload: bytes, chunk: int) -> None:
    payload = payload[:255]
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader)
    apdu = H("80E00000") + bytes([len(payload)]) + payload
    assert transmit(driver, reader, apdu, chunk=chunk) == payload + H("9000")


def test_one_operation_at_a_time() -> None:
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader)
    driver.transmit(H("80E0000003010203"), 0.0)
    with pytest.raises(RuntimeError):
        driver.slot_status(0.0)
    driver.give_up()
    assert not driver.busy
    reader.bulk_out(driver.data_to_send() or encode_ccid(CcidSlotStatus(0, 0, SlotStatus())))


def test_time_extension_status_is_not_a_failure() -> None:
    ext = SlotStatus(IccStatus.PRESENT_ACTIVE, CommandStatus.TIME_EXTENSION, 4)
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader, response_timeout=2.0)
    driver.slot_status(50.0)
    frame = driver.data_to_send()
    assert frame is not None
    driver.receive_bulk(encode_ccid(CcidSlotStatus(0, frame[6], ext)), 51.0)
    assert driver.next_event() == TimeExtension(4)
    assert driver.deadline == 51.0 + 2.0 * 4


def _lrc(data: bytes) -> int:
    value = 0
    for byte in data:
        value ^= byte
    return value


def test_bytes_after_the_message_in_one_transfer_are_dropped() -> None:
    """QEMU 7.2's usb-ccid answers GetParameters (before any SetParameters) with dwLength 0
    and 7 more bytes in the same transfer (captured by QEMU's own pcap in the test guest)."""
    qemu = H("820000000000010000000000000000fe00")
    descriptors, _ = _capture()
    driver = CcidHostDriver(parse_ccid_descriptor(_class_descriptor(descriptors)))
    driver.power_on(0.0)
    driver.data_to_send()
    atr = open_card("piv:").power_on()
    driver.receive_bulk(encode_ccid(CcidDataBlock(0, 0, SlotStatus(), atr)), 0.0,
                        transfer_end=True)
    assert driver.data_to_send() == encode_ccid(CcidGetParameters(0, 1))
    driver.receive_bulk(qemu, 0.0, transfer_end=True)
    assert driver.next_event() == PoweredOn(atr, 0)
    driver.transmit(H("00A4040009A0000003080000100000"), 0.0)
    assert driver.data_to_send() is not None
    driver.receive_bulk(encode_ccid(CcidDataBlock(0, 2, SlotStatus(), H("9000"))), 0.0,
                        transfer_end=True)
    assert driver.next_event() == Answer(H("9000"))
    # a transfer that ends before its message does is a broken frame
    driver.transmit(H("00A4040000"), 0.0)
    driver.data_to_send()
    with pytest.raises(DeviceError, match="ended inside a message"):
        driver.receive_bulk(H("8002000000"), 0.0, transfer_end=True)


def test_a_message_and_garbage_in_one_transfer() -> None:
    """The bytes after a message in its transfer are not read as a next message, however many
    there are (here 12, enough for a header that would be refused)."""
    reader = EmulatedReader(BuiltinTestCard(), "short")
    driver = powered(reader)
    driver.transmit(H("80E0000003010203"), 0.0)
    reader.bulk_out(driver.data_to_send() or b"")
    answer = reader.take_transfer(1000)
    driver.receive_bulk(answer + H("6f ffffff7f 0000 0000 0000 00"), 0.0, transfer_end=True)
    assert driver.next_event() == Answer(H("010203 9000"))
    assert transmit(driver, reader, H("80E0000003040506")) == H("040506 9000")
