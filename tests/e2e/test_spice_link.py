"""The SPICE transport (vmc.spice over ccidemu.spice) against Debian's QEMU 7.2 SPICE server.

No guest is booted: QEMU runs with ``-spice`` and a ``spicevmc,name=smartcard`` chardev behind
``usb-ccid`` + ``ccid-card-passthru``, which is all the server side of the smartcard channel
needs.  What each test shows is in docs/PROTOCOL.md, "SPICE".
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ccidemu.card import BuiltinTestCard
from ccidemu.spice import SpiceError, SpiceFailure
from tests.e2e.spice_harness import bare_qemu, bare_qemu_command, free_port
from tests.support import require_peers
from vmc.lab.guest import GUEST_HOST_PACKAGES, QEMU, SpiceOptions, missing_spice_support
from vmc.session import PowerOn, ReaderState, VscSession
from vmc.spice import SpiceTarget, SpiceTransport

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module", autouse=True)
def _qemu_with_spice(request: pytest.FixtureRequest) -> None:
    import shutil

    missing = [] if shutil.which(QEMU) else [QEMU]
    require_peers(request.config, "qemu", missing + missing_spice_support(), GUEST_HOST_PACKAGES)


class Recorder:
    """A transport handler that runs a VscSession with the test card, and records."""

    def __init__(self, readers: tuple[str, ...] = ("ccidemu",)) -> None:
        self.made = threading.Event()
        self.lost = threading.Event()
        self.error: SpiceError | None = None
        self.session = VscSession(list(readers), byteorder="little", peer_init=False)
        self.card = BuiltinTestCard()
        self.transport: SpiceTransport | None = None
        self.received = bytearray()

    def connection_made(self, transport: SpiceTransport) -> None:
        self.transport = transport
        self.session.start(time.monotonic())
        self._run()
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.session.receive_data(data, time.monotonic())
        self._run()

    def connection_lost(self, error: SpiceError | None) -> None:
        self.error = error
        self.lost.set()

    def _run(self) -> None:
        while (action := self.session.next_action()) is not None:
            if isinstance(action, PowerOn):
                self.session.power_on_done(action.token, self.card.power_on(), time.monotonic())
        assert self.transport is not None
        self.transport.write(self.session.data_to_send())


def connect(target: SpiceTarget, recorder: Recorder | None = None, *,
            setup_timeout: float = 10.0) -> tuple[SpiceTransport, Recorder]:
    recorder = recorder or Recorder()
    transport = SpiceTransport(target, recorder, setup_timeout=setup_timeout)
    transport.start()
    return transport, recorder


def wait_for(predicate: object, timeout: float = 30, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def expect_failure(target: SpiceTarget, failure: SpiceFailure, *,
                   setup_timeout: float = 10.0) -> SpiceError:
    transport, recorder = connect(target, setup_timeout=setup_timeout)
    assert recorder.lost.wait(30), "the transport never ended"
    transport.join(10)
    assert not recorder.made.is_set()
    error = recorder.error
    assert isinstance(error, SpiceError), error
    assert error.failure is failure, error
    assert transport.error is error
    return error


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def test_links_main_and_smartcard_answers_pings_and_adds_the_reader(workdir: Path) -> None:
    port = free_port()
    with bare_qemu(workdir, SpiceOptions(port)):
        transport, rec = connect(SpiceTarget("127.0.0.1", port))
        try:
            assert rec.made.wait(15), rec.error
            assert transport.session_id not in (None, 0)
            # spice-server's net test on a TCP main channel: 3 PINGs (the last padded with
            # 256,000 bytes), then 2 latency PINGs on each channel once it is idle.  All must
            # be answered or the server's connectivity monitor drops the client.
            wait_for(lambda: transport.pings[0] >= 5 and transport.pings[1] >= 2, 15,
                     "the server's first pings")
            # The VSCard side: Init dropped by the server, ReaderAdd answered with reader id 0
            # (the chardev's index), the ATR accepted: the reader holds the card.
            wait_for(lambda: rec.session.readers()[0].inserted, 15, "card inserted")
            [reader] = rec.session.readers()
            assert reader.state is ReaderState.ADDED and reader.reader_id == 0
            assert rec.session.errors == 0
            # Error(reader 0, SUCCESS) for ReaderAdd and for the ATR, little-endian; no Init.
            ok = bytes.fromhex("02000000 00000000 04000000 00000000")
            assert bytes(rec.received) == ok + ok
            assert transport.ready and not rec.lost.is_set()
        finally:
            transport.close()
        assert rec.lost.wait(10) and rec.error is None  # close(): connection_lost(None)


def test_second_reader_add_gets_no_reader(workdir: Path) -> None:
    port = free_port()
    with bare_qemu(workdir, SpiceOptions(port)):
        transport, rec = connect(SpiceTarget("127.0.0.1", port), Recorder(("one", "two")))
        try:
            wait_for(lambda: [r.state for r in rec.session.readers()]
                     == [ReaderState.ADDED, ReaderState.REFUSED], 15, "second reader refused")
            assert rec.session.readers()[0].inserted
            # QEMU 7.2 answers the second ReaderAdd with SUCCESS too, and the server rewrites its
            # reader id to 0, the first reader's: no new reader (the session counts a reader id
            # it already holds as a refusal).  Three answers: ReaderAdd, ATR, ReaderAdd.
            ok = bytes.fromhex("02000000 00000000 04000000 00000000")
            assert bytes(rec.received) == ok * 3
        finally:
            transport.close()


def test_password_right_and_wrong(workdir: Path) -> None:
    port = free_port()
    with bare_qemu(workdir, SpiceOptions(port, password="Correct-Horse-1")):
        error = expect_failure(SpiceTarget("127.0.0.1", port, password="wrong"),
                               SpiceFailure.WRONG_PASSWORD)
        assert error.fatal and "refused the password" in str(error)
        assert "wrong" not in str(error).replace("wrong SPICE", "")
        error = expect_failure(SpiceTarget("127.0.0.1", port), SpiceFailure.WRONG_PASSWORD)
        transport, rec = connect(SpiceTarget("127.0.0.1", port, password="Correct-Horse-1"))
        try:
            assert rec.made.wait(15), rec.error
        finally:
            transport.close()


def test_server_without_smartcard_channel(workdir: Path) -> None:
    port = free_port()
    with bare_qemu(workdir, SpiceOptions(port), smartcards=0):
        error = expect_failure(SpiceTarget("127.0.0.1", port), SpiceFailure.NO_SMARTCARD_CHANNEL)
        assert error.fatal and "spicevmc,name=smartcard" in str(error)
        assert "offers: inputs 0" in str(error)


def test_two_spicevmc_smartcard_chardevs_abort_qemu(workdir: Path) -> None:
    """libspice-server 0.15.1 registers one smartcard channel; the second chardev trips an
    assertion in smartcard_init and QEMU 7.2 dies before it listens (docs/PROTOCOL.md)."""
    cmd = bare_qemu_command(workdir, SpiceOptions(free_port()), smartcards=2)
    proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0
    stderr = proc.stderr.decode(errors="replace")
    assert "smartcard_init: assertion" in stderr and "SPICE_CHANNEL_SMARTCARD" in stderr, stderr


def _serve_once(reply: bytes | None) -> tuple[int, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                if reply is None:
                    time.sleep(3)  # silent
                else:
                    conn.sendall(reply)
                    time.sleep(0.5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


def test_not_a_spice_server_silent_peer_and_nobody() -> None:
    port, thread = _serve_once(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    error = expect_failure(SpiceTarget("127.0.0.1", port), SpiceFailure.NOT_SPICE)
    assert error.fatal and "not a SPICE server" in str(error) and "b'HTTP'" in str(error)
    thread.join(5)
    port, thread = _serve_once(None)
    error = expect_failure(SpiceTarget("127.0.0.1", port), SpiceFailure.TIMEOUT,
                           setup_timeout=1.0)
    assert not error.fatal and "SPICE port" in str(error)
    thread.join(5)
    error = expect_failure(SpiceTarget("127.0.0.1", free_port()), SpiceFailure.UNREACHABLE)
    assert not error.fatal and "cannot connect the main channel" in str(error)


def test_second_client_takes_the_session_over(workdir: Path) -> None:
    """spice-server keeps one client: a new main-channel link disconnects the old one."""
    port = free_port()
    with bare_qemu(workdir, SpiceOptions(port)):
        first, rec1 = connect(SpiceTarget("127.0.0.1", port))
        assert rec1.made.wait(15)
        second, rec2 = connect(SpiceTarget("127.0.0.1", port))
        try:
            assert rec2.made.wait(15), rec2.error
            assert rec1.lost.wait(15)
            assert rec1.error is not None and rec1.error.failure is SpiceFailure.CLOSED
            assert not rec1.error.fatal
            wait_for(lambda: rec2.session.readers()[0].inserted, 15, "card on the new client")
        finally:
            second.close()
            first.close()


# ------------------------------------------------------------------------------ TLS


SUBJECT = "C=IL, L=Raanana, O=ccidemu test, CN=spice server"


@pytest.fixture(scope="module")
def x509_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca-cert.pem, server-cert.pem, server-key.pem as QEMU's x509-dir wants them."""
    d = tmp_path_factory.mktemp("spice-x509")
    now = datetime.datetime.now(datetime.UTC)

    def name(**parts: str) -> x509.Name:
        oids = {"C": NameOID.COUNTRY_NAME, "L": NameOID.LOCALITY_NAME,
                "O": NameOID.ORGANIZATION_NAME, "CN": NameOID.COMMON_NAME}
        return x509.Name([x509.NameAttribute(oids[k], v) for k, v in parts.items()])

    def cert(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(CN="ccidemu SPICE test CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert(name(C="IL", L="Raanana", O="ccidemu test", CN="spice server"), ca_name,
                  server_key, ca_key, False)
    (d / "ca-cert.pem").write_bytes(cert(ca_name, ca_name, ca_key, ca_key, True).public_bytes(
        serialization.Encoding.PEM))
    (d / "server-cert.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (d / "server-key.pem").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = name(CN="some other CA")
    (d / "other-ca.pem").write_bytes(cert(other, other, other_key, other_key, True).public_bytes(
        serialization.Encoding.PEM))
    return d


@pytest.fixture
def tls_qemu(workdir: Path, x509_dir: Path) -> Iterator[int]:
    port = free_port()
    with bare_qemu(workdir, SpiceOptions(tls_port=port, x509_dir=x509_dir)):
        yield port


def test_tls_checks_the_certificate(tls_qemu: int, x509_dir: Path) -> None:
    ca = x509_dir / "ca-cert.pem"
    for target in (
        SpiceTarget("127.0.0.1", tls_port=tls_qemu, ca_file=ca),  # host name (IP SAN) checked
        SpiceTarget("localhost", tls_port=tls_qemu, ca_file=ca, host_subject=SUBJECT),
    ):
        transport, rec = connect(target)
        try:
            assert rec.made.wait(15), rec.error
            wait_for(lambda rec=rec: rec.session.readers()[0].inserted, 15, "card over TLS")
            wait_for(lambda transport=transport: transport.pings[0] >= 5, 15, "TLS pings")
        finally:
            transport.close()
        assert rec.lost.wait(10) and rec.error is None
    error = expect_failure(SpiceTarget("127.0.0.1", tls_port=tls_qemu,
                                       ca_file=x509_dir / "other-ca.pem"),
                           SpiceFailure.TLS_FAILED)
    assert error.fatal and "certificate was refused" in str(error)
    error = expect_failure(SpiceTarget("127.0.0.1", tls_port=tls_qemu, ca_file=ca,
                                       host_subject="CN=someone else"),
                           SpiceFailure.TLS_FAILED)
    assert "CN=spice server" in str(error) and "CN=someone else" in str(error)


def test_plain_port_when_the_channel_needs_tls(workdir: Path, x509_dir: Path) -> None:
    """-spice port=..,tls-port=..,tls-channel=smartcard: the main channel links on the plain
    port, the smartcard channel is refused with NEED_SECURED."""
    port, tls_port = free_port(), free_port()
    with bare_qemu(workdir, _TlsSmartcard(port, tls_port=tls_port, x509_dir=x509_dir)):
        error = expect_failure(SpiceTarget("127.0.0.1", port), SpiceFailure.NEED_TLS)
        assert error.fatal and "requires TLS for the smartcard channel" in str(error)
        transport, rec = connect(SpiceTarget("127.0.0.1", port, tls_port=tls_port,
                                             ca_file=x509_dir / "ca-cert.pem"))
        try:
            assert rec.made.wait(15), rec.error  # with the TLS port given, both use TLS
        finally:
            transport.close()


class _TlsSmartcard(SpiceOptions):
    """-spice ...,tls-channel=smartcard: only the smartcard channel must use TLS."""

    def qemu_args(self, workdir: Path) -> list[str]:
        args = super().qemu_args(workdir)
        args[-1] += ",tls-channel=smartcard"
        return args
