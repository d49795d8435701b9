"""QEMU as chardev server, ``ccidemu serve --connect``: the guest's pcscd + libccid + OpenSC
talk to the built-in test card through QEMU's usb-ccid + ccid-card-passthru (one boot for
the module; each test starts its own daemon against the same QEMU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ccidemu.trace import TraceRecord, read_trace
from tests.support import TEST_ATR_TEXT, opensc_responses
from vmc.lab.guest import (
    ECHO,
    ChardevMode,
    Guest,
    GuestImage,
    boot_guest,
    wait_apdus_work,
)
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest(guest_image: GuestImage, e2e_dir: Path) -> Iterator[Guest]:
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER) as g:
        yield g


@pytest.fixture
def daemon(guest: Guest, e2e_dir: Path, request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    workdir = e2e_dir / request.node.name[:40]
    proc = ServeProcess(
        workdir, guest.vsc_socket, ChardevMode.QEMU_SERVER, trace=workdir / "trace.jsonl"
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def wait_trace(
    path: Path, done: Callable[[list[TraceRecord]], bool], timeout: float = 5
) -> list[TraceRecord]:
    """The trace's records once ``done(records)`` holds (the daemon may write a bit later)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_trace(path)) if path.exists() else []
        if done(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def only_session(daemon: ServeProcess) -> int:
    """The id of the one connected session, from ``ccidemu ctl --json list``."""
    listing = daemon.ctl_json("list")
    connected = [s for s in listing if s.get("connected")]
    assert len(connected) == 1, f"expected one connected session: {listing}"
    return int(connected[0]["session"])


def test_atr_and_apdus_reach_the_test_card(guest: Guest, daemon: ServeProcess) -> None:
    out = guest.wait_card()
    assert out.strip().splitlines()[-1] == TEST_ATR_TEXT
    out = guest.check(f"opensc-tool -s {ECHO} -s 80E4000004 -s 80E4000004 -s 80CA000000")
    responses = opensc_responses(out)
    assert len(responses) == 4, out
    assert responses[0] == bytes.fromhex("010203 9000")
    # The APDU counter: consecutive reads differ by one; unknown INS gets 6D00.
    first, second = (int.from_bytes(r[:4], "big") for r in responses[1:3])
    assert responses[1][4:] == responses[2][4:] == b"\x90\x00"
    assert second == first + 1
    assert responses[3] == bytes.fromhex("6D00")
    # The card counted exactly the APDUs the daemon traced up to that read: every APDU the
    # guest sent (including OpenSC's own probing) reached this card, one trace line each.
    assert daemon.trace is not None
    records = wait_trace(daemon.trace, lambda rs: len(rs) >= first + 1)
    commands = [r.command for r in records]
    assert bytes.fromhex("80E4000004") in commands
    assert commands.index(bytes.fromhex("80E4000004")) + 1 == first
    assert records[commands.index(bytes.fromhex("80E4000004")) + 1].response == (
        second.to_bytes(4, "big") + b"\x90\x00"
    )
    records = wait_trace(daemon.trace, lambda rs: len(rs) >= first + 2)  # + counter, 80CA
    stats = daemon.ctl_json("stats")
    assert stats["apdus"] == len(records) == first + 2, (stats, len(records))


def test_daemon_killed_and_restarted(guest: Guest, daemon: ServeProcess) -> None:
    wait_apdus_work(guest)
    daemon.kill()
    # While no daemon runs the guest's APDUs go nowhere (QEMU keeps the card "present").
    result = guest.run(f"opensc-tool -s {ECHO}", timeout=5)
    assert not opensc_responses(result.output) or result.status != 0, result.output
    daemon.start()
    out = wait_apdus_work(guest, timeout=60)  # (a generous bound: speed claims go in bench/)
    assert opensc_responses(out)[0] == bytes.fromhex("010203 9000")


def test_remove_and_insert_through_ctl(guest: Guest, daemon: ServeProcess) -> None:
    guest.wait_card()
    session = only_session(daemon)
    mark = len(guest.pcscd_log())
    entry = daemon.ctl_json("remove", str(session))
    assert entry["readers"][0]["present"] is False, entry
    guest.wait_pcscd_log(r"Card Removed From", since=mark)
    result = guest.run("opensc-tool -a", timeout=15)
    assert result.status != 0, result.output
    assert "Card not present" in result.output or "No smart card" in result.output, result.output

    mark = len(guest.pcscd_log())
    entry = daemon.ctl_json("insert", str(session))
    assert entry["readers"][0]["present"] is True, entry
    guest.wait_pcscd_log(r"Card inserted into", since=mark)
    out = guest.check("opensc-tool -a")
    assert out.strip().splitlines()[-1] == TEST_ATR_TEXT
    responses = opensc_responses(guest.check(f"opensc-tool -s {ECHO}"))
    assert responses == [bytes.fromhex("010203 9000")]
