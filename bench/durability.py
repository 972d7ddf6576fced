"""Durability benchmarks: the price of the log, replay, snapshots, recovery.

Goals: the numbers of the durability issue, measured embedded (no network):
throughput with ``sync = "always"`` against ``"none"`` side by side at batch
8192, replay requests/s (full log, no snapshot), snapshot write GB/s and the
writer's stall for a forked snapshot, recovery time (snapshot + log tail).
The workload generator here is also what the recovery and crash tests use
(``Workload``): every operation, duplicates, holds that expire.  A fixed
seed and the state digest are printed so a speed-up cannot quietly change
behaviour.

    python bench/durability.py --accounts 1000000 --seconds 5
    python bench/durability.py --accounts 10000 --seconds 0.5     # CI size

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authcore.config import Config  # noqa: E402
from authcore.constants import FLAG_ALLOW_PARTIAL, FLAG_SET_ALL, REQUEST_DTYPE, Channel, Kind, Op  # noqa: E402

currency = 156
other_currency = 840  # a few requests mismatch on purpose
merchant_base = 1 << 40  # merchant account ids live far from wallet ids
setup_chunk = 65_536
recent_ids_max = 1 << 16  # ids that hold operations and duplicates refer back to

# The mix: every operation of SPEC §3, authorisations dominant.
MIX = {
    Op.authorize: 0.40,
    Op.purchase: 0.10,
    Op.capture: 0.10,
    Op.void: 0.04,
    Op.increment: 0.03,
    Op.refund: 0.03,
    Op.transfer: 0.08,
    Op.deposit: 0.05,
    Op.withdraw: 0.04,
    Op.query: 0.04,
    Op.set_limits: 0.02,
    Op.freeze: 0.01,
    Op.unfreeze: 0.015,
    Op.close: 0.003,
    Op.issue_card: 0.01,
    Op.open: 0.012,
}
duplicate_fraction = 0.02
_total = sum(MIX.values())
MIX = {k: v / _total for k, v in MIX.items()}


class Workload:
    """Deterministic random batches over ``accounts`` wallets and some merchants."""

    def __init__(self, seed: int, accounts: int, merchants: int = 64):
        assert accounts >= 2
        self.rng = np.random.default_rng(seed)
        self.accounts = accounts
        self.merchants = merchants
        self.next_id = 1
        self.recent = np.zeros(0, np.uint64)  # recent request ids (any op)
        self.recent_auths = np.zeros(0, np.uint64)  # recent authorize/purchase ids
        self.ops = np.array(list(MIX), np.uint8)
        self.p = np.array(list(MIX.values()))

    def _ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.uint64)
        self.next_id += n
        return ids

    def setup(self) -> list[np.ndarray]:
        """Batches opening every wallet and merchant and funding the wallets."""
        out = []
        n = self.accounts
        for start in range(0, n, setup_chunk // 2):
            ids = np.arange(start + 1, min(n, start + setup_chunk // 2) + 1, dtype=np.uint64)
            r = np.zeros(2 * len(ids), REQUEST_DTYPE)
            k = len(ids)
            r["id"] = self._ids(2 * k)
            r["op"][:k] = Op.open
            r["account"][:k] = ids
            r["currency"][:k] = currency
            r["amount"][:k] = 50_000  # credit line
            r["daily_limit"][:k] = np.where(ids % 7 == 0, 2_000_000, 0)
            r["single_limit"][:k] = np.where(ids % 11 == 0, 300_000, 0)
            r["op"][k:] = Op.deposit
            r["account"][k:] = ids
            r["amount"][k:] = self.rng.integers(10_000, 5_000_000, size=k)
            out.append(r)
        m = np.zeros(self.merchants, REQUEST_DTYPE)
        m["id"] = self._ids(self.merchants)
        m["op"] = Op.open
        m["account"] = merchant_base + np.arange(1, self.merchants + 1, dtype=np.uint64)
        m["currency"] = currency
        m["kind"] = Kind.merchant
        out.append(m)
        return out

    def batch(self, n: int) -> np.ndarray:
        rng = self.rng
        r = np.zeros(n, REQUEST_DTYPE)
        op = rng.choice(self.ops, size=n, p=self.p)
        r["op"] = op
        r["id"] = self._ids(n)
        acc = rng.integers(1, self.accounts + 1, size=n, dtype=np.uint64)
        r["account"] = acc
        r["amount"] = np.minimum(rng.lognormal(8.5, 1.5, size=n).astype(np.int64) + 1, 10**7)
        r["currency"] = np.where(rng.random(n) < 0.01, other_currency, currency)
        r["to"] = merchant_base + rng.integers(1, self.merchants + 2, size=n, dtype=np.uint64)  # +1: unknown merchant -> settlement
        r["mcc"] = rng.choice(np.array([5411, 5812, 4121, 5999, 7995, 6051], np.uint16), size=n)
        r["country"] = rng.choice(np.array([156, 156, 156, 344, 840], np.uint16), size=n)
        r["channel"] = rng.choice(np.array([Channel.online, Channel.qr, Channel.card_present], np.uint8), size=n)
        r["flags"] = np.where(rng.random(n) < 0.2, FLAG_ALLOW_PARTIAL, 0)
        small = rng.random(n) < 0.1  # card-testing-sized amounts
        r["amount"][small] = rng.integers(1, 200, size=int(small.sum()))
        # transfers: another wallet, channel p2p
        t = op == Op.transfer
        to = rng.integers(1, self.accounts + 1, size=int(t.sum()), dtype=np.uint64)
        to[to == acc[t]] = acc[t][to == acc[t]] % np.uint64(self.accounts) + np.uint64(1)
        r["to"][t] = to
        r["channel"][t] = Channel.p2p
        # hold operations name an earlier authorisation (or an unknown id)
        h = np.isin(op, [Op.capture, Op.void, Op.increment, Op.refund])
        if len(self.recent_auths):
            r["account"][h] = rng.choice(self.recent_auths, size=int(h.sum()))
        cap = op == Op.capture
        r["amount"][cap & (rng.random(n) < 0.6)] = 0  # capture the whole hold
        # open: a few new wallets beyond the initial range (some collide: account_exists)
        o = op == Op.open
        r["account"][o] = rng.integers(self.accounts // 2, self.accounts * 2, size=int(o.sum()), dtype=np.uint64) + 1
        r["currency"][o] = currency
        r["amount"][o] = rng.integers(0, 100_000, size=int(o.sum()))
        # set_limits
        s = op == Op.set_limits
        r["flags"][s] = FLAG_SET_ALL
        r["amount"][s] = rng.integers(0, 100_000, size=int(s.sum()))
        r["single_limit"][s] = rng.choice(np.array([0, 500_000], np.int64), size=int(s.sum()))
        r["daily_limit"][s] = rng.choice(np.array([0, 3_000_000], np.int64), size=int(s.sum()))
        # issue_card: the PAN's keyed hash occupies bytes 16..48; a small pool collides
        c = np.flatnonzero(op == Op.issue_card)
        if len(c):
            pool = rng.integers(1, 50, size=len(c))
            words = np.stack([pool, pool * 3, pool * 5, pool * 7], axis=1).astype(np.int64)
            r["to"][c] = words[:, 0].astype(np.uint64)
            r["amount"][c] = words[:, 1]
            r["single_limit"][c] = words[:, 2]
            r["daily_limit"][c] = words[:, 3]
        # queries and freeze/unfreeze/close: currency "not given"
        r["currency"][np.isin(op, [Op.query, Op.freeze, Op.unfreeze, Op.close, Op.issue_card, Op.set_limits])] = 0
        # duplicates: repeat an earlier id (any content)
        d = np.flatnonzero((rng.random(n) < duplicate_fraction) & (op != Op.query))
        if len(d) and len(self.recent):
            r["id"][d] = rng.choice(self.recent, size=len(d))
        self.recent = np.concatenate([self.recent, r["id"][op != Op.query]])[-recent_ids_max:]
        auth = np.isin(op, [Op.authorize, Op.purchase])
        self.recent_auths = np.concatenate([self.recent_auths, r["id"][auth]])[-recent_ids_max:]
        return r


class StepClock:
    """A deterministic clock (µs) that moves ``step_us`` per call."""

    def __init__(self, start_us: int = 1_700_000_000_000_000, step_us: int = 20_000):
        self.now = start_us
        self.step = step_us

    def __call__(self) -> int:
        self.now += self.step
        return self.now


def bench_config(sync: str, **durability) -> Config:
    return Config.from_dict({"durability": {"sync": sync, **durability}})


def _throughput(data: str, sync: str, accounts: int, batch: int, seconds: float, seed: int) -> dict:
    from authcore.engine import Engine
    from authcore.storage import Storage

    cfg = bench_config(sync)
    st = Storage.open(data, cfg)
    eng = Engine(cfg)
    st.recover(eng)
    eng.attach_log(st)
    wl = Workload(seed, accounts)
    for b in wl.setup():
        eng.submit(b)
    batches = [wl.batch(batch) for _ in range(8)]  # generation outside the timed region
    n = 0
    elapsed = 0.0
    i = 0
    while elapsed < seconds:
        b = batches[i % len(batches)]
        if i >= len(batches):
            b = b.copy()
            b["id"] += np.uint64(i * batch * 4)  # fresh ids: decided, not repeats
        t = time.perf_counter()
        eng.submit(b)
        elapsed += time.perf_counter() - t
        n += batch
        i += 1
    syncs = st.wal.syncs
    st.close()
    return {"requests_per_s": round(n / elapsed), "batches": i, "syncs": syncs, "seconds": round(elapsed, 3), "digest": eng.digest()}


def run(accounts: int, batch: int, seconds: float, seed: int, workdir: str | None) -> dict:
    from authcore import snapshot as snap
    from authcore import storage as S
    from authcore.engine import Engine

    root = tempfile.mkdtemp(prefix="authcore-bench-", dir=workdir)
    try:
        out: dict = {"accounts": accounts, "batch": batch, "seed": seed}
        none = _throughput(os.path.join(root, "none"), "none", accounts, batch, seconds, seed)
        always = _throughput(os.path.join(root, "always"), "always", accounts, batch, seconds, seed)
        out["sync_none_requests_per_s"] = none["requests_per_s"]
        out["sync_always_requests_per_s"] = always["requests_per_s"]
        out["always_over_none"] = round(always["requests_per_s"] / none["requests_per_s"], 3)
        out["syncs_per_s"] = round(always["syncs"] / always["seconds"], 1)
        data = os.path.join(root, "always")
        # Replay: the whole log, no snapshot.
        t = time.perf_counter()
        st = S.Storage.open(data, readonly=True)
        log_requests = st.scan.requests
        digest_replay = S.replay(data)
        replay_s = time.perf_counter() - t
        out["log_requests"] = log_requests
        out["replay_requests_per_s"] = round(log_requests / replay_s)
        out["replay_over_live_none"] = round(out["replay_requests_per_s"] / none["requests_per_s"], 3)
        out["replay_digest_matches_live"] = digest_replay == always["digest"]
        # Snapshot: synchronous write speed, and the writer's stall for a forked one.
        cfg = bench_config("always")
        st = S.Storage.open(data, cfg)
        eng = Engine(cfg)
        st.recover(eng)
        arrays, meta = eng.export_state()
        nbytes = sum(a.nbytes for a in arrays.values())
        t = time.perf_counter()
        path = snap.write_snapshot(os.path.join(root, "snapcopy"), st.wal.last_seq, arrays, {"engine": meta})
        write_s = time.perf_counter() - t
        out["snapshot_bytes"] = nbytes
        out["snapshot_write_gb_per_s"] = round(nbytes / write_s / 1e9, 3)
        # Reading it back the way recovery does: straight into a fresh
        # engine's staged tables (index rebuild included).
        info = snap.read_snapshot_info(path)
        loaded = Engine(cfg)
        t = time.perf_counter()
        loaded.load_state_from(snap.array_specs(info), meta, lambda dests: snap.read_snapshot_into(info, dests))
        out["snapshot_load_gb_per_s"] = round(nbytes / (time.perf_counter() - t) / 1e9, 3)
        out["snapshot_load_digest_matches"] = loaded.digest() == eng.digest()
        del loaded
        # The writer while a forked child writes: fork() itself, then batches
        # that pay copy-on-write faults for the pages they touch first.
        eng.attach_log(st)
        wl = Workload(seed + 1, accounts)
        wl.next_id = 1 << 50
        before = []
        for _ in range(5):
            b = wl.batch(batch)
            t = time.perf_counter()
            eng.submit(b)
            before.append(time.perf_counter() - t)
        job = st.snapshot(eng, background=True)
        out["fork_stall_ms"] = round(job.stall_s * 1e3, 2)
        during = []
        while job.poll() is None and len(during) < 50:
            b = wl.batch(batch)
            t = time.perf_counter()
            eng.submit(b)
            during.append(time.perf_counter() - t)
        st.wait_snapshot()
        out["batch_ms_median_before_snapshot"] = round(float(np.median(before)) * 1e3, 2)
        out["batch_ms_first_after_fork"] = round(during[0] * 1e3, 2) if during else None
        out["batch_ms_max_during_snapshot"] = round(max(during) * 1e3, 2) if during else None
        out["batches_during_snapshot"] = len(during)
        out["snapshot_child_s"] = round(job.finished - job.started, 3)
        # A tail after the snapshot, then recovery (snapshot + tail).
        for _ in range(4):
            eng.submit(wl.batch(batch))
        live = eng.digest()
        st.close()
        t = time.perf_counter()
        st = S.Storage.open(data, cfg)
        eng2 = Engine(cfg)
        rep = st.recover(eng2)
        out["recovery_s"] = round(time.perf_counter() - t, 3)
        out["recovery_snapshot_s"] = round(rep.snapshot_seconds, 3)
        out["recovery_replayed_requests"] = rep.requests_replayed
        out["recovered_digest_matches_live"] = eng2.digest() == live
        st.close()
        out["digest"] = live
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per sync mode")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--dir", default=None, help="where to put the scratch data directories")
    a = ap.parse_args()
    print(json.dumps(run(a.accounts, a.batch, a.seconds, a.seed, a.dir)))


if __name__ == "__main__":
    main()
