"""Redaction rules added for the Yubico PIV extensions (``ccidemu/redact.py``): IMPORT KEY
and SET MANAGEMENT KEY data, PIN-protected objects (ykman keeps a PIN-protected management
key in 5FC109), key agreement answers (the shared secret)."""

from __future__ import annotations

import pytest

from ccidemu.apdu import CommandApdu, split_chain
from ccidemu.redact import Redactor, is_secret_command, redact_command, secret_response
from ccidemu.tlv import ber_encode

KEY = bytes(range(0x40, 0x60))  # stands for a secret


def _put(tag: int, value: bytes) -> CommandApdu:
    return CommandApdu(0, 0xDB, 0x3F, 0xFF, b"\x5c\x03" + tag.to_bytes(3, "big")
                       + ber_encode(0x53, value))


@pytest.mark.parametrize(("command", "secret"), [
    pytest.param(CommandApdu(0, 0xFE, 0x11, 0x9A, ber_encode(0x06, KEY)), True, id="import"),
    pytest.param(CommandApdu(0x10, 0xFE, 0x07, 0x9A, ber_encode(0x01, KEY)), True,
                 id="import-chained"),
    pytest.param(CommandApdu(0, 0xFF, 0xFF, 0xFE, bytes((0x0C, 0x9B, 32)) + KEY), True,
                 id="set-management-key-touch"),
    pytest.param(_put(0x5FC109, ber_encode(0x88, ber_encode(0x89, KEY))), True,
                 id="put-printed-information"),
    pytest.param(_put(0x5FC103, KEY), True, id="put-fingerprints"),
    pytest.param(_put(0x5FC105, KEY), False, id="put-certificate"),
    pytest.param(_put(0x5FFF00, KEY), False, id="put-admin-data"),
    pytest.param(CommandApdu(0, 0xF9, 0x9A, 0x00), False, id="attest"),
    pytest.param(CommandApdu(0, 0xF7, 0x00, 0x9B), False, id="metadata"),
])
def test_secret_commands(command: CommandApdu, secret: bool) -> None:
    raw = command.encode()
    assert is_secret_command(raw) == secret
    shown, cut = redact_command(raw)
    assert cut == secret
    if secret:
        assert KEY[:8] not in shown and shown == raw[:5]
    else:
        assert shown == raw


@pytest.mark.parametrize(("command", "secret"), [
    pytest.param("00cb3fff055c035fc10900", True, id="get-printed-information"),
    pytest.param("00cb3fff055c035fc12100", True, id="get-iris"),
    pytest.param("00cb3fff055c035fc10500", False, id="get-certificate"),
    pytest.param("0087119a477c458200" "8541" + "04" + "11" * 64, True, id="ecdh-p256"),
    pytest.param("0087e19a267c248200" "8520" + "22" * 32, True, id="x25519"),
    pytest.param("0087119a267c248200" "8120" + "85" * 32, False, id="ecdsa-with-85-bytes"),
    pytest.param("00f99a00", False, id="attest"),
])
def test_secret_responses(command: str, secret: bool) -> None:
    assert secret_response(bytes.fromhex(command)) == secret


def test_a_secret_put_data_chain_is_cut_link_by_link() -> None:
    """The later links of a chained PUT DATA carry no tag list: the redactor remembers."""
    value = ber_encode(0x88, ber_encode(0x89, KEY * 12))
    links = [link.encode() for link in split_chain(_put(0x5FC109, value))]
    assert len(links) >= 2
    redactor = Redactor()
    shown = [redactor.exchange(link, b"\x90\x00") for link in links]
    assert all(s.command == link[:5] and s.redacted for s, link in zip(shown, links,
                                                                        strict=True))
    # the chain is over: the next PUT DATA of a certificate is shown
    public = _put(0x5FC105, b"\x70\x01\x00").encode()
    assert redactor.exchange(public, b"\x90\x00").command == public
    # and the answer of GET DATA of the protected object is cut to its SW
    out = redactor.exchange(bytes.fromhex("00cb3fff055c035fc10900"), value[:20] + b"\x61\x10")
    assert out.response == b"\x61\x10"
    assert redactor.exchange(bytes.fromhex("00c0000010"), value[20:36] + b"\x90\x00"
                             ).response == b"\x90\x00"
    assert Redactor(secrets=True).exchange(links[0], b"\x90\x00").command == links[0]
