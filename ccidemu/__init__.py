"""ccidemu: the protocol library (codecs, cards, traces). No sockets here except in adapters."""

__version__ = "0.1.0.dev0"
