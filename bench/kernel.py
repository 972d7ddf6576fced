"""Kernel throughput on a realistic mix, one core, fraud on.

Goals: the number the engine issue targets (authorisations/s at batch 8192
with 1M and 10M accounts), measured on the kernel alone (no log, no
network), with request generation outside the timed region.  A fixed seed
and a digest of the answers are printed so a speed-up cannot quietly change
behaviour.

    python bench/kernel.py --accounts 1000000 --batch 8192 --seconds 10
    python bench/kernel.py --accounts 1000000 --steady

Two states are measured:

- default, a fresh host: the id and hold tables are presized (and
  prefaulted) for ``presize_rate`` x ``--seconds`` requests, so nothing grows
  or is evicted while timed; a kernel faster than that stops early, when one
  more batch would not fit (``stopped_full`` in the output);
- ``--steady``, a host that has run for a while: bounded memories
  (``--ids-max``, ``--holds-max``) full and evicting one entry per new one,
  holds expiring after ``--hold-ttl`` simulated seconds, reached by an
  untimed warm-up.  This is the state a long-running host lives in.

Last line: one JSON object (ops_per_s, auth_per_s, accounts, batch,
bytes_per_account, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authcore import constants as C  # noqa: E402
from authcore.config import Config  # noqa: E402
from authcore.constants import REQUEST_DTYPE, Channel, Op, Status  # noqa: E402
from authcore.engine import Engine  # noqa: E402

templates_count = 16  # distinct pre-generated batches, cycled with id offsets
merchants_count = 10_000
sim_t0_us = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
sim_us_per_request = 10
digest_batches = 32  # answers digested: the same on every run with one seed
presize_rate = 5_000_000  # ops/s a fresh run's tables are presized for (no growth while timed)
steady_ids_max = 1 << 23  # --steady defaults: bounded memories that fill within seconds
steady_holds_max = 1 << 22
steady_hold_ttl_s = 20  # simulated: ~1.6M holds open at 10 µs per request
steady_warmup_max_batches = 10_000
currency = 156
# The mix (fractions of a batch): mostly authorisations, as at a wallet host.
MIX = {"authorize": 0.70, "purchase": 0.10, "capture": 0.08, "void": 0.04, "transfer": 0.05, "deposit": 0.03}
assert abs(sum(MIX.values()) - 1.0) < 1e-9


def open_accounts(eng: Engine, n: int, batch: int) -> None:
    """Open n wallets (ids 1..n) and fund them generously."""
    step = C.batch_count_max // 2  # open + deposit per account in one batch
    # Deposits debit the settlement account, which must stay inside the
    # balance bound: at most half of it in total.
    funding = min(10**11, C.balance_bound // (2 * n))
    for start in range(0, n, step):
        ids = np.arange(start + 1, min(n, start + step) + 1, dtype=np.uint64)
        reqs = np.zeros(len(ids) * 2, REQUEST_DTYPE)
        reqs["op"][: len(ids)] = Op.open
        reqs["id"][: len(ids)] = (1 << 62) + ids
        reqs["account"][: len(ids)] = ids
        reqs["currency"][: len(ids)] = currency
        reqs["amount"][: len(ids)] = 500_000  # credit line
        reqs["op"][len(ids):] = Op.deposit
        reqs["id"][len(ids):] = (1 << 61) + ids
        reqs["account"][len(ids):] = ids
        reqs["amount"][len(ids):] = funding
        ans = eng.submit(reqs)
        assert (ans["status"] == Status.approved).all()


def make_templates(rng: np.random.Generator, accounts: int, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches whose capture/void rows point at authorisations of the batch before."""
    out = []
    ops = np.array([getattr(Op, k) for k in MIX], np.uint8)
    p = np.array(list(MIX.values()))
    for _ in range(templates_count):
        r = np.zeros(batch, REQUEST_DTYPE)
        r["op"] = rng.choice(ops, size=batch, p=p)
        r["account"] = rng.integers(1, accounts + 1, size=batch, dtype=np.uint64)
        r["amount"] = np.minimum(rng.lognormal(8.0, 1.2, size=batch).astype(np.int64) + 1, 10**7)
        r["currency"] = currency
        r["to"] = rng.integers(1, merchants_count + 1, size=batch, dtype=np.uint64) + (1 << 40)
        r["mcc"] = rng.choice(np.array([5411, 5812, 4121, 5999, 7995], np.uint16), size=batch)
        r["country"] = rng.choice(np.array([156, 156, 156, 344], np.uint16), size=batch)
        r["channel"] = rng.choice(np.array([Channel.online, Channel.qr, Channel.card_present], np.uint8), size=batch)
        transfer = r["op"] == Op.transfer
        r["to"][transfer] = rng.integers(1, accounts + 1, size=int(transfer.sum()), dtype=np.uint64)
        same = transfer & (r["to"] == r["account"])
        r["to"][same] = r["account"][same] % accounts + 1
        r["channel"][transfer] = Channel.p2p
        hold_ops = (r["op"] == Op.capture) | (r["op"] == Op.void)
        # Relative position of an authorisation in the previous batch.
        auth_pos = np.flatnonzero(r["op"] == Op.authorize)
        r["account"][hold_ops] = rng.choice(auth_pos, size=int(hold_ops.sum())).astype(np.uint64) + 1
        r["amount"][hold_ops] = 0
        out.append((r, hold_ops))
    return out


