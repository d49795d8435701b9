"""``--compare SPEC`` against a real pcscd: the demo PIV card behind the vpcd bridge is passed
through and compared with another PIV card (other keys and certificates); the log and the trace
name exactly the APDUs whose answers differ, as two in-process cards given the same APDUs say,
and nothing of the PIN."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidemu.card import BuiltinTestCard
from ccidemu.cards import CardOptions, open_card
from ccidemu.certs import generate_test_set
from ccidemu.redact import redact_command
from ccidemu.trace import read_trace
from tests.pcscd.test_pcsc_backend import served
from vmc.lab.pcscd import READER, PcscdHarness

pytestmark = pytest.mark.pcscd

H = bytes.fromhex

APDUS = [
    H("00A4040009A0000003080000100000"),  # SELECT PIV: another label
    H("00CB3FFF055C035FC10200"),  # CHUID: another GUID
    H("00CB3FFF035C017E00"),  # Discovery: the same
    H("00CB3FFF055C035FC10500"),  # the 9A certificate, first part (61xx)
    H("00C0000000"),  # the rest: other bytes
    H("00C0000000"),
    H("00C0000000"),
    H("00CB3FFF055C035FC10900"),  # an object neither has
    H("0020008008313233343536FFFF"),  # VERIFY PIN 123456: both accept it
    H("0020008008393939393939FFFF"),  # a wrong PIN: both count it
    H("00FD000000"),  # GET VERSION: not a PIV command
    H("008703 9B 04 7C028000"),  # a management-key witness: random, and secret (redacted)
]
WITNESS = len(APDUS) - 1


@pytest.fixture(scope="module")
def other_card() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ccidemu-other-"))
    generate_test_set(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _answers(spec: str) -> list[bytes]:
    card = open_card(spec, CardOptions(read_only=True))
    card.power_on()
    return [card.transmit(apdu) for apdu in APDUS]


def test_compare_reports_exactly_the_apdus_that_differ(pcscd: PcscdHarness, other_card: Path,
                                                        ) -> None:
    mine, theirs = _answers("piv:"), _answers(f"piv:{other_card}")
    differ = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
    assert 1 in differ and 7 not in differ and 8 not in differ  # the test can tell
    work = Path(tempfile.mkdtemp(prefix="ccidemu-cmp-"))
    trace = work / "trace.jsonl"
    try:
        pcscd.start_bridge("piv:")
        with served(pcscd, work, f"pcsc:{READER}", extra=("--compare", f"piv:{other_card}"),
                    trace=trace) as (daemon, (fake,)):
            fake.wait_card(timeout=30)
            got = [fake.transmit(apdu, timeout=30) for apdu in APDUS]
            log = daemon.log()
        # the VM gets the passed-through card's answers, always (the witness is random)
        assert got[:WITNESS] == mine[:WITNESS]
        numbers = [int(n) for n in re.findall(r"compare: APDU (\d+) ", log)]
        assert numbers == [i + 1 for i in differ], log[-3000:]
        records = list(read_trace(trace))
        assert [r.command for r in records] == [redact_command(a)[0] for a in APDUS]
        flagged = [i for i, r in enumerate(records) if r.compare is not None]
        assert flagged == differ
        for i in differ:
            if i != WITNESS:
                assert records[i].compare == theirs[i]
        assert "313233343536" not in log and "313233343536" not in trace.read_text()
        assert "393939393939" not in log
        # the witness differs (random on each card) and is shown as its status word only
        assert WITNESS in differ and got[WITNESS][-2:] == H("9000") and len(got[WITNESS]) > 2
        assert records[WITNESS].response == H("9000") and records[WITNESS].redacted
        assert records[WITNESS].compare == H("9000")
        assert (f"compare: APDU {WITNESS + 1} 0087039B04: card 9000, "
                f"piv:{other_card} 9000") in log
        for secret in (got[WITNESS][:-2], records[WITNESS].response[:-2]):
            if secret:
                assert secret.hex().upper() not in log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_compare_with_an_identical_card_is_silent(pcscd: PcscdHarness) -> None:
    work = Path(tempfile.mkdtemp(prefix="ccidemu-cmp-"))
    try:
        pcscd.start_bridge("test:")
        with served(pcscd, work, f"pcsc:{READER}", extra=("--compare", "test:")) as (
                daemon, (fake,)):
            assert fake.wait_card(timeout=30) == BuiltinTestCard.ATR
            assert fake.transmit(H("80E0000003010203"), timeout=30) == H("010203 9000")
            assert fake.transmit(H("80E4000004"), timeout=30) == H("00000002 9000")
            assert "compare:" not in daemon.log()
    finally:
        shutil.rmtree(work, ignore_errors=True)
