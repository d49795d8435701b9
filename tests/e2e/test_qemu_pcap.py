"""QEMU's own USB capture (``-device usb-ccid,pcap=FILE``, usbmon link type 220) decoded with
:func:`ccidemu.pcap.ccid_exchanges` holds exactly the APDU exchanges the daemon traced
(``ccidemu serve --trace``): every XfrBlock the guest's libccid sent reached the card, in
order, and every DataBlock it got back is the card's answer, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidemu.pcap import ccid_exchanges
from ccidemu.trace import read_trace
from tests.support import opensc_responses
from vmc.lab.guest import ECHO, ChardevMode, Guest, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def pcap_env(guest_image: GuestImage, e2e_dir: Path) -> Iterator[tuple[Guest, ServeProcess]]:
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER, pcap=True) as guest:
        daemon = ServeProcess(
            e2e_dir / "serve", guest.vsc_socket, ChardevMode.QEMU_SERVER,
            trace=e2e_dir / "trace.jsonl",
        )
        daemon.start()
        try:
            yield guest, daemon
        finally:
            daemon.stop()


def test_pcap_exchanges_equal_the_daemon_trace(pcap_env: tuple[Guest, ServeProcess]) -> None:
    guest, daemon = pcap_env
    guest.wait_card()
    # OpenSC's card-driver probing (-n) adds dozens of short SELECTs and GET DATAs.
    out = guest.check(
        f"opensc-tool -n; opensc-tool -s {ECHO} -s 80E4000004 -s 00A4040008F0636369646D7501"
        " -s 80E0000010000102030405060708090A0B0C0D0E0F -s 80E2000020"
    )
    responses = opensc_responses(out)
    assert responses[0] == bytes.fromhex("010203 9000")
    assert responses[2] == bytes.fromhex("9000")
    guest.close()  # QEMU exits and closes the pcap
    assert daemon.stop() == 0, daemon.log_tail()
    assert guest.pcap is not None and daemon.trace is not None

    traced = [(r.command, r.response) for r in read_trace(daemon.trace)]
    exchanges = ccid_exchanges(guest.pcap)
    assert not [ex for ex in exchanges if ex.truncated]
    captured = [(ex.apdu, ex.response_data) for ex in exchanges if ex.apdu is not None]
    assert len(traced) > 20  # OpenSC's probing went through
    assert (bytes.fromhex("80E0000003010203"), bytes.fromhex("010203 9000")) in traced
    assert (bytes.fromhex("80E2000020"), bytes(range(32)) + b"\x90\x00") in traced
    assert captured == traced
