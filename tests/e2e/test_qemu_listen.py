"""QEMU as chardev client (``reconnect=1``), ``ccidemu serve --listen``: the daemon starts
first, QEMU connects to it; after the daemon is killed and restarted on the same path, QEMU
reconnects (about 1 s later) and the guest's APDUs work again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
def listen_env(guest_image: GuestImage, e2e_dir: Path) -> Iterator[tuple[Guest, ServeProcess]]:
    daemon = ServeProcess(
        e2e_dir / "serve", e2e_dir / "vsc.sock", ChardevMode.QEMU_CLIENT,
        trace=e2e_dir / "trace.jsonl",
    )
    daemon.start()  # before QEMU: it connects to the daemon's socket
    try:
        with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_CLIENT) as guest:
            yield guest, daemon
    finally:
        daemon.stop()


def test_listen_mode_atr_and_apdus(listen_env: tuple[Guest, ServeProcess]) -> None:
    guest, daemon = listen_env
    out = guest.wait_card()
    assert out.strip().splitlines()[-1] == TEST_ATR_TEXT
    out = guest.check(f"opensc-tool -s {ECHO} -s 00A4040008F0636369646D7501")  # echo, SELECT
    responses = opensc_responses(out)
    assert responses == [bytes.fromhex("010203 9000"), bytes.fromhex("9000")]
    listing = daemon.ctl_json("list")
    assert [s["mode"] for s in listing if s["connected"]] == ["listen"], listing


def test_listen_mode_daemon_killed_and_restarted(listen_env: tuple[Guest, ServeProcess]) -> None:
    guest, daemon = listen_env
    wait_apdus_work(guest)
    daemon.kill()  # leaves its unix socket file behind, as a crash would
    daemon.start()
    out = wait_apdus_work(guest)
    assert opensc_responses(out)[-1] == bytes.fromhex("010203 9000")
    listing = daemon.ctl_json("list")
    assert sum(1 for s in listing if s["connected"]) == 1, listing
