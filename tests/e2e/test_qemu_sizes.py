"""QEMU 7.2's usb-ccid loses the APDU after a 54-byte answer (a 64-byte DataBlock) and refuses
answers over 374 bytes; the daemon answers those in parts through 61xx / GET RESPONSE
(vmc.runtime.shaping, docs/PROTOCOL.md "usb-ccid").  Proven in a real guest: every answer
length from 0 to 256 data bytes, each followed by a second APDU that must succeed; a PIV
object whose GET DATA answer is exactly 54 bytes, read by OpenSC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ccidemu.apdu import CommandApdu
from ccidemu.cards import CardOptions, open_card
from ccidemu.tlv import ber_encode
from tests.support import opensc_responses
from vmc.lab.guest import ChardevMode, Guest, GuestImage, boot_guest
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest(guest_image: GuestImage, e2e_dir: Path) -> Iterator[Guest]:
    with boot_guest(guest_image, e2e_dir, ChardevMode.QEMU_SERVER) as g:
        yield g


def _serve(guest: Guest, workdir: Path, *cards: str, extra: tuple[str, ...] = ()
           ) -> ServeProcess:
    daemon = ServeProcess(workdir, guest.vsc_socket, ChardevMode.QEMU_SERVER, cards or ("test:",),
                          extra_args=extra)
    daemon.start()
    return daemon


def _expected(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n)) + bytes.fromhex("9000")


def test_a_54_byte_answer_then_another_apdu(guest: Guest, e2e_dir: Path) -> None:
    daemon = _serve(guest, e2e_dir / "one")
    try:
        guest.wait_card()
        out = guest.check("opensc-tool -c default -s 80E2000034 -s 80E2000010")
        assert opensc_responses(out) == [_expected(52), _expected(16)], out
        assert "went out in parts" in daemon.log()
    finally:
        daemon.stop()


def test_every_answer_length_from_0_to_256(guest: Guest, e2e_dir: Path) -> None:
    daemon = _serve(guest, e2e_dir / "all")
    try:
        guest.wait_card()
        args = " ".join(f"-s 80E20000{n & 0xFF:02X} -s 80E2000003" for n in range(1, 257))
        out = guest.check(f"opensc-tool -c default -s 80E000000101 {args}", timeout=120)
        got = opensc_responses(out)
        want = [bytes.fromhex("01 9000")]
        for n in range(1, 257):
            want += [_expected(n), _expected(3)]
        assert len(got) == len(want), out[-3000:]
        bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
        assert bad == [], [(i, got[i].hex(), want[i].hex()) for i in bad[:5]]
    finally:
        daemon.stop()


def test_without_the_workaround_the_guest_loses_the_next_apdu(
    guest: Guest, e2e_dir: Path
) -> None:
    """The fault itself, so that the test above proves the workaround and not luck."""
    daemon = _serve(guest, e2e_dir / "off", extra=("--no-usb-ccid-workaround",))
    try:
        guest.wait_card()
        result = guest.run("opensc-tool -c default -s 80E2000034 -s 80E2000010", timeout=30)
        assert opensc_responses(result.output) != [_expected(52), _expected(16)], result.output
    finally:
        daemon.stop()


def test_a_54_byte_piv_object_is_read_by_opensc(guest: Guest, e2e_dir: Path) -> None:
    """PUT DATA (as an administrator, before the guest starts) an object whose GET DATA
    answer is exactly 54 bytes; the guest reads it and the CHUID after it."""
    state = e2e_dir / "piv-state"
    card = open_card("piv:", CardOptions(state_dir=state))
    card.power_on()
    _admin(card)
    value = bytes(range(0x30, 0x30 + 50))  # 53 32 <50 bytes>: a 52-byte answer + 9000
    put = CommandApdu(0, 0xDB, 0x3F, 0xFF,
                      ber_encode(0x5C, bytes.fromhex("5FFF01")) + ber_encode(0x53, value))
    assert card.transmit(put.encode()) == bytes.fromhex("9000")
    del card
    daemon = _serve(guest, e2e_dir / "piv", "piv:", extra=("--state-dir", str(state)))
    try:
        guest.wait_card()
        out = guest.check("opensc-tool -c default -s 00A4040009A00000030800001000 "
                          "-s 00CB3FFF055C035FFF0100 -s 00CB3FFF055C035FC10200")
        select, obj, chuid = opensc_responses(out)
        assert select[-2:] == bytes.fromhex("9000")
        assert obj == ber_encode(0x53, value) + bytes.fromhex("9000")
        assert chuid[:1] == b"\x53" and chuid[-2:] == bytes.fromhex("9000")
        out = guest.check("pkcs15-tool -D", timeout=60)
        assert "X.509 Certificate" in out
    finally:
        daemon.stop()


def _admin(card: object) -> None:
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes

    transmit = card.transmit  # type: ignore[attr-defined]
    key = bytes.fromhex("010203040506070801020304050607080102030405060708")
    out = transmit(bytes.fromhex("0087039b047c028000"))
    dec = Cipher(TripleDES(key), modes.ECB()).decryptor()
    witness = dec.update(out[4:12]) + dec.finalize()
    body = ber_encode(0x7C, ber_encode(0x80, witness) + ber_encode(0x81, bytes(8)))
    assert transmit(CommandApdu(0, 0x87, 3, 0x9B, body, 256).encode())[-2:] == b"\x90\x00"
