"""Helpers shared by the test suites that drive real peers (tests/e2e, tests/pcscd).

Real peers (QEMU, pcscd with vpcd, OpenSC, ...) are installed by the README's test command, so a
missing one is a failure, naming what is missing.  An explicit opt-out skips them instead, and
the end of the run says so in its summary: ``--no-qemu`` / ``CCIDEMU_NO_QEMU=1`` for the QEMU
guest tests, ``--no-pcscd`` / ``CCIDEMU_NO_PCSCD=1`` for the real-client tests, ``--no-libcacard`` /
``CCIDEMU_NO_LIBCACARD=1`` for the side-by-side tests with the real libcacard, ``--no-libvirt`` /
``CCIDEMU_NO_LIBVIRT=1`` for the tests under a private libvirtd (tests/e2e/test_libvirt.py).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from ccidemu.card import BuiltinTestCard

#: The built-in test card's ATR as ``opensc-tool -a`` prints it.
TEST_ATR_TEXT = ":".join(f"{b:02x}" for b in BuiltinTestCard.ATR)

#: Peer kind -> (pytest option, environment variable) that opt out of its tests.
OPT_OUTS = {"qemu": ("--no-qemu", "CCIDEMU_NO_QEMU"), "pcscd": ("--no-pcscd", "CCIDEMU_NO_PCSCD"),
            "libcacard": ("--no-libcacard", "CCIDEMU_NO_LIBCACARD"),
            "libvirt": ("--no-libvirt", "CCIDEMU_NO_LIBVIRT")}

#: (kind, reason) of every peer group skipped in this run, for the terminal summary.
SKIPPED_PEERS: list[tuple[str, str]] = []


def opted_out(config: pytest.Config, kind: str) -> bool:
    option, variable = OPT_OUTS[kind]
    flag = bool(config.getoption(option.lstrip("-").replace("-", "_"), default=False))
    return flag or os.environ.get(variable, "").lower() in ("1", "true", "yes")


def require_peers(config: pytest.Config, kind: str, missing: list[str], install: str) -> None:
    """Fail the test when peers of ``kind`` are missing, naming them; skip (recorded for the
    summary) only when the user opted out of that kind."""
    if not missing:
        return
    option, variable = OPT_OUTS[kind]
    reason = f"{kind} peers missing: {', '.join(missing)}"
    if opted_out(config, kind):
        if (kind, reason) not in SKIPPED_PEERS:
            SKIPPED_PEERS.append((kind, reason))
        pytest.skip(f"{reason} ({option} given)")
    pytest.fail(f"{reason}; install them ({install}, or run tools/bootstrap.sh), or skip these "
                f"tests with {option} / {variable}=1", pytrace=False)


_RECEIVED_RE = re.compile(r"^Received \(SW1=0x([0-9a-fA-F]{2}), SW2=0x([0-9a-fA-F]{2})\)")
_HEX_PAIR_RE = re.compile(r"^[0-9A-Fa-f]{2}$")


def _dump_row(row: str) -> bytes | None:
    """The bytes of one row of opensc-tool's hex dump, or None if it is not one.

    A row is k hex pairs each followed by a space, then spaces (opensc-tool pads the last
    row of a multi-row dump to 16 columns, not a one-row dump), then the k-character ASCII
    column (which may itself look like hex).  The largest k that fits is the row.
    """
    row = row.rstrip("\r")
    for k in range(min(16, len(row) // 4), 0, -1):
        hex_field = row[: 3 * k]
        if (all(_HEX_PAIR_RE.match(hex_field[3 * i : 3 * i + 2]) and hex_field[3 * i + 2] == " "
                for i in range(k))
                and not row[3 * k : len(row) - k].strip()):
            return bytes(int(hex_field[3 * i : 3 * i + 2], 16) for i in range(k))
    return None


def opensc_responses(output: str) -> list[bytes]:
    """The response APDUs (data + SW1 SW2) in the output of ``opensc-tool -s ... -s ...``.

    opensc-tool prints ``Received (SW1=0x90, SW2=0x00):`` and then a hex dump of the data,
    16 bytes a row followed by an ASCII column (see :func:`_dump_row`).
    """
    responses: list[bytes] = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        m = _RECEIVED_RE.match(line)
        if not m:
            continue
        data = bytearray()
        for row in lines[i + 1:]:
            if row.startswith(("Sending:", "Received")) or not row.strip():
                break
            got = _dump_row(row)
            if got is None:
                break
            data += got
        responses.append(bytes(data) + bytes.fromhex(m.group(1) + m.group(2)))
    return responses


def private_parts(key: object) -> list[bytes]:
    """The secret values of a private key as a card could leak them (big-endian bytes):
    RSA d, p, q; the EC scalar; the raw Curve25519 key.  For "never leaks" assertions."""
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        return [x.to_bytes((x.bit_length() + 7) // 8, "big") for x in (n.d, n.p, n.q)]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        v = key.private_numbers().private_value
        return [v.to_bytes((key.curve.key_size + 7) // 8, "big")]
    if isinstance(key, ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey):
        return [key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())]
    raise TypeError(type(key).__name__)


# --------------------------------------------------------------------------- waiting and logs


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def logged(caplog: pytest.LogCaptureFixture, level: int, pattern: str) -> list[str]:
    """The messages at ``level`` that match ``pattern`` entirely."""
    return [r.getMessage() for r in list(caplog.records)
            if r.levelno == level and re.fullmatch(pattern, r.getMessage())]


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged with a traceback, nothing reached the daemon loop's last-resort catch."""
    bad = [r.getMessage() for r in list(caplog.records)
           if r.exc_info or "unexpected error in the daemon loop" in r.getMessage()]
    assert not bad, bad
