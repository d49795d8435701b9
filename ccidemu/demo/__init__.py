"""The demo cards' files, shipped inside the package (``--card piv:`` and ``--card cac:``).

``certs/`` is the demo PIV card (four slot keys and certificates, an attestation key, their
test CAs, ``card.toml``); ``cac/`` is the demo CAC card (three PKI applets, its test CA,
``card.toml``).  Test material only: the private keys are public.  In a source checkout
``fixtures/certs`` and ``fixtures/cac`` point here; each directory's README says what is in
it and how it is regenerated.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def piv_directory() -> Path:
    """The demo PIV card's directory (``--card piv:`` opens it)."""
    return _HERE / "certs"


def cac_directory() -> Path:
    """The demo CAC card's directory (``--card cac:`` opens it)."""
    return _HERE / "cac"
