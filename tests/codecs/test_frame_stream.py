"""The error contract every stream decoder shares (ccidemu._wire.FrameStream).

The events of good frames before a bad one are still delivered; then next_event() raises
DecodeError, and so does every later call to receive_data() or next_event().  An
over-long length is refused from its header alone, before any payload arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ccidemu._wire import FrameStream
from ccidemu.ccid import CcidStream, CcidXfrBlock, encode_ccid
from ccidemu.errors import DecodeError
from ccidemu.vdagent import VdagentStream, VdiChunk
from ccidemu.vpcd import GetAtr, VpcdConnection, encode_frame
from ccidemu.vsc import VscApdu, VscConnection, encode_vsc

CASES: list[Any] = [
    pytest.param(
        VscConnection,
        encode_vsc(VscApdu(0, b"\x90\x00")),
        VscApdu(0, b"\x90\x00"),
        bytes.fromhex("00000007 00000000 fffffff0"),  # vscard_common.h header, 4 GiB payload
        id="vsc",
    ),
    pytest.param(
        CcidStream,
        encode_ccid(CcidXfrBlock(0, 1, b"\x00")),
        CcidXfrBlock(0, 1, b"\x00"),
        bytes.fromhex("6f ffffff7f 00 02 000000"),  # CCID 6.1.4 header, dwLength 2 GiB
        id="ccid",
    ),
    pytest.param(
        VdagentStream,
        bytes.fromhex("01000000 00000000"),  # VDIChunkHeader: port 1, empty chunk
        VdiChunk(1, b""),
        bytes.fromhex("01000000 f0ffffff"),  # chunk of ~4 GiB
        id="vdagent",
    ),
    pytest.param(
        VpcdConnection,
        encode_frame(b"\x04"),
        GetAtr(),
        b"\x00\x00",  # vpcd never sends an empty frame
        id="vpcd",
    ),
]


@pytest.mark.parametrize(("make", "good", "event", "bad"), CASES)
def test_good_frames_before_a_bad_one_then_dead(
    make: Callable[[], FrameStream[Any]], good: bytes, event: object, bad: bytes
) -> None:
    stream = make()
    stream.receive_data(good + bad)
    assert stream.buffered == 0  # the bad header was refused without waiting for a payload
    assert stream.next_event() == event
    assert not stream.dead
    with pytest.raises(DecodeError):
        stream.next_event()
    assert stream.dead
    with pytest.raises(DecodeError, match="dead"):
        stream.next_event()
    with pytest.raises(DecodeError, match="dead"):
        stream.receive_data(good)


@pytest.mark.parametrize(("make", "good", "event", "bad"), CASES)
def test_byte_by_byte_is_the_same(
    make: Callable[[], FrameStream[Any]], good: bytes, event: object, bad: bytes
) -> None:
    stream = make()
    events = []
    for i in range(len(good) * 3):
        stream.receive_data(good[i % len(good) : i % len(good) + 1])
        while (e := stream.next_event()) is not None:
            events.append(e)
    assert events == [event, event, event]
    assert stream.buffered == 0
