"""Who may talk to the server, what each client may do, and how fast.

Goals (issue 7, docs/security.md):
- TLS on every listener, mutual TLS as an option.  The transaction
  listeners accept plain TCP and upgrade with ``loop.start_tls`` themselves,
  so a refused handshake is seen (peer, reason), audited and counted rather
  than dropped silently inside the event loop.
- Client identities: a certificate subject (``[[auth.clients]] subject``) or,
  without a client certificate, an API key sent first on the connection
  (JSON lines: an ``{"op": "auth", "api_key": ...}`` line; binary: the key
  after the hello payload).  Keys live in a file named by config
  (``auth.api_keys_file``), never in the repository; only their SHA-256
  digests are kept in memory.
- Permissions: a table op -> allowed per client (role defaults: gateways
  authorize/purchase/increment/capture/void/refund/query, admins
  everything).  A forbidden record is answered ``not_permitted`` (57)
  without reaching the kernel or the log.
- Rate limits: one token bucket per client identity (per connection in
  open mode).  A record beyond the bucket is answered ``bad_request`` (30,
  JSON error "rate limit exceeded") and the connection is not read again
  until the bucket has refilled, so a flood costs one read per refill.
- Audit: every refused connection and forbidden call is one JSON object per
  line (event, time, protocol, peer, client, op, reason) -- never a key, a
  PAN or a request's fields.  Bursts are capped per (event, client) per
  second with a ``suppressed`` count.

Non-goals: certificate revocation lists/OCSP (use short-lived certs), key
rotation without restart, per-account permissions.

With no ``[tls]``, no clients and no ``[limits]`` configured,
``Security.from_config`` returns None and the server runs exactly as
before: the open local mode, logged once at startup.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .constants import ANSWER_DTYPE, FLAG_OR_PURCHASE, Op, Status

log = logging.getLogger("authcore.security")
audit_log = logging.getLogger("authcore.audit")

GATEWAY_OPS = frozenset({"authorize", "purchase", "increment", "capture", "void", "refund", "query"})
ADMIN_OPS = frozenset(o.name for o in Op)
ROLES = {"gateway": GATEWAY_OPS, "admin": ADMIN_OPS}
ops_slots = 256  # op codes are one byte on the wire

throttle_min_seconds = 0.05  # a rate-limited connection is not read again for at least this
throttle_max_seconds = 1.0  # ... and at most this (then it gets a fresh chance)
audit_events_per_second_max = 20  # per (event, client): a flood of forbidden calls is summarised
api_key_bytes_max = 256  # a key longer than this is refused unread
api_keys_file_bytes_max = 1 << 20
tls_minimum_version = ssl.TLSVersion.TLSv1_2

# Refusal reasons, kept per record while its entry is in flight.
REFUSE_FORBIDDEN = 1
REFUSE_RATE = 2
rate_limit_message = "rate limit exceeded"

_subject_names = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress",
}  # fmt: skip


class SecurityError(ValueError):
    """Security configuration that cannot be used (a file, a subject)."""


def parse_subject(text: str) -> frozenset[tuple[str, str]]:
    """``"CN=gw1,O=Acme"`` -> {("CN", "gw1"), ("O", "Acme")}; every pair must match."""
    pairs = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise SecurityError(f"subject {text!r}: expected NAME=value pairs separated by commas")
        pairs.add((k.strip(), v.strip()))
    return frozenset(pairs)


def cert_subject(peercert: dict | None) -> frozenset[tuple[str, str]]:
    """The (short name, value) pairs of a verified peer certificate's subject."""
    if not peercert:
        return frozenset()
    out = set()
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            out.add((_subject_names.get(name, name), value))
    return frozenset(out)


