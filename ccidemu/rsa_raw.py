"""The raw RSA private operation (RSADP / RSASP1, RFC 8017 sections 5.1.2 and 5.2.1).

A card that signs or deciphers "raw" (CAC SIGN/DECRYPT, PIV GENERAL AUTHENTICATE with RSA)
must return ``block^d mod n`` exactly, whatever padding the host put in ``block``: the
deciphered PKCS#1 v1.5 type 2 block *with* its random padding, an OAEP block, a host-padded
signature.  ``cryptography`` deliberately offers no unpadded private operation
(pyca/cryptography issue 2735), and Python integers take about 20 times as long as OpenSSL
(8.5 ms against 0.4 ms for RSA-2048, measured here).  So :class:`RawRsaKey` uses the
system's OpenSSL 3 ``libcrypto`` through ctypes (``EVP_PKEY_decrypt`` with
``RSA_NO_PADDING``: the same constant-time, blinded modular exponentiation OpenSSL uses for
every RSA private operation), and falls back to blinded CRT with Python integers when no
OpenSSL 3 library can be loaded (then ``backend == "python"``).

Pure as far as the card contract goes: no I/O, no clocks, no threads.  A key may be used
from several threads at once (each operation gets its own OpenSSL context; the daemon's
cards share parsed keys between VMs), and a ctypes call releases the interpreter lock, so one
VM's RSA work runs beside other VMs' APDUs.  :func:`raw_key` keeps one :class:`RawRsaKey` per
``cryptography`` key.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import secrets
import threading
import weakref

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["RawRsaError", "RawRsaKey", "openssl_available", "raw_key"]

log = logging.getLogger(__name__)

_RSA_NO_PADDING = 3  # openssl/rsa.h
_OPENSSL_3 = 0x30000000


class RawRsaError(ValueError):
    """The input is not a block of the modulus length below the modulus."""


class _LibCrypto:
    """The few libcrypto functions used here, with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, sz, cp, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int
        self.d2i = lib.d2i_AutoPrivateKey
        self.d2i.argtypes = [vp, ctypes.POINTER(cp), ctypes.c_long]
        self.d2i.restype = vp
        self.ctx_new = lib.EVP_PKEY_CTX_new
        self.ctx_new.argtypes = [vp, vp]
        self.ctx_new.restype = vp
        self.decrypt_init = lib.EVP_PKEY_decrypt_init
        self.decrypt_init.argtypes = [vp]
        self.decrypt_init.restype = i
        self.set_padding = lib.EVP_PKEY_CTX_set_rsa_padding
        self.set_padding.argtypes = [vp, i]
        self.set_padding.restype = i
        self.decrypt = lib.EVP_PKEY_decrypt
        self.decrypt.argtypes = [vp, cp, ctypes.POINTER(sz), cp, sz]
        self.decrypt.restype = i
        self.ctx_free = lib.EVP_PKEY_CTX_free
        self.ctx_free.argtypes = [vp]
        self.ctx_free.restype = None
        self.pkey_free = lib.EVP_PKEY_free
        self.pkey_free.argtypes = [vp]
        self.pkey_free.restype = None
        self.clear_errors = lib.ERR_clear_error
        self.clear_errors.argtypes = []
        self.clear_errors.restype = None


_lib: _LibCrypto | None = None
_lib_loaded = False
_lib_lock = threading.Lock()


def _libcrypto() -> _LibCrypto | None:
    """The system's OpenSSL 3 libcrypto, or None (loaded once)."""
    global _lib, _lib_loaded
    with _lib_lock:
        if _lib_loaded:
            return _lib
        _lib_loaded = True
        for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                version = lib.OpenSSL_version_num
                version.argtypes = []
                version.restype = ctypes.c_ulong
                if version() < _OPENSSL_3:
                    continue
                _lib = _LibCrypto(lib)
                break
            except (OSError, AttributeError) as exc:
                log.debug("no usable libcrypto %s: %s", name, exc)
        if _lib is None:
            log.info("OpenSSL 3 libcrypto not found: raw RSA uses Python integers (slower)")
        return _lib


def openssl_available() -> bool:
    """Whether :class:`RawRsaKey` runs on OpenSSL here."""
    return _libcrypto() is not None


