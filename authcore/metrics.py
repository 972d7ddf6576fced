"""Prometheus metrics and the small HTTP endpoint that serves them.

Goals: what an operator needs to see that the authorisation host is healthy
and fast (requests by operation and status, batch sizes, sync and decision
latency, open connections), with metric work done once per *batch* (one
``np.bincount`` over op x status), never once per request; ``/health``
(the process runs) and ``/ready`` (recovered and the log is writable) for
orchestrators.  Every server gets its own registry, so several servers can
run in one process (tests).

Non-goals: a general HTTP server (one GET per connection, then close), push
gateways, and anything that could carry a PAN: labels are enum names only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .constants import Op, Status

log = logging.getLogger("authcore.metrics")

http_request_bytes_max = 8192  # a GET with headers; anything longer is refused
http_timeout_seconds = 5.0  # a scrape that has not sent its request by then is cut

# Histogram buckets, chosen for the ranges each quantity actually spans.
batch_size_buckets = tuple(float(1 << i) for i in range(0, 17))  # 1 .. 65,536 requests
latency_buckets_seconds = (
    20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 250e-3, 1.0,
)  # fmt: skip

_op_slots = max(Op) + 1  # op codes are dense 1..16; slot 0 is unused
_status_slots = 32  # > max(Status); a power of two keeps the key a shift
assert max(Status) < _status_slots


class Metrics:
    """All metrics of one server, on a private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "authcore_requests", "Requests answered by the engine, by operation and status", ["op", "status"], registry=r
        )
        self.bad_requests = Counter(
            "authcore_bad_requests", "Malformed requests or frames answered bad_request", ["protocol"], registry=r
        )
        self.batch_size = Histogram(
            "authcore_batch_size", "Requests per engine batch", buckets=batch_size_buckets, registry=r
        )
        self.sync_seconds = Histogram(
            "authcore_sync_seconds", "Time to log and sync one batch", buckets=latency_buckets_seconds, registry=r
        )
        self.decision_seconds = Histogram(
            "authcore_decision_seconds",
            "Time the engine spends on a batch besides logging",
            buckets=latency_buckets_seconds,
            registry=r,
        )
        self.unavailable_batches = Counter(
            "authcore_unavailable_batches", "Batches answered unavailable (log not durable)", registry=r
        )
        self.growth_seconds = Counter(
            "authcore_table_growth_seconds",
            "Seconds decisions were stopped while a table grew (copy and rehash): size the engine's *_initial",
            registry=r,
        )
        self.connections = Gauge("authcore_connections", "Open connections", ["protocol"], registry=r)
        self.connections_refused = Counter(
            "authcore_connections_refused", "Connections refused (connection limit)", ["protocol"], registry=r
        )
        self.connections_timed_out = Counter(
            "authcore_connections_timed_out", "Connections closed by read or idle timeouts", ["protocol"], registry=r
        )
        # Security (issue 7): labels are configured client names and enum names only.
        self.forbidden = Counter(
            "authcore_forbidden", "Requests answered not_permitted by client permissions", ["client", "op"], registry=r
        )
        self.rate_limited = Counter("authcore_rate_limited", "Requests refused by a client's rate limit", ["client"], registry=r)
        self.auth_refused = Counter(
            "authcore_auth_refused", "Connections refused at the TLS handshake or authentication", ["protocol", "reason"],
            registry=r,
        )
        # Children resolved lazily per (op, status) slot: labels() is a dict
        # lookup plus a lock, too slow to call per request but fine per slot.
        self._request_cells: dict[int, object] = {}

    def observe_batch(self, ops: np.ndarray, statuses: np.ndarray, submit_seconds: float, sync_seconds: float) -> None:
        """Count one batch: per (op, status) counts, its size and timings."""
        n = len(ops)
        assert n == len(statuses)
        self.batch_size.observe(n)
        if sync_seconds >= 0.0:
            self.sync_seconds.observe(sync_seconds)
        self.decision_seconds.observe(max(0.0, submit_seconds - max(sync_seconds, 0.0)))
        if n == 0:
            return
        key = ops.astype(np.intp) * _status_slots + statuses.astype(np.intp)
        counts = np.bincount(key, minlength=0)
        for slot in np.flatnonzero(counts):
            cell = self._request_cells.get(int(slot))
            if cell is None:
                cell = self._request_cells[int(slot)] = self.requests.labels(*_slot_labels(int(slot)))
            cell.inc(int(counts[slot]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _slot_labels(slot: int) -> tuple[str, str]:
    op, status = divmod(slot, _status_slots)
    try:
        op_name = Op(op).name
    except ValueError:
        op_name = "unknown"
    try:
        status_name = Status(status).name
    except ValueError:
        status_name = "unknown"
    return op_name, status_name


class MetricsHTTP(asyncio.Protocol):
    """One HTTP/1.x GET per connection: /metrics, /health, /ready."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool]):
        self.metrics = metrics
        self.ready = ready
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(http_timeout_seconds, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            end = self.buf.find(b"\n\n")
        if end < 0:
            if len(self.buf) > http_request_bytes_max:
                self._respond(431, b"request too large\n")
            return
        line = bytes(self.buf[: self.buf.find(b"\n")]).strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._respond(400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._respond(405, b"method not allowed\n")
            return
        head_only = method == b"HEAD"
        if target == b"/metrics":
            self._respond(200, self.metrics.render(), CONTENT_TYPE_LATEST, head_only)
        elif target == b"/health":
            self._respond(200, b"ok\n", head_only=head_only)
        elif target == b"/ready":
            if self.ready():
                self._respond(200, b"ready\n", head_only=head_only)
            else:
                self._respond(503, b"not ready\n", head_only=head_only)
        else:
            self._respond(404, b"not found\n", head_only=head_only)

    def _respond(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8", head_only=False) -> None:
        assert self.transport is not None
        reason = _REASONS.get(code, "Error")
        head = (
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        self.transport.write(head if head_only else head + body)
        self.transport.close()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


async def start_metrics_server(
    metrics: Metrics, ready: Callable[[], bool], host: str, port: int, ssl: Any = None
) -> asyncio.Server:
    """Listen for scrapes; returns the asyncio server (port 0 picks a free one)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: MetricsHTTP(metrics, ready), host, port, ssl=ssl)
