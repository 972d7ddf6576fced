"""``authcore bench``: the load tester.

Goals:
- Drive a running server (``--target host:port``) or one started here on a
  temporary data directory, over any of its three protocols (binary frames,
  JSON lines, ISO 8583), from several processes and connections, so that
  the generator is not the bottleneck: each request stream is generated
  once, before the run, as a *pattern* of records whose ids are relative;
  sending a frame is a slice of the pattern plus one vectorised id patch
  (binary records, or ASCII digits for JSON and ISO 8583).
- Closed loop (each connection keeps ``--window`` frames of ``--batch``
  requests in flight) or open loop (``--rate`` requests/s in total, each
  request with its own intended send time).  Open-loop latency is measured
  from the intended send time, so a stalled server is charged for the
  requests it kept the client from sending (coordinated-omission
  correction, as wrk2 does).
- Latency in HdrHistogram (3 significant digits): workers quantise into
  HDR's own buckets with numpy (the same log-linear layout), the parent
  merges and reads p50/p90/p99/p99.9/max from ``hdrh``.
- A realistic mix: authorize, capture and void of earlier holds of the same
  connection (answers on a connection come back in order, so a capture
  never overtakes its authorisation), purchase, P2P transfer, exact
  retransmissions (``duplicate``: a repeated id must get the first answer)
  and funds declines (``decline``: authorisations on accounts opened with
  no money).  Accounts are drawn uniformly or Zipf-skewed (hot accounts).
- Output: a live progress display (rich, on stderr, when it is a terminal),
  a summary table, ``--json`` for one JSON line as the last line of stdout,
  ``--plot FILE.png`` for latency against throughput over a sweep of
  open-loop rates.

Non-goals: verifying answers against a model (tests/model.py does that),
load from other machines, TLS.

Ids: a run takes a fresh block of request ids (time-based, 19 decimal
digits, unique for all time on one server), so runs against the same
``--target`` never repeat each other's ids.  Accounts 1..N are wallets with
a credit line of 10^15 (they never run out of money); the ``decline``
accounts are 16 wallets from ``decline_account_base`` with no money.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import importlib
import multiprocessing as mp
import os
import selectors
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .constants import (
    ANSWER_DTYPE,
    FLAG_SET_CREDIT,
    REQUEST_DTYPE,
    Channel,
    Kind,
    Op,
    Status,
    answer_size,
    limit_max,
)

# --- limits and defaults --------------------------------------------------------

duration_default_s = 10.0
warmup_default_s = 2.0  # JIT-free, but caches, the log's preallocation and the
# kernel's tables still settle during the first second or so.
connections_default = 8
processes_default = max(1, min(4, (os.cpu_count() or 2) // 2))  # leave cores to the server
batch_default = 256  # requests per frame (binary) / per write (JSON, ISO)
window_default = 2  # frames in flight per connection, closed loop
accounts_default = 100_000
zipf_exponent_default = 1.1  # the hottest of 100,000 accounts gets ~8% of the traffic
pattern_records_total = 1 << 17  # records generated per run, all connections together
# (JSON and ISO 8583 render each record once in Python, ~3 µs each)
pattern_records_min = 4096  # per connection: a cycle long enough for FIFO captures
progress_interval_s = 0.5  # workers report this often
display_refresh_per_s = 4
drain_timeout_s = 10.0  # after the last send, answers still awaited this long
io_timeout_s = 30.0  # no byte from any connection this long: the run fails
ready_timeout_s = 120.0  # worker start-up (imports, patterns, connections)
start_delay_s = 0.2  # the go signal names a start this far ahead, so every worker starts at once
recv_bytes = 1 << 20
open_loop_linger_s = 0.001  # open loop: a due request waits at most this for company in its frame
# epoll (Python's selectors) rounds a timeout *up* to whole milliseconds, so
# a 70 µs wait for the next due request slept ~1 ms, and the open loop
# charged that lateness to the server as latency.  A pinned open-loop worker
# (--pin: a core of its own) polls instead for waits shorter than this; an
# unpinned one sleeps, so as not to take a core from the server it measures.
spin_below_s = 0.0015
small_frame_records = 32  # frames up to this size are patched and timed in plain Python (open loop at
# 100k requests/s in frames of 8 spent a whole core in numpy call overhead)
outbox_bytes_max = 4 << 20  # open loop: a connection's unsent bytes before it waits
inflight_records_max = 65_536  # open loop: unanswered requests per connection (server's default cap)
setup_chunk = 8192  # records per setup submit
latency_us_max = 3_600_000_000  # one hour: anything slower is clamped
hdr_sub_bucket_bits = 11  # 2048 sub-buckets: HDR's layout for 3 significant digits
hdr_significant_digits = 3
id_digits = 19  # every bench id has 19 decimal digits (fixed-width patching)
id_floor = 10**18
id_block_per_us = 8192  # a run's id block starts at (time in µs) * this: two runs
# a millisecond apart cannot overlap below 8 million requests.
amount_min = 500  # > card_testing's 200: no run trips the card-testing rule
amount_max = 20_000  # < amount_spike's 50,000 and new_account's 100,000
currency_default = 840
merchant_default = 900_000_001  # fits ISO field 42 (15 digits)
mcc_default = 5411  # grocery: not a risky MCC
country_default = 840
credit_default = limit_max  # 10^15: no account runs dry, no deposit moves settlement
decline_accounts = 16
decline_account_base = 90_000_000_000_000  # 14 digits: still a 16-digit PAN (ISO)
accounts_max = decline_account_base - 1
duplicate_lag_max = 1024  # a retransmission repeats one of the last this-many requests
plot_fractions = (0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1)  # of the closed-loop maximum
iso_stan_digits = 6
iso_rrn_digits = 12
iso_pan_prefix = "4"

assert pattern_records_min >= 2 * duplicate_lag_max
assert id_floor + 10**15 * id_block_per_us < 2**63  # time-based bases stay under 2^63
assert accounts_default < accounts_max

# --- the mix ------------------------------------------------------------------------

KINDS = ("authorize", "capture", "void", "purchase", "transfer", "duplicate", "decline")
K_AUTHORIZE, K_CAPTURE, K_VOID, K_PURCHASE, K_TRANSFER, K_DUPLICATE, K_DECLINE = range(len(KINDS))
AUTHORISATION_KINDS = (K_AUTHORIZE, K_PURCHASE, K_TRANSFER, K_DECLINE)  # §4 decisions; repeats are not
MIX_PRESETS = {
    "authorize": "authorize=100",
    "mixed": "authorize=58,capture=14,void=4,purchase=14,transfer=6,duplicate=2,decline=2",
}
mix_default = "mixed"


def parse_mix(text: str) -> dict[str, float]:
    """``name=weight,...`` (or a preset name) -> normalised weights."""
    text = MIX_PRESETS.get(text, text)
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, w = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"--mix: unknown kind {name!r} (kinds: {', '.join(KINDS)}; presets: {', '.join(MIX_PRESETS)})")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix: weight of {name} must be a number, not {w!r}") from None
        if weight < 0:
            raise ValueError(f"--mix: weight of {name} must be >= 0")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("--mix: weights must add up to more than 0")
    return {k: weights[k] / total for k in KINDS if weights.get(k)}


def mix_text(mix: dict[str, float]) -> str:
    return ",".join(f"{k}={round(v * 100, 3):g}" for k, v in mix.items())


# --- latency buckets (HdrHistogram's layout, in numpy) -----------------------------

_sub = 1 << hdr_sub_bucket_bits  # 2048
_half = _sub >> 1  # 1024


def hdr_key(us: int) -> int:
    """HDR bucket of a latency in µs (values below 2048 exact, then 1/1024 steps)."""
    v = 1 if us < 1 else (latency_us_max if us > latency_us_max else us)
    if v < _sub:
        return v
    s = v.bit_length() - hdr_sub_bucket_bits
    return _sub + (s - 1) * _half + ((v >> s) - _half)


def hdr_value(key: int) -> int:
    """Lowest latency of a bucket: what the bucket is recorded as in hdrh."""
    if key < _sub:
        return key
    s, r = divmod(key - _sub, _half)
    return (r + _half) << (s + 1)


hdr_keys = hdr_key(latency_us_max) + 1


def hdr_keys_of(us: np.ndarray) -> np.ndarray:
    v = np.clip(us, 1, latency_us_max).astype(np.int64)
    _m, e = np.frexp(v.astype(np.float64))  # v < 2^53: e is v's bit length exactly
    s = np.maximum(e.astype(np.int64) - hdr_sub_bucket_bits, 0)
    return np.where(s == 0, v, _sub + (s - 1) * _half + ((v >> s) - _half))


class Latencies:
    """Bucket counts of measured latencies (µs)."""

    def __init__(self) -> None:
        self.counts = np.zeros(hdr_keys, np.int64)
        self.max_us = 0

    def add(self, us: float, count: int) -> None:
        v = int(us)
        self.counts[hdr_key(v)] += count
        if v > self.max_us:
            self.max_us = v

    def add_ramp(self, first_us: float, step_us: float, count: int) -> None:
        """count latencies first_us, first_us - step_us, ... (one frame, open loop)."""
        if count <= small_frame_records:  # a few numpy calls cost more than this loop
            counts = self.counts
            for k in range(count):
                counts[hdr_key(int(first_us - step_us * k))] += 1
            v = int(first_us)
            if v > self.max_us:
                self.max_us = v
            return
        us = first_us - step_us * np.arange(count)
        self.counts += np.bincount(hdr_keys_of(us), minlength=hdr_keys)
        v = int(first_us)
        if v > self.max_us:
            self.max_us = v

    @staticmethod
    def compact(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.flatnonzero(counts)
        return keys, counts[keys]


def percentiles_of(counts: np.ndarray, ps=(50.0, 99.0)) -> list[int]:
    """Quick percentiles straight from bucket counts (the live display)."""
    total = int(counts.sum())
    if not total:
        return [0 for _ in ps]
    cum = np.cumsum(counts)
    out = []
    for p in ps:
        k = int(np.searchsorted(cum, max(1, int(np.ceil(total * p / 100.0)))))
        out.append(hdr_value(k))
    return out


def to_hdr(counts: np.ndarray):
    from hdrh.histogram import HdrHistogram

    hist = HdrHistogram(1, latency_us_max, hdr_significant_digits)
    for k in np.flatnonzero(counts):
        hist.record_value(hdr_value(int(k)), int(counts[k]))
    return hist


# --- workload: patterns of requests ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every stream is drawn from (picklable: workers rebuild patterns)."""

    accounts: int = accounts_default
    skew: str = "uniform"
    zipf_exponent: float = zipf_exponent_default
    mix: tuple[tuple[str, float], ...] = tuple(parse_mix(mix_default).items())
    seed: int = 20240917
    transfers: bool = True  # ISO 8583 has no transfer: they become authorisations
    currency: int = currency_default
    merchant: int = merchant_default

    def weights(self) -> np.ndarray:
        w = np.zeros(len(KINDS))
        for name, v in self.mix:
            w[KINDS.index(name)] = v
        if not self.transfers:
            w[K_AUTHORIZE] += w[K_TRANSFER]
            w[K_TRANSFER] = 0
        return w / w.sum()


