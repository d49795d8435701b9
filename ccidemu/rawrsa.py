"""The raw RSA private operation (RFC 8017 section 5.1.2, RSADP) through the host's OpenSSL.

PIV GENERAL AUTHENTICATE is raw RSA: the host pads, the card computes ``c^d mod n`` and
returns the whole block (a decrypted type-2 block with its random padding, a host-built PSS
block, ...).  ``cryptography`` deliberately offers no unpadded private operation, and Python
integers take about 5 ms for RSA-2048, holding the interpreter lock all the while: one VM
decrypting in a loop would stall every other VM's card.  OpenSSL's ``EVP_PKEY_decrypt`` with
``RSA_NO_PADDING`` is the same operation, blinded and constant-time, about 1 ms, and a ctypes
call releases the interpreter lock.

Pure computation (no I/O): loads ``libcrypto`` once.  :func:`private_operation` returns None
when OpenSSL 3 is not available, and the caller falls back to Python integers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import OrderedDict
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["available", "private_operation"]

_RSA_NO_PADDING = 3  # openssl/rsa.h
_CACHE_SIZE = 256


def _load() -> Any:
    for name in (ctypes.util.find_library("crypto"), "libcrypto.so.3"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.OpenSSL_version_num.restype = ctypes.c_ulong
            if lib.OpenSSL_version_num() >> 28 < 3:  # EVP_PKEY_CTX_set_rsa_padding is a
                continue  # function from OpenSSL 3 on (a macro before)
        except (OSError, AttributeError):
            continue
        lib.d2i_AutoPrivateKey.restype = ctypes.c_void_p
        lib.d2i_AutoPrivateKey.argtypes = [ctypes.c_void_p,
                                           ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
        lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
        lib.EVP_PKEY_CTX_new.restype = ctypes.c_void_p
        lib.EVP_PKEY_CTX_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.EVP_PKEY_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_PKEY_decrypt_init.argtypes = [ctypes.c_void_p]
        lib.EVP_PKEY_CTX_set_rsa_padding.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.EVP_PKEY_decrypt.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                         ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p,
                                         ctypes.c_size_t]
        lib.ERR_clear_error.argtypes = []
        return lib
    return None


_LIB = _load()


class _Key:
    """An OpenSSL EVP_PKEY for one ``cryptography`` RSA key (freed with this object)."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        buf = ctypes.c_char_p(der)
        pointer = ctypes.pointer(buf)
        self.key = key  # keeps id(key) from being reused while cached
        self.size = (key.key_size + 7) // 8
        self.handle = _LIB.d2i_AutoPrivateKey(None, pointer, len(der))
        if not self.handle:
            _LIB.ERR_clear_error()
            raise ValueError("OpenSSL could not load the RSA key")

    def __del__(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle and _LIB is not None:
            _LIB.EVP_PKEY_free(handle)

    def operate(self, block: bytes) -> bytes | None:
        """``block^d mod n``, or None when OpenSSL refuses (block not below the modulus)."""
        ctx = _LIB.EVP_PKEY_CTX_new(self.handle, None)
        if not ctx:
            raise MemoryError("EVP_PKEY_CTX_new failed")
        try:
            if (_LIB.EVP_PKEY_decrypt_init(ctx) <= 0
                    or _LIB.EVP_PKEY_CTX_set_rsa_padding(ctx, _RSA_NO_PADDING) <= 0):
                _LIB.ERR_clear_error()
                raise RuntimeError("OpenSSL refused raw RSA for this key")
            out = ctypes.create_string_buffer(self.size)
            length = ctypes.c_size_t(self.size)
            if _LIB.EVP_PKEY_decrypt(ctx, out, ctypes.byref(length), block, len(block)) <= 0:
                _LIB.ERR_clear_error()
                return None
            return out.raw[: length.value].rjust(self.size, b"\x00")
        finally:
            _LIB.EVP_PKEY_CTX_free(ctx)


_keys: OrderedDict[int, _Key] = OrderedDict()
_lock = threading.Lock()


def available() -> bool:
    return _LIB is not None


def private_operation(key: rsa.RSAPrivateKey, block: bytes) -> bytes | None:
    """Raw RSA with ``key`` on a block of the modulus' length; None if OpenSSL is missing.

    Raises ValueError when the block is not below the modulus.
    """
    if _LIB is None:
        return None
    with _lock:
        entry = _keys.get(id(key))
        if entry is None or entry.key is not key:
            entry = _keys[id(key)] = _Key(key)
            if len(_keys) > _CACHE_SIZE:
                _keys.popitem(last=False)
        else:
            _keys.move_to_end(id(key))
    result = entry.operate(block)  # no lock held: concurrent callers run in parallel
    if result is None:
        raise ValueError("RSA input not below the modulus")
    return result