def subject_text(pairs: frozenset[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(pairs))


def server_tls_context(tls: Any) -> ssl.SSLContext:
    """The server's context from ``[tls]``: its cert chain, and client CA when set."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls_minimum_version
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def metrics_tls_context(config: Any) -> ssl.SSLContext | None:
    """TLS for the metrics port: server-authenticated only (scrapers and
    health probes rarely hold client certificates; nothing there is secret)."""
    tls = getattr(config, "tls", None)
    if tls is None or not tls.cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls_minimum_version
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def client_tls_context(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca_file`` (the server's CA), presenting
    ``cert_file``/``key_file`` when given (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = tls_minimum_version
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def load_api_keys(path: str) -> dict[bytes, str]:
    """``name key`` per line (# comments) -> {sha256(key): name}."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SecurityError(f"auth.api_keys_file {path}: {e.strerror}") from None
    if len(raw) > api_keys_file_bytes_max:
        raise SecurityError(f"auth.api_keys_file {path}: larger than {api_keys_file_bytes_max} bytes")
    out: dict[bytes, str] = {}
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) > api_key_bytes_max:
            raise SecurityError(f"auth.api_keys_file {path}: line {n}: expected 'client-name key'")  # never echo the key
        out[hashlib.sha256(parts[1].encode()).digest()] = parts[0]
    return out


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float):
        assert rate > 0 and burst >= 1
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, n: int, now: float) -> int:
        """Take up to n whole tokens; returns how many were granted."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        got = min(n, int(self.tokens))
        self.tokens -= got
        return got

    def refill_seconds(self) -> float:
        """Time until the bucket is full again (how long to stop reading)."""
        return (self.burst - self.tokens) / self.rate


class Client:
    """One configured identity: its name, allowed ops and rate bucket."""

    def __init__(self, name: str, ops: frozenset[str], subject: frozenset, rate: float, burst: int):
        self.name = name
        self.ops = ops
        self.allowed = np.zeros(ops_slots, bool)
        self.allowed[[int(Op[o]) for o in ops]] = True
        self.subject = subject
        self.rate = rate
        self.burst = burst
        self.bucket: TokenBucket | None = None


class Audit:
    """Structured audit lines: to ``auth.audit_file`` (if set) and the
    ``authcore.audit`` logger.  Fields are chosen here, never copied from input."""

    def __init__(self, path: str = ""):
        self.path = path
        self._file = open(path, "ab", buffering=0) if path else None  # noqa: SIM115 - lives with the server
        self._window: dict[tuple[str, str], list] = {}  # (event, client) -> [second, count, suppressed]

    def event(self, event: str, **fields: Any) -> None:
        now = time.time()
        key = (event, str(fields.get("client", "")))
        w = self._window.get(key)
        sec = int(now)
        if w is None or w[0] != sec:
            suppressed = w[2] if w is not None else 0
            w = self._window[key] = [sec, 0, 0]
            if suppressed:
                fields["suppressed_before"] = suppressed
        w[1] += 1
        if w[1] > audit_events_per_second_max:
            w[2] += 1
            return
        rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z", "event": event}
        rec.update(fields)
        line = orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)
        if self._file is not None:
            try:
                self._file.write(line)
            except OSError:
                log.exception("audit file write failed")
        audit_log.info("%s", line[:-1].decode())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _peer(transport: Any) -> str:
    p = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(p, tuple) and len(p) >= 2:
        return f"{p[0]}:{p[1]}"
    return str(p) if p else "?"


class Security:
    """The server's TLS context, identities, permissions, buckets and audit."""

    def __init__(self, config: Any, metrics: Any):
        tls, auth, limits = config.tls, config.auth, config.limits
        self.metrics = metrics
        self.tls = server_tls_context(tls) if tls.cert_file else None
        self.handshake_timeout = tls.handshake_timeout_seconds
        self.clients: list[Client] = []
        for c in auth.clients:
            ops = frozenset(c.ops) if c.ops else ROLES[c.role]
            rate = c.rate_per_second or limits.rate_per_second
            burst = c.burst or limits.burst or max(1, int(rate))
            subject = parse_subject(c.subject) if c.subject else frozenset()
            self.clients.append(Client(c.name, ops, subject, rate, burst))
        self.by_name = {c.name: c for c in self.clients}
        self.keys = load_api_keys(auth.api_keys_file) if auth.api_keys_file else {}
        for name in self.keys.values():
            if name not in self.by_name:
                raise SecurityError(f"auth.api_keys_file names client {name!r}, not in [[auth.clients]]")
        self.identities = bool(self.clients)
        self.rate = limits.rate_per_second
        self.burst = limits.burst or max(1, int(self.rate))
        self.audit = Audit(auth.audit_file)

    @classmethod
    def from_config(cls, config: Any, metrics: Any) -> "Security | None":
        """None in open local mode (nothing configured): the server's hooks are skipped."""
        tls, auth, limits = getattr(config, "tls", None), getattr(config, "auth", None), getattr(config, "limits", None)
        if tls is None or (not tls.cert_file and not auth.clients and limits.rate_per_second <= 0):
            return None
        return cls(config, metrics)

    def describe(self) -> str:
        parts = [
            "TLS " + ("off" if self.tls is None else ("mutual" if self.tls.verify_mode == ssl.CERT_REQUIRED else
                                                       "with optional client certificates" if self.tls.verify_mode == ssl.CERT_OPTIONAL else "server-only")),
            f"{len(self.clients)} client identities" if self.identities else "no identities (every client may call every operation)",
            f"rate limit {self.rate:g}/s per {'client' if self.identities else 'connection'}" if self.rate > 0 else "no default rate limit",
        ]  # fmt: skip
        return "; ".join(parts)

    def close(self) -> None:
        self.audit.close()

    # -- connections -----------------------------------------------------------
    def intercept(self, session: Any, transport: Any) -> bool:
        """Called first in ``connection_made``; True = the TLS upgrade took over."""
        if self.tls is None or session.tls_done:
            return False
        session.tls_done = True
        # uvloop starts reading right after connection_made (a pause here is
        # undone), so the ClientHello may reach the session before start_tls
        # has swapped protocols: the session keeps those bytes in pre_tls and
        # _upgrade hands them to the TLS protocol.
        session.pre_tls = bytearray()
        loop = session.server.loop
        loop.create_task(self._upgrade(session, transport))
        return True

    async def _upgrade(self, session: Any, transport: Any) -> None:
        peer = _peer(transport)
        loop = session.server.loop
        task = loop.create_task(
            loop.start_tls(transport, session, self.tls, server_side=True, ssl_handshake_timeout=self.handshake_timeout)
        )
        try:
            # call_soon is FIFO: after two turns start_tls has swapped in its
            # protocol and run its connection_made and resume_reading, with no
            # read in between; bytes read before that are fed to it now.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            early = bytes(session.pre_tls or b"")
            session.early_app = bytearray()  # from now on the session hears decrypted bytes
            tls_proto = transport.get_protocol()
            if early and tls_proto is not session and not task.done():
                view = memoryview(early)
                while view:
                    buf = tls_proto.get_buffer(len(view))
                    n = min(len(buf), len(view))
                    buf[:n] = view[:n]
                    tls_proto.buffer_updated(n)
                    view = view[n:]
            tls_transport = await task
        except Exception as e:  # any failure refuses this connection, never the server
            session.pre_tls = session.early_app = None
            reason = getattr(e, "reason", None) or type(e).__name__
            self.refused(session.protocol_name, peer, "tls_handshake", str(reason))
            transport.abort()
            return
        if tls_transport is None:  # the peer closed during the handshake
            session.pre_tls = session.early_app = None
            self.refused(session.protocol_name, peer, "tls_handshake", "closed")
            transport.abort()
            return
        early_app = bytes(session.early_app or b"")
        session.pre_tls = session.early_app = None
        session.connection_made(tls_transport)
        if early_app and session.transport is tls_transport:
            session.data_received(early_app)

    def identify(self, session: Any, transport: Any) -> bool:
        """After the handshake: find the client; False = refuse the connection."""
        session.peer = _peer(transport)
        if not self.identities:
            if self.rate > 0:
                session.bucket = TokenBucket(self.rate, self.burst, session.server.loop.time())
            session.client_name = "local"
            return True
        cert = transport.get_extra_info("peercert") if self.tls is not None else None
        if cert:
            subject = cert_subject(cert)
            for c in self.clients:
                if c.subject and c.subject <= subject:
                    self._bind(session, c)
                    return True
            self.refused(session.protocol_name, session.peer, "unknown_subject", subject_text(subject))
            return False
        if session.protocol_name == "iso8583":
            self.refused(session.protocol_name, session.peer, "no_certificate", "ISO 8583 needs a client certificate when identities are configured")
            return False
        session.awaiting_key = True
        session.awaiting_since = session.server.tick
        return True

    def _bind(self, session: Any, c: Client) -> None:
        session.client = c
        session.client_name = c.name
        session.awaiting_key = False
        if c.rate > 0:
            if c.bucket is None:  # one bucket per identity, shared by its connections
                c.bucket = TokenBucket(c.rate, c.burst, session.server.loop.time())
            session.bucket = c.bucket

    def authenticate_key(self, session: Any, key: bytes) -> str | None:
        """The API key sent first: binds the session; returns the client name or None."""
        name = None
        if 0 < len(key) <= api_key_bytes_max:
            digest = hashlib.sha256(key).digest()
            for d, n in self.keys.items():  # constant time per candidate
                if hmac.compare_digest(d, digest):
                    name = n
        if name is None:
            self.refused(session.protocol_name, session.peer, "bad_api_key", "unknown API key")
            return None
        self._bind(session, self.by_name[name])
        self.audit.event("authenticated", protocol=session.protocol_name, peer=session.peer, client=name, method="api_key")
        return name

    def refused(self, protocol: str, peer: str, reason: str, detail: str = "") -> None:
        self.metrics.auth_refused.labels(protocol, reason).inc()
        self.audit.event("connection_refused", protocol=protocol, peer=peer, reason=reason, detail=detail[:200])

    # -- requests --------------------------------------------------------------
    def check(self, session: Any, requests: np.ndarray) -> np.ndarray | None:
        """Refusal reason per record (0 = pass), or None when every record passes."""
        refused = None
        if self.identities:
            c = session.client
            if c is None:  # unauthenticated: nothing passes
                refused = np.full(len(requests), REFUSE_FORBIDDEN, np.uint8)
            else:
                bad = ~c.allowed[requests["op"]]
                # An ISO reversal without field 90 may refund a purchase
                # (FLAG_OR_PURCHASE, decided by the kernel): it needs both.
                bad |= ((requests["flags"] & FLAG_OR_PURCHASE) != 0) & ~c.allowed[int(Op.refund)]
                if bad.any():
                    refused = bad.astype(np.uint8) * REFUSE_FORBIDDEN
            if refused is not None:
                self._forbidden(session, requests, refused)
        bucket = session.bucket
        if bucket is not None:
            want = len(requests) if refused is None else int((refused == 0).sum())
            if want:
                loop = session.server.loop
                got = bucket.take(want, loop.time())
                if got < want:
                    if refused is None:
                        refused = np.zeros(len(requests), np.uint8)
                    passing = np.flatnonzero(refused == 0)
                    refused[passing[got:]] = REFUSE_RATE
                    self.metrics.rate_limited.labels(session.client_name).inc(want - got)
                    self.audit.event("rate_limited", protocol=session.protocol_name, peer=session.peer,
                                     client=session.client_name, refused=want - got)  # fmt: skip
                    session.throttle(min(throttle_max_seconds, max(throttle_min_seconds, bucket.refill_seconds())))
        return refused

    def _forbidden(self, session: Any, requests: np.ndarray, refused: np.ndarray) -> None:
        idx = np.flatnonzero(refused == REFUSE_FORBIDDEN)
        ops, counts = np.unique(requests["op"][idx], return_counts=True)
        name = session.client_name or "unauthenticated"
        for op, n in zip(ops.tolist(), counts.tolist()):
            op_name = Op(op).name if op in Op._value2member_map_ else "unknown"
            self.metrics.forbidden.labels(name, op_name).inc(n)
            self.audit.event("forbidden", protocol=session.protocol_name, peer=session.peer, client=name,
                             op=op_name, count=n, first_id=int(requests["id"][idx[0]]))  # fmt: skip


def refusal_answers(requests: np.ndarray, refused: np.ndarray) -> np.ndarray:
    """ANSWER_DTYPE for a whole submit: refused rows filled, the rest to come."""
    answers = np.zeros(len(requests), ANSWER_DTYPE)
    answers["id"] = requests["id"]
    answers["op"] = requests["op"]
    answers["status"] = np.where(refused == REFUSE_FORBIDDEN, int(Status.not_permitted), int(Status.bad_request))
    return answers


def refusal_json(request_id: int, op: int, reason: int, client: str | None) -> dict:
    """The JSON-lines answer of a refused record (no stamp: it was never logged)."""
    op_name = Op(op).name if op in Op._value2member_map_ else "unknown"
    if reason == REFUSE_FORBIDDEN:
        who = f"client {client}" if client else "an unauthenticated connection"
        return {"id": request_id, "op": op_name, "status": "not_permitted", "code": "57",
                "error": f"operation {op_name} not permitted for {who}"}  # fmt: skip
    return {"id": request_id, "op": op_name, "status": "bad_request", "code": "30", "error": rate_limit_message}
