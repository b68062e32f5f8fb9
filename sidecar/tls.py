"""TLS in the sidecar's data path: contexts from the model, peer checks, certificate reload, TLS listeners.

Only imported when the configuration has TLS (``sidecar.no_tls`` keeps OpenSSL out of the other sidecars).

* ``TlsContext`` builds an ``ssl.SSLContext`` from a ``DownstreamTls``/``UpstreamTls`` (TLS 1.2+, ALPN, peer
  verification against the trusted CA) and rebuilds it when the certificate files change: the control plane
  rotates a replica's certificate by swapping a symlinked directory, so the paths stay and the inodes change.
  ``maybe_reload`` is one ``os.stat`` per file, called by the sidecar's 1 s sweeper; new connections get the new
  context, open ones keep theirs. A pair that does not load (half written, key of another certificate) keeps the
  old context, is logged once, and is retried every tick.
* Peer SANs are matched after the handshake (Python has no verify callback): ``check_peer``. Envoy matches in
  the verify callback, so its handshake fails with an alert where ours completes and the connection is then
  closed; the peer sees a closed connection either way and the stats say ``fail_verify_san`` on both.
* ``TlsListener`` accepts on its own non-blocking socket: strict listeners hand every connection to the TLS
  handshake; permissive ones first peek at the first byte (0x16: a TLS handshake record, Envoy's tls_inspector)
  and serve plaintext on the same HTTP connection manager. Plain listeners never come here.
* Handshake cost (bench/NOTES.md, "TLS handshakes"): OpenSSL 3.0 itself is most of it (decoding the peer's
  certificate, twice more per stateless ticket); hence one TLSv1.3 ticket (``TLS13_TICKETS``) and the peer
  certificate decoded once, by the SSL protocol (its ``peercert``).
* Stats: Envoy's ``<scope>.ssl.*`` counters (``TlsStats``) with Envoy's meaning, checked against Envoy 1.40:
  ``handshake`` (a verified connection), ``connection_error`` (the handshake failed otherwise: plaintext on a
  TLS listener, the peer's alert), ``fail_verify_no_cert`` / ``fail_verify_error`` / ``fail_verify_san`` (the
  verification refused the peer; not also counted as connection_error), ``no_certificate`` (a successful
  handshake whose peer sent no certificate because none was required).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from sidecar.config import CommonTls, ConfigError, DownstreamTls, SanMatcher, UpstreamTls
from sidecar.server import ConnectionManager, DownstreamProtocol
from sidecar.stats import Counter, Gauge, Store

log = logging.getLogger("sidecar.tls")

#: Envoy's default transport_socket_connect_timeout is unset (the handshake is bounded by the idle timeouts);
#: a handshake that takes this long is a stuck or hostile client.
HANDSHAKE_TIMEOUT_S = 10.0
#: Envoy's listener_filters_timeout default: how long tls_inspector waits for the first bytes.
INSPECT_TIMEOUT_S = 15.0
#: A refused downstream connection is logged at most this often per listener (a flood must not fill the disk).
REFUSAL_LOG_INTERVAL_S = 10.0
TLS_RECORD_HANDSHAKE = 0x16
ACCEPTS_PER_WAKEUP = 64
#: TLSv1.3 session tickets sent after a full handshake (OpenSSL's default and BoringSSL's: 2). OpenSSL 3.0 builds
#: each stateless ticket by re-decoding the whole session, the client's certificate included (i2d, d2i, i2d in
#: construct_stateless_ticket), ~135 us of CPU per ticket: a second ticket cost 11 % of a full TLSv1.3 handshake
#: (bench/NOTES.md, "TLS handshakes"). One ticket keeps resumption: OpenSSL accepts a stateless ticket more than
#: once and issues a fresh one on every resumption. 0 would save another 135 us but end TLSv1.3 resumption; TLS 1.2
#: (the sidecars' and Envoy's upstream maximum) always gets its one ticket.
TLS13_TICKETS = 1

SSL_COUNTERS = ("handshake", "connection_error", "fail_verify_no_cert", "fail_verify_error", "fail_verify_san",
                "no_certificate")

#: SanMatcher.san_type -> the type name in ``getpeercert()['subjectAltName']``.
_SAN_TYPES = {"URI": "URI", "DNS": "DNS", "IP_ADDRESS": "IP Address", "EMAIL": "email"}
#: Envoy prints an X.509 name RFC 2253 style (X509_NAME_print_ex): last RDN first, short attribute names.
_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                "stateOrProvinceName": "ST", "localityName": "L", "streetAddress": "STREET", "domainComponent": "DC",
                "userId": "UID", "emailAddress": "emailAddress", "serialNumber": "serialNumber"}
#: OpenSSL reason -> (BoringSSL's packed error code, BoringSSL's reason name): Envoy (BoringSSL) prints
#: ``TLS_error:|<code>:SSL routines:OPENSSL_internal:<REASON>:<detail>:TLS_error_end``; Python links OpenSSL,
#: whose codes differ, so the common reasons are translated and others keep OpenSSL's name with code 0.
_BORINGSSL = {
    "CERTIFICATE_VERIFY_FAILED": (268435581, "CERTIFICATE_VERIFY_FAILED"),
    "WRONG_VERSION_NUMBER": (268435703, "WRONG_VERSION_NUMBER"),
    "HTTP_REQUEST": (268435612, "HTTP_REQUEST"),
    "SSLV3_ALERT_HANDSHAKE_FAILURE": (268436496, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
    "SSLV3_ALERT_BAD_CERTIFICATE": (268436498, "SSLV3_ALERT_BAD_CERTIFICATE"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (268436501, "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (268436502, "SSLV3_ALERT_CERTIFICATE_UNKNOWN"),
    "TLSV1_ALERT_UNKNOWN_CA": (268436504, "TLSV1_ALERT_UNKNOWN_CA"),
    "TLSV1_ALERT_DECRYPT_ERROR": (268436507, "TLSV1_ALERT_DECRYPT_ERROR"),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (268436572, "TLSV1_ALERT_CERTIFICATE_REQUIRED"),
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (268435631, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    "UNEXPECTED_EOF_WHILE_READING": (268435475, "UNEXPECTED_EOF"),
}


class TlsError(ConnectionError):
    """A TLS connection that failed (handshake or peer verification): an upstream connect failure.

    ``reason`` is Envoy's transport failure reason text; ``stat`` the ``ssl.*`` counter it counted.
    """

    def __init__(self, reason: str, stat: str) -> None:
        super().__init__(reason)
        self.transport_failure_reason = reason
        self.stat = stat


def failure_reason(reason: str, detail: str = "") -> str:
    """Envoy's transport failure reason for an OpenSSL error reason (see ``_BORINGSSL``)."""
    code, name = _BORINGSSL.get(reason, (0, reason))
    return f"TLS_error:|{code}:SSL routines:OPENSSL_internal:{name}{':' + detail if detail else ''}:TLS_error_end"


