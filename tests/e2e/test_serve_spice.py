"""``ccidemu serve --spice``: the daemon itself serves the PIV card through QEMU's SPICE
smartcard channel (libvirt's ``<smartcard mode='passthrough' type='spicevmc'/>``), headless.

The guest's OpenSC names the card and signs; restarting the daemon under the running guest
works; a wrong password stops that endpoint with the reason in ``ctl list``, never the daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.e2e.spice_harness import free_port
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
from vmc.lab.serve import ServeProcess

pytestmark = pytest.mark.qemu

PASSWORD = "Serve-Spice-Pw-2"


@pytest.fixture(scope="module")
def guest_port(guest_image: GuestImage, e2e_dir: Path,
               request: pytest.FixtureRequest) -> Iterator[tuple[Guest, int]]:
    require_peers(request.config, "qemu", missing_spice_support(), GUEST_HOST_PACKAGES)
    port = free_port()
    with boot_guest(guest_image, e2e_dir / "qemu", ChardevMode.SPICE,
                    spice=SpiceOptions(port, password=PASSWORD)) as guest:
        yield guest, port


def _serve(workdir: Path, port: int, password: str) -> ServeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    secret = workdir / "spice.pw"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    daemon = ServeProcess(workdir, workdir / "unused.sock", ChardevMode.SPICE, ["piv:"],
                          extra_args=("--spice", f"127.0.0.1:{port}",
                                      "--spice-password-file", str(secret)))
    daemon.start()
    return daemon


def test_serve_spice_gives_the_guest_the_piv_card(
    guest_port: tuple[Guest, int], e2e_dir: Path
) -> None:
    guest, port = guest_port
    daemon = _serve(e2e_dir / "serve1", port, PASSWORD)
    try:
        guest.wait_card(timeout=60)
        out = guest.check("opensc-tool -n")
        assert out.splitlines()[-1] == "Personal Identity Verification Card", out
        signature = _sign_in_guest(guest, "01", "SHA256-RSA-PKCS")
        key = x509.load_pem_x509_certificate((CERTS / "9a.crt").read_bytes()).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())
        (vm,) = daemon.ctl_json("list")
        assert vm["mode"] == "spice" and vm["connected"] and vm["readers"][0]["apdus"] > 0
    finally:
        daemon.stop()
    # the daemon again, under the same running guest
    daemon = _serve(e2e_dir / "serve2", port, PASSWORD)
    try:
        guest.wait_card(timeout=60)
        assert guest.check("opensc-tool -n").splitlines()[-1].startswith("Personal Identity")
    finally:
        daemon.stop()


def test_a_wrong_password_stops_only_that_endpoint(
    guest_port: tuple[Guest, int], e2e_dir: Path
) -> None:
    _, port = guest_port
    daemon = _serve(e2e_dir / "wrong", port, "not-the-password")
    try:
        import time

        # Refused passwords are retried for a while first (libvirt sets the password only
        # after QEMU starts), then the endpoint gives up.
        deadline = time.monotonic() + 60
        while "not retrying" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.2)
        (vm,) = daemon.ctl_json("list")
        assert "password" in vm["waiting"].lower() and not vm["connected"], vm
        assert daemon.running()  # the daemon keeps going; only the endpoint gave up
        # Tried again within the grace (the link's own retry line), then given up.
        assert "or expired); retrying in" in daemon.log()
    finally:
        daemon.stop()
