"""The identity a PIV card shows (firmware version, serial, form factor, ATR), and the
YubiKey 5 management application that a ``yubikey5`` identity answers next to PIV.

Pure: no I/O, no clocks.  Facts from Yubico's public documentation (developers.yubico.com,
"PIV / Yubico extensions"; docs.yubico.com "YubiKey firmware and features") and from what
yubikit (``yubikit/piv.py``, ``yubikit/management.py``) and yubico-piv-tool send and
expect; ``docs/YUBIKEY.md`` summarises them in our own words.

The firmware version gates the Yubico PIV extensions the way the real firmware does
(:class:`Features`); the default identity is an honest "ccidemu PIV" card (its own ATR,
no management application) that reports the newest feature level it implements.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import Enum, IntEnum

from ccidemu.apdu import CommandApdu
from ccidemu.atr import compute_tck
from ccidemu.errors import StatusWordError
from ccidemu.sw import SW
from ccidemu.tlv import ber_encode

Version = tuple[int, int, int]

#: The feature level this emulator implements, reported by the default identity.
DEFAULT_VERSION: Version = (5, 7, 1)


class FormFactor(IntEnum):
    """YubiKey form factors (the management application's device info, tag 04, and the
    PIV attestation extension 1.3.6.1.4.1.41482.3.9)."""

    UNKNOWN = 0x00
    USB_A_KEYCHAIN = 0x01
    USB_A_NANO = 0x02
    USB_C_KEYCHAIN = 0x03
    USB_C_NANO = 0x04
    USB_C_LIGHTNING = 0x05
    USB_A_BIO = 0x06
    USB_C_BIO = 0x07


FORM_FACTOR_NAMES: dict[str, FormFactor] = {
    "unknown": FormFactor.UNKNOWN, "usb-a-keychain": FormFactor.USB_A_KEYCHAIN,
    "usb-a-nano": FormFactor.USB_A_NANO, "usb-c-keychain": FormFactor.USB_C_KEYCHAIN,
    "usb-c-nano": FormFactor.USB_C_NANO, "usb-c-lightning": FormFactor.USB_C_LIGHTNING,
    "usb-a-bio": FormFactor.USB_A_BIO, "usb-c-bio": FormFactor.USB_C_BIO,
}


class Kind(Enum):
    """Who the card says it is."""

    CCIDEMU = "ccidemu"  # our own ATR and name; PIV only
    YUBIKEY5 = "yubikey5"  # a YubiKey 5's ATR, name and management application


class AtrKind(Enum):
    """Which YubiKey 5 ATR: the one of its USB CCID interface or the one it shows over NFC.

    ykman calls a card whose ATR has T0 = Fx a USB YubiKey and then insists on a Yubico
    reader name (which no virtual reader has, ``docs/YUBIKEY.md``); the NFC form works
    with ``ykman --reader`` on any reader."""

    NFC = "nfc"
    USB = "usb"


def _with_tck(body: bytes) -> bytes:
    return body + bytes((compute_tck(body),))


#: ISO/IEC 7816-4:2013 section 8.1.1 historical bytes: category indicator 80 (status, if
#: any, as a COMPACT-TLV object), then COMPACT-TLV objects: 73 card capabilities (byte 1
#: C0 = selection by full and by partial DF name; byte 2 21 = the data coding byte
#: YubiKeys send; byte 3 C0 = command chaining and extended Lc/Le), 5x card issuer's
#: data ("ccidemu").  ISO/IEC 7816-3 section 8.2: TS 3B, T0 8D (TD1, 13 historical
#: bytes), TD1 80 (T=0, TD2 follows), TD2 01 (T=1), TCK.
CCIDEMU_HISTORICAL = bytes.fromhex("8073C021C0") + bytes((0x57,)) + b"ccidemu"
CCIDEMU_ATR = _with_tck(bytes.fromhex("3B8D8001") + CCIDEMU_HISTORICAL)
#: The same historical bytes with "YubiKey" as the issuer's data, as YubiKey 5 sends them.
YUBIKEY_HISTORICAL = bytes.fromhex("8073C021C0") + bytes((0x57,)) + b"YubiKey"
#: YubiKey 5 over NFC: TS 3B, T0 8D, TD1 80, TD2 01, the historical bytes, TCK F9.
YUBIKEY5_NFC_ATR = _with_tck(bytes.fromhex("3B8D8001") + YUBIKEY_HISTORICAL)
#: YubiKey 5 on USB (CCID): TS 3B, T0 FD (TA1 TB1 TC1 TD1), TA1 13, TB1 00, TC1 00,
#: TD1 81 (T=1, TD2), TD2 31 (TA3 TB3, T=1), TA3 FE (IFSC 254), TB3 15, the historical
#: bytes, TCK 40.
YUBIKEY5_USB_ATR = _with_tck(bytes.fromhex("3BFD1300008131FE15") + YUBIKEY_HISTORICAL)

#: The YubiKey management application (yubikit ``AID.MANAGEMENT``).
MANAGEMENT_AID = bytes.fromhex("A000000527471117")
INS_READ_CONFIG = 0x1D
#: Device info tags (yubikit ``management.py``): USB supported/enabled capabilities,
#: serial, form factor, version.
_TAG_USB_SUPPORTED, _TAG_SERIAL, _TAG_USB_ENABLED, _TAG_FORM_FACTOR, _TAG_VERSION = (
    0x01, 0x02, 0x03, 0x04, 0x05)
_CAPABILITY_PIV = 0x0010


def parse_version(text: str) -> Version:
    """``"5.7.1"`` -> ``(5, 7, 1)``; ValueError unless three numbers 0-255."""
    match = re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", text.strip())
    if not match:
        raise ValueError(f"firmware version {text!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(g) for g in match.groups())
    if max(major, minor, patch) > 255:
        raise ValueError(f"firmware version {text!r} has a part above 255")
    return major, minor, patch


def default_serial(source: str) -> int:
    """A stable 8-digit serial for a card without one: from what the card is made of."""
    digest = hashlib.sha256(b"ccidemu-piv-serial:" + source.encode()).digest()
    return 10_000_000 + int.from_bytes(digest[:4], "big") % 90_000_000


@dataclass(frozen=True, slots=True)
class Features:
    """What a firmware version allows (yubikit ``check_key_support`` and the version checks
    of ``PivSession``; Yubico's firmware release notes)."""

    version: Version

    @property
    def policies(self) -> bool:  # PIN and touch policies, P-384: YubiKey 4
        return self.version >= (4, 0, 0)

    @property
    def attestation(self) -> bool:  # ATTEST, cached touch: 4.3
        return self.version >= (4, 3, 0)

    @property
    def cached_touch(self) -> bool:
        return self.version >= (4, 3, 0)

    @property
    def serial(self) -> bool:  # GET SERIAL (F8): 5.0 (yubikit requires 5.0.3)
        return self.version >= (5, 0, 0)

    @property
    def metadata(self) -> bool:  # GET METADATA (F7): 5.3
        return self.version >= (5, 3, 0)

    @property
    def aes_management_key(self) -> bool:  # AES management keys: 5.4
        return self.version >= (5, 4, 0)

    @property
    def move_key(self) -> bool:  # MOVE/DELETE KEY (F6), RSA 3072/4096, Ed25519, X25519: 5.7
        return self.version >= (5, 7, 0)

    @property
    def large_rsa(self) -> bool:
        return self.version >= (5, 7, 0)

    @property
    def curve25519(self) -> bool:
        return self.version >= (5, 7, 0)

    @property
    def aes_default_management_key(self) -> bool:
        """From 5.7 the factory management key is AES-192 (same bytes as the 3DES one)."""
        return self.version >= (5, 7, 0)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the card says it is: kind, firmware version, serial, form factor, ATR."""

    kind: Kind = Kind.CCIDEMU
    version: Version = DEFAULT_VERSION
    serial: int = 0
    form_factor: FormFactor = FormFactor.UNKNOWN
    atr_kind: AtrKind = AtrKind.NFC

    @property
    def features(self) -> Features:
        return Features(self.version)

    @property
    def atr(self) -> bytes:
        if self.kind is Kind.CCIDEMU:
            return CCIDEMU_ATR
        return YUBIKEY5_USB_ATR if self.atr_kind is AtrKind.USB else YUBIKEY5_NFC_ATR

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


class ManagementApplet:
    """The part of the YubiKey management application that identifies the device.

    SELECT answers the version as text (yubikit parses the first ``N.N.N`` in it);
    READ CONFIG (``00 1D page 00``) answers one page of device info: a length byte, then
    TLVs: USB supported and enabled capabilities (PIV only), serial, form factor, version.
    Configuration writes are refused (6D00): this card cannot be reconfigured.
    """

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def select_response(self) -> bytes:
        return f"ccidemu YubiKey management - FW version {self.identity.version_text}".encode()

    def device_info(self) -> bytes:
        identity = self.identity
        tlvs = b"".join((
            ber_encode(_TAG_USB_SUPPORTED, _CAPABILITY_PIV.to_bytes(2, "big")),
            ber_encode(_TAG_SERIAL, identity.serial.to_bytes(4, "big")),
            ber_encode(_TAG_USB_ENABLED, _CAPABILITY_PIV.to_bytes(2, "big")),
            ber_encode(_TAG_FORM_FACTOR, bytes((identity.form_factor,))),
            ber_encode(_TAG_VERSION, bytes(identity.version)),
        ))
        return bytes((len(tlvs),)) + tlvs

    def handle(self, cmd: CommandApdu) -> bytes:
        """One command while the management application is selected (not SELECT)."""
        if cmd.ins == INS_READ_CONFIG:
            if cmd.p2 != 0 or cmd.data:
                raise StatusWordError(SW.INCORRECT_P1P2)
            if cmd.p1 != 0:  # one page only: no "more data" tag in page 0
                raise StatusWordError(SW.INCORRECT_P1P2)
            return self.device_info()
        raise StatusWordError(SW.INS_NOT_SUPPORTED)