def classify(exc: BaseException) -> tuple[str, str]:
    """(the ssl.* stat, Envoy's transport failure reason) of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or "certificate verify failed"
        return "fail_verify_error", failure_reason(
            "CERTIFICATE_VERIFY_FAILED",
            f"verify cert failed: X509_verify_cert: certificate verification error at depth 0: {msg}")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "fail_verify_no_cert", failure_reason(reason)
        return "connection_error", failure_reason(reason)
    if isinstance(exc, TimeoutError):
        return "connection_error", "TLS handshake timeout"
    # The peer closed or reset the connection mid-handshake (no TLS alert to name).
    what = getattr(exc, "strerror", None) or {ConnectionResetError: "Connection reset by peer",
                                              ConnectionAbortedError: "Connection aborted"}.get(type(exc), str(exc))
    return "connection_error", f"TLS_error:|{what}:TLS_error_end"


# --- peer certificates ------------------------------------------------------------------------------------------


def sans(cert: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(cert.get("subjectAltName") or ())


def first_uri_san(cert: dict[str, Any] | None) -> str | None:
    if not cert:
        return None
    return next((v for t, v in sans(cert) if t == "URI"), None)


def subject_text(cert: dict[str, Any] | None) -> str | None:
    """Envoy's %DOWNSTREAM_PEER_SUBJECT%: ``CN=b,O=meshctl``."""
    if not cert or not cert.get("subject"):
        return None
    parts = []
    for rdn in reversed(cert["subject"]):
        parts.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape_dn(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape_dn(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    return out[:-1] + "\\ " if out.endswith(" ") else out


def san_matches(matchers: tuple[SanMatcher, ...], cert: dict[str, Any]) -> bool:
    """Any SAN of the certificate matches any matcher (Envoy: match_typed_subject_alt_names)."""
    peer = sans(cert)
    for m in matchers:
        kind = _SAN_TYPES.get(m.san_type, m.san_type)
        for t, v in peer:
            if t != kind:
                continue
            if m.exact is not None and v == m.exact:
                return True
            if m.prefix is not None and v.startswith(m.prefix):
                return True
    return False


def check_peer(common: CommonTls, cert: dict[str, Any]) -> str | None:
    """None when the verified peer's SANs are acceptable, else Envoy's failure reason (fail_verify_san)."""
    if not common.match_sans or not cert or san_matches(common.match_sans, cert):
        return None
    listed = ", ".join(v for _, v in sans(cert))
    return failure_reason("CERTIFICATE_VERIFY_FAILED", f"verify cert failed: SAN matcher, certificate SANs are "
                                                       f"[{listed}]")


def decode_cert_file(path: str) -> dict[str, Any] | None:
    """Our own certificate as ``getpeercert()`` would show it (for %DOWNSTREAM_LOCAL_URI_SAN%)."""
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # CPython's, used by its test suite since 3.x
    if decode is None:
        return None
    try:
        return decode(path)
    except (OSError, ssl.SSLError, ValueError):
        return None


# --- contexts ---------------------------------------------------------------------------------------------------


class ReloadError(ConfigError):
    """The certificate files cannot be loaded (at start: a configuration error; later: keep the old context)."""


class TlsContext:
    """One transport socket's SSLContext, rebuilt when its files change (see the module's doc)."""

    def __init__(self, tls: DownstreamTls | UpstreamTls, where: str) -> None:
        self.tls = tls
        self.common = tls.common
        self.server = isinstance(tls, DownstreamTls)
        self.where = where  # "listener ingress" / "cluster b": for log lines
        self.local_uri_san: str | None = None
        self._signature: tuple[Any, ...] | None = None
        self._failing: tuple[Any, ...] | None = None
        self.reloads = 0
        self.context = self._build()  # raises ReloadError at start: a configuration that cannot run
        self._signature = self._files_signature()

    def _paths(self) -> tuple[str, ...]:
        c = self.common
        return tuple(p for p in (c.cert_chain, c.private_key, c.trusted_ca) if p)

    def _files_signature(self) -> tuple[Any, ...]:
        out = []
        for p in self._paths():
            try:
                st = os.stat(p)  # follows the symlink: a swapped directory is a new inode
                out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError as exc:
                out.append(exc.errno)
        return tuple(out)

    def _build(self) -> ssl.SSLContext:
        c = self.common
        if self.server and not c.cert_chain:
            raise ReloadError(f"{self.where}: no certificate to serve (tls: mesh needs --mesh-identity)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self.server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.server:
            # Envoy's UpstreamTlsContext default (tls_maximum_protocol_version TLSv1_2 for clients): a peer that
            # refuses our certificate does so inside the handshake, so it is a connect failure (UF), not a reset
            # after the request went out (TLS 1.3 finishes the client's handshake before the server verifies).
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # peers are matched by SAN (SanMatcher), not by the name we dialled
        try:
            if c.cert_chain:
                ctx.load_cert_chain(c.cert_chain, c.private_key or None)
            if c.trusted_ca:
                ctx.load_verify_locations(cafile=c.trusted_ca)
        except (OSError, ssl.SSLError, ValueError) as exc:
            what = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
            raise ReloadError(f"{self.where}: cannot load the TLS certificate "
                              f"{c.cert_chain or '-'} / {c.private_key or '-'} / CA {c.trusted_ca or '-'}: {what}"
                              ) from None
        if self.server:
            if c.trusted_ca:
                ctx.verify_mode = (ssl.CERT_REQUIRED if self.tls.require_client_certificate  # type: ignore[union-attr]
                                   else ssl.CERT_OPTIONAL)
            else:
                ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED if c.trusted_ca else ssl.CERT_NONE
        if c.alpn:
            ctx.set_alpn_protocols(list(c.alpn))
        if self.server:
            ctx.num_tickets = TLS13_TICKETS
        local = decode_cert_file(c.cert_chain) if c.cert_chain else None
        self.local_uri_san = first_uri_san(local)
        return ctx

    def maybe_reload(self) -> bool:
        """Rebuild the context if a file changed; True when a new context is in use."""
        sig = self._files_signature()
        if sig == self._signature:
            return False
        try:
            ctx = self._build()
        except ReloadError as exc:
            if self._failing != sig:
                self._failing = sig
                log.warning("%s; keeping the previous certificate, retrying every second", exc)
            return False
        self.context = ctx
        self._signature = sig
        self.reloads += 1
        if self._failing is not None:
            self._failing = None
        log.info("%s: TLS certificate reloaded (%s)", self.where, self.common.cert_chain or self.common.trusted_ca)
        return True


class TlsStats:
    """``<scope>ssl.*`` counters (scope: ``listener.<addr>_<port>.`` or ``cluster.<name>.``)."""

    __slots__ = SSL_COUNTERS + ("counters",)

    def __init__(self, store: Store, scope: str) -> None:
        self.counters: dict[str, Counter] = {}
        for n in SSL_COUNTERS:
            c = store.counter(f"{scope}ssl.{n}")
            setattr(self, n, c)
            self.counters[n] = c


class TlsInfo:
    """What the access log reads of a downstream TLS connection.

    ``peer_subject`` is formatted (``subject_text``) when first read: few access log formats print it, and every
    TLS connection would otherwise pay for it.
    """

    __slots__ = ("version", "peer_uri_san", "local_uri_san", "_peer_cert", "_peer_subject")

    _UNSET: Any = object()

    def __init__(self, version: str | None, peer_uri_san: str | None, peer_cert: dict[str, Any] | None,
                 local_uri_san: str | None) -> None:
        self.version = version
        self.peer_uri_san = peer_uri_san
        self.local_uri_san = local_uri_san
        self._peer_cert = peer_cert
        self._peer_subject: str | None = TlsInfo._UNSET

    @property
    def peer_subject(self) -> str | None:
        if self._peer_subject is TlsInfo._UNSET:
            self._peer_subject = subject_text(self._peer_cert)
        return self._peer_subject

    def __repr__(self) -> str:
        return (f"TlsInfo(version={self.version!r}, peer_uri_san={self.peer_uri_san!r}, "
                f"peer_subject={self.peer_subject!r}, local_uri_san={self.local_uri_san!r})")


# --- downstream ---------------------------------------------------------------------------------------------------


class RefusalLog:
    """One ``warning`` line per refused connection, at most one per interval, with the number suppressed."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.last = 0.0
        self.suppressed = 0

    def refused(self, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now - self.last < REFUSAL_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more refused since the last report)" if self.suppressed else ""
        log.warning("%s: refused the connection from %s: %s%s", self.where, peer, reason, more)
        self.last = now
        self.suppressed = 0


class TlsListener:
    """A TLS listener's accept loop (strict or permissive); serves connections with ``factory``'s protocols.

    ``on_refused(peer, stat, reason)`` counts a connection that never became an HTTP connection.
    """

    def __init__(self, address: str, port: int, ctx: TlsContext, permissive: bool,
                 factory: Callable[[], asyncio.Protocol], plain_factory: Callable[[], asyncio.Protocol],
                 on_refused: Callable[[str, str, str], None]) -> None:
        self.address = address
        self.port = port
        self.ctx = ctx
        self.permissive = permissive
        self.factory = factory
        self.plain_factory = plain_factory
        self.on_refused = on_refused
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, sock: socket.socket | None = None) -> None:
        """Listen; ``sock``: a listening socket bound elsewhere (a worker's, from sidecar.workers)."""
        self.loop = asyncio.get_running_loop()
        if sock is not None:
            sock.setblocking(False)
        else:
            family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.address, self.port))
                sock.listen(2048)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock = self.sock
        assert sock is not None and self.loop is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the backlog keeps the rest until the next wakeup
                log.error("listener %s:%d: accept failed: %s", self.address, self.port, exc.strerror or exc)
                return
            # No setblocking / TCP_NODELAY here: the transport connect_accepted_socket makes of ``conn`` sets both
            # (libuv's uv_tcp_open and uvloop's TCPTransport; asyncio's transport too), so doing it here cost two
            # more system calls per connection. The peek below asks for MSG_DONTWAIT instead.
            task = self.loop.create_task(self._serve(conn, f"{addr[0]}:{addr[1]}"))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        loop = self.loop
        assert loop is not None
        try:
            if self.permissive and not await self._starts_with_tls(conn):
                if conn.fileno() < 0:
                    return
                await loop.connect_accepted_socket(self.plain_factory, conn)
                return
            await loop.connect_accepted_socket(self.factory, conn, ssl=self.ctx.context,
                                               ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, TimeoutError) as exc:
            conn.close()
            stat, reason = classify(exc)
            self.on_refused(peer, stat, reason)

    async def _starts_with_tls(self, conn: socket.socket) -> bool:
        """Peek at the first byte (tls_inspector); a client silent for INSPECT_TIMEOUT_S is closed."""
        loop = self.loop
        assert loop is not None
        fd = conn.fileno()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, INSPECT_TIMEOUT_S)
        except TimeoutError:
            conn.close()
            return False
        finally:
            loop.remove_reader(fd)
        try:
            first = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):  # a spurious wakeup: look again
            return await self._starts_with_tls(conn)
        except OSError:
            conn.close()
            return False
        if not first:
            conn.close()  # the client left before saying anything
            return False
        return first[0] == TLS_RECORD_HANDSHAKE

    def close(self) -> None:
        if self.sock is not None and self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for t in list(self.tasks):
            t.cancel()


