"""The write-ahead log on its own: format, group commit, fail-closed, and the
recovery decision table of docs/storage.md (one test per row)."""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import pytest

from authcore import wal as W
from authcore.constants import REQUEST_DTYPE
from conftest import fill_disk

SEG = 16 * 1024  # small segments so that rotation happens in tests


def batch(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = rng.integers(0, 256, size=n * REQUEST_DTYPE.itemsize, dtype=np.uint8)
    return raw.view(REQUEST_DTYPE).copy()


def write_log(d, rng, sizes, *, segment_bytes=SEG, stamp=1_000_000, config_at=()):
    """Append batches of the given sizes; returns [(seq, stamp0, requests)]."""
    out = []
    w = W.Wal.open(d, segment_bytes=segment_bytes)
    for i, n in enumerate(sizes):
        if i in config_at:
            w.append_config(b'{"fraud": {"enabled": true}}')
        reqs = batch(rng, n)
        seq = w.append_batch(stamp, reqs)
        out.append((seq, stamp, reqs))
        stamp += n + 7
    w.close()
    return out


def read_all(d, **kw):
    return list(W.read_records(d, **kw))


def records_in(d):
    """(path, offset, header) of every record, by walking the files."""
    return [(r.path, r.offset, r.header) for r in read_all(d)]


def flip(path, offset, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def rewrite_header(path, offset, **changes):
    """Re-pack a record's header with changed fields and a *valid* checksum."""
    with open(path, "r+b") as f:
        f.seek(offset)
        h = W.unpack_header(f.read(W.header_size))
        assert h is not None
        import dataclasses

        raw, _ = W.pack_header(dataclasses.replace(h, **changes))
        f.seek(offset)
        f.write(raw)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- format and round trip ---------------------------------------------------


def test_header_is_64_bytes_and_checksummed():
    h = W.Header(W.KIND_BATCH, 7, 128, 2, 100, 101, 0xDEADBEEF, 0x12345678)
    raw, crc = W.pack_header(h)
    assert len(raw) == 64
    back = W.unpack_header(raw)
    assert back == W.Header(**{**h.__dict__, "crc": crc})
    for i in range(64):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        assert W.unpack_header(bytes(bad)) is None, i


def test_round_trip_across_segments(tmp_path, rng):
    written = write_log(tmp_path, rng, [1, 50, 3, 64, 200, 9, 120, 17, 1, 90], config_at=(4,))
    segs = W.list_segments(tmp_path)
    assert len(segs) > 1, "small segments must rotate"
    assert segs[0][0] == 1
    recs = read_all(tmp_path)
    batches = [r for r in recs if r.kind == W.KIND_BATCH]
    configs = [r for r in recs if r.kind == W.KIND_CONFIG]
    assert [r.seq for r in recs] == list(range(1, len(written) + 2))
    assert len(configs) == 1 and configs[0].config_json() == b'{"fraud": {"enabled": true}}'
    for r, (seq, stamp0, reqs) in zip(batches, written):
        assert r.seq == seq
        assert r.header.stamp0 == stamp0
        assert r.header.stamp_last == stamp0 + len(reqs) - 1
        assert r.requests().tobytes() == reqs.tobytes()
    # Every segment is named by its first record's sequence number.
    for seg_seq, path in segs:
        first = next(r for r in recs if r.path == path)
        assert first.seq == seg_seq and first.offset == 0
    # The chain links every record to the previous one, across segments.
    prev = 0
    for r in recs:
        assert r.header.prev_crc == prev
        prev = r.header.crc
    scan = W.scan_log(tmp_path)
    assert scan.tail.decision is W.Decision.end and scan.tail.reason == "zeros"
    assert scan.last_seq == len(recs) and scan.requests == sum(len(b[2]) for b in written)
    assert scan.last_crc == recs[-1].header.crc


def test_segments_are_preallocated(tmp_path, rng):
    write_log(tmp_path, rng, [3])
    (_, path), = W.list_segments(tmp_path)
    assert os.path.getsize(path) == SEG
    st = os.stat(path)
    assert st.st_blocks * 512 >= SEG  # blocks really allocated, not a sparse file


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_UNWRITTEN = 0x800


def unwritten_extents(path) -> int | None:
    """How many of the file's extents are *unwritten* (FIEMAP), or None
    where the filesystem cannot say."""
    import fcntl
    import struct

    count = 64
    out = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, 1, 0, count, 0) + bytes(56 * count))  # flags: FIEMAP_FLAG_SYNC
    with open(path, "rb") as f:
        try:
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, out)  # fills ``out`` in place
        except OSError:
            return None
    mapped = struct.unpack_from("=I", out, 20)[0]
    flags = [struct.unpack_from("=I", out, 32 + 56 * i + 40)[0] for i in range(mapped)]
    return sum(1 for f in flags if f & FIEMAP_EXTENT_UNWRITTEN)


