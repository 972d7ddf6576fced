"""ISO 8583: codec cost per message, and authorisations/s through the listener.

Goals:
- ``codec``: the measurement that decided to write authcore's own codec:
  pyiso8583's decode and encode of one 0100/0110 against
  ``authcore.protocols._iso_codec`` (scan of a whole read, encode of its
  answers), per message, one core, no network.
- ``server``: the issue's target, >= 100,000 ISO 8583 authorisations/s over
  ONE pipelined connection with ``sync = "always"``: a real server
  (storage, write-ahead log, group commit) in this process, the gateway in
  a child process (its own core and GIL) keeping ``--window`` messages in
  flight.  Fraud scoring is off so that the answers do not depend on
  timing, and their digest is the same on every run with the same
  parameters.

Non-goals: a mix of message types (0100 is what gateways mostly send), many
connections (``authcore bench`` does that), latency under light load.

    python bench/iso8583_load.py codec --messages 20000
    python bench/iso8583_load.py server --messages 1000000 --window 32768

Small CI values: ``--messages 20000``.  The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# This file is named like pyiso8583's package: run as a script, its own
# directory must not shadow ``import iso8583``.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from authcore import constants as C  # noqa: E402
from authcore.cards import luhn_valid  # noqa: E402
from authcore.protocols import _iso_codec as codec  # noqa: E402

currency = 840
merchant_id = 900_001
card_base = 4_000_000_000_000_000  # card i: 16 digits (body 15 + Luhn digit)
account_base = 1_000_000
deposit_amount = 10**12  # no card runs out of money in a run
message_amount = 1234
seed_default = 8583
frame_header = 2
chunk_messages = 4096  # messages per sendall of the gateway


def card_pan(i: int) -> str:
    body = str(card_base + i * 10)[:15]
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError(body)


def template(pan: str) -> dict:
    return {
        "t": "0100",
        "2": pan,
        "3": "000000",
        "4": f"{message_amount:012d}",
        "7": "1124120000",
        "11": "000000",
        "18": "5411",
        "19": "840",
        "22": "051",
        "37": "000000000000",
        "41": "TERM0001",
        "42": f"{merchant_id:015d}",
        "49": "840",
    }


@functools.lru_cache(maxsize=2)
def pan_table(cards: int) -> np.ndarray:
    return np.array([np.frombuffer(card_pan(i).encode(), np.uint8) for i in range(cards)])


def messages(cards: int, first: int, n: int, seed: int) -> bytes:
    """Framed 0100s number first..first+n-1: a card drawn by seed, unique RRN."""
    rng = np.random.default_rng([seed, first])
    tmpl = codec.encode(template(card_pan(0)))
    size = len(tmpl)
    rows = np.empty((n, frame_header + size), np.uint8)
    rows[:, :frame_header] = np.frombuffer(size.to_bytes(2, "big"), np.uint8)
    rows[:, frame_header:] = np.frombuffer(tmpl, np.uint8)
    pans = pan_table(cards)
    pan_off = frame_header + tmpl.index(card_pan(0).encode())
    rows[:, pan_off : pan_off + 16] = pans[rng.integers(0, cards, n)]
    seq = np.arange(first, first + n, dtype=np.int64)
    stan_off = frame_header + tmpl.index(b"000000" + b"5411")  # field 11 precedes 18
    rrn_off = frame_header + tmpl.index(b"000000000000TERM0001")
    for k in range(12):  # RRN: 12 digits of the sequence number
        rows[:, rrn_off + 11 - k] = 48 + (seq // 10**k) % 10
    for k in range(6):
        rows[:, stan_off + 5 - k] = 48 + (seq // 10**k) % 10
    return rows.tobytes()


# --- codec -------------------------------------------------------------------


def bench_codec(n: int, seed: int) -> dict:
    import iso8583
    from iso8583.specs import default_ascii as spec

    chunk = messages(64, 0, n, seed)
    raws = []
    pos = 0
    while pos < len(chunk):
        size = int.from_bytes(chunk[pos : pos + 2], "big")
        raws.append(chunk[pos + 2 : pos + 2 + size])
        pos += 2 + size
    sample = min(n, 5000)  # pyiso8583 is slow; a sample is enough
    t0 = time.perf_counter()
    docs = [iso8583.decode(r, spec)[0] for r in raws[:sample]]
    t1 = time.perf_counter()
    answers = []
    for d in docs:
        a = {k: v for k, v in d.items() if k in ("2", "3", "4", "7", "11", "37", "41", "42", "49")}
        a.update({"t": "0110", "38": "ABC123", "39": "00", "54": "0002840C000000010000"})
        answers.append(a)
    t2 = time.perf_counter()
    for a in answers:
        iso8583.encode(a, spec)
    t3 = time.perf_counter()
    ref_decode_us = (t1 - t0) / sample * 1e6
    ref_encode_us = (t3 - t2) / sample * 1e6
    # Ours: one scan of the whole chunk (as a big read), one encode.
    reps = 5
    best_scan = best_encode = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b = codec.scan(chunk, 0, n + 1)
        t1 = time.perf_counter()
        ans = np.zeros(b.n_records, C.ANSWER_DTYPE)
        ans["has_available"] = 1
        ans["available"] = 10_000
        t2 = time.perf_counter()
        out = b.encode(ans)
        t3 = time.perf_counter()
        best_scan = min(best_scan, t1 - t0)
        best_encode = min(best_encode, t3 - t2)
    assert b.n_records == n and not b.problems
    scan_us = best_scan / n * 1e6
    encode_us = best_encode / n * 1e6
    return {
        "bench": "iso8583_codec",
        "messages": n,
        "pyiso8583_decode_us": round(ref_decode_us, 3),
        "pyiso8583_encode_us": round(ref_encode_us, 3),
        "pyiso8583_msgs_per_s": round(1e6 / (ref_decode_us + ref_encode_us)),
        "authcore_scan_us": round(scan_us, 3),
        "authcore_encode_us": round(encode_us, 3),
        "authcore_msgs_per_s": round(1e6 / (scan_us + encode_us)),
        "answers_digest": hashlib.sha256(out).hexdigest()[:16],
    }


# --- server ------------------------------------------------------------------


def gateway(port: int, cards: int, n: int, window: int, seed: int, q) -> None:
    """Child process: send n 0100s over one connection, window in flight."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lock = threading.Condition()
    state = {"sent": 0, "recv": 0}
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    chunks = [(first, min(chunk_messages, n - first)) for first in range(0, n, chunk_messages)]

    def sender() -> None:
        for first, count in chunks:
            data = messages(cards, first, count, seed)
            with lock:
                while state["sent"] + count - state["recv"] > window:
                    lock.wait()
                sent_at[first + count] = time.perf_counter()
                state["sent"] += count
            sock.sendall(data)

    th = threading.Thread(target=sender, daemon=True)
    t0 = time.perf_counter()
    th.start()
    digest = hashlib.sha256()
    codes: dict[str, int] = {}
    buf = b""
    got = 0
    while got < n:
        data = sock.recv(1 << 20)
        if not data:
            raise RuntimeError("server closed the connection")
        buf += data
        pos = 0
        k = 0
        while pos + 2 <= len(buf):
            size = int.from_bytes(buf[pos : pos + 2], "big")
            if pos + 2 + size > len(buf):
                break
            pos += 2 + size
            k += 1
        digest.update(buf[:pos])
        # Response codes: the first answer of each read, decoded.
        if k:
            sample = codec.decode(buf[2 : 2 + int.from_bytes(buf[:2], "big")])
            codes[sample["39"]] = codes.get(sample["39"], 0) + 1
        buf = buf[pos:]
        got += k
        now = time.perf_counter()
        with lock:
            state["recv"] = got
            done = [m for m in sent_at if m <= got]
            for m in done:
                latencies.append(now - sent_at.pop(m))
            lock.notify_all()
    elapsed = time.perf_counter() - t0
    th.join()
    sock.close()
    lat = np.array(latencies) * 1e3
    q.put({
        "seconds": elapsed,
        "answers": got,
        "sampled_codes": codes,
        "answers_digest": digest.hexdigest()[:16],
        "chunk_latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "chunk_latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
    })