class TlsDownstream:
    """What the TLS connections of one listener share: context, stats, the refusal accounting."""

    def __init__(self, ctx: TlsContext, stats: TlsStats, ssl_total: Counter, ssl_active: Gauge,
                 on_refused: Callable[[str, str, str], None]) -> None:
        self.ctx = ctx
        self.stats = stats
        self.ssl_total = ssl_total  # http.<prefix>.downstream_cx_ssl_total / _active, as Envoy's HCM
        self.ssl_active = ssl_active
        self.on_refused = on_refused


class TlsDownstreamProtocol(DownstreamProtocol):
    """A downstream connection over TLS: the peer is checked before the connection manager hears of it."""

    def __init__(self, shared: TlsDownstream, manager: ConnectionManager, max_header_bytes: int = 60 * 1024,
                 idle_timeout_s: float = 0.0) -> None:
        super().__init__(manager, max_header_bytes, idle_timeout_s)
        self.shared = shared
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        shared = self.shared
        # The SSL protocol (uvloop's, asyncio's) decoded the peer certificate when the handshake completed and
        # keeps it as the "peercert" extra: a second getpeercert() would decode it again.
        cert = transport.get_extra_info("peercert")
        reason = check_peer(shared.ctx.common, cert) if cert else None
        if reason is not None:
            # Refused before any byte is read: the connection manager never sees this connection.
            self.refused = self.failed = self.closed = True
            transport.abort()  # type: ignore[attr-defined]
            peer = transport.get_extra_info("peername")
            shared.on_refused(f"{peer[0]}:{peer[1]}" if peer else "-", "fail_verify_san", reason)
            return
        stats = shared.stats
        stats.handshake.value += 1
        sslobj = transport.get_extra_info("ssl_object")
        # A decoded certificate means one was sent; only an empty one ({}: not verified, or None) needs a look at
        # the raw certificate to tell "none sent" apart.
        if not cert and sslobj is not None and sslobj.getpeercert(binary_form=True) is None:
            stats.no_certificate.value += 1
        self.peer_identity = first_uri_san(cert)
        self.tls_info = TlsInfo(sslobj.version() if sslobj is not None else None, self.peer_identity, cert,
                                shared.ctx.local_uri_san)
        shared.ssl_total.value += 1
        shared.ssl_active.value += 1
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self.shared.ssl_active.value -= 1
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.current.info.downstream_tls = self.tls_info  # type: ignore[union-attr]


