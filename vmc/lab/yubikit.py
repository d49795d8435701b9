"""yubikit (``yubikey-manager`` on PyPI) talking to a card object in this process.

:class:`CardConnection` is a yubikit ``SmartCardConnection`` over any
:class:`ccidemu.card.Card`: ``PivSession(CardConnection(card))`` drives the emulated PIV
card with Yubico's own client library, no pcscd or reader in between.  yubikit is a test
dependency (the ``dev`` extra); importing this module without it raises ImportError.
"""

from __future__ import annotations

from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection

from ccidemu.card import Card


class CardConnection(SmartCardConnection):
    """A yubikit smart card connection to ``card``, powered on when made.

    ``transport`` is what yubikit is told the link is (NFC is what an unknown reader
    counts as; USB makes yubikit expect a YubiKey's USB product id)."""

    def __init__(self, card: Card, transport: TRANSPORT = TRANSPORT.NFC) -> None:
        self.card = card
        self.atr = card.power_on()
        self._transport = transport
        self.exchanges = 0

    @property
    def transport(self) -> TRANSPORT:
        return self._transport

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        self.exchanges += 1
        response = self.card.transmit(bytes(apdu))
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        self.card.power_off()