def setup_engine(eng, cards: int) -> None:
    """Open a merchant and one funded wallet per card; bind the cards."""
    reqs = np.zeros(3 * cards + 1, C.REQUEST_DTYPE)
    reqs["id"] = np.arange(1, len(reqs) + 1, dtype=np.uint64) + (1 << 62)
    reqs["op"][0], reqs["account"][0], reqs["currency"][0], reqs["kind"][0] = C.Op.open, merchant_id, currency, C.Kind.merchant
    accts = account_base + np.arange(cards, dtype=np.uint64)
    reqs["op"][1 : cards + 1] = C.Op.open
    reqs["account"][1 : cards + 1] = accts
    reqs["currency"][1 : cards + 1] = currency
    reqs["op"][cards + 1 : 2 * cards + 1] = C.Op.deposit
    reqs["account"][cards + 1 : 2 * cards + 1] = accts
    reqs["amount"][cards + 1 : 2 * cards + 1] = deposit_amount
    cards_at = 2 * cards + 1
    reqs["op"][cards_at:] = C.Op.issue_card
    reqs["account"][cards_at:] = accts
    raw = reqs.view(np.uint8).reshape(len(reqs), C.request_size)
    for i in range(cards):
        raw[cards_at + i, C.PAN_HASH_OFFSET : C.PAN_HASH_OFFSET + C.pan_hash_size] = np.frombuffer(
            eng.hasher.digest(card_pan(i)), np.uint8)
    ans = eng.submit(reqs)
    assert (ans["status"] == C.Status.approved).all(), np.unique(ans["status"])