# --- upstream -----------------------------------------------------------------------------------------------------


class TlsUpstream:
    """A cluster's transport socket: ``connect`` opens a verified TLS connection to one endpoint."""

    def __init__(self, ctx: TlsContext, stats: TlsStats, sni: str | None) -> None:
        self.ctx = ctx
        self.stats = stats
        self.sni = sni

    async def connect(self, pool: Any, local: tuple[str, int] | None, timeout: float) -> Any:
        """An ``UpstreamConnection`` over TLS; raises TlsError (a ConnectionError) when the TLS part fails."""
        from sidecar.upstream import UpstreamConnection

        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(pool), pool.host, pool.port, local_addr=local, ssl=self.ctx.context,
                server_hostname=self.sni or pool.host, ssl_handshake_timeout=max(timeout, 0.001))
        except (ssl.SSLError, ConnectionResetError, ConnectionAbortedError) as exc:
            # TCP connected (a refused connect is ConnectionRefusedError, never counted here): the handshake failed.
            stat, reason = classify(exc)
            self.stats.counters[stat].value += 1
            raise TlsError(reason, stat) from None
        cert = conn.transport.get_extra_info("peercert")  # decoded once by the SSL protocol, as downstream
        reason = check_peer(self.ctx.common, cert) if cert else None
        if reason is not None:
            self.stats.fail_verify_san.value += 1
            conn.tls_refused = conn.closed = True
            conn.transport.abort()
            raise TlsError(reason, "fail_verify_san")
        self.stats.handshake.value += 1
        if not cert:
            sslobj = conn.transport.get_extra_info("ssl_object")
            if sslobj is None or sslobj.getpeercert(binary_form=True) is None:
                self.stats.no_certificate.value += 1
        conn.peer_uri_san = first_uri_san(cert)
        return conn


def validate_tls(boot: Any) -> None:
    """Load every TLS context of a model once (``--check``); raises ReloadError naming the files."""
    for lst in boot.listeners:
        if lst.tls is not None:
            TlsContext(lst.tls, f"listener {lst.name}")
    for c in boot.clusters:
        if c.tls is not None:
            TlsContext(c.tls, f"cluster {c.name}")
