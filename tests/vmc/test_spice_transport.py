"""vmc.spice: the SPICE transport on real sockets against tests/spice_fake.py, and its options.

The same transport against QEMU's own SPICE server is tests/e2e/test_spice_link.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccidemu.card import BuiltinTestCard
from ccidemu.errors import ConfigError, DecodeError
from ccidemu.spice import SpiceError, SpiceFailure, SpiceProtocolError
from tests.spice_fake import FakeSpiceServer, FakeSpiceSocketServer
from vmc.runtime import spice_link
from vmc.runtime.loop import Loop
from vmc.runtime.spice_link import SpiceLink
from vmc.session import PowerOn, Transmit, VscSession
from vmc.spice import (
    SpiceTarget,
    SpiceTransport,
    add_spice_arguments,
    check_one_card,
    match_host_subject,
    parse_host_subject,
    parse_spice_address,
    read_password_file,
    target_from_args,
)

H = bytes.fromhex
LE = struct.Struct("<III")


class Handler:
    """VscSession + the built-in test card on the transport; records everything."""

    def __init__(self) -> None:
        self.made = threading.Event()
        self.lost = threading.Event()
        self.error: SpiceError | None = None
        self.received = bytearray()
        self.threads: set[int] = set()
        self.session = VscSession(["ccidemu"], byteorder="little", peer_init=False)
        self.card = BuiltinTestCard()
        self.transport: SpiceTransport | None = None

    def connection_made(self, transport: SpiceTransport) -> None:
        self.threads.add(threading.get_ident())
        self.transport = transport
        self.session.start(time.monotonic())
        self._run()
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.threads.add(threading.get_ident())
        self.received += data
        self.session.receive_data(data, time.monotonic())
        self._run()

    def connection_lost(self, error: SpiceError | None) -> None:
        self.error = error
        self.lost.set()

    def _run(self) -> None:
        now = time.monotonic()
        while (action := self.session.next_action()) is not None:
            if isinstance(action, PowerOn):
                self.session.power_on_done(action.token, self.card.power_on(), now)
            elif isinstance(action, Transmit):
                self.session.transmit_done(action.token, self.card.transmit(action.apdu), now)
        assert self.transport is not None
        self.transport.write(self.session.data_to_send())


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeSpiceSocketServer]:
    with FakeSpiceSocketServer(FakeSpiceServer(password=b"pw")) as srv:
        yield srv


def start(port: int, password: str = "pw", **kw: object) -> tuple[SpiceTransport, Handler]:
    handler = Handler()
    transport = SpiceTransport(SpiceTarget("127.0.0.1", port, password=password), handler,
                               **kw)  # type: ignore[arg-type]
    transport.start()
    return transport, handler


def test_session_over_sockets(server: FakeSpiceSocketServer) -> None:
    transport, handler = start(server.port)
    try:
        assert handler.made.wait(10), handler.error
        assert transport.session_id == 0x1234ABCD and transport.ready
        wait_for(lambda: server.fake.device == [(5, 0, BuiltinTestCard.ATR)], what="ATR")
        card = server.connection(8)
        assert card is not None
        card.send_vsc(7, 0, H("80E0000003 010203"))
        server.push(8)
        wait_for(lambda: len(server.fake.device) == 2, what="response")
        assert server.fake.device[1] == (7, 0, H("010203 9000"))
        assert handler.threads == {transport._io_thread_id}  # callbacks on the I/O thread
        # PINGs on either channel are answered from the I/O thread.
        main = server.connection(1)
        assert main is not None
        main.ping(77, 88)
        server.push(1)
        wait_for(lambda: main.messages(3) == [struct.pack("<IQ", 77, 88)], what="pong")
        assert transport.pings == (1, 0)
    finally:
        transport.close()
    assert handler.lost.wait(10) and handler.error is None
    wait_for(lambda: 1 in server.closed_channels and 8 in server.closed_channels, what="closed")
    assert main.messages(6) == [struct.pack("<QI", 0, 0)]  # DISCONNECTING: a polite close
    assert transport.join(5)


def test_write_from_another_thread_and_buffer_size(server: FakeSpiceSocketServer) -> None:
    transport, handler = start(server.port)
    try:
        assert handler.made.wait(10)
        wait_for(lambda: len(server.fake.device) == 1, what="ATR")
        removal = LE.pack(6, 0, 0)
        transport.write(removal[:5])  # partial messages are held until whole
        transport.write(removal[5:])
        wait_for(lambda: len(server.fake.device) == 2, what="CardRemove")
        assert server.fake.device[1] == (6, 0, b"")
        assert transport.get_write_buffer_size() == 0
    finally:
        transport.close()


def test_pause_reading_holds_smartcard_data_but_not_pings(server: FakeSpiceSocketServer) -> None:
    transport, handler = start(server.port)
    try:
        assert handler.made.wait(10)
        wait_for(lambda: len(handler.received) == 32, what="two Error(SUCCESS)")
        transport.pause_reading()  # effective at once, whatever the I/O thread is doing
        card, main = server.connection(8), server.connection(1)
        assert card is not None and main is not None
        card.send_vsc(7, 0, H("80E0000001 aa"))
        server.push(8)
        # Three PING round trips on the main channel, each sent after the APDU (no Nagle on
        # either side): unpaused, the I/O thread would have read the APDU before any PONG.
        for n in range(1, 4):
            main.ping(n, 6)
            server.push(1)

            def answered(count: int = n) -> bool:
                return len(main.messages(3)) == count

            wait_for(answered, what="pong while paused")
        assert len(handler.received) == 32  # the APDU is still in the socket
        transport.resume_reading()
        wait_for(lambda: len(server.fake.device) == 2, what="APDU after resume")
        assert server.fake.device[1] == (7, 0, H("aa 9000"))
    finally:
        transport.close()


def test_abort_sends_nothing_more(server: FakeSpiceSocketServer) -> None:
    transport, handler = start(server.port)
    assert handler.made.wait(10)
    main = server.connection(1)
    assert main is not None
    transport.abort()
    assert handler.lost.wait(10) and handler.error is None
    wait_for(lambda: 1 in server.closed_channels, what="closed")
    assert main.messages(6) == []


def test_close_before_start_reports_once() -> None:
    handler = Handler()
    transport = SpiceTransport(SpiceTarget("127.0.0.1", 9), handler)
    transport.close()
    transport.close()
    assert handler.lost.is_set() and handler.error is None


def test_wrong_password_and_missing_channel_over_sockets() -> None:
    with FakeSpiceSocketServer(FakeSpiceServer(password=b"pw")) as srv:
        _transport, handler = start(srv.port, password="nope")
        assert handler.lost.wait(10) and not handler.made.is_set()
        assert handler.error is not None and handler.error.failure is SpiceFailure.WRONG_PASSWORD
    with FakeSpiceSocketServer(FakeSpiceServer(smartcard_channel=False)) as srv:
        _transport, handler = start(srv.port, password="")
        assert handler.lost.wait(10)
        assert handler.error is not None
        assert handler.error.failure is SpiceFailure.NO_SMARTCARD_CHANNEL


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(min_size=1, max_size=64), channel=st.sampled_from([1, 8]),
       header=st.booleans())
def test_bad_bytes_from_the_server_end_with_a_decode_error(
    garbage: bytes, channel: int, header: bool
) -> None:
    """Fuzz: after a good link, arbitrary bytes (or a message header with an absurd size)
    from the server end the transport with SpiceProtocolError, a DecodeError; nothing else
    escapes, and the I/O thread reports no internal error."""
    raw = (struct.pack("<HI", 101, 0xFFFFFFF0) if header else b"") + garbage
    with FakeSpiceSocketServer() as srv:
        transport, handler = start(srv.port, password="")
        assert handler.made.wait(10), handler.error
        srv.push(channel, raw)
        # Arbitrary bytes may happen to form valid messages and wait for more: end with EOF
        # (unless the transport already hung up on them and the server dropped the channel).
        with srv.lock:
            entry = srv.live.get(channel)
        if entry is not None:
            with contextlib.suppress(OSError):
                entry[0].shutdown(2)
        assert handler.lost.wait(10)
        error = handler.error
        assert isinstance(error, SpiceError)
        assert "internal error" not in str(error)
        if header:
            assert isinstance(error, SpiceProtocolError) and isinstance(error, DecodeError)
        else:
            assert error.failure in (SpiceFailure.PROTOCOL, SpiceFailure.CLOSED)
            assert (error.failure is SpiceFailure.PROTOCOL) == isinstance(error, DecodeError)
        transport.join(5)


# ------------------------------------------------------------------------------ TLS


def _tls_material(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ccidemu test"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fake spice")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


def test_tls_with_ca_file_and_subject(tmp_path: Path) -> None:
    context, cert = _tls_material(tmp_path)
    with FakeSpiceSocketServer(FakeSpiceServer(), tls=context) as srv:
        for subject in (None, "O=ccidemu test, CN=fake spice"):
            handler = Handler()
            transport = SpiceTransport(SpiceTarget("127.0.0.1", tls_port=srv.port, ca_file=cert,
                                                   host_subject=subject), handler)
            transport.start()
            assert handler.made.wait(10), handler.error
            transport.close()
            assert handler.lost.wait(10) and handler.error is None
        handler = Handler()
        transport = SpiceTransport(SpiceTarget("127.0.0.1", tls_port=srv.port, ca_file=cert,
                                               host_subject="CN=fake spice"), handler)
        transport.start()
        assert handler.lost.wait(10)
        assert handler.error is not None and handler.error.failure is SpiceFailure.TLS_FAILED
        assert "'O=ccidemu test, CN=fake spice' is not the expected 'CN=fake spice'" in str(
            handler.error)


# ------------------------------------------------------------------------------ options


def test_parse_spice_address() -> None:
    assert parse_spice_address("127.0.0.1:5930") == ("127.0.0.1", 5930)
    assert parse_spice_address("[::1]:5900") == ("::1", 5900)
    for bad, why in (("host", "no port"), ("host:x", "not a number"), (":5", "no host"),
                     ("h:0", "out of range"), ("[::1]5", "IPv6")):
        with pytest.raises(ConfigError, match=why):
            parse_spice_address(bad)


def test_target_checks_and_never_shows_the_password() -> None:
    target = SpiceTarget("h", 1, password="hunter2")
    assert "hunter2" not in repr(target) and str(target) == "spice://h:1"
    assert str(SpiceTarget("::1", tls_port=2)) == "spice://[::1]:2 (TLS)"
    with pytest.raises(ConfigError, match="needs a port"):
        SpiceTarget("h")
    with pytest.raises(ConfigError, match="needs a SPICE TLS port"):
        SpiceTarget("h", 1, ca_file=Path("ca.pem"))
    with pytest.raises(ConfigError, match="at most 60 bytes"):
        SpiceTarget("h", 1, password="é" * 31)


def test_password_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b"s3cret\n")
    path.chmod(0o600)
    assert read_password_file(path) == "s3cret"
    assert caplog.records == []
    path.chmod(0o644)  # others can read it: used, with a warning that never shows the password
    assert read_password_file(path) == "s3cret"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "mode 0644" in caplog.text and "chmod 600" in caplog.text
    assert "s3cret" not in caplog.text
    path.write_bytes(b"s3cret\r\n")
    assert read_password_file(path) == "s3cret"
    path.write_bytes(b"")
    assert read_password_file(path) == ""
    for data, why in ((b"a\nb\n", "one line"), (b"\xff", "not UTF-8"), (b"x" * 61, "longer")):
        path.write_bytes(data)
        with pytest.raises(ConfigError, match=why):
            read_password_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_password_file(tmp_path / "missing")


def test_arguments(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_spice_arguments(parser)
    assert target_from_args(parser.parse_args([])) is None
    (tmp_path / "pw").write_text("pass\n")
    args = parser.parse_args(["--spice", "10.0.0.1:5930", "--spice-tls-port", "5931",
                              "--spice-ca-file", "ca.pem", "--spice-host-subject", "CN=x",
                              "--spice-password-file", str(tmp_path / "pw")])
    assert target_from_args(args) == SpiceTarget("10.0.0.1", 5930, 5931, Path("ca.pem"), "CN=x",
                                                 "pass")
    with pytest.raises(ConfigError, match="--spice-tls-port needs --spice"):
        target_from_args(parser.parse_args(["--spice-tls-port", "5"]))
    help_text = parser.format_help()
    assert "exactly one reader" in help_text and "--spice-password-file" in help_text


def test_one_card_per_spice_endpoint() -> None:
    check_one_card(["piv:"])
    with pytest.raises(ConfigError, match=r"2 cards given, but a SPICE session carries exactly "
                                          r"one reader.*Give one --card"):
        check_one_card(["piv:", "test:"])


def test_host_subject() -> None:
    assert parse_host_subject("C=IL, L=Raanana, O=Red Hat, CN=my server") == (
        ("countryName", "IL"), ("localityName", "Raanana"), ("organizationName", "Red Hat"),
        ("commonName", "my server"))
    assert parse_host_subject(r"O=a\, b,CN=c") == (("organizationName", "a, b"),
                                                   ("commonName", "c"))
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_host_subject("CN=x,junk")
    with pytest.raises(ConfigError, match="unknown key 'XX'"):
        parse_host_subject("XX=1")
    cert = {"subject": ((("organizationName", "Red Hat"),), (("commonName", "my server"),))}
    assert match_host_subject(cert, "O=Red Hat, CN=my server")
    assert not match_host_subject(cert, "CN=my server, O=Red Hat")  # order counts
    assert not match_host_subject(cert, "O=Red Hat")


# --------------------------------------------------------------------------- the link's retries


class _Sessions:
    """on_session of a SpiceLink: counts the sessions that reached the smartcard channel."""

    def __init__(self) -> None:
        self.made = threading.Event()

    def __call__(self, stream: object) -> _Sessions:
        self.made.set()
        return self

    def data_received(self, buffer: bytearray, nbytes: int) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def _link(port: int, password: str) -> tuple[Loop, SpiceLink, _Sessions]:
    loop = Loop("test-spice-link")
    loop.start()
    sessions = _Sessions()
    link = SpiceLink(loop, SpiceTarget("127.0.0.1", port, password=password), "vm t", sessions)
    loop.call_soon(link.start)
    return loop, link, sessions


def test_a_password_the_server_learns_late_is_retried_until_it_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # libvirt starts QEMU without the SPICE password and sets it over QMP a moment later: in
    # that window the server refuses every password, the right one too.
    caplog.set_level(logging.DEBUG)
    fake = FakeSpiceServer(password=b"not-set-yet")
    with FakeSpiceSocketServer(fake) as srv:
        loop, link, sessions = _link(srv.port, "Late-Pw-7f3a")
        try:
            wait_for(lambda: link.last_error is not None and "password" in link.last_error,
                     what="a refused password")
            assert not sessions.made.is_set() and link.fatal is None
            fake.password = b"Late-Pw-7f3a"  # what libvirt's set_password does
            assert sessions.made.wait(30)
            assert link.fatal is None and link.last_error is None
        finally:
            loop.call_in_loop(link.close)
            loop.stop()
    assert "or expired); retrying in" in caplog.text  # the link's retry, at INFO
    assert "not retrying" not in caplog.text and "Late-Pw-7f3a" not in caplog.text


def test_a_wrong_password_gives_up_after_the_grace(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(spice_link, "PASSWORD_GRACE", 0.5)
    with FakeSpiceSocketServer(FakeSpiceServer(password=b"right")) as srv:
        loop, link, sessions = _link(srv.port, "Wrong-Pw-91c2")
        try:
            wait_for(lambda: link.fatal is not None, what="the endpoint to give up")
            assert "refused the password" in str(link.fatal)
            tries = len(srv.threads)
            time.sleep(0.5)
            assert len(srv.threads) == tries  # no retry after giving up
            assert tries >= 2  # one at least within the grace
            assert not sessions.made.is_set()
        finally:
            loop.call_in_loop(link.close)
            loop.stop()
    assert "not retrying" in caplog.text and "Wrong-Pw-91c2" not in caplog.text
