"""The write-ahead log: segmented, preallocated, hash-chained, fail-closed.

Goals
-----
* Every state-changing request is in the log, synced, before its answer
  leaves the engine (SPEC §8).  A whole batch is one record written with one
  ``pwritev`` and made durable with one ``fdatasync`` (group commit).
* A record verifies itself: magic, version, kind, sequence number, lengths,
  the first and last stamp of the batch, the checksum of the previous record
  (a hash chain, as TigerBeetle's ``aof.zig``) and a CRC32C over header and
  body.  Padding is zeros and is covered by the checksum.
* Recovery is a decision table (``docs/storage.md``, TigerBeetle's
  ``journal.zig``): a torn or corrupt *tail* is cut and reported; damage
  followed by valid records refuses to start with :class:`CorruptLog`
  naming the file and byte offset, unless ``truncate_corrupt`` is given.
* Fail closed (the fsyncgate lesson): when a write or a sync fails the log
  is cut back to the last good offset and that cut is synced before
  anything else is written; the caller gets :class:`Unavailable`.  If even
  the cut fails the log refuses every later append until it is reopened
  (recovery then trusts only what the disk holds).

Non-goals: concurrency (one writer thread owns a :class:`Wal`; the spare
thread touches only ``wal-spare.tmp`` and reads the writer's offset),
reading while writing, compression, encryption.  ``sync="none"`` skips
``fdatasync`` and is *not durable*: benchmarks only.

Layout
------
A segment is a file ``wal-<first seq, 20 digits>.log`` preallocated to
``segment_bytes`` by writing zeros (:func:`zero_fill`; zeros after the last
record), the next one filled ahead by a helper thread (:class:`_Spare`).
A record is a 64-byte header followed by its body padded with zeros to a
multiple of 64 bytes:

=======  ====  =====================================================
offset   size  field
=======  ====  =====================================================
0        4     magic ``b"ACWL"``
4        2     version (1)
6        1     kind: 1 = BATCH (body: ``count`` REQUEST_DTYPE rows),
               2 = CONFIG (body: JSON of ``Config.decision_dict()``)
7        1     flags (0)
8        8     sequence number (1, 2, 3, ... across segments)
16       4     body length in bytes (before padding)
20       4     request count (0 for CONFIG)
24       8     stamp0: the stamp of the batch's first request
32       8     stamp_last: the stamp of its last (stamp0 + count - 1)
40       4     CRC32C of the previous record (its ``crc``; 0 for the first)
44       4     CRC32C of the padded body
48       4     crc: CRC32C of this header with this field zeroed
52       12    reserved, zeros
=======  ====  =====================================================

The header checksum covers the body checksum, so ``crc`` covers header and
body; keeping a separate body checksum lets the reader tell a torn body
from a torn header, and find valid headers *after* a damaged record (which
is what separates a torn tail from corruption).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import crc32c as _crc32c
import numpy as np

from .constants import REQUEST_DTYPE, batch_count_max, request_size

# --- format constants --------------------------------------------------------

MAGIC = b"ACWL"
VERSION = 1
KIND_BATCH = 1
KIND_CONFIG = 2
KINDS = (KIND_BATCH, KIND_CONFIG)

HEADER = struct.Struct("<4sHBBQIIqqIII12x")
header_size = 64  # one request row: bodies stay 64-byte aligned on disk.
record_align = 64  # every record starts on a 64-byte boundary.
crc_offset = 48  # where ``crc`` sits in the header (zeroed while computing it).
config_body_bytes_max = 1 << 20  # a CONFIG body is a small JSON document.
record_bytes_max = header_size + batch_count_max * request_size  # 4 MiB + 64.

segment_bytes_default = 64 << 20  # bounded files: cheap to preallocate,
# to copy aside for forensics and to delete once a snapshot covers them.
segment_bytes_min = 4096  # tiny segments are for tests of rotation.
drop_cache_bytes_min = 64 << 10  # synced log pages leave the page cache in runs of this (one fadvise each)
zero_chunk_bytes = 256 << 10  # zero-filling writes this much per call (O_DIRECT where possible)
zero_align = 4096  # segment sizes round up to this: O_DIRECT writes whole blocks
spare_name = "wal-spare.tmp"  # the next segment, zero-filled ahead (".tmp": removed at open)
spare_start_fraction = 0.25  # the spare starts when the current segment is this full...
spare_finish_fraction = 0.75  # ...and keeps pace to be done by this fill
spare_lead_fraction = 0.05  # how far the spare may run ahead of that pace
spare_poll_seconds = 0.01  # how often a paced spare looks at the writer's progress (each look takes the GIL)
write_chunk_bytes_max = 1 << 30  # stay far below Linux's 2 GiB write limit.

_zero_page = memoryview(bytes(mmap.PAGESIZE))
_zero_chunk = memoryview(mmap.mmap(-1, zero_chunk_bytes))  # page-aligned zeros, as O_DIRECT needs; never written

SEGMENT_RE = re.compile(r"^wal-(\d{20})\.log$")
SYNC_MODES = ("always", "none")

assert HEADER.size == header_size, HEADER.size
assert request_size == record_align  # a batch body needs no padding.
assert REQUEST_DTYPE.itemsize == request_size
assert segment_bytes_default >= record_bytes_max
assert segment_bytes_min % record_align == 0
assert zero_chunk_bytes % zero_align == 0 and zero_align % mmap.PAGESIZE == 0 and segment_bytes_min % zero_align == 0
assert drop_cache_bytes_min % mmap.PAGESIZE == 0
assert 0 < spare_start_fraction < spare_finish_fraction < 1


class Unavailable(Exception):
    """The log could not make a batch durable; nothing of it was acknowledged.

    The engine answers every request of the batch ``unavailable`` (96).
    """


class CorruptLog(Exception):
    """The log is damaged before its tail: refusing to start.

    ``path`` and ``offset`` name the first bad byte range; ``reason`` says
    what was wrong.  ``truncate_corrupt=True`` cuts the log there instead.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str):
        self.path = str(path)
        self.offset = int(offset)
        self.reason = reason
        super().__init__(f"corrupt log: {self.path} at byte offset {self.offset}: {reason}")


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def zero_fill(path: str, size: int, keep_pace: Callable[[int], bool] | None = None) -> None:
    """Create ``path`` as ``size`` bytes of written zeros, synced.

    Why not ``posix_fallocate``: ext4 marks fallocated blocks *unwritten*,
    so every ``fdatasync`` after an append into them must also commit the
    extent conversion to the journal.  Measured here (4 KiB appends):
    fallocated p50 136-205 us, p99 254-331 us, max 0.6-4.4 ms; zero-filled
    p50 103-135 us, p99 165-205 us, max 0.2-0.4 ms.  PostgreSQL zero-fills
    its WAL segments for the same reason.

    The zeros go through O_DIRECT where the filesystem allows (no page
    cache: no CPU copy and no fresh page-cache pages), else buffered.
    ``keep_pace(written)`` is asked after every chunk; it may sleep, and
    returns False to give up (the file is then removed).
    """
    assert size % zero_align == 0, size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        # O_DIRECT switched on after a plain open: where a filesystem refuses
        # it, open(O_DIRECT) creates the file *and then* fails.
        direct = _set_direct(fd, True)
        off = 0
        while off < size:
            chunk = _zero_chunk[: min(zero_chunk_bytes, size - off)]
            try:
                n = os.pwrite(fd, chunk, off)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                direct = _set_direct(fd, False)  # alignment refused: buffered from here
                n = os.pwrite(fd, chunk, off)
            if n != len(chunk):
                raise OSError(errno.ENOSPC, "short write while zero-filling a segment")
            off += n
            if keep_pace is not None and not keep_pace(off):
                raise _Cancelled
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    if not direct:
        _fadvise_dontneed(fd, 0, size)
    os.close(fd)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; returns whether it is on."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | direct) if on else (flags & ~direct))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return False
    return on


