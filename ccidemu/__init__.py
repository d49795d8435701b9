"""ccidemu: the protocol library (codecs, cards, traces). No sockets here except in adapters.

The surface for test writers (docs/TESTING.md), importable from ``ccidemu`` itself:

- cards: :func:`open_card` (a ``--card`` spec: ``piv:``, ``cac:``, ``piv:DIR``, ...) with
  :class:`CardOptions`; :func:`piv_card` / :func:`cac_card` from keys and certificates made
  in the test, :func:`write_piv_card` / :func:`write_cac_card` for the same as files (a
  spec); :func:`demo_piv_directory` / :func:`demo_cac_directory`, the demo cards' files;
- talking to a card: :class:`CardSession` (command chaining, GET RESPONSE and 6Cxx handled)
  over a card object or any transmit function; :class:`PivClient`, typed PIV operations;
  :class:`ApduError` / :class:`InvalidPinError`, :class:`CommandApdu`, :data:`SW`;
- errors: :class:`CcidemuError` (the root), :class:`ConfigError`, :class:`CardError`.

The channel side (an in-process ``ccidemu serve``, QEMU's side of the VSCard channel, a
private pcscd, a QEMU guest) is in :mod:`vmc.lab`; the pytest fixtures in
:mod:`vmc.pytest_plugin`.  Names load on first use, so ``import ccidemu`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: public name -> "module:attribute"
_EXPORTS = {
    "ApduError": "ccidemu.client:ApduError",
    "Card": "ccidemu.card:Card",
    "CardError": "ccidemu.errors:CardError",
    "CardOptions": "ccidemu.cards:CardOptions",
    "CardSession": "ccidemu.client:CardSession",
    "CcidemuError": "ccidemu.errors:CcidemuError",
    "CommandApdu": "ccidemu.apdu:CommandApdu",
    "ConfigError": "ccidemu.errors:ConfigError",
    "InvalidPinError": "ccidemu.piv_client:InvalidPinError",
    "PivClient": "ccidemu.piv_client:PivClient",
    "SW": "ccidemu.sw:SW",
    "cac_card": "ccidemu.testcards:cac_card",
    "demo_cac_directory": "ccidemu.demo:cac_directory",
    "demo_piv_directory": "ccidemu.demo:piv_directory",
    "open_card": "ccidemu.cards:open_card",
    "piv_card": "ccidemu.testcards:piv_card",
    "write_cac_card": "ccidemu.testcards:write_cac_card",
    "write_piv_card": "ccidemu.testcards:write_piv_card",
}

__all__ = [
    "SW", "ApduError", "Card", "CardError", "CardOptions", "CardSession", "CcidemuError",
    "CommandApdu", "ConfigError", "InvalidPinError", "PivClient", "__version__", "cac_card",
    "demo_cac_directory", "demo_piv_directory", "open_card", "piv_card", "write_cac_card",
    "write_piv_card",
]

if TYPE_CHECKING:
    from ccidemu.apdu import CommandApdu as CommandApdu
    from ccidemu.card import Card as Card
    from ccidemu.cards import CardOptions as CardOptions
    from ccidemu.cards import open_card as open_card
    from ccidemu.client import ApduError as ApduError
    from ccidemu.client import CardSession as CardSession
    from ccidemu.demo import cac_directory as demo_cac_directory
    from ccidemu.demo import piv_directory as demo_piv_directory
    from ccidemu.errors import CardError as CardError
    from ccidemu.errors import CcidemuError as CcidemuError
    from ccidemu.errors import ConfigError as ConfigError
    from ccidemu.piv_client import InvalidPinError as InvalidPinError
    from ccidemu.piv_client import PivClient as PivClient
    from ccidemu.sw import SW as SW
    from ccidemu.testcards import cac_card as cac_card
    from ccidemu.testcards import piv_card as piv_card
    from ccidemu.testcards import write_cac_card as write_cac_card
    from ccidemu.testcards import write_piv_card as write_piv_card


def lazy_exports(
    package: str, namespace: MutableMapping[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package`` (this one, and :mod:`vmc.lab`):
    ``exports`` maps a name to ``"module:attribute"``, imported on first access and then kept
    in ``namespace`` (the package's globals)."""

    def getattr_(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, _, attribute = target.partition(":")
        value = getattr(importlib.import_module(module_name), attribute)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *exports})

    return getattr_, dir_


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
