"""``ctl attach`` and ``ctl detach`` against a real QEMU guest: a guest whose chardev address is
attached after the daemon started sees the card; after detach it sees the card leave."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import TEST_ATR_TEXT
from vmc.lab.guest import ChardevMode, Guest, GuestImage, boot_guest, wait_apdus_work
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest(guest_image: GuestImage, e2e_dir: Path) -> Iterator[Guest]:
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER) as g:
        yield g


def test_attach_then_detach_a_running_guest(guest: Guest, e2e_dir: Path) -> None:
    # the daemon serves another VM only; the guest's chardev is not known to it yet
    daemon = ServeProcess(e2e_dir / "serve", e2e_dir / "other.sock", ChardevMode.QEMU_CLIENT)
    daemon.start()
    try:
        assert [vm["vm"] for vm in daemon.ctl_json("list")] == ["vm1"]
        mark = len(guest.pcscd_log())
        attached = daemon.ctl_json("attach", "guest", "--connect", f"unix:{guest.vsc_socket}",
                                   "--card", "test:")
        assert attached["vm"] == "guest" and attached["mode"] == "connect"
        out = guest.wait_card()
        assert out.strip().splitlines()[-1] == TEST_ATR_TEXT
        wait_apdus_work(guest)
        guest.wait_pcscd_log(r"Card inserted into", since=mark)
        listing = {vm["vm"]: vm for vm in daemon.ctl_json("list")}
        assert listing["guest"]["connected"] and listing["guest"]["readers"][0]["apdus"] > 0
        mark = len(guest.pcscd_log())
        assert daemon.ctl_json("detach", "guest") == {"detached": "guest"}
        guest.wait_pcscd_log(r"Card Removed From", since=mark)
        gone = guest.run("opensc-tool -a", timeout=20)
        assert gone.status != 0, gone.output
        assert [vm["vm"] for vm in daemon.ctl_json("list")] == ["vm1"]
    finally:
        daemon.stop()
