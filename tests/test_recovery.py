"""Storage + engine: exact recovery (live == snapshot + tail == full replay),
snapshot fallback, retention, torn and corrupt logs, config changes, the
operator tools (verify, replay, backtest) and fail-closed at the engine."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import kernel_built

pytestmark = pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from durability import StepClock, Workload  # noqa: E402

from authcore import snapshot as snap  # noqa: E402
from authcore import storage as S  # noqa: E402
from authcore import wal as W  # noqa: E402
from authcore.config import Config  # noqa: E402
from authcore.constants import REQUEST_DTYPE, Op, Status  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def config(**durability) -> Config:
    # Short hold TTL so that expiry happens inside the workload; small
    # segments so that the log rotates.
    return Config.from_dict({"hold_ttl_seconds": 1, "durability": {"segment_bytes": 256 * 1024, **durability}})


def start(d, cfg, *, fault=None, truncate_corrupt=False):
    from authcore.engine import Engine

    st = S.Storage.open(d, cfg, fault=fault, truncate_corrupt=truncate_corrupt)
    eng = Engine(cfg, clock=StepClock())
    rep = st.recover(eng)
    eng.attach_log(st)
    return st, eng, rep


def recovered_digest(d, cfg) -> tuple[str, S.RecoveryReport]:
    from authcore.engine import Engine

    st = S.Storage.open(d, cfg)
    try:
        eng = Engine(cfg)
        rep = st.recover(eng)
        assert eng.verify()
        return eng.digest(), rep
    finally:
        st.close()


def run_load(eng, wl, batches, *, sizes=(1, 400)):
    answers = []
    for _ in range(batches):
        n = int(wl.rng.integers(sizes[0], sizes[1]))
        answers.append(eng.submit(wl.batch(n)))
    return answers


def setup(eng, wl):
    for b in wl.setup():
        a = eng.submit(b)
        assert (a["status"] == Status.approved).all()


SNAP = "snapshot"


def logged_state(d, cfg, wl, *steps) -> str:
    """A data dir that took ``wl``'s setup, then each step: that many load
    batches, or SNAP for a synchronous snapshot.  Returns the live digest."""
    st, eng, _ = start(d, cfg)
    setup(eng, wl)
    for step in steps:
        if step == SNAP:
            st.snapshot(eng, background=False)
        else:
            run_load(eng, wl, step)
    live = eng.digest()
    st.close()
    return live


def test_live_equals_snapshot_plus_tail_equals_full_replay(tmp_path):
    cfg = config()
    st, eng, rep = start(tmp_path, cfg)
    assert rep.snapshot is None and rep.records_replayed == 0
    wl = Workload(1, 800)
    setup(eng, wl)
    statuses = set()
    for round_ in range(4):
        for a in run_load(eng, wl, 25):
            statuses.update(int(s) for s in a["status"])
        if round_ == 1:
            assert isinstance(st.snapshot(eng, background=False), str)
        if round_ == 2:
            job = st.snapshot(eng, background=True)
            assert isinstance(job, snap.SnapshotJob)
    assert st.wait_snapshot() in (True, None)
    live = eng.digest()
    assert eng.verify()
    st.close()
    # the workload reaches a broad set of outcomes, expiry included
    assert {Status.approved, Status.auth_closed, Status.suspected_fraud, Status.no_auth} <= statuses
    assert len(W.list_segments(tmp_path / "wal")) > 1
    assert len(snap.list_snapshots(tmp_path / "snapshots")) == 2
    digest, rep = recovered_digest(tmp_path, cfg)
    assert rep.snapshot is not None and rep.records_replayed > 0
    assert digest == live
    assert S.replay(tmp_path) == live
    d2, report = S.verify(tmp_path)
    assert d2 == live and report.ok and report.full_replay_digest == live
    assert all(s["ok"] for s in report.snapshots)


def test_restart_continues_and_stays_exact(tmp_path):
    cfg = config()
    wl = Workload(2, 300)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    for i in range(3):
        run_load(eng, wl, 15)
        st.snapshot(eng, background=(i % 2 == 0))
        st.wait_snapshot()
        run_load(eng, wl, 5)
        live = eng.digest()
        st.close()
        st, eng, rep = start(tmp_path, cfg)
        assert eng.digest() == live
        assert rep.snapshot is not None and rep.tail.decision is W.Decision.end
    st.close()
    assert S.replay(tmp_path) == live


def test_corrupt_newest_snapshot_falls_back_to_older_then_to_full_replay(tmp_path):
    cfg = config(snapshots_kept=3)
    live = logged_state(tmp_path, cfg, Workload(3, 300), 10, SNAP, 10, SNAP, 10, SNAP, 5)
    snaps = snap.list_snapshots(tmp_path / "snapshots")
    assert len(snaps) == 3
    for i, (seq, path) in enumerate(snaps):
        info = snap.read_snapshot_info(path)
        with open(path, "r+b") as f:  # damage an array, not the header
            f.seek(info.arrays[0]["offset"] + 5)
            f.write(b"\xff\xfe")
        digest, rep = recovered_digest(tmp_path, cfg)
        assert digest == live
        assert [p for p, _ in rep.skipped_snapshots] == [p for _, p in snaps[: i + 1]]
        assert rep.snapshot == (snaps[i + 1][1] if i + 1 < len(snaps) else None)
    _, report = S.verify(tmp_path)
    assert report.ok and [s["ok"] for s in report.snapshots] == [False] * 3


def test_retention_covered_removes_segments_and_replay_refuses(tmp_path):
    cfg = config(log_retention="covered", snapshots_kept=1)
    wl = Workload(4, 300)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    run_load(eng, wl, 40)
    before = len(W.list_segments(tmp_path / "wal"))
    st.snapshot(eng, background=False)
    after = W.list_segments(tmp_path / "wal")
    assert 1 <= len(after) < before
    assert after[0][0] > 1
    run_load(eng, wl, 5)
    live = eng.digest()
    st.close()
    digest, rep = recovered_digest(tmp_path, cfg)
    assert digest == live and rep.snapshot is not None
    with pytest.raises(S.StorageError, match="whole log"):
        S.replay(tmp_path)
    d2, report = S.verify(tmp_path)
    assert d2 == live and report.ok and report.full_replay_digest is None
    # losing the only snapshot now makes recovery impossible: refuse, naming the log
    os.unlink(snap.list_snapshots(tmp_path / "snapshots")[0][1])
    with pytest.raises(W.CorruptLog, match="no valid snapshot"):
        recovered_digest(tmp_path, cfg)


def test_snapshot_ahead_of_log_is_skipped(tmp_path):
    """A snapshot covering records the log lost (sync none) is never used."""
    cfg = config()
    wl = Workload(5, 200)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    run_load(eng, wl, 5)
    st.close()
    digest_before, _ = recovered_digest(tmp_path, cfg)
    st, eng, _ = start(tmp_path, cfg)
    run_load(eng, wl, 5)
    st.snapshot(eng, background=False)
    st.close()
    # lose the last 5 records: cut the log back to where the first session ended
    scan = W.scan_log(tmp_path / "wal")
    recs = list(W.read_records(tmp_path / "wal"))
    keep = [r for r in recs if r.seq <= scan.last_seq - 5]  # the second session's 5 batches
    last = keep[-1]
    with open(last.path, "r+b") as f:
        f.seek(last.offset + last.header.record_len)
        f.write(b"\0" * (recs[-1].offset + recs[-1].header.record_len - last.offset - last.header.record_len))
    digest, rep = recovered_digest(tmp_path, cfg)
    assert digest == digest_before
    assert rep.snapshot is None and len(rep.skipped_snapshots) == 1
    assert "beyond" in rep.skipped_snapshots[0][1]


def test_torn_tail_is_cut_and_reported(tmp_path):
    cfg = config()
    wl = Workload(6, 200)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    run_load(eng, wl, 10)
    live = eng.digest()
    seg = st.wal.segment_path
    end = st.wal.offset
    st.close()
    with open(seg, "r+b") as f:  # half a record after the tail
        f.seek(end)
        f.write(b"ACWL" + os.urandom(200))
    _, report = S.verify(tmp_path)  # verify reports, does not cut
    assert report.ok and report.recovery.tail.decision is W.Decision.cut_tail
    digest, rep = recovered_digest(tmp_path, cfg)
    assert digest == live and rep.tail_cut and rep.tail.offset == end and rep.tail.path == seg
    digest, rep = recovered_digest(tmp_path, cfg)  # the cut was made: clean now
    assert digest == live and not rep.tail_cut


def test_corruption_before_tail_refuses_with_file_and_offset(tmp_path):
    cfg = config()
    wl = Workload(7, 200)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    run_load(eng, wl, 20)
    st.close()
    recs = list(W.read_records(tmp_path / "wal"))
    victim = recs[len(recs) // 2]
    with open(victim.path, "r+b") as f:
        f.seek(victim.offset + W.header_size + 3)
        b = f.read(1)
        f.seek(victim.offset + W.header_size + 3)
        f.write(bytes([b[0] ^ 0x80]))
    with pytest.raises(W.CorruptLog) as e:
        S.Storage.open(tmp_path, cfg)
    assert e.value.path == victim.path and e.value.offset == victim.offset
    with pytest.raises(W.CorruptLog):
        S.verify(tmp_path)
    with pytest.raises(W.CorruptLog):
        S.replay(tmp_path)
    r = subprocess.run([sys.executable, "-m", "authcore", "verify", "--data", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and victim.path in r.stderr and str(victim.offset) in r.stderr
    # the explicit override cuts there and serves the prefix
    st, eng, rep = start(tmp_path, cfg, truncate_corrupt=True)
    assert rep.tail.decision is W.Decision.truncate and rep.last_seq == victim.seq - 1
    run_load(eng, wl, 3)
    live = eng.digest()
    st.close()
    assert S.replay(tmp_path) == live


def test_cli_verify_and_replay_print_the_same_digest(tmp_path):
    cfg = config()
    wl = Workload(8, 100)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    run_load(eng, wl, 5)
    live = eng.digest()
    st.close()
    v = subprocess.run([sys.executable, "-m", "authcore", "verify", "--data", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = subprocess.run([sys.executable, "-m", "authcore", "replay", "--data", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert v.returncode == 0 and r.returncode == 0, (v.stderr, r.stderr)
    assert live in v.stdout and live in r.stdout


def test_config_change_is_logged_and_replayed(tmp_path):
    """Decisions made under the old fraud settings replay under them."""
    cfg = config()
    strict = Config.from_dict({**cfg.to_dict(), "fraud": {**cfg.to_dict()["fraud"], "decline_score": 20}})
    wl = Workload(9, 200)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    run_load(eng, wl, 10)
    st.close()
    st, eng, _ = start(tmp_path, strict)
    assert eng.config.fraud.decline_score == 20
    declined = sum(int((a["status"] == Status.suspected_fraud).sum()) for a in run_load(eng, wl, 10))
    assert declined > 0
    st.close()
    st, eng, _ = start(tmp_path, cfg)  # and back
    run_load(eng, wl, 10)
    live = eng.digest()
    st.close()
    configs = W.scan_log(tmp_path / "wal").configs
    assert [S.parse_config_body(b)["decision"]["fraud"]["decline_score"] for _, b in configs] == [80, 20, 80]
    assert S.replay(tmp_path) == live
    assert recovered_digest(tmp_path, cfg)[0] == live


def test_backtest_reports_changed_decisions_per_rule(tmp_path):
    cfg = config()
    wl = Workload(10, 150)
    st, eng, _ = start(tmp_path, cfg)
    setup(eng, wl)
    answers = run_load(eng, wl, 30)
    st.close()
    fraud_declines = sum(int((a["status"] == Status.suspected_fraud).sum()) for a in answers)
    assert fraud_declines > 0
    same = S.backtest(tmp_path, cfg)
    assert same.changed == 0 and same.by_rule == {} and same.decisions > 0
    off = Config.from_dict({**cfg.to_dict(), "fraud": {**cfg.to_dict()["fraud"], "enabled": False}})
    rep = S.backtest(tmp_path, off)
    assert rep.changed > 0
    assert "suspected_fraud->approved" in rep.by_status
    bucket = rep.by_status["suspected_fraud->approved"]
    assert 0 < len(bucket["examples"]) <= S.backtest_examples_max and bucket["count"] >= len(bucket["examples"])
    assert set(rep.by_rule) == {"fraud.enabled"} and rep.by_rule["fraud.enabled"]["changed"] == rep.changed
    # an example really was declined as fraud in production
    ids = {int(i) for a in answers for i in a["id"][a["status"] == Status.suspected_fraud]}
    assert set(bucket["examples"]) & ids
    two = Config.from_dict({**cfg.to_dict(), "fraud": {**cfg.to_dict()["fraud"], "decline_score": 200, "risky_mcc": {"points": 0}}})
    rep2 = S.backtest(tmp_path, two)
    assert set(rep2.by_rule) == {"fraud.decline_score", "fraud.risky_mcc"}
    assert rep2.to_dict()["changed"] == rep2.changed
    r = subprocess.run([sys.executable, "-m", "authcore", "backtest", "--data", str(tmp_path), "--config", "/dev/null"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_second_writer_is_refused(tmp_path):
    cfg = config()
    st, eng, _ = start(tmp_path, cfg)
    with pytest.raises(S.StorageError, match="in use"):
        S.Storage.open(tmp_path, cfg)
    st.close()
    S.Storage.open(tmp_path, cfg).close()


class Faults(W.FaultHook):
    def __init__(self):
        self.write = self.sync = None

    def before_write(self, wal, offset, nbytes):
        if self.write:
            raise OSError(self.write, os.strerror(self.write))

    def before_sync(self, wal):
        if self.sync:
            raise OSError(self.sync, os.strerror(self.sync))


@pytest.mark.parametrize("where", ["write", "sync"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_engine_fails_closed_and_serves_again(tmp_path, where, err):
    from authcore.engine import Unavailable

    assert Unavailable is W.Unavailable
    cfg = config()
    f = Faults()
    st, eng, _ = start(tmp_path, cfg, fault=f)
    wl = Workload(11, 100)
    setup(eng, wl)
    run_load(eng, wl, 3)
    before = eng.digest()
    setattr(f, where, err)
    failed = wl.batch(50)
    with pytest.raises(Unavailable):
        eng.submit(failed)
    assert eng.digest() == before  # nothing of the batch was applied
    assert st.writable
    setattr(f, where, None)
    # the failed ids were never remembered: submitted again they are decided now
    again = eng.submit(failed)
    assert eng.digest() != before
    live = eng.digest()
    st.close()
    assert recovered_digest(tmp_path, cfg)[0] == live
    assert S.replay(tmp_path) == live
    n = sum(1 for r in W.read_records(tmp_path / "wal") if r.kind == W.KIND_BATCH and failed["id"][0] in r.requests()["id"])
    assert n == 1 and len(again) == 50  # logged once: the failed attempt left no trace


def test_requests_are_logged_with_their_stamps(tmp_path):
    cfg = config()
    st, eng, _ = start(tmp_path, cfg)
    wl = Workload(12, 50)
    setup(eng, wl)
    answers = run_load(eng, wl, 5)
    st.close()
    batches = [r for r in W.read_records(tmp_path / "wal") if r.kind == W.KIND_BATCH][-5:]
    for rec, a in zip(batches, answers):
        fresh = a["stamp"] >= rec.header.stamp0  # repeats carry their first stamp
        q = rec.requests()["op"] == Op.query
        assert (a["stamp"][fresh & ~q] == rec.header.stamp0 + np.flatnonzero(fresh & ~q)).all()
        assert rec.requests().dtype == REQUEST_DTYPE


def test_damage_in_log_covered_by_snapshot_is_found_by_verify_not_needed_to_start(tmp_path):
    """Start validates what it replays; verify validates everything."""
    cfg = config()
    live = logged_state(tmp_path, cfg, Workload(13, 200), 40, SNAP, 5)
    segs = W.list_segments(tmp_path / "wal")
    assert len(segs) >= 3
    victim = next(r for r in W.read_records(tmp_path / "wal") if r.path == segs[0][1] and r.seq > 3)
    with open(victim.path, "r+b") as f:
        f.seek(victim.offset + W.header_size + 9)
        f.write(b"\x55")
    digest, rep = recovered_digest(tmp_path, cfg)  # the snapshot covers the damage
    assert digest == live and rep.snapshot is not None
    with pytest.raises(W.CorruptLog) as e:
        S.verify(tmp_path)
    assert e.value.path == victim.path and e.value.offset == victim.offset
    # without the snapshot, recovery must replay the damaged part: refused
    for _, p in snap.list_snapshots(tmp_path / "snapshots"):
        os.unlink(p)
    with pytest.raises(W.CorruptLog) as e:
        recovered_digest(tmp_path, cfg)
    assert e.value.path == victim.path and e.value.offset == victim.offset


def test_snapshot_of_another_state_layout_is_skipped_for_the_log(tmp_path, monkeypatch):
    """A build whose tables are laid out differently replays the log instead."""
    cfg = config()
    live = logged_state(tmp_path, cfg, Workload(7, 200), 5, SNAP)
    monkeypatch.setattr(S, "digest_version", b"authcore-state-v0")
    _, rep = recovered_digest(tmp_path, cfg)
    assert rep.snapshot is None and len(rep.skipped_snapshots) == 1
    assert "state layout" in rep.skipped_snapshots[0][1]
    monkeypatch.undo()
    digest, rep = recovered_digest(tmp_path, cfg)
    assert digest == live and rep.snapshot is not None


def test_tail_request_count_bounds_the_records_after_a_snapshot(tmp_path):
    """Recovery sizes memories for the tail after its snapshot, not the whole
    log: requests_from(seq) is at least the requests from seq on, and at most
    that plus one segment's worth."""
    cfg = config()
    st, eng, _ = start(tmp_path, cfg)
    wl = Workload(12, 300)
    setup(eng, wl)
    run_load(eng, wl, 60)
    st.close()
    scan = S.Storage.open(tmp_path, cfg, readonly=True).scan
    assert len(scan.segments) > 2
    per_seq = {r.seq: (r.header.count if r.kind == W.KIND_BATCH else 0) for r in W.read_records(tmp_path / "wal")}
    by_segment = [sum(c for q, c in per_seq.items() if first <= q < nxt)
                  for (first, _), nxt in zip(scan.segments, [s for s, _ in scan.segments[1:]] + [scan.last_seq + 1])]
    assert scan.requests_from(1) == scan.requests == sum(per_seq.values())
    for seq in range(1, scan.last_seq + 2, 7):
        exact = sum(c for q, c in per_seq.items() if q >= seq)
        assert exact <= scan.requests_from(seq) <= exact + max(by_segment), seq


