"""Snapshots on their own: round trip, checksums, crash-consistent naming,
forked copy-on-write writing, retention."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from authcore import snapshot as S
from authcore.layout import ACCOUNT_DTYPE, HOLD_DTYPE


def sample_arrays(rng, n=1000):
    acc = np.zeros(n, dtype=ACCOUNT_DTYPE)
    acc["id"] = np.arange(1, n + 1)
    acc["balance"] = rng.integers(-(2**62), 2**62, size=n)
    acc["currency"] = 840
    holds = np.zeros(n // 3, dtype=HOLD_DTYPE)
    holds["remaining"] = rng.integers(0, 10**15, size=len(holds))
    return {
        "accounts": acc,
        "holds": holds,
        "index": rng.integers(0, 2**63, size=4099, dtype=np.uint64),
        "grid": rng.integers(0, 100, size=(7, 5), dtype=np.int32),
        "empty": np.zeros(0, dtype=HOLD_DTYPE),
        "sub": np.zeros(3, dtype=[("x", "<i8", (4,)), ("y", "u1")]),
    }


META = {"last_stamp": 1_700_000_000_123_456, "count": np.int64(2**62), "name": "x", "key": b"\x00\xff", "nested": {"a": [1, 2]}, "flag": True, "none": None}


def test_round_trip(tmp_path, rng=np.random.default_rng(5)):
    arrays = sample_arrays(rng)
    path = S.write_snapshot(tmp_path, 42, arrays, META)
    assert os.path.basename(path) == S.snapshot_name(42)
    back, meta = S.read_snapshot(path)
    assert list(back) == list(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape, k
        assert back[k].tobytes() == a.tobytes(), k
    assert meta == {**META, "count": 2**62}
    info = S.read_snapshot_info(path)
    assert info.seq == 42 and all(a["offset"] % S.array_align == 0 for a in info.arrays)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("where", ["header", "toc", "array", "padding_free_tail"])
def test_damage_is_detected(tmp_path, where, rng=np.random.default_rng(6)):
    path = S.write_snapshot(tmp_path, 1, sample_arrays(rng), META)
    info = S.read_snapshot_info(path)
    size = os.path.getsize(path)
    off = {
        "header": 20,
        "toc": size - 10,
        "array": info.arrays[0]["offset"] + 777,
        "padding_free_tail": info.arrays[2]["offset"] + info.arrays[2]["nbytes"] - 1,
    }[where]
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(S.SnapshotError) as e:
        S.read_snapshot(path)
    assert e.value.path == path


def test_truncated_snapshot_is_detected(tmp_path, rng=np.random.default_rng(7)):
    path = S.write_snapshot(tmp_path, 1, sample_arrays(rng), META)
    for cut in (0, 30, 5000, os.path.getsize(path) - 1):
        p2 = tmp_path / f"copy{cut}"
        with open(path, "rb") as f:
            p2.write_bytes(f.read()[:cut])
        with pytest.raises(S.SnapshotError):
            S.read_snapshot(p2)


def test_fork_snapshot_is_a_consistent_image(tmp_path, rng=np.random.default_rng(8)):
    """The child writes the state as of the fork while the parent keeps mutating it."""
    big = np.zeros(8 << 20, dtype=np.int64)  # 64 MiB: the child takes a while
    big[:] = 7
    before = big.copy()
    job = S.fork_snapshot(tmp_path, 9, lambda: ({"big": big}, {"last_stamp": 1}), {"wal_seq": 9})
    big[:] = -1  # the parent goes on deciding: copy-on-write keeps the child's view
    assert job.stall_s < 1.0
    deadline = time.monotonic() + 60
    while job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert job.status is True and job.poll() is True
    arrays, meta = S.read_snapshot(job.path)
    assert np.array_equal(arrays["big"], before)
    assert meta == {"last_stamp": 1, "wal_seq": 9}


def test_fork_snapshot_failure_is_reported_not_raised(tmp_path, capfd):
    def boom():
        raise RuntimeError("export failed")

    job = S.fork_snapshot(tmp_path, 3, boom)
    assert job.wait() is False
    assert not os.path.exists(job.path)
    assert "export failed" in capfd.readouterr().err


def test_list_and_prune(tmp_path, rng=np.random.default_rng(9)):
    arrays = {"a": np.arange(10)}
    for seq in (5, 10, 20, 30):
        S.write_snapshot(tmp_path, seq, arrays, {"s": seq})
    assert [s for s, _ in S.list_snapshots(tmp_path)] == [30, 20, 10, 5]
    # the newest is damaged: it is kept (newer than every good one), not counted
    newest = S.list_snapshots(tmp_path)[0][1]
    with open(newest, "r+b") as f:
        f.write(b"X")
    removed = S.prune_snapshots(tmp_path, keep=2)
    assert sorted(os.path.basename(p) for p in removed) == [S.snapshot_name(5)]
    assert [s for s, _ in S.list_snapshots(tmp_path)] == [30, 20, 10]
    (tmp_path / "snap-x.tmp").write_bytes(b"junk")
    S.remove_stale_temp(tmp_path)
    assert not (tmp_path / "snap-x.tmp").exists()


def test_buffered_fallback_without_o_direct(tmp_path, monkeypatch, rng=np.random.default_rng(10)):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    arrays = sample_arrays(rng, 300)
    path = S.write_snapshot(tmp_path, 2, arrays, META)
    back, _ = S.read_snapshot(path)
    assert all(back[k].tobytes() == a.tobytes() for k, a in arrays.items())


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_snapshot_on_tmpfs(rng=np.random.default_rng(11)):
    """tmpfs may refuse O_DIRECT: the writer and reader fall back to buffered I/O."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        arrays = sample_arrays(rng, 300)
        path = S.write_snapshot(d, 3, arrays, META)
        back, _ = S.read_snapshot(path)
        assert all(back[k].tobytes() == a.tobytes() for k, a in arrays.items())


