"""One module per ``ccidemu`` subcommand; each defines ``register(subparsers)``.

``register`` adds its parser and sets ``func`` (``Callable[[argparse.Namespace], int]``)
as the parser default.  Modules listed in :data:`COMMANDS` are imported lazily by
the CLI only when their name is asked for, so optional dependencies stay optional.
"""

#: subcommand name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "decode": ("vmc.commands.decode", "decode VSCard, CCID, APDU or ATR bytes into readable text"),
    "serve": ("vmc.commands.serve", "serve virtual readers to QEMU over chardev sockets"),
    "ctl": ("vmc.commands.ctl",
            "control a running 'ccidemu serve': list, insert, remove, attach, detach, reload"),
    "fake-qemu": ("vmc.commands.fake_qemu", "play QEMU's side of ccid-card-passthru for tests"),
    "certs": ("vmc.commands.certs", "generate test CA, certificates and keys for emulated cards"),
    "vpcd": ("vmc.commands.vpcd", "bridge a card to vsmartcard's vpcd for the host's pcscd"),
    "trace": ("vmc.commands.trace", "import, show, replay, diff and export APDU traces"),
    "completion": ("vmc.commands.completion", "print a shell completion script"),
    "readers": ("vmc.commands.readers",
                "list the host's card readers (PC/SC; USB CCID with --usb) for --card"),
}