def state_bytes(eng: Engine) -> int:
    k = eng._kernel
    arrays, _ = k.state_views()
    total = sum(a.nbytes for a in arrays.values())
    return total


def pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def bench_config(accounts: int, seconds: float, fraud: bool, steady: bool, ids_max: int | None,
                 holds_max: int | None, hold_ttl: int | None) -> Config:
    """Tables sized so nothing grows while timed (fresh) or at the bounds (steady)."""
    if steady:
        ids_max = ids_max or steady_ids_max
        holds_max = holds_max or steady_holds_max
        hold_ttl = hold_ttl or steady_hold_ttl_s
        ids_initial, holds_initial = ids_max, holds_max
    else:
        d = Config.default().engine
        ids_max = ids_max or d.idempotency_ids_max
        holds_max = holds_max or d.holds_retained_max
        run = int(presize_rate * seconds)
        ids_initial = min(ids_max, pow2_at_least(run + accounts * 2))  # the run and the opening batches
        holds_initial = min(holds_max, pow2_at_least(run))
    tree: dict = {"engine": {"accounts_initial": accounts, "ids_initial": ids_initial,
                             "holds_initial": holds_initial, "idempotency_ids_max": ids_max,
                             "holds_retained_max": holds_max}}
    if hold_ttl:
        tree["hold_ttl_seconds"] = hold_ttl
    if not fraud:
        tree["fraud"] = {"enabled": False}
    return Config.from_dict(tree)


