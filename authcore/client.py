"""Python clients for the JSON lines and binary protocols.

Goals: a blocking ``Client`` and an asyncio ``AsyncClient`` with the same
surface: single calls (``request(dict)``, ``authorize(...)`` and the other
operations), pipelined batches (``batch(list_of_dicts)``, and for binary
``submit(np.ndarray)`` returning the ANSWER_DTYPE array), and
reconnect-and-retry: when the connection breaks, the requests whose answers
did not arrive are sent again on a new connection with the same ids, which
is safe because a repeated id returns the first answer (SPEC §1).

TLS and identities (docs/security.md): ``tls=`` an ``ssl.SSLContext``
(``authcore.security.client_tls_context(ca, cert, key)`` makes one, with a
client certificate for mutual TLS); ``api_key=`` is sent first on every
connection (JSON: an auth line; binary: after the hello) when the server
identifies clients by key.

Non-goals: connection pools, load generation (``authcore bench``), ISO 8583
(pyiso8583 is the client for that).  Queries carry no id; retrying them is
harmless.  Requests answered ``unavailable`` are returned, not retried: the
caller decides (the same id may be sent again later).
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from .constants import ANSWER_DTYPE, REQUEST_DTYPE, request_size
from .protocols import binary as wire

connect_timeout_seconds = 5.0
io_timeout_seconds = 30.0  # no byte moved for this long: the connection is dead
retries_default = 3  # reconnect attempts per call before giving up
retry_delay_seconds = 0.05  # first backoff; doubles per attempt
recv_bytes = 1 << 20  # read size; also the write slice of one send()
frame_records_default = 8192  # records per binary frame the client sends

_OPS = (
    "open", "deposit", "withdraw", "authorize", "increment", "capture", "void", "refund", "purchase",
    "transfer", "set_limits", "freeze", "unfreeze", "close", "issue_card", "query",
)  # fmt: skip


class ProtocolError(Exception):
    """The server refused a frame (binary error frame) or broke the protocol."""

    def __init__(self, message: str, code: int = 0, record: int = wire.NO_RECORD):
        super().__init__(message)
        self.code = code
        self.record = record


class _AsciiPan:
    """Client-side 'hasher' for the binary protocol: the PAN travels as ASCII
    digits in the record's hash field; the server replaces it by its HMAC."""

    @staticmethod
    def digest(pan: str) -> bytes:
        return wire.pan_to_field(pan)


def records_from_dicts(reqs: Sequence[dict]) -> np.ndarray:
    """JSON-lines request objects -> REQUEST_DTYPE records for the binary wire."""
    from .records import request_tuple

    hasher = _AsciiPan()
    return np.array([request_tuple(r, hasher) for r in reqs], REQUEST_DTYPE)


# --- decoders: bytes in, responses out ---------------------------------------


class _LineDecoder:
    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        data = self.buf + data if self.buf else data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        return lines


