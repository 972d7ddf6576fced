# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ISO 8583 subset authcore speaks, in C: framing, decoding, encoding.

Goals:
- Speed.  pyiso8583 costs ~22 us to decode and ~21 us to encode one
  authorisation on this machine (bench/iso8583.py), ~23,000 messages/s on a
  core for both, a quarter of the 100,000/s the listener must carry.  Here
  one call scans a whole read of the socket: it cuts the 2-byte
  length-prefixed frames, decodes each message, checks the fields authcore
  uses and writes REQUEST_DTYPE records in place; one call encodes every
  answer of that read.  Python touches each message only to look its PAN up.
- Exactly pyiso8583's wire format for ``iso8583.specs.default_ascii``
  (ASCII fields, 16-hex-character bitmaps, ASCII LL/LLL length prefixes):
  ``decode`` and ``encode`` below are tested byte for byte against
  pyiso8583 on hypothesis-generated messages, and pyiso8583 is the client
  of every protocol test.  ``decode`` accepts a subset of what pyiso8583
  accepts (never more): it refuses whitespace inside a bitmap and signs or
  spaces in a length prefix, which pyiso8583 lets through ``bytes.fromhex``
  and ``int``.
- The mapping of SPEC §7/§10.13 (message type -> operation, fields ->
  record, request ids derived from fields 37 and 42), documented in
  docs/iso8583.md.

Non-goals: other field specs (binary bitmaps, BCD, EBCDIC), tertiary
bitmaps, message headers; a general-purpose ISO 8583 library.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from authcore.constants import (
    ANSWER_DTYPE,
    FLAG_NO_CARD,
    FLAG_OR_PURCHASE,
    REQUEST_DTYPE,
    STATUS_CODE,
    Channel,
    Op,
    Status,
)


# --- record layouts (pinned against the dtypes at import) -------------------

# Request and Answer are the kernel's structs (one declaration: _kernel.pxd).
from authcore._kernel cimport Answer, Request, put_auth_code

assert sizeof(Request) == REQUEST_DTYPE.itemsize
assert sizeof(Answer) == ANSWER_DTYPE.itemsize
assert <size_t>&(<Request*>NULL).currency == REQUEST_DTYPE.fields["currency"][1]
assert <size_t>&(<Request*>NULL).flags == REQUEST_DTYPE.fields["flags"][1]
assert <size_t>&(<Answer*>NULL).status == ANSWER_DTYPE.fields["status"][1]
assert <size_t>&(<Answer*>NULL).has_available == ANSWER_DTYPE.fields["has_available"][1]


# --- limits and codes ---------------------------------------------------------

cdef enum:
    FIELD_COUNT = 129      # slot 0 is the MTI, 1 the secondary bitmap, 2..128 fields
    MTI_CHARS = 4
    BITMAP_CHARS = 16      # default_ascii: a bitmap is 16 hex characters
    FRAME_HEADER = 2       # NACChannel: 2-byte big-endian length before each message
    FRAME_PAYLOAD_MAX = 65535
    N_ECHO = 10            # fields echoed in answers, ECHO_FIELD below
    RESPONSE_BYTES_MAX = 192  # an answer frame, all echo fields at their maximum (asserted)
    AMOUNT_DIGITS = 12     # fields 4 and 95's first amount: n 12
    ID_INPUT_MAX = 72      # bytes hashed into a request id (one BLAKE2b block is 128)
    ID_BASE_BYTES = 38     # "iso8583/" tag "/" field 37 (12) "/" field 42 (15)
    F7_CHARS = 10          # fixed lengths in default_ascii (parse_fields enforces them)
    F11_CHARS = 6
    F41_CHARS = 8

assert ID_BASE_BYTES + 2 + F7_CHARS + F11_CHARS + F41_CHARS <= ID_INPUT_MAX  # message_id's buffer

# Field numbers in the answer, in wire order: 2 3 4 7 11 37 [38 39] 41 42 49 [54] 70.
cdef int ECHO_FIELD[N_ECHO]
ECHO_FIELD[:] = [2, 3, 4, 7, 11, 37, 41, 42, 49, 70]
cdef enum:
    E2 = 0
    E3 = 1
    E4 = 2
    E7 = 3
    E11 = 4
    E37 = 5
    E41 = 6
    E42 = 7
    E49 = 8
    E70 = 9

# Why a message was refused (Batch.problems, logs, metrics).  Never data.
cdef enum:
    E_OK = 0
    E_SHORT = 1
    E_NOT_ASCII = 2
    E_BITMAP = 3
    E_TERTIARY = 4
    E_LENGTH = 5
    E_TOO_LONG = 6
    E_EXTRA = 7
    E_MTI = 8
    E_RESPONSE_MTI = 9
    E_UNKNOWN_MTI = 10
    E_MISSING = 11
    E_NOT_DIGITS = 12
    E_BAD_VALUE = 13

REASONS = (
    "ok",
    "message ends inside a field",
    "non-ASCII byte",
    "bitmap is not 16 hex digits",
    "tertiary bitmap (fields 129-192) not supported",
    "length prefix is not digits",
    "length over the field's maximum",
    "extra data after the last field",
    "message type is not 4 digits",
    "a response message type sent to the host",
    "unsupported message type",
    "mandatory field missing",
    "non-digit in a numeric field",
    "field value out of range",
)

