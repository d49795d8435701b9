"""The trace file (docs/TRACES.md): format 1 lines, format 0 still read, TraceWriter."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccidemu.errors import ConfigError
from ccidemu.traces import (
    Exchange,
    PowerEvent,
    PowerKind,
    Problems,
    TraceFormatError,
    TraceHeader,
    TraceReader,
    TraceWriter,
    format_header,
    format_record,
    read_trace,
)

H = bytes.fromhex
VERIFY = H("0020008008 3132333435363738")


def test_header_and_records_exact_lines() -> None:
    header = TraceHeader(source="ccidemu vpcd", start=1714564800.25, atr=H("3b0a"),
                         protocol="T=1", reader="r0")
    assert json.loads(format_header(header)) == {
        "type": "header", "format": "ccidemu-trace", "version": 1, "source": "ccidemu vpcd",
        "start": "2024-05-01T12:00:00.250000Z", "atr": "3b0a", "protocol": "T=1",
        "reader": "r0", "secrets": False}
    ex = Exchange(H("0020008008"), H("9000"), t=0.5, duration=0.000125, reader="r0",
                  session=2, command_redacted=True)
    assert json.loads(format_record(ex)) == {
        "type": "apdu", "t": 0.5, "reader": "r0", "session": 2, "command": "0020008008",
        "response": "9000", "duration": 0.000125, "redacted": ["command"]}
    power = PowerEvent(PowerKind.ON, t=0.25, reader="r0", atr=H("3b0a"))
    assert json.loads(format_record(power)) == {
        "type": "power", "event": "on", "t": 0.25, "reader": "r0", "atr": "3b0a"}


records = st.one_of(
    st.builds(Exchange, st.binary(max_size=300), st.binary(max_size=300),
              t=st.none() | st.floats(-1e6, 1e6).map(lambda v: round(v, 6)),
              duration=st.none() | st.floats(0, 1e3).map(lambda v: round(v, 6)),
              reader=st.none() | st.text(max_size=12), session=st.none() | st.integers(0, 99),
              command_redacted=st.booleans(), response_redacted=st.booleans(),
              truncated=st.booleans(), error=st.none() | st.text(max_size=20)),
    st.builds(PowerEvent, st.sampled_from(list(PowerKind)),
              t=st.none() | st.floats(0, 1e6).map(lambda v: round(v, 6)),
              reader=st.none() | st.text(max_size=12), atr=st.none() | st.binary(max_size=33),
              error=st.none() | st.text(max_size=20)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=8), st.none() | st.binary(min_size=2, max_size=33))
def test_round_trip(items: list[Exchange | PowerEvent], atr: bytes | None) -> None:
    header = TraceHeader(source="test", start=1e9, atr=atr)
    lines = [format_header(header)] + [format_record(r) for r in items]
    reader = TraceReader(lines)
    assert reader.header == header
    assert list(reader) == items


def test_format0_still_read(tmp_path: Path) -> None:
    """The lines ccidemu serve --trace wrote before format 1 (no header)."""
    path = tmp_path / "old.jsonl"
    path.write_text(
        '{"time":"2024-05-01T12:00:00.250000Z","session":3,"reader":0,"command":"0020008008",'
        '"response":"9000","duration":0.000125,"redacted":true}\n'
        '{"time":"2024-05-01T12:00:01.250000Z","session":3,"reader":1,"command":"00a4",'
        '"response":"","duration":0.0,"error":"card error: gone"}\n')
    reader = read_trace(path)
    assert reader.header.version == 0 and reader.header.start == 1714564800.25
    first, second = list(reader)
    assert first == Exchange(H("0020008008"), H("9000"), t=0.0, duration=0.000125,
                             reader="0", session=3, command_redacted=True)
    assert second.t == 1.0 and second.reader == "1" and second.error == "card error: gone"


def test_appended_runs_share_one_clock() -> None:
    lines = [format_header(TraceHeader(source="a", start=100.0)),
             format_record(Exchange(b"\x00\xa4", b"\x90\x00", t=1.0)),
             format_header(TraceHeader(source="a", start=200.0)),
             format_record(Exchange(b"\x00\xb0", b"\x90\x00", t=1.0))]
    assert [r.t for r in TraceReader(lines)] == [1.0, 101.0]


@pytest.mark.parametrize(("line", "reason"), [
    ("not json", "not JSON"),
    ('{"type":"apdu","command":"zz","response":""}', "hex"),
    ('{"type":"apdu","command":"00","response":"","duration":-1}', "duration"),
    ('{"type":"power","event":"explode"}', "event"),
    ('{"type":"what"}', "unknown record type"),
    ('{"type":"apdu","command":"00","response":"","redacted":["pin"]}', "redacted"),
    ('{"type":"header","format":"ccidemu-trace","version":99}', "newer"),
])
def test_malformed_lines_have_positions_strict_or_skipped(line: str, reason: str) -> None:
    lines = [format_header(TraceHeader()), format_record(Exchange(b"\x00", b"")), line,
             format_record(Exchange(b"\x01", b""))]
    with pytest.raises(TraceFormatError, match=rf"^t:3: .*{reason}"):
        list(TraceReader(lines, name="t"))
    problems = Problems()
    got = list(TraceReader(lines, problems, name="t"))
    assert [r.command for r in got if isinstance(r, Exchange)] == [b"\x00", b"\x01"]
    assert problems.count == 1 and problems.first[0].position == "t:3"


def test_chunking_changes_nothing(tmp_path: Path) -> None:
    import io

    lines = [format_header(TraceHeader(source="x"))] + [
        format_record(Exchange(bytes([i]) * 40, b"\x90\x00", t=i)) for i in range(50)]
    blob = ("\n".join(lines) + "\n").encode()

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            size = 1 + (self.pos * 7919) % 13
            out = blob[self.pos : self.pos + min(size, n if n > 0 else size)]
            self.pos += len(out)
            return out

    assert list(TraceReader(Trickle())) == list(TraceReader(blob))  # type: ignore[arg-type]


def test_writer_private_header_redaction_and_flush(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    clock = iter([1000.0, 1001.5, 1002.0, 1003.0]).__next__
    writer = TraceWriter(path, source="test", clock=clock, reader="r")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    writer.power(PowerKind.ON, reader="r", atr=H("3b0a"))
    writer.exchange(VERIFY, H("9000"), reader="r", duration=0.5)
    writer.exchange(H("0087039b047c028100"), H("7c0a8108" + "11" * 8 + "9000"), reader="r",
                    at=1002.5)
    # flushed: readable while open
    got = list(read_trace(path))
    assert got[0] == PowerEvent(PowerKind.ON, t=1.5, reader="r", atr=H("3b0a"))
    assert got[1] == Exchange(H("0020008008"), H("9000"), t=1.5, duration=0.5, reader="r",
                              command_redacted=True)
    assert isinstance(got[2], Exchange)
    assert got[2].response == H("9000") and got[2].response_redacted and got[2].t == 2.5
    writer.close()
    secret = TraceWriter(tmp_path / "s.jsonl", source="test", secrets=True)
    secret.exchange(VERIFY, H("9000"))
    secret.close()
    (rec,) = list(read_trace(tmp_path / "s.jsonl"))
    assert isinstance(rec, Exchange) and rec.command == VERIFY and not rec.redacted
    assert read_trace(tmp_path / "s.jsonl").header.secrets


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from ccidemu.traces import TraceWriter, PowerKind
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
errors = []
writer = TraceWriter(Path(sys.argv[1]), source="test", on_error=errors.append)
for i in range(200):
    writer.exchange(bytes.fromhex("00a40400") + bytes(40), bytes.fromhex("9000"))
writer.power(PowerKind.OFF)
writer.close()
assert errors == [writer.failed], errors
print(writer.records, writer.failed)
"""


def test_writer_never_raises_on_disk_errors(tmp_path: Path) -> None:
    """A real write error (the file size limit: EFBIG) stops tracing, reported, no raise."""
    import subprocess
    import sys

    path = tmp_path / "t.jsonl"
    result = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    written, _, reason = result.stdout.strip().partition(" ")
    assert 0 < int(written) < 200 and "too large" in reason
    assert "tracing stopped" in result.stderr
    assert len(list(read_trace(path, strict=False))) <= int(written)


def test_writer_refuses_another_users_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trace file"):
        TraceWriter(tmp_path / "missing-dir" / "t.jsonl", source="test")


def test_compat_module_reads_format1(tmp_path: Path) -> None:
    from ccidemu import trace as compat

    path = tmp_path / "t.jsonl"
    with TraceWriter(path, source="test", clock=lambda: 50.0) as writer:
        writer.power(PowerKind.ON, reader="0", session=4)
        writer.exchange(H("00a40400"), H("9000"), reader="0", session=4)
    (rec,) = list(compat.read_trace(path))
    assert (rec.session, rec.reader, rec.command, rec.time) == (4, 0, H("00a40400"), 50.0)
