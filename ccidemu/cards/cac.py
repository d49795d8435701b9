"""The CAC card engine: GSC-IS 2.1 (NISTIR 6887) / CAC v2, as libcacard 2.8 emulates it.

Pure: no file I/O, no clocks.  What commands can change (the PIN retry counter) lives in
one :class:`CacState`; after each change the engine calls ``on_change(state)``, which
:mod:`ccidemu.cards.cac_files` uses to persist it.  Commands go through the shared
:class:`~ccidemu.cards.iso.IsoDispatcher` with :data:`~ccidemu.cards.iso.T0_RULES`, the
way libcacard sizes answers (docs/DESIGN.md, "CAC"): no Le field means Ne = 0 and an
answer longer than Ne is announced with ``61xx`` and fetched with GET RESPONSE.

Theory of operation (libcacard 2.8 is the reference, ``docs/DESIGN.md`` lists every
place where this card answers differently on purpose):

1. The card holds applets, each found by its exact AID with SELECT (P1 = 04): one PKI
   applet per certificate (A0 00 00 00 79 01 0i, i = 0..9), the ACA (access control
   applet, 79 03 00), the CCC (card capability container, A0 00 00 01 16 DB 00), empty
   and pass-through containers, the access control file applet (A0 00 00 01 16 30 00),
   the GlobalPlatform card manager (A0 00 00 00 03 00 00) and Microsoft's plug-and-play
   applet (A0 00 00 03 97 43 49 44 5F 01 00).  SELECT answers an FCI template; an
   unknown AID deselects the current applet and gets 6A82.
2. The selected applet answers first; what it leaves (SELECT with P1 other than 02,
   VERIFY, GET CHALLENGE, anything a non-CAC applet does not know) the card answers:
   SELECT, VERIFY and GET CHALLENGE, else 6900.  A CAC applet answers GET PROPERTIES
   (56), SELECT of a card object id (A4 P1 = 02) and, per kind, READ BUFFER (52), GET
   ACR (4C), SIGN/DECRYPT (42); other instructions get 6D00.
3. Security: the PIN is card-wide.  A good VERIFY logs in; a wrong one logs out and
   counts down a real retry counter (63Cx, 6983 once blocked: ISO/IEC 7816-4:2013
   section 11.5.6), kept in :class:`CacState`; VERIFY without data asks the state (9000
   logged in, else 63Cx).  SIGN/DECRYPT needs the login (6985 without it, as libcacard).
   Power-on logs out and deselects.
4. SIGN/DECRYPT is one raw RSA private operation (GSC-IS 2.1 section 5.3.3, CAC v2): data
   sent with P1 = 80 is kept, P1 = 00 ends the input; the whole input must be one
   modulus-sized block.  Keys are RSA only: GSC-IS 2.1 defines no other PKI algorithm.

No command returns private key material.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric import rsa

from ccidemu.apdu import CommandApdu
from ccidemu.cards.iso import T0_RULES, IsoDispatcher
from ccidemu.errors import StatusWordError
from ccidemu.rsa_raw import RawRsaError, RawRsaKey
from ccidemu.sw import SW
from ccidemu.tlv import simple_tlv_encode

log = logging.getLogger(__name__)

#: ATR of libcacard's emulated card (vcard_emul_nss.c, tests/libcacard.c ``CAC_ATR``):
#: TS=3B, T0=7A (TA1 TB1 TC1, 10 historical bytes), TA1=18, TB1=00, TC1=00, "sfte cd144".
ATR = bytes.fromhex("3B7A18000073667465206364313434")

DEFAULT_PIN = b"123456"
DEFAULT_RETRIES = 3
PIN_MIN_LENGTH = 4  # OpenSC's CAC driver (pkcs15-cac.c): 4 to 8 characters, FF padded
PIN_MAX_LENGTH = 8
MAX_CERTIFICATES = 10  # PKI applets 01 00 .. 01 09 (GSC-IS 2.1 / libcacard cac.c)
MAX_SIGN_INPUT = 65535  # SIGN/DECRYPT input collected with P1 = 80 (libcacard: no limit)


class Ins(IntEnum):
    """Instructions (GSC-IS 2.1 section 5.3.3, ISO/IEC 7816-4:2013 section 11)."""

    VERIFY = 0x20
    SIGN_DECRYPT = 0x42
    GET_ACR = 0x4C
    READ_BUFFER = 0x52
    GET_PROPERTIES = 0x56
    UPDATE_BUFFER = 0x58
    GET_CHALLENGE = 0x84
    SELECT = 0xA4
    GET_RESPONSE = 0xC0
    GET_DATA = 0xCA


# --- AIDs (GSC-IS 2.1 section 7, libcacard cac.c / gp.c / msft.c) ----------------------

RID_CAC = bytes.fromhex("A000000079")
RID_GSC = bytes.fromhex("A000000116")
ACA_AID = RID_CAC + b"\x03\x00"
CCC_AID = RID_GSC + b"\xDB\x00"
ACCESS_CONTROL_AID = RID_GSC + b"\x30\x00"
GP_AID = bytes.fromhex("A0000000030000")
MSFT_AID = bytes.fromhex("A0000003974349445F0100")


def pki_aid(index: int) -> bytes:
    """The AID of PKI applet ``index`` (0-9): A0 00 00 00 79 01 0i."""
    return RID_CAC + bytes((0x01, index))


# --- SIMPLE-TLV helpers (GSC-IS 2.1 section 8.4 buffers; ISO/IEC 7816-4 5.2.1, LSB first) ---

Items = Sequence[tuple[int, bytes]]


def _stlv(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(simple_tlv_encode(t, v, byteorder="little") for t, v in items)


def _length_prefixed(body: bytes) -> bytes:
    return len(body).to_bytes(2, "little") + body


def _tag_length(tag: int, length: int) -> bytes:
    if length < 0xFF:
        return bytes((tag, length))
    return bytes((tag, 0xFF)) + length.to_bytes(2, "little")


def tag_file(items: Items) -> bytes:
    """The T-buffer: 2-byte length (LSB first), then tag and length of every item."""
    return _length_prefixed(b"".join(_tag_length(t, len(v)) for t, v in items))


def value_file(items: Items) -> bytes:
    """The V-buffer: 2-byte length (LSB first), then the values one after the other."""
    return _length_prefixed(b"".join(v for _, v in items))


def fci(aid: bytes) -> bytes:
    """SELECT answer (ISO/IEC 7816-4 table 10): 6F { 84 AID, A5 (empty) }."""
    return bytes((0x6F, len(aid) + 4, 0x84, len(aid))) + aid + b"\xA5\x00"


#: The card manager's SELECT answer (GlobalPlatform 2.3.1 section 11.9.3, as libcacard):
#: 6F { 84 A0 00 00 00 03 00 00 00, A5 { 9F6E 12 91 51 81 01 00, 9F65 FF } }.
GP_FCI = bytes.fromhex("6F198408A000000003000000A50D9F6E061291518101009F6501FF")

#: GET DATA 0066, card recognition data (GlobalPlatform 2.3.1 section H.2, as libcacard).
GP_CARD_RECOGNITION = bytes.fromhex(
    "6631732F06072A864886FC6B01600C060A2A864886FC6B02020201630906072A864886FC6B03"
    "640B06092A864886FC6B040310")

#: Microsoft's smart card plug-and-play answer to GET DATA 7F68 (libcacard msft.c).
MSFT_DATA = bytes.fromhex(
    "301D02010016044D53465430120410E280E9D25188874F81D64F254E38001D")


def cplc(serial: bytes) -> bytes:
    """GET DATA 9F7F: the CPLC data (GlobalPlatform 2.3.1 section H.6), libcacard's values
    with the IC serial number (4 bytes) and IC batch identifier (2 bytes) taken from the
    card serial, so that drivers can tell cards apart."""
    return bytes.fromhex(
        "9F7F2A" "0005" "0045" "D001" "4021" "0101" "074F"
    ) + serial[:6].ljust(6, b"\x00") + bytes.fromhex(
        "4792" "7205" "1673" "7205" "1674" "7205" "00000A40" "0000" "0000" "000929BB")


# --- applet properties (GSC-IS 2.1 section 5.3.3.4) -----------------------------------

APPLET_INFORMATION = bytes.fromhex("1002060203")  # family 10, version 02 06 02 03
ACA_INFORMATION = bytes.fromhex("1002060202")
_PROPERTIES_TAIL = ((0x39, b"\x00"), (0x3A, ACA_AID))  # libcacard's "long" properties


def _buffer_properties(simple_tlv: bool, tag_length: int, value_length: int) -> bytes:
    return bytes((0x00 if simple_tlv else 0x01,)) + tag_length.to_bytes(2, "little") + \
        value_length.to_bytes(2, "little")


@dataclass(frozen=True, slots=True)
class Properties:
    """An applet's properties: the list GET PROPERTIES P1 = 01 and 02 use, and the longer
    list of the undocumented P1 = 40 (libcacard)."""

    short: tuple[tuple[int, bytes], ...]
    long: tuple[tuple[int, bytes], ...]


def _object_properties(coid: bytes, simple_tlv: bool, tag_length: int,
                       value_length: int) -> bytes:
    return _stlv([(0x41, coid), (0x42, _buffer_properties(simple_tlv, tag_length,
                                                            value_length)), (0x26, b"\x01")])


def container_properties(coids: Sequence[bytes], simple_tlv: bool = False) -> Properties:
    """Empty and pass-through containers: one TV object (50) of 60-byte buffers per card
    object id (libcacard announces them and serves empty buffers)."""
    items = [(0x01, APPLET_INFORMATION), (0x40, bytes((len(coids),)))]
    items += [(0x50, _object_properties(c, simple_tlv, 0x60, 0x60)) for c in coids]
    return Properties(tuple(items), tuple(items))


# --- the ACA's tables (GSC-IS 2.1 section 5.3.3.5, tables 5-15 to 5-21) -----------------


class AcrType(IntEnum):
    """Access control rule types (GSC-IS 2.1 table 3-2)."""

    ALWAYS = 0x00
    NEVER = 0x01
    XAUTH = 0x02
    XAUTH_OR_PIN = 0x03
    SECURE_CHANNEL_GP = 0x04
    PIN_ALWAYS = 0x05
    PIN = 0x06
    XAUTH_THEN_PIN = 0x07
    UPDATE_ONCE = 0x08
    PIN_THEN_XAUTH = 0x09
    SECURE_CHANNEL_ISO = 0x0B
    XAUTH_AND_PIN = 0x0C


@dataclass(frozen=True, slots=True)
class AcrEntry:
    """One ACR table entry: ACRID, ACR type, the applet id libcacard keeps with it, and the
    access methods (provider id, key id or reference)."""

    acrid: int
    acrtype: AcrType
    applet_id: int
    methods: tuple[tuple[int, int], ...] = ()

    def simple_tlv_value(self) -> bytes:
        """The A0 entry value as libcacard 2.8 sends it: the first 3 + 2n bytes of its C
        record (ACRID, type, applet id, a pad byte, the method count as a 32-bit
        little-endian int, ...), so the access methods themselves never show."""
        record = bytes((self.acrid, self.acrtype, self.applet_id, 0)) + \
            len(self.methods).to_bytes(4, "little")
        return record[: 3 + 2 * len(self.methods)]

    def extended(self) -> bytes:
        """The undocumented compressed form (GET ACR P1 = 40)."""
        methods = b"".join(bytes(m) for m in self.methods) or b"\x00\x00"
        head = bytes((0x08 if len(self.methods) == 2 else 0x06, self.acrid, self.acrtype,
                      self.applet_id))
        return head + methods + b"\x00"


ACR_TABLE: tuple[AcrEntry, ...] = (
    AcrEntry(0x00, AcrType.ALWAYS, 0x00),
    AcrEntry(0x01, AcrType.NEVER, 0x00),
    AcrEntry(0x02, AcrType.ALWAYS, 0x1F),
    AcrEntry(0x06, AcrType.PIN, 0x00, ((0x1E, 0x00),)),
    AcrEntry(0x04, AcrType.SECURE_CHANNEL_GP, 0x1F, ((0x1F, 0x21),)),
    AcrEntry(0x08, AcrType.XAUTH_OR_PIN, 0x00, ((0x1D, 0x01), (0x1E, 0x01))),
    AcrEntry(0x09, AcrType.XAUTH, 0x00, ((0x1D, 0x01),)),
    AcrEntry(0x0A, AcrType.XAUTH_OR_PIN, 0x00, ((0x1D, 0x03), (0x1E, 0x01))),
    AcrEntry(0x0B, AcrType.XAUTH, 0x00, ((0x1D, 0x00),)),
    AcrEntry(0x10, AcrType.ALWAYS, 0x1E),
    AcrEntry(0x11, AcrType.ALWAYS, 0x1D),
)


@dataclass(frozen=True, slots=True)
class InsRule:
    """One instruction of an object ACR (table 5-16): INS, configuration (01 P1, 02 P2,
    04 first data byte follow), the values, and the ACRID that applies."""

    ins: int
    acrid: int
    p1: int | None = None
    p2: int | None = None
    data1: int | None = None

    def encode(self) -> bytes:
        config = (1 if self.p1 is not None else 0) | (2 if self.p2 is not None else 0) | \
            (4 if self.data1 is not None else 0)
        extra = bytes(v for v in (self.p1, self.p2, self.data1) if v is not None)
        return bytes((self.ins, config)) + extra + bytes((self.acrid,))


@dataclass(frozen=True, slots=True)
class ObjectAcr:
    coid: bytes
    rules: tuple[InsRule, ...]

    def encode(self) -> bytes:
        return self.coid + b"".join(r.encode() for r in self.rules)


@dataclass(frozen=True, slots=True)
class AppletAcr:
    applet_id: int
    objects: tuple[ObjectAcr, ...]

    def encode(self) -> bytes:
        """The 80 entry value: applet id, object count, 82 { object ACR } per object."""
        body = b"".join(simple_tlv_encode(0x82, o.encode()) for o in self.objects)
        return bytes((self.applet_id, len(self.objects))) + body

    def extended(self) -> bytes:
        body = bytes((self.applet_id, len(self.objects))) + b"".join(
            bytes((len(o.encode()),)) + o.encode() for o in self.objects)
        return bytes((len(body),)) + body


_CARD_RULES = (InsRule(0x82, 0x11, p1=0x00), InsRule(0x84, 0x11), InsRule(0x20, 0x10))
_UPDATE, _READ = Ins.UPDATE_BUFFER, Ins.READ_BUFFER


def _pki_applet_acr(index: int) -> AppletAcr:
    return AppletAcr(0x61 + index, (
        ObjectAcr(bytes((0x01, index)), (InsRule(_UPDATE, 0x04), InsRule(_READ, 0x00),
                                         InsRule(Ins.SIGN_DECRYPT, 0x06))),
        ObjectAcr(b"\xFF\xFF", (InsRule(Ins.VERIFY, 0x10),)),
    ))


def _readable(coid: bytes, update: int, read: int) -> ObjectAcr:
    """An object whose value buffer needs ACR ``read`` (its tag buffer: always)."""
    return ObjectAcr(coid, (InsRule(_UPDATE, update), InsRule(_READ, 0x00, data1=0x01),
                            InsRule(_READ, read)))


def _plain(coid: bytes, update: int) -> ObjectAcr:
    return ObjectAcr(coid, (InsRule(_UPDATE, update), InsRule(_READ, 0x00)))


_CARD_OBJECT = ObjectAcr(b"\xFF\xFF", _CARD_RULES)
_SERVICE_RULES = ObjectAcr(b"\xFF\xFF", (InsRule(_UPDATE, 0x04), InsRule(_READ, 0x00),
                                         *_CARD_RULES))

#: The applet/object ACR table after the PKI applets (libcacard cac-aca.c; note that it
#: calls the CCC applet F4 here and 4F in the service applet table).
STATIC_APPLET_ACRS: tuple[AppletAcr, ...] = (
    AppletAcr(0x1F, (ObjectAcr(b"\xFF\xFF", (InsRule(Ins.VERIFY, 0x00),)),)),
    AppletAcr(0xF4, (_plain(b"\xDB\x00", 0x04), _CARD_OBJECT)),
    AppletAcr(0x4B, (_plain(b"\x02\xFB", 0x06), _CARD_OBJECT)),
    AppletAcr(0x41, (_readable(b"\x02\x00", 0x09, 0x08), _CARD_OBJECT)),
    AppletAcr(0x42, (_readable(b"\x02\x01", 0x0B, 0x0A), _CARD_OBJECT)),
    AppletAcr(0x40, (
        ObjectAcr(b"\x30\x00", (InsRule(_UPDATE, 0x04), InsRule(_READ, 0x00),
                                InsRule(0xB0, 0x00))),
        _readable(b"\x60\x10", 0x04, 0x06), _readable(b"\x60\x30", 0x04, 0x06),
        _plain(b"\x90\x00", 0x04), _CARD_OBJECT)),
    AppletAcr(0x4E, (_plain(b"\x02\xFE", 0x04), _CARD_OBJECT)),
    AppletAcr(0x4D, (_readable(b"\x02\xFD", 0x06, 0x06), _CARD_OBJECT)),
    AppletAcr(0x50, (_SERVICE_RULES,)),
    AppletAcr(0x51, (_SERVICE_RULES,)),
    AppletAcr(0x52, (_SERVICE_RULES,)),
    AppletAcr(0x44, (_readable(b"\x12\x01", 0x06, 0x06), _CARD_OBJECT)),
    AppletAcr(0x45, (_readable(b"\x12\x02", 0x06, 0x06), _CARD_OBJECT)),
)

#: Service applet table after the PKI applets (table 5-21): applet id, AID.
STATIC_SERVICES: tuple[tuple[int, bytes], ...] = (
    (0x40, ACCESS_CONTROL_AID), (0x4F, CCC_AID), (0x4B, RID_CAC + b"\x02\xFB"),
    (0x41, RID_CAC + b"\x02\x00"), (0x42, RID_CAC + b"\x02\x01"),
    (0x4E, RID_CAC + b"\x02\xFE"), (0x4D, RID_CAC + b"\x02\xFD"),
    (0x50, RID_CAC + b"\x02\xF2"), (0x51, RID_CAC + b"\x02\xF0"),
    (0x52, RID_CAC + b"\x02\xF1"), (0x44, RID_CAC + b"\x12\x01"),
    (0x45, RID_CAC + b"\x12\x02"),
)

#: Access method providers (table 5-20): id, AID.
AMP_TABLE: tuple[tuple[int, bytes], ...] = ((0x1F, ACA_AID), (0x1E, ACA_AID), (0x1D, ACA_AID))
#: GET ACR P1 = 60, libcacard's fixed compressed AMP table.
AMP_EXTENDED = bytes.fromhex(
    "1F0007A000000079030012000000" "1E0007A000000079030010010000" "1D0007A000000079030001000000")


def _record_bytes(first: int, length: int) -> bytes:
    """What libcacard 2.8 puts where an AID belongs in its AMP and service tables: the
    first ``length`` bytes of its C record (id, 3 pad bytes, the AID length as a 32-bit
    little-endian int), not the AID."""
    return (bytes((first, 0, 0, 0)) + length.to_bytes(4, "little"))[:length]


def _table_entry(ident: int, aid_length: int) -> bytes:
    return bytes((ident, 0x92, aid_length)) + _record_bytes(ident, aid_length)


# --- state ---------------------------------------------------------------------------


@dataclass
class CacState:
    """Everything the card's commands can change (persisted by cac_files)."""

    pin: bytes = DEFAULT_PIN
    pin_retries: int = DEFAULT_RETRIES  # the maximum (reset value)
    pin_left: int = DEFAULT_RETRIES


