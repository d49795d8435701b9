"""Shared helpers for the construct-based codecs: every failure becomes DecodeError/EncodeError.

construct, struct and friends raise a zoo of exceptions on bad input; codecs call
:func:`parse` and :func:`build` so that only our own errors leave a decoder.
"""

from __future__ import annotations

import struct
from typing import Any

import construct

from ccidemu.errors import DecodeError, EncodeError

#: Default cap on any length field read from a peer: well above the largest legal
#: message (an extended APDU of 65,535 data bytes plus headers), far below harm.
DEFAULT_MAX_LENGTH = 1 << 20

_PARSE_ERRORS = (
    construct.ConstructError,
    struct.error,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    OverflowError,
    UnicodeError,
    AttributeError,
)


def parse(fmt: construct.Construct, data: bytes, what: str) -> Any:
    """Parse ``data`` with ``fmt``; any failure is a DecodeError naming ``what``."""
    try:
        return fmt.parse(data)
    except DecodeError:
        raise
    except _PARSE_ERRORS as exc:
        raise DecodeError(f"malformed {what}: {exc}") from None


def build(fmt: construct.Construct, value: Any, what: str) -> bytes:
    """Build ``value`` with ``fmt``; any failure is an EncodeError naming ``what``."""
    try:
        out: bytes = fmt.build(value)
    except EncodeError:
        raise
    except _PARSE_ERRORS as exc:
        raise EncodeError(f"cannot encode {what}: {exc}") from None
    return out


def check_length(length: int, cap: int, what: str) -> None:
    """Reject a peer's length field above ``cap`` before anything is allocated."""
    if length > cap:
        raise DecodeError(f"{what} length {length} exceeds the cap of {cap} bytes")
