"""vmc: the channel layer (VSCard sessions, multiplexer, daemon) and the ``ccidemu`` CLI.

Imports go one way: ``vmc`` uses ``ccidemu``, never the reverse.
"""
