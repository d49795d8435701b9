"""``serve --compare`` fields in the trace format: written, read back, redacted on their own."""

from __future__ import annotations

from pathlib import Path

from ccidemu.traces import TraceWriter, read_trace
from ccidemu.traces.model import Exchange

H = bytes.fromhex
VERIFY = H("002000800831323334353637ff")  # VERIFY PIN: the command is the secret
WITNESS = H("0087039b047c028000")  # GENERAL AUTHENTICATE, witness request: the answer is secret


def test_compare_fields_round_trip_and_redaction(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, source="test")
    writer.exchange(H("00a4040005a000000308"), H("6a82"), reader=0, session=1,
                    compare=H("9000"))
    writer.exchange(WITNESS, H("7c0a800811223344556677889000"), reader=0, session=1,
                    compare=H("7c0a8008aabbccddeeff00119000"))
    writer.exchange(VERIFY, H("9000"), reader=0, session=1, compare_error="CardError: gone")
    writer.exchange(H("80e0000001ff"), H("ff9000"), reader=0, session=1)
    writer.close()
    records = [r for r in read_trace(path) if isinstance(r, Exchange)]
    assert [r.compare for r in records] == [H("9000"), H("9000"), None, None]
    assert not records[0].redacted
    # the witnesses on both sides are cut to their status word, and say so
    assert records[1].response == H("9000") and records[1].response_redacted
    assert records[1].compare_redacted
    assert records[2].compare_error == "CardError: gone" and records[2].command_redacted
    assert records[3].compare is None and not records[3].redacted
    text = path.read_text()
    for secret in ("1122334455667788", "aabbccddeeff0011", "31323334353637"):
        assert secret not in text