# Message classes: the unit of retransmission (SPEC §7, §10.13).
cdef enum:
    CLS_NONE = 0
    CLS_AUTH = 1        # 0100 -> authorize
    CLS_PURCHASE = 2    # 0200 -> purchase
    CLS_COMPLETION = 3  # 0220 -> capture of the 0100's hold
    CLS_REVERSAL = 4    # 0400, 0420 -> void (or refund, see docs/iso8583.md)
    CLS_ECHO = 5        # 0800 -> 0810, answered here

# The tag of each class in the hashed id input.
cdef char CLASS_TAG[6]
CLASS_TAG[:] = [63, 65, 80, 67, 82, 69]  # ? A P C R E

# default_ascii, fields 0..128: length prefix digits (0 = fixed) and maximum
# (fixed: exact) length.  tests/test_iso8583.py checks it against pyiso8583.
_LEN_TYPE = {
    2: 2, 32: 2, 33: 2, 34: 2, 35: 2, 36: 3, 44: 2, 45: 2, 46: 3, 47: 3, 48: 3,
    54: 3, 55: 3, 56: 3, 57: 3, 58: 3, 59: 3, 60: 3, 61: 3, 62: 3, 63: 3,
    99: 2, 100: 2, 101: 2, 102: 2, 103: 2, 104: 3,
    **{f: 3 for f in range(105, 128)},
}
_MAX_LEN = (
    0, 16, 19, 6, 12, 12, 12, 10, 8, 8, 8, 6, 6, 4, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 2, 2, 1,
    9, 9, 9, 9, 11, 11, 28, 37, 104, 12, 6, 2, 3, 8, 15, 40, 25, 76, 999, 999, 999, 3, 3, 3,
    16, 16, 240, 510, 999, 999, 999, 999, 999, 999, 999, 999, 16, 16, 1, 2, 3, 3, 3, 4, 4, 6,
    10, 10, 10, 10, 10, 10, 10, 10, 12, 12, 12, 12, 16, 16, 16, 16, 42, 1, 2, 5, 7, 42, 16, 17,
    25, 11, 11, 17, 28, 28, 100, 999, 999, 999, 999, 999, 999, 999, 999, 999, 999, 999, 999,
    999, 999, 999, 999, 999, 999, 999, 999, 999, 999, 999, 16,
)
assert len(_MAX_LEN) == FIELD_COUNT
cdef uint8_t LEN_TYPE[FIELD_COUNT]
cdef uint16_t MAX_LEN[FIELD_COUNT]
for _f in range(FIELD_COUNT):
    LEN_TYPE[_f] = _LEN_TYPE.get(_f, 0)
    MAX_LEN[_f] = _MAX_LEN[_f]
SPEC_LEN_TYPE = dict(_LEN_TYPE)
SPEC_MAX_LEN = _MAX_LEN

# Answer codes by status, and the op codes the mapping produces.
cdef char CODE[32][2]
cdef int _status_count = len(Status)
assert _status_count <= 32
for _s, _c in STATUS_CODE.items():
    CODE[int(_s)][0] = ord(_c[0])
    CODE[int(_s)][1] = ord(_c[1])
cdef uint8_t ST_APPROVED = Status.approved
cdef uint8_t ST_PARTIAL = Status.partial
cdef uint8_t ST_CURRENCY_MISMATCH = Status.currency_mismatch
cdef uint8_t ST_UNAVAILABLE = Status.unavailable
cdef uint8_t OP_AUTHORIZE = Op.authorize
cdef uint8_t OP_PURCHASE = Op.purchase
cdef uint8_t OP_CAPTURE = Op.capture
cdef uint8_t OP_VOID = Op.void
cdef uint8_t OP_REFUND = Op.refund
cdef uint8_t CH_ONLINE = Channel.online
cdef uint8_t CH_QR = Channel.qr
cdef uint8_t CH_CARD_PRESENT = Channel.card_present
cdef uint8_t NO_CARD = FLAG_NO_CARD
cdef uint8_t OR_PURCHASE = FLAG_OR_PURCHASE
cdef int64_t AMOUNT_WIRE_MAX = 999_999_999_999  # 12 digits


# --- small helpers --------------------------------------------------------------

