"""Cards that are real cards: adapters between the :class:`ccidemu.card.Card` protocol and a
host's readers.

* :mod:`vmc.backends.pcsc`: ``--card pcsc:READER`` and ``pcsc:*``, through the host's pcscd
  (pyscard; extra ``pcsc``);
* :mod:`vmc.backends.usb`: ``--card usb:VID:PID[:SERIAL]``, straight to a USB CCID reader with
  the driver engine of :mod:`ccidemu.ccid_host` (pyusb; extra ``usb``);
* :mod:`vmc.backends.compare`: ``--compare SPEC``, every APDU also given to a second card.

The card registry (:mod:`ccidemu.cards`) imports these modules only when their scheme is
used, so pyscard and pyusb stay optional.
"""