class Stream:
    """The batches of a run: templates with fresh ids, rotated accounts."""

    def __init__(self, accounts: int, batch: int, seed: int):
        self.accounts, self.batch = accounts, batch
        self.templates = make_templates(np.random.default_rng(seed), accounts, batch)
        self.i = 0

    def next(self) -> np.ndarray:
        i, batch, accounts = self.i, self.batch, self.accounts
        r, hold_ops = self.templates[i % templates_count]
        spenders = ~hold_ops
        transfers = r["op"] == Op.transfer
        reqs = r.copy()
        reqs["id"] = np.arange(i * batch + 1, (i + 1) * batch + 1, dtype=np.uint64)
        reqs["account"][hold_ops] += np.uint64(max(i - 1, 0) * batch)
        # Rotate the accounts (and transfer receivers) so every account is used.
        shift = np.uint64((i // templates_count) * 7919 % accounts)
        accs = (reqs["account"][spenders] - np.uint64(1) + shift) % np.uint64(accounts) + np.uint64(1)
        reqs["account"][spenders] = accs
        tos = (reqs["to"][transfers] - np.uint64(1) + shift) % np.uint64(accounts) + np.uint64(1)
        reqs["to"][transfers] = tos
        self.i += 1
        return reqs


def run(accounts: int, batch: int, seconds: float, seed: int = 7, fraud: bool = True, cold: bool = False,
        steady: bool = False, ids_max: int | None = None, holds_max: int | None = None,
        hold_ttl: int | None = None) -> dict:
    cfg = bench_config(accounts, seconds, fraud, steady, ids_max, holds_max, hold_ttl)
    # Simulated time: every request advances the clock 10 µs (a 100k/s
    # peak), so fraud windows see a realistic history and the answers (and
    # their digest) are the same on every run with the same seed.
    sim = {"t": sim_t0_us}
    eng = Engine(cfg, clock=lambda: sim["t"])
    k = eng._kernel
    t0 = time.perf_counter()
    open_accounts(eng, accounts, batch)
    if not cold:
        eng.prefault()  # a long-running host has touched its tables
    setup_s = time.perf_counter() - t0
    stream = Stream(accounts, batch, seed)
    # One untimed batch sizes the small tables (merchants, cards) for a batch.
    sim["t"] += batch * sim_us_per_request
    k.decide(stream.next(), eng._stamp(batch))
    warmup = 1
    if steady:  # until both memories are at their bounds and evicting
        while warmup < steady_warmup_max_batches:
            c = k.counters()
            if (c["remembered_head"] > 0 and c["hold_head"] > 0):
                break
            sim["t"] += batch * sim_us_per_request
            k.decide(stream.next(), eng._stamp(batch))
            warmup += 1
        else:
            raise SystemExit("--steady: the memories did not fill; lower --ids-max/--holds-max")
    sizes_before = {n: len(t) for n, t in k.tables().items()}
    stopped_full = False  # fresh: the presized memories ran out before --seconds did
    digest = hashlib.blake2b(digest_size=16)
    ops = auths = 0
    status_counts = np.zeros(len(Status), np.int64)
    i = 0
    elapsed = 0.0
    while elapsed < seconds:
        c = k.counters()
        if not steady and (c["remembered_tail"] + batch > sizes_before["remembered"]
                           or c["hold_tail"] + batch > sizes_before["holds"]):
            stopped_full = True  # one more batch would grow a table while timed
            break
        reqs = stream.next()
        sim["t"] += batch * sim_us_per_request
        t = time.perf_counter()
        ans = k.decide(reqs, eng._stamp(batch))
        elapsed += time.perf_counter() - t
        ops += batch
        auths += int(((reqs["op"] == Op.authorize) | (reqs["op"] == Op.purchase)).sum())
        status_counts += np.bincount(ans["status"], minlength=len(Status))
        if i < digest_batches:  # a fixed prefix: runs are timed, not counted
            digest.update(ans.tobytes())
        i += 1
    grown = sorted(n for n, t in k.tables().items() if len(t) != sizes_before[n])
    nbytes = state_bytes(eng)
    return {
        "ops_per_s": round(ops / elapsed),
        "auth_per_s": round(auths / elapsed),
        "accounts": accounts,
        "batch": batch,
        "seconds": round(elapsed, 3),
        "fraud": fraud,
        "cold": cold,
        "steady": steady,
        "warmup_batches": warmup,
        "ids_max": cfg.engine.idempotency_ids_max,
        "holds_max": cfg.engine.holds_retained_max,
        "hold_ttl_seconds": cfg.hold_ttl_seconds,
        "tables_grown_while_timed": grown,
        "stopped_full": stopped_full,
        "bytes_per_account": round(k.state_views()[0]["accounts"].nbytes / accounts, 1),
        "state_bytes_per_account": round(nbytes / accounts, 1),
        "table_bytes": sum(t.nbytes for t in k.tables().values()),
        "setup_s": round(setup_s, 2),
        "statuses": {Status(s).name: int(c) for s, c in enumerate(status_counts) if c},
        "answers_digest": digest.hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-fraud", action="store_true")
    ap.add_argument("--cold", action="store_true", help="no prefault: include first-touch page faults")
    ap.add_argument("--steady", action="store_true", help="memories full and evicting, holds expiring (warm-up first)")
    ap.add_argument("--ids-max", type=int, help="engine.idempotency_ids_max (default: config's, or 2^23 with --steady)")
    ap.add_argument("--holds-max", type=int, help="engine.holds_retained_max (default: config's, or 2^22 with --steady)")
    ap.add_argument("--hold-ttl", type=int, help="hold_ttl_seconds, simulated (default: config's, or 20 with --steady)")
    a = ap.parse_args()
    print(json.dumps(run(a.accounts, a.batch, a.seconds, a.seed, not a.no_fraud, a.cold, a.steady, a.ids_max,
                         a.holds_max, a.hold_ttl)))


if __name__ == "__main__":
    main()