def _fadvise_dontneed(fd: int, offset: int, nbytes: int) -> bool:
    """Drop clean pages from the page cache; advisory, so a failure loses nothing."""
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True


class _Cancelled(Exception):
    pass


class _Spare:
    """The next segment, zero-filled by a helper thread while the writer
    fills the current one, so that a rollover renames a file instead of
    writing 64 MiB (~40-60 ms here) on the path of a batch.

    It keeps pace with the log: from a quarter of the current segment to
    three quarters, the spare's share written follows the log's, so it
    writes gently at 100k requests/s and fast at 1M+.  The file is named
    ``wal-spare.tmp``: never read as a segment, removed at open.
    """

    def __init__(self, directory: str, capacity: int, fill: Callable[[], float]):
        self.path = os.path.join(directory, spare_name)
        self.capacity = capacity
        self._fill = fill  # the writer's current segment: offset / capacity
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._hurry = threading.Event()  # rollover came first: fill at full speed
        self._wake = threading.Event()  # set with either of the two above
        self._thread = threading.Thread(target=self._run, name="authcore-wal-spare", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            zero_fill(self.path, self.capacity, self._keep_pace)
        except (OSError, _Cancelled):  # disk full, or closing: the writer makes its own segment
            return
        self.ready.set()

    def _keep_pace(self, written: int) -> bool:
        span = spare_finish_fraction - spare_start_fraction
        while not self._stop.is_set():
            if self._hurry.is_set():
                return True
            due = (self._fill() - spare_start_fraction) / span + spare_lead_fraction
            if written < due * self.capacity:
                return True
            self._wake.wait(spare_poll_seconds)
        return False

    def finish(self) -> bool:
        """At a rollover: let the spare fill at full speed and wait for it
        (what is left of it is less than a whole segment made here).
        Returns whether it is ready."""
        self._hurry.set()
        self._wake.set()
        self._thread.join()
        return self.ready.is_set()

    def discard(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        _unlink_quietly(self.path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def segment_name(first_seq: int) -> str:
    assert first_seq >= 1
    return f"wal-{first_seq:020d}.log"


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def padded(n: int) -> int:
    return (n + record_align - 1) // record_align * record_align


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a create/rename/remove in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- headers -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Header:
    kind: int
    seq: int
    body_len: int
    count: int
    stamp0: int
    stamp_last: int
    prev_crc: int
    body_crc: int
    crc: int = 0

    @property
    def record_len(self) -> int:
        return header_size + padded(self.body_len)


def pack_header(h: Header) -> tuple[bytes, int]:
    """The header's 64 bytes with its checksum filled in, and that checksum."""
    raw = bytearray(HEADER.pack(MAGIC, VERSION, h.kind, 0, h.seq, h.body_len, h.count, h.stamp0, h.stamp_last, h.prev_crc, h.body_crc, 0))
    crc = crc32c(raw)
    struct.pack_into("<I", raw, crc_offset, crc)
    return bytes(raw), crc


def unpack_header(raw: bytes | memoryview) -> Header | None:
    """The header if magic, version, checksum and field ranges are right, else None."""
    if len(raw) < header_size:
        return None
    magic, version, kind, flags, seq, body_len, count, stamp0, stamp_last, prev_crc, body_crc, crc = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION:
        return None
    check = crc32c(raw[:crc_offset])
    check = crc32c(b"\0\0\0\0", check)
    check = crc32c(raw[crc_offset + 4 : header_size], check)
    if check != crc:
        return None
    if kind not in KINDS or flags != 0 or seq < 1:
        return None
    if bytes(raw[crc_offset + 4 : header_size]) != b"\0" * (header_size - crc_offset - 4):
        return None
    if kind == KIND_BATCH and (count < 1 or body_len != count * request_size or stamp_last != stamp0 + count - 1):
        return None
    if kind == KIND_CONFIG and (count != 0 or body_len > config_body_bytes_max):
        return None
    return Header(kind, seq, body_len, count, stamp0, stamp_last, prev_crc, body_crc, crc)


# --- reading: records and the recovery decision table --------------------------


@dataclasses.dataclass(frozen=True)
class Record:
    """One valid record as read back; ``body`` is a view into the segment."""

    header: Header
    path: str
    offset: int
    body: memoryview

    @property
    def seq(self) -> int:
        return self.header.seq

    @property
    def kind(self) -> int:
        return self.header.kind

    def requests(self) -> np.ndarray:
        """The batch as a REQUEST_DTYPE array (a read-only view, no copy)."""
        assert self.kind == KIND_BATCH
        return np.frombuffer(self.body, dtype=REQUEST_DTYPE, count=self.header.count)

    def config_json(self) -> bytes:
        assert self.kind == KIND_CONFIG
        return bytes(self.body)


class Decision(enum.Enum):
    """What recovery does at the first record that is not a valid successor."""

    end = "end"  # clean end: end of file, or zeros after the last record
    cut_tail = "cut_tail"  # torn or corrupt tail, nothing valid after it: cut
    refuse = "refuse"  # damage followed by valid records: CorruptLog
    truncate = "truncate"  # like refuse, but truncate_corrupt=True cut there


@dataclasses.dataclass
class Tail:
    """Where the valid log ends and why (one row of the decision table)."""

    decision: Decision
    reason: str  # "eof", "zeros", "torn_header", "torn_body", "bad_body_checksum", ...
    path: str  # the segment where the valid log ends ("" when there is none)
    offset: int  # the byte offset in it where the valid log ends
    bytes_cut: int = 0  # non-zero bytes after ``offset`` in that segment
    segments_dropped: tuple[str, ...] = ()  # later segments (truncate only)

    @property
    def is_clean(self) -> bool:
        return self.decision is Decision.end


@dataclasses.dataclass
class LogScan:
    """The result of validating a whole log directory."""

    directory: str
    segments: list[tuple[int, str]]  # (first seq, path), ascending, up to the end
    first_seq: int  # sequence number of the first record present (next_seq if none)
    last_seq: int  # the last valid record's sequence number (first_seq - 1 if none)
    last_crc: int  # its crc (0 when none, or unknown: ``chain_known`` False)
    last_stamp: int  # its stamp_last (0 when none)
    records: int
    requests: int
    tail: Tail
    configs: list[tuple[int, bytes]]  # (seq, JSON) of every CONFIG record
    # (first seq, requests counted before it) at each segment scanned
    request_marks: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def next_seq(self) -> int:
        return self.last_seq + 1

    def requests_from(self, seq: int) -> int:
        """At most how many requests the scanned records from ``seq`` on
        hold (exact to the segment holding ``seq``): recovery sizes the id
        and hold memories for the tail after its snapshot, not the whole
        log.  Records before the scanned part are not counted; an estimate
        that falls short only means growing during replay, which evicts
        nothing and so changes no answer."""
        before = 0
        for first, counted in self.request_marks:
            if first > seq:
                break
            before = counted
        return self.requests - before


def list_segments(directory: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(first seq, path)`` of every segment file, ascending."""
    out = []
    for name in os.listdir(directory):
        m = SEGMENT_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(directory, name)))
    out.sort()
    return out


def _read_file(path: str) -> memoryview:
    """The whole segment, read-only, mapped (no copy of the preallocated zeros).

    The mapping lives as long as any view of it (records, request arrays);
    the file may be truncated by the writer only after the reader is done.
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))


def _all_zero(view: memoryview) -> bool:
    if len(view) == 0:
        return True
    arr = np.frombuffer(view, dtype=np.uint8)
    return not arr.any()


def _find_valid_header(view: memoryview, start: int, min_seq: int) -> int | None:
    """Offset of the first valid header at or after ``start`` with seq >= min_seq.

    Used to tell a torn tail (nothing valid after the damage) from corruption
    (valid records after it).  Candidates are 64-byte aligned offsets whose
    first four bytes are the magic; each is then fully checked.
    """
    start = padded(start)
    n = (len(view) - start) // record_align
    if n <= 0:
        return None
    words = np.frombuffer(view, dtype="<u4", count=n * (record_align // 4), offset=start)
    magic = struct.unpack("<I", MAGIC)[0]
    for i in np.flatnonzero(words[:: record_align // 4] == magic):
        off = start + int(i) * record_align
        h = unpack_header(view[off : off + header_size])
        if h is not None and h.seq >= min_seq:
            return off
    return None


class _Walker:
    """Walks the records of a directory in order, applying the decision table."""

    def __init__(self, directory: str, truncate_corrupt: bool, prev_crc: int | None = None):
        self.directory = str(directory)
        self.truncate_corrupt = truncate_corrupt
        self.segments = list_segments(self.directory)
        self.initial_prev_crc = prev_crc

    def walk(self, start_seq: int = 1, stop_seq: int | None = None, skip_before: int = 1, stop_early: bool = False) -> Iterator[Record]:
        """Yield every valid record with start_seq <= seq <= stop_seq; sets ``self.scan``.

        Segments whose records all precede ``skip_before`` are not read at
        all.  With ``stop_early`` the walk returns right after ``stop_seq``
        (``self.scan`` is then not set).
        """
        segs = self.segments
        first_seq = segs[0][0] if segs else 1
        expected_seq = first_seq
        # The chain into the first record present: 0 at the very start of the
        # log; unknown (None) when retention removed the segments before it.
        prev_crc: int | None = 0 if first_seq == 1 else None
        prev_stamp = 0
        last_crc = 0
        records = requests = 0
        configs: list[tuple[int, bytes]] = []
        marks: list[tuple[int, int]] = []
        tail: Tail | None = None
        used: list[tuple[int, str]] = []
        first_k = 0
        if skip_before > 1:
            while first_k + 1 < len(segs) and segs[first_k + 1][0] <= skip_before:
                first_k += 1
            if first_k:
                expected_seq = segs[first_k][0]
                prev_crc = None
                used.extend(segs[:first_k])
        for k in range(first_k, len(segs)):
            seg_seq, path = segs[k]
            used.append((seg_seq, path))
            marks.append((seg_seq, requests))
            if seg_seq != expected_seq:
                tail = self._damage(path, 0, f"segment starts at sequence {seg_seq}, expected {expected_seq}", segs, k, None, expected_seq)
                break
            view = _read_file(path)
            off = 0
            stop: tuple[str, int] | None = None
            while True:
                rest = len(view) - off
                if rest == 0:
                    stop = ("eof", off)
                    break
                if rest < header_size:
                    stop = ("zeros" if _all_zero(view[off:]) else "torn_header", off)
                    break
                raw = view[off : off + header_size]
                h = unpack_header(raw)
                if h is None:
                    stop = ("zeros" if _all_zero(raw) else "torn_header", off)
                    break
                end = off + h.record_len
                if end > len(view):
                    stop = ("torn_body", off)
                    break
                body = view[off + header_size : end]
                if crc32c(body) != h.body_crc:
                    stop = ("bad_body_checksum", off)
                    break
                if h.seq != expected_seq:
                    stop = (f"wrong_sequence: record has {h.seq}, expected {expected_seq}", off)
                    break
                if prev_crc is not None and h.prev_crc != prev_crc:
                    stop = ("broken_chain: previous-record checksum does not match", off)
                    break
                if h.seq == start_seq and self.initial_prev_crc is not None and h.prev_crc != self.initial_prev_crc:
                    stop = ("broken_chain: record does not follow the snapshot's last record", off)
                    break
                if h.kind == KIND_BATCH and h.stamp0 <= prev_stamp:
                    stop = (f"stamp_regression: stamp0 {h.stamp0} <= previous {prev_stamp}", off)
                    break
                if h.kind == KIND_CONFIG and bytes(body[h.body_len :]).strip(b"\0"):
                    stop = ("bad_padding", off)
                    break
                rec = Record(h, path, off, body[: h.body_len])
                if h.kind == KIND_BATCH:
                    prev_stamp = h.stamp_last
                    requests += h.count
                else:
                    configs.append((h.seq, bytes(rec.body)))
                records += 1
                expected_seq = h.seq + 1
                prev_crc = last_crc = h.crc
                off = end
                if h.seq >= start_seq and (stop_seq is None or h.seq <= stop_seq):
                    yield rec
                if stop_early and stop_seq is not None and h.seq >= stop_seq:
                    return
            reason, off = stop
            later = segs[k + 1 :]
            if reason in ("eof", "zeros"):
                rest_nonzero = not _all_zero(view[off:])
                if not later:
                    if rest_nonzero:
                        # Header zeros but bytes after: a torn write whose
                        # header sector was lost.  Only a tail if nothing valid follows.
                        tail = self._tail_or_damage(path, off, "torn_header", view, segs, k, expected_seq)
                    else:
                        tail = Tail(Decision.end, reason, path, off)
                    break
                if rest_nonzero or _find_valid_header(view, off, 1) is not None:
                    tail = self._damage(path, off, "garbage after the last record of a full segment", segs, k, view, expected_seq)
                    break
                if _all_zero(view) and len(later) >= 1:
                    # An empty segment followed by others: records are missing.
                    tail = self._damage(path, 0, "empty segment followed by later segments", segs, k, view, expected_seq)
                    break
                continue  # next segment
            if reason.startswith(("wrong_sequence", "broken_chain", "stamp_regression", "bad_padding")):
                # A complete, checksummed record that does not follow: never a
                # torn write.  Refuse even at the tail.
                tail = self._damage(path, off, reason, segs, k, view, expected_seq)
                break
            tail = self._tail_or_damage(path, off, reason, view, segs, k, expected_seq)
            break
        if tail is None:
            tail = Tail(Decision.end, "empty", "", 0)
        if tail.decision is Decision.end and tail.path == "" and segs:
            tail = Tail(Decision.end, "eof", segs[-1][1], 0)
        last_seq = expected_seq - 1
        self.scan = LogScan(
            directory=self.directory,
            segments=used,
            first_seq=first_seq,
            last_seq=last_seq,
            last_crc=last_crc,
            last_stamp=prev_stamp,
            records=records,
            requests=requests,
            tail=tail,
            configs=configs,
            request_marks=marks,
        )

    def _tail_or_damage(self, path: str, off: int, reason: str, view: memoryview, segs: list, k: int, expected_seq: int) -> Tail:
        """A bad record at ``off``: the tail if nothing valid follows it."""
        after = _find_valid_header(view, off + record_align, expected_seq)
        later_valid = any(self._segment_has_records(p) for _, p in segs[k + 1 :])
        if after is None and not later_valid:
            cut = int(np.count_nonzero(np.frombuffer(view[off:], dtype=np.uint8))) if len(view) > off else 0
            return Tail(Decision.cut_tail, reason, path, off, bytes_cut=cut)
        where = f"valid record at offset {after}" if after is not None else "valid records in a later segment"
        return self._damage(path, off, f"{reason}, followed by a {where}", segs, k, view, expected_seq)

    def _damage(self, path: str, off: int, reason: str, segs: list, k: int, view: memoryview | None, expected_seq: int) -> Tail:
        if not self.truncate_corrupt:
            raise CorruptLog(path, off, reason)
        cut = 0
        if view is not None and len(view) > off:
            cut = int(np.count_nonzero(np.frombuffer(view[off:], dtype=np.uint8)))
        return Tail(Decision.truncate, reason, path, off, bytes_cut=cut, segments_dropped=tuple(p for _, p in segs[k + 1 :]))

    @staticmethod
    def _segment_has_records(path: str) -> bool:
        view = _read_file(path)
        return _find_valid_header(view, 0, 1) is not None


def scan_log(directory: str | os.PathLike[str], *, truncate_corrupt: bool = False, from_seq: int = 1) -> LogScan:
    """Validate the records of the log; decide the tail (see the module doc).

    Raises :class:`CorruptLog` for damage before the tail unless
    ``truncate_corrupt`` (then the scan ends there with ``Decision.truncate``).
    ``from_seq`` skips segments whose records all precede it (recovery from a
    snapshot need not read the log it covers; ``verify`` reads everything);
    ``records``, ``requests`` and ``configs`` then count the part read.
    Reads only; :meth:`Wal.open` applies the decision to the files.
    """
    w = _Walker(str(directory), truncate_corrupt)
    for _ in w.walk(start_seq=1 << 62, skip_before=from_seq):
        pass
    return w.scan


def read_records(directory: str | os.PathLike[str], *, start_seq: int = 1, stop_seq: int | None = None, prev_crc: int | None = None, truncate_corrupt: bool = False) -> Iterator[Record]:
    """Yield the valid records with ``start_seq <= seq <= stop_seq`` in order.

    ``prev_crc``, when known (a snapshot records it), checks the hash chain
    into the record ``start_seq``.  Stops at the tail like :func:`scan_log`.
    """
    w = _Walker(str(directory), truncate_corrupt, prev_crc=prev_crc)
    yield from w.walk(start_seq=start_seq, stop_seq=stop_seq, skip_before=start_seq, stop_early=True)


# --- writing ---------------------------------------------------------------------


class FaultHook:
    """Injectable faults for tests: each callback may raise OSError (ENOSPC, EIO).

    ``before_write`` runs before a record's bytes are written, ``before_sync``
    after they were written but before ``fdatasync`` (so raising there models
    a sync that failed on data already in the page cache), ``before_truncate``
    before the fail-closed cut-back, ``before_create`` before a new segment
    is created.  The default does nothing.
    """

    def before_write(self, wal: "Wal", offset: int, nbytes: int) -> None:
        pass

    def before_sync(self, wal: "Wal") -> None:
        pass

    def before_truncate(self, wal: "Wal", offset: int) -> None:
        pass

    def before_create(self, wal: "Wal", path: str) -> None:
        pass


class WalState(enum.Enum):
    open = "open"
    failed = "failed"  # a cut-back failed: refuse every append until reopened
    closed = "closed"


_TRANSITIONS = {
    WalState.open: {WalState.failed, WalState.closed},
    WalState.failed: {WalState.closed},
    WalState.closed: set(),
}


class Wal:
    """The appending side of the log.  Open it with :meth:`Wal.open`."""

    def __init__(self) -> None:
        raise TypeError("use Wal.open(directory, ...)")

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        sync: str = "always",
        segment_bytes: int = segment_bytes_default,
        truncate_corrupt: bool = False,
        fault: FaultHook | None = None,
        scan: LogScan | None = None,
    ) -> "Wal":
        """Open (creating if needed) the log in ``directory`` for appending.

        Validates the log (or uses ``scan`` if the caller already did), cuts
        a torn tail (or, with ``truncate_corrupt``, the corrupt part) and
        positions the writer after the last valid record.
        """
        assert sync in SYNC_MODES, sync
        assert segment_bytes >= segment_bytes_min, segment_bytes
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))
        if scan is None:
            scan = scan_log(directory, truncate_corrupt=truncate_corrupt)
        self = object.__new__(cls)
        self.directory = directory
        self.sync_mode = sync
        self.segment_bytes = segment_bytes
        self.fault = fault or FaultHook()
        self._state = WalState.open
        self._fd = -1
        self.next_seq = scan.next_seq
        self.last_crc = scan.last_crc
        self.last_stamp = scan.last_stamp
        self.tail = scan.tail
        self.appended_records = 0
        self.syncs = 0
        self._spare: _Spare | None = None
        self._apply_tail(scan)
        segs = list_segments(directory)
        if not segs or segs[-1][1] != scan.tail.path:
            self.good_offset = 0
            self._create_segment(self.next_seq, segment_bytes)
        else:
            seg_seq, path = segs[-1]
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self.segment_first_seq = seg_seq
            self.segment_path = path
            self.offset = scan.tail.offset
            self._dropped = self.offset - self.offset % mmap.PAGESIZE
            self.capacity = max(os.fstat(self._fd).st_size, self.offset)
        self.good_offset = self.offset
        return self

    # -- state ----------------------------------------------------------------

    @property
    def state(self) -> WalState:
        return self._state

    def _set_state(self, new: WalState) -> None:
        assert new in _TRANSITIONS[self._state], f"wal: illegal transition {self._state} -> {new}"
        self._state = new

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    # -- opening: apply the tail decision -----------------------------------------

    def _apply_tail(self, scan: LogScan) -> None:
        tail = scan.tail
        changed = False
        for p in tail.segments_dropped:
            os.rename(p, p + ".discarded")
            changed = True
        if tail.decision is Decision.truncate and tail.path and tail.offset == 0:
            # The whole segment is bad (or misnamed): set it aside; the
            # writer starts a fresh segment named by the next sequence number.
            os.rename(tail.path, tail.path + ".discarded")
            changed = True
        elif tail.decision in (Decision.cut_tail, Decision.truncate) and tail.path:
            with open(tail.path, "r+b", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if tail.decision is Decision.truncate and tail.bytes_cut:
                    # Keep the discarded bytes for forensics; they were never valid.
                    f.seek(tail.offset)
                    with open(f"{tail.path}.discarded-at-{tail.offset}", "wb") as out:
                        out.write(f.read())
                        out.flush()
                        os.fsync(out.fileno())
                    changed = True
                os.ftruncate(f.fileno(), tail.offset)
                if size > tail.offset:
                    try:
                        os.posix_fallocate(f.fileno(), tail.offset, size - tail.offset)
                    except OSError:
                        pass  # no preallocation: appends grow the file.
                os.fsync(f.fileno())
        if changed:
            fsync_dir(self.directory)

    # -- segments ---------------------------------------------------------------------

    def _create_segment(self, first_seq: int, capacity: int) -> None:
        """Create, zero-fill and durably name a new segment; switch to it.

        The spare is used when it is big enough: one still filling is told
        to hurry and waited for.  Otherwise (none, too small for a record
        bigger than a segment, or failed) the segment is filled here.
        """
        path = os.path.join(self.directory, segment_name(first_seq))
        tmp = path + ".tmp"
        capacity = round_up(capacity, zero_align)
        spare = self._spare
        if spare is not None and spare.capacity < capacity:
            spare = None  # a record bigger than a segment: made here; the spare waits for the next one
        fd = -1
        try:
            self.fault.before_create(self, path)
            if spare is not None and spare.finish():
                capacity = spare.capacity
                os.rename(spare.path, path)
            else:
                zero_fill(tmp, capacity)
                os.rename(tmp, path)
            if spare is not None:
                self._spare = None  # used, or failed (disk full): the next segment starts another
            fsync_dir(self.directory)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            for p in (tmp, path):
                _unlink_quietly(p)
            if spare is not None:  # stopped and removed; the next segment starts another
                spare.discard()
                self._spare = None
            raise Unavailable(f"cannot create log segment {path}: {os.strerror(e.errno or errno.EIO)}") from e
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self.segment_first_seq = first_seq
        self.segment_path = path
        self.offset = self.good_offset = 0
        self._dropped = 0  # [0, _dropped) of the segment has left the page cache
        self.capacity = capacity

    # -- appending ----------------------------------------------------------------------

    def append_batch(self, stamp0: int, requests: np.ndarray) -> int:
        """Append one batch as one record; durable on return when sync is "always".

        Returns the record's sequence number.  Raises :class:`Unavailable`
        (nothing of the batch is in the log then).
        """
        assert isinstance(requests, np.ndarray) and requests.dtype == REQUEST_DTYPE, "requests must be a REQUEST_DTYPE array"
        count = len(requests)
        assert 1 <= count <= batch_count_max, count
        assert stamp0 > self.last_stamp, (stamp0, self.last_stamp)
        body = memoryview(np.ascontiguousarray(requests).view(np.uint8))
        return self._append(KIND_BATCH, count, int(stamp0), int(stamp0) + count - 1, body)

    def append_config(self, config_json: bytes) -> int:
        """Append a CONFIG record (the decision settings in force from here on)."""
        assert isinstance(config_json, bytes) and 0 < len(config_json) <= config_body_bytes_max
        return self._append(KIND_CONFIG, 0, self.last_stamp, self.last_stamp, memoryview(config_json))

    def _append(self, kind: int, count: int, stamp0: int, stamp_last: int, body: memoryview) -> int:
        if self._state is not WalState.open:
            raise Unavailable(f"log is {self._state.value}: refusing writes until restarted")
        body_len = len(body)
        pad = padded(body_len) - body_len
        body_crc = crc32c(body)
        if pad:
            body_crc = crc32c(b"\0" * pad, body_crc)
        seq = self.next_seq
        h = Header(kind, seq, body_len, count, stamp0, stamp_last, self.last_crc, body_crc)
        raw, crc = pack_header(h)
        total = h.record_len
        assert total <= max(record_bytes_max, header_size + padded(config_body_bytes_max))
        if self.offset > 0 and self.offset + total > self.capacity:
            self._create_segment(seq, max(self.segment_bytes, total))
        if self._spare is None and self.offset >= self.capacity * spare_start_fraction:
            self._spare = _Spare(self.directory, round_up(self.segment_bytes, zero_align),
                                 lambda: self.offset / max(self.capacity, 1))
        bufs: list[Any] = [raw, body]
        if pad:
            bufs.append(b"\0" * pad)
        # Write the last page whole (zeros past the record, which is what the
        # segment holds there): a partial write to a page that is not cached
        # makes the kernel read it from disk first, on the batch's path, and
        # the zero-filled segment's pages are not cached.
        page_end = min(self.capacity, round_up(self.offset + total, mmap.PAGESIZE))
        if page_end > self.offset + total:
            bufs.append(_zero_page[: page_end - self.offset - total])
        start = self.offset
        assert start == self.good_offset and start % record_align == 0
        try:
            self.fault.before_write(self, start, total)
            self._write_all(bufs, start, max(total, page_end - start))
            self.fault.before_sync(self)
            if self.sync_mode == "always":
                os.fdatasync(self._fd)
                self.syncs += 1
        except OSError as e:
            self._cut_back(e)
            raise Unavailable(f"log write failed ({os.strerror(e.errno or errno.EIO)}): batch not durable") from e
        if self.sync_mode == "always":
            self._drop_cached(start + total)
        self.offset = self.good_offset = start + total
        self.next_seq = seq + 1
        self.last_crc = crc
        if kind == KIND_BATCH:
            self.last_stamp = stamp_last
        self.appended_records += 1
        return seq

    def _drop_cached(self, synced_end: int) -> None:
        """Drop synced log pages from the page cache, in runs of at least
        ``drop_cache_bytes_min`` and whole pages only: the page holding
        ``synced_end`` takes the next record, so it stays.

        Why: the log is written once and read only at recovery, so its
        cached pages are dead weight, and on a VM whose free memory goes
        back to the host (virtio balloon) every *new* page-cache page costs
        a host fault on first write: the kernel's copy into them was 18%
        of a pinned server's core at 1.1M requests/s.  Dropped pages are
        reused hot for the next records: 1.39M -> 1.70M requests/s
        (bench/RESULTS.md).  Clean pages only (after fdatasync); a failure
        here loses nothing, so it is ignored.
        """
        end = synced_end - synced_end % mmap.PAGESIZE
        if end - self._dropped >= drop_cache_bytes_min and _fadvise_dontneed(self._fd, self._dropped, end - self._dropped):
            self._dropped = end

    def _write_all(self, bufs: list[Any], offset: int, total: int) -> None:
        written = os.pwritev(self._fd, bufs, offset)
        if written == total:
            return
        # A short write (rare: signals, quota): finish the rest in one buffer.
        rest = b"".join(bytes(b) for b in bufs)[written:]
        offset += written
        while rest:
            n = os.pwrite(self._fd, rest[:write_chunk_bytes_max], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            rest = rest[n:]
            offset += n

    def _cut_back(self, cause: OSError) -> None:
        """Cut the segment back to the last good offset and sync that cut.

        Never retry the failed fsync: after a failed fsync the kernel may have
        dropped the dirty pages, so a later fsync "succeeding" proves nothing.
        Cutting the file removes whatever part of the record reached the disk,
        so a request answered ``unavailable`` can never reappear at recovery.
        """
        try:
            self.fault.before_truncate(self, self.good_offset)
            os.ftruncate(self._fd, self.good_offset)
            os.fsync(self._fd)
        except OSError:
            self._set_state(WalState.failed)
            return
        self.offset = self.good_offset
        try:
            # Best effort: restore preallocation (fails harmlessly when the disk is full).
            if self.capacity > self.good_offset:
                os.posix_fallocate(self._fd, self.good_offset, self.capacity - self.good_offset)
        except OSError:
            pass

    def sync(self) -> None:
        """fdatasync now (for sync="none" at shutdown).  Raises Unavailable on failure."""
        if self._state is not WalState.open:
            raise Unavailable(f"log is {self._state.value}")
        try:
            self.fault.before_sync(self)
            os.fdatasync(self._fd)
            self.syncs += 1
        except OSError as e:
            # Unknown what reached the disk since the last sync: stop writing.
            self._set_state(WalState.failed)
            raise Unavailable(f"log sync failed ({os.strerror(e.errno or errno.EIO)})") from e

    def close(self) -> None:
        if self._state is WalState.closed:
            return
        try:
            if self._state is WalState.open and self.sync_mode == "none":
                try:
                    self.sync()
                except Unavailable:
                    pass
        finally:
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._set_state(WalState.closed)

    def __enter__(self) -> "Wal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_segments_before(directory: str | os.PathLike[str], covered_seq: int, *, keep_path: str | None = None) -> list[str]:
    """Remove segments whose records all have seq <= covered_seq.

    A segment is wholly covered when the next segment starts at or before
    ``covered_seq + 1``; the last segment (the writer's) is never removed.
    """
    segs = list_segments(directory)
    removed = []
    for (seq, path), (next_seq, _) in zip(segs, segs[1:]):
        if next_seq <= covered_seq + 1 and path != keep_path:
            os.unlink(path)
            removed.append(path)
    if removed:
        fsync_dir(directory)
    return removed

