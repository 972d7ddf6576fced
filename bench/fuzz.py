"""Fuzzing the parsers: JSON lines, binary frames, ISO 8583 and the log reader.

Goals (issue 7): garbage never crashes, hangs or grows the server.  Each
target feeds bytes to the real protocol session (``feed``, as the event
loop would, in chunks whose sizes come from the input), decides whatever
parses on a real in-memory engine, and checks invariants:

- no exception escapes ``feed`` (in the server one would cost the
  connection; here it is a finding);
- the session's buffer stays under its limit (line, frame, ISO frame);
- every byte written back is well-formed for the protocol (JSON objects per
  line, frames with the magic, length-prefixed ISO messages);
- the log reader (``scan_log``/``read_records``) on a mutated valid log
  either reads or raises ``CorruptLog``, and with ``truncate_corrupt`` never
  raises.

Engines: atheris (coverage-guided on the Python code; the Cython ISO codec
and kernel are not instrumented, so for them it is a fast mutational fuzzer
seeded with valid messages) when installed, else a seeded random mutator.
tests/test_fuzz.py runs every target for a couple of seconds in CI (and
hypothesis over the same targets); the long run is this script:

    python bench/fuzz.py all --seconds 600            # each target, atheris if installed
    python bench/fuzz.py iso8583 --seconds 3600 -- -max_len=8192   # libFuzzer flags after --
    python bench/fuzz.py json --engine random --seconds 60

It prints one JSON line per target: executions, seconds, peak RSS, and the
first failing input (hex) if any.  Non-goals: sanitizer builds of the
Cython extensions, network-level fuzzing (the session is driven directly).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from authcore import constants as C  # noqa: E402
from authcore.config import Config  # noqa: E402

PAN_KEY = b"authcore-fuzz-pan-key-32-bytes!!"
line_bytes_max = 4096  # small limits so oversize paths are reached quickly
frame_bytes_max = 64 * 64
engine_reset_every = 20_000  # executions; the engine's tables grow with opened accounts
chunk_count_max = 8  # an input is fed in at most this many reads
TARGETS = ("json", "binary", "iso8583", "log")


class Finding(AssertionError):
    """An invariant broke: the input that did it is a bug report."""


# --- a server and transport that do nothing but record --------------------------


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    def call_later(self, _delay: float, _fn: Callable, *_a: Any) -> _Handle:
        return _Handle()

    def time(self) -> float:
        return time.monotonic()


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return default


class FakeServer:
    """What a Session needs of authcore.server.Server, deciding synchronously."""

    def __init__(self) -> None:
        from authcore.cards import PanHasher
        from authcore.engine import Engine
        from authcore.metrics import Metrics

        cfg = Config.default()
        self.config = cfg.replace(server=cfg.server.__class__(line_bytes_max=line_bytes_max, frame_bytes_max=frame_bytes_max))
        self.limits = self.config.server
        self.engine = Engine(self.config, pan_key=PAN_KEY)
        self.hasher = getattr(self.engine, "hasher", None) or PanHasher(PAN_KEY)
        self.metrics = Metrics()
        self.security = None
        self.loop = _Loop()
        self.tick = 0
        self.draining = False
        self.sessions: set = set()
        self.runs = 0

    def _session_opened(self, s: Any) -> bool:
        self.sessions.add(s)
        return True

    def _session_closed(self, s: Any) -> None:
        self.sessions.discard(s)

    def _enqueue(self, entry: Any) -> None:
        reqs = entry.requests
        if entry.prepare is not None:
            reqs = reqs.copy()
            entry.prepare(self.engine, reqs)
        answers = self.engine.submit(reqs)
        if len(answers) != len(reqs):
            raise Finding(f"engine answered {len(answers)} of {len(reqs)}")
        entry.session._deliver(entry, 0, answers)


_server: FakeServer | None = None


def server() -> FakeServer:
    global _server
    if _server is None or _server.runs >= engine_reset_every:
        _server = FakeServer()
    _server.runs += 1
    return _server


def _chunks(data: bytes) -> list[bytes]:
    """Split the input into reads; the first byte picks the cut points."""
    if len(data) < 2:
        return [data]
    rng = random.Random(data[0])
    body = data[1:]
    cuts = sorted(rng.randrange(len(body) + 1) for _ in range(rng.randrange(chunk_count_max)))
    out, prev = [], 0
    for c in cuts + [len(body)]:
        out.append(body[prev:c])
        prev = c
    return [c for c in out if c]


def _drive(session: Any, data: bytes, buf_max: int) -> FakeTransport:
    from authcore.server import SessionState

    t = FakeTransport()
    session.connection_made(t)
    for chunk in _chunks(data):
        if session.state != SessionState.open:
            break
        session.feed(chunk)  # an exception here is a finding
        if session.has_partial() and len(session.buf) > buf_max:
            raise Finding(f"{session.protocol_name} buffer {len(session.buf)} > {buf_max}")
    session.connection_lost(None)
    return t


# --- targets -----------------------------------------------------------------------------


def fuzz_json(data: bytes) -> None:
    from authcore.protocols.json_lines import JsonLinesSession

    t = _drive(JsonLinesSession(server()), data, line_bytes_max)
    statuses = {s.name for s in C.Status}
    for line in bytes(t.out).splitlines():
        obj = orjson.loads(line)
        if type(obj) is not dict or obj.get("status") not in statuses:
            raise Finding(f"bad answer line {line[:200]!r}")


def fuzz_binary(data: bytes) -> None:
    from authcore.protocols import binary as wire

    t = _drive(wire.BinarySession(server()), data, wire.header_size + frame_bytes_max)
    out, pos = bytes(t.out), 0
    while pos < len(out):
        magic, ftype, _f, length, _tag = wire.HEADER.unpack_from(out, pos)
        if magic != wire.MAGIC or ftype not in (wire.FrameType.hello_ok, wire.FrameType.answers, wire.FrameType.error):
            raise Finding(f"bad frame out at {pos}: magic {magic:#x} type {ftype}")
        if ftype == wire.FrameType.answers and length % C.answer_size:
            raise Finding("answer frame not a multiple of 64")
        pos += wire.header_size + length
    if pos != len(out):
        raise Finding("truncated frame out")


def fuzz_iso(data: bytes) -> None:
    from authcore.protocols.iso8583 import IsoSession, frame_header_size, frame_payload_max

    t = _drive(IsoSession(server()), data, frame_header_size + frame_payload_max)
    out, pos = bytes(t.out), 0
    while pos + 2 <= len(out):
        n = int.from_bytes(out[pos : pos + 2], "big")
        msg = out[pos + 2 : pos + 2 + n]
        if len(msg) != n or not msg[:4].isdigit() or int(msg[2:3]) % 2 != 1:  # a response MTI: odd third digit
            raise Finding(f"bad ISO answer at {pos}: {msg[:8]!r}")
        pos += 2 + n
    if pos != len(out):
        raise Finding("truncated ISO frame out")


_template: bytes | None = None
_log_dir: str | None = None


def _log_template() -> bytes:
    """A small valid log (config record + batches), as one segment's bytes."""
    global _template, _log_dir
    if _template is None:
        from authcore.wal import Wal, list_segments

        d = tempfile.mkdtemp(prefix="authcore-fuzz-log-")
        w = Wal.open(d, sync="none", segment_bytes=1 << 16)
        w.append_config(orjson.dumps(Config.default().decision_dict()))
        stamp = 1_000_000
        for n in (1, 3, 2):
            reqs = np.zeros(n, C.REQUEST_DTYPE)
            reqs["id"] = np.arange(stamp, stamp + n)
            reqs["op"] = int(C.Op.query)
            w.append_batch(stamp, reqs)
            stamp += n
        w.close()
        (_seq, path) = list_segments(d)[0]
        raw = Path(path).read_bytes()
        end = len(raw.rstrip(b"\0"))
        _template = raw[: ((end + 63) // 64) * 64 + 128]
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        _log_dir = d
    return _template


def fuzz_log(data: bytes) -> None:
    """Mutate a valid log: (offset u16, xor u8) triples, then maybe a cut."""
    from authcore.wal import CorruptLog, read_records, scan_log, segment_name

    raw = bytearray(_log_template())
    body = data[1:] if data else b""
    for i in range(0, len(body) - 2, 3):
        off = int.from_bytes(body[i : i + 2], "little") % len(raw)
        raw[off] ^= body[i + 2] or 1
    if data and data[0] & 1:
        raw = raw[: (data[0] * 7) % len(raw)]
    assert _log_dir is not None
    path = os.path.join(_log_dir, segment_name(1))
    with open(path, "wb") as f:
        f.write(raw)
    try:
        try:
            scan_log(_log_dir)
            for _r in read_records(_log_dir):
                pass
        except CorruptLog:
            pass
        scan_log(_log_dir, truncate_corrupt=True)  # must never raise
        for _r in read_records(_log_dir, truncate_corrupt=True):
            pass
    finally:
        os.unlink(path)


FUNCS: dict[str, Callable[[bytes], None]] = {"json": fuzz_json, "binary": fuzz_binary, "iso8583": fuzz_iso, "log": fuzz_log}


# --- seeds ---------------------------------------------------------------------------------


def seeds(target: str) -> list[bytes]:
    """Valid inputs to mutate (the first byte of each is the chunking seed)."""
    if target == "json":
        lines = [
            {"op": "open", "id": 1, "account": 1, "currency": 978, "credit_limit": 1000},
            {"op": "deposit", "id": 2, "account": 1, "amount": 500},
            {"op": "authorize", "id": 3, "account": 1, "amount": 100, "currency": 978, "merchant": 9, "allow_partial": True},
            {"op": "capture", "id": 4, "auth": 3, "amount": 50},
            {"op": "issue_card", "id": 5, "account": 1, "pan": "4111111111111111"},
            {"op": "query", "account": 1},
            {"op": "transfer", "id": 6, "account": 1, "to": 2, "amount": 1},
        ]
        body = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        return [b"\x01" + body, b"\x07" + body + b"\n\r\n{" + b"x" * 5000 + b"\n" + body]
    if target == "binary":
        from authcore.client import records_from_dicts
        from authcore.protocols import binary as wire

        recs = records_from_dicts([
            {"op": "open", "id": 1, "account": 1, "currency": 978},
            {"op": "deposit", "id": 2, "account": 1, "amount": 500},
            {"op": "authorize", "id": 3, "account": 1, "amount": 100, "currency": 978, "merchant": 9},
            {"op": "issue_card", "id": 4, "account": 1, "pan": "4111111111111111"},
        ])  # fmt: skip
        body = wire.hello_frame() + wire.frame(wire.FrameType.requests, recs.tobytes(), 7)
        return [b"\x02" + body, b"\x05" + body + wire.frame(wire.FrameType.requests, recs[:1].tobytes(), 8)]
    if target == "iso8583":
        import iso8583
        from iso8583.specs import default_ascii

        def msg(doc: dict) -> bytes:
            raw, _ = iso8583.encode(doc, default_ascii)
            return len(raw).to_bytes(2, "big") + bytes(raw)

        base = {"2": "4111111111111111", "3": "000000", "4": "000000001000", "7": "1124120000", "11": "000001",
                "18": "5411", "19": "840", "22": "051", "37": "000000000001", "41": "TERM0001",
                "42": "000000000000042", "49": "840"}  # fmt: skip
        body = (msg({"t": "0100", **base}) + msg({"t": "0200", **base, "11": "000002", "37": "000000000002"})
                + msg({"t": "0800", "11": "000003", "70": "301"}) + msg({"t": "0220", **base})
                + msg({"t": "0400", **base}))  # fmt: skip
        return [b"\x03" + body]
    if target == "log":
        return [b"\x00", b"\x00" + bytes([0x30, 0x00, 0x01]), b"\x00" + bytes([0x44, 0x00, 0xFF])]
    raise ValueError(target)


# --- engines ---------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One random edit: flip, set, insert, delete, duplicate, splice."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        k = rng.randrange(7)
        if not b:
            b += rng.randbytes(rng.randrange(1, 16))
        i = rng.randrange(len(b))
        if k == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif k == 1:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, ord("\n"), ord("{"), ord('"'), ord("9"), rng.randrange(256)))
        elif k == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 32))
        elif k == 3:
            del b[i : i + rng.randrange(1, 64)]
        elif k == 4:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randrange(1, 256)]
        elif k == 5:
            other = rng.choice(pool)
            j = rng.randrange(len(other) or 1)
            b[i:] = other[j:]
        else:
            b[i : i + 8] = rng.randrange(1 << 64).to_bytes(8, "little")  # a wild integer
    return bytes(b[:1 << 16])


