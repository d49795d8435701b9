"""The usb-ccid response shaper (vmc.runtime.shaping): no answer of the size QEMU 7.2 loses
(54 bytes) or over the 374 its bulk-in buffer carries; the data and the final status word
reach the guest whole through GET RESPONSE."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vmc.runtime.shaping import LOST_SIZE, MAX_RESPONSE, ResponseShaper, is_get_response

H = bytes.fromhex
CMD = H("80e2000034")


def fetch(shaper: ResponseShaper, first: bytes, le: int = 0) -> tuple[list[bytes], bytes]:
    """The parts the guest sees, following 61xx with GET RESPONSE (Le ``le``, or the
    announced count when 0)."""
    parts = [first]
    while parts[-1][-2] == 0x61 and shaper.pending:
        ask = le or parts[-1][-1]
        answer = shaper.intercept(bytes((0, 0xC0, 0, 0, ask)))
        assert answer is not None
        parts.append(answer)
    data = b"".join(p[:-2] for p in parts)
    return parts, data + parts[-1][-2:]


def test_a_54_byte_answer_comes_in_two_parts() -> None:
    shaper = ResponseShaper()
    response = bytes(range(52)) + H("9000")
    first = shaper.shape(CMD, response)
    assert first == bytes(range(51)) + H("6101")
    assert shaper.intercept(H("00c0000001")) == bytes([51]) + H("9000")
    assert not shaper.pending and shaper.acted == 1


def test_other_sizes_and_statuses_pass_untouched() -> None:
    shaper = ResponseShaper()
    for size in (0, 51, 53, 116, 180, 244, 256):
        response = bytes(size) + H("9000")
        assert shaper.shape(CMD, response) == response
    warning = bytes(52) + H("6282")  # a status 61xx would hide
    assert shaper.shape(CMD, warning) == warning
    assert shaper.acted == 0 and not shaper.pending


def test_switched_off_it_does_nothing() -> None:
    response = bytes(52) + H("9000")
    assert ResponseShaper(enabled=False).shape(CMD, response) == response


def test_another_command_drops_what_was_kept() -> None:
    shaper = ResponseShaper()
    shaper.shape(CMD, bytes(52) + H("9000"))
    assert shaper.intercept(H("00a4040000")) is None  # goes to the card
    assert not shaper.pending
    assert shaper.intercept(H("00c0000001")) is None  # nothing kept any more


def test_a_long_answer_is_chained_and_the_cards_61xx_survives() -> None:
    shaper = ResponseShaper()
    data = bytes(i & 0xFF for i in range(600))
    parts, whole = fetch(shaper, shaper.shape(CMD, data + H("6110")))
    assert whole == data + H("6110")  # the card's own chaining goes on after ours
    assert [len(p) for p in parts] == [258, 258, 90]
    assert parts[0][-2:] == H("6100") and parts[1][-2:] == H("6158")


def test_is_get_response() -> None:
    assert is_get_response(H("00c0000010")) and is_get_response(H("80c00000"))
    assert not is_get_response(H("00c0010010")) and not is_get_response(H("00b0000010"))


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 1200), sw=st.sampled_from([H("9000"), H("6100"), H("6142")]),
       le=st.sampled_from([0, 1, 52, 53, 200, 255]))
def test_every_part_fits_and_nothing_is_lost(size: int, sw: bytes, le: int) -> None:
    shaper = ResponseShaper()
    data = bytes((i * 7) & 0xFF for i in range(size))
    parts, whole = fetch(shaper, shaper.shape(CMD, data + sw), le)
    assert whole == data + sw
    assert all(len(p) != LOST_SIZE and len(p) <= MAX_RESPONSE for p in parts), [
        len(p) for p in parts]
    assert not shaper.pending
