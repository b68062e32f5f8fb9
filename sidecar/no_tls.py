"""Keep OpenSSL out of the sidecar process.

asyncio and uvloop import ``ssl`` at start-up, which maps and relocates
libssl and libcrypto: about 4.5 MB of resident memory per sidecar, in every
pod, for a feature the sidecar refuses (TLS settings are configuration
errors, see ``envoy_config``). Before asyncio is imported, this installs a
placeholder ``ssl`` module carrying only the names those imports touch; any
real TLS use would fail loudly (the placeholders cannot be instantiated into
anything that works). Set ``MESHCTL_SIDECAR_OPENSSL=1`` to load the real module.
"""

from __future__ import annotations

import os
import sys
import types

_ERRORS = ("SSLError", "SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError",
           "SSLEOFError", "CertificateError")
_CLASSES = ("SSLContext", "SSLObject", "MemoryBIO", "SSLSocket")


def _unsupported(*_: object, **__: object) -> None:
    raise RuntimeError("TLS is not available in the meshctl sidecar (set MESHCTL_SIDECAR_OPENSSL=1)")


def install() -> bool:
    """Install the placeholder unless ssl is already loaded or the real one is asked for."""
    if "ssl" in sys.modules or os.environ.get("MESHCTL_SIDECAR_OPENSSL") == "1":
        return False
    stub = types.ModuleType("ssl", "placeholder: the meshctl sidecar does not load OpenSSL")
    for name in _ERRORS:
        setattr(stub, name, type(name, (OSError,), {}))
    for name in _CLASSES:
        setattr(stub, name, type(name, (), {"__init__": _unsupported}))
    stub.create_default_context = _unsupported  # type: ignore[attr-defined]
    stub.SSL_ERROR_WANT_READ = 2  # type: ignore[attr-defined]
    stub.SSL_ERROR_WANT_WRITE = 3  # type: ignore[attr-defined]
    stub.SSL_ERROR_SYSCALL = 5  # type: ignore[attr-defined]
    sys.modules["ssl"] = stub
    return True