def run_random(target: str, seconds: float, seed: int = 0, max_runs: int | None = None) -> dict:
    """Seeded mutational fuzzing; raises Finding (with the input) on failure."""
    fn = FUNCS[target]
    rng = random.Random(seed)
    pool = seeds(target)
    for s in pool:
        fn(s)
    t0 = time.perf_counter()
    runs = 0
    while time.perf_counter() - t0 < seconds and (max_runs is None or runs < max_runs):
        data = mutate(rng, rng.choice(pool), pool)
        try:
            fn(data)
        except Exception as e:
            raise Finding(f"{target}: {type(e).__name__}: {e}; input {data.hex()}") from e
        runs += 1
        if runs % 64 == 0 and len(pool) < 256:
            pool.append(data)  # keep some mutants: deeper edits over time
    return {"target": target, "engine": "random", "runs": runs, "seconds": round(time.perf_counter() - t0, 2),
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip


def run_atheris(target: str, seconds: float, extra: list[str]) -> None:
    """Coverage-guided; never returns (libFuzzer exits the process)."""
    import atheris

    with atheris.instrument_imports(include=["authcore"]):
        import authcore.protocols.binary  # noqa: F401
        import authcore.protocols.iso8583  # noqa: F401
        import authcore.protocols.json_lines  # noqa: F401
        import authcore.records  # noqa: F401
        import authcore.wal  # noqa: F401
    corpus = tempfile.mkdtemp(prefix=f"authcore-fuzz-{target}-")
    for i, s in enumerate(seeds(target)):
        Path(corpus, f"seed{i}").write_bytes(s)
    fn = FUNCS[target]
    args = [sys.argv[0], f"-max_total_time={int(seconds)}", "-rss_limit_mb=2048", "-timeout=10", "-max_len=16384",
            *extra, corpus]  # fmt: skip
    atheris.Setup(args, fn)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=(*TARGETS, "all"))
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("extra", nargs="*", help="libFuzzer flags (after --)")
    a = p.parse_args(argv)
    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    targets = TARGETS if a.target == "all" else (a.target,)
    if engine == "atheris" and len(targets) > 1:  # libFuzzer owns its process: one child per target
        rc = 0
        for t in targets:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, t, "--seconds", str(a.seconds), "--engine", "atheris", "--", *a.extra])
            print(orjson.dumps({"target": t, "engine": "atheris", "exit": r.returncode,
                                "seconds": round(time.perf_counter() - t0, 1)}).decode(), flush=True)  # fmt: skip
            rc = rc or r.returncode
        return rc
    if engine == "atheris":
        run_atheris(targets[0], a.seconds, a.extra)
        return 0
    rc = 0
    for t in targets:
        try:
            print(orjson.dumps(run_random(t, a.seconds, a.seed)).decode(), flush=True)
        except Finding as e:
            print(orjson.dumps({"target": t, "engine": "random", "finding": str(e)[:4000]}).decode(), flush=True)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