cdef inline bint all_digits(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return False
    return True


cdef inline int64_t digits_value(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Value of n <= 18 ASCII digits (checked by the caller)."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = v * 10 + (p[i] - 48)
    return v


cdef inline int hex_value(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef inline bint hex16(const uint8_t* p, uint64_t* out) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i, h
    for i in range(BITMAP_CHARS):
        h = hex_value(p[i])
        if h < 0:
            return False
        v = (v << 4) | <uint64_t>h
    out[0] = v
    return True


cdef const char* HEX_UPPER = b"0123456789ABCDEF"


cdef inline void put_hex16(uint8_t* out, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(BITMAP_CHARS):
        out[i] = HEX_UPPER[(v >> (60 - 4 * i)) & 15]


cdef inline void put_digits(uint8_t* out, uint64_t v, int n) noexcept nogil:
    """v as exactly n digits, zero-padded on the left (v < 10^n)."""
    cdef int i
    for i in range(n - 1, -1, -1):
        out[i] = 48 + <uint8_t>(v % 10)
        v //= 10


# --- BLAKE2b-64 (RFC 7693), for request ids ---------------------------------------
# Ids must be stable for all time (they are in the log and the idempotency
# memory), so the function is a published one that anyone can recompute:
# hashlib.blake2b(data, digest_size=8), little-endian.  One block suffices.

cdef uint64_t B2_IV[8]
B2_IV[:] = [
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
]
cdef uint8_t B2_SIGMA[12][16]
_SIGMA = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
    (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
    (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
    (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
    (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
    (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
    (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
    (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
    (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0),
)
for _r in range(12):
    for _i in range(16):
        B2_SIGMA[_r][_i] = _SIGMA[_r % 10][_i]


cdef inline uint64_t rotr64(uint64_t x, int n) noexcept nogil:
    return (x >> n) | (x << (64 - n))


cdef inline void b2_g(uint64_t* v, int a, int b, int c, int d, uint64_t x, uint64_t y) noexcept nogil:
    v[a] = v[a] + v[b] + x
    v[d] = rotr64(v[d] ^ v[a], 32)
    v[c] = v[c] + v[d]
    v[b] = rotr64(v[b] ^ v[c], 24)
    v[a] = v[a] + v[b] + y
    v[d] = rotr64(v[d] ^ v[a], 16)
    v[c] = v[c] + v[d]
    v[b] = rotr64(v[b] ^ v[c], 63)


cdef uint64_t blake2b64(const uint8_t* data, int n) noexcept nogil:
    """BLAKE2b with an 8-byte digest of n <= 128 bytes, as a little-endian integer."""
    cdef uint64_t h[8]
    cdef uint64_t v[16]
    cdef uint64_t m[16]
    cdef uint8_t block[128]
    cdef int i, r
    cdef const uint8_t* s
    memset(block, 0, 128)
    memcpy(block, data, n)
    for i in range(16):
        m[i] = 0
        for r in range(8):
            m[i] |= (<uint64_t>block[8 * i + r]) << (8 * r)
    for i in range(8):
        h[i] = B2_IV[i]
    h[0] ^= 0x01010000 ^ 8  # fanout 1, depth 1, no key, digest length 8
    for i in range(8):
        v[i] = h[i]
        v[i + 8] = B2_IV[i]
    v[12] ^= <uint64_t>n
    v[14] = ~v[14]  # last block
    for r in range(12):
        s = B2_SIGMA[r]
        b2_g(v, 0, 4, 8, 12, m[s[0]], m[s[1]])
        b2_g(v, 1, 5, 9, 13, m[s[2]], m[s[3]])
        b2_g(v, 2, 6, 10, 14, m[s[4]], m[s[5]])
        b2_g(v, 3, 7, 11, 15, m[s[6]], m[s[7]])
        b2_g(v, 0, 5, 10, 15, m[s[8]], m[s[9]])
        b2_g(v, 1, 6, 11, 12, m[s[10]], m[s[11]])
        b2_g(v, 2, 7, 8, 13, m[s[12]], m[s[13]])
        b2_g(v, 3, 4, 9, 14, m[s[14]], m[s[15]])
    return h[0] ^ v[0] ^ v[8]


cdef inline void id_base(uint8_t* buf, int cls, const uint8_t* rrn, const uint8_t* merchant) noexcept nogil:
    # b"iso8583/" + tag + b"/" + field 37 + b"/" + field 42
    memcpy(buf, b"iso8583/", 8)
    buf[8] = <uint8_t>CLASS_TAG[cls]
    buf[9] = 47
    memcpy(buf + 10, rrn, 12)
    buf[22] = 47
    memcpy(buf + 23, merchant, 15)


cdef inline uint64_t nonzero(uint64_t h) noexcept nogil:
    return h if h != 0 else 1  # id 0 is reserved (SPEC §1)


cdef uint64_t class_id(int cls, const uint8_t* rrn, const uint8_t* merchant) noexcept nogil:
    """The id of class cls for fields 37 (12 chars) and 42 (15 digits): the
    request id of a 0100/0200, and the hold a completion or reversal names."""
    cdef uint8_t buf[ID_INPUT_MAX]
    id_base(buf, cls, rrn, merchant)
    return nonzero(blake2b64(buf, ID_BASE_BYTES))


cdef uint64_t message_id(int cls, const uint8_t* rrn, const uint8_t* merchant,
                         const uint8_t* f7, const uint8_t* f11, const uint8_t* f41) noexcept nogil:
    """The request id of a completion or reversal: its class and every field
    of SPEC §7's retransmission key (7, 11, 37, 41, 42), so a new completion
    or reversal of the same transaction (another STAN) is decided afresh.
    Absent fields (NULL) are marked in a presence byte, never confused."""
    cdef uint8_t buf[ID_INPUT_MAX]
    cdef int n = ID_BASE_BYTES + 2
    id_base(buf, cls, rrn, merchant)
    buf[ID_BASE_BYTES] = 47
    buf[ID_BASE_BYTES + 1] = <uint8_t>(48 + (f7 != NULL) + 2 * (f11 != NULL) + 4 * (f41 != NULL))
    if f7 != NULL:
        memcpy(buf + n, f7, F7_CHARS)
        n += F7_CHARS
    if f11 != NULL:
        memcpy(buf + n, f11, F11_CHARS)
        n += F11_CHARS
    if f41 != NULL:
        memcpy(buf + n, f41, F41_CHARS)
        n += F41_CHARS
    return nonzero(blake2b64(buf, n))


def blake2b_64(bytes data):
    """BLAKE2b-64 of up to 128 bytes (tested against hashlib)."""
    assert len(data) <= 128
    return blake2b64(<const uint8_t*>PyBytes_AS_STRING(data), len(data))


# --- auth codes ---------------------------------------------------------------------
# put_auth_code (authcore/_kernel.pxd) is records.auth_code in C;
# tests/test_iso8583.py checks they agree.


def auth_code(uint64_t id):
    cdef uint8_t out[6]
    put_auth_code(out, id)
    return (<char*>out)[:6].decode("ascii")


# --- structure: one message ----------------------------------------------------------

cdef int parse_fields(const uint8_t* p, Py_ssize_t n, int32_t* off, uint16_t* ln, int* where) noexcept nogil:
    """Find every field of one message (no frame header).

    off[f] is the offset of field f's data (-1 absent), ln[f] its length;
    slot 0 is the MTI, slot 1 the secondary bitmap.  Returns E_OK or the
    error; fields found before an error stay filled, where[0] names the
    field being read (0 = MTI, -1 = primary bitmap).
    """
    cdef Py_ssize_t idx, k
    cdef uint64_t prim = 0, sec = 0
    cdef int f, lt, last
    cdef Py_ssize_t L
    for f in range(FIELD_COUNT):
        off[f] = -1
        ln[f] = 0
    where[0] = 0
    if n < MTI_CHARS:
        return E_SHORT
    for k in range(MTI_CHARS):
        if p[k] >= 0x80:
            return E_NOT_ASCII
    off[0] = 0
    ln[0] = MTI_CHARS
    where[0] = -1
    idx = MTI_CHARS
    if n < idx + BITMAP_CHARS:
        return E_SHORT
    if not hex16(p + idx, &prim):
        return E_BITMAP
    idx += BITMAP_CHARS
    last = 64
    if prim >> 63:
        where[0] = 1
        if n < idx + BITMAP_CHARS:
            return E_SHORT
        if not hex16(p + idx, &sec):
            return E_BITMAP
        if sec >> 63:
            return E_TERTIARY
        off[1] = <int32_t>idx
        ln[1] = BITMAP_CHARS
        idx += BITMAP_CHARS
        last = 128
    for f in range(2, last + 1):
        if f <= 64:
            if not (prim >> (64 - f)) & 1:
                continue
        elif not (sec >> (128 - f)) & 1:
            continue
        where[0] = f
        lt = LEN_TYPE[f]
        if lt:
            if idx + lt > n:
                return E_SHORT
            L = 0
            for k in range(lt):
                if p[idx + k] < 48 or p[idx + k] > 57:
                    return E_LENGTH
                L = L * 10 + (p[idx + k] - 48)
            if L > MAX_LEN[f]:
                return E_TOO_LONG
            idx += lt
        else:
            L = MAX_LEN[f]
        if idx + L > n:
            return E_SHORT
        for k in range(L):
            if p[idx + k] >= 0x80:
                return E_NOT_ASCII
        off[f] = <int32_t>idx
        ln[f] = <uint16_t>L
        idx += L
    if idx != n:
        return E_EXTRA
    return E_OK


class IsoDecodeError(ValueError):
    """A message that is not valid default_ascii ISO 8583.  Names the
    problem and the field, never the message's content."""

    def __init__(self, reason: str, field: str, pos: int = -1):
        super().__init__(f"{reason}: field {field}")
        self.reason = reason
        self.field = field
        self.pos = pos


class IsoEncodeError(ValueError):
    """A dict that cannot be encoded under default_ascii."""


cdef str field_name(int where):
    if where == 0:
        return "t"
    if where == -1:
        return "p"
    return str(where)


def decode(data):
    """One message (no frame header) -> dict, as ``iso8583.decode(data,
    default_ascii)[0]``; raises IsoDecodeError where pyiso8583 would fail
    (and in the few cases listed in the module docstring)."""
    cdef bytes b = bytes(data)
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef int32_t off[FIELD_COUNT]
    cdef uint16_t ln[FIELD_COUNT]
    cdef int where = 0
    cdef int err = parse_fields(p, n, off, ln, &where)
    if err != E_OK:
        raise IsoDecodeError(REASONS[err], field_name(where))
    out = {"t": PyUnicode_DecodeASCII(<char*>p, MTI_CHARS, NULL),
           "p": PyUnicode_DecodeASCII(<char*>p + MTI_CHARS, BITMAP_CHARS, NULL)}
    if off[1] >= 0:
        out["1"] = PyUnicode_DecodeASCII(<char*>p + off[1], BITMAP_CHARS, NULL)
    cdef int f
    for f in range(2, FIELD_COUNT):
        if off[f] >= 0:
            out[str(f)] = PyUnicode_DecodeASCII(<char*>p + off[f], ln[f], NULL)
    return out


# --- encoding: one message -----------------------------------------------------------

cdef Py_ssize_t emit(uint8_t* out, const uint8_t* mti, const int* fields, const uint8_t** data,
                     const uint16_t* lens, int nf) noexcept nogil:
    """Write MTI, bitmap(s) and fields (ascending numbers in 2..128 except
    65, lengths valid for default_ascii) at out; returns the bytes written."""
    cdef uint64_t prim = 0, sec = 0
    cdef int i, f, lt
    cdef Py_ssize_t idx = 0
    for i in range(nf):
        f = fields[i]
        if f <= 64:
            prim |= (<uint64_t>1) << (64 - f)
        else:
            sec |= (<uint64_t>1) << (128 - f)
    if sec:
        prim |= (<uint64_t>1) << 63
    memcpy(out, mti, MTI_CHARS)
    idx = MTI_CHARS
    put_hex16(out + idx, prim)
    idx += BITMAP_CHARS
    if sec:
        put_hex16(out + idx, sec)
        idx += BITMAP_CHARS
    for i in range(nf):
        f = fields[i]
        lt = LEN_TYPE[f]
        if lt:
            put_digits(out + idx, lens[i], lt)
            idx += lt
        memcpy(out + idx, data[i], lens[i])
        idx += lens[i]
    return idx


def encode(dict doc):
    """dict -> one message (no frame header), as ``iso8583.encode(doc,
    default_ascii)[0]``: fields "2".."128" (keys "1", "65", "p", "h" and
    other non-numeric keys are ignored, as pyiso8583 does)."""
    mti = doc.get("t")
    if not isinstance(mti, str) or len(mti) != MTI_CHARS or not mti.isascii():
        raise IsoEncodeError("field t: 4 ASCII characters required")
    items = []
    for k, v in doc.items():
        if not isinstance(k, str) or not k.isnumeric():
            continue
        if not k.isascii() or not k.isdigit() or str(int(k)) != k:
            raise IsoEncodeError(f"field {k!r}: not a field number")
        f = int(k)
        if f == 1 or f == 65:
            continue
        if not 2 <= f <= 128:
            raise IsoEncodeError(f"field {k}: outside 2-128")
        if not isinstance(v, str) or not v.isascii():
            raise IsoEncodeError(f"field {k}: ASCII text required")
        if LEN_TYPE[f] == 0 and len(v) != MAX_LEN[f]:
            raise IsoEncodeError(f"field {k}: {len(v)} characters, expecting {MAX_LEN[f]}")
        if len(v) > MAX_LEN[f]:
            raise IsoEncodeError(f"field {k}: {len(v)} characters, maximum {MAX_LEN[f]}")
        items.append((f, v.encode("ascii")))
    items.sort()
    cdef int nf = len(items)
    cdef int fields[FIELD_COUNT]
    cdef const uint8_t* data[FIELD_COUNT]
    cdef uint16_t lens[FIELD_COUNT]
    cdef Py_ssize_t size = MTI_CHARS + 2 * BITMAP_CHARS
    cdef int i
    for i in range(nf):
        fields[i] = items[i][0]
        data[i] = <const uint8_t*>PyBytes_AS_STRING(items[i][1])
        lens[i] = len(items[i][1])
        size += LEN_TYPE[fields[i]] + lens[i]
    cdef bytes m = mti.encode("ascii")
    out = bytearray(size)
    cdef uint8_t* o = <uint8_t*>(<char*>out)
    cdef Py_ssize_t written = emit(o, <const uint8_t*>PyBytes_AS_STRING(m), fields, data, lens, nf)
    assert written <= size
    return bytes(out[:written])


# --- the listener's batches ----------------------------------------------------------

cdef struct Msg:
    int32_t off[N_ECHO]   # echo fields' offsets in the chunk (-1 absent)
    uint16_t ln[N_ECHO]
    int32_t rec           # index into the records (-1: answered here)
    uint64_t code_id      # id whose auth code goes in field 38 on approval
    uint64_t alt_code_id  # ... when the engine reversed the purchase instead (FLAG_OR_PURCHASE)
    uint8_t resp_mti[MTI_CHARS]
    uint8_t code[2]       # field 39 of an answer made here
    uint8_t cls
    uint8_t reason        # E_* (E_OK for good messages)
    uint8_t field         # field of the problem (0 = MTI, 1 = bitmap)


cdef inline int first_missing(const int32_t* off, const int* need, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        if off[need[i]] < 0:
            return need[i]
    return 0


cdef inline int first_not_digits(const uint8_t* p, const int32_t* off, const uint16_t* ln,
                                 const int* check, int n) noexcept nogil:
    cdef int i, f
    for i in range(n):
        f = check[i]
        if off[f] >= 0 and not all_digits(p + off[f], ln[f]):
            return f
    return 0


cdef int NEED_SPEND[5]
NEED_SPEND[:] = [2, 4, 37, 42, 49]
cdef int NEED_REF[2]
NEED_REF[:] = [37, 42]
# Numeric fields the listener reads or echoes (n in ISO 8583-1987).
# (95 is an 42: only its first amount is read, and checked, below.  2, the
# PAN, is not here: a PAN that is not 12-19 digits is invalid_card, 14, per
# SPEC §10.15, not a format error.)
cdef int NUMERIC[11]
NUMERIC[:] = [3, 4, 7, 11, 18, 19, 22, 42, 49, 70, 90]


cdef inline uint8_t entry_channel(const uint8_t* p) noexcept nogil:
    """POS entry mode (field 22) -> channel, SPEC §7 and §10.13."""
    cdef int two = (p[0] - 48) * 10 + (p[1] - 48)
    if two == 3:
        return CH_QR
    if two == 5 or two == 7 or two == 90 or two == 91:
        return CH_CARD_PRESENT
    return CH_ONLINE  # 01, 81 and anything not listed


cdef int classify(const uint8_t* mti) noexcept nogil:
    """The class of a request MTI.  A repeat (4th digit 1: 0101, 0221,
    0421...) is its original's class: a network resends with it."""
    if mti[0] != 48 or not (mti[3] == 48 or mti[3] == 49):
        return CLS_NONE  # only the 1987 version ("0xxx"), acquirer-sent
    if mti[1] == 49 and mti[2] == 48:
        return CLS_AUTH
    if mti[1] == 50 and mti[2] == 48:
        return CLS_PURCHASE
    if mti[1] == 50 and mti[2] == 50:
        return CLS_COMPLETION
    if mti[1] == 52 and (mti[2] == 48 or mti[2] == 50):
        return CLS_REVERSAL
    if mti[1] == 56 and mti[2] == 48:
        return CLS_ECHO
    return CLS_NONE


cdef inline const uint8_t* field_or_null(const uint8_t* p, const int32_t* off, int f) noexcept nogil:
    return p + off[f] if off[f] >= 0 else NULL


cdef int process(const uint8_t* base, Py_ssize_t start, Py_ssize_t n, Msg* m, Request* r) noexcept nogil:
    """Decode the message at base[start:start+n] into m and (for engine
    work) r.  Returns 0 = record, 1 = answered here, 2 = fatal (close)."""
    cdef const uint8_t* p = base + start
    cdef int32_t off[FIELD_COUNT]
    cdef uint16_t ln[FIELD_COUNT]
    cdef int where = 0
    cdef int i, f, cls
    cdef int64_t amount, actual
    cdef const uint8_t* orig
    cdef int err = parse_fields(p, n, off, ln, &where)
    m.rec = -1
    m.code_id = 0
    m.alt_code_id = 0
    m.cls = CLS_NONE
    m.reason = E_OK
    m.field = 0
    for i in range(N_ECHO):
        f = ECHO_FIELD[i]
        if off[f] >= 0:
            m.off[i] = <int32_t>(start + off[f])
            m.ln[i] = ln[f]
        else:
            m.off[i] = -1
            m.ln[i] = 0
    # Identify the message by its type; without one there is nothing to answer.
    if n < MTI_CHARS or not all_digits(p, MTI_CHARS):
        m.reason = E_MTI
        return 2
    if (p[2] - 48) & 1:
        m.reason = E_RESPONSE_MTI
        return 2
    memcpy(m.resp_mti, p, MTI_CHARS)
    m.resp_mti[2] += 1
    if m.resp_mti[3] == 49:
        m.resp_mti[3] = 48  # a repeat (0101, 0421...) is answered as its original (0110, 0430)
    m.code[0] = 51  # "30": format error, unless the message proves good
    m.code[1] = 48
    if err != E_OK:
        m.reason = err
        m.field = <uint8_t>(where if where > 0 else (1 if where == -1 else 0))
        return 1
    cls = classify(p)
    m.cls = cls
    if cls == CLS_NONE:
        m.reason = E_UNKNOWN_MTI
        return 1
    f = first_not_digits(p, off, ln, NUMERIC, 11)
    if f == 0 and off[95] >= 0 and not all_digits(p + off[95], AMOUNT_DIGITS):
        f = 95
    if f:
        m.reason = E_NOT_DIGITS
        m.field = f
        return 1
    if cls == CLS_ECHO:
        m.code[0] = 48
        m.code[1] = 48
        return 1
    f = first_missing(off, NEED_SPEND, 5) if cls <= CLS_PURCHASE else first_missing(off, NEED_REF, 2)
    if f:
        m.reason = E_MISSING
        m.field = f
        return 1
    memset(r, 0, sizeof(Request))
    if cls == CLS_AUTH or cls == CLS_PURCHASE:
        r.id = class_id(cls, p + off[37], p + off[42])  # = the hold's id: 37 + 42 find it
    else:
        r.id = message_id(cls, p + off[37], p + off[42], field_or_null(p, off, 7),
                          field_or_null(p, off, 11), field_or_null(p, off, 41))
    m.code_id = r.id
    if cls == CLS_AUTH or cls == CLS_PURCHASE:
        r.op = OP_AUTHORIZE if cls == CLS_AUTH else OP_PURCHASE
        r.to = <uint64_t>digits_value(p + off[42], ln[42])
        r.amount = digits_value(p + off[4], ln[4])
        r.currency = <uint16_t>digits_value(p + off[49], ln[49])
        if off[18] >= 0:
            r.mcc = <uint16_t>digits_value(p + off[18], ln[18])
        if off[19] >= 0:
            r.country = <uint16_t>digits_value(p + off[19], ln[19])
        r.channel = entry_channel(p + off[22]) if off[22] >= 0 else CH_ONLINE
        # account and FLAG_NO_CARD: set from the PAN by the session (Batch.pans)
    elif cls == CLS_COMPLETION:
        r.op = OP_CAPTURE
        r.account = class_id(CLS_AUTH, p + off[37], p + off[42])
        r.amount = digits_value(p + off[4], ln[4]) if off[4] >= 0 else 0  # 0 = the whole hold
        m.code_id = r.account
    else:
        # Reversal: of the 0100 by default; field 90's original MTI may name
        # a 0200 or 0220, whose money has moved: then it is a refund.
        r.op = OP_VOID
        r.account = class_id(CLS_AUTH, p + off[37], p + off[42])
        if off[90] >= 0:
            orig = p + off[90]
            if orig[0] == 48 and orig[1] == 49 and orig[2] == 48 and orig[3] == 48:
                pass
            elif orig[0] == 48 and orig[1] == 50 and orig[3] == 48 and (orig[2] == 48 or orig[2] == 50):
                r.op = OP_REFUND
                if orig[2] == 48:
                    r.account = class_id(CLS_PURCHASE, p + off[37], p + off[42])
            else:
                m.reason = E_BAD_VALUE
                m.field = 90
                return 1
        else:
            # No original MTI: the 0100's hold; if there is none but a 0200
            # with the same 37 + 42, the kernel refunds that purchase
            # (FLAG_OR_PURCHASE: `to` names it, `single_limit` the amount).
            r.flags |= OR_PURCHASE
            r.to = class_id(CLS_PURCHASE, p + off[37], p + off[42])
            m.alt_code_id = r.to
        amount = digits_value(p + off[4], ln[4]) if off[4] >= 0 else -1
        if r.flags & OR_PURCHASE:
            r.single_limit = amount if amount > 0 else 0  # 0: all still refundable
        if off[95] >= 0:
            # Partial reversal (ISO 8583-1987): field 4 is the original
            # amount, field 95's first 12 digits the amount that stands.
            actual = digits_value(p + off[95], AMOUNT_DIGITS)
            if amount < 0 or actual >= amount:
                m.reason = E_BAD_VALUE
                m.field = 95
                return 1
            if r.flags & OR_PURCHASE:
                r.single_limit = amount - actual
            amount = amount - actual if actual > 0 or r.op == OP_REFUND else 0
        elif r.op == OP_VOID:
            amount = 0  # the whole remaining hold
        elif amount < 0:
            m.reason = E_MISSING
            m.field = 4
            return 1
        r.amount = amount
        m.code_id = r.account
    return 0


cdef class Batch:
    """What one ``scan`` found in a read: messages in order, the records
    for the engine, the PANs to look up, and the problems to log."""

    cdef Msg* msgs
    cdef readonly Py_ssize_t n_msgs
    cdef readonly Py_ssize_t n_records
    cdef readonly Py_ssize_t consumed
    cdef readonly bint fatal
    cdef readonly bint more
    cdef readonly bytes chunk
    cdef readonly object records
    cdef readonly list pan_rows   # record index of each PAN to look up, ascending
    cdef readonly list pans       # the PANs (str); dropped once looked up
    cdef readonly list problems   # (mti str, reason str, field int, fatal bool)
    cdef public Py_ssize_t cursor  # records already prepared (server splits)

    def __dealloc__(self):
        free(self.msgs)

    def drop_pans(self):
        """Forget the clear PANs (after lookup)."""
        self.pans = []
        self.pan_rows = []

    def set_accounts(self, records, Py_ssize_t first, list rows, list accounts):
        """records = this batch's records[first:first+len(records)]; set
        account (or FLAG_NO_CARD for None) of records[row - first]."""
        cdef uint8_t[::1] raw = records.view(np.uint8)
        cdef Request* r = <Request*>&raw[0] if raw.shape[0] else NULL
        cdef Py_ssize_t i, row
        cdef Py_ssize_t n = len(records)
        assert len(rows) == len(accounts)
        for i in range(len(rows)):
            row = <Py_ssize_t>rows[i] - first
            assert 0 <= row < n
            a = accounts[i]
            if a is None:
                r[row].flags |= NO_CARD
            else:
                r[row].account = <uint64_t>a
                r[row].flags &= ~NO_CARD

    def encode(self, answers, bint failed=False):
        """Every answer of this batch, framed, in message order.  answers:
        ANSWER_DTYPE for the records (ignored when failed: all 96)."""
        cdef Py_ssize_t n_ans = 0
        cdef const uint8_t[::1] araw
        cdef const Answer* ans = NULL
        if not failed and self.n_records:
            answers = np.ascontiguousarray(answers)
            assert answers.dtype == ANSWER_DTYPE and len(answers) == self.n_records
            araw = answers.view(np.uint8)
            ans = <const Answer*>&araw[0]
            n_ans = len(answers)
        out = bytearray(self.n_msgs * RESPONSE_BYTES_MAX)
        if self.n_msgs == 0:
            return b""
        cdef uint8_t* o = <uint8_t*>(<char*>out)
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(self.chunk)
        cdef Py_ssize_t pos = 0, size
        cdef Py_ssize_t i
        cdef Msg* m
        cdef int fields[16]
        cdef const uint8_t* data[16]
        cdef uint16_t lens[16]
        cdef uint8_t code38[6]
        cdef uint8_t amt4[AMOUNT_DIGITS]
        cdef uint8_t f54[20]
        cdef uint8_t code39[2]
        cdef int nf, k, f
        cdef uint8_t status
        cdef bint approved, spend
        cdef const Answer* a
        cdef int64_t avail
        for i in range(self.n_msgs):
            m = &self.msgs[i]
            approved = False
            spend = m.cls == CLS_AUTH or m.cls == CLS_PURCHASE
            a = NULL
            if m.rec < 0:
                code39[0] = m.code[0]
                code39[1] = m.code[1]
            else:
                if failed:
                    status = ST_UNAVAILABLE
                else:
                    assert m.rec < n_ans
                    a = &ans[m.rec]
                    status = a.status
                    assert status < _status_count
                code39[0] = <uint8_t>CODE[status][0]
                code39[1] = <uint8_t>CODE[status][1]
                approved = status == ST_APPROVED or status == ST_PARTIAL
            nf = 0
            for k in range(N_ECHO):
                f = ECHO_FIELD[k]
                if f == 41:  # 38 and 39 come before 41
                    if approved:
                        # A reversal that refunded the purchase (the kernel's
                        # choice, remembered with the answer's op) shows its code.
                        put_auth_code(code38, m.alt_code_id if (m.alt_code_id != 0 and a != NULL
                                                                and a.op == OP_REFUND) else m.code_id)
                        fields[nf] = 38
                        data[nf] = code38
                        lens[nf] = 6
                        nf += 1
                    fields[nf] = 39
                    data[nf] = code39
                    lens[nf] = 2
                    nf += 1
                if f == 70 and m.resp_mti[1] != 56:
                    continue  # 70 (network management) only in 08xx answers
                if m.off[k] < 0:
                    continue
                fields[nf] = f
                lens[nf] = m.ln[k]
                data[nf] = base + m.off[k]
                # An approval's field 4 is the amount approved: less than
                # asked when partial, the first answer's for a repeat.
                if f == 4 and a != NULL and spend and approved and 0 < a.approved_amount <= AMOUNT_WIRE_MAX:
                    put_digits(amt4, <uint64_t>a.approved_amount, AMOUNT_DIGITS)
                    data[nf] = amt4
                    lens[nf] = AMOUNT_DIGITS
                nf += 1
                if f == 49 and a != NULL and spend and a.has_available and a.status != ST_CURRENCY_MISMATCH:
                    # Field 54: account type 00, amount type 02 (available
                    # balance), the currency, C or D, 12 digits.
                    avail = a.available
                    if -AMOUNT_WIRE_MAX <= avail <= AMOUNT_WIRE_MAX:
                        f54[0] = 48
                        f54[1] = 48
                        f54[2] = 48
                        f54[3] = 50
                        memcpy(f54 + 4, base + m.off[k], 3)
                        f54[7] = 67 if avail >= 0 else 68
                        put_digits(f54 + 8, <uint64_t>(avail if avail >= 0 else -avail), AMOUNT_DIGITS)
                        fields[nf] = 54
                        data[nf] = f54
                        lens[nf] = 20
                        nf += 1
            size = emit(o + pos + FRAME_HEADER, m.resp_mti, fields, data, lens, nf)
            assert size + FRAME_HEADER <= RESPONSE_BYTES_MAX
            o[pos] = <uint8_t>(size >> 8)
            o[pos + 1] = <uint8_t>(size & 0xFF)
            pos += FRAME_HEADER + size
        return bytes(out[:pos])

    def mti_of(self, Py_ssize_t i):
        """The response MTI of message i (safe to log)."""
        return bytes(self.msgs[i].resp_mti[:MTI_CHARS]).decode("ascii")


# The largest answer: every echo field at its maximum plus 38, 39, 54.
assert (FRAME_HEADER + MTI_CHARS + 2 * BITMAP_CHARS + (2 + 19) + 6 + 12 + 10 + 6 + 12 + 6 + 2
        + 8 + 15 + 3 + (3 + 20) + 3) <= RESPONSE_BYTES_MAX


def scan(bytes chunk, Py_ssize_t start, Py_ssize_t msgs_max):
    """Decode the complete frames of chunk[start:], at most msgs_max
    messages; a zero-length frame is a keep-alive and ignored.

    Returns a Batch: consumed (offset after the last frame used), more
    (stopped at msgs_max), fatal (a message without a request type: the
    connection must close after the answers before it).
    """
    assert msgs_max > 0
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(chunk)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(chunk)
    cdef Py_ssize_t pos = start, size, count = 0
    assert 0 <= start <= end
    assert end < 2**31  # Msg keeps int32 offsets; a chunk is one read plus a partial frame
    # Pass 1: how many complete frames (to size the arrays).
    while pos + FRAME_HEADER <= end and count < msgs_max:
        size = (<Py_ssize_t>p[pos] << 8) | p[pos + 1]
        if pos + FRAME_HEADER + size > end:
            break
        if size:
            count += 1
        pos += FRAME_HEADER + size
    cdef Batch b = Batch.__new__(Batch)
    b.chunk = chunk
    b.pans = []
    b.pan_rows = []
    b.problems = []
    b.cursor = 0
    b.msgs = <Msg*>malloc(max(count, 1) * sizeof(Msg))
    if b.msgs == NULL:
        raise MemoryError()
    records = np.zeros(count, REQUEST_DTYPE)
    cdef uint8_t[::1] rraw = records.view(np.uint8)
    cdef Request* recs = <Request*>&rraw[0] if count else NULL
    # Pass 2: decode.
    pos = start
    cdef Py_ssize_t nm = 0, nr = 0
    cdef int kind
    cdef Msg* m
    cdef Request* r
    cdef int32_t pan_off
    cdef uint16_t pan_len
    while nm < count:
        size = (<Py_ssize_t>p[pos] << 8) | p[pos + 1]
        if size == 0:
            pos += FRAME_HEADER
            continue
        m = &b.msgs[nm]
        r = &recs[nr]
        kind = process(p, pos + FRAME_HEADER, size, m, r)
        if kind == 2:
            b.fatal = True
            mti = chunk[pos + FRAME_HEADER : pos + FRAME_HEADER + MTI_CHARS]
            b.problems.append((mti.decode("ascii") if mti.isdigit() else "?", REASONS[m.reason], 0, True))
            break
        if m.reason != E_OK:
            mti = chunk[pos + FRAME_HEADER : pos + FRAME_HEADER + MTI_CHARS]
            b.problems.append((mti.decode("ascii"), REASONS[m.reason], m.field, False))
        pos += FRAME_HEADER + size
        if kind == 0:
            m.rec = <int32_t>nr
            if m.cls == CLS_AUTH or m.cls == CLS_PURCHASE:
                pan_off = m.off[E2]
                pan_len = m.ln[E2]
                if 12 <= pan_len <= 19 and all_digits(p + pan_off, pan_len):
                    b.pan_rows.append(nr)
                    b.pans.append(PyUnicode_DecodeASCII(<char*>p + pan_off, pan_len, NULL))
                else:
                    r.flags |= NO_CARD  # no such PAN is ever issued (SPEC §3, §10.15)
            nr += 1
        nm += 1
    if not b.fatal:
        # Keep-alives after the last message are consumed too (else a peer
        # that only sends keep-alives would grow the session's buffer).
        while pos + FRAME_HEADER <= end and p[pos] == 0 and p[pos + 1] == 0:
            pos += FRAME_HEADER
    b.n_msgs = nm
    b.n_records = nr
    b.consumed = pos
    b.more = (not b.fatal) and count == msgs_max and nm == count
    b.records = records[:nr]
    return b
