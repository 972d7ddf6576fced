"""The network front: one event loop, many connections, one writer.

Goals:
- Group commit across connections.  Every protocol session parses what it
  reads into REQUEST_DTYPE records and hands them to the server; once per
  loop turn the server gathers everything pending into one numpy batch (at
  most ``server.batch_max`` requests) and gives it to ``Engine.submit`` on a
  single dedicated writer thread.  The kernel and fdatasync release the GIL,
  so the loop keeps reading while a batch is logged and decided, and the
  next batch accumulates meanwhile (LMAX's single writer; TigerBeetle's
  batching).
- Answers go back to each connection in the order its requests arrived,
  including answers the session made itself (bad_request, error frames).
- Bounded memory per connection: a session stops reading when it has too
  many unanswered requests or its transport buffer is above the high-water
  mark, and reads again below; slow and idle connections are cut by timeouts.
- ``serve``: open storage, recover, listen, print the ports, drain on
  SIGTERM/SIGINT (stop accepting, answer what is in flight, sync, close).

TLS, identities, permissions and rate limits are ``authcore.security``;
the hooks here (``Server.security``, None in open local mode) are the only
coupling.

Non-goals: parsing (``authcore.protocols``), more than one writer (the engine is one shard).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .constants import ANSWER_DTYPE, REQUEST_DTYPE, Status, batch_count_max
from .wal import Unavailable

log = logging.getLogger("authcore.server")

# --- limits that are not operator settings ----------------------------------

write_buffer_low_divisor = 4  # resume writing-side reading at high-water / 4
inflight_resume_divisor = 2  # resume reading below inflight_max / 2 (hysteresis)
drain_timeout_seconds = 10.0  # a client that never reads cannot hold up exit
timer_interval_seconds = 1.0  # resolution of read/idle timeouts
pre_tls_bytes_max = 64 << 10  # bytes kept from before a TLS upgrade (a ClientHello is < 16 KiB)
linger_seconds = 2.0  # after our FIN, read and discard the peer's input this long (see _linger)
default_ports = {"binary": 7400, "json": 7401, "iso8583": 7402, "metrics": 7403}
default_data_dir = "./authcore-data"
default_host = "127.0.0.1"
pan_key_name = "pan.key"  # generated in the data directory when config names none
# The writer thread runs GIL-free (kernel, fdatasync) and then needs the GIL
# back while the loop thread is busy parsing; CPython makes it wait up to the
# switch interval (5 ms by default, longer than deciding a whole batch).
gil_switch_interval_seconds = 0.001

SendFn = Callable[[bytes], None]


class SessionState(enum.IntEnum):
    """A connection's life: the only legal moves are the arrows below."""

    new = 0  # -> open, draining (refused), closed
    open = 1  # -> draining, closed
    draining = 2  # -> closed; reads ignored, answers still written
    closed = 3


_session_moves = {
    SessionState.new: {SessionState.open, SessionState.draining, SessionState.closed},
    SessionState.open: {SessionState.draining, SessionState.closed},
    SessionState.draining: {SessionState.closed},
    SessionState.closed: set(),
}


class _Entry:
    """One ordered slot of a session's output: engine work or a ready reply."""

    __slots__ = ("session", "requests", "context", "prepare", "n", "answers", "got", "payload", "keep", "full", "refused")

    def __init__(self, session: "Session", requests: np.ndarray | None, context: Any, prepare, payload=None):
        self.session = session
        self.requests = requests
        self.context = context
        self.prepare = prepare
        self.n = 0 if requests is None else len(requests)
        self.answers: np.ndarray | None = None
        self.got = 0
        self.payload: bytes | None = payload
        # Some records refused by security.check: ``requests`` holds only the
        # passing ones (rows ``keep`` of ``full``); ``answers`` is pre-filled
        # for all rows; ``refused`` is the reason per row (0 = passed).
        self.keep: np.ndarray | None = None
        self.full: np.ndarray | None = None
        self.refused: np.ndarray | None = None


