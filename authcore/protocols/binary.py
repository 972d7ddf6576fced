"""The native binary protocol: length-prefixed frames of 64-byte records.

Goals: the fastest path into the engine.  A frame's payload is N
REQUEST_DTYPE records and becomes a numpy array with ``np.frombuffer``: the
hot path does no per-request Python work (validation is a handful of
vectorised comparisons per frame); the answer frame is the engine's
ANSWER_DTYPE array as bytes, in the same order.  docs/protocol.md is the
normative description for gateways in other languages; this module and that
page must agree (tests/test_server_binary.py checks the constants).

Non-goals: compression, multiplexing, per-record partial rejection (a frame
with an invalid record is refused whole, nothing of it is applied).
"""

from __future__ import annotations

import enum
import struct

import numpy as np

from ..constants import (
    FLAG_ALLOW_PARTIAL,
    FLAG_SET_ALL,
    PAN_HASH_OFFSET,
    REQUEST_DTYPE,
    Channel,
    Kind,
    Op,
    answer_size,
    pan_hash_size,
    request_size,
)
from ..server import Session, _Entry

# --- wire constants (docs/protocol.md) ---------------------------------------

MAGIC = 0xAC17  # first two bytes of every frame header, little-endian: 17 AC
PROTOCOL_ID = b"AUTHCORE"  # in both hello payloads
VERSION = 1
HEADER = struct.Struct("<HBBIQ")  # magic, type, flags, payload length, tag
header_size = HEADER.size
HELLO = struct.Struct("<8sHHI")  # protocol id, version, flags, reserved
HELLO_OK = struct.Struct("<8sHHIIIIII")  # id, version, flags, request size, answer size,
# frame bytes max, inflight max, batch max, reserved
ERROR = struct.Struct("<HHI")  # error code, reserved, record index; then a UTF-8 message
NO_RECORD = 0xFFFFFFFF  # record index of an error that concerns no record
error_message_bytes_max = 512
assert header_size == 16
assert HELLO.size == 16 and HELLO_OK.size == 36
hello_bytes_max = HELLO.size + 256  # the hello plus an API key (security.api_key_bytes_max)

# Flags a client may set in a request record; FLAG_NO_CARD and FLAG_OR_PURCHASE are ISO-internal.
client_flags = FLAG_ALLOW_PARTIAL | FLAG_SET_ALL
_flags_unknown = np.uint8(~client_flags & 0xFF)
_pad_offset = REQUEST_DTYPE.fields["_pad"][1]
pan_ascii_offset = PAN_HASH_OFFSET  # issue_card: ASCII PAN in bytes 16..47, NUL-padded
pan_ascii_size = pan_hash_size


class FrameType(enum.IntEnum):
    hello = 1  # client -> server, first frame
    hello_ok = 2  # server -> client
    requests = 3  # client -> server: N request records
    answers = 4  # server -> client: N answer records, same order, same tag
    error = 5  # server -> client: the frame with this tag was refused


class ErrorCode(enum.IntEnum):
    bad_magic = 1  # the stream is lost: the server closes
    handshake_required = 2  # first frame was not hello: closes
    unsupported_version = 3  # closes
    bad_frame_type = 4  # skipped, connection stays
    bad_length = 5  # payload not a multiple of 64: skipped
    frame_too_large = 6  # over frame_bytes_max: skipped
    bad_record = 7  # an enum, flag or reserved byte out of range: frame refused whole
    too_many_connections = 8  # closes
    timeout = 9  # closes
    bad_header_flags = 10  # header flags must be 0: skipped


_closing_errors = {ErrorCode.bad_magic, ErrorCode.handshake_required, ErrorCode.unsupported_version}


def frame(ftype: int, payload: bytes, tag: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, ftype, flags, len(payload), tag) + payload


def hello_frame(version: int = VERSION) -> bytes:
    return frame(FrameType.hello, HELLO.pack(PROTOCOL_ID, version, 0, 0))


def error_frame(code: ErrorCode, message: str, tag: int = 0, record: int = NO_RECORD) -> bytes:
    body = ERROR.pack(code, 0, record) + message.encode("utf-8")[:error_message_bytes_max]
    return frame(FrameType.error, body, tag)


def parse_error(payload: bytes) -> tuple[int, int, str]:
    """(code, record index, message) of an error frame's payload."""
    code, _r, record = ERROR.unpack_from(payload)
    return code, record, payload[ERROR.size :].decode("utf-8", "replace")