def valid_pin(value: bytes) -> bool:
    """4 to 8 bytes, no FF (FF is the padding VERIFY strips)."""
    return PIN_MIN_LENGTH <= len(value) <= PIN_MAX_LENGTH and b"\xff" not in value


@dataclass(frozen=True, slots=True)
class PkiCredential:
    """One PKI applet's certificate (DER) and RSA private key."""

    certificate: bytes
    key: rsa.RSAPrivateKey


def card_serial(first_certificate: bytes) -> bytes:
    """The card serial: SHA-256 of the first certificate (as libcacard)."""
    return hashlib.sha256(first_certificate).digest()


# --- applets -------------------------------------------------------------------------

Answer = bytes | None  # None: the card level answers (libcacard's VCARD_NEXT)


class Applet:
    """An applet: its AID, what SELECT answers, and the commands it answers itself."""

    aid: bytes
    select_answer: bytes

    def reset(self) -> None:
        """Selected again, or the card was reset."""

    def process(self, card: CacCard, cmd: CommandApdu) -> Answer:
        return None


class CacApplet(Applet):
    """GSC-IS 2.1 commands every CAC applet answers (libcacard cac_common_process_apdu)."""

    #: READ BUFFER and UPDATE BUFFER handled here (else 6D00 from the common part)
    buffers = True
    #: UPDATE BUFFER's status word when buffers are handled
    update_sw: int = SW.COMMAND_NOT_ALLOWED

    def __init__(self, aid: bytes, properties: Properties, coids: Sequence[bytes],
                 tag_buffer: bytes = b"\x00\x00", value_buffer: bytes = b"\x00\x00") -> None:
        self.aid = aid
        self.select_answer = fci(aid)
        self.properties = properties
        self.coids = frozenset(coids)
        self.tag_buffer = tag_buffer
        self.value_buffer = value_buffer

    def process(self, card: CacCard, cmd: CommandApdu) -> Answer:
        ins = cmd.ins
        if self.buffers:
            if ins == Ins.READ_BUFFER:
                return self._read_buffer(cmd)
            if ins == Ins.UPDATE_BUFFER:
                raise StatusWordError(self.update_sw)
        if ins == Ins.GET_PROPERTIES:
            return self._get_properties(cmd)
        if ins == Ins.SELECT:
            if cmd.p1 != 0x02:
                return None
            if len(cmd.data) != 2:
                raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE)
            if cmd.data not in self.coids:
                raise StatusWordError(SW.FILE_NOT_FOUND)
            return b""
        if ins in (Ins.VERIFY, Ins.GET_RESPONSE, Ins.GET_CHALLENGE):
            return None
        raise StatusWordError(SW.INS_NOT_SUPPORTED)

    def _get_properties(self, cmd: CommandApdu) -> bytes:
        """GET PROPERTIES (GSC-IS 2.1 section 5.3.3.4): P1 01 all, 02 the tags listed in
        the data field, 40 libcacard's long list; Ne larger than the answer: 6Cxx."""
        if cmd.p2 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if cmd.p1 == 0x01:
            if cmd.data:
                raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE)
            items = self.properties.short
        elif cmd.p1 == 0x02:
            if not cmd.data:
                raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE)
            found: list[tuple[int, bytes]] = []
            for tag in cmd.data:
                match = next((item for item in self.properties.short if item[0] == tag), None)
                if match is None:
                    raise StatusWordError(SW.REFERENCE_NOT_FOUND)
                found.append(match)
            items = tuple(found)
        elif cmd.p1 == 0x40:
            items = self.properties.long
        else:
            raise StatusWordError(SW.INCORRECT_P1P2)
        answer = _stlv(items)
        if cmd.ne > len(answer):
            raise StatusWordError(0x6C00 | (len(answer) & 0xFF))
        return answer

    def _read_buffer(self, cmd: CommandApdu) -> bytes:
        """READ BUFFER (CAC v2, buffers as GSC-IS 2.1 section 8.4): data = buffer (01 tag,
        02 value) and length; P1 P2 = offset.  Past the end: 6A86."""
        data = cmd.data
        if len(data) != 2:
            raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE)
        if data[0] == 0x01:
            buffer = self.tag_buffer
        elif data[0] == 0x02:
            buffer = self.value_buffer
        else:
            raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE)
        offset = cmd.p1 << 8 | cmd.p2
        size = min(data[1], len(buffer) - offset)
        if size < 0:
            raise StatusWordError(SW.INCORRECT_P1P2)
        return buffer[offset:offset + size]


