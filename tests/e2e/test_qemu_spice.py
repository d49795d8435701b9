"""The PIV card in a real guest through QEMU's SPICE smartcard channel (no socket chardev).

The guest has ``-chardev spicevmc,name=smartcard`` behind ``usb-ccid`` + ``ccid-card-passthru``
and a password-protected ``-spice`` server; the card side is tests/e2e/spice_harness.py
(VscSession + the emulated PIV card on vmc.spice's transport), standing in for the daemon's
coming ``serve --spice``.  The guest's OpenSC sees the PIV ATR, names the card and signs; a
wrong password fails cleanly; our side and QEMU can each restart under the other.  Tests run
in order and share one boot until the last one replaces QEMU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ccidemu.cards import open_card
from ccidemu.spice import SpiceFailure
from tests.e2e.spice_harness import SpiceCardHost, free_port
from tests.e2e.test_qemu_piv import CERTS, DATA, _sign_in_guest
from tests.support import require_peers
from vmc.lab.guest import (
    GUEST_HOST_PACKAGES,
    ChardevMode,
    Guest,
    GuestImage,
    SpiceOptions,
    boot_guest,
    missing_spice_support,
)
from vmc.spice import SpiceTarget

pytestmark = pytest.mark.qemu

PASSWORD = "Spice-Test-Pw-1"
PIV_NAME = "Personal Identity Verification Card"  # OpenSC card-piv.c


@dataclass
class SpiceEnv:
    guest: Guest
    host: SpiceCardHost
    port: int
    workdir: Path
    image: GuestImage
    stack: contextlib.ExitStack
    extra_hosts: list[SpiceCardHost] = field(default_factory=list)

    def target(self, password: str = PASSWORD) -> SpiceTarget:
        return SpiceTarget("127.0.0.1", self.port, password=password)

    def new_host(self, password: str = PASSWORD) -> SpiceCardHost:
        host = SpiceCardHost(self.target(password), open_card("piv:"))
        self.extra_hosts.append(host)
        return host.start()

    def boot(self, name: str) -> Guest:
        spice = SpiceOptions(self.port, password=PASSWORD)
        return self.stack.enter_context(
            boot_guest(self.image, self.workdir / name, ChardevMode.SPICE, spice=spice))


@pytest.fixture(scope="module")
def env(guest_image: GuestImage, e2e_dir: Path,
        request: pytest.FixtureRequest) -> Iterator[SpiceEnv]:
    require_peers(request.config, "qemu", missing_spice_support(), GUEST_HOST_PACKAGES)
    with contextlib.ExitStack() as stack:
        port = free_port()
        spice = SpiceOptions(port, password=PASSWORD)
        guest = stack.enter_context(
            boot_guest(guest_image, e2e_dir / "qemu1", ChardevMode.SPICE, spice=spice))
        host = SpiceCardHost(SpiceTarget("127.0.0.1", port, password=PASSWORD),
                             open_card("piv:"))
        env = SpiceEnv(guest, host.start(), port, e2e_dir, guest_image, stack)
        try:
            host.wait(lambda h: h.connections >= 1, 30, "first SPICE session")
            guest.wait_card(30)
            yield env
        finally:
            for other in env.extra_hosts:
                other.stop()
            env.host.stop()


def _atr_text(atr: bytes) -> str:
    return ":".join(f"{b:02x}" for b in atr)


def test_opensc_sees_the_piv_atr_and_names_the_card(env: SpiceEnv) -> None:
    atr = open_card("piv:").power_on()
    out = env.guest.check("opensc-tool -a")
    assert _atr_text(atr) in out, out
    out = env.guest.check("opensc-tool -n")
    assert out.splitlines()[-1] == PIV_NAME, out
    # The reader the guest uses is QEMU's usb-ccid (libccid's name for 08e6:4433).
    assert "Gemalto" in env.guest.check("opensc-tool -l"), "not the usb-ccid reader"
    assert env.host.connections == 1 and env.host.apdus > 0


def test_pkcs11_signatures_verify_on_the_host(env: SpiceEnv) -> None:
    signature = _sign_in_guest(env.guest, "01", "SHA256-RSA-PKCS")
    rsa_key = x509.load_pem_x509_certificate((CERTS / "9a.crt").read_bytes()).public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    rsa_key.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())
    signature = _sign_in_guest(env.guest, "02", "ECDSA-SHA256", "--signature-format openssl")
    ec_key = x509.load_pem_x509_certificate((CERTS / "9c.crt").read_bytes()).public_key()
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    ec_key.verify(signature, DATA, ec.ECDSA(hashes.SHA256()))


def test_wrong_password_fails_cleanly_and_leaves_the_session_alone(env: SpiceEnv) -> None:
    bad = env.new_host("not-the-password")
    bad.wait(lambda h: h.fatal is not None, 30, "the wrong password refused")
    assert bad.fatal is not None and bad.fatal.failure is SpiceFailure.WRONG_PASSWORD
    assert "refused the password" in str(bad.fatal) and bad.attempts == 1  # no retries
    assert bad.connections == 0
    # A refused ticket never reaches reds_handle_main_link: the running session is untouched.
    assert env.host.connections == 1 and env.host.current is not None
    assert env.guest.check("opensc-tool -n").splitlines()[-1] == PIV_NAME


def test_the_session_survives_the_servers_keepalive(env: SpiceEnv) -> None:
    """spice-server pings an idle TCP main channel every 15 s, and only after the previous
    PONG; a client that stops answering gets no further ping and is dropped about 45 s later
    (measured: a client answering only the net test's pings stays at 7 and is gone 60 s after
    connecting).  Reaching the ninth ping, 30 s in, with the first session still serving the
    guest shows the keep-alive is answered."""
    transport = env.host.current
    assert transport is not None
    env.host.wait(lambda h: transport.pings[0] >= 9, 120, "two rounds of keep-alive pings")
    assert env.host.current is transport and env.host.connections == 1
    assert env.host.errors == []
    assert env.guest.check("opensc-tool -n").splitlines()[-1] == PIV_NAME


@pytest.mark.parametrize("abort", [False, True], ids=["clean-stop", "abrupt-stop"])
def test_restarting_our_side_while_the_guest_runs(env: SpiceEnv, abort: bool) -> None:
    env.host.stop(abort=abort)
    # The server sends ReaderRemove to the device when its client goes: the card is gone.
    env.guest.wait_pcscd_log(r"[Cc]ard [Rr]emoved", timeout=30)
    env.host = env.new_host()
    env.host.wait(lambda h: h.connections >= 1, 30, "new SPICE session")
    env.guest.wait_card(30)
    assert env.guest.check("opensc-tool -n").splitlines()[-1] == PIV_NAME


def test_restarting_qemu_under_a_running_host(env: SpiceEnv) -> None:
    host = env.host
    before = host.connections
    env.guest.close()  # QEMU and its SPICE server go away
    host.wait(lambda h: h.current is None, 30, "the session to end with QEMU")
    assert host.errors[-1] is not None and not host.errors[-1].fatal
    env.guest = env.boot("qemu2")  # same port: the host reconnects by itself
    host.wait(lambda h: h.connections > before, 60, "reconnection to the new QEMU")
    env.guest.wait_card(30)
    assert env.guest.check("opensc-tool -n").splitlines()[-1] == PIV_NAME
    assert host.fatal is None
