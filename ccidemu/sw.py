"""ISO/IEC 7816-4 status words (SW1 SW2) and their meanings.

Spec: ISO/IEC 7816-4:2013 section 5.6, tables 5 (SW1 SW2 groups) and 6 (the
individual codes).  ``61xx``, ``6Cxx`` and ``63Cx`` carry a number in the low
bits; :func:`bytes_available`, :func:`exact_length` and :func:`retries_left`
decode them, and :func:`sw_meaning` reads them out.  Unknown status words stay plain ints.
"""

from __future__ import annotations

from enum import IntEnum


class SW(IntEnum):
    """The common status words (ISO/IEC 7816-4:2013 table 6)."""

    OK = 0x9000
    # 62xx: warning, state of non-volatile memory unchanged
    WARNING_NO_INFO = 0x6200
    DATA_CORRUPTED = 0x6281
    END_OF_FILE = 0x6282
    SELECTED_FILE_DEACTIVATED = 0x6283
    FCI_NOT_FORMATTED = 0x6284
    # 63xx: warning, state of non-volatile memory changed
    WARNING_NVM_CHANGED = 0x6300
    FILE_FILLED_UP = 0x6381
    # 64xx / 65xx: execution errors
    EXECUTION_ERROR = 0x6400
    MEMORY_UNCHANGED_ERROR = 0x6500
    MEMORY_FAILURE = 0x6581
    # 67xx, 68xx: checking errors
    WRONG_LENGTH = 0x6700
    FUNCTION_IN_CLA_NOT_SUPPORTED = 0x6800
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    LAST_COMMAND_EXPECTED = 0x6883
    COMMAND_CHAINING_NOT_SUPPORTED = 0x6884
    # 69xx: command not allowed
    COMMAND_NOT_ALLOWED = 0x6900
    COMMAND_INCOMPATIBLE_WITH_FILE = 0x6981
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTH_METHOD_BLOCKED = 0x6983
    REFERENCE_DATA_NOT_USABLE = 0x6984
    CONDITIONS_NOT_SATISFIED = 0x6985
    COMMAND_NOT_ALLOWED_NO_EF = 0x6986
    SM_DATA_MISSING = 0x6987
    SM_DATA_INCORRECT = 0x6988
    # 6Axx: wrong parameters P1-P2
    WRONG_PARAMETERS_NO_INFO = 0x6A00
    WRONG_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    NOT_ENOUGH_MEMORY = 0x6A84
    NC_INCONSISTENT_WITH_TLV = 0x6A85
    INCORRECT_P1P2 = 0x6A86
    NC_INCONSISTENT_WITH_P1P2 = 0x6A87
    REFERENCE_NOT_FOUND = 0x6A88
    FILE_ALREADY_EXISTS = 0x6A89
    DF_NAME_ALREADY_EXISTS = 0x6A8A
    WRONG_P1P2 = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00


# Table 6 wording for the individual codes (kept short, one line each).
_MEANINGS: dict[int, str] = {
    SW.OK: "success",
    SW.WARNING_NO_INFO: "warning: no information given (memory unchanged)",
    SW.DATA_CORRUPTED: "warning: part of returned data may be corrupted",
    SW.END_OF_FILE: "warning: end of file or record reached before reading Ne bytes",
    SW.SELECTED_FILE_DEACTIVATED: "warning: selected file deactivated",
    SW.FCI_NOT_FORMATTED: "warning: file control information not formatted per 5.3.3",
    SW.WARNING_NVM_CHANGED: "warning: no information given (memory changed)",
    SW.FILE_FILLED_UP: "warning: file filled up by the last write",
    SW.EXECUTION_ERROR: "execution error: no information given (memory unchanged)",
    SW.MEMORY_UNCHANGED_ERROR: "execution error: no information given (memory changed)",
    SW.MEMORY_FAILURE: "execution error: memory failure",
    SW.WRONG_LENGTH: "wrong length",
    SW.FUNCTION_IN_CLA_NOT_SUPPORTED: "function in CLA not supported",
    SW.LOGICAL_CHANNEL_NOT_SUPPORTED: "logical channel not supported",
    SW.SECURE_MESSAGING_NOT_SUPPORTED: "secure messaging not supported",
    SW.LAST_COMMAND_EXPECTED: "last command of the chain expected",
    SW.COMMAND_CHAINING_NOT_SUPPORTED: "command chaining not supported",
    SW.COMMAND_NOT_ALLOWED: "command not allowed: no information given",
    SW.COMMAND_INCOMPATIBLE_WITH_FILE: "command incompatible with file structure",
    SW.SECURITY_STATUS_NOT_SATISFIED: "security status not satisfied",
    SW.AUTH_METHOD_BLOCKED: "authentication method blocked",
    SW.REFERENCE_DATA_NOT_USABLE: "reference data not usable",
    SW.CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW.COMMAND_NOT_ALLOWED_NO_EF: "command not allowed (no current EF)",
    SW.SM_DATA_MISSING: "expected secure messaging data objects missing",
    SW.SM_DATA_INCORRECT: "incorrect secure messaging data objects",
    SW.WRONG_PARAMETERS_NO_INFO: "wrong parameters P1-P2: no information given",
    SW.WRONG_DATA: "incorrect parameters in the command data field",
    SW.FUNCTION_NOT_SUPPORTED: "function not supported",
    SW.FILE_NOT_FOUND: "file or application not found",
    SW.RECORD_NOT_FOUND: "record not found",
    SW.NOT_ENOUGH_MEMORY: "not enough memory space in the file",
    SW.NC_INCONSISTENT_WITH_TLV: "Nc inconsistent with TLV structure",
    SW.INCORRECT_P1P2: "incorrect parameters P1-P2",
    SW.NC_INCONSISTENT_WITH_P1P2: "Nc inconsistent with parameters P1-P2",
    SW.REFERENCE_NOT_FOUND: "referenced data or reference data not found",
    SW.FILE_ALREADY_EXISTS: "file already exists",
    SW.DF_NAME_ALREADY_EXISTS: "DF name already exists",
    SW.WRONG_P1P2: "wrong parameters P1-P2",
    SW.INS_NOT_SUPPORTED: "instruction code not supported or invalid",
    SW.CLA_NOT_SUPPORTED: "class not supported",
    SW.NO_PRECISE_DIAGNOSIS: "no precise diagnosis",
}