def test_job_reaped_elsewhere_is_judged_by_its_file(tmp_path):
    job = S.fork_snapshot(tmp_path, 4, lambda: ({"a": np.arange(5)}, {}))
    os.waitpid(job.pid, 0)  # e.g. an event loop's SIGCHLD handler got there first
    assert job.poll() is True and job.wait() is True
    bad = S.fork_snapshot(tmp_path, 5, lambda: 1 / 0)
    os.waitpid(bad.pid, 0)
    assert bad.wait() is False


@pytest.mark.parametrize("direct", [True, False])
def test_read_into_scattered_destinations(tmp_path, monkeypatch, direct, rng=np.random.default_rng(12)):
    """read_snapshot_into: every array lands in its pieces in order (ring
    runs), across many bounce-buffer chunks, with and without O_DIRECT."""
    monkeypatch.setattr(S, "read_chunk_bytes", 2 * S.array_align)  # many chunks, pieces crossing them
    if not direct:
        monkeypatch.delattr(S.os, "O_DIRECT", raising=False)
    arrays = sample_arrays(rng, n=997)
    path = S.write_snapshot(tmp_path, 3, arrays, META)
    info = S.read_snapshot_info(path)
    assert {k: (d, s) for k, (d, s) in S.array_specs(info).items()} == {k: (a.dtype, a.shape) for k, a in arrays.items()}
    dests = {}
    for name, a in arrays.items():
        n = a.nbytes
        cuts = sorted(rng.integers(0, n + 1, size=2).tolist()) if n else [0, 0]
        dests[name] = [np.full(hi - lo, 0x5A, np.uint8) for lo, hi in zip([0] + cuts, cuts + [n])]
    S.read_snapshot_into(info, dests)
    for name, a in arrays.items():
        assert b"".join(p.tobytes() for p in dests[name]) == a.tobytes(), name


def test_read_into_detects_damage_and_truncation(tmp_path, rng=np.random.default_rng(13)):
    arrays = sample_arrays(rng)
    path = S.write_snapshot(tmp_path, 4, arrays, META)
    info = S.read_snapshot_info(path)

    def dests():
        return {name: [np.empty(a.nbytes, np.uint8)] for name, a in arrays.items()}

    with pytest.raises(S.SnapshotError, match="arrays .* expected"):
        S.read_snapshot_into(info, {k: v for k, v in dests().items() if k != "grid"})
    idx = info.arrays[2]
    with open(path, "r+b") as f:
        f.seek(idx["offset"] + 100)
        b = f.read(1)
        f.seek(idx["offset"] + 100)
        f.write(bytes([b[0] ^ 0x80]))
    with pytest.raises(S.SnapshotError, match=f"array {idx['name']} checksum mismatch"):
        S.read_snapshot_into(info, dests())
    os.truncate(path, idx["offset"] + 50)
    with pytest.raises(S.SnapshotError, match="truncated"):
        S.read_snapshot_into(info, dests())



def test_pieces_write_the_same_file_as_their_concatenation(tmp_path, monkeypatch, rng=np.random.default_rng(15)):
    """A ring's runs go to disk without being joined first; the file is the
    one the joined array gives, byte for byte (across staging chunks)."""
    monkeypatch.setattr(S, "staging_bytes", 2 * S.array_align)
    arrays = sample_arrays(rng, n=3001)
    cuts = {name: sorted(rng.integers(0, len(a) + 1, size=2).tolist()) for name, a in arrays.items() if a.ndim}
    pieces = {name: [a[: cuts[name][0]], a[cuts[name][0] : cuts[name][1]], a[cuts[name][1] :]] if name in cuts else a
              for name, a in arrays.items()}  # fmt: skip
    whole = S.write_snapshot(tmp_path / "whole", 5, arrays, META)
    split = S.write_snapshot(tmp_path / "split", 5, pieces, META)
    with open(whole, "rb") as f, open(split, "rb") as g:
        assert f.read() == g.read()
    back, _ = S.read_snapshot(split)
    assert all(back[k].tobytes() == a.tobytes() for k, a in arrays.items())
