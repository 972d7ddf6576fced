"""Storage: the log and the snapshots of one data directory, and recovery.

Goals
-----
* ``Storage.open(data_dir, config)`` validates the log (the decision table of
  :mod:`authcore.wal`), cuts a torn tail, and ``recover(engine)`` rebuilds
  the engine: newest valid snapshot + replay of every later record, giving
  the state the acknowledged answers imply, byte for byte the same as a
  fresh replay of the whole log (SPEC §8).
* ``log_batch`` is what ``Engine.attach_log`` calls: durable on return, or
  :class:`Unavailable` (nothing of the batch acknowledged or applied).
* ``snapshot(engine)`` forks a copy-on-write child (a few ms of stall),
  then prunes old snapshots and, with ``log_retention = "covered"``, the
  log segments a kept snapshot covers.
* Operator tools: :func:`verify`, :func:`replay`, :func:`backtest`.

Non-goals: replication, more than one writer (a lock file enforces one),
reading a log while another process appends to it consistently (verify of
a live directory may report the record being written as a torn tail).

Data directory layout::

    <data>/LOCK                   POSIX lock held by the writing process
    <data>/wal/wal-<seq>.log      log segments (authcore.wal)
    <data>/snapshots/snap-<seq>.snap   snapshots covering the log up to <seq>

The decision settings are in the log itself: the first record of a log is a
CONFIG record, and a new one is appended whenever the process starts with
different decision settings; replay applies them where they were logged.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import snapshot as snap
from . import wal as W
from .config import Config
from .constants import ANSWER_DTYPE, Op, Status
from .engine import digest_version
from .wal import CorruptLog, Unavailable

__all__ = ["Storage", "RecoveryReport", "CorruptLog", "Unavailable", "verify", "replay", "backtest"]

wal_dirname = "wal"
snapshots_dirname = "snapshots"
lock_name = "LOCK"
backtest_examples_max = 10  # request ids kept per changed-decision bucket
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StorageError(Exception):
    """A data directory that cannot be opened (in use, log incomplete ...)."""


# --- CONFIG records ------------------------------------------------------------------


def config_body(config: Config) -> bytes:
    """The JSON body of a CONFIG record: what replay needs to decide alike."""
    doc = {
        "decision": config.decision_dict(),
        "engine": {
            "idempotency_ids_max": config.engine.idempotency_ids_max,
            "holds_retained_max": config.engine.holds_retained_max,
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_config_body(body: bytes) -> dict[str, Any]:
    doc = json.loads(body)
    assert isinstance(doc, dict) and "decision" in doc, "CONFIG record without decision settings"
    return doc


def _scratch_config(doc: dict[str, Any] | None) -> Config:
    """A Config for a scratch engine that decides as the logged one did."""
    base = Config.default()
    if doc is None:
        return base
    eng = doc.get("engine") or {}
    d = base.to_dict()
    d["engine"].update({k: v for k, v in eng.items() if k in d["engine"]})
    return Config.from_decision_dict(Config.from_dict(d), doc["decision"])


# --- reports -----------------------------------------------------------------------------


def _tail_dict(tail: W.Tail | None) -> dict[str, Any] | None:
    if tail is None:
        return None
    return {
        "decision": tail.decision.value,
        "reason": tail.reason,
        "path": tail.path,
        "offset": tail.offset,
        "bytes_cut": tail.bytes_cut,
        "segments_dropped": list(tail.segments_dropped),
    }


@dataclasses.dataclass
class RecoveryReport:
    """What recovery did: which snapshot, how much replay, what was cut."""

    snapshot: str | None = None  # path of the snapshot loaded (None: full replay)
    snapshot_seq: int = 0
    skipped_snapshots: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why)
    records_replayed: int = 0
    requests_replayed: int = 0
    configs_applied: int = 0
    tail: W.Tail | None = None  # where the log ended; cut_tail/truncate when something was cut
    last_seq: int = 0
    last_stamp: int = 0
    seconds: float = 0.0
    snapshot_seconds: float = 0.0  # part of ``seconds`` spent loading the snapshot

    @property
    def tail_cut(self) -> bool:
        return self.tail is not None and self.tail.decision in (W.Decision.cut_tail, W.Decision.truncate)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tail"] = _tail_dict(self.tail)
        d["tail_cut"] = self.tail_cut
        d["skipped_snapshots"] = [list(x) for x in self.skipped_snapshots]
        return d


# --- the storage of one data directory ---------------------------------------------------


class Storage:
    """The log and snapshots of a data directory.  Single writer."""

    def __init__(self) -> None:
        raise TypeError("use Storage.open(data_dir, config)")

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        config: Config | None = None,
        *,
        truncate_corrupt: bool = False,
        readonly: bool = False,
        fault: W.FaultHook | None = None,
    ) -> "Storage":
        """Open a data directory: lock it, validate the log, cut a torn tail.

        Raises :class:`CorruptLog` (damage before the tail, naming file and
        offset) unless ``truncate_corrupt``; :class:`StorageError` when
        another process holds the directory.  ``readonly`` changes nothing
        on disk (for verify): no lock, no cut, no appends.
        """
        self = object.__new__(cls)
        self.data_dir = str(data_dir)
        self.config = config or Config.default()
        self.readonly = readonly
        self.wal_dir = os.path.join(self.data_dir, wal_dirname)
        self.snap_dir = os.path.join(self.data_dir, snapshots_dirname)
        self.wal: W.Wal | None = None
        self._lock_fd = -1
        self._job: snap.SnapshotJob | None = None
        self._recovered = False
        self._closed = False
        self.last_snapshot_stall_s = 0.0
        self.snapshots_written = 0
        if readonly:
            if not os.path.isdir(self.wal_dir):
                raise StorageError(f"{self.data_dir}: no log directory {wal_dirname}/")
            self.scan = W.scan_log(self.wal_dir, truncate_corrupt=truncate_corrupt)
            return self
        os.makedirs(self.wal_dir, exist_ok=True)
        os.makedirs(self.snap_dir, exist_ok=True)
        self._lock()
        try:
            snap.remove_stale_temp(self.snap_dir)
            # Validate the log from the newest plausible snapshot on: the part
            # recovery replays.  Older segments are checked when a fallback to
            # an older snapshot replays them, and always by ``verify``.
            hint = 0
            for seq, path in snap.list_snapshots(self.snap_dir):
                try:
                    snap.read_snapshot_info(path)
                except snap.SnapshotError:
                    continue
                hint = seq
                break
            self.scan = W.scan_log(self.wal_dir, truncate_corrupt=truncate_corrupt, from_seq=hint + 1)
            d = self.config.durability
            self.wal = W.Wal.open(self.wal_dir, sync=d.sync, segment_bytes=d.segment_bytes, fault=fault, scan=self.scan)
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        # flock, not lockf: POSIX record locks are per process, so a second
        # Storage in the same process would get the lock and, on close,
        # release the first one's.  A forked snapshot child shares the lock;
        # it dies with its parent (PR_SET_PDEATHSIG), so it cannot keep a
        # killed writer's directory locked for long.
        fd = os.open(os.path.join(self.data_dir, lock_name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(f"{self.data_dir} is in use by another process") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- recovery -----------------------------------------------------------------------

    def recover(self, engine: Any, on_config: Callable[[dict[str, Any]], None] | None = None) -> RecoveryReport:
        """Load the newest valid snapshot into ``engine`` and replay the log after it.

        ``engine`` must be fresh.  CONFIG records are applied through
        ``on_config(doc)`` (default: ``engine.set_decision_config``).  Then,
        when writable, the decision settings of ``self.config`` are put in
        force and logged if they differ from those of the log.
        """
        assert not self._recovered, "recover() runs once"
        t0 = time.perf_counter()
        report, logged, snapshot_crc = _recover_into(engine, self.wal_dir, self.snap_dir, self.scan, on_config)
        report.tail = self.scan.tail
        self._recovered = True
        if self.wal is not None:
            if report.snapshot is not None and self.wal.last_seq == report.snapshot_seq:
                # Retention may have removed the record the snapshot ends on:
                # the chain continues from the checksum the snapshot kept.
                self.wal.last_crc = snapshot_crc
            self.wal.last_stamp = max(self.wal.last_stamp, engine.last_stamp)
            want = parse_config_body(config_body(self.config))
            if logged != want or self.scan.last_seq == 0:
                if logged != want:
                    engine.apply_logged_config(want)
                self.wal.append_config(config_body(self.config))
        report.seconds = time.perf_counter() - t0
        self.report = report
        return report

    # -- the engine's log ----------------------------------------------------------------

    def log_batch(self, stamp0: int, requests: np.ndarray) -> None:
        """Make a batch durable (engine.attach_log).  Raises Unavailable."""
        assert self.wal is not None, "storage opened read-only"
        assert self._recovered, "recover() before logging"
        if self._job is not None:
            self._reap(block=False)
        self.wal.append_batch(stamp0, requests)

    @property
    def writable(self) -> bool:
        return self.wal is not None and self.wal.state is W.WalState.open

    def sync(self) -> None:
        if self.wal is not None and self.wal.state is W.WalState.open:
            self.wal.sync()

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self, engine: Any, background: bool = True) -> snap.SnapshotJob | str | None:
        """Snapshot the engine as of the last logged record.

        Call between batches from the engine's thread.  ``background``
        forks a child and returns its :class:`~authcore.snapshot.SnapshotJob`
        (or None while an earlier one is still running); otherwise writes
        synchronously and returns the path.
        """
        assert self.wal is not None and self._recovered
        if self._job is not None and not self._reap(block=False):
            return None
        seq = self.wal.last_seq
        path = os.path.join(self.snap_dir, snap.snapshot_name(seq))
        if os.path.exists(path):
            return path if not background else None
        storage_meta = {"wal_seq": seq, "wal_crc": self.wal.last_crc, "last_stamp": int(engine.last_stamp), "created_unix_s": time.time()}
        assert engine.last_stamp >= self.wal.last_stamp or self.wal.last_stamp == 0

        def export() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            arrays, meta = _export(engine)
            return arrays, {"engine": meta, "storage": storage_meta}

        if background:
            job = snap.fork_snapshot(self.snap_dir, seq, _in_child(export))
            self._job = job
            self.last_snapshot_stall_s = job.stall_s
            return job
        arrays, meta = export()
        out = snap.write_snapshot(self.snap_dir, seq, arrays, meta)
        self.snapshots_written += 1
        self._retain()
        return out

    def wait_snapshot(self) -> bool | None:
        """Block until a background snapshot is done; its success (None: none ran)."""
        job = self._job
        if job is None:
            return None
        self._reap(block=True)
        return job.status

    def _reap(self, block: bool) -> bool:
        """True when no child is running any more (and retention has run)."""
        job = self._job
        assert job is not None
        status = job.wait() if block else job.poll()
        if status is None:
            return False
        self._job = None
        if status:
            self.snapshots_written += 1
            try:
                self._retain()
            except OSError:
                pass  # retention is retried after the next snapshot; never fail a batch for it
        return True

    def _retain(self) -> None:
        d = self.config.durability
        snap.prune_snapshots(self.snap_dir, keep=max(1, d.snapshots_kept))
        if d.log_retention == "covered" and self.wal is not None:
            kept = snap.list_snapshots(self.snap_dir)
            if kept:
                oldest_kept = kept[-1][0]
                W.remove_segments_before(self.wal_dir, oldest_kept, keep_path=self.wal.segment_path)

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._job is not None:
                self._reap(block=True)
        finally:
            if self.wal is not None:
                self.wal.close()
            self._unlock()

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _export(engine: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The engine's state without an extra copy when it offers one.

    In the forked child the state is already a private copy-on-write image,
    so copying it again would only double the memory at 10^8 accounts.
    """
    try:
        return engine.export_state(copy=False)
    except TypeError:
        return engine.export_state()


