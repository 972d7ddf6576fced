"""Kernel throughput on a realistic mix, one core, fraud on.

Goals: the number the engine issue targets (authorisations/s at batch 8192
with 1M and 10M accounts), measured on the kernel alone (no log, no
network), with request generation outside the timed region.  A fixed seed
and a digest of the answers are printed so a speed-up cannot quietly change
behaviour.

    python bench/kernel.py --accounts 1000000 --batch 8192 --seconds 10

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
currency = 156
# The mix (fractions of a batch): mostly authorisations, as at a wallet host.
MIX = {"authorize": 0.70, "purchase": 0.10, "capture": 0.08, "void": 0.04, "transfer": 0.05, "deposit": 0.03}
assert abs(sum(MIX.values()) - 1.0) < 1e-9


def open_accounts(eng: Engine, n: int, batch: int) -> None:
    """Open n wallets (ids 1..n) and fund them generously."""
    step = C.batch_count_max // 2  # open + deposit per account in one batch
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
        reqs["amount"][len(ids):] = 10**11  # 10^8 accounts x 10^11 stays inside ±2^62
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


def run(accounts: int, batch: int, seconds: float, seed: int = 7, fraud: bool = True, cold: bool = False) -> dict:
    cfg = Config.default()
    if not fraud:
        cfg = Config.from_dict({"fraud": {"enabled": False}})
    # Simulated time: every request advances the clock 10 µs (a 100k/s
    # peak), so fraud windows see a realistic history and the answers (and
    # their digest) are the same on every run with the same seed.
    sim = {"t": sim_t0_us}
    eng = Engine(cfg, presize=True, clock=lambda: sim["t"])  # sizes as `authcore serve`
    t0 = time.perf_counter()
    open_accounts(eng, accounts, batch)
    if not cold:
        eng.prefault()  # steady state: a long-running host has touched its tables
    setup_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    templates = make_templates(rng, accounts, batch)
    digest = hashlib.blake2b(digest_size=16)
    ops = auths = 0
    status_counts = np.zeros(len(Status), np.int64)
    i = 0
    elapsed = 0.0
    while elapsed < seconds:
        r, hold_ops = templates[i % templates_count]
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
        sim["t"] += batch * sim_us_per_request
        t = time.perf_counter()
        ans = eng._kernel.decide(reqs, eng._stamp(batch))
        elapsed += time.perf_counter() - t
        ops += batch
        auths += int(((reqs["op"] == Op.authorize) | (reqs["op"] == Op.purchase)).sum())
        status_counts += np.bincount(ans["status"], minlength=len(Status))
        if i < digest_batches:  # a fixed prefix: runs are timed, not counted
            digest.update(ans.tobytes())
        i += 1
    nbytes = state_bytes(eng)
    return {
        "ops_per_s": round(ops / elapsed),
        "auth_per_s": round(auths / elapsed),
        "accounts": accounts,
        "batch": batch,
        "seconds": round(elapsed, 3),
        "fraud": fraud,
        "cold": cold,
        "bytes_per_account": round(eng._kernel.state_views()[0]["accounts"].nbytes / accounts, 1),
        "state_bytes_per_account": round(nbytes / accounts, 1),
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
    a = ap.parse_args()
    print(json.dumps(run(a.accounts, a.batch, a.seconds, a.seed, not a.no_fraud, a.cold)))


if __name__ == "__main__":
    main()