class Session(asyncio.Protocol):
    """Base of every protocol connection (JSON lines, binary, ISO 8583).

    A subclass implements ``feed(data)`` (parse what was read and call
    ``submit`` / ``reply`` in arrival order), ``encode(entry)`` (answers of
    one submit, to bytes), ``send_error(message)`` (a final error before the
    server closes the connection) and ``has_partial()`` (a message has
    started but is not complete).
    """

    protocol_name = "?"

    def __init__(self, server: "Server"):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.state = SessionState.new
        self.entries: collections.deque[_Entry] = collections.deque()
        self.inflight = 0  # requests submitted whose answers are not yet written
        self.write_paused = False
        self.read_paused = False
        self.last_read_tick = server.tick
        self.write_stalled_tick = 0
        self.lingering = False
        self.peer_eof = False
        self._linger_timer: asyncio.TimerHandle | None = None
        # security (authcore.security); untouched in open local mode
        self.tls_done = False
        self.pre_tls: bytearray | None = None
        self.early_app: bytearray | None = None
        self.peer: str | None = None
        self.client: Any = None
        self.client_name: str | None = None
        self.bucket: Any = None
        self.awaiting_key = False
        self.awaiting_since = 0
        self.throttled = False

    # -- state ------------------------------------------------------------
    def _set_state(self, to: SessionState) -> None:
        assert to in _session_moves[self.state], (self.state, to)
        self.state = to

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        sec = self.server.security
        if sec is not None:
            if sec.intercept(self, transport):
                return  # the TLS handshake calls connection_made again when done
            if not sec.identify(self, transport):
                transport.close()
                return
        self.transport = transport
        limits = self.server.limits
        high = limits.write_buffer_high_bytes
        transport.set_write_buffer_limits(high=high, low=high // write_buffer_low_divisor)
        if not self.server._session_opened(self):
            self.send_error(f"too many connections (max {limits.connections_max})")
            self._set_state(SessionState.draining)
            self._maybe_finish()
            return
        self._set_state(SessionState.open)
        if self.server.draining:
            self.start_draining()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self.state != SessionState.closed:
            self._set_state(SessionState.closed)
        self.server._session_closed(self)
        self.entries.clear()
        self.inflight = 0

    def data_received(self, data: bytes) -> None:
        if self.pre_tls is not None:  # during a TLS upgrade (authcore.security)
            if self.early_app is not None:  # decrypted before connection_made: replayed right after it
                self.early_app += data
            elif len(self.pre_tls) + len(data) <= pre_tls_bytes_max:  # beyond: garbage, the handshake fails
                self.pre_tls += data
            return
        if self.state != SessionState.open:
            return  # draining or closed: what was not parsed before is not answered
        self.last_read_tick = self.server.tick
        try:
            self.feed(data)
        except Exception:
            # A parser bug must cost one connection, never the server.
            log.exception("%s session: error parsing input; closing the connection", self.protocol_name)
            self.send_error("internal error")
            self.close()
            return
        if self.inflight > self.server.limits.inflight_max:
            self._update_reading()

    def eof_received(self) -> bool:
        self.peer_eof = True
        # Half-close: the peer finished sending; keep writing its answers,
        # close once they are all out.
        if self.lingering:
            self.close()  # our answers are out and the peer is done: nothing to wait for
            return True
        if self.state == SessionState.open:
            self._set_state(SessionState.draining)
        self._maybe_finish()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_stalled_tick = self.server.tick
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    # -- subclass interface ------------------------------------------------
    def feed(self, data: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, entry: _Entry) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def send_error(self, message: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def has_partial(self) -> bool:
        return False

    def submit(self, requests: np.ndarray, context: Any = None, prepare=None) -> None:
        """Queue requests for the engine; their answers keep this slot's place.

        ``prepare(engine, batch_slice)``, if given, runs on the writer thread
        just before the batch is submitted, on this submit's records (in
        place): the hook for work that must see the engine state serially
        (the ISO 8583 PAN -> account lookup).
        """
        assert requests.dtype == REQUEST_DTYPE, requests.dtype
        assert requests.ndim == 1
        sec = self.server.security
        if sec is not None and len(requests):
            refused = sec.check(self, requests)
            if refused is not None:
                self._submit_filtered(requests, context, prepare, refused)
                return
        if len(requests) == 0:
            self.entries.append(_Entry(self, requests, context, None))
            self.entries[-1].answers = np.zeros(0, ANSWER_DTYPE)
            self._entry_done(self.entries[-1])
            return
        entry = _Entry(self, requests, context, prepare)
        self.entries.append(entry)
        self.inflight += entry.n
        self.server._enqueue(entry)

    def _submit_filtered(self, requests: np.ndarray, context: Any, prepare, refused: np.ndarray) -> None:
        """Refused records are answered here; only the rest reach the engine."""
        from .security import refusal_answers

        keep = np.flatnonzero(refused == 0)
        entry = _Entry(self, requests[keep], context, None)
        entry.full, entry.keep, entry.refused = requests, keep, refused
        entry.answers = refusal_answers(requests, refused)
        self.entries.append(entry)
        if len(keep) == 0:
            self._entry_done(entry)
            return
        if prepare is not None:
            entry.prepare = _filtered_prepare(prepare, requests, keep)
        self.inflight += entry.n
        self.server._enqueue(entry)

    def throttle(self, seconds: float) -> None:
        """Rate limit hit: stop reading this connection for ``seconds``."""
        if self.throttled:
            return
        self.throttled = True
        self._update_reading()

        def lift() -> None:
            self.throttled = False
            self._update_reading()

        self.server.loop.call_later(seconds, lift)

    def reply(self, payload: bytes) -> None:
        """Write an answer the session made itself, in order with the rest."""
        if not self.entries:
            self._write(payload)
        else:
            self.entries.append(_Entry(self, None, None, None, payload))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def start_draining(self) -> None:
        """Stop reading; close once every queued answer is written."""
        if self.state == SessionState.open:
            self._set_state(SessionState.draining)
        if self.transport is not None and not self.transport.is_closing() and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        self._maybe_finish()

    # -- internals ---------------------------------------------------------
    def _write(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)

    def _deliver(self, entry: _Entry, offset: int, answers: np.ndarray) -> None:
        """Answers for entry[offset:offset+len] arrived from one batch."""
        if entry.keep is not None:
            entry.answers[entry.keep[offset : offset + len(answers)]] = answers
        elif offset == 0 and len(answers) == entry.n:
            entry.answers = answers
        else:
            if entry.answers is None:
                entry.answers = np.empty(entry.n, ANSWER_DTYPE)
            entry.answers[offset : offset + len(answers)] = answers
        entry.got += len(answers)
        assert entry.got <= entry.n
        if entry.got == entry.n:
            self._entry_done(entry)

    def _entry_done(self, entry: _Entry) -> None:
        if self.state == SessionState.closed:
            return
        if entry.full is not None:
            entry.requests = entry.full  # encode sees every row, refused ones included
        entry.payload = self.encode(entry)
        entry.requests = None  # the payload is all that is kept
        entry.answers = None
        entry.full = None
        written = 0
        entries = self.entries
        while entries and entries[0].payload is not None:
            e = entries.popleft()
            self._write(e.payload)
            written += e.n
        self.inflight -= written
        assert self.inflight >= 0
        if self.read_paused:
            self._update_reading()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.state == SessionState.draining and not self.entries and not self.lingering:
            self._linger()

    def _linger(self) -> None:
        """Close gracefully once every answer is written.

        Closing a socket whose receive queue still holds unread bytes makes
        the kernel send RST, and the peer may then lose answers it has not
        read yet.  So: flush and send FIN (write_eof), keep reading and
        discarding the peer's input until it closes too or linger_seconds
        pass, then close.
        """
        t = self.transport
        self.lingering = True
        if t is None or t.is_closing():
            return
        try:
            if self.peer_eof or not t.can_write_eof():
                t.close()  # the peer sends nothing more: close flushes our answers
                return
            t.write_eof()
        except (OSError, RuntimeError):
            t.close()
            return
        if self.read_paused:
            t.resume_reading()
            self.read_paused = False
        self._linger_timer = self.server.loop.call_later(linger_seconds, t.close)

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.lingering:
            return
        limits = self.server.limits
        if self.state != SessionState.open:
            want_pause = True
        elif self.read_paused:
            want_pause = self.write_paused or self.inflight > limits.inflight_max // inflight_resume_divisor
        else:
            want_pause = self.write_paused or self.inflight > limits.inflight_max
        want_pause = want_pause or self.throttled
        if want_pause and not self.read_paused:
            t.pause_reading()
            self.read_paused = True
        elif not want_pause and self.read_paused:
            t.resume_reading()
            self.read_paused = False
            self.last_read_tick = self.server.tick

    def _check_timeouts(self, tick: int) -> None:
        """Called once per timer tick; cuts slow, stalled and idle peers."""
        limits = self.server.limits
        quiet = (tick - self.last_read_tick) * timer_interval_seconds
        if self.write_paused and (tick - self.write_stalled_tick) * timer_interval_seconds >= limits.read_timeout_seconds:
            self._timeout("answers not read", hard=True)  # lingering or not: it will never drain
        elif self.lingering:
            return
        elif self.awaiting_key and (tick - self.awaiting_since) * timer_interval_seconds >= self.server.security.handshake_timeout:
            self.server.security.refused(self.protocol_name, self.peer or "?", "auth_timeout", "no API key in time")
            self._timeout("authentication")
        elif not self.read_paused and self.has_partial() and quiet >= limits.read_timeout_seconds:
            self._timeout("incomplete message")
        elif not self.entries and not self.has_partial() and limits.idle_timeout_seconds > 0 and quiet >= limits.idle_timeout_seconds:
            self._timeout("idle")

    def _timeout(self, why: str, hard: bool = False) -> None:
        log.info("closing %s connection: %s timeout", self.protocol_name, why)
        self.server.metrics.connections_timed_out.labels(self.protocol_name).inc()
        if hard:  # the peer reads nothing: a graceful close would wait forever
            if self.transport is not None:
                self.transport.abort()
            return
        if not self.entries:
            self.send_error(f"{why} timeout")  # else it would overtake answers still due
        self.start_draining()


def _filtered_prepare(prepare, full: np.ndarray, keep: np.ndarray):
    """A prepare hook for a filtered entry: the protocol's hook sees every
    record once (in place, on the writer thread), then each batch slice gets
    the passing rows.  Slices come in order, so a cursor is enough."""
    state = {"done": False, "cursor": 0}

    def run(engine: Any, out: np.ndarray) -> None:
        if not state["done"]:
            prepare(engine, full)
            state["done"] = True
        c = state["cursor"]
        out[:] = full[keep[c : c + len(out)]]
        state["cursor"] = c + len(out)

    return run


class _TimedLog:
    """Wraps the storage log so the server sees sync latency per batch."""

    def __init__(self, storage: Any):
        self.storage = storage
        self.last_seconds = -1.0

    def log_batch(self, stamp0: int, requests: np.ndarray) -> None:
        t0 = time.perf_counter()
        try:
            self.storage.log_batch(stamp0, requests)
        finally:
            self.last_seconds = time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:  # anything else the engine asks of its log
        return getattr(self.storage, name)


class _Writer:
    """The single writer thread: batches in through a queue, each result
    back to the loop with one ``call_soon_threadsafe``.

    Why not a ThreadPoolExecutor: an asyncio future wrapping its future
    runs the done callback one loop turn after the result arrives.  At 100k
    requests/s in frames of 8 the hand-offs were a quarter of each ~450 us
    group-commit cycle (60-65 us in, 43-49 us back); now 40-55 and 23-33.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[..., Any], done: Callable[..., None]):
        self._loop, self._work, self._done = loop, work, done
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # A daemon: exiting without drain() must not hang on a blocked get();
        # a batch cut off mid-write was never acknowledged (the log's crash case).
        self._thread = threading.Thread(target=self._run, name="authcore-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: np.ndarray, prepares: list, segments: list) -> None:
        assert self._thread.is_alive(), "writer: submit after shutdown"
        self._queue.put((batch, prepares, segments))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, prepares, segments = item
            try:
                result: Any = self._work(batch, prepares)
            except BaseException as e:  # a prepare hook or a bug: the loop answers unavailable
                result = e
            try:
                self._loop.call_soon_threadsafe(self._done, batch, segments, result)
            except RuntimeError:  # the loop is closed: nobody is waiting
                return

    def shutdown(self) -> None:
        """Stop after the batches already submitted."""
        self._queue.put(None)
        self._thread.join()


def unavailable_answers(requests: np.ndarray) -> np.ndarray:
    """Every request of a batch answered ``unavailable`` (code 96)."""
    answers = np.zeros(len(requests), ANSWER_DTYPE)
    answers["id"] = requests["id"]
    answers["op"] = requests["op"]
    answers["status"] = Status.unavailable
    return answers


class Server:
    """Gathers requests from every session into batches for one writer thread."""

    def __init__(self, engine: Any, config: Any, *, hasher: Any, metrics: Any = None, storage: Any = None):
        from .metrics import Metrics

        self.engine = engine
        self.config = config
        self.limits = config.server
        assert 1 <= self.limits.batch_max <= batch_count_max
        self.hasher = hasher
        self.metrics = metrics if metrics is not None else Metrics()
        self.storage = storage
        self.timed_log: _TimedLog | None = None
        self.loop = asyncio.get_running_loop()
        self.writer = _Writer(self.loop, self._write, self._on_batch_done)
        self.pending: collections.deque[tuple[_Entry, int]] = collections.deque()  # (entry, records already batched)
        self.pending_count = 0
        self.writer_busy = False
        self.flush_scheduled = False
        self.sessions: set[Session] = set()
        self.listeners: dict[str, asyncio.AbstractServer] = {}
        self.draining = False
        self.tick = 0
        self.log_ok = True  # the last batch (if any) was made durable
        self.recovered = True
        self.requests_since_snapshot = 0
        self.snapshot_every_requests = getattr(getattr(config, "durability", None), "snapshot_interval_requests", 0)
        self._idle = asyncio.Event()
        self._idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._unavailable = (Unavailable,)
        self.security: Any = None  # authcore.security.Security; None = open local mode

    # -- listeners ---------------------------------------------------------
    async def listen(self, name: str, factory: Callable[[], asyncio.Protocol], host: str, port: int) -> int:
        srv = await self.loop.create_server(factory, host, port, backlog=1024)
        self.listeners[name] = srv
        bound = srv.sockets[0].getsockname()[1]
        log.info("listening: %s on %s:%d", name, host, bound)
        return bound

    def start_timer(self) -> None:
        self._timer = self.loop.call_later(timer_interval_seconds, self._on_tick)

    def _on_tick(self) -> None:
        self.tick += 1
        for s in list(self.sessions):
            s._check_timeouts(self.tick)
        self._timer = self.loop.call_later(timer_interval_seconds, self._on_tick)

    def ready(self) -> bool:
        ok = getattr(self.storage, "writable", True) if self.storage is not None else True
        return self.recovered and self.log_ok and bool(ok) and not self.draining

    # -- sessions ----------------------------------------------------------
    def _session_opened(self, s: Session) -> bool:
        if len(self.sessions) >= self.limits.connections_max:
            self.metrics.connections_refused.labels(s.protocol_name).inc()
            log.warning("refusing %s connection: %d open", s.protocol_name, len(self.sessions))
            return False
        self.sessions.add(s)
        self.metrics.connections.labels(s.protocol_name).inc()
        return True

    def _session_closed(self, s: Session) -> None:
        if s in self.sessions:
            self.sessions.remove(s)
            self.metrics.connections.labels(s.protocol_name).dec()

    # -- batching ----------------------------------------------------------
    def _enqueue(self, entry: _Entry) -> None:
        self.pending.append((entry, 0))
        self.pending_count += entry.n
        self._idle.clear()
        if not self.writer_busy and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand everything pending (up to batch_max) to the writer thread."""
        self.flush_scheduled = False
        if self.writer_busy or not self.pending:
            return
        room = self.limits.batch_max
        segments: list[tuple[_Entry, int, int, int]] = []  # entry, batch start, entry offset, count
        total = 0
        while self.pending and total < room:
            entry, offset = self.pending[0]
            take = min(entry.n - offset, room - total)
            segments.append((entry, total, offset, take))
            total += take
            if offset + take == entry.n:
                self.pending.popleft()
            else:
                self.pending[0] = (entry, offset + take)
        self.pending_count -= total
        assert total > 0 and self.pending_count >= 0
        first = segments[0]
        if len(segments) == 1 and first[2] == 0 and first[3] == first[0].n and first[0].prepare is None:
            batch = first[0].requests  # the common binary case: no copy
        else:
            batch = np.empty(total, REQUEST_DTYPE)
            for entry, start, offset, count in segments:
                batch[start : start + count] = entry.requests[offset : offset + count]
        prepares = [(e.prepare, s, c) for e, s, _o, c in segments if e.prepare is not None]
        self.writer_busy = True
        self.writer.submit(batch, prepares, segments)

    def _write(self, batch: np.ndarray, prepares: list) -> tuple[np.ndarray | None, float, float]:
        """Writer thread: prepare hooks, then log + decide the batch."""
        for prepare, start, count in prepares:
            prepare(self.engine, batch[start : start + count])
        tl = self.timed_log
        if tl is not None:
            tl.last_seconds = -1.0
        t0 = time.perf_counter()
        grown_before = getattr(self.engine, "growth_seconds", 0.0)
        try:
            answers = self.engine.submit(batch)
        except self._unavailable as e:
            log.error("batch of %d answered unavailable: %s", len(batch), e)
            return None, time.perf_counter() - t0, -1.0
        except Exception:
            # A bug or an unexpected I/O error: fail closed, never acknowledge.
            log.exception("engine.submit failed; batch of %d answered unavailable", len(batch))
            return None, time.perf_counter() - t0, -1.0
        elapsed = time.perf_counter() - t0
        grown = getattr(self.engine, "growth_seconds", 0.0) - grown_before
        if grown > 0.0:
            self.metrics.growth_seconds.inc(grown)
        assert len(answers) == len(batch), (len(answers), len(batch))
        self.requests_since_snapshot += len(batch)
        if self.snapshot_every_requests and self.requests_since_snapshot >= self.snapshot_every_requests:
            self.requests_since_snapshot = 0
            self._snapshot()
        return answers, elapsed, (tl.last_seconds if tl is not None else -1.0)

    def _snapshot(self) -> None:
        """Writer thread, between batches: the engine state is quiescent."""
        if self.storage is None or not hasattr(self.storage, "snapshot"):
            return
        try:
            self.storage.snapshot(self.engine, background=True)
        except Exception:
            log.exception("snapshot failed (the log still holds everything)")

    def _on_batch_done(self, batch: np.ndarray, segments: list, result: Any) -> None:
        self.writer_busy = False
        if isinstance(result, BaseException):  # a prepare hook or a bug: still answer, fail closed
            log.error("writer failed; batch of %d answered unavailable", len(batch), exc_info=result)
            answers, submit_s, sync_s = None, 0.0, -1.0
        else:
            answers, submit_s, sync_s = result
        if answers is None:
            self.log_ok = False
            self.metrics.unavailable_batches.inc()
            answers = unavailable_answers(batch)
        else:
            self.log_ok = True
        self.metrics.observe_batch(batch["op"], answers["status"], submit_s, sync_s)
        # Start the next batch before encoding this one's answers: the writer
        # thread works while the loop encodes and writes.
        if self.pending:
            self._flush()
        for entry, start, offset, count in segments:
            entry.session._deliver(entry, offset, answers[start : start + count])
        if not self.pending and not self.writer_busy:
            self._idle.set()

    # -- drain -------------------------------------------------------------
    async def drain(self) -> None:
        """Stop accepting, answer what was read, flush answers, stop the writer."""
        self.draining = True
        for srv in self.listeners.values():
            srv.close()
        for s in list(self.sessions):
            s.start_draining()
        await self._idle.wait()
        deadline = self.loop.time() + drain_timeout_seconds
        while self.sessions and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for s in list(self.sessions):
            if s.transport is not None:
                s.transport.abort()
        if self._timer is not None:
            self._timer.cancel()
        self.writer.shutdown()
        if self.security is not None:
            self.security.close()


# --- serve ----------------------------------------------------------------


class Running:
    """A started server: its ports, and ``stop()`` to drain it."""

    def __init__(self, server: Server, ports: dict[str, int], storage: Any, metrics_server: asyncio.AbstractServer):
        self.server = server
        self.ports = ports
        self.storage = storage
        self.metrics_server = metrics_server
        self.stopped = asyncio.Event()

    async def stop(self) -> None:
        if self.stopped.is_set():
            return
        await self.server.drain()
        if self.storage is not None:
            try:
                sync = getattr(self.storage, "sync", None)
                if sync is not None:
                    sync()
            finally:
                self.storage.close()
        self.metrics_server.close()
        log.info("stopped")
        self.stopped.set()


def _iso_factory(server: Server) -> Callable[[], asyncio.Protocol] | None:
    try:
        from .protocols.iso8583 import make_iso_protocol
    except ImportError as e:
        log.warning("ISO 8583 listener skipped: %s", e)
        return None
    return make_iso_protocol(server)


async def start_engine(
    engine: Any,
    config: Any,
    *,
    host: str = default_host,
    ports: dict[str, int] | None = None,
    storage: Any = None,
    metrics: Any = None,
    metrics_server: asyncio.AbstractServer | None = None,
    readiness: "_Readiness | None" = None,
) -> Running:
    """Put an engine (recovered, or in-memory without storage) on the network."""
    from .metrics import Metrics, start_metrics_server
    from .protocols.binary import BinarySession
    from .protocols.json_lines import JsonLinesSession

    want = dict(default_ports)
    want.update(ports or {})
    metrics = metrics if metrics is not None else Metrics()
    from .security import Security, metrics_tls_context

    server = Server(engine, config, hasher=engine.hasher, metrics=metrics, storage=storage)
    if storage is not None:
        server.timed_log = _TimedLog(storage)
        engine.attach_log(server.timed_log)
    bound: dict[str, int | None] = {}
    try:
        server.security = Security.from_config(config, metrics)  # reads certificates and key files: may raise
        if server.security is None:
            log.info("security: open local mode: no TLS, no client identities, no rate limits; every client may call every operation")
        else:
            log.info("security: %s", server.security.describe())
        if metrics_server is None:
            metrics_server = await start_metrics_server(
                metrics, server.ready, host, want["metrics"], ssl=metrics_tls_context(config)
            )
        if readiness is not None:
            readiness.server = server
        bound["metrics"] = metrics_server.sockets[0].getsockname()[1]
        bound["binary"] = await server.listen("binary", lambda: BinarySession(server), host, want["binary"])
        bound["json"] = await server.listen("json", lambda: JsonLinesSession(server), host, want["json"])
        iso = _iso_factory(server)
        bound["iso8583"] = await server.listen("iso8583", iso, host, want["iso8583"]) if iso is not None else None
    except BaseException:
        for listener in server.listeners.values():
            listener.close()
        if metrics_server is not None:
            metrics_server.close()
        if server.security is not None:
            server.security.close()
        server.writer.shutdown()
        raise
    server.start_timer()
    order = ("binary", "json", "iso8583", "metrics")
    return Running(server, {k: bound[k] for k in order}, storage, metrics_server)


class _Readiness:
    """/ready before the server exists: the metrics listener starts before
    recovery (so /health answers and /ready says 503 while the log replays)."""

    def __init__(self) -> None:
        self.server: Server | None = None

    def __call__(self) -> bool:
        return self.server is not None and self.server.ready()


async def start(
    data_dir: str | os.PathLike,
    config: Any,
    *,
    host: str = default_host,
    ports: dict[str, int] | None = None,
    truncate_corrupt: bool = False,
) -> Running:
    """Open storage, recover, listen on every port; returns once serving."""
    from .cards import load_or_create_key
    from .engine import Engine
    from .metrics import Metrics, start_metrics_server
    from .storage import Storage

    want = dict(default_ports)
    want.update(ports or {})
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    # A key is generated only for the default path of a data dir with no log.
    fresh = not config.engine.pan_key_file and not any((data / "wal").glob("*"))
    key = load_or_create_key(config.engine.pan_key_file or str(data / pan_key_name), may_create=fresh)
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    readiness = _Readiness()
    from .security import metrics_tls_context

    metrics_server = await start_metrics_server(metrics, readiness, host, want["metrics"], ssl=metrics_tls_context(config))

    def open_and_recover():
        storage = Storage.open(data, config, truncate_corrupt=truncate_corrupt)
        try:
            engine = Engine(config, pan_key=key, presize=True)
            report = storage.recover(engine)
            if config.engine.prefault:
                engine.prefault()
        except BaseException:
            storage.close()
            raise
        return storage, engine, report

    t0 = time.perf_counter()
    try:
        storage, engine, report = await loop.run_in_executor(None, open_and_recover)
    except BaseException:
        metrics_server.close()
        raise
    log.info("recovered in %.3f s; last stamp %d", time.perf_counter() - t0, engine.last_stamp)
    summary = report.to_dict() if hasattr(report, "to_dict") else None
    if summary:
        log.info("recovery: %s", orjson.dumps(summary, default=str).decode())
    if getattr(report, "tail_cut", False):
        log.warning("recovery cut a torn log tail: %s", orjson.dumps(summary.get("tail") if summary else None, default=str).decode())
    try:
        running = await start_engine(
            engine,
            config,
            host=host,
            ports=want,
            storage=storage,
            metrics=metrics,
            metrics_server=metrics_server,
            readiness=readiness,
        )
    except BaseException:
        storage.close()
        raise
    # The tail just replayed counts toward the next snapshot: a restart
    # must not double the replay a crash after it would need.
    running.server.requests_since_snapshot = getattr(report, "requests_replayed", 0)
    return running


async def serve(
    data_dir: str | os.PathLike,
    config: Any,
    *,
    host: str = default_host,
    ports: dict[str, int] | None = None,
    out=None,
    truncate_corrupt: bool = False,
) -> int:
    """``authcore serve``: run until SIGTERM/SIGINT, then drain; returns 0."""
    out = out if out is not None else sys.stdout
    sys.setswitchinterval(gil_switch_interval_seconds)  # process-wide: serve owns the process
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Installed before recovery, so a signal during it drains right after.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(data_dir, config, host=host, ports=ports, truncate_corrupt=truncate_corrupt)
    out.write(orjson.dumps({"listening": running.ports}).decode() + "\n")
    out.flush()
    await stop.wait()
    log.info("signal received: draining")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await running.stop()
    return 0


class ServerThread:
    """A server on its own event loop in a background thread.

    For embedding and for tests: ``ServerThread(engine=eng)`` serves an
    in-memory engine (no log); ``ServerThread(data_dir=d)`` opens storage
    and recovers as ``authcore serve`` does.  Ports default to 0 (free).
    """

    start_timeout_seconds = 60.0

    def __init__(self, *, engine: Any = None, config: Any = None, data_dir: Any = None, host: str = default_host,
                 ports: dict[str, int] | None = None):
        from .config import Config

        assert (engine is None) != (data_dir is None), "give an engine or a data directory"
        self.engine = engine
        self.config = config if config is not None else (getattr(engine, "config", None) or Config.default())
        self.data_dir = data_dir
        self.host = host
        self.want_ports = {k: 0 for k in default_ports} | (ports or {})
        self.running: Running | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: Any = None
        self._error: BaseException | None = None

    @property
    def ports(self) -> dict[str, int]:
        assert self.running is not None
        return self.running.ports

    @property
    def server(self) -> Server:
        assert self.running is not None
        return self.running.server

    def start(self) -> "ServerThread":
        import threading

        import uvloop

        started = threading.Event()

        async def main() -> None:
            try:
                if self.engine is not None:
                    self.running = await start_engine(self.engine, self.config, host=self.host, ports=self.want_ports)
                else:
                    self.running = await start(self.data_dir, self.config, host=self.host, ports=self.want_ports)
            except BaseException as e:
                self._error = e
                started.set()
                return
            started.set()
            await self.running.stopped.wait()

        def run() -> None:
            self.loop = uvloop.new_event_loop()
            try:
                self.loop.run_until_complete(main())
            finally:
                self.loop.close()

        self._thread = threading.Thread(target=run, name="authcore-server", daemon=True)
        self._thread.start()
        if not started.wait(self.start_timeout_seconds):
            raise RuntimeError("server did not start")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's loop thread and return its result."""
        assert self.loop is not None
        fut = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(self.start_timeout_seconds)

    def stop(self) -> None:
        if self.running is None or self.loop is None or self._thread is None:
            return
        if not self.running.stopped.is_set():
            asyncio.run_coroutine_threadsafe(self.running.stop(), self.loop).result(self.start_timeout_seconds)
        self._thread.join(self.start_timeout_seconds)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