def _free(lib: _LibCrypto, pkey: int) -> None:
    lib.pkey_free(pkey)


class RawRsaKey:
    """``block^d mod n`` for one RSA private key (see the module docstring)."""

    __slots__ = ("__weakref__", "_lib", "_numbers", "_pkey", "backend", "size")

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"not an RSA private key: {type(key).__name__}")
        self.size = (key.key_size + 7) // 8  # k, the modulus length in bytes
        self._numbers = key.private_numbers()
        self._pkey: int | None = None
        self._lib = _libcrypto()
        self.backend = "python"
        if self._lib is not None:
            self._pkey = self._openssl_key(self._lib, key)
            if self._pkey is not None:
                self.backend = "openssl"

    def _openssl_key(self, lib: _LibCrypto, key: rsa.RSAPrivateKey) -> int | None:
        der = key.private_bytes(serialization.Encoding.DER,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        buffer = ctypes.c_char_p(der)
        pkey = lib.d2i(None, ctypes.byref(buffer), len(der))
        if not pkey:
            lib.clear_errors()
            return None
        weakref.finalize(self, _free, lib, pkey)
        return int(pkey)

    def private_op(self, block: bytes) -> bytes:
        """``block^d mod n`` as ``size`` bytes; RawRsaError for a block of another length
        or not below the modulus."""
        k = self.size
        if len(block) != k:
            raise RawRsaError(f"RSA input of {len(block)} bytes, the key needs {k}")
        lib, pkey = self._lib, self._pkey
        if lib is not None and pkey is not None:
            ctx = lib.ctx_new(pkey, None)  # one per operation: threads may share the key
            if not ctx:
                raise MemoryError("EVP_PKEY_CTX_new failed")
            try:
                if lib.decrypt_init(ctx) <= 0 or lib.set_padding(ctx, _RSA_NO_PADDING) <= 0:
                    lib.clear_errors()
                    return self._python_op(block)
                out = ctypes.create_string_buffer(k)
                out_len = ctypes.c_size_t(k)
                if lib.decrypt(ctx, out, ctypes.byref(out_len), bytes(block), k) <= 0:
                    lib.clear_errors()
                    raise RawRsaError("RSA input not below the modulus")
                return out.raw[: out_len.value].rjust(k, b"\x00")
            finally:
                lib.ctx_free(ctx)
        return self._python_op(block)

    def _python_op(self, block: bytes) -> bytes:
        """Blinded CRT with Python integers (``pow`` is not constant time; the blinding
        keeps the timing from following the input)."""
        numbers = self._numbers
        public = numbers.public_numbers
        n, e = public.n, public.e
        c = int.from_bytes(block, "big")
        if c >= n:
            raise RawRsaError("RSA input not below the modulus")
        while True:
            r = secrets.randbelow(n - 2) + 2
            try:
                r_inv = pow(r, -1, n)
            except ValueError:  # pragma: no cover - r shares a factor with n
                continue
            break
        blinded = c * pow(r, e, n) % n
        p, q = numbers.p, numbers.q
        m1 = pow(blinded, numbers.dmp1, p)
        m2 = pow(blinded, numbers.dmq1, q)
        h = numbers.iqmp * (m1 - m2) % p
        m = (m2 + h * q) * r_inv % n
        return m.to_bytes(self.size, "big")



_raw_keys: dict[int, tuple[rsa.RSAPrivateKey, RawRsaKey]] = {}
_raw_keys_lock = threading.Lock()
_RAW_KEYS_MAX = 256


def raw_key(key: rsa.RSAPrivateKey) -> RawRsaKey:
    """The :class:`RawRsaKey` of ``key``, made once (the most recent 256 are kept; the entry
    holds ``key`` itself, so its id cannot be reused while cached)."""
    with _raw_keys_lock:
        entry = _raw_keys.get(id(key))
        if entry is not None and entry[0] is key:
            return entry[1]
        made = RawRsaKey(key)
        if len(_raw_keys) >= _RAW_KEYS_MAX:
            _raw_keys.pop(next(iter(_raw_keys)))
        _raw_keys[id(key)] = (key, made)
        return made