def _in_child(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a snapshot child's work: die with the parent (no orphan writers)."""

    parent = os.getpid()

    def run() -> Any:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            raise RuntimeError("parent exited")
        return fn()

    return run


# --- recovery, shared by Storage.recover, verify, replay and backtest --------------------


def _load_snapshot(engine: Any, snap_dir: str, scan: W.LogScan, skipped: list[tuple[str, str]]) -> tuple[int, str, dict[str, Any]] | None:
    """Load the newest snapshot that is valid and that the present log
    continues into ``engine``: (seq, path, meta), or None (engine untouched).

    Each snapshot is read straight into the engine's new tables; one that
    fails its checksums halfway is dropped and the next one tried.
    """
    for seq, path in snap.list_snapshots(snap_dir):
        if seq > scan.last_seq:
            skipped.append((path, f"covers sequence {seq}, beyond the log's last record {scan.last_seq}"))
            continue
        if seq + 1 < scan.first_seq:
            skipped.append((path, f"the log records after it (from {seq + 1}) were removed"))
            continue
        try:
            info = snap.read_snapshot_info(path)
        except snap.SnapshotError as e:
            skipped.append((path, e.reason))
            continue
        meta = info.meta
        st = meta.get("storage", {})
        if st.get("wal_seq") != seq or "engine" not in meta:
            skipped.append((path, "snapshot meta does not match its name"))
            continue
        layout = meta["engine"].get("digest_version")
        if layout != digest_version.decode():
            skipped.append((path, f"state layout {layout!r}; this build reads {digest_version.decode()!r}"))
            continue
        try:
            engine.load_state_from(snap.array_specs(info), meta["engine"], functools.partial(snap.read_snapshot_into, info))
        except snap.SnapshotError as e:
            skipped.append((path, e.reason))
            continue
        except (ValueError, KeyError, TypeError) as e:  # a TOC whose arrays do not fit this build
            skipped.append((path, f"unusable arrays: {e}"))
            continue
        return seq, path, meta
    return None


def _recover_into(
    engine: Any,
    wal_dir: str,
    snap_dir: str | None,
    scan: W.LogScan,
    on_config: Callable[[dict[str, Any]], None] | None,
    batch_hook: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> tuple[RecoveryReport, dict[str, Any], int | None]:
    """Snapshot + replay into ``engine``: (report, decision settings in force
    at the end of the log, the snapshot's last-record checksum)."""
    report = RecoveryReport()
    start_seq, prev_crc = 1, None
    logged: dict[str, Any] | None = None
    t = time.perf_counter()
    chosen = _load_snapshot(engine, snap_dir, scan, report.skipped_snapshots) if snap_dir else None
    if chosen is not None:
        seq, path, meta = chosen
        report.snapshot, report.snapshot_seq = path, seq
        report.snapshot_seconds = time.perf_counter() - t
        start_seq, prev_crc = seq + 1, meta["storage"]["wal_crc"]
        if meta["engine"].get("decision") is not None:
            logged = engine.logged_config()
    elif scan.first_seq > 1:
        first = scan.segments[0][1] if scan.segments else wal_dir
        raise CorruptLog(first, 0, f"the log starts at sequence {scan.first_seq} and no valid snapshot covers the records before it")
    apply = on_config or engine.apply_logged_config
    engine.expect_requests(scan.requests_from(start_seq))  # an upper bound for the tail: grow once, not by doubling
    for rec in W.read_records(wal_dir, start_seq=start_seq, stop_seq=scan.last_seq, prev_crc=prev_crc):
        if rec.kind == W.KIND_BATCH:
            reqs = rec.requests()
            answers = engine.replay_batch(rec.header.stamp0, reqs)
            if batch_hook is not None:
                batch_hook(rec.seq, reqs, answers)
            report.requests_replayed += rec.header.count
        else:
            doc = parse_config_body(rec.config_json())
            apply(doc)
            logged = {"decision": doc["decision"], "engine": doc.get("engine") or engine.memory_bounds()}
            report.configs_applied += 1
        report.records_replayed += 1
    report.last_seq = scan.last_seq
    report.last_stamp = int(engine.last_stamp)
    if logged is None:
        logged = engine.logged_config()
    return report, logged, prev_crc


def _first_config(scan: W.LogScan) -> dict[str, Any] | None:
    if scan.configs and scan.first_seq == 1:
        return parse_config_body(scan.configs[0][1])
    return None


def _fresh_engine(doc: dict[str, Any] | None) -> Any:
    from .engine import Engine

    return Engine(_scratch_config(doc))


# --- operator tools -----------------------------------------------------------------------


@dataclasses.dataclass
class VerifyReport:
    """``authcore verify``: ok, the digest, and what was checked."""

    digest: str
    ok: bool
    recovery: RecoveryReport
    records: int
    requests: int
    segments: int
    snapshots: list[dict[str, Any]]  # every snapshot: path, seq, ok, reason
    full_replay_digest: str | None  # when the whole log is present and a snapshot was used
    problems: list[str]

    def __iter__(self) -> Iterator[Any]:  # ``digest, report = verify(d)``
        return iter((self.digest, self))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "digest": self.digest,
            "records": self.records,
            "requests": self.requests,
            "segments": self.segments,
            "snapshots": self.snapshots,
            "full_replay_digest": self.full_replay_digest,
            "problems": self.problems,
            "recovery": self.recovery.to_dict(),
        }


def verify(data_dir: str | os.PathLike[str], *, cross_check: bool = True) -> VerifyReport:
    """Check every checksum of the log and snapshots, recover into a fresh
    engine and return its digest.  Changes nothing on disk.

    A torn tail is reported (``recovery.tail``), not an error; damage before
    the tail raises :class:`CorruptLog`.  A damaged snapshot is reported
    and skipped, as recovery would.  With ``cross_check`` and the whole log
    present, the digest of a full replay must equal the recovered one.
    """
    st = Storage.open(data_dir, readonly=True)
    scan = st.scan
    snaps = []
    for seq, path in snap.list_snapshots(st.snap_dir):
        try:
            snap.read_snapshot(path)
            snaps.append({"path": path, "seq": seq, "ok": True, "reason": ""})
        except snap.SnapshotError as e:
            snaps.append({"path": path, "seq": seq, "ok": False, "reason": e.reason})
    t0 = time.perf_counter()
    engine = _fresh_engine(_first_config(scan))
    rec, _, _ = _recover_into(engine, st.wal_dir, st.snap_dir, scan, None)
    rec.tail = scan.tail
    rec.seconds = time.perf_counter() - t0
    digest = engine.digest()
    problems = []
    if not engine.verify():
        problems.append("engine invariants do not hold after recovery")
    full = None
    if cross_check and rec.snapshot is not None and scan.first_seq == 1:
        full = replay(data_dir)
        if full != digest:
            problems.append(f"snapshot {rec.snapshot} + log gives {digest}, full replay gives {full}")
    return VerifyReport(digest, not problems, rec, scan.records, scan.requests, len(scan.segments), snaps, full, problems)


def replay(data_dir: str | os.PathLike[str]) -> str:
    """Rebuild the state from the log alone (snapshots ignored); its digest.

    Needs the whole log: ``log_retention = "all"`` (the default).
    """
    st = Storage.open(data_dir, readonly=True)
    scan = st.scan
    if scan.first_seq > 1:
        raise StorageError(
            f"replay needs the whole log but it starts at sequence {scan.first_seq} "
            '(segments were removed: durability.log_retention = "covered")'
        )
    engine = _fresh_engine(_first_config(scan))
    _recover_into(engine, st.wal_dir, None, scan, None)
    return engine.digest()


# --- backtest --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Variant:
    """A scratch engine deciding the log under transformed decision settings."""

    name: str
    transform: Callable[[dict[str, Any]], dict[str, Any]]
    engine: Any = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    changed: int = 0


def _decision_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ: "hold_ttl_seconds", "fraud.<rule>" or "fraud.<scalar>"."""
    keys = []
    if old.get("hold_ttl_seconds") != new.get("hold_ttl_seconds"):
        keys.append("hold_ttl_seconds")
    for k in sorted(set(old["fraud"]) | set(new["fraud"])):
        if old["fraud"].get(k) != new["fraud"].get(k):
            keys.append(f"fraud.{k}")
    return keys


def _override(key: str, new: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def transform(d: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(json.dumps(d))
        if key == "hold_ttl_seconds":
            d[key] = new[key]
        else:
            d["fraud"][key.split(".", 1)[1]] = new["fraud"][key.split(".", 1)[1]]
        return d

    return transform


@dataclasses.dataclass
class BacktestReport:
    records: int
    decisions: int  # state-changing requests compared (queries excluded)
    changed: int
    by_status: dict[str, dict[str, Any]]  # "old->new": {count, examples}
    by_rule: dict[str, dict[str, Any]]  # setting: {changed, by_status}
    from_seq: int
    snapshot: str | None
    seconds: float
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def backtest(data_dir: str | os.PathLike[str], new_config: Config) -> BacktestReport:
    """Replay the log under other decision settings and report changed decisions.

    Scratch engines replay the same requests at the same stamps: one under
    the logged settings, one under ``new_config``'s, and one per changed
    setting (the logged settings with only that rule taken from
    ``new_config``), so each rule's own effect is visible.  Compared per
    request: status, approved amount and review.  Decisions are counted
    per ``"old->new"`` status with example request ids.  Each engine
    follows its own decisions (a newly declined payment leaves funds that
    a later one may use), so this is the counterfactual history, not a
    per-request diff.  Production files are only read.
    """
    t0 = time.perf_counter()
    st = Storage.open(data_dir, readonly=True)
    scan = st.scan
    new_decision = new_config.decision_dict()
    first_doc = _first_config(scan)
    start_seq, prev_crc, snapshot_state, snapshot_path = 1, None, None, None
    if scan.first_seq > 1:
        # The log's beginning was removed: start all engines from the oldest
        # usable snapshot rather than refuse.
        for seq, path in reversed(snap.list_snapshots(st.snap_dir)):
            if scan.first_seq - 1 <= seq <= scan.last_seq:
                try:
                    snapshot_state = snap.read_snapshot(path)
                except snap.SnapshotError:
                    continue
                start_seq, prev_crc, snapshot_path = seq + 1, snapshot_state[1]["storage"]["wal_crc"], path
                break
        else:
            raise StorageError(f"backtest: the log starts at sequence {scan.first_seq} and no snapshot covers the records before it")
    logged_decision = (first_doc or {}).get("decision") or Config.default().decision_dict()
    if snapshot_state is not None:
        logged_decision = snapshot_state[1]["engine"].get("decision", logged_decision)
    variants = [_Variant("logged", lambda d: d), _Variant("new", lambda d: new_decision)]
    for key in _decision_keys(logged_decision, new_decision):
        variants.append(_Variant(key, _override(key, new_decision)))
    for v in variants:
        v.engine = _fresh_engine(first_doc)
        if snapshot_state is not None:
            arrays, meta = snapshot_state
            v.engine.load_state({k: a.copy() for k, a in arrays.items()}, meta["engine"])
        v.engine.set_decision_config(v.transform(logged_decision))
    base, others = variants[0], variants[1:]
    records = decisions = 0
    for rec in W.read_records(st.wal_dir, start_seq=start_seq, stop_seq=scan.last_seq, prev_crc=prev_crc):
        records += 1
        if rec.kind == W.KIND_CONFIG:
            d = parse_config_body(rec.config_json())["decision"]
            for v in variants:
                v.engine.set_decision_config(v.transform(d))
            continue
        reqs = rec.requests()
        a0 = base.engine.replay_batch(rec.header.stamp0, reqs)
        mask = reqs["op"] != Op.query
        decisions += int(mask.sum())
        for v in others:
            a1 = v.engine.replay_batch(rec.header.stamp0, reqs)
            _compare(v, reqs, a0, a1, mask)
    new = variants[1]
    by_rule = {v.name: {"changed": v.changed, "by_status": _buckets(v)} for v in variants[2:]}
    return BacktestReport(records, decisions, new.changed, _buckets(new), by_rule, start_seq, snapshot_path, time.perf_counter() - t0)


def _compare(v: _Variant, reqs: np.ndarray, a0: np.ndarray, a1: np.ndarray, mask: np.ndarray) -> None:
    diff = mask & ((a0["status"] != a1["status"]) | (a0["approved_amount"] != a1["approved_amount"]) | (a0["review"] != a1["review"]))
    idx = np.flatnonzero(diff)
    if not len(idx):
        return
    v.changed += len(idx)
    names = [s.name for s in Status]
    for i in idx:
        s0, s1 = int(a0["status"][i]), int(a1["status"][i])
        key = f"{names[s0]}->{names[s1]}"
        if s0 == s1:
            key += " (amount or review)"
        v.counts[key] = v.counts.get(key, 0) + 1
        ex = v.examples.setdefault(key, [])
        if len(ex) < backtest_examples_max:
            ex.append(int(reqs["id"][i]))


def _buckets(v: _Variant) -> dict[str, dict[str, Any]]:
    return {k: {"count": n, "examples": v.examples[k]} for k, n in sorted(v.counts.items(), key=lambda kv: -kv[1])}


assert ANSWER_DTYPE.fields is not None and "status" in ANSWER_DTYPE.fields