_op_ok = np.zeros(256, bool)
_op_ok[[int(o) for o in Op]] = True
_max_channel = max(Channel)
_max_kind = max(Kind)
_issue_card = int(Op.issue_card)


# Validation reads the last 16 bytes of each record as two little-endian u64
# words, so a frame is checked with a few vectorised integer operations on
# two columns instead of one pass per field:
#   word 6 (bytes 48..55): currency, mcc, country, op (bits 48..55), channel (56..63)
#   word 7 (bytes 56..63): kind (bits 0..7), flags (8..15), reserved (16..63)
assert REQUEST_DTYPE.fields["op"][1] == 54 and REQUEST_DTYPE.fields["channel"][1] == 55
assert REQUEST_DTYPE.fields["kind"][1] == 56 and REQUEST_DTYPE.fields["flags"][1] == 57
assert _max_kind & (_max_kind + 1) == 0 and _max_channel & (_max_channel + 1) == 0  # all-ones masks
_op_min, _op_count = min(Op), len(Op)
assert sorted(int(o) for o in Op) == list(range(_op_min, _op_min + _op_count))  # dense codes
_w7_must_be_zero = np.uint64(
    (0xFF & ~_max_kind) | ((0xFF & ~client_flags) << 8) | (((1 << 48) - 1) << 16)
)
_channel_shift = np.uint64(56 + _max_channel.bit_length())
_op_shift = np.uint64(48)
_byte = np.uint64(0xFF)