# Table 5: the meaning of SW1 alone, for codes not listed above.
_GROUPS: dict[int, str] = {
    0x62: "warning (memory unchanged)",
    0x63: "warning (memory changed)",
    0x64: "execution error (memory unchanged)",
    0x65: "execution error (memory changed)",
    0x66: "security-related issue",
    0x67: "wrong length",
    0x68: "functions in CLA not supported",
    0x69: "command not allowed",
    0x6A: "wrong parameters P1-P2",
    0x6B: "wrong parameters P1-P2",
    0x6D: "instruction code not supported or invalid",
    0x6E: "class not supported",
    0x6F: "no precise diagnosis",
}


def _check(sw: int) -> int:
    if not 0 <= sw <= 0xFFFF:
        raise ValueError(f"status word {sw!r} out of range 0000-FFFF")
    return sw


def sw_bytes(sw: int) -> bytes:
    """SW1 SW2 as the two bytes that end a response APDU."""
    return _check(sw).to_bytes(2, "big")


def bytes_available(sw: int) -> int | None:
    """For ``61xx``: how many response bytes are still available (xx = 00 means 256 or more).

    ISO/IEC 7816-4:2013 table 5: SW2 encodes the number of extra data bytes; 00 is
    read here as 256 (a GET RESPONSE with Le = 00).  ``None`` for other status words.
    """
    if _check(sw) >> 8 != 0x61:
        return None
    return (sw & 0xFF) or 256


def exact_length(sw: int) -> int | None:
    """For ``6Cxx``: the exact Ne the card wants (xx = 00 means 256).  ``None`` otherwise."""
    if _check(sw) >> 8 != 0x6C:
        return None
    return (sw & 0xFF) or 256


def retries_left(sw: int) -> int | None:
    """For ``63Cx``: x, the tries left after a failed verification.  ``None`` otherwise."""
    if _check(sw) & 0xFFF0 != 0x63C0:
        return None
    return sw & 0x0F


def is_success(sw: int) -> bool:
    """9000 and 61xx (ISO/IEC 7816-4:2013 table 5: normal processing)."""
    return sw == SW.OK or sw >> 8 == 0x61


def sw_meaning(sw: int) -> str:
    """A one-line human reading of a status word (ISO/IEC 7816-4:2013 tables 5 and 6)."""
    if (n := bytes_available(sw)) is not None:
        return f"success, {n} bytes still available (GET RESPONSE)"
    if (n := exact_length(sw)) is not None:
        return f"wrong Le field, exact length is {n}"
    if (n := retries_left(sw)) is not None:
        return f"verification failed, {n} {'try' if n == 1 else 'tries'} left"
    sw1, sw2 = sw >> 8, sw & 0xFF
    known = _MEANINGS.get(sw)
    if known is not None:
        return known
    if sw1 == 0x90:
        return "success (proprietary SW2)"
    if 0x91 <= sw1 <= 0x9F:
        return "proprietary status"
    if sw1 == 0x62 and 0x02 <= sw2 <= 0x80:
        return "warning: triggering by the card"
    if sw1 == 0x64 and 0x02 <= sw2 <= 0x80:
        return "execution error: triggering by the card"
    group = _GROUPS.get(sw1)
    if group is not None:
        return f"{group}, SW2 {sw2:02X}"
    return "unknown status word"
