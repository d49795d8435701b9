"""Card implementations and the ``--card SPEC`` registry.

A spec is ``SCHEME:ARGUMENT`` (``test:``, ``piv:DIR``, ``piv:PROFILE.toml``,
``cac:DIR``, ``cac:PROFILE.toml``, ``replay:TRACE[,match][,mask=SPEC]``, later ``pcsc:``,
``usb:``).  Each scheme maps to a factory that receives the argument and the shared
:class:`CardOptions`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccidemu.card import BuiltinTestCard, Card
from ccidemu.errors import ConfigError


@dataclass(frozen=True)
class CardOptions:
    """Options shared by every card factory."""

    state_dir: Path | None = None  # where changed card state persists; None = in memory
    read_only: bool = False  # never write card state to disk
    #: the runtime's touch sensor for cards with a touch button (the PIV card's touch
    #: policies): called with a ``ccidemu.cards.piv.TouchRequest``, True when touched.  It
    #: may wait (a delay, a ``ctl touch``); a card given one is a blocking card.  None:
    #: every touch is pressed at once.
    touch: Callable[[Any], bool] | None = None


CardFactory = Callable[[str, CardOptions], Card]

# scheme -> "module:function"; modules are imported only when their scheme is used,
# so that optional dependencies (pyscard, pyusb) are needed only by their users.
_FACTORIES: dict[str, str] = {
    "test": "ccidemu.cards:_open_test_card",
    "piv": "ccidemu.cards.piv_files:open_piv_card",
    "cac": "ccidemu.cards.cac_files:open_cac_card",
    "replay": "ccidemu.traces.replay:open_replay_card",
}


def _open_test_card(argument: str, options: CardOptions) -> Card:
    return BuiltinTestCard(argument)


def schemes() -> list[str]:
    """The card schemes this build knows."""
    return sorted(_FACTORIES)


def register(scheme: str, target: str) -> None:
    """Register ``"module:function"`` as the factory for ``scheme``."""
    _FACTORIES[scheme] = target


def open_card(spec: str, options: CardOptions | None = None) -> Card:
    """Build the card a ``--card SPEC`` names.  Raises ConfigError with a clear message."""
    scheme, sep, argument = spec.partition(":")
    if not sep and scheme not in _FACTORIES:
        known = ", ".join(schemes())
        raise ConfigError(f"card spec {spec!r} is not SCHEME:ARGUMENT (schemes: {known})")
    target = _FACTORIES.get(scheme)
    if target is None:
        known = ", ".join(schemes())
        raise ConfigError(f"unknown card scheme {scheme!r} in {spec!r} (known: {known})")
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"card scheme {scheme!r} is not available: {exc}") from exc
    factory: CardFactory = getattr(module, func_name)
    return factory(argument, options or CardOptions())