@pytest.mark.parametrize("damaged", ["first", "last"])
def test_snapshot_damaged_halfway_through_loading_leaves_the_engine_clean(tmp_path, damaged):
    """Snapshots load straight into the new tables; one whose checksum fails
    after other arrays were already read must leave no trace."""
    cfg = config(snapshots_kept=2)
    live = logged_state(tmp_path, cfg, Workload(13, 300), 10, SNAP, 10, SNAP, 5)
    newest = snap.list_snapshots(tmp_path / "snapshots")[0][1]
    info = snap.read_snapshot_info(newest)
    arrays = [a for a in info.arrays if a["nbytes"]]
    target = arrays[0] if damaged == "first" else arrays[-1]
    with open(newest, "r+b") as f:
        f.seek(target["offset"] + target["nbytes"] - 1)
        b = f.read(1)
        f.seek(target["offset"] + target["nbytes"] - 1)
        f.write(bytes([b[0] ^ 0x01]))
    digest, rep = recovered_digest(tmp_path, cfg)
    assert rep.skipped_snapshots == [(newest, f"array {target['name']} checksum mismatch")]
    assert rep.snapshot is not None and rep.snapshot != newest
    assert digest == live


def test_failed_fill_leaves_a_live_engine_unchanged(tmp_path):
    """Engine.load_state_from: if the reader raises after writing into the
    staged tables, the engine keeps its state and decides as before."""
    from authcore.engine import Engine

    cfg = config()
    wl = Workload(14, 200)
    a, b = Engine(cfg, clock=StepClock()), Engine(cfg, clock=StepClock())
    for e in (a, b):
        for batch in wl.setup():
            e.submit(batch)
        wl = Workload(14, 200)
    arrays, meta = a.export_state()
    before = a.digest()

    def garbage_then_fail(dests):
        for pieces in dests.values():
            for p in pieces:
                p[:] = 0xAB
        raise snap.SnapshotError("x", "injected")

    with pytest.raises(snap.SnapshotError):
        a.load_state_from({k: (v.dtype, v.shape) for k, v in arrays.items()}, meta, garbage_then_fail)
    assert a.digest() == before and a.verify()
    more = Workload(15, 200)
    for _ in range(5):
        batch = more.batch(300)
        assert a.submit(batch).tobytes() == b.submit(batch).tobytes()
    assert a.digest() == b.digest()


