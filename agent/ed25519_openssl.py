"""Ed25519 verification by the system's OpenSSL (libcrypto), through ctypes, when it is there.

Python's ssl module (paho imports it) already links libcrypto, so the agent dlopens that same
file, found in /proc/self/maps: nothing new is mapped, and no subprocess runs (as
ctypes.util.find_library would); also when the library was upgraded on disk since the agent
started (libcrypto_path). load() gives None, and the agent keeps its pure-Python verifier
(agent/ed25519.py), when ctypes, the library or a symbol is missing, or OpenSSL is older than
1.1.1 (no raw Ed25519 keys).

OpenSSL checks the cofactorless equation [S]B = R + [k]A (R compared as bytes), RFC 8032 the
cofactored one ed25519.verify checks; they part only on signatures built with a point of small
order, which OpenSSL refuses and ed25519.verify may accept. What OpenSSL accepts, ed25519.verify
accepts too (its key and S checks are made here first): so verify() asks the pure-Python one only
when OpenSSL says no, and answers exactly as it does. The service's own signatures always verify
in OpenSSL. Loaded lazily (ctypes alone is ~0.57 MiB of RSS): see job_signature.verifier().
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import ed25519

EVP_PKEY_ED25519 = 1087  # NID_ED25519
MIN_VERSION = 0x10101000  # OpenSSL 1.1.1: EVP_PKEY_new_raw_public_key, EVP_DigestVerify
MAX_KEYS = 8  # EVP_PKEYs kept (a key rotation trusts two); an agent trusting more creates them again


class OpenSSLVerifier:
    """ed25519.verify's answers, the accepting ones from libcrypto's EVP_DigestVerify."""

    def __init__(self, lib: Any, path: str) -> None:
        self.lib, self.path = lib, path
        self._keys: dict[bytes, int | None] = {}  # raw public key -> its EVP_PKEY*, None when not a point
        self._lock = threading.Lock()  # no EVP_PKEY is freed while another thread verifies with it

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """ed25519.verify(public_key, message, signature), the same answer for every input."""
        if self.openssl_accepts(public_key, message, signature):
            return True
        return ed25519.verify(public_key, message, signature)  # a refusal: the pure-Python verifier's word

    def openssl_accepts(self, public_key: Any, message: Any, signature: Any) -> bool:
        """True when libcrypto verifies it and ed25519.verify's key and S checks pass."""
        if not all(isinstance(v, (bytes, bytearray, memoryview)) for v in (public_key, message, signature)):
            return False
        public_key, message, signature = bytes(public_key), bytes(message), bytes(signature)
        if len(signature) != ed25519.SIGNATURE_BYTES or int.from_bytes(signature[32:], "little") >= ed25519.L:
            return False
        with self._lock:
            return self._libcrypto_verifies(public_key, message, signature)

    def _libcrypto_verifies(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        pkey = self._pkey(public_key)
        if pkey is None:
            return False
        lib, ctx = self.lib, self.lib.EVP_MD_CTX_new()
        if not ctx:
            return False
        try:
            ok = (lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) == 1
                  and lib.EVP_DigestVerify(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            lib.EVP_MD_CTX_free(ctx)
        if not ok:
            lib.ERR_clear_error()  # leave no error on this thread's queue for the ssl module to find
        return ok

    def _pkey(self, public_key: bytes) -> int | None:
        if public_key in self._keys:
            return self._keys[public_key]
        pkey = None
        if len(public_key) == ed25519.PUBLIC_KEY_BYTES and ed25519.decode_point(public_key) is not None:
            # only canonical encodings of points: OpenSSL would take y >= p, ed25519.verify does not
            pkey = self.lib.EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, None, public_key, len(public_key)) or None
        if len(self._keys) >= MAX_KEYS:
            evicted = self._keys.pop(next(iter(self._keys)))
            if evicted is not None:
                self.lib.EVP_PKEY_free(evicted)
        self._keys[public_key] = pkey
        return pkey


def load() -> tuple[OpenSSLVerifier | None, str]:
    """The OpenSSL verifier and its library's path; or None and why the pure-Python one stays."""
    path = libcrypto_path()
    if path is None:
        return None, "no libcrypto is loaded in this process"
    try:
        import ctypes  # noqa: PLC0415 - ~0.57 MiB of RSS: only once a signed head has come

        lib = ctypes.CDLL(path)
        version = _declare(lib, ctypes)
    except (ImportError, OSError, AttributeError) as e:
        return None, f"{path} is not usable ({e})"
    if version < MIN_VERSION:
        return None, f"{path} is OpenSSL {version:#x}, older than 1.1.1"
    return OpenSSLVerifier(lib, path), _described(path)


def _described(path: str) -> str:
    """The path, and for a /proc/self/map_files/ entry the file it maps, e.g. "... (deleted)"."""
    try:
        return f"{path}: {os.readlink(path)}" if path.startswith("/proc/self/map_files/") else path
    except OSError:
        return path


def libcrypto_path() -> str | None:
    """What to load for the libcrypto this process has mapped (the ssl module's), None when none is.

    Its path, as /proc/self/maps gives it. When the library was upgraded (deleted or replaced on
    disk) since the process mapped it, maps says "<path> (deleted)": then /proc/self/map_files/
    names the very file mapped (dlopen finds it loaded already: nothing new is mapped); where that
    cannot be read (Linux before 4.3 without CAP_SYS_ADMIN), its file name, which dlopen matches
    against the loaded library's soname first (libcrypto.so.3 is its own soname).
    """
    try:
        import _ssl  # noqa: F401, PLC0415 - paho has imported it already: this maps libcrypto in
    except ImportError:
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)  # the path, the 6th, may hold spaces
                path = fields[5] if len(fields) == 6 and fields[5].startswith("/") else ""
                deleted = path.endswith(DELETED)
                if deleted:
                    path = path[: -len(DELETED)]
                name = path.rpartition("/")[2]
                if name.startswith("libcrypto.so"):
                    return (_mapped_file(fields[0]) or name) if deleted else path
    except OSError:
        return None
    return None


DELETED = " (deleted)"  # what /proc/self/maps adds to the path of a file deleted since it was mapped


def _mapped_file(addresses: str) -> str | None:
    """/proc/self/map_files/<addresses> (the file mapped there) if this process may open it."""
    path = f"/proc/self/map_files/{addresses}"
    try:
        os.stat(path)
    except OSError:
        return None
    return path


def _declare(lib: Any, ctypes: Any) -> int:
    """Set the argument and result types of what verify calls; OpenSSL's version number.
    Raises AttributeError when a symbol is missing."""
    p, size = ctypes.c_void_p, ctypes.c_size_t
    for name, args, result in (
        ("OpenSSL_version_num", [], ctypes.c_ulong),
        ("EVP_PKEY_new_raw_public_key", [ctypes.c_int, p, ctypes.c_char_p, size], p),
        ("EVP_PKEY_free", [p], None),
        ("EVP_MD_CTX_new", [], p),
        ("EVP_MD_CTX_free", [p], None),
        ("EVP_DigestVerifyInit", [p, p, p, p, p], ctypes.c_int),
        ("EVP_DigestVerify", [p, ctypes.c_char_p, size, ctypes.c_char_p, size], ctypes.c_int),
        ("ERR_clear_error", [], None),
    ):
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return int(lib.OpenSSL_version_num())
