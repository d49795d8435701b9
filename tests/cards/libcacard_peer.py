"""The real libcacard (Debian libcacard0 2.8) as a card, for side-by-side tests.

``libcacard_harness.c`` is compiled at test time against ``libcacard-dev`` and run as a
subprocess (a crash in libcacard cannot take pytest down).  It calls ``vcard_emul_init``
with a soft-card option string naming an NSS database and the certificate nicknames, then
``vreader_xfr_bytes`` per APDU.  The NSS database is made here with ``certutil`` and
``pk12util`` (libnss3-tools) from the same certificate and key files as our card, with
the card's PIN as the database password (libcacard's VERIFY is an NSS login).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

HARNESS_SOURCE = Path(__file__).with_name("libcacard_harness.c")
TOOLS = ("gcc", "pkg-config", "certutil", "pk12util")
#: What tools/bootstrap.sh installs for these tests (Debian 12).
PACKAGES = "libcacard-dev libnss3-tools gcc pkg-config"
READER = "ccidemu"


def _compiler() -> str:
    """The C compiler (``$CCIDEMU_GCC`` overrides: the peer guard test points it nowhere)."""
    return os.environ.get("CCIDEMU_GCC") or "gcc"


def missing_peers() -> list[str]:
    """The programs and libraries these tests need that this host lacks."""
    missing = [t for t in (_compiler(), *TOOLS[1:]) if shutil.which(t) is None]
    if "pkg-config" not in missing and subprocess.run(
            ["pkg-config", "--exists", "libcacard"], check=False).returncode != 0:
        missing.append("libcacard (pkg-config)")
    return missing


def build_harness(directory: Path) -> Path:
    """Compile the harness into ``directory``; returns the program's path."""
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libcacard"], check=True,
                           capture_output=True, text=True).stdout.split()
    program = directory / "libcacard_harness"
    subprocess.run([_compiler(), "-O1", "-Wall", "-o", str(program), str(HARNESS_SOURCE), *flags],
                   check=True, capture_output=True, text=True)
    return program


def make_nss_db(directory: Path, credentials: Sequence[tuple[x509.Certificate,
                                                              rsa.RSAPrivateKey]],
                password: str) -> tuple[Path, list[str]]:
    """An NSS database in ``directory`` holding the credentials as ``cert1`` .. ``certN``,
    protected by ``password``; returns (database directory, nicknames)."""
    db = directory / "nssdb"
    db.mkdir()
    pwfile = directory / "nss-password"
    pwfile.write_text(password + "\n")
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "-f", str(pwfile)], check=True,
                   capture_output=True)
    nicknames = []
    for number, (cert, key) in enumerate(credentials, start=1):
        nickname = f"cert{number}"
        bundle = directory / f"{nickname}.p12"
        bundle.write_bytes(pkcs12.serialize_key_and_certificates(
            nickname.encode(), key, cert, None, BestAvailableEncryption(b"transfer")))
        subprocess.run(["pk12util", "-i", str(bundle), "-d", f"sql:{db}", "-k", str(pwfile),
                        "-W", "transfer"], check=True, capture_output=True)
        nicknames.append(nickname)
    return db, nicknames


class LibcacardCard:
    """libcacard's soft CAC card behind the harness: ``power_on`` and ``transmit``."""

    def __init__(self, harness: Path, db: Path, nicknames: Sequence[str]) -> None:
        options = (f'db="sql:{db}" use_hw=no soft=(,{READER},CAC,,'
                   + ",".join(nicknames) + ")")
        self._proc = subprocess.Popen([str(harness), options], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
        first = self._line()
        if first != "READY":
            self.close()
            raise RuntimeError(f"libcacard harness did not start: {first!r}")

    def _line(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"libcacard harness ended (exit {self._proc.poll()})")
        return line.strip()

    def _ask(self, command: str) -> str:
        assert self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._line()

    def power_on(self) -> bytes:
        kind, _, value = self._ask("P").partition(" ")
        assert kind == "ATR", kind
        return bytes.fromhex(value)

    def transmit(self, apdu: bytes) -> bytes:
        kind, _, value = self._ask("A " + apdu.hex()).partition(" ")
        if kind != "R":
            raise RuntimeError(f"libcacard: {kind} {value}")
        return bytes.fromhex(value)

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, RuntimeError):
                self._ask("Q")
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