class _AccountDraw:
    def __init__(self, wl: Workload):
        self.n = wl.accounts
        self.zipf = wl.skew == "zipf"
        if self.zipf:
            ranks = np.arange(1, self.n + 1, dtype=np.float64)
            cdf = np.cumsum(ranks ** -wl.zipf_exponent)
            self.cdf = cdf / cdf[-1]
            # hot accounts are spread over the id range, not 1, 2, 3...
            self.perm = np.random.default_rng([wl.seed, 1]).permutation(self.n).astype(np.uint64) + 1

    def __call__(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if not self.zipf:
            return rng.integers(1, self.n + 1, size, dtype=np.uint64)
        r = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.perm[np.minimum(r, self.n - 1)]


@dataclasses.dataclass
class Pattern:
    """One connection's requests for one cycle; the stream repeats it.

    ``records['id']`` holds each record's *relative* id (its position, or
    the position of the record it repeats); where ``ref`` is set, the
    ``account`` field is the relative id of a hold (capture, void).  Global
    id of relative id r in cycle k of connection c among C:
    ``id_base + (k * n + r) * C + c``.
    """

    records: np.ndarray
    ref: np.ndarray
    kind: np.ndarray
    auth_prefix: np.ndarray  # auth_prefix[i] = authorisations among records[:i]

    @property
    def n(self) -> int:
        return len(self.records)

    def authorisations(self, start: int, stop: int) -> int:
        """Authorisation requests among stream records [start, stop) (one cycle)."""
        n = self.n
        lo = start % n
        return int(self.auth_prefix[lo + stop - start] - self.auth_prefix[lo])


def build_pattern(wl: Workload, n: int, stream: int) -> Pattern:
    rng = np.random.default_rng([wl.seed, 2, stream])
    kind = rng.choice(len(KINDS), size=n, p=wl.weights()).astype(np.uint8)
    pos = np.arange(n, dtype=np.uint64)
    # Captures and voids take the holds of earlier authorisations of this
    # pattern, first in first out; one with no hold before it authorises.
    cv = np.flatnonzero((kind == K_CAPTURE) | (kind == K_VOID))
    auths = np.flatnonzero(kind == K_AUTHORIZE)
    m = min(len(cv), len(auths))
    ok = np.zeros(len(cv), bool)
    ok[:m] = auths[:m] < cv[:m]
    kind[cv[~ok]] = K_AUTHORIZE
    cv, holds = cv[ok], auths[: len(cv)][ok]
    # Duplicates repeat one of the last duplicate_lag_max requests.
    dup = np.flatnonzero(kind == K_DUPLICATE)
    kind[dup[dup == 0]] = K_AUTHORIZE
    dup = dup[dup > 0]
    src = dup - 1 - rng.integers(0, np.minimum(dup, duplicate_lag_max))

    r = np.zeros(n, REQUEST_DTYPE)
    r["id"] = pos
    draw = _AccountDraw(wl)
    r["account"] = draw(rng, n)
    r["amount"] = rng.integers(amount_min, amount_max + 1, n)
    r["currency"] = wl.currency
    r["op"] = Op.authorize
    r["to"] = wl.merchant
    r["mcc"] = mcc_default
    r["country"] = country_default
    r["channel"] = Channel.online
    r["op"][kind == K_PURCHASE] = Op.purchase
    dec = kind == K_DECLINE
    r["account"][dec] = decline_account_base + rng.integers(0, decline_accounts, int(dec.sum()), dtype=np.uint64)
    tr = kind == K_TRANSFER
    if tr.any():
        to = draw(rng, int(tr.sum()))
        same = to == r["account"][tr]
        to[same] = to[same] % np.uint64(wl.accounts) + np.uint64(1)
        r["op"][tr] = Op.transfer
        r["to"][tr] = to
        r["channel"][tr] = Channel.p2p
        r["mcc"][tr] = 0
        r["country"][tr] = 0
    ref = np.zeros(n, bool)
    for k, op in ((K_CAPTURE, Op.capture), (K_VOID, Op.void)):
        sel = kind[cv] == k
        r["op"][cv[sel]] = op
        r["account"][cv[sel]] = holds[sel].astype(np.uint64)
    for field in ("to", "amount", "mcc", "country", "currency"):
        r[field][cv] = 0
    r["channel"][cv] = 0
    ref[cv] = True
    # A repeat copies its source whole; follow chains of repeats to the first.
    while True:
        chained = kind[src] == K_DUPLICATE
        if not chained.any():
            break
        src[chained] = src[np.searchsorted(dup, src[chained])]
    r[dup] = r[src]
    ref[dup] = ref[src]
    is_auth = np.isin(kind, AUTHORISATION_KINDS)
    prefix = np.zeros(2 * n + 1, np.int64)  # doubled: a slice may start anywhere in a cycle
    prefix[1:] = np.cumsum(np.concatenate([is_auth, is_auth]))
    return Pattern(r, ref, kind, prefix)


def pattern_size(connections: int, batch: int, requests: int | None = None) -> int:
    per = max(pattern_records_min, pattern_records_total // max(1, connections))
    if requests is not None:  # a short run needs no long cycle
        per = min(per, max(pattern_records_min, requests // max(1, connections) + 1))
    return -(-per // batch) * batch  # a multiple of batch: no frame wraps a cycle


_last_id_end = 0


def new_id_base(count: int) -> int:
    """A block of ``count`` fresh 19-digit ids (time-based: unique across runs)."""
    global _last_id_end
    now_us = time.time_ns() // 1000
    base = max(id_floor + (now_us % 10**15) * id_block_per_us, _last_id_end)
    _last_id_end = base + count
    assert base + count < 10**id_digits
    return base


# --- digits ------------------------------------------------------------------------


def put_digits(buf: np.ndarray, offsets: np.ndarray, values: np.ndarray, width: int) -> None:
    """Write ``values`` as ``width`` ASCII digits at ``offsets`` of a uint8 buffer."""
    pow10 = _POW10[id_digits - width :]
    digits = (values.astype(np.uint64)[:, None] // pow10) % np.uint64(10)
    buf[offsets[:, None] + _DIGIT_POS[:width]] = digits.astype(np.uint8) + 48


_POW10 = np.array([10**k for k in range(id_digits - 1, -1, -1)], np.uint64)
_DIGIT_POS = np.arange(id_digits, dtype=np.int64)


def card_pan(account: int) -> str:
    """The 16-digit, Luhn-valid PAN of a bench account (ISO 8583 runs)."""
    from .cards import luhn_valid

    body = f"{iso_pan_prefix}{account:014d}"
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError(body)


# --- codecs: one connection's bytes out and answers in ---------------------------------


class Codec:
    """Base: encodes stream records [start, stop) and counts answers.

    ``encode`` is called with frames that never cross a cycle; ``feed``
    returns how many answers the bytes completed (in request order) and
    keeps ``statuses`` and ``errors`` up to date.
    """

    name = "?"

    def __init__(self, pattern: Pattern, conn: int, conns: int, id_base: int, options: dict):
        self.p = pattern
        self.conn = np.uint64(conn)
        self.conns = np.uint64(conns)
        self.id_base = np.uint64(id_base)
        self.options = options
        self.errors = 0
        self.statuses: collections.Counter = collections.Counter()

    def hello(self, sock: socket.socket) -> None:
        """Blocking handshake on a fresh connection (none by default)."""

    def gids(self, start: int, stop: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(pattern offset, global ids, global ids of each record's hold)."""
        n = self.p.n
        cycle, lo = divmod(start, n)
        hi = lo + stop - start
        assert hi <= n
        cyc = np.uint64(cycle * n)
        rel = self.p.records["id"][lo:hi]
        gid = self.id_base + (cyc + rel) * self.conns + self.conn
        gref = self.id_base + (cyc + self.p.records["account"][lo:hi]) * self.conns + self.conn
        return lo, gid, gref

    def encode(self, start: int, stop: int) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def feed(self, data: bytes) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def status_counts(self) -> dict[str, int]:
        return dict(self.statuses)


class BinaryCodec(Codec):
    name = "binary"

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from .client import _FrameDecoder

        self.dec = _FrameDecoder()
        self.tag = 0
        self.sizes: dict[int, int] = {}
        self.counts = np.zeros(256, np.int64)

    def hello(self, sock: socket.socket) -> None:
        from .client import ProtocolError, _FrameDecoder
        from .protocols import binary as wire

        sock.sendall(wire.hello_frame())
        dec = _FrameDecoder()
        frames: list = []
        while not frames:
            data = sock.recv(recv_bytes)
            if not data:
                raise ConnectionError("server closed the connection during hello")
            frames = dec.feed(data)
        ftype, _tag, payload = frames[0]
        if ftype != wire.FrameType.hello_ok:
            raise ProtocolError(f"expected hello_ok, got frame type {ftype}: {payload[8:].decode(errors='replace')}")
        _pid, _v, _f, _rs, _as, fmax, _inflight, _bmax, _r = wire.HELLO_OK.unpack_from(payload)
        batch = int(self.options.get("batch", batch_default))
        if batch * REQUEST_DTYPE.itemsize > fmax:
            raise ValueError(f"--batch {batch}: frames of {batch * 64} bytes exceed the server's {fmax}")

    def encode(self, start: int, stop: int) -> bytes:
        from .protocols import binary as wire

        lo, gid, gref = self.gids(start, stop)
        rec = self.p.records[lo : lo + stop - start].copy()
        rec["id"] = gid
        ref = self.p.ref[lo : lo + stop - start]
        rec["account"][ref] = gref[ref]
        self.tag += 1
        self.sizes[self.tag] = stop - start
        return wire.frame(wire.FrameType.requests, rec.tobytes(), self.tag)

    def feed(self, data: bytes) -> int:
        from .protocols import binary as wire

        done = 0
        for ftype, tag, payload in self.dec.feed(data):
            n = self.sizes.pop(tag, None)
            if n is None:
                raise ConnectionError(f"answer frame with unknown tag {tag} (type {ftype})")
            if ftype == wire.FrameType.answers and len(payload) == n * answer_size:
                st = np.frombuffer(payload, ANSWER_DTYPE)["status"]
                self.counts += np.bincount(st, minlength=256)
                self.errors += int(((st == Status.unavailable) | (st == Status.bad_request)).sum())
            else:  # an error frame (or a short answer): the whole frame failed
                self.errors += n
                self.statuses["refused_frame"] += n
            done += n
        return done

    def status_counts(self) -> dict[str, int]:
        out = dict(self.statuses)
        for i in np.flatnonzero(self.counts):
            name = Status(int(i)).name if i < len(Status) else f"status_{int(i)}"
            out[name] = out.get(name, 0) + int(self.counts[i])
        return out


class _TemplateCodec(Codec):
    """Text protocols: the pattern rendered once into one byte buffer with
    fixed-width digit fields that ``encode`` patches per frame."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.buf = np.zeros(0, np.uint8)
        self.starts = np.zeros(1, np.int64)  # record i is buf[starts[i]:starts[i+1]]
        self.patches: list[tuple[np.ndarray, np.ndarray, bool, int, int]] = []
        self._small: tuple | None = None  # the pattern as Python objects, for _encode_small
        # each patch: (records having it, their offsets in buf, from hold id?, width, modulus)

    def encode(self, start: int, stop: int) -> bytes:
        if stop - start <= small_frame_records:
            return self._encode_small(start, stop)
        lo, gid, gref = self.gids(start, stop)
        hi = lo + stop - start
        b0 = self.starts[lo]
        out = self.buf[b0 : self.starts[hi]].copy()
        for rows, offs, from_ref, width, mod in self.patches:
            a, b = np.searchsorted(rows, (lo, hi))
            if a == b:
                continue
            sel = rows[a:b] - lo
            vals = (gref if from_ref else gid)[sel]
            if mod:
                vals = vals % np.uint64(mod)
            put_digits(out, offs[a:b] - b0, vals, width)
        return out.tobytes()


    def _encode_small(self, start: int, stop: int) -> bytes:
        """encode() for a few records, in plain Python (same bytes)."""
        if self._small is None:
            p = self.p
            self._small = (self.buf.tobytes(), self.starts.tolist(), p.records["id"].tolist(),
                           p.records["account"].tolist(),
                           [(rows.tolist(), offs.tolist(), ref, width, mod) for rows, offs, ref, width, mod in self.patches])
        buf, starts, ids, refs, patches = self._small
        n = self.p.n
        cycle, lo = divmod(start, n)
        hi = lo + stop - start
        base, conns, conn, cyc = int(self.id_base), int(self.conns), int(self.conn), cycle * n
        b0 = starts[lo]
        out = bytearray(buf[b0 : starts[hi]])
        for rows, offs, from_ref, width, mod in patches:
            for j in range(bisect.bisect_left(rows, lo), bisect.bisect_left(rows, hi)):
                r = rows[j]
                v = base + (cyc + (refs[r] if from_ref else ids[r])) * conns + conn
                o = offs[j] - b0
                out[o : o + width] = b"%0*d" % (width, v % (mod or 10**width) % 10**width)
        return bytes(out)


_JSON_OPS = {int(o): o.name for o in Op}
_PLACEHOLDER = b"0" * id_digits


class JsonCodec(_TemplateCodec):
    name = "json"
    _approved = b'"status":"approved"'

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        r = self.p.records
        parts: list[bytes] = []
        starts = [0]
        id_off: list[int] = []
        ref_rows: list[int] = []
        ref_off: list[int] = []
        size = 0
        for i in range(self.p.n):
            op = int(r["op"][i])
            head = b'{"op":"' + _JSON_OPS[op].encode() + b'","id":'
            id_off.append(size + len(head))
            if self.p.ref[i]:
                mid = b',"auth":'
                ref_rows.append(i)
                ref_off.append(size + len(head) + id_digits + len(mid))
                tail = b',"amount":0}\n'
                line = head + _PLACEHOLDER + mid + _PLACEHOLDER + tail
            elif op == Op.transfer:
                tail = (
                    f',"account":{int(r["account"][i])},"to":{int(r["to"][i])},'
                    f'"amount":{int(r["amount"][i])},"currency":{int(r["currency"][i])}}}\n'
                ).encode()
                line = head + _PLACEHOLDER + tail
            else:
                tail = (
                    f',"account":{int(r["account"][i])},"amount":{int(r["amount"][i])},'
                    f'"currency":{int(r["currency"][i])},"merchant":{int(r["to"][i])},"mcc":{int(r["mcc"][i])},'
                    f'"channel":"online","country":{int(r["country"][i])}}}\n'
                ).encode()
                line = head + _PLACEHOLDER + tail
            parts.append(line)
            size += len(line)
            starts.append(size)
        self.buf = np.frombuffer(b"".join(parts), np.uint8)
        self.starts = np.array(starts, np.int64)
        all_rows = np.arange(self.p.n)
        self.patches = [
            (all_rows, np.array(id_off, np.int64), False, id_digits, 0),
            (np.array(ref_rows, np.int64), np.array(ref_off, np.int64), True, id_digits, 0),
        ]
        self.partial = b""

    def feed(self, data: bytes) -> int:
        if self.partial:
            data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        if not cut:
            return 0
        chunk = data[:cut]
        n = chunk.count(b"\n")
        ok = chunk.count(self._approved)
        if ok == n:
            self.statuses["approved"] += n
            return n
        for line in chunk.split(b"\n")[:-1]:
            if self._approved in line:
                self.statuses["approved"] += 1
                continue
            try:
                st = orjson.loads(line).get("status", "?")
            except orjson.JSONDecodeError:
                st = "unparsable"
            self.statuses[st] += 1
            if st in ("unavailable", "bad_request", "unparsable"):
                self.errors += 1
        return n


_ISO_MTI = {int(Op.authorize): b"0100", int(Op.purchase): b"0200", int(Op.capture): b"0220", int(Op.void): b"0400"}
_ISO_ERROR_CODES = ("96", "30")


class IsoCodec(_TemplateCodec):
    """ISO 8583 (docs/iso8583.md): 0100/0200/0220/0400 with one fixed layout.

    Every message carries fields 2, 3, 4, 7, 11, 18, 19, 22, 37, 41, 42, 49,
    so all have the same length and offsets.  Field 37 (RRN) is the request's
    id modulo 10^12 (for 0220/0400: its authorisation's, which is how the
    listener finds the hold) and field 11 (STAN) the id modulo 10^6; an
    exact repeat is a retransmission and gets the first answer.
    """

    name = "iso8583"

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        from .protocols import _iso_codec

        r = self.p.records
        t = {
            "t": "0100", "2": card_pan(1), "3": "000000", "4": "0" * 12, "7": "1124120000",
            "11": "9" * iso_stan_digits, "18": f"{mcc_default:04d}", "19": f"{country_default:03d}",
            "22": "010", "37": "8" * iso_rrn_digits, "41": "AUTHCORE", "42": f"{self.p_merchant():015d}",
            "49": f"{int(r['currency'][0]) or currency_default:03d}",
        }  # fmt: skip
        msg = _iso_codec.encode(t)
        size = 2 + len(msg)
        rows = np.empty((self.p.n, size), np.uint8)
        rows[:] = np.frombuffer(len(msg).to_bytes(2, "big") + msg, np.uint8)
        off_pan = 2 + msg.index(t["2"].encode())
        off_amount = 2 + msg.index(b"0" * 12 + t["7"].encode())
        off_stan = 2 + msg.index(t["11"].encode())
        off_rrn = 2 + msg.index(t["37"].encode())
        ops = r["op"]
        for op, mti in _ISO_MTI.items():
            rows[ops == op, 2:6] = np.frombuffer(mti, np.uint8)
        unknown = ~np.isin(ops, list(_ISO_MTI))
        assert not unknown.any(), "ISO 8583 streams hold authorize, purchase, capture and void only"
        pans = {a: np.frombuffer(card_pan(int(a)).encode(), np.uint8) for a in np.unique(r["account"][~self.p.ref])}
        for i in np.flatnonzero(~self.p.ref):
            rows[i, off_pan : off_pan + 16] = pans[r["account"][i]]
        amounts = np.where(self.p.ref, 0, r["amount"]).astype(np.uint64)
        flat_rows = np.arange(self.p.n, dtype=np.int64)
        base = flat_rows * size
        self.buf = rows.reshape(-1)
        put_digits(self.buf, base + off_amount, amounts, 12)
        # Captures and voids carry the PAN of their hold's account.
        for i in np.flatnonzero(self.p.ref):
            h = int(r["account"][i])
            rows[i, off_pan : off_pan + 16] = rows[h, off_pan : off_pan + 16]
        self.starts = np.arange(self.p.n + 1, dtype=np.int64) * size
        own = flat_rows[~self.p.ref]
        held = flat_rows[self.p.ref]
        self.patches = [
            (flat_rows, base + off_stan, False, iso_stan_digits, 10**iso_stan_digits),
            (own, base[own] + off_rrn, False, iso_rrn_digits, 10**iso_rrn_digits),
            (held, base[held] + off_rrn, True, iso_rrn_digits, 10**iso_rrn_digits),
        ]
        self.partial = b""
        self.offset39: dict[bytes, int] = {}
        from iso8583.specs import default_ascii

        self.spec = default_ascii

    def p_merchant(self) -> int:
        return int(self.options.get("merchant", merchant_default))

    def _code(self, msg: bytes) -> str:
        key = msg[4:22]
        off = self.offset39.get(key)
        if off is None:
            off = self._walk(msg)
            if off is None:
                return "??"
            if not int(msg[4:5], 16) & 8:  # no secondary bitmap: the key decides the layout
                self.offset39[key] = off
        return msg[off : off + 2].decode("ascii", "replace")

    def _walk(self, msg: bytes) -> int | None:
        bitmap = int(msg[4:20], 16)
        pos = 20
        if bitmap >> 63 & 1:
            pos += 16
        for f in range(2, 40):
            if not bitmap >> (64 - f) & 1:
                continue
            spec = self.spec[str(f)]
            if f == 39:
                return pos
            lt = spec["len_type"]
            n = spec["max_len"] if lt == 0 else int(msg[pos : pos + lt])
            pos += lt + n
        return None

    def feed(self, data: bytes) -> int:
        if self.partial:
            data = self.partial + data
        pos = 0
        n = len(data)
        done = 0
        codes = self.statuses
        while n - pos >= 2:
            size = (data[pos] << 8) | data[pos + 1]
            end = pos + 2 + size
            if end > n:
                break
            if size:
                code = self._code(data[pos + 2 : end])
                codes[code] += 1
                if code in _ISO_ERROR_CODES:
                    self.errors += 1
                done += 1
            pos = end
        self.partial = data[pos:]
        return done


CODECS = {"binary": "authcore.loadgen:BinaryCodec", "json": "authcore.loadgen:JsonCodec", "iso8583": "authcore.loadgen:IsoCodec"}


def load_codec(path: str) -> type[Codec]:
    mod, _, cls = path.partition(":")
    return getattr(importlib.import_module(mod), cls)


# --- the worker process ------------------------------------------------------------


@dataclasses.dataclass
class WorkerSpec:
    host: str
    port: int
    codec: str  # "module:Class"
    codec_options: dict
    sys_path: list[str]
    workload: Workload
    conns: list[int]  # this worker's connection indices
    conns_total: int
    id_base: int
    pattern_n: int
    batch: int
    window: int
    rate: float | None  # requests/s over all connections; None = closed loop
    warmup: float
    duration: float | None  # None: stop after ``requests``
    requests: int | None  # measured requests of this worker
    cpus: tuple[int, ...] | None = None  # run on these CPUs only (--pin)


def _select_timeout(wait_s: float, spin: bool) -> float:
    """The selector timeout for a wait of ``wait_s``: when spinning, 0 (poll)
    for short waits, else the wait less the part epoll would overshoot."""
    if not spin or wait_s <= 0.0:
        return max(0.0, wait_s)
    if wait_s < spin_below_s:
        return 0.0
    return wait_s - spin_below_s


class _Frame:
    __slots__ = ("n", "t_ref", "step", "measured", "done", "start")

    def __init__(self, n: int, t_ref: float, step: float, measured: bool, start: int):
        self.n = n
        self.t_ref = t_ref
        self.step = step
        self.measured = measured
        self.done = 0
        self.start = start


class _Conn:
    __slots__ = ("c", "sock", "codec", "sent", "measured_sent", "quota", "inflight", "inflight_records",
                 "out", "writing", "dead", "t0", "finished")  # fmt: skip

    def __init__(self, c: int, sock: socket.socket, codec: Codec, quota: int | None):
        self.c = c
        self.sock = sock
        self.codec = codec
        self.sent = 0  # stream records framed so far
        self.measured_sent = 0
        self.quota = quota  # measured records to send (requests mode)
        self.inflight: collections.deque[_Frame] = collections.deque()
        self.inflight_records = 0
        self.out = memoryview(b"")
        self.writing = False
        self.dead = False
        self.t0 = 0.0
        self.finished = False  # sends nothing more


class _Worker:
    def __init__(self, spec: WorkerSpec, pipe: Any):
        self.spec = spec
        self.pipe = pipe
        self.lat = Latencies()
        self.reported = np.zeros(hdr_keys, np.int64)
        self.answered = 0
        self.answered_window = 0
        self.auth_window = 0
        self.lost = 0
        self.t_first = float("inf")  # requests mode: first measured send
        self.t_last = 0.0  # requests mode: last measured answer
        self.conns: list[_Conn] = []
        self.tl_answers: list[int] = []  # answers received in each second since the start
        self.tl_max_us: list[int] = []  # slowest measured answer received in each second

    def connect(self) -> list[_Conn]:
        s = self.spec
        for p in s.sys_path:
            if p not in sys.path:
                sys.path.insert(0, p)
        cls = load_codec(s.codec)
        conns = []
        k = len(s.conns)
        for i, c in enumerate(s.conns):
            pattern = build_pattern(s.workload, s.pattern_n, c)
            codec = cls(pattern, c, s.conns_total, s.id_base, s.codec_options)
            sock = socket.create_connection((s.host, s.port), timeout=io_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            codec.hello(sock)
            sock.setblocking(False)
            quota = None
            if s.requests is not None:
                quota = s.requests // k + (1 if i < s.requests % k else 0)
            conns.append(_Conn(c, sock, codec, quota))
        return conns

    def run(self) -> dict:
        s = self.spec
        conns = self.conns = self.connect()
        self.pipe.send(("ready", None))
        kind, t_start = self.pipe.recv()
        assert kind == "go", kind
        time.sleep(max(0.0, t_start - time.perf_counter()))  # every worker starts at once
        self.t_start = t_start
        self.w0 = t_start + s.warmup
        self.w1 = self.w0 + s.duration if s.duration is not None else float("inf")
        spacing = s.conns_total / s.rate if s.rate else 0.0
        for cs in conns:
            cs.t0 = t_start + (cs.c / s.conns_total) * spacing
        sel = selectors.DefaultSelector()
        for cs in conns:
            sel.register(cs.sock, selectors.EVENT_READ, cs)
        last_report = time.perf_counter()
        last_io = last_report
        drain_deadline = None
        while True:
            now = time.perf_counter()
            wake = now + progress_interval_s
            for cs in conns:
                if cs.dead or cs.finished:
                    continue
                if s.rate:
                    due = self._fill_open(cs, now, spacing)
                    if due is not None and due < wake:
                        wake = due
                else:
                    self._fill_closed(cs, now)
                if cs.out:
                    self._send(cs, sel)
            active = [cs for cs in conns if not cs.dead and (cs.inflight or not cs.finished)]
            if not active:
                break
            if all(cs.finished or cs.dead for cs in conns):
                if drain_deadline is None:
                    drain_deadline = now + drain_timeout_s
                elif now > drain_deadline:
                    for cs in active:
                        self._lose(cs)
                    break
            if now - last_report >= progress_interval_s:
                self._report()
                last_report = now
            events = sel.select(_select_timeout(wake - time.perf_counter(), bool(s.rate and s.cpus)))
            if events:
                last_io = time.perf_counter()
            elif time.perf_counter() - last_io > io_timeout_s:
                raise TimeoutError(f"no answer from the server for {io_timeout_s:.0f} s")
            for key, mask in events:
                cs = key.data
                if mask & selectors.EVENT_WRITE:
                    self._send(cs, sel)
                if mask & selectors.EVENT_READ:
                    self._receive(cs, sel)
        for cs in conns:
            try:
                cs.sock.close()
            except OSError:
                pass
        sel.close()
        statuses: collections.Counter = collections.Counter()
        errors = self.lost
        for cs in conns:
            statuses.update(cs.codec.status_counts())
            errors += cs.codec.errors
        keys, counts = Latencies.compact(self.lat.counts)
        return {
            "keys": keys, "counts": counts, "max_us": self.lat.max_us, "answered": self.answered,
            "answered_window": self.answered_window, "auth_window": self.auth_window,
            "measured": int(self.lat.counts.sum()), "errors": errors, "lost": self.lost,
            "statuses": dict(statuses), "t_first": self.t_first, "t_last": self.t_last,
            "sent": sum(cs.sent for cs in conns), "tl_answers": self.tl_answers, "tl_max_us": self.tl_max_us,
        }  # fmt: skip

    # -- sending -------------------------------------------------------------
    def _next_frame(self, cs: _Conn, t_ref: float, step: float, n: int) -> bytes | None:
        s = self.spec
        measured = self.w0 <= t_ref < self.w1
        if s.duration is not None and t_ref >= self.w1:
            cs.finished = True
            return None
        pn = cs.codec.p.n
        n = min(n, pn - cs.sent % pn)  # a frame never crosses a cycle of the pattern
        if measured and cs.quota is not None:
            n = min(n, cs.quota - cs.measured_sent)
            if n <= 0:
                cs.finished = True
                return None
        start = cs.sent
        data = cs.codec.encode(start, start + n)
        cs.sent += n
        if measured:
            cs.measured_sent += n
            if t_ref < self.t_first:
                self.t_first = t_ref
        cs.inflight.append(_Frame(n, t_ref, step, measured, start))
        cs.inflight_records += n
        return data

    def _fill_closed(self, cs: _Conn, now: float) -> None:
        if cs.out:
            return
        parts = []
        while len(cs.inflight) < self.spec.window:
            data = self._next_frame(cs, now, 0.0, self.spec.batch)
            if data is None:
                break
            parts.append(data)
        if parts:
            cs.out = memoryview(b"".join(parts))

    def _fill_open(self, cs: _Conn, now: float, spacing: float) -> float | None:
        """Frame the requests whose time has come; returns when to look again.

        A frame leaves when ``batch`` requests are due, or when the oldest
        due one has waited ``open_loop_linger_s`` (a gateway sends what it
        has; a frame never waits for requests that are not due yet).
        """
        parts = []
        pending = len(cs.out)
        b = self.spec.batch
        while pending < outbox_bytes_max and cs.inflight_records < inflight_records_max:
            t_ref = cs.t0 + cs.sent * spacing  # the oldest unsent request's intended time
            if t_ref > now:
                break
            due = min(b, int((now - cs.t0) / spacing) + 1 - cs.sent)
            if due < b and now < t_ref + open_loop_linger_s:
                break
            data = self._next_frame(cs, t_ref, spacing, max(1, due))
            if data is None:
                break
            parts.append(data)
            pending += len(data)
        if parts:
            cs.out = memoryview(bytes(cs.out) + b"".join(parts)) if cs.out else memoryview(b"".join(parts))
        if cs.finished:
            return None
        first = cs.t0 + cs.sent * spacing
        return min(first + open_loop_linger_s, cs.t0 + (cs.sent + b - 1) * spacing)

    def _send(self, cs: _Conn, sel: selectors.BaseSelector) -> None:
        try:
            k = cs.sock.send(cs.out[:recv_bytes])
            cs.out = cs.out[k:]
        except BlockingIOError:
            pass
        except OSError:
            self._lose(cs)
            return
        want_write = bool(cs.out)
        if want_write != cs.writing:
            cs.writing = want_write
            sel.modify(cs.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0), cs)

    # -- receiving -----------------------------------------------------------
    def _receive(self, cs: _Conn, sel: selectors.BaseSelector) -> None:
        try:
            data = cs.sock.recv(recv_bytes)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            sel.unregister(cs.sock)
            self._lose(cs)
            return
        k = cs.codec.feed(data)
        if not k:
            return
        now = time.perf_counter()
        in_window = self.w0 <= now < self.w1
        self.answered += k
        sec = int(now - self.t_start)
        while len(self.tl_answers) <= sec:
            self.tl_answers.append(0)
            self.tl_max_us.append(0)
        self.tl_answers[sec] += k
        slowest = 0
        pattern = cs.codec.p
        while k:
            if not cs.inflight:
                raise ConnectionError("the server answered more requests than were sent")
            fr = cs.inflight[0]
            take = min(k, fr.n - fr.done)
            if fr.measured:
                first_us = (now - fr.t_ref - fr.done * fr.step) * 1e6
                if fr.step:
                    self.lat.add_ramp(first_us, fr.step * 1e6, take)
                else:
                    self.lat.add(first_us, take)
                self.t_last = now
                if first_us > slowest:
                    slowest = first_us
            if in_window:
                self.answered_window += take
                a = fr.start + fr.done
                self.auth_window += pattern.authorisations(a, a + take)
            fr.done += take
            k -= take
            if fr.done == fr.n:
                cs.inflight.popleft()
                cs.inflight_records -= fr.n
        if slowest > self.tl_max_us[sec]:
            self.tl_max_us[sec] = int(slowest)

    def _lose(self, cs: _Conn) -> None:
        """A broken connection: its unanswered requests are errors."""
        if cs.dead:
            return
        cs.dead = True
        cs.finished = True
        for fr in cs.inflight:
            self.lost += fr.n - fr.done
        cs.inflight.clear()
        cs.out = memoryview(b"")
        try:
            cs.sock.close()
        except OSError:
            pass

    def _report(self) -> None:
        delta = self.lat.counts - self.reported
        self.reported = self.lat.counts.copy()
        keys, counts = Latencies.compact(delta)
        errors = self.lost + sum(cs.codec.errors for cs in self.conns)
        self.pipe.send(("progress", {"answered": self.answered, "errors": errors, "keys": keys, "counts": counts}))


def worker_main(spec: WorkerSpec, pipe: Any) -> None:
    try:
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        result = _Worker(spec, pipe).run()
        pipe.send(("done", result))
    except BaseException as e:  # the parent reports it; a worker never hangs the run
        pipe.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        pipe.close()


# --- the parent: drive workers, show progress, aggregate ------------------------------------


@dataclasses.dataclass
class DriveSpec:
    """Everything one measured run needs, whatever the system behind the port."""

    host: str
    port: int
    codec: str = CODECS["binary"]
    codec_options: dict = dataclasses.field(default_factory=dict)
    sys_path: list[str] = dataclasses.field(default_factory=list)
    workload: Workload = dataclasses.field(default_factory=Workload)
    connections: int = connections_default
    processes: int = processes_default
    batch: int = batch_default
    window: int = window_default
    rate: float | None = None
    warmup: float = warmup_default_s
    duration: float | None = duration_default_s
    requests: int | None = None
    id_base: int | None = None
    label: str = "authcore"
    worker: Any = None  # the worker process's function (default: worker_main; bench/peers/postgres.py has its own)
    cpus: tuple[int, ...] | None = None  # generator processes run on these CPUs only (--pin)


class _Display:
    """Live progress on stderr (rich), or nothing when stderr is not a terminal."""

    def __init__(self, enabled: bool, title: str, total_s: float | None):
        self.enabled = enabled
        self.title = title
        self.total_s = total_s
        self.live = None
        self.rows: list[tuple[float, int]] = []
        self.interval = np.zeros(hdr_keys, np.int64)
        self.last = (time.perf_counter(), 0)
        self.rate = 0.0
        self.p = [0, 0]

    def __enter__(self) -> "_Display":
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._render(0, 0, 0, "starting"), console=Console(stderr=True),
                             refresh_per_second=display_refresh_per_s, transient=True)  # fmt: skip
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, elapsed: float, answered: int, errors: int, phase: str) -> None:
        if self.live is None:
            return
        now = time.perf_counter()
        t, a = self.last
        if now - t >= 1.0 / display_refresh_per_s:
            self.rate = (answered - a) / (now - t)
            if self.interval.any():
                self.p = percentiles_of(self.interval)
                self.interval[:] = 0
            self.last = (now, answered)
        self.live.update(self._render(elapsed, answered, errors, phase))

    def _render(self, elapsed: float, answered: int, errors: int, phase: str):
        from rich.table import Table

        t = Table(title=self.title, show_header=True, header_style="bold")
        for col in ("phase", "elapsed", "requests/s", "answered", "errors", "p50", "p99"):
            t.add_column(col, justify="right")
        total = f"/{self.total_s:.0f} s" if self.total_s else " s"
        t.add_row(phase, f"{elapsed:5.1f}{total}", f"{self.rate:,.0f}", f"{answered:,}", f"{errors:,}",
                  fmt_us(self.p[0]), fmt_us(self.p[1]))  # fmt: skip
        return t


def fmt_us(us: float) -> str:
    if us >= 1_000_000:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def drive(d: DriveSpec, progress: bool = False) -> dict:
    """One measured run: start the workers, show progress, aggregate."""
    if d.connections < 1 or d.processes < 1 or d.batch < 1 or d.window < 1:
        raise ValueError("connections, processes, batch and window must be >= 1")
    processes = min(d.processes, d.connections)
    pattern_n = pattern_size(d.connections, d.batch, d.requests)
    expected = (d.rate or 2_000_000) * ((d.duration or 0) + d.warmup + drain_timeout_s)
    id_base = d.id_base if d.id_base is not None else new_id_base(int(max(expected, d.requests or 0) * 2) + 10**8)
    ctx = _mp_context()
    workers = []
    requests_left = d.requests
    for w in range(processes):
        conns = list(range(w, d.connections, processes))
        req = None
        if d.requests is not None:
            req = d.requests * len(conns) // d.connections
            if w == processes - 1:
                req = requests_left
            requests_left -= req
        spec = WorkerSpec(
            host=d.host, port=d.port, codec=d.codec, codec_options={**d.codec_options, "batch": d.batch},
            sys_path=d.sys_path, workload=d.workload, conns=conns, conns_total=d.connections, id_base=id_base,
            pattern_n=pattern_n, batch=d.batch, window=d.window, rate=d.rate, warmup=d.warmup,
            duration=d.duration, requests=req, cpus=d.cpus,
        )  # fmt: skip
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=d.worker or worker_main, args=(spec, child_end), daemon=True)
        proc.start()
        child_end.close()
        workers.append({"proc": proc, "pipe": parent_end, "answered": 0, "result": None})
    try:
        return _supervise(d, workers, progress)
    finally:
        for w in workers:
            w["proc"].join(5)
            if w["proc"].is_alive():
                w["proc"].kill()
                w["proc"].join()
            w["pipe"].close()


_ctx = None


def _mp_context():
    """Workers fork from a server process that has imported this module once
    (a sweep starts many runs; spawn would import numpy for each).  Not plain
    fork: the parent may have threads (the live display, a test's server)."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        # (not this module itself: under ``python -m authcore.loadgen`` it is
        # __main__, and runpy warns when the server imports it twice)
        _ctx.set_forkserver_preload(["numpy", "orjson", "authcore.constants", "authcore.client"])
    return _ctx


def _recv(w: dict, timeout: float) -> tuple[str, Any]:
    if not w["pipe"].poll(timeout):
        raise TimeoutError("a load worker did not answer in time")
    try:
        return w["pipe"].recv()
    except EOFError:
        raise RuntimeError(f"a load worker died (exit code {w['proc'].exitcode})") from None


def _supervise(d: DriveSpec, workers: list[dict], progress: bool) -> dict:
    for w in workers:
        kind, info = _recv(w, ready_timeout_s)
        if kind != "ready":
            raise RuntimeError(f"load worker failed to start: {info}")
    t_start = time.perf_counter() + start_delay_s
    for w in workers:
        w["pipe"].send(("go", t_start))
    total_s = (d.warmup + d.duration) if d.duration is not None else None
    failures = []
    with _Display(progress, f"authcore bench → {d.label}", total_s) as disp:
        pending = {id(w["pipe"]): w for w in workers}
        while pending:
            ready = mp_wait([w["pipe"] for w in pending.values()], timeout=1.0 / display_refresh_per_s)
            for pipe in ready:
                w = pending[id(pipe)]
                try:
                    kind, info = pipe.recv()
                except EOFError:
                    failures.append(f"a load worker died (exit code {w['proc'].exitcode})")
                    del pending[id(pipe)]
                    continue
                if kind == "progress":
                    w["answered"] = info["answered"]
                    w["errors"] = info.get("errors", 0)
                    np.add.at(disp.interval, info["keys"], info["counts"])
                elif kind == "done":
                    w["result"] = info
                    w["answered"] = info["answered"]
                    w["errors"] = info["errors"]
                    del pending[id(pipe)]
                else:
                    failures.append(str(info))
                    del pending[id(pipe)]
            elapsed = time.perf_counter() - t_start
            phase = "warm-up" if elapsed < d.warmup else ("measure" if total_s is None or elapsed < total_s else "drain")
            disp.update(max(0.0, elapsed), sum(w["answered"] for w in workers), sum(w.get("errors", 0) for w in workers), phase)
    if failures:
        raise RuntimeError("; ".join(failures))
    return aggregate(d, [w["result"] for w in workers], t_start)


def aggregate(d: DriveSpec, results: list[dict], t_start: float) -> dict:
    counts = np.zeros(hdr_keys, np.int64)
    statuses: collections.Counter = collections.Counter()
    for r in results:
        np.add.at(counts, r["keys"], r["counts"])
        statuses.update(r["statuses"])
    hist = to_hdr(counts)
    measured = int(counts.sum())
    if d.duration is not None:
        seconds = d.duration
        answered = sum(r["answered_window"] for r in results)
        auths = sum(r["auth_window"] for r in results)
    else:
        t0 = min(r["t_first"] for r in results)
        t1 = max(r["t_last"] for r in results)
        seconds = max(t1 - t0, 1e-9)
        answered = measured
        auths = sum(r["auth_window"] for r in results)  # window is [w0, inf): the measured ones
    return {
        "system": d.label,
        "mode": "open_loop" if d.rate else "closed_loop",
        "requests": measured,
        "seconds": round(seconds, 4),
        "throughput": round(answered / seconds),
        "authorisations_per_s": round(auths / seconds),
        "p50_us": hist.get_value_at_percentile(50.0) if measured else 0,
        "p90_us": hist.get_value_at_percentile(90.0) if measured else 0,
        "p99_us": hist.get_value_at_percentile(99.0) if measured else 0,
        "p999_us": hist.get_value_at_percentile(99.9) if measured else 0,
        "max_us": hist.get_max_value() if measured else 0,
        "mean_us": round(hist.get_mean_value(), 1) if measured else 0,
        "errors": sum(r["errors"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "answered": sum(r["answered"] for r in results),
        "statuses": dict(sorted(statuses.items())),
        "timeline": timeline_of(results),
    }


def timeline_of(results: list[dict]) -> list[list[int]]:
    """[second since the start, answers received in it, slowest measured answer (µs)]."""
    n = max((len(r.get("tl_answers", ())) for r in results), default=0)
    answers = np.zeros(n, np.int64)
    slowest = np.zeros(n, np.int64)
    for r in results:
        a = r.get("tl_answers", [])
        answers[: len(a)] += a
        m = r.get("tl_max_us", [])
        slowest[: len(m)] = np.maximum(slowest[: len(m)], m)
    return [[i, int(answers[i]), int(slowest[i])] for i in range(n)]


# --- accounts ---------------------------------------------------------------------------


def setup_records(accounts: int, id_base: int, cards: bool, currency: int = currency_default) -> np.ndarray:
    """open (credit 10^15) for 1..N, open (no money) for the decline accounts,
    and issue_card for each when the run speaks ISO 8583."""
    from .protocols import binary as wire

    ids = np.concatenate([np.arange(1, accounts + 1, dtype=np.uint64),
                          decline_account_base + np.arange(decline_accounts, dtype=np.uint64)])  # fmt: skip
    n = len(ids)
    opens = np.zeros(n, REQUEST_DTYPE)
    opens["op"] = Op.open
    opens["account"] = ids
    opens["currency"] = currency
    opens["kind"] = Kind.wallet
    opens["amount"][:accounts] = credit_default
    parts = [opens]
    if cards:
        issue = np.zeros(n, REQUEST_DTYPE)
        issue["op"] = Op.issue_card
        issue["account"] = ids
        raw = issue.view(np.uint8).reshape(n, REQUEST_DTYPE.itemsize)
        off = wire.pan_ascii_offset
        for i, a in enumerate(ids):
            raw[i, off : off + wire.pan_ascii_size] = np.frombuffer(wire.pan_to_field(card_pan(int(a))), np.uint8)
        parts.append(issue)
    out = np.concatenate(parts)
    out["id"] = id_base + np.arange(len(out), dtype=np.uint64)
    return out


def setup_accounts(host: str, port: int, protocol: str, accounts: int, cards: bool) -> dict:
    """Open (or top up the credit of) the bench accounts; returns status counts."""
    from .client import Client

    reqs = setup_records(accounts, new_id_base(2 * (accounts + decline_accounts) + 10), cards)
    got: collections.Counter = collections.Counter()
    with Client(host, port, protocol) as c:
        answers = []
        for lo in range(0, len(reqs), setup_chunk):
            part = reqs[lo : lo + setup_chunk]
            if protocol == "binary":
                answers.append(c.submit(part)["status"])
            else:
                st = [a["status"] for a in c.batch(_records_as_json(part))]
                answers.append(np.array([Status[s] for s in st], np.uint8))
        status = np.concatenate(answers)
        # Accounts left by an earlier run: give the wallets their credit line back.
        again = np.flatnonzero((reqs["op"] == Op.open) & (status == Status.account_exists) & (reqs["amount"] > 0))
        if len(again):
            fix = np.zeros(len(again), REQUEST_DTYPE)
            fix["op"] = Op.set_limits
            fix["account"] = reqs["account"][again]
            fix["amount"] = credit_default
            fix["flags"] = FLAG_SET_CREDIT
            fix["id"] = new_id_base(len(again) + 1) + np.arange(len(again), dtype=np.uint64)
            for lo in range(0, len(fix), setup_chunk):
                part = fix[lo : lo + setup_chunk]
                if protocol == "binary":
                    c.submit(part)
                else:
                    c.batch(_records_as_json(part))
    for op, st in zip(reqs["op"], status):
        got[f"{Op(int(op)).name}:{Status(int(st)).name}"] += 1
    bad = {k: v for k, v in got.items() if not k.endswith((":approved", "open:account_exists"))}
    if bad:
        raise RuntimeError(f"account setup failed: {bad}")
    return dict(got)


def _records_as_json(part: np.ndarray) -> list[dict]:
    from .protocols import binary as wire

    out = []
    for r in part:
        op = Op(int(r["op"]))
        d: dict[str, Any] = {"op": op.name, "id": int(r["id"]), "account": int(r["account"])}
        if op == Op.open:
            d.update(currency=int(r["currency"]), kind="wallet", credit_limit=int(r["amount"]))
        elif op == Op.set_limits:
            d["credit_limit"] = int(r["amount"])
        elif op == Op.issue_card:
            raw = r.tobytes()[wire.pan_ascii_offset : wire.pan_ascii_offset + wire.pan_ascii_size]
            d["pan"] = raw.rstrip(b"\0").decode()
        out.append(d)
    return out


# --- the server: started here or given --------------------------------------------------


class ServerUnderTest:
    """A server started on a temporary data dir (``target=None``) or a target."""

    def __init__(self, target: str | None, protocol: str, sync: str, setup_target: str | None = None, *,
                 prefault: bool = False, cpus: tuple[int, ...] | None = None):
        self.target = target
        self.protocol = protocol
        self.sync = sync
        self.setup_target = setup_target
        self.prefault = prefault  # the started server faults its tables in at start
        self.cpus = cpus  # the started server runs on these CPUs only
        self.proc = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "ServerUnderTest":
        if self.target:
            self.host, self.port = _host_port(self.target)
            if self.setup_target:
                self.setup = (*_host_port(self.setup_target), "binary")
            elif self.protocol in ("binary", "json"):
                self.setup = (self.host, self.port, self.protocol)
            else:
                self.setup = None
            return self
        from .cli import spawn_server

        self.tmp = tempfile.TemporaryDirectory(prefix="authcore-bench-")
        root = Path(self.tmp.name)
        cfg = root / "bench.toml"
        cfg.write_text(f'[durability]\nsync = "{self.sync}"\n' + ("[engine]\nprefault = true\n" if self.prefault else ""))
        self.log = open(root / "server.log", "w")
        try:
            self.proc, ports = spawn_server(root / "data", config_path=str(cfg), stderr=self.log, cpus=self.cpus)
        except Exception:
            self.log.close()
            raise RuntimeError(f"could not start a server: {(root / 'server.log').read_text()[-2000:]}") from None
        self.host = "127.0.0.1"
        self.ports = ports
        self.port = ports[self.protocol]
        self.setup = (self.host, ports["binary"], "binary")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            from .cli import stop_server

            stop_server(self.proc)
            self.log.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


# --- command line ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``authcore bench`` options (also used by ``python -m authcore.loadgen``)."""
    p.add_argument("--target", default=None, help="HOST:PORT of a running server's --protocol port (default: start one on a temporary data dir)")
    p.add_argument("--setup-target", default=None, help="HOST:PORT of the target's binary port, to open accounts (needed for --protocol iso8583 with --target)")
    p.add_argument("--no-setup", action="store_true", help="the accounts already exist: open nothing")
    p.add_argument("--protocol", choices=("binary", "json", "iso8583"), default="binary")
    p.add_argument("--connections", type=int, default=connections_default, help="TCP connections, spread over the processes")
    p.add_argument("--processes", type=int, default=processes_default, help="load-generating processes")
    p.add_argument("--duration", type=float, default=duration_default_s, help="seconds measured (after the warm-up)")
    p.add_argument("--warmup", type=float, default=None, help=f"seconds of load before measuring (default {warmup_default_s:g}; 0 with --requests)")
    p.add_argument("--requests", type=int, default=None, help="measure exactly this many requests instead of --duration")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests/s over all connections (absent: closed loop)")
    p.add_argument("--batch", type=int, default=batch_default, help="requests per frame / per write")
    p.add_argument("--window", type=int, default=window_default, help="closed loop: frames in flight per connection")
    p.add_argument("--accounts", type=int, default=accounts_default)
    p.add_argument("--skew", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--zipf-exponent", type=float, default=zipf_exponent_default)
    p.add_argument("--mix", default=mix_default, help=f"preset ({', '.join(MIX_PRESETS)}) or {','.join(k + '=W' for k in KINDS)}")
    p.add_argument("--sync", choices=("always", "none"), default="always", help="durability of a started server")
    p.add_argument("--prefault", action="store_true",
                   help="a started server faults its tables in at start (the steady state, not first touches)")
    p.add_argument("--pin", action="store_true",
                   help="a started server on the first CPU, the generator on the others (Linux)")
    p.add_argument("--seed", type=int, default=20240917)
    p.add_argument("--json", action="store_true", help="print one JSON line (stdout's last line); the table goes to stderr")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also sweep open-loop rates and chart latency against throughput")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="live display (default: when stderr is a terminal)")


def options_of(args: argparse.Namespace) -> dict:
    return {
        "target": args.target, "protocol": args.protocol, "connections": args.connections, "processes": args.processes,
        "duration": args.duration if args.requests is None else None, "warmup": args.warmup, "requests": args.requests,
        "rate": args.rate, "batch": args.batch, "window": args.window, "accounts": args.accounts, "skew": args.skew,
        "zipf_exponent": args.zipf_exponent if args.skew == "zipf" else None,
        "mix": mix_text(parse_mix(args.mix)), "sync": args.sync if not args.target else "target", "seed": args.seed,
        "prefault": args.prefault and not args.target, "pin": args.pin,
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Everything ``authcore bench`` does; returns the JSON result."""
    if args.warmup is None:
        args.warmup = 0.0 if args.requests is not None else warmup_default_s
    mix = parse_mix(args.mix)
    if not 1 <= args.accounts <= accounts_max:
        raise ValueError(f"--accounts must be 1..{accounts_max}")
    if args.rate is not None and args.rate <= 0:
        raise ValueError("--rate must be > 0")
    if args.plot and args.requests is not None:
        raise ValueError("--plot sweeps rates for --duration seconds each; it does not take --requests")
    wl = Workload(accounts=args.accounts, skew=args.skew, zipf_exponent=args.zipf_exponent, mix=tuple(mix.items()),
                  seed=args.seed, transfers=args.protocol != "iso8583")  # fmt: skip
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    server_cpus, generator_cpus = pin_cpus() if args.pin else (None, None)
    with ServerUnderTest(args.target, args.protocol, args.sync, args.setup_target, prefault=args.prefault,
                         cpus=server_cpus) as sut:  # fmt: skip
        if not args.no_setup:
            if sut.setup is None:
                raise ValueError("--protocol iso8583 with --target needs --setup-target HOST:PORT (the binary port) or --no-setup")
            host, port, proto = sut.setup
            setup_accounts(host, port, proto, args.accounts, cards=args.protocol == "iso8583")
        base = DriveSpec(
            host=sut.host, port=sut.port, codec=CODECS[args.protocol], workload=wl, connections=args.connections,
            processes=args.processes, batch=args.batch, window=args.window, rate=args.rate, warmup=args.warmup,
            duration=None if args.requests is not None else args.duration, requests=args.requests,
            label=f"authcore {args.protocol}", cpus=generator_cpus,
        )  # fmt: skip
        result = drive(base, progress)
        result["protocol"] = args.protocol
        result["options"] = options_of(args)
        if args.plot:
            result["sweep"] = sweep(base, args.rate or result["throughput"], progress)
            plot(result["sweep"], args.plot, result)
            result["plot"] = args.plot
    return result


def pin_cpus() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(server CPUs, generator CPUs) for --pin: the server on the first CPU
    this process may use, the generator on the others (the issues' "server
    on one core, load generator on the other")."""
    if not hasattr(os, "sched_getaffinity"):
        raise ValueError("--pin needs Linux (sched_setaffinity)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ValueError(f"--pin needs at least 2 CPUs, this process may use {len(cpus)}")
    return (cpus[0],), tuple(cpus[1:])


def sweep(base: DriveSpec, top: float, progress: bool) -> list[dict]:
    """Open-loop runs at fractions of ``top`` requests/s."""
    points = []
    for f in plot_fractions:
        rate = max(1.0, top * f)
        r = drive(dataclasses.replace(base, rate=rate, requests=None, label=f"{base.label} @ {rate:,.0f}/s"), progress)
        points.append({"rate": round(rate), **{k: r[k] for k in ("throughput", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "errors")}})
    return points


def plot(points: list[dict], path: str, closed: dict | None = None) -> None:
    """Latency percentiles (log) and achieved throughput against the offered rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, ax) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [1, 2]})
    x = [p["rate"] / 1000 for p in points]
    top.plot(x, x, color="grey", linestyle=":", linewidth=1, label="offered")
    top.plot(x, [p["throughput"] / 1000 for p in points], marker="o", color="black", label="achieved")
    if closed is not None:
        top.axhline(closed["throughput"] / 1000, color="grey", linestyle="--", linewidth=1,
                    label=f"closed-loop max {closed['throughput'] / 1000:,.0f} k/s")  # fmt: skip
    top.set_ylabel("thousand requests/s")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        ax.plot(x, [max(1, p[key]) / 1000 for p in points], marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (thousand requests/s, open loop)")
    ax.set_ylabel("latency from intended send (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    opts = (closed or {}).get("options", {})
    fig.suptitle(f"authcore {opts.get('protocol', '')}, sync={opts.get('sync', '?')}, mix {opts.get('mix', '?').split(',')[0]}..., "
                 f"{opts.get('duration', '?')} s per rate", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_table(result: dict, file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"authcore bench: {result.get('protocol', '')} {result['mode'].replace('_', ' ')}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("requests measured", f"{result['requests']:,}"),
        ("seconds", f"{result['seconds']:.2f}"),
        ("throughput", f"{result['throughput']:,} requests/s"),
        ("authorisations", f"{result['authorisations_per_s']:,} /s"),
        ("p50", fmt_us(result["p50_us"])),
        ("p90", fmt_us(result["p90_us"])),
        ("p99", fmt_us(result["p99_us"])),
        ("p99.9", fmt_us(result["p999_us"])),
        ("max", fmt_us(result["max_us"])),
        ("errors", f"{result['errors']:,}"),
        ("statuses", ", ".join(f"{k} {v:,}" for k, v in result["statuses"].items())),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console = Console(file=file, width=100)
    console.print(t)
    for p in result.get("sweep", []):
        console.print(f"  rate {p['rate']:>10,}/s → {p['throughput']:>10,}/s  p50 {fmt_us(p['p50_us'])}  p99 {fmt_us(p['p99_us'])}  p99.9 {fmt_us(p['p999_us'])}")


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        result = run(args)
    except (ValueError, RuntimeError, OSError, TimeoutError) as e:
        print(f"authcore bench: {e}", file=sys.stderr)
        return 1
    summary_table(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(orjson.dumps(result).decode(), flush=True)
    return 1 if result["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="authcore bench", description="load tester for authcore (issue 6)")
    add_arguments(p)
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