class PkiApplet(CacApplet):
    """A PKI applet: one certificate (tag 70 of the value buffer) and its RSA key."""

    update_sw = SW.CONDITIONS_NOT_SATISFIED

    def __init__(self, index: int, credential: PkiCredential) -> None:
        cert = credential.certificate
        items = [(0x71, b"\x00"), (0x70, cert), (0x72, b""), (0xFE, b"")]  # CertInfo: plain
        tags, values = tag_file(items), value_file(items)
        self.key = RawRsaKey(credential.key)
        bits = credential.key.key_size
        coid = bytes((0x01, index))
        pki_object = _stlv([
            (0x41, coid), (0x42, _buffer_properties(True, len(tags), len(values))),
            # algorithm 06 (RSA, GSC-IS table 5-6), key length / 64, keys present
            (0x43, bytes((0x06, (bits // 64) & 0xFF, 0x01, 0x01))), (0x26, b"\x01")])
        short = ((0x01, APPLET_INFORMATION), (0x40, b"\x01"), (0x51, pki_object))
        super().__init__(pki_aid(index), Properties(short, short + _PROPERTIES_TAIL),
                         (coid,), tags, values)
        self._input = b""

    def reset(self) -> None:
        self._input = b""

    def process(self, card: CacCard, cmd: CommandApdu) -> Answer:
        if cmd.ins == Ins.SIGN_DECRYPT:
            return self._sign_decrypt(card, cmd)
        return super().process(card, cmd)

    def _sign_decrypt(self, card: CacCard, cmd: CommandApdu) -> bytes:
        """SIGN/DECRYPT (GSC-IS 2.1 section 5.3.3): P1 80 more data follows, 00 last."""
        if cmd.p2 != 0x00:  # the input kept so far stays (libcacard)
            raise StatusWordError(SW.INCORRECT_P1P2)
        if cmd.p1 == 0x80:
            if len(self._input) + len(cmd.data) > MAX_SIGN_INPUT:  # bounded memory
                self._input = b""
                raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE, "input too long")
            self._input += cmd.data
            return b""
        block, self._input = self._input + cmd.data, b""
        if cmd.p1 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if not card.logged_in:
            raise StatusWordError(SW.CONDITIONS_NOT_SATISFIED, "PIN needed")
        try:
            return self.key.private_op(block)
        except RawRsaError:
            raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE) from None


class AcaApplet(CacApplet):
    """The access control applet: GET ACR (GSC-IS 2.1 section 5.3.3.5)."""

    buffers = False

    def __init__(self, certificates: int) -> None:
        long = (
            (0x01, ACA_INFORMATION), (0x23, bytes.fromhex("201100000000000000000058")),
            (0x2A, b"\x02\x00"), (0x2B, RID_CAC),
            (0x22, bytes.fromhex("000000DA01B40330000000700051029D")), (0x2C, b"\x00"),
            (0x20, b"\x08\x01"), (0x21, b"\x0F"), (0x32, b"\x03\x03\x03\x03"),
            (0x30, b"\x08"), (0x31, b"\x06\x08\x00\x00"), (0x24, b"\xFF"),
            (0x25, b"\x01\x00"), (0x26, b"\x01"),
        )
        super().__init__(ACA_AID, Properties(long[:1], long), (b"\x03\x00",))
        self.applet_acrs = tuple(_pki_applet_acr(i) for i in range(certificates)) + \
            STATIC_APPLET_ACRS
        self.services = tuple((0x61 + i, pki_aid(i)) for i in range(certificates)) + \
            STATIC_SERVICES
        self._answers = self._fixed_answers()

    def _fixed_answers(self) -> dict[int, bytes]:
        info = [(0x01, ACA_INFORMATION)]
        acr = info + [(0xA1, bytes((len(ACR_TABLE),)))] + [
            (0xA0, e.simple_tlv_value()) for e in ACR_TABLE]
        applets = info + [(0x81, bytes((len(self.applet_acrs),)))] + [
            (0x80, a.encode()) for a in self.applet_acrs]
        # libcacard 2.8 lists its AMP entries from the second one on, then an empty one
        amp_rows = [*AMP_TABLE[1:], (0, b"")]
        amp = info + [(0x91, bytes((len(AMP_TABLE),)))] + [
            (0x90, _table_entry(i, len(aid))) for i, aid in amp_rows]
        services = info + [(0x94, bytes((len(self.services),)))] + [
            (0x93, _table_entry(i, len(aid))) for i, aid in self.services]
        acr_ext = b"".join(e.extended() for e in ACR_TABLE)
        applets_ext = b"".join(a.extended() for a in self.applet_acrs)
        services_ext = b"".join(bytes((i, 0, len(aid))) + aid for i, aid in self.services)
        return {
            0x00: _stlv(acr), 0x40: acr_ext, 0x41: acr_ext,
            0x10: _stlv(applets), 0x50: applets_ext, 0x51: applets_ext, 0x52: applets_ext,
            0x20: _stlv(amp), 0x60: AMP_EXTENDED, 0x21: _stlv(services), 0x61: services_ext,
        }

    def process(self, card: CacCard, cmd: CommandApdu) -> Answer:
        if cmd.ins == Ins.GET_ACR:
            return self._get_acr(cmd)
        return super().process(card, cmd)

    def _get_acr(self, cmd: CommandApdu) -> bytes:
        """P1: 00 ACR table, 01 one ACRID, 10 applet/object ACRs, 11 one applet (AID),
        12 one object (card object id), 20 access method providers, 21 service applets;
        with bit 40 libcacard's compressed forms."""
        if cmd.p2 != 0x00:
            raise StatusWordError(SW.INCORRECT_P1P2)
        p1, data = cmd.p1, cmd.data
        wanted = {0x01: 1, 0x11: 7, 0x12: 2}.get(p1, 0)
        if p1 not in self._answers and wanted == 0:
            raise StatusWordError(SW.COMMAND_NOT_ALLOWED)
        if len(data) != wanted:
            raise StatusWordError(SW.REFERENCE_DATA_NOT_USABLE)
        info = (0x01, ACA_INFORMATION)
        if p1 == 0x01:
            entry = next((e for e in ACR_TABLE if e.acrid == data[0]), None)
            if entry is None:
                raise StatusWordError(SW.REFERENCE_NOT_FOUND)
            return _stlv([info, (0xA0, entry.simple_tlv_value())])
        if p1 == 0x11:
            ident = next((i for i, aid in self.services if aid == data), None)
            if ident is None:
                raise StatusWordError(SW.REFERENCE_NOT_FOUND)
            return _stlv([info] + [(0x80, a.encode()) for a in self.applet_acrs
                                   if a.applet_id == ident])
        if p1 == 0x12:
            for applet in self.applet_acrs:
                for obj in applet.objects:
                    if obj.coid == data:
                        return _stlv([info, (0x82, obj.encode())])
            raise StatusWordError(SW.WRONG_DATA)
        return self._answers[p1]


class GetDataApplet(Applet):
    """An applet that answers only GET DATA (CA) for fixed tags (P1 P2); the rest goes to
    the card level.  Unknown tag: 6A88."""

    def __init__(self, aid: bytes, select_answer: bytes, data: dict[int, bytes]) -> None:
        self.aid = aid
        self.select_answer = select_answer
        self.data = data

    def process(self, card: CacCard, cmd: CommandApdu) -> Answer:
        if cmd.ins != Ins.GET_DATA:
            return None
        answer = self.data.get(cmd.p1 << 8 | cmd.p2)
        if answer is None:
            raise StatusWordError(SW.REFERENCE_NOT_FOUND)
        return answer


def build_applets(credentials: Sequence[PkiCredential], serial: bytes) -> list[Applet]:
    """The card's applets, in libcacard's order (cac.c cac_card_init, then GP and MSFT)."""
    applets: list[Applet] = [PkiApplet(i, c) for i, c in enumerate(credentials)]
    applets.append(AcaApplet(len(credentials)))
    applets.append(_ccc_applet(len(credentials)))
    for last in (b"\x02\xF0", b"\x02\xF1", b"\x02\xF2"):  # containers without objects
        applets.append(CacApplet(RID_CAC + last, container_properties(()), ()))
    for last in (b"\x02\xFB", b"\x02\xFE", b"\x02\xFD"):
        applets.append(CacApplet(RID_CAC + last, container_properties((last,)), (last,)))
    for last in (b"\x02\x00", b"\x02\x01"):  # person instance, personnel: pass-through
        applets.append(CacApplet(RID_CAC + last, container_properties((last,), True),
                                 (last,)))
    for last in (b"\x12\x01", b"\x12\x02"):
        applets.append(CacApplet(RID_CAC + last, container_properties((last,)), (last,)))
    acf = (b"\x30\x00", b"\x60\x10", b"\x60\x30", b"\x90\x00")
    applets.append(CacApplet(ACCESS_CONTROL_AID, container_properties(acf), acf))
    applets.append(GetDataApplet(GP_AID, GP_FCI, {0x9F7F: cplc(serial),
                                                  0x0066: GP_CARD_RECOGNITION}))
    applets.append(GetDataApplet(MSFT_AID, fci(MSFT_AID), {0x7F68: MSFT_DATA}))
    return applets


#: The CCC's card identifier (GSC-RID, manufacturer 02, card type 40, card id) as libcacard.
CCC_CARD_IDENTIFIER = bytes.fromhex("A000000079030240705072360E000058BD002C19B5")


def _card_url(rid: bytes, app_type: int, oid: bytes, aid: bytes) -> bytes:
    """An Applications CardURL (GSC-IS 2.1 section 7.3): RID, application type, object
    id, AID; the access profile, PIN id, key info and key algorithm stay 0."""
    return rid + bytes((app_type,)) + oid + aid + bytes(6)


def _ccc_applet(certificates: int) -> CacApplet:
    """The card capability container (GSC-IS 2.1 section 7, CCC table 7-1)."""
    urls = [
        _card_url(RID_CAC, 0x01, b"\x02\xFB", b"\x02\xFB"),
        _card_url(RID_CAC, 0x01, b"\x02\xFE", b"\x02\xFE"),
        _card_url(RID_CAC, 0x01, b"\x02\xFD", b"\x02\xFD"),
        _card_url(RID_CAC, 0x01, b"\x02\x00", b"\x02\x00"),
        _card_url(RID_CAC, 0x01, b"\x02\x01", b"\x02\x01"),
        _card_url(RID_GSC, 0x01, b"\x30\x00", b"\x30\x00"),
        _card_url(RID_GSC, 0x01, b"\x60\x10", b"\x30\x00"),
        _card_url(RID_GSC, 0x01, b"\x60\x30", b"\x30\x00"),
        _card_url(RID_GSC, 0x01, b"\x90\x00", b"\x30\x00"),
        _card_url(RID_CAC, 0x01, b"\x12\x01", b"\x12\x01"),
        _card_url(RID_CAC, 0x01, b"\x12\x02", b"\x12\x02"),
    ] + [_card_url(RID_CAC, 0x04, bytes((0x01, i)), bytes((0x01, i)))
         for i in range(certificates)]
    items: list[tuple[int, bytes]] = [(0xF0, CCC_CARD_IDENTIFIER), (0xF1, b"\x21"),
                                      (0xF2, b"\x21")]
    items += [(0xF3, url) for url in urls]
    items += [
        (0xF4, b"\x00"),  # PKCS#15: no
        (0xF5, b"\x10"),  # registered data model (as SP 800-73-4's PIV number)
        (0xF6, b"\x07" + ACA_AID + bytes(9)),  # access control rule table
        (0xF7, b""), (0xFA, b""), (0xFB, b""), (0xFC, b""), (0xFD, b""), (0xFE, b""),
    ]
    tags, values = tag_file(items), value_file(items)
    tv = _stlv([(0x41, b"\xDB\x00"), (0x42, _buffer_properties(True, len(tags), len(values)))])
    short = ((0x01, APPLET_INFORMATION), (0x40, b"\x01"), (0x50, tv))
    return CacApplet(CCC_AID, Properties(short, short + _PROPERTIES_TAIL), (b"\xDB\x00",),
                     tags, values)


# --- the card ------------------------------------------------------------------------


class CacCard:
    """An emulated CAC card (implements :class:`ccidemu.card.Card`)."""

    blocking: ClassVar[bool] = False
    ATR: ClassVar[bytes] = ATR

    def __init__(
        self,
        credentials: Sequence[PkiCredential],
        state: CacState | None = None,
        *,
        on_change: Callable[[CacState], None] | None = None,
        label: str = "",
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not 1 <= len(credentials) <= MAX_CERTIFICATES:
            raise ValueError(f"a CAC card holds 1 to {MAX_CERTIFICATES} certificates, "
                             f"not {len(credentials)}")
        self.state = state or CacState()
        self.serial = card_serial(credentials[0].certificate)
        self._on_change = on_change
        self._label = label
        self._rng = rng
        self.applets = build_applets(credentials, self.serial)
        self._by_aid = {a.aid: a for a in self.applets}
        route = self._route
        handlers = {ins: route for ins in range(256) if ins != Ins.GET_RESPONSE}
        self._dispatcher = IsoDispatcher(handlers, classes=(0x00, 0x80), rules=T0_RULES)
        self.current: Applet | None = None
        self.logged_in = False

    # -- Card protocol --

    @property
    def name(self) -> str:
        return "CAC" + (f" ({self._label})" if self._label else "")

    def power_on(self) -> bytes:
        self._reset()
        return ATR

    def power_off(self) -> None:
        self._reset()

    def transmit(self, apdu: bytes) -> bytes:
        return self._dispatcher.process(apdu)

    def costly(self, apdu: bytes) -> bool:
        """:class:`ccidemu.card.CostHint`: SIGN/DECRYPT (RSA) and, when the PIN counter is
        saved to disk, VERIFY."""
        if len(apdu) < 2:
            return False
        return apdu[1] == 0x42 or (apdu[1] == 0x20 and self._on_change is not None)

    # -- helpers --

    def _reset(self) -> None:
        self.logged_in = False
        self.current = None
        for applet in self.applets:
            applet.reset()
        self._dispatcher.reset()

    def _changed(self) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self.state)
        except Exception as exc:
            log.error("could not save the CAC card state: %s", exc)
            raise StatusWordError(SW.MEMORY_FAILURE, "state not saved") from None

    def _route(self, cmd: CommandApdu) -> bytes:
        applet = self.current
        if applet is not None:
            answer = applet.process(self, cmd)
            if answer is not None:
                return answer
        ins = cmd.ins
        if ins == Ins.SELECT:
            return self._select(cmd)
        if ins == Ins.VERIFY:
            return self._verify(cmd)
        if ins == Ins.GET_CHALLENGE:
            return self._get_challenge(cmd)
        raise StatusWordError(SW.COMMAND_NOT_ALLOWED)

    # -- card-level commands --

    def _select(self, cmd: CommandApdu) -> bytes:
        """SELECT by AID (GSC-IS 2.1 section 5.3.3.2: P1 = 04, exact AID)."""
        if cmd.p1 != 0x04:
            raise StatusWordError(SW.FUNCTION_NOT_SUPPORTED)
        applet = self._by_aid.get(cmd.data)
        self.current = applet
        if applet is None:
            raise StatusWordError(SW.FILE_NOT_FOUND)
        applet.reset()
        return applet.select_answer

    def _verify(self, cmd: CommandApdu) -> bytes:
        """VERIFY (ISO/IEC 7816-4:2013 section 11.5.6; P1 P2 = 00 00, PIN padded with FF)."""
        if cmd.p1 or cmd.p2:
            raise StatusWordError(SW.WRONG_PARAMETERS_NO_INFO)
        state = self.state
        if not cmd.data:
            if self.logged_in:
                return b""
            if state.pin_left <= 0:
                raise StatusWordError(SW.AUTH_METHOD_BLOCKED)
            raise StatusWordError(0x63C0 | min(state.pin_left, 15))
        self.logged_in = False
        if state.pin_left <= 0:
            raise StatusWordError(SW.AUTH_METHOD_BLOCKED)
        if hmac.compare_digest(cmd.data.rstrip(b"\xff"), state.pin):
            self.logged_in = True
            if state.pin_left != state.pin_retries:
                state.pin_left = state.pin_retries
                self._changed()
            return b""
        state.pin_left -= 1
        self._changed()
        raise StatusWordError(0x63C0 | min(state.pin_left, 15))

    def _get_challenge(self, cmd: CommandApdu) -> bytes:
        """GET CHALLENGE (ISO/IEC 7816-4:2013 section 11.5.3): Ne random bytes (1-256)."""
        if cmd.p1 or cmd.p2:
            raise StatusWordError(SW.INCORRECT_P1P2)
        if not 1 <= cmd.ne <= 256 or cmd.data:
            raise StatusWordError(SW.WRONG_LENGTH)
        return self._rng(cmd.ne)
