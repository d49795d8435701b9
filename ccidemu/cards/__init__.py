"""Card implementations and the ``--card SPEC`` registry.

A spec is ``SCHEME:ARGUMENT`` (``test:``, ``piv:DIR``, ``piv:PROFILE.toml``,
``cac:DIR``, ``cac:PROFILE.toml``, ``replay:TRACE[,match][,mask=SPEC]``, ``pcsc:READER``,
``usb:VID:PID[:SERIAL]``).  Each scheme maps to a factory that receives the argument and the
shared :class:`CardOptions`.

A few specs name a *set* of readers rather than one card: ``pcsc:*`` is every reader of the
host's pcscd, present and plugged in later.  :func:`is_reader_set` tells them apart and
:func:`open_reader_set` opens one (a :class:`ccidemu.card.ReaderSet`); the daemon gives each
reader of the set to one VM (docs/DESIGN.md, "Real cards").

The passthrough schemes live in the application package (``vmc.backends``: they do I/O) and
are named here by module path only, imported when used, so that pyscard and pyusb stay
optional extras.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccidemu.card import BuiltinTestCard, Card, ReaderSet
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
    #: passthrough (pcsc:): hold the reader exclusively (else shared with other programs)
    exclusive: bool = False
    #: passthrough (pcsc:): the readers this VM may get (regular expressions, searched in
    #: the reader's name); empty: any reader
    allow_readers: tuple[str, ...] = ()


CardFactory = Callable[[str, CardOptions], Card]

# scheme -> "module:function"; modules are imported only when their scheme is used,
# so that optional dependencies (pyscard, pyusb) are needed only by their users.
_FACTORIES: dict[str, str] = {
    "test": "ccidemu.cards:_open_test_card",
    "piv": "ccidemu.cards.piv_files:open_piv_card",
    "cac": "ccidemu.cards.cac_files:open_cac_card",
    "replay": "ccidemu.traces.replay:open_replay_card",
    "pcsc": "vmc.backends.pcsc:open_pcsc_card",
    "usb": "vmc.backends.usb:open_usb_card",
}
#: scheme -> "module:function" of the reader-set factory, and the arguments that mean a set
_SETS: dict[str, tuple[str, frozenset[str]]] = {
    "pcsc": ("vmc.backends.pcsc:open_pcsc_set", frozenset({"*"})),
}


def _open_test_card(argument: str, options: CardOptions) -> Card:
    return BuiltinTestCard(argument)


def schemes() -> list[str]:
    """The card schemes this build knows."""
    return sorted(_FACTORIES)


def register(scheme: str, target: str) -> None:
    """Register ``"module:function"`` as the factory for ``scheme``."""
    _FACTORIES[scheme] = target


def register_set(scheme: str, target: str, arguments: frozenset[str] = frozenset({"*"})
                 ) -> None:
    """Register ``"module:function"`` as the reader-set factory of ``scheme`` for the
    ``arguments`` that mean a set (``SCHEME:*``)."""
    _FACTORIES.setdefault(scheme, target)
    _SETS[scheme] = (target, arguments)


def is_reader_set(spec: str) -> bool:
    """Whether ``spec`` names a set of readers (``pcsc:*``) rather than one card."""
    scheme, _, argument = spec.partition(":")
    entry = _SETS.get(scheme)
    return entry is not None and argument in entry[1]


def _load(scheme: str, target: str) -> object:
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"card scheme {scheme!r} is not available: {exc}") from exc
    return getattr(module, func_name)


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
    if is_reader_set(spec):
        raise ConfigError(f"{spec!r} names every reader, not one card: give it as a VM's "
                          "card (--card), not here")
    factory: CardFactory = _load(scheme, target)  # type: ignore[assignment]
    return factory(argument, options or CardOptions())


ReaderSetFactory = Callable[[str, CardOptions], ReaderSet]


def open_reader_set(spec: str, options: CardOptions | None = None) -> ReaderSet:
    """The reader set ``spec`` names (see the module docstring).  ConfigError."""
    scheme, _, argument = spec.partition(":")
    if not is_reader_set(spec):
        raise ConfigError(f"{spec!r} is not a set of readers")
    factory: ReaderSetFactory = _load(scheme, _SETS[scheme][0])  # type: ignore[assignment]
    return factory(argument, options or CardOptions())