@pytest.mark.parametrize("interval", [0, 300])
def test_server_snapshots_every_interval_of_logged_requests(tmp_path, interval):
    """The interval counts requests, however they were batched: 600
    requests in batches of 50 cross 300 twice; 0 never snapshots."""
    import time

    from authcore.client import Client
    from authcore.server import ServerThread

    cfg = Config.from_dict({"durability": {"snapshot_interval_requests": interval}})
    with ServerThread(data_dir=tmp_path, config=cfg) as s, Client("127.0.0.1", s.ports["json"], "json") as c:
        assert c.open_account(id=1, account=1, currency=978)["status"] == "approved"
        for k in range(12):
            out = c.batch([{"op": "deposit", "id": 100 + 50 * k + i, "account": 1, "amount": 1} for i in range(50)])
            assert all(a["status"] == "approved" for a in out)
        deadline = time.monotonic() + 20
        while interval and len(snap.list_snapshots(tmp_path / "snapshots")) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        s.call(lambda: s.server.storage.wait_snapshot() if s.server.storage else None)
    snaps = snap.list_snapshots(tmp_path / "snapshots")
    assert (len(snaps) >= 1) if interval else not snaps
    digest, rep = recovered_digest(tmp_path, Config.default())
    assert digest == S.replay(tmp_path)
    assert (rep.snapshot is not None) == bool(interval)


