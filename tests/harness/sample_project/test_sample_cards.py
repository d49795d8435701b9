"""A third-party project's tests of its own card code, with ccidemu's card fixtures."""

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import ccidemu
from ccidemu.certs import issue_certificate, make_ca, new_private_key


def test_the_default_card_is_the_demo_piv_card(ccidemu_card_spec: str, ccidemu_card: ccidemu.Card,
                                               ccidemu_piv: ccidemu.PivClient) -> None:
    assert ccidemu_card_spec == "piv:"
    assert ccidemu_card.name == "PIV (demo)"
    assert ccidemu_piv.serial() == 51757879


def test_apdus_with_response_chaining(ccidemu_session: ccidemu.CardSession) -> None:
    # GET DATA of the 9C certificate: longer than one answer, so 61xx and GET RESPONSE
    data, sw = ccidemu_session.transmit(bytes.fromhex("00CB3FFF055C035FC10A00"))
    assert sw == 0x9000 and data[0] == 0x53
    assert any(e.response[-2] == 0x61 for e in ccidemu_session.exchanges)


@pytest.mark.ccidemu_card("cac:")
def test_a_marked_test_gets_the_cac_card(ccidemu_card: ccidemu.Card) -> None:
    assert ccidemu_card.name == "CAC (demo)"


class TestCardFromObjects:
    @pytest.fixture
    def ccidemu_card_spec(self, tmp_path: Path) -> str:
        ca_key, ca_cert = make_ca("sample CA")
        key = new_private_key("p384")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.cert = issue_certificate(ca_key, ca_cert, key, "sample signer")
        return ccidemu.write_piv_card(tmp_path / "card", {0x9C: (key, self.cert)},
                                      pin="13572468")

    def test_sign_with_a_key_made_here(self, ccidemu_piv: ccidemu.PivClient) -> None:
        assert ccidemu_piv.read_certificate(0x9C) == self.cert
        ccidemu_piv.verify_pin("13572468")
        signature = ccidemu_piv.sign(0x9C, b"sample", hashes.SHA384())
        public_key = self.cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(signature, b"sample", ec.ECDSA(hashes.SHA384()))
