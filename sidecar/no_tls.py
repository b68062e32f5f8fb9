"""Keep OpenSSL out of the sidecars that do not use TLS.

asyncio and uvloop import ``ssl`` at start-up, which maps and relocates
libssl and libcrypto: about 4.5 MB of resident memory per sidecar, in every
pod. Before asyncio is imported, this installs a placeholder ``ssl`` module
carrying only the names those imports touch; any real TLS use would fail
loudly (the placeholders cannot be instantiated into anything that works).

The rule (``needs_tls``, decided from the command line before anything is
parsed properly): the real module is loaded when

* ``--mesh-identity`` is given (the mesh's mTLS), or
* the configuration file (``--envoy``/``--config``) mentions TLS at all: the
  text contains ``transport_socket``, ``tls_context`` or a ``tls`` key (short
  form ``tls: {cert, key}``), or
* ``MESHCTL_SIDECAR_OPENSSL=1`` is set.

A false positive (the word in a comment) only costs the memory; a false
negative cannot happen for a configuration that compiles to TLS, because
every TLS setting is spelt with one of those keys.
"""

from __future__ import annotations

import os
import re
import sys
import types

#: A key that configures TLS in an Envoy bootstrap (YAML/JSON) or in the short form.
_TLS_KEYS = re.compile(rb"transport_socket|tls_context|[\"']?\btls[\"']?\s*:")

_ERRORS = ("SSLError", "SSLWantReadError", "SSLWantWriteError", "SSLSyscallError", "SSLZeroReturnError",
           "SSLEOFError", "CertificateError")
_CLASSES = ("SSLContext", "SSLObject", "MemoryBIO", "SSLSocket")


def _unsupported(*_: object, **__: object) -> None:
    raise RuntimeError("TLS is not available in the meshctl sidecar (set MESHCTL_SIDECAR_OPENSSL=1)")


def needs_tls(argv: list[str]) -> bool:
    """Whether this sidecar's command line (see the module's doc) needs the real ``ssl``."""
    if any(a == "--mesh-identity" or a.startswith("--mesh-identity=") for a in argv):
        return True
    for i, a in enumerate(argv):
        path = None
        for opt in ("--envoy", "--config"):
            if a == opt and i + 1 < len(argv):
                path = argv[i + 1]
            elif a.startswith(opt + "="):
                path = a[len(opt) + 1:]
        if path is not None:
            try:
                with open(path, "rb") as f:
                    if _TLS_KEYS.search(f.read()):
                        return True
            except OSError:
                pass  # the real loader reports it
    return False


def install(argv: list[str] | None = None) -> bool:
    """Install the placeholder unless ssl is already loaded, the real one is asked for, or ``argv`` needs TLS."""
    if "ssl" in sys.modules or os.environ.get("MESHCTL_SIDECAR_OPENSSL") == "1":
        return False
    if argv is not None and needs_tls(argv):
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