def test_wrapped_rings_snapshot_in_two_runs_and_recover_exactly(tmp_path):
    """Memories full and evicting: the id and hold rings wrap, so a forked
    snapshot writes each as two runs (no joined copy); recovery is exact."""
    cfg = Config.from_dict({"hold_ttl_seconds": 1, "engine": {"idempotency_ids_max": 1024, "holds_retained_max": 1024},
                            "durability": {"segment_bytes": 256 * 1024}})  # fmt: skip
    st, eng, _ = start(tmp_path, cfg)
    wl = Workload(16, 300)
    setup(eng, wl)
    run_load(eng, wl, 30)
    c = eng.counters()
    for ring in ("hold", "remembered"):
        assert c[f"{ring}_head"] > 0  # evicted: the live range has moved on
    arrays, _ = eng._kernel.state_views(ring_runs=True)
    assert len(arrays["remembered"]) == 2 or len(arrays["holds"]) == 2, "neither ring wrapped"
    job = st.snapshot(eng, background=True)
    assert isinstance(job, snap.SnapshotJob) and st.wait_snapshot()
    live = eng.digest()
    st.close()
    digest, rep = recovered_digest(tmp_path, cfg)
    assert rep.snapshot == job.path and digest == live


def test_unusable_image_leaves_a_live_engine_unchanged():
    """An image whose counters are incomplete, or whose rings do not fit the
    rules, is refused before anything of the engine changes."""
    from authcore.engine import Engine

    cfg = config()
    a, b = Engine(cfg, clock=StepClock()), Engine(cfg, clock=StepClock())
    for i in range(1, 6):
        a.execute({"op": "open", "id": i, "account": i, "currency": 840})
    b.execute({"op": "open", "id": 100, "account": 100, "currency": 978})
    arrays, meta = a.export_state()
    before = b.digest()
    lacking = {**meta, "counters": {k: v for k, v in meta["counters"].items() if k != "hold_expire"}}
    with pytest.raises(ValueError, match="hold_expire"):
        b.load_state(arrays, lacking)
    wide = {**arrays, "activity": np.zeros((len(arrays["activity"]), arrays["activity"].shape[1] + 8), np.int64)}
    with pytest.raises(ValueError, match="widths"):
        b.load_state(wide, meta)
    assert b.digest() == before and b.verify()
    assert b.query(100)["status"] == "approved" and b.query(3)["status"] == "no_account"


