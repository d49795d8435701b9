"""The lab's one error: a harness could not do what it was asked."""

from __future__ import annotations

from ccidemu.errors import CcidemuError


class LabError(CcidemuError):
    """A lab harness failed: a peer is missing, a daemon or guest died or did not answer.

    ``ccidemu lab`` reports it as one line; the message names what is missing or where the
    logs are.
    """
