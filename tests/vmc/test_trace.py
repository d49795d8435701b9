"""APDU trace records (ccidemu.trace): format, redaction, reader errors with line numbers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.errors import ConfigError
from ccidemu.trace import (
    TraceRecord,
    describe_exchange,
    format_record,
    parse_record,
    read_trace,
    redact_command,
)

H = bytes.fromhex

REDACTION = [  # ISO/IEC 7816-4 sections 11.5.6/7/10; Lc per ISO/IEC 7816-3 section 12.1.3
    pytest.param(H("0020008008313233343536ffff"), H("0020008008"), True, id="verify-short"),
    pytest.param(H("0024008010" + "31" * 16), H("0024008010"), True, id="change-ref-data"),
    pytest.param(H("002C008010" + "32" * 16), H("002C008010"), True, id="reset-retry-counter"),
    pytest.param(H("0020008000000431323334"), H("00200080000004"), True, id="verify-extended"),
    pytest.param(H("00200080"), H("00200080"), False, id="verify-retry-query-case1"),
    pytest.param(H("0020008000"), H("0020008000"), False, id="verify-case2"),
    pytest.param(H("00200080000000"), H("00200080000000"), False, id="verify-case2e"),
    pytest.param(H("00a4040007a0000000031010"), H("00a4040007a0000000031010"), False,
                 id="select-kept"),
    pytest.param(H("ff20000003010203"), H("ff20000003010203"), False, id="cla-ff-not-iso"),
    pytest.param(H("1020008008" + "00" * 8), H("1020008008"), True, id="chained-verify"),
]


@pytest.mark.parametrize(("command", "shown", "redacted"), REDACTION)
def test_redact_command(command: bytes, shown: bytes, redacted: bool) -> None:
    assert redact_command(command) == (shown, redacted)


def record(command: bytes = H("0020008004 31323334"), **kw: object) -> TraceRecord:
    base: dict[str, object] = dict(
        time=1714564800.25, session=3, reader=0, command=command, response=H("9000"),
        duration=0.000125,
    )
    base.update(kw)
    return TraceRecord(**base)  # type: ignore[arg-type]


def test_format_record_exact_line() -> None:
    line = format_record(record())
    assert json.loads(line) == {
        "time": "2024-05-01T12:00:00.250000Z",
        "session": 3,
        "reader": 0,
        "command": "0020008004",
        "response": "9000",
        "duration": 0.000125,
        "redacted": True,
    }
    assert "\n" not in line
    assert "31323334" in format_record(record(), secrets=True)
    assert "redacted" not in format_record(record(), secrets=True)


def test_error_records_round_trip() -> None:
    r = record(H("80e0000001aa"), response=b"", error="card error: gone")
    assert parse_record(format_record(r)) == r


@settings(max_examples=150, deadline=None)
@given(
    time=st.floats(0, 4e9, allow_nan=False),
    session=st.integers(0, 2**32),
    reader=st.integers(0, 16),
    command=st.binary(max_size=300),
    response=st.binary(max_size=300),
    duration=st.floats(0, 100, allow_nan=False),
    error=st.none() | st.text(max_size=20),
)
def test_round_trip_with_secrets(
    time: float, session: int, reader: int, command: bytes, response: bytes,
    duration: float, error: str | None,
) -> None:
    r = TraceRecord(time, session, reader, command, response, duration, False, error)
    back = parse_record(format_record(r, secrets=True))
    assert (back.session, back.reader, back.command, back.response, back.error) == (
        session, reader, command, response, error
    )
    assert abs(back.time - time) < 1e-5
    assert abs(back.duration - duration) <= 1e-6


def test_epoch_time_accepted() -> None:
    line = '{"time": 10.5, "session": 1, "reader": 0, "command": "00", "response": "9000"}'
    assert parse_record(line).time == 10.5


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"session": 1}', "missing 'time'"),
        ('{"time": "yesterday", "session": 1, "reader": 0, "command": "", "response": ""}',
         "ISO-8601"),
        ('{"time": 1, "session": -1, "reader": 0, "command": "", "response": ""}', "session"),
        ('{"time": 1, "session": 1, "reader": 0, "command": "zz", "response": ""}', "hex"),
        ('{"time": 1, "session": 1, "reader": 0, "command": "", "response": 5}', "response"),
        ('{"time": 1, "session": 1, "reader": 0, "command": "", "response": "",'
         ' "duration": -1}', "duration"),
        ('{"time": true, "session": 1, "reader": 0, "command": "", "response": ""}', "time"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    good = format_record(record())
    path = tmp_path / "t.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ConfigError, match=rf"t\.jsonl:3: .*{reason}"):
        list(read_trace(path))


def test_read_trace_from_lines_and_missing_file(tmp_path: Path) -> None:
    lines = [format_record(record()), format_record(record(H("80e0000001aa")))]
    assert [r.command for r in read_trace(lines)] == [H("0020008004"), H("80e0000001aa")]
    with pytest.raises(ConfigError, match="cannot read trace"):
        list(read_trace(tmp_path / "absent.jsonl"))


@settings(max_examples=150, deadline=None)
@given(
    st.text(max_size=200)
    | st.builds(
        json.dumps,
        st.dictionaries(
            st.sampled_from(["time", "session", "reader", "command", "response", "duration",
                             "redacted", "error"]),
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        ),
    )
)
def test_arbitrary_lines_raise_only_config_error(line: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_record(line)


def test_describe_exchange_names_and_redacts() -> None:
    text = describe_exchange(H("0020008008 3132333435363738"), H("63c2"))
    assert "VERIFY" in text and "3132" not in text and "redacted" in text
    assert "2 tries left" in text
    assert "proprietary INS E0" in describe_exchange(H("80e0000001aa"), H("aa9000"))
    # one rule with describe_command: CLA FF (PC/SC pseudo-APDU) is not ISO's either
    assert describe_exchange(H("ffca000000"), H("9000")).startswith("proprietary INS CA:")