class _FrameDecoder:
    """Yields (type, tag, payload) of each complete frame."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= wire.header_size:
            magic, ftype, _flags, length, tag = wire.HEADER.unpack_from(buf, pos)
            if magic != wire.MAGIC:
                raise ProtocolError(f"bad frame magic from server: {magic:#06x}")
            end = pos + wire.header_size + length
            if len(buf) < end:
                break
            out.append((ftype, tag, bytes(buf[pos + wire.header_size : end])))
            pos = end
        del buf[:pos]
        return out


def _frame_answers(resp: tuple[int, int, bytes]) -> np.ndarray:
    ftype, _tag, payload = resp
    if ftype == wire.FrameType.error:
        code, record, msg = wire.parse_error(payload)
        raise ProtocolError(msg, code, record)
    if ftype != wire.FrameType.answers:
        raise ProtocolError(f"unexpected frame type {ftype}")
    return np.frombuffer(payload, ANSWER_DTYPE)


def _json_answer(line: bytes) -> dict:
    return orjson.loads(line)


class _Base:
    """What both clients share: encoding requests into units of exchange."""

    def __init__(self, host: str, port: int, protocol: str, retries: int, timeout: float,
                 tls: ssl.SSLContext | None = None, api_key: str | None = None):  # fmt: skip
        if protocol not in ("json", "binary"):
            raise ValueError(f'protocol must be "json" or "binary", not {protocol!r}')
        self.host = host
        self.port = port
        self.protocol = protocol
        self.retries = retries
        self.timeout = timeout
        self.frame_records = frame_records_default
        self.server_limits: dict[str, int] = {}
        self._tag = 0
        self.tls = tls
        self.api_key = api_key
        self.client_name: str | None = None  # what the server called us after an API key

    def _greeting(self) -> tuple[list[bytes], Any]:
        """Units sent first on a new connection, and their decoder."""
        if self.protocol == "binary":
            key = self.api_key.encode() if self.api_key else b""
            return [wire.frame(wire.FrameType.hello, wire.HELLO.pack(wire.PROTOCOL_ID, wire.VERSION, 0, 0) + key)], _FrameDecoder()
        if self.api_key:
            return [orjson.dumps({"op": "auth", "api_key": self.api_key}, option=orjson.OPT_APPEND_NEWLINE)], _LineDecoder()
        return [], None

    def _greeted(self, resp: Any) -> None:
        if self.protocol == "binary":
            self._hello_ok(resp)
            return
        ans = orjson.loads(resp)
        if ans.get("status") != "approved":
            raise ProtocolError(ans.get("error", "authentication refused"), 57)
        self.client_name = ans.get("client")

    # unit of exchange: JSON = one line per request; binary = one frame per chunk
    def _json_units(self, reqs: Sequence[dict]) -> list[bytes]:
        opt = orjson.OPT_APPEND_NEWLINE
        return [orjson.dumps(r, option=opt) for r in reqs]

    def _frame_units(self, records: np.ndarray) -> list[bytes]:
        assert records.dtype == REQUEST_DTYPE
        units = []
        step = max(1, self.frame_records)
        for lo in range(0, len(records), step):
            self._tag = (self._tag + 1) & 0xFFFFFFFFFFFFFFFF
            units.append(wire.frame(wire.FrameType.requests, records[lo : lo + step].tobytes(), self._tag))
        return units

    def _decoder(self):
        return _LineDecoder() if self.protocol == "json" else _FrameDecoder()

    def _hello_ok(self, resp: tuple[int, int, bytes]) -> None:
        ftype, _tag, payload = resp
        if ftype == wire.FrameType.error:
            code, record, msg = wire.parse_error(payload)
            raise ProtocolError(msg, code, record)
        if ftype != wire.FrameType.hello_ok or len(payload) < wire.HELLO_OK.size:
            raise ProtocolError(f"expected hello_ok, got frame type {ftype}")
        pid, version, _f, rsz, asz, fmax, inflight, batch, _r = wire.HELLO_OK.unpack_from(payload)
        if pid != wire.PROTOCOL_ID or version != wire.VERSION or rsz != request_size or asz != ANSWER_DTYPE.itemsize:
            raise ProtocolError(f"server speaks version {version} with records {rsz}/{asz} bytes")
        self.server_limits = {"frame_bytes_max": fmax, "inflight_max": inflight, "batch_max": batch}
        self.frame_records = max(1, min(frame_records_default, fmax // request_size, batch))


def _make_op_method(op: str, is_async: bool):
    if is_async:

        async def call(self, **fields: Any) -> dict:
            return await self.request({"op": op, **fields})

    else:

        def call(self, **fields: Any) -> dict:
            return self.request({"op": op, **fields})

    call.__name__ = _METHOD_NAMES.get(op, op)
    call.__doc__ = f"One ``{op}`` request (fields as in SPEC §3, without ``op``); returns the answer dict."
    return call


class Client(_Base):
    """Blocking client.  ``Client(host, port, protocol="json"|"binary")``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7401,
        protocol: str = "json",
        *,
        retries: int = retries_default,
        timeout: float = io_timeout_seconds,
        connect: bool = True,
        tls: ssl.SSLContext | None = None,
        api_key: str | None = None,
    ):
        super().__init__(host, port, protocol, retries, timeout, tls, api_key)
        self.sock: socket.socket | None = None
        self.reconnects = 0
        if connect:
            self.connect()

    def connect(self) -> None:
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=connect_timeout_seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)  # handshake, blocking with the timeout
            except BaseException:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        units, decoder = self._greeting()
        if units:
            try:
                self._greeted(self._pump(units, decoder)[0])
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _pump(self, units: list[bytes], decoder, got: list | None = None) -> list:
        """Send every unit while reading; appends one response per unit to ``got``."""
        sock = self.sock
        if sock is None:
            raise ConnectionError("not connected")
        out = memoryview(b"".join(units))
        sent = 0
        got = [] if got is None else got
        want = len(got) + len(units)
        pending = getattr(sock, "pending", None)
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
            writing = bool(out)
            while len(got) < want:
                events = sel.select(self.timeout)
                if not events:
                    raise TimeoutError(f"no answer for {self.timeout} s")
                for _key, mask in events:
                    if mask & selectors.EVENT_WRITE:
                        try:
                            sent += sock.send(out[sent : sent + recv_bytes])
                        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                            pass
                        if sent == len(out):
                            writing = False
                            sel.modify(sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        try:
                            data = sock.recv(recv_bytes)
                            while pending is not None and pending():  # TLS: decrypted bytes the selector cannot see
                                data += sock.recv(recv_bytes)
                        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                            continue
                        if not data:
                            raise ConnectionError("server closed the connection")
                        got.extend(decoder.feed(data))
            assert not writing or len(got) >= want
        del got[want:]  # anything beyond is unsolicited (a server error before closing)
        return got

    def _exchange(self, units: list[bytes], decode) -> list:
        """Pipelined exchange with reconnect-and-retry of what was not answered."""
        done: list = []
        attempt = 0
        while True:
            try:
                if self.sock is None:
                    self.connect()
                # answers received before a break are kept in ``done``
                self._pump(units[len(done) :], self._decoder(), done)
                return [decode(r) for r in done]
            except (ConnectionError, TimeoutError, OSError) as e:
                self.close()
                attempt += 1
                if attempt > self.retries:
                    raise ConnectionError(f"gave up after {self.retries} reconnects: {e}") from e
                self.reconnects += 1
                time.sleep(retry_delay_seconds * (1 << (attempt - 1)))

    # -- public API ------------------------------------------------------------
    def request(self, req: dict) -> dict:
        return self.batch([req])[0]

    def batch(self, reqs: Sequence[dict]) -> list[dict]:
        """Pipeline many requests; answers in the same order."""
        if not reqs:
            return []
        if self.protocol == "json":
            return self._exchange(self._json_units(reqs), _json_answer)
        from .records import answers_to_json

        records = records_from_dicts(reqs)
        return answers_to_json(records, self.submit(records))

    def submit(self, records: np.ndarray) -> np.ndarray:
        """Binary only: a REQUEST_DTYPE array in, its ANSWER_DTYPE array out."""
        if self.protocol != "binary":
            raise ValueError("submit(np.ndarray) needs protocol='binary'")
        if len(records) == 0:
            return np.zeros(0, ANSWER_DTYPE)
        parts = self._exchange(self._frame_units(records), _frame_answers)
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


class AsyncClient(_Base):
    """asyncio client with the same surface as ``Client`` (methods are coroutines)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7401,
        protocol: str = "json",
        *,
        retries: int = retries_default,
        timeout: float = io_timeout_seconds,
        tls: ssl.SSLContext | None = None,
        api_key: str | None = None,
    ):
        super().__init__(host, port, protocol, retries, timeout, tls, api_key)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        await self.close()
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=recv_bytes, ssl=self.tls,
                                    server_hostname=self.host if self.tls is not None else None),
            connect_timeout_seconds,
        )  # fmt: skip
        units, decoder = self._greeting()
        if units:
            try:
                self._greeted((await self._pump(units, decoder))[0])
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        w = self.writer
        self.reader = self.writer = None
        if w is not None:
            w.close()
            try:
                await w.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _pump(self, units: list[bytes], decoder, got: list | None = None) -> list:
        reader, writer = self.reader, self.writer
        if reader is None or writer is None:
            raise ConnectionError("not connected")
        got = [] if got is None else got
        want = len(got) + len(units)

        async def send() -> None:
            for i in range(0, len(units), 1024):
                writer.write(b"".join(units[i : i + 1024]))
                await writer.drain()

        async def receive() -> list:
            while len(got) < want:
                data = await asyncio.wait_for(reader.read(recv_bytes), self.timeout)
                if not data:
                    raise ConnectionError("server closed the connection")
                got.extend(decoder.feed(data))
            del got[want:]
            return got

        sender = asyncio.ensure_future(send())
        try:
            await receive()
        finally:
            if not sender.done():
                sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, ConnectionError, OSError):
                pass
        return got

    async def _exchange(self, units: list[bytes], decode) -> list:
        async with self._lock:  # one pipelined exchange at a time keeps answers in order
            done: list = []
            attempt = 0
            while True:
                try:
                    if self.writer is None:
                        await self.connect()
                    await self._pump(units[len(done) :], self._decoder(), done)
                    return [decode(r) for r in done]
                except (ConnectionError, TimeoutError, asyncio.TimeoutError, OSError) as e:
                    await self.close()
                    attempt += 1
                    if attempt > self.retries:
                        raise ConnectionError(f"gave up after {self.retries} reconnects: {e}") from e
                    self.reconnects += 1
                    await asyncio.sleep(retry_delay_seconds * (1 << (attempt - 1)))

    async def request(self, req: dict) -> dict:
        return (await self.batch([req]))[0]

    async def batch(self, reqs: Sequence[dict]) -> list[dict]:
        if not reqs:
            return []
        if self.protocol == "json":
            return await self._exchange(self._json_units(reqs), _json_answer)
        from .records import answers_to_json

        records = records_from_dicts(reqs)
        return answers_to_json(records, await self.submit(records))

    async def submit(self, records: np.ndarray) -> np.ndarray:
        if self.protocol != "binary":
            raise ValueError("submit(np.ndarray) needs protocol='binary'")
        if len(records) == 0:
            return np.zeros(0, ANSWER_DTYPE)
        parts = await self._exchange(self._frame_units(records), _frame_answers)
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


# open/close would shadow the connection's own methods: open_account, close_account.
_METHOD_NAMES = {"open": "open_account", "close": "close_account"}
for _op in _OPS:
    setattr(Client, _METHOD_NAMES.get(_op, _op), _make_op_method(_op, False))
    setattr(AsyncClient, _METHOD_NAMES.get(_op, _op), _make_op_method(_op, True))
del _op