def test_replayed_tail_counts_toward_the_next_snapshot(tmp_path):
    """250 requests, a restart (they are replayed), 100 more: past the
    interval of 300, so the restarted server snapshots."""
    import time

    from authcore.client import Client
    from authcore.server import ServerThread

    cfg = Config.from_dict({"durability": {"snapshot_interval_requests": 300}})

    def deposits(port, first, n):
        with Client("127.0.0.1", port, "json") as c:
            out = c.batch([{"op": "deposit", "id": first + i, "account": 1, "amount": 1} for i in range(n)])
            assert all(a["status"] == "approved" for a in out)

    with ServerThread(data_dir=tmp_path, config=cfg) as s:
        with Client("127.0.0.1", s.ports["json"], "json") as c:
            assert c.open_account(id=1, account=1, currency=978)["status"] == "approved"
        deposits(s.ports["json"], 10, 249)
    assert not snap.list_snapshots(tmp_path / "snapshots")
    with ServerThread(data_dir=tmp_path, config=cfg) as s:
        assert s.server.requests_since_snapshot == 250
        deposits(s.ports["json"], 1000, 100)
        deadline = time.monotonic() + 20
        while not snap.list_snapshots(tmp_path / "snapshots") and time.monotonic() < deadline:
            time.sleep(0.05)
        s.call(lambda: s.server.storage.wait_snapshot())
    assert snap.list_snapshots(tmp_path / "snapshots")
