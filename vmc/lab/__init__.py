"""The lab: real peers for tests, run by ``ccidemu lab``, the pytest plugin and our own suite.

- :mod:`vmc.lab.guest`: a tiny QEMU guest (Debian kernel, busybox, pcscd, libccid, OpenSC)
  with our virtual reader, built and cached on first use, driven over a serial command channel;
- :mod:`vmc.lab.libvirt`: a private root libvirtd (its own mount namespace, never the host's
  libvirt) and the same guest run by it, QEMU as the unprivileged ``libvirt-qemu`` user;
- :mod:`vmc.lab.serve`: ``ccidemu serve`` as a subprocess, with its control socket;
- :mod:`vmc.lab.pcscd`: a private, socket-activated pcscd with the vpcd driver on free ports,
  and the ``ccidemu vpcd`` bridge, never touching the host's own pcscd.

None of these import pytest; the fixtures are in :mod:`vmc.pytest_plugin`.
"""
