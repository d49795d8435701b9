"""Status words: ISO/IEC 7816-4:2013 section 5.6, tables 5 and 6."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.sw import (
    SW,
    bytes_available,
    exact_length,
    is_success,
    retries_left,
    sw_bytes,
    sw_meaning,
)


@pytest.mark.parametrize(
    ("sw", "value"),
    [
        (SW.OK, 0x9000),
        (SW.WRONG_LENGTH, 0x6700),
        (SW.SECURITY_STATUS_NOT_SATISFIED, 0x6982),
        (SW.AUTH_METHOD_BLOCKED, 0x6983),
        (SW.CONDITIONS_NOT_SATISFIED, 0x6985),
        (SW.WRONG_DATA, 0x6A80),
        (SW.FUNCTION_NOT_SUPPORTED, 0x6A81),
        (SW.FILE_NOT_FOUND, 0x6A82),
        (SW.RECORD_NOT_FOUND, 0x6A83),
        (SW.NOT_ENOUGH_MEMORY, 0x6A84),
        (SW.INCORRECT_P1P2, 0x6A86),
        (SW.REFERENCE_NOT_FOUND, 0x6A88),
        (SW.WRONG_P1P2, 0x6B00),
        (SW.INS_NOT_SUPPORTED, 0x6D00),
        (SW.CLA_NOT_SUPPORTED, 0x6E00),
        (SW.NO_PRECISE_DIAGNOSIS, 0x6F00),
        (SW.LAST_COMMAND_EXPECTED, 0x6883),
        (SW.COMMAND_CHAINING_NOT_SUPPORTED, 0x6884),
    ],
)
def test_table6_values(sw: SW, value: int) -> None:
    assert sw == value
    assert sw_bytes(sw) == value.to_bytes(2, "big")


@pytest.mark.parametrize(
    ("sw", "expected"),
    [
        (0x9000, "success"),
        (0x6110, "success, 16 bytes still available (GET RESPONSE)"),  # table 5: 61xx
        (0x6100, "success, 256 bytes still available (GET RESPONSE)"),
        (0x6C08, "wrong Le field, exact length is 8"),  # table 5: 6Cxx
        (0x6C00, "wrong Le field, exact length is 256"),
        (0x63C3, "verification failed, 3 tries left"),  # table 6: 63Cx
        (0x63C1, "verification failed, 1 try left"),
        (0x63C0, "verification failed, 0 tries left"),
        (0x6982, "security status not satisfied"),
        (0x6A82, "file or application not found"),
        (0x6883, "last command of the chain expected"),
        (0x6A8F, "wrong parameters P1-P2, SW2 8F"),  # group meaning only
        (0x6999, "command not allowed, SW2 99"),
        (0x6610, "security-related issue, SW2 10"),
        (0x6210, "warning: triggering by the card"),
        (0x9123, "proprietary status"),
        (0x1234, "unknown status word"),
        (0x6000, "unknown status word"),
    ],
)
def test_sw_meaning(sw: int, expected: str) -> None:
    assert sw_meaning(sw) == expected


def test_counters() -> None:
    assert bytes_available(0x6110) == 16
    assert bytes_available(0x6100) == 256
    assert bytes_available(0x9000) is None
    assert exact_length(0x6C20) == 32
    assert exact_length(0x6700) is None
    assert retries_left(0x63C2) == 2
    assert retries_left(0x63CF) == 15
    assert retries_left(0x6300) is None
    assert retries_left(0x6983) is None
    assert is_success(0x9000) and is_success(0x6105) and not is_success(0x6A82)


def test_out_of_range() -> None:
    with pytest.raises(ValueError):
        sw_bytes(0x10000)
    with pytest.raises(ValueError):
        sw_meaning(-1)


@settings(max_examples=200)
@given(st.integers(0, 0xFFFF))
def test_every_sw_has_a_meaning(sw: int) -> None:
    text = sw_meaning(sw)
    assert text
    assert int.from_bytes(sw_bytes(sw), "big") == sw