def bench_server(n: int, cards: int, window: int, seed: int, data_dir: str | None) -> dict:
    from authcore.config import Config
    from authcore.server import ServerThread

    config = Config.from_dict({"fraud": {"enabled": False}, "durability": {"sync": "always"}})
    tmp = data_dir or tempfile.mkdtemp(prefix="authcore-bench-iso-", dir=os.getcwd())
    srv = ServerThread(data_dir=tmp, config=config).start()
    try:
        eng = srv.server.engine
        setup_engine(eng, cards)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        child = ctx.Process(target=gateway, args=(srv.ports["iso8583"], cards, n, window, seed, q))
        child.start()
        result = q.get(timeout=3600)
        child.join()
        assert result["answers"] == n
    finally:
        srv.stop()
        if data_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "bench": "iso8583_server",
        "messages": n,
        "cards": cards,
        "window": window,
        "sync": "always",
        "auth_per_s": round(n / result["seconds"]),
        "seconds": round(result["seconds"], 3),
        "sampled_codes": result["sampled_codes"],
        "chunk_latency_ms_p50": result["chunk_latency_ms_p50"],
        "chunk_latency_ms_p99": result["chunk_latency_ms_p99"],
        "answers_digest": result["answers_digest"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    pc = sub.add_parser("codec")
    pc.add_argument("--messages", type=int, default=20_000)
    pc.add_argument("--seed", type=int, default=seed_default)
    ps = sub.add_parser("server")
    ps.add_argument("--messages", type=int, default=20_000)
    ps.add_argument("--cards", type=int, default=1000)
    ps.add_argument("--window", type=int, default=32_768)
    ps.add_argument("--seed", type=int, default=seed_default)
    ps.add_argument("--data", default=None, help="data directory (default: a temporary one here, removed)")
    a = p.parse_args(argv)
    if a.what == "codec":
        out = bench_codec(a.messages, a.seed)
    else:
        out = bench_server(a.messages, a.cards, a.window, a.seed, a.data)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