def test_segments_are_zero_filled_so_syncs_convert_no_extents(tmp_path, rng):
    """A fallocated segment is *unwritten* on ext4: every fdatasync after an
    append would also journal the extent conversion.  Zero-filled, it is not."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, SEG)
    if not unwritten_extents(probe):
        pytest.skip("no unwritten extents on this filesystem (or no FIEMAP): nothing to tell apart")
    logdir = tmp_path / "wal"
    write_log(logdir, rng, [3])
    (_, path), = W.list_segments(logdir)
    assert unwritten_extents(path) == 0


def fill_until(w, rng, stamp, done, limit=100_000):
    for _ in range(limit):
        if done():
            return stamp
        w.append_batch(stamp, batch(rng, 20))
        stamp += 100
    raise AssertionError("condition never met")


def test_rollover_renames_the_spare_zero_filled_in_the_background(tmp_path, rng):
    seg = 256 * 1024
    w = W.Wal.open(tmp_path, segment_bytes=seg)
    stamp = fill_until(w, rng, 1000, lambda: w._spare is not None)
    assert w.offset >= seg * W.spare_start_fraction
    first = W.list_segments(tmp_path)[-1][0]
    stamp = fill_until(w, rng, stamp, lambda: w._spare.ready.wait(0.01))  # it keeps pace with the log
    assert W.list_segments(tmp_path)[-1][0] == first  # ready before the rollover
    assert w.offset <= seg * (W.spare_finish_fraction + 0.1)
    spare_inode = os.stat(tmp_path / W.spare_name).st_ino
    fill_until(w, rng, stamp, lambda: W.list_segments(tmp_path)[-1][0] != first)
    (_, new_path) = W.list_segments(tmp_path)[-1]
    assert os.stat(new_path).st_ino == spare_inode
    assert os.path.getsize(new_path) == seg
    w.close()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # close discards a spare
    assert [r.seq for r in read_all(tmp_path)] == list(range(1, w.next_seq))


def test_a_failed_spare_is_replaced_at_the_next_segment(tmp_path, rng, monkeypatch):
    """A spare that could not be made (disk full) leaves the writer to zero
    its segment itself, once, and the next segment gets a new spare."""
    real = W.zero_fill

    def spare_fails(path, size, keep_pace=None):
        if keep_pace is not None:  # only the spare is paced
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, size, keep_pace)

    monkeypatch.setattr(W, "zero_fill", spare_fails)
    w = W.Wal.open(tmp_path, segment_bytes=64 * 1024)
    stamp = fill_until(w, rng, 1000, lambda: w._spare is not None)
    failed = w._spare
    failed._thread.join()
    assert not failed.ready.is_set()
    first = W.list_segments(tmp_path)[-1][0]
    stamp = fill_until(w, rng, stamp, lambda: W.list_segments(tmp_path)[-1][0] != first)
    assert w._spare is None  # made here, and the failed spare forgotten
    monkeypatch.setattr(W, "zero_fill", real)
    fill_until(w, rng, stamp, lambda: w._spare is not None and w._spare.ready.wait(0.01))
    w.close()
    assert [r.seq for r in read_all(tmp_path)] == list(range(1, w.next_seq))


def test_a_spare_still_filling_at_rollover_is_hurried_and_used(tmp_path, rng, monkeypatch):
    """A log outrunning its spare: the rollover finishes the spare at full
    speed rather than zero-filling a second file of its own."""
    monkeypatch.setattr(W, "spare_lead_fraction", -10.0)  # the spare never gets ahead by itself
    w = W.Wal.open(tmp_path, segment_bytes=256 * 1024)
    stamp = fill_until(w, rng, 1000, lambda: w._spare is not None)
    spare_inode = os.stat(tmp_path / W.spare_name).st_ino
    assert not w._spare.ready.is_set()
    first = W.list_segments(tmp_path)[-1][0]
    fill_until(w, rng, stamp, lambda: W.list_segments(tmp_path)[-1][0] != first)
    assert os.stat(W.list_segments(tmp_path)[-1][1]).st_ino == spare_inode
    assert w._spare is None
    w.close()
    assert [r.seq for r in read_all(tmp_path)] == list(range(1, w.next_seq))


def test_zero_fill_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """Where O_DIRECT is refused (some filesystems at fcntl, others at the
    first write) the zeros are written through the page cache instead."""
    import fcntl

    real_fcntl, real_pwrite = fcntl.fcntl, os.pwrite

    def no_direct_fcntl(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct_fcntl)
    W.zero_fill(str(tmp_path / "a"), 64 * 1024)
    monkeypatch.setattr(fcntl, "fcntl", real_fcntl)

    def direct_write_refused(fd, data, offset):
        if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", direct_write_refused)
    W.zero_fill(str(tmp_path / "b"), 64 * 1024)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    for name in ("a", "b"):
        assert (tmp_path / name).read_bytes() == bytes(64 * 1024)


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_appends_never_read_the_segment_back(tmp_path, rng):
    """Records are smaller than a page and the zero-filled segment is not
    cached: a partial page write would make the kernel read the page from
    disk first, on the batch's path.  Appends write their last page whole."""
    w = W.Wal.open(tmp_path, segment_bytes=1 << 20)
    before = _read_bytes()
    stamp = 1000
    for _ in range(64):  # 128-byte records over two pages
        w.append_batch(stamp, batch(rng, 1))
        stamp += 10
    after = _read_bytes()
    w.close()
    assert after - before == 0
    assert len(read_all(tmp_path)) == 64


