"""The same over QEMU's side of the VSCard channel and a ccidemu serve (a subprocess here:
pytest.ini sets ccidemu_serve = subprocess)."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vmc.lab import ServeProcess, VscardChannel


def test_sign_over_vscard(ccidemu_vscard: VscardChannel) -> None:
    assert isinstance(ccidemu_vscard.serve, ServeProcess)
    piv = ccidemu_vscard.piv()
    piv.verify_pin("123456")
    plaintext = b"key transport"
    key_management = piv.read_certificate(0x9D).public_key()
    assert isinstance(key_management, rsa.RSAPublicKey)
    ciphertext = key_management.encrypt(plaintext, padding.PKCS1v15())
    assert piv.decrypt(0x9D, ciphertext) == plaintext
    signature = piv.sign(0x9A, b"over VSCard")
    authentication = piv.read_certificate(0x9A).public_key()
    assert isinstance(authentication, rsa.RSAPublicKey)
    authentication.verify(signature, b"over VSCard", padding.PKCS1v15(), hashes.SHA256())


def test_the_card_is_pulled_and_another_inserted(ccidemu_vscard: VscardChannel) -> None:
    assert ccidemu_vscard.atr[:2] == bytes.fromhex("3B8D")
    atr = ccidemu_vscard.reinsert("test:")
    assert atr == bytes.fromhex("3B0A") + b"ccidemu-TC"
    assert ccidemu_vscard.transmit(bytes.fromhex("80E0000002CAFE")) == bytes.fromhex("CAFE9000")
