"""The lab: real peers for tests, run by ``ccidemu lab``, the pytest plugin and our own suite.

- :mod:`vmc.lab.guest`: a tiny QEMU guest (Debian kernel, busybox, pcscd, libccid, OpenSC)
  with our virtual reader, built and cached on first use, driven over a serial command channel;
- :mod:`vmc.lab.libvirt`: a private root libvirtd (its own mount namespace, never the host's
  libvirt) and the same guest run by it, QEMU as the unprivileged ``libvirt-qemu`` user;
- :mod:`vmc.lab.vm`: :class:`LabVm`, that guest with ``ccidemu serve`` and a card in its
  reader (``ccidemu lab``, the ``ccidemu_guest`` fixture);
- :mod:`vmc.lab.serve`: ``ccidemu serve`` as a subprocess, with its control socket;
  :mod:`vmc.lab.inprocess`: :class:`ServeThread`, the same daemon in this process;
- :mod:`vmc.lab.channel`: :func:`open_channel`, QEMU's side of the VSCard channel
  (:class:`vmc.fakeqemu.FakeQemu`) driving a ``ccidemu serve``; :func:`open_qemu_card`, a
  daemon and the QEMU options for a VM of your own;
- :mod:`vmc.lab.pcscd`: a private, socket-activated pcscd with the vpcd driver on free ports,
  and the ``ccidemu vpcd`` bridge, never touching the host's own pcscd.

None of these import pytest; the fixtures are in :mod:`vmc.pytest_plugin`.  The names below
load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ccidemu import lazy_exports

_EXPORTS = {
    "FakeQemu": "vmc.fakeqemu:FakeQemu",
    "LabError": "vmc.lab.errors:LabError",
    "LabVm": "vmc.lab.vm:LabVm",
    "PcscdHarness": "vmc.lab.pcscd:PcscdHarness",
    "QemuCard": "vmc.lab.channel:QemuCard",
    "ServeMode": "vmc.lab.channel:ServeMode",
    "ServeProcess": "vmc.lab.serve:ServeProcess",
    "ServeThread": "vmc.lab.inprocess:ServeThread",
    "VscardChannel": "vmc.lab.channel:VscardChannel",
    "open_channel": "vmc.lab.channel:open_channel",
    "open_qemu_card": "vmc.lab.channel:open_qemu_card",
    "qemu_card_args": "vmc.lab.channel:qemu_card_args",
}

__all__ = [
    "FakeQemu", "LabError", "LabVm", "PcscdHarness", "QemuCard", "ServeMode", "ServeProcess",
    "ServeThread", "VscardChannel", "open_channel", "open_qemu_card", "qemu_card_args",
]

if TYPE_CHECKING:
    from vmc.fakeqemu import FakeQemu as FakeQemu
    from vmc.lab.channel import QemuCard as QemuCard
    from vmc.lab.channel import ServeMode as ServeMode
    from vmc.lab.channel import VscardChannel as VscardChannel
    from vmc.lab.channel import open_channel as open_channel
    from vmc.lab.channel import open_qemu_card as open_qemu_card
    from vmc.lab.channel import qemu_card_args as qemu_card_args
    from vmc.lab.errors import LabError as LabError
    from vmc.lab.inprocess import ServeThread as ServeThread
    from vmc.lab.pcscd import PcscdHarness as PcscdHarness
    from vmc.lab.serve import ServeProcess as ServeProcess
    from vmc.lab.vm import LabVm as LabVm


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