def test_a_spare_left_by_a_crash_is_removed_at_open(tmp_path, rng):
    recs = write_log(tmp_path, rng, [5, 6])
    (tmp_path / W.spare_name).write_bytes(b"half-written spare")
    W.Wal.open(tmp_path, segment_bytes=SEG).close()
    assert not (tmp_path / W.spare_name).exists()
    assert [r.requests().tobytes() for r in read_all(tmp_path)] == [q.tobytes() for _, _, q in recs]


def cached_fraction(path, nbytes: int) -> float:
    """Share of the file's first ``nbytes`` in the page cache (mincore(2))."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, nbytes, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = (ctypes.c_ubyte * (nbytes // page))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), vec) == 0, ctypes.get_errno()
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes))
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec) / len(vec)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise")
@pytest.mark.parametrize("sync", ["always", "none"])
def test_synced_records_leave_the_page_cache(tmp_path, rng, sync):
    """The log is read only at recovery: synced pages are dropped (new
    page-cache pages cost a host fault each on a ballooned VM).  Unsynced
    ones (sync "none") are dirty and stay."""
    w = W.Wal.open(tmp_path, segment_bytes=4 << 20, sync=sync)
    stamp = 1000
    for _ in range(32):  # 32 x 64 KiB records
        w.append_batch(stamp, batch(rng, 1024))
        stamp += 2000
    written = w.offset - w.offset % os.sysconf("SC_PAGE_SIZE")
    cached = cached_fraction(w.segment_path, written)
    w.close()
    if sync == "always":
        assert cached < 0.1
    else:
        assert cached > 0.9
    assert len(read_all(tmp_path)) == 32  # and dropping lost nothing


def test_reopen_continues_sequence_chain_and_stamps(tmp_path, rng):
    write_log(tmp_path, rng, [5, 6])
    w = W.Wal.open(tmp_path, segment_bytes=SEG)
    assert w.next_seq == 3
    with pytest.raises(AssertionError):
        w.append_batch(1, batch(rng, 1))  # stamps never go backwards
    w.append_batch(10**9, batch(rng, 2))
    w.close()
    recs = read_all(tmp_path)
    assert [r.seq for r in recs] == [1, 2, 3]
    assert recs[2].header.prev_crc == recs[1].header.crc


def test_record_too_big_for_segment_gets_its_own(tmp_path, rng):
    written = write_log(tmp_path, rng, [10, 600, 10], segment_bytes=W.segment_bytes_min)
    recs = read_all(tmp_path)
    assert [r.requests().tobytes() for r in recs] == [b[2].tobytes() for b in written]


def test_sync_none_skips_fdatasync(tmp_path, rng):
    w = W.Wal.open(tmp_path, sync="none", segment_bytes=SEG)
    for i in range(3):
        w.append_batch(100 + i * 10, batch(rng, 2))
    assert w.syncs == 0
    w.close()  # close syncs once even in "none"
    assert len(read_all(tmp_path)) == 3


def test_sync_always_syncs_once_per_batch(tmp_path, rng):
    w = W.Wal.open(tmp_path, segment_bytes=SEG)
    for i in range(4):
        w.append_batch(100 + i * 10, batch(rng, 8))
    assert w.syncs == 4
    w.close()


# --- the recovery decision table (docs/storage.md), one test per row ---------


def test_row_clean_end_of_file(tmp_path, rng):
    write_log(tmp_path, rng, [4, 4])
    (_, path), = W.list_segments(tmp_path)
    end = W.padded(2 * (64 + 4 * 64))
    os.truncate(path, end)  # no preallocated zeros left
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.end, "eof", end)
    assert scan.last_seq == 2


def test_row_zeros_after_last_record(tmp_path, rng):
    write_log(tmp_path, rng, [4, 4])
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason) == (W.Decision.end, "zeros")
    assert scan.tail.offset == 2 * (64 + 4 * 64) and scan.last_seq == 2


def test_row_torn_header_at_tail(tmp_path, rng):
    write_log(tmp_path, rng, [4, 4])
    (_, path), = W.list_segments(tmp_path)
    end = 2 * (64 + 4 * 64)
    raw, _ = W.pack_header(W.Header(W.KIND_BATCH, 3, 64, 1, 10**9, 10**9, 0, 0))
    with open(path, "r+b") as f:  # half a header reached the disk
        f.seek(end)
        f.write(raw[:20])
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.path, scan.tail.offset) == (W.Decision.cut_tail, "torn_header", path, end)
    assert scan.last_seq == 2


def test_row_torn_header_at_end_of_file(tmp_path, rng):
    write_log(tmp_path, rng, [4])
    (_, path), = W.list_segments(tmp_path)
    end = 64 + 4 * 64
    with open(path, "r+b") as f:
        f.truncate(end + 30)
        f.seek(end)
        f.write(b"ACWL" + b"\x01" * 26)
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.cut_tail, "torn_header", end)


def test_row_header_sector_lost_body_landed(tmp_path, rng):
    """Zero header followed by body bytes and nothing valid: a torn tail."""
    write_log(tmp_path, rng, [4])
    (_, path), = W.list_segments(tmp_path)
    end = 64 + 4 * 64
    with open(path, "r+b") as f:
        f.seek(end + 64)
        f.write(batch(rng, 3).tobytes())
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.cut_tail, "torn_header", end)
    assert scan.tail.bytes_cut > 0


def test_row_torn_body_at_tail_preallocated(tmp_path, rng):
    """Header landed, part of the body did not (zeros): body checksum fails."""
    write_log(tmp_path, rng, [4, 8])
    (_, path), = W.list_segments(tmp_path)
    second = 64 + 4 * 64
    with open(path, "r+b") as f:
        f.seek(second + 64 + 3 * 64)
        f.write(b"\0" * (5 * 64))
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.cut_tail, "bad_body_checksum", second)
    assert scan.last_seq == 1


def test_row_torn_body_at_end_of_file(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8])
    (_, path), = W.list_segments(tmp_path)
    second = 64 + 4 * 64
    os.truncate(path, second + 64 + 100)
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.cut_tail, "torn_body", second)


def test_row_bad_checksum_in_last_record(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    third = 2 * 64 + 12 * 64
    flip(path, third + 64 + 17)
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.cut_tail, "bad_body_checksum", third)
    assert scan.last_seq == 2
    flip(path, third + 64 + 17)
    flip(path, third + 9)  # now the header of the last record
    scan = W.scan_log(tmp_path)
    assert (scan.tail.decision, scan.tail.reason, scan.tail.offset) == (W.Decision.cut_tail, "torn_header", third)


def test_row_bad_body_checksum_followed_by_valid_records(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    second = 64 + 4 * 64
    flip(path, second + 64 + 5)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.path == path and e.value.offset == second
    assert "bad_body_checksum" in str(e.value) and path in str(e.value) and f"offset {second}" in str(e.value)


def test_row_bad_header_checksum_followed_by_valid_records(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    flip(path, 64 + 4 * 64 + 30)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.offset == 64 + 4 * 64 and "torn_header" in e.value.reason


def test_row_zeroed_record_followed_by_valid_records(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    with open(path, "r+b") as f:
        f.seek(64 + 4 * 64)
        f.write(b"\0" * (64 + 8 * 64))
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.offset == 64 + 4 * 64


def test_row_broken_chain_followed_by_valid_records(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    rewrite_header(path, 64 + 4 * 64, prev_crc=0x1234)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.offset == 64 + 4 * 64 and "broken_chain" in e.value.reason


def test_row_broken_chain_at_tail_refuses(tmp_path, rng):
    """A complete, checksummed record that does not follow is never a torn write."""
    write_log(tmp_path, rng, [4, 8])
    (_, path), = W.list_segments(tmp_path)
    rewrite_header(path, 64 + 4 * 64, prev_crc=0x1234)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert "broken_chain" in e.value.reason


def test_row_wrong_sequence_refuses(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    rewrite_header(path, 64 + 4 * 64, seq=7)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.offset == 64 + 4 * 64 and "wrong_sequence" in e.value.reason


def test_row_stamp_regression_refuses(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8, 2])
    (_, path), = W.list_segments(tmp_path)
    rewrite_header(path, 64 + 4 * 64, stamp0=5, stamp_last=12)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert "stamp_regression" in e.value.reason


def test_row_missing_segment_refuses(tmp_path, rng):
    write_log(tmp_path, rng, [40] * 20)
    segs = W.list_segments(tmp_path)
    assert len(segs) >= 3
    os.unlink(segs[1][1])
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.path == segs[2][1] and e.value.offset == 0 and "expected" in e.value.reason


def test_row_damaged_full_segment_followed_by_segments_refuses(tmp_path, rng):
    write_log(tmp_path, rng, [40] * 20)
    segs = W.list_segments(tmp_path)
    last_in_first = [r for r in read_all(tmp_path) if r.path == segs[0][1]][-1]
    flip(segs[0][1], last_in_first.offset + 64 + 3)
    with pytest.raises(W.CorruptLog) as e:
        W.scan_log(tmp_path)
    assert e.value.path == segs[0][1] and e.value.offset == last_in_first.offset


def test_row_empty_last_segment_is_clean(tmp_path, rng):
    """A crash right after a segment was created, before its first record."""
    write_log(tmp_path, rng, [4])
    with open(os.path.join(tmp_path, W.segment_name(2)), "wb") as f:
        f.truncate(SEG)
    scan = W.scan_log(tmp_path)
    assert scan.tail.decision is W.Decision.end and scan.last_seq == 1
    w = W.Wal.open(tmp_path, segment_bytes=SEG)
    assert w.segment_first_seq == 2 and w.offset == 0
    w.append_batch(10**9, batch(rng, 2))
    w.close()
    assert [r.seq for r in read_all(tmp_path)] == [1, 2]


def test_truncate_corrupt_cuts_at_first_bad_record(tmp_path, rng):
    written = write_log(tmp_path, rng, [40] * 20)
    segs = W.list_segments(tmp_path)
    recs = read_all(tmp_path)
    victim = [r for r in recs if r.path == segs[1][1]][1]
    flip(victim.path, victim.offset + 64 + 100)
    with pytest.raises(W.CorruptLog):
        W.Wal.open(tmp_path, segment_bytes=SEG)
    scan = W.scan_log(tmp_path, truncate_corrupt=True)
    assert scan.tail.decision is W.Decision.truncate and scan.tail.offset == victim.offset
    assert scan.last_seq == victim.seq - 1
    w = W.Wal.open(tmp_path, segment_bytes=SEG, truncate_corrupt=True)
    assert w.next_seq == victim.seq
    w.append_batch(10**12, batch(rng, 1))
    w.close()
    after = read_all(tmp_path)
    assert [r.seq for r in after] == list(range(1, victim.seq + 1))
    assert [r.requests().tobytes() for r in after[:-1]] == [b[2].tobytes() for b in written[: victim.seq - 1]]
    names = os.listdir(tmp_path)
    assert any(n.endswith(".discarded") for n in names)  # later segments set aside
    assert any(".discarded-at-" in n for n in names)  # and the cut bytes kept
    assert W.scan_log(tmp_path).tail.decision is W.Decision.end


def test_open_cuts_torn_tail_and_appends_after_it(tmp_path, rng):
    write_log(tmp_path, rng, [4, 8])
    (_, path), = W.list_segments(tmp_path)
    second = 64 + 4 * 64
    flip(path, second + 64 + 1)
    w = W.Wal.open(tmp_path, segment_bytes=SEG)
    assert w.tail.decision is W.Decision.cut_tail and w.next_seq == 2 and w.offset == second
    w.append_batch(10**9, batch(rng, 3))
    w.close()
    recs = read_all(tmp_path)
    assert [r.seq for r in recs] == [1, 2] and recs[1].header.count == 3
    assert W.scan_log(tmp_path).tail.reason == "zeros"  # the cut area was re-zeroed


# --- random damage to copies of a real log ---------------------------------


def _expect_after_damage(tmp_path, src, recs, offset_in_seg, seg_path):
    """Checks for one damaged copy: a prefix survives, or a precise refusal."""
    try:
        scan = W.scan_log(tmp_path)
    except W.CorruptLog as e:
        victim = [r for r in recs if r.path == e.path and r.offset == e.offset]
        assert victim, f"refusal must name a record start: {e}"
        assert victim[0].seq < recs[-1].seq, "the last record is a tail, never refused"
        return "refused"
    got = read_all(tmp_path)
    assert [r.seq for r in got] == list(range(1, len(got) + 1))
    for a, b in zip(got, recs):
        assert a.body.tobytes() == b.body.tobytes()
    return "cut" if len(got) < len(recs) else "intact"


def test_random_truncation_always_leaves_a_valid_prefix(tmp_path, rng):
    src = tmp_path / "src"
    write_log(src, rng, [int(n) for n in rng.integers(1, 30, size=25)])
    recs = read_all(src)
    segs = W.list_segments(src)
    last_seg = segs[-1][1]
    size = max(r.offset + r.header.record_len for r in recs if r.path == last_seg)
    for i in range(40):
        d = tmp_path / f"t{i}"
        shutil.copytree(src, d)
        cut = int(rng.integers(0, size))
        os.truncate(d / os.path.basename(last_seg), cut)
        scan = W.scan_log(d)
        got = read_all(d)
        assert scan.tail.decision in (W.Decision.end, W.Decision.cut_tail)
        complete = [r for r in recs if r.path != last_seg or r.offset + r.header.record_len <= cut]
        assert [r.seq for r in got] == [r.seq for r in complete]
        shutil.rmtree(d)


def test_random_bit_flips_are_detected(tmp_path, rng):
    src = tmp_path / "src"
    write_log(src, rng, [int(n) for n in rng.integers(1, 30, size=25)])
    recs = read_all(src)
    segs = W.list_segments(src)
    outcomes = set()
    for i in range(60):
        d = tmp_path / f"f{i}"
        shutil.copytree(src, d)
        seg_seq, seg_path = segs[int(rng.integers(0, len(segs)))]
        used = max(r.offset + r.header.record_len for r in recs if r.path == seg_path)
        off = int(rng.integers(0, used))
        flip(d / os.path.basename(seg_path), off, 1 << int(rng.integers(0, 8)))
        victim = next(r for r in recs if r.path == seg_path and r.offset <= off < r.offset + r.header.record_len)
        drecs = [W.Record(r.header, str(d / os.path.basename(r.path)), r.offset, r.body) for r in recs]
        outcome = _expect_after_damage(d, src, drecs, off, seg_path)
        if victim.seq == recs[-1].seq:
            assert outcome == "cut"
        else:
            assert outcome == "refused"
        outcomes.add(outcome)
        shutil.rmtree(d)
    assert "refused" in outcomes


# --- fail closed ----------------------------------------------------------------


class Faults(W.FaultHook):
    def __init__(self):
        self.write = self.sync = self.truncate = self.create = None

    def before_write(self, wal, offset, nbytes):
        if self.write:
            raise OSError(self.write, os.strerror(self.write))

    def before_sync(self, wal):
        if self.sync:
            raise OSError(self.sync, os.strerror(self.sync))

    def before_truncate(self, wal, offset):
        if self.truncate:
            raise OSError(self.truncate, os.strerror(self.truncate))

    def before_create(self, wal, path):
        if self.create:
            raise OSError(self.create, os.strerror(self.create))


@pytest.mark.parametrize("where", ["write", "sync"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_fault_cuts_back_and_resumes(tmp_path, rng, where, err):
    f = Faults()
    w = W.Wal.open(tmp_path, segment_bytes=SEG, fault=f)
    w.append_batch(100, batch(rng, 4))
    before = (w.next_seq, w.offset, w.last_crc)
    setattr(f, where, err)
    with pytest.raises(W.Unavailable):
        w.append_batch(200, batch(rng, 5))
    assert (w.next_seq, w.offset, w.last_crc) == before
    assert w.state is W.WalState.open
    # What reached the page cache before the failed sync was cut off the file.
    (_, path), = W.list_segments(tmp_path)
    with open(path, "rb") as fh:
        fh.seek(before[1])
        assert not fh.read(64 + 5 * 64).strip(b"\0")
    assert [r.seq for r in read_all(tmp_path)] == [1]
    setattr(f, where, None)
    keep = batch(rng, 2)
    assert w.append_batch(300, keep) == 2
    w.close()
    recs = read_all(tmp_path)
    assert [r.seq for r in recs] == [1, 2] and recs[1].requests().tobytes() == keep.tobytes()
    assert recs[1].header.stamp0 == 300


def test_failed_cut_back_refuses_until_reopened(tmp_path, rng):
    f = Faults()
    w = W.Wal.open(tmp_path, segment_bytes=SEG, fault=f)
    w.append_batch(100, batch(rng, 4))
    f.sync = errno.EIO
    f.truncate = errno.EIO
    with pytest.raises(W.Unavailable):
        w.append_batch(200, batch(rng, 5))
    assert w.state is W.WalState.failed
    f.sync = f.truncate = None
    for _ in range(2):
        with pytest.raises(W.Unavailable, match="failed"):
            w.append_batch(300, batch(rng, 1))
    w.close()
    # A restart recovers from what the disk holds (the unsynced record may be there).
    w = W.Wal.open(tmp_path, segment_bytes=SEG)
    assert w.state is W.WalState.open
    n = w.next_seq
    w.append_batch(400, batch(rng, 1))
    w.close()
    assert [r.seq for r in read_all(tmp_path)] == list(range(1, n + 1))


def test_segment_creation_failure_is_unavailable_then_resumes(tmp_path, rng):
    f = Faults()
    w = W.Wal.open(tmp_path, segment_bytes=W.segment_bytes_min, fault=f)
    w.append_batch(100, batch(rng, 40))
    f.create = errno.ENOSPC
    with pytest.raises(W.Unavailable, match="segment"):
        w.append_batch(200, batch(rng, 40))  # does not fit: needs a new segment
    assert len(W.list_segments(tmp_path)) == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    f.create = None
    w.append_batch(300, batch(rng, 40))
    w.close()
    assert [s for s, _ in W.list_segments(tmp_path)] == [1, 2]
    assert [r.seq for r in read_all(tmp_path)] == [1, 2]


def test_real_disk_full_on_tiny_tmpfs(tiny_fs, rng):
    """ENOSPC from a real 1 MiB filesystem: Unavailable, then resume after space is freed."""
    logdir = tiny_fs / "wal"
    w = W.Wal.open(logdir, segment_bytes=64 * 1024)
    try:
        filler = fill_disk(tiny_fs / "filler")
        stamp, acked = 1000, []
        with pytest.raises(W.Unavailable):
            for _ in range(100):  # the preallocated segment fills, then rotation fails
                reqs = batch(rng, 50)
                w.append_batch(stamp, reqs)
                acked.append(reqs.tobytes())
                stamp += 100
        assert acked, "the preallocated segment took records before the disk was full"
        assert w.state is W.WalState.open
        with pytest.raises(W.Unavailable):
            w.append_batch(stamp, batch(rng, 50))
        os.unlink(filler)
        reqs = batch(rng, 50)
        w.append_batch(stamp, reqs)  # resumes once space is back
        acked.append(reqs.tobytes())
    finally:
        w.close()
    assert [r.requests().tobytes() for r in read_all(logdir)] == acked
    assert len(W.list_segments(logdir)) == 2