def check_records(reqs: np.ndarray) -> tuple[int, str] | None:
    """First invalid record of a frame (index, what is wrong), or None.

    Only what the wire can get wrong is checked here: enum codes, flags,
    reserved bytes.  Semantic checks (ids of 0, amounts) are the engine's
    and get their SPEC statuses.
    """
    words = reqs.view("<u8").reshape(-1, request_size // 8)
    w6 = words[:, 6]
    bad = (words[:, 7] & _w7_must_be_zero) != 0
    bad |= (w6 >> _channel_shift) != 0
    bad |= (((w6 >> _op_shift) & _byte) - np.uint64(_op_min)) >= np.uint64(_op_count)  # wraps below op_min
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    r = reqs[i]
    if not _op_ok[r["op"]]:
        return i, f"record {i}: op {int(r['op'])} is not an operation"
    if r["channel"] > _max_channel:
        return i, f"record {i}: channel {int(r['channel'])} is not a channel"
    if r["kind"] > _max_kind:
        return i, f"record {i}: kind {int(r['kind'])} is not an account kind"
    if r["flags"] & _flags_unknown:
        return i, f"record {i}: flags {int(r['flags']):#04x} has unknown bits"
    return i, f"record {i}: reserved bytes {_pad_offset}..63 must be zero"


def hash_pans(reqs: np.ndarray, hasher) -> np.ndarray:
    """issue_card records carry the ASCII PAN; replace it by its HMAC.

    Returns a writable copy when there is anything to replace (a frame from
    np.frombuffer is read-only), else the array itself.  An unreadable or
    Luhn-invalid PAN becomes all zeros, which the engine answers invalid_card.
    """
    idx = np.flatnonzero(reqs["op"] == _issue_card)
    if len(idx) == 0:
        return reqs
    reqs = reqs.copy()
    raw = reqs.view(np.uint8).reshape(-1, request_size)
    lo, hi = pan_ascii_offset, pan_ascii_offset + pan_ascii_size
    for i in idx:
        field = raw[i, lo:hi].tobytes().rstrip(b"\0")
        try:
            pan = field.decode("ascii")
        except UnicodeDecodeError:
            pan = ""
        raw[i, lo:hi] = np.frombuffer(hasher.digest(pan), np.uint8)
    return reqs


def pan_to_field(pan: str) -> bytes:
    """Client side: the 32 bytes of an issue_card record's PAN field."""
    b = pan.encode("ascii", "replace")[:pan_ascii_size]
    return b.ljust(pan_ascii_size, b"\0")


class BinarySession(Session):
    protocol_name = "binary"

    def __init__(self, server):
        super().__init__(server)
        self.buf = bytearray()
        self.discard = 0  # payload bytes of a refused frame still to skip
        self.greeted = False
        self.frame_max = server.limits.frame_bytes_max

    def has_partial(self) -> bool:
        return bool(self.buf) or self.discard > 0

    def feed(self, data: bytes) -> None:
        buf = self.buf
        if self.discard:
            skip = min(self.discard, len(data))
            self.discard -= skip
            if skip:
                data = data[skip:]
        buf += data
        pos = 0
        n = len(buf)
        unpack = HEADER.unpack_from
        while n - pos >= header_size:
            magic, ftype, flags, length, tag = unpack(buf, pos)
            if magic != MAGIC:
                self._fail(ErrorCode.bad_magic, f"bad frame magic {magic:#06x} (expected {MAGIC:#06x})", tag=0)
                return
            if not self.greeted:
                if ftype != FrameType.hello:
                    self._fail(ErrorCode.handshake_required, "the first frame must be hello", tag)
                    return
                if length > hello_bytes_max:  # never buffer an unbounded hello
                    self._fail(ErrorCode.handshake_required,
                               f"hello of {length} bytes, at most {hello_bytes_max}", tag)
                    return
                if n - pos < header_size + length:
                    break
                if not self._hello(bytes(buf[pos + header_size : pos + header_size + length]), tag):
                    return
                pos += header_size + length
                continue
            if ftype != FrameType.requests or flags or length > self.frame_max or length % request_size:
                if ftype != FrameType.requests:
                    code, msg = ErrorCode.bad_frame_type, f"frame type {ftype} not accepted from a client"
                elif flags:
                    code, msg = ErrorCode.bad_header_flags, f"header flags {flags:#04x} must be 0"
                elif length > self.frame_max:
                    code, msg = ErrorCode.frame_too_large, f"frame of {length} bytes exceeds {self.frame_max}"
                else:
                    code, msg = ErrorCode.bad_length, f"frame of {length} bytes is not a multiple of {request_size}"
                self._refuse(code, msg, tag)
                pos += header_size
                skip = min(length, n - pos)
                pos += skip
                self.discard = length - skip
                if self.discard:
                    break
                continue
            end = pos + header_size + length
            if n < end:
                break
            with memoryview(buf) as view:  # one copy (a bytearray slice and bytes() were two)
                payload = bytes(view[pos + header_size : end])
            pos = end
            self._requests(payload, tag)
        if pos:
            del buf[:pos]

    def _hello(self, payload: bytes, tag: int) -> bool:
        if len(payload) < HELLO.size:
            self._fail(ErrorCode.handshake_required, f"hello payload of {len(payload)} bytes, need {HELLO.size}", tag)
            return False
        pid, version, _flags, _r = HELLO.unpack_from(payload)
        if pid != PROTOCOL_ID:
            self._fail(ErrorCode.handshake_required, "hello does not name the AUTHCORE protocol", tag)
            return False
        if version != VERSION:
            self._fail(ErrorCode.unsupported_version, f"version {version} not supported; this server speaks {VERSION}", tag)
            return False
        if self.awaiting_key:  # identities without a client certificate: the API key follows the hello
            sec = self.server.security
            if sec.authenticate_key(self, payload[HELLO.size :]) is None:
                self._fail(ErrorCode.handshake_required, "authentication required: unknown or missing API key after hello", tag)
                return False
        lim = self.server.limits
        body = HELLO_OK.pack(
            PROTOCOL_ID, VERSION, 0, request_size, answer_size, lim.frame_bytes_max, lim.inflight_max, lim.batch_max, 0
        )
        self.greeted = True
        self.reply(frame(FrameType.hello_ok, body, tag))
        return True

    def _requests(self, payload: bytes, tag: int) -> None:
        reqs = np.frombuffer(payload, REQUEST_DTYPE)
        problem = check_records(reqs)
        if problem is not None:
            self._refuse(ErrorCode.bad_record, problem[1], tag, problem[0])
            return
        reqs = hash_pans(reqs, self.server.hasher)
        self.submit(reqs, tag)

    def _refuse(self, code: ErrorCode, message: str, tag: int, record: int = NO_RECORD) -> None:
        self.server.metrics.bad_requests.labels(self.protocol_name).inc()
        self.reply(error_frame(code, message, tag, record))

    def _fail(self, code: ErrorCode, message: str, tag: int) -> None:
        """An error after which the stream cannot be resynchronised: close."""
        assert code in _closing_errors
        self._refuse(code, message, tag)
        self.buf.clear()
        self.discard = 0
        self.start_draining()

    def encode(self, entry: _Entry) -> bytes:
        answers = np.ascontiguousarray(entry.answers)
        head = HEADER.pack(MAGIC, FrameType.answers, 0, len(answers) * answer_size, entry.context)
        return b"".join((head, answers.view(np.uint8)))  # one copy (tobytes() and + were two)

    def send_error(self, message: str) -> None:
        code = ErrorCode.too_many_connections if message.startswith("too many") else ErrorCode.timeout
        self._write(error_frame(code, message))
