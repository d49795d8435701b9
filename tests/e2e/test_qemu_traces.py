"""A real guest's session, traced two ways and replayed: QEMU's usb-ccid pcap (link type 220)
imports to the exchanges ``ccidemu serve --trace`` recorded; both replay against the emulated
PIV card without a difference; and the recorded session, replayed as the card
(``--card replay:``) to a new guest, gives the same ``pkcs15-tool -D`` listing.

QEMU's pcap keeps 256 bytes of each bulk transfer, so certificate reads (256 data bytes + 61xx)
are truncated in the capture: those exchanges are compared on the bytes it kept.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ccidemu.cards import open_card
from ccidemu.traces import Exchange, PowerEvent, TraceWriter
from ccidemu.traces.compare import diff_exchanges, exchanges_of
from ccidemu.traces.formats import open_import
from ccidemu.traces.replay import CardReplay
from vmc.lab.guest import ChardevMode, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu


def _serve(workdir: Path, guest_socket: Path, card: str, trace: Path | None) -> ServeProcess:
    daemon = ServeProcess(workdir, guest_socket, ChardevMode.QEMU_SERVER, cards=[card],
                          trace=trace)
    daemon.start()
    return daemon


def test_guest_session_pcap_daemon_trace_and_replay(guest_image: GuestImage, e2e_dir: Path
                                                    ) -> None:
    first = e2e_dir / "first"
    first.mkdir()
    trace = first / "trace.jsonl"
    with boot_guest(guest_image, first, ChardevMode.QEMU_SERVER, pcap=True) as guest:
        daemon = _serve(first / "serve", guest.vsc_socket, "piv:", trace)
        try:
            guest.wait_card()
            listing = guest.check("pkcs15-tool -D", timeout=60)
            guest.close()  # QEMU exits and closes the pcap
        finally:
            assert daemon.stop() == 0, daemon.log_tail()
    assert guest.pcap is not None
    assert "PIV" in listing and "Certificate" in listing

    pcap = open_import(guest.pcap, strict=True)
    assert pcap.format == "usbmon"
    captured = list(pcap.records)
    atr = next(r.atr for r in captured if isinstance(r, PowerEvent) and r.atr)
    traced = list(exchanges_of(open_import(trace, strict=True).records))
    from_pcap = list(exchanges_of(captured))
    assert len(traced) > 20
    assert list(diff_exchanges(traced, from_pcap)) == []
    assert any(e.truncated for e in from_pcap)  # the 256-byte cut is there, and respected

    for name, path in (("pcap", guest.pcap), ("daemon trace", trace)):
        imported = open_import(path)
        replay = CardReplay(imported.header, imported.records, open_card("piv:"))
        differences = [d.describe() for d in replay.run()]
        assert differences == [], f"{name}: {differences}"
        assert replay.stats.compared > 20

    # The recorded session as the card of a new guest.  Format-0 daemon traces carry no ATR:
    # it is taken from the capture's power-on (IccPowerOn's DataBlock).
    card_trace = e2e_dir / "card.jsonl"
    with TraceWriter(card_trace, source="ccidemu serve", atr=atr, secrets=True) as writer:
        for exchange in traced:
            writer.write(Exchange(exchange.command, exchange.response))
    second = e2e_dir / "second"
    second.mkdir()
    with boot_guest(guest_image, second, ChardevMode.QEMU_SERVER) as guest:
        daemon = _serve(second / "serve", guest.vsc_socket, f"replay:{card_trace}", None)
        try:
            guest.wait_card()
            again = guest.check("pkcs15-tool -D", timeout=60)
        finally:
            assert daemon.stop() == 0, daemon.log_tail()
        log = daemon.log_tail(400)
    assert again == listing
    assert "does not match" not in log, log
