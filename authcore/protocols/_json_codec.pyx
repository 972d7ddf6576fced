# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""JSON lines in C: hot requests parsed straight into REQUEST_DTYPE records,
answers encoded straight from ANSWER_DTYPE records.

Goals:
- Speed.  With orjson and Python per line, one JSON connection carried
  ~160k requests/s and py-spy put ~50% of the server's core in parsing
  (orjson, field checks, tuples, ``np.array``) and encoding (dicts, orjson).
  Here one call parses a whole read's lines and one call encodes a batch's
  answers, with no Python object per request.
- Exactly the Python path's results.  ``parse_requests`` takes a strict
  subset of JSON: one object per line whose values are integers
  (``-?(0|[1-9][0-9]*)``), strings of printable ASCII without escapes, or
  ``true``/``false``/``null``; no key twice among those it reads.  It parses only the
  hot operations (authorize, purchase, capture, void, increment, refund,
  deposit, withdraw, transfer, query) with every field present, typed and
  in range as records.request_tuple wants it.  Anything else stops it, and
  that line goes to orjson + records.request_tuple, which give the exact
  answer or error.  ``encode_answers`` writes the bytes orjson writes for
  records.answers_to_json.  tests/test_server_json.py checks both on
  hypothesis-generated input.

Non-goals: a general JSON parser (floats, escapes, nesting, Unicode all
take the reference path).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

cimport numpy as cnp
import numpy as np

cnp.import_array()

from authcore.constants import (
    ANSWER_DTYPE,
    FLAG_ALLOW_PARTIAL,
    REQUEST_DTYPE,
    STATUS_CODE,
    AccountStatus,
    Channel,
    Op,
    Status,
)

from authcore._kernel cimport Answer, Request, put_auth_code

assert sizeof(Request) == REQUEST_DTYPE.itemsize
assert sizeof(Answer) == ANSWER_DTYPE.itemsize

# --- the vocabulary (from the enums, checked at import) -----------------------

cdef enum:
    NAMES_MAX = 32          # op, status, channel and account-status values are below this
    ANSWER_BYTES_MAX = 512  # longest answer line: 10 fields of <= 20 digits plus keys (checked below)

cdef enum:  # the request fields the fast path reads
    K_OP = 0
    K_ID = 1
    K_ACCOUNT = 2
    K_AMOUNT = 3
    K_CURRENCY = 4
    K_MERCHANT = 5
    K_MCC = 6
    K_COUNTRY = 7
    K_CHANNEL = 8
    K_ALLOW_PARTIAL = 9
    K_AUTH = 10
    K_TO = 11
    K_COUNT = 12

cdef enum:  # JSON value types the fast path takes
    T_INT = 1
    T_STR = 2
    T_BOOL = 3
    T_NULL = 4  # an integer field's default, as in records._int

cdef enum:  # how an operation's fields are read (json_lines' reference)
    SHAPE_NONE = 0  # not a fast operation
    SHAPE_SPEND = 1  # authorize, purchase
    SHAPE_HOLD = 2  # capture, void (amount optional)
    SHAPE_HOLD_AMOUNT = 3  # increment, refund (amount required)
    SHAPE_MONEY = 4  # deposit, withdraw
    SHAPE_TRANSFER = 5
    SHAPE_QUERY = 6

_KEYS = [b"op", b"id", b"account", b"amount", b"currency", b"merchant", b"mcc", b"country", b"channel",
         b"allow_partial", b"auth", b"to"]
assert len(_KEYS) == K_COUNT

_keep = []  # owners of the C strings below


cdef struct Name:
    const char* s
    size_t n


cdef Name KEY[K_COUNT]
cdef Name OP_IN[NAMES_MAX]       # request op names, by value (n = 0: none)
cdef uint8_t OP_SHAPE[NAMES_MAX]
cdef Name CHANNEL[NAMES_MAX]
cdef Name OP_OUT[256]            # answer op names ("unknown" for any other value)
cdef Name STATUS_OUT[NAMES_MAX]
cdef Name CODE_OUT[NAMES_MAX]
cdef Name ACCOUNT_STATUS_OUT[NAMES_MAX]
cdef int n_status = len(Status)
cdef int n_account_status = len(AccountStatus)
cdef uint8_t FLAG_PARTIAL = FLAG_ALLOW_PARTIAL
cdef uint8_t ST_APPROVED = Status.approved, ST_PARTIAL = Status.partial
cdef uint8_t ST_BAD_REQUEST = Status.bad_request, ST_UNAVAILABLE = Status.unavailable
cdef uint8_t OP_QUERY = Op.query, OP_TRANSFER = Op.transfer
cdef uint8_t IS_SPEND[256]       # authorize, purchase, transfer: answers carry review
cdef uint8_t HAS_AMOUNT[256]     # answers carry approved_amount
cdef uint8_t HAS_CODE[256]       # authorize, purchase: answers carry auth_code


cdef Name _name(str s):
    b = s.encode("ascii")
    assert b.replace(b"_", b"").isalnum()  # nothing to escape, ever
    _keep.append(b)
    cdef Name out
    out.s = PyBytes_AS_STRING(b)
    out.n = PyBytes_GET_SIZE(b)
    return out


def _init():
    memset(OP_IN, 0, sizeof(OP_IN))
    memset(CHANNEL, 0, sizeof(CHANNEL))
    memset(OP_SHAPE, 0, sizeof(OP_SHAPE))
    for i, k in enumerate(_KEYS):
        KEY[i] = _name(k.decode())
    shapes = {Op.authorize: SHAPE_SPEND, Op.purchase: SHAPE_SPEND, Op.capture: SHAPE_HOLD, Op.void: SHAPE_HOLD,
              Op.increment: SHAPE_HOLD_AMOUNT, Op.refund: SHAPE_HOLD_AMOUNT, Op.deposit: SHAPE_MONEY,
              Op.withdraw: SHAPE_MONEY, Op.transfer: SHAPE_TRANSFER, Op.query: SHAPE_QUERY}
    unknown = _name("unknown")
    for v in range(256):
        OP_OUT[v] = unknown
    for o in Op:
        assert 0 < o < NAMES_MAX
        OP_IN[o] = OP_OUT[o] = _name(o.name)
        OP_SHAPE[o] = shapes.get(o, SHAPE_NONE)
    for c in Channel:
        assert 0 <= c < NAMES_MAX
        CHANNEL[c] = _name(c.name)
    assert len(Status) <= NAMES_MAX and len(AccountStatus) <= NAMES_MAX
    for s in Status:
        assert s == list(Status).index(s)  # dense, as records.STATUS_NAMES indexes them
        STATUS_OUT[s] = _name(s.name)
        CODE_OUT[s] = _name(STATUS_CODE[s])
    for a in AccountStatus:
        assert a == list(AccountStatus).index(a)
        ACCOUNT_STATUS_OUT[a] = _name(a.name)
    memset(IS_SPEND, 0, sizeof(IS_SPEND))
    memset(HAS_AMOUNT, 0, sizeof(HAS_AMOUNT))
    memset(HAS_CODE, 0, sizeof(HAS_CODE))
    for o in (Op.authorize, Op.purchase, Op.transfer):
        IS_SPEND[o] = 1
    for o in (Op.authorize, Op.purchase, Op.transfer, Op.increment, Op.capture, Op.void, Op.refund):
        HAS_AMOUNT[o] = 1
    for o in (Op.authorize, Op.purchase):
        HAS_CODE[o] = 1


_init()


# --- parsing ------------------------------------------------------------------------

cdef struct Value:
    uint8_t type
    uint8_t neg
    uint8_t flag  # T_BOOL's value
    uint64_t mag  # T_INT's magnitude
    const char* s  # T_STR's bytes
    size_t n


cdef inline const char* skip_ws(const char* p, const char* e) noexcept nogil:
    while p < e and (p[0] == b' ' or p[0] == b'\t' or p[0] == b'\r' or p[0] == b'\n'):
        p += 1
    return p


cdef inline const char* scan_string(const char* p, const char* e, const char** s, size_t* n) noexcept nogil:
    """At an opening quote: a string of printable ASCII without escapes.
    Returns the byte after the closing quote, or NULL."""
    p += 1
    cdef const char* start = p
    cdef uint8_t c
    while p < e:
        c = <uint8_t>p[0]
        if c == b'"':
            s[0] = start
            n[0] = p - start
            return p + 1
        if c == b'\\' or c < 0x20 or c > 0x7E:
            return NULL
        p += 1
    return NULL


cdef inline const char* scan_value(const char* p, const char* e, Value* v) noexcept nogil:
    cdef uint64_t m = 0
    cdef uint64_t d
    if p >= e:
        return NULL
    if p[0] == b'"':
        v.type = T_STR
        return scan_string(p, e, &v.s, &v.n)
    if p[0] == b't':
        if e - p >= 4 and p[1] == b'r' and p[2] == b'u' and p[3] == b'e':
            v.type = T_BOOL
            v.flag = 1
            return p + 4
        return NULL
    if p[0] == b'n':
        if e - p >= 4 and p[1] == b'u' and p[2] == b'l' and p[3] == b'l':
            v.type = T_NULL
            return p + 4
        return NULL
    if p[0] == b'f':
        if e - p >= 5 and p[1] == b'a' and p[2] == b'l' and p[3] == b's' and p[4] == b'e':
            v.type = T_BOOL
            v.flag = 0
            return p + 5
        return NULL
    v.neg = 0
    if p[0] == b'-':
        v.neg = 1
        p += 1
        if p >= e:
            return NULL
    if p[0] < b'0' or p[0] > b'9':
        return NULL
    if p[0] == b'0':
        p += 1
    else:
        while p < e and b'0' <= p[0] <= b'9':
            d = <uint64_t>(p[0] - c'0')
            if m > (<uint64_t>0xFFFFFFFFFFFFFFFF - d) // 10:
                return NULL  # beyond 64 bits: the reference names the field
            m = m * 10 + d
            p += 1
    if p < e and (p[0] == b'.' or p[0] == b'e' or p[0] == b'E' or b'0' <= p[0] <= b'9'):
        return NULL  # a float, or a leading zero (not JSON)
    v.type = T_INT
    v.mag = m
    return p


cdef inline int key_index(const char* s, size_t n) noexcept nogil:
    cdef int i
    for i in range(K_COUNT):
        if KEY[i].n == n and memcmp(KEY[i].s, s, n) == 0:
            return i
    return -1


cdef inline int name_index(Name* names, int count, const char* s, size_t n) noexcept nogil:
    cdef int i
    for i in range(count):
        if names[i].n == n and n != 0 and memcmp(names[i].s, s, n) == 0:
            return i
    return -1


# Field readers, as records._int: 1 when the field is absent or null
# (``dflt`` taken, unless required) or present with the reference's type
# and range (amounts clamp to int64); 0 otherwise.
cdef inline int get_u64(Value* vals, uint32_t seen, int k, int required, uint64_t dflt, uint64_t* out) noexcept nogil:
    if not (seen >> k) & 1 or vals[k].type == T_NULL:
        out[0] = dflt
        return not required
    if vals[k].type != T_INT or (vals[k].neg and vals[k].mag != 0):
        return 0
    out[0] = vals[k].mag
    return 1


cdef inline int get_u16(Value* vals, uint32_t seen, int k, int required, uint16_t* out) noexcept nogil:
    cdef uint64_t x
    if not get_u64(vals, seen, k, required, 0, &x) or x > 0xFFFF:
        return 0
    out[0] = <uint16_t>x
    return 1


cdef inline int get_i64(Value* vals, uint32_t seen, int k, int required, int64_t* out) noexcept nogil:
    if not (seen >> k) & 1 or vals[k].type == T_NULL:
        out[0] = 0
        return not required
    if vals[k].type != T_INT:
        return 0
    if vals[k].neg:
        if vals[k].mag > (<uint64_t>1 << 63):
            return 0  # orjson reads it as a float: the reference names the field
        out[0] = INT64_MIN if vals[k].mag == (<uint64_t>1 << 63) else -<int64_t>vals[k].mag
    else:  # up to 2^64 - 1 orjson reads an int; money beyond int64 clamps (invalid_amount)
        out[0] = INT64_MAX if vals[k].mag > <uint64_t>INT64_MAX else <int64_t>vals[k].mag
    return 1


cdef int parse_line(const char* p, size_t size, Request* r) noexcept nogil:
    """One line into ``r``: 1; -1 for a blank line (no request, no answer);
    0 for the reference path (``r`` is then garbage)."""
    cdef const char* e = p + size
    cdef Value vals[K_COUNT]
    cdef Value v
    cdef uint32_t seen = 0
    cdef const char* ks
    cdef size_t kn
    cdef int k, op, ch
    p = skip_ws(p, e)
    if p >= e:
        return -1
    if p[0] != b'{':
        return 0
    p = skip_ws(p + 1, e)
    if p < e and p[0] == b'}':
        return 0  # no op
    while True:
        if p >= e or p[0] != b'"':
            return 0
        p = scan_string(p, e, &ks, &kn)
        if p == NULL:
            return 0
        p = skip_ws(p, e)
        if p >= e or p[0] != b':':
            return 0
        p = scan_value(skip_ws(p + 1, e), e, &v)
        if p == NULL:
            return 0
        k = key_index(ks, kn)
        if k >= 0:
            if (seen >> k) & 1:
                return 0  # a key twice: the reference decides which counts
            seen |= <uint32_t>1 << k
            vals[k] = v
        p = skip_ws(p, e)
        if p >= e:
            return 0
        if p[0] == b',':
            p = skip_ws(p + 1, e)
            continue
        if p[0] == b'}':
            break
        return 0
    if skip_ws(p + 1, e) != e:
        return 0
    if not (seen >> K_OP) & 1 or vals[K_OP].type != T_STR:
        return 0
    op = name_index(OP_IN, NAMES_MAX, vals[K_OP].s, vals[K_OP].n)
    if op < 0 or OP_SHAPE[op] == SHAPE_NONE:
        return 0
    memset(r, 0, sizeof(Request))
    r.op = <uint8_t>op
    cdef int shape = OP_SHAPE[op]
    if shape == SHAPE_SPEND:
        if not (get_u64(vals, seen, K_ID, 1, 0, &r.id) and get_u64(vals, seen, K_ACCOUNT, 1, 0, &r.account)
                and get_i64(vals, seen, K_AMOUNT, 1, &r.amount) and get_u16(vals, seen, K_CURRENCY, 1, &r.currency)
                and get_u64(vals, seen, K_MERCHANT, 0, 0, &r.to) and get_u16(vals, seen, K_MCC, 0, &r.mcc)
                and get_u16(vals, seen, K_COUNTRY, 0, &r.country)):
            return 0
        if (seen >> K_CHANNEL) & 1:
            if vals[K_CHANNEL].type != T_STR:
                return 0
            ch = name_index(CHANNEL, NAMES_MAX, vals[K_CHANNEL].s, vals[K_CHANNEL].n)
            if ch < 0:
                return 0
            r.channel = <uint8_t>ch
        if (seen >> K_ALLOW_PARTIAL) & 1:
            if vals[K_ALLOW_PARTIAL].type != T_BOOL:
                return 0
            r.flags = FLAG_PARTIAL if vals[K_ALLOW_PARTIAL].flag else 0
        return 1
    if shape == SHAPE_HOLD or shape == SHAPE_HOLD_AMOUNT:
        return (get_u64(vals, seen, K_ID, 1, 0, &r.id) and get_u64(vals, seen, K_AUTH, 1, 0, &r.account)
                and get_i64(vals, seen, K_AMOUNT, shape == SHAPE_HOLD_AMOUNT, &r.amount))
    if shape == SHAPE_MONEY or shape == SHAPE_TRANSFER:
        return (get_u64(vals, seen, K_ID, 1, 0, &r.id) and get_u64(vals, seen, K_ACCOUNT, 1, 0, &r.account)
                and get_i64(vals, seen, K_AMOUNT, 1, &r.amount) and get_u16(vals, seen, K_CURRENCY, 0, &r.currency)
                and (shape == SHAPE_MONEY or get_u64(vals, seen, K_TO, 1, 0, &r.to)))
    # SHAPE_QUERY
    return get_u64(vals, seen, K_ID, 0, 0, &r.id) and get_u64(vals, seen, K_ACCOUNT, 1, 0, &r.account)


def parse_requests(list lines, Py_ssize_t start, Py_ssize_t line_max, out):
    """Parse ``lines[start:]`` into ``out`` (REQUEST_DTYPE, from row 0) up to
    the first line the fast path does not take (or one over ``line_max``
    bytes); blank lines are passed over.  Returns ``(that line's index,
    rows written)``; the index is ``len(lines)`` when all were taken."""
    if not isinstance(out, np.ndarray) or out.dtype != REQUEST_DTYPE or not out.flags.c_contiguous:
        raise TypeError("out: expected a contiguous REQUEST_DTYPE array")
    cdef Py_ssize_t i = start
    cdef Py_ssize_t n = len(lines)
    cdef Py_ssize_t row = 0
    cdef int got
    if len(out) < n - start:
        raise ValueError(f"out: {len(out)} rows for {n - start} lines")
    cdef Request* rows = <Request*>cnp.PyArray_DATA(<cnp.ndarray>out)  # not .ctypes: 1 us a call
    cdef bytes line
    while i < n:
        line = lines[i]
        if PyBytes_GET_SIZE(line) > line_max:
            break
        got = parse_line(PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line), &rows[row])
        if got == 0:
            break
        row += got > 0
        i += 1
    return i, row


# --- encoding ------------------------------------------------------------------------

cdef inline char* put(char* o, const char* s, size_t n) noexcept nogil:
    memcpy(o, s, n)
    return o + n


cdef inline char* put_name(char* o, Name nm) noexcept nogil:
    o[0] = b'"'
    memcpy(o + 1, nm.s, nm.n)
    o[1 + nm.n] = b'"'
    return o + nm.n + 2


cdef inline char* put_u64(char* o, uint64_t x) noexcept nogil:
    cdef char tmp[20]
    cdef int n = 0
    while True:
        tmp[n] = <char>(c'0' + x % 10)
        n += 1
        x //= 10
        if x == 0:
            break
    while n:
        n -= 1
        o[0] = tmp[n]
        o += 1
    return o


cdef inline char* put_i64(char* o, int64_t x) noexcept nogil:
    if x < 0:
        o[0] = b'-'
        return put_u64(o + 1, <uint64_t>0 - <uint64_t>x)
    return put_u64(o, <uint64_t>x)


cdef char* encode_one(char* o, const Request* q, const Answer* a) noexcept nogil:
    """One answer line as orjson writes records.answer_json's dict."""
    cdef uint8_t st = a.status
    cdef uint8_t code[6]
    o = put(o, b'{"id":', 6)
    o = put_u64(o, a.id)
    o = put(o, b',"op":', 6)
    o = put_name(o, OP_OUT[a.op])
    o = put(o, b',"status":', 10)
    o = put_name(o, STATUS_OUT[st])
    o = put(o, b',"code":', 8)
    o = put_name(o, CODE_OUT[st])
    if a.op == OP_QUERY:
        if st == ST_APPROVED:
            o = put(o, b',"account":', 11)
            o = put_u64(o, q.account)
            o = put(o, b',"balance":', 11)
            o = put_i64(o, a.balance)
            o = put(o, b',"credit_limit":', 16)
            o = put_i64(o, a.credit_limit)
            o = put(o, b',"held":', 8)
            o = put_i64(o, a.held)
            o = put(o, b',"available":', 13)
            o = put_i64(o, a.available)
            o = put(o, b',"account_status":', 18)
            o = put_name(o, ACCOUNT_STATUS_OUT[a.account_status if a.account_status < n_account_status
                                               else n_account_status - 1])
    elif st != ST_BAD_REQUEST and st != ST_UNAVAILABLE:
        o = put(o, b',"stamp":', 9)
        o = put_i64(o, a.stamp)
        if a.has_available:
            o = put(o, b',"available":', 13)
            o = put_i64(o, a.available)
        if HAS_AMOUNT[a.op]:
            o = put(o, b',"approved_amount":', 19)
            o = put_i64(o, a.approved_amount)
        if st == ST_APPROVED or st == ST_PARTIAL:
            if IS_SPEND[a.op]:
                if a.review:
                    o = put(o, b',"review":true', 14)
                else:
                    o = put(o, b',"review":false', 15)
            if HAS_CODE[a.op]:
                o = put(o, b',"auth_code":"', 14)
                put_auth_code(code, a.id)
                o = put(o, <const char*>code, 6)
                o[0] = b'"'
                o += 1
    o = put(o, b'}\n', 2)
    return o


cdef Py_ssize_t encode_nogil_answers_min = 4096  # answers: below this, encode holding the GIL


cdef char* encode_all(char* o, const Request* q, const Answer* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        o = encode_one(o, &q[i], &a[i])
    return o


def encode_answers(requests, answers):
    """The answer lines of a batch, byte for byte what orjson writes for
    records.answers_to_json (with OPT_APPEND_NEWLINE)."""
    if answers.dtype != ANSWER_DTYPE or requests.dtype != REQUEST_DTYPE:
        raise TypeError("expected REQUEST_DTYPE requests and ANSWER_DTYPE answers")
    if len(requests) != len(answers):
        raise ValueError(f"{len(requests)} requests for {len(answers)} answers")
    requests = np.ascontiguousarray(requests)
    answers = np.ascontiguousarray(answers)
    cdef Py_ssize_t n = len(answers)
    cdef const Request* q = <const Request*>cnp.PyArray_DATA(<cnp.ndarray>requests)
    cdef const Answer* a = <const Answer*>cnp.PyArray_DATA(<cnp.ndarray>answers)
    cdef Py_ssize_t i
    for i in range(n):
        if a[i].status >= n_status:
            raise ValueError(f"answer {i}: status {a[i].status} is not a status")
    if n == 0:
        return b""
    cdef char* buf = <char*>malloc(<size_t>n * ANSWER_BYTES_MAX)
    if buf == NULL:
        raise MemoryError()
    cdef char* o = buf
    try:
        # The loop thread encodes; releasing the GIL hands it to the writer
        # thread, and getting it back cost more than encoding a few answers
        # (py-spy: 12% of the loop thread at 100k requests/s in frames of 8).
        if n >= encode_nogil_answers_min:
            with nogil:
                o = encode_all(o, q, a, n)
        else:
            o = encode_all(o, q, a, n)
        return PyBytes_FromStringAndSize(buf, o - buf)
    finally:
        free(buf)


# The longest line: every field at its widest (ids of 20 digits, amounts of
# 20 characters with the sign, the longest names).
def _longest_line():
    longest = lambda names: max(len(x) for x in names)
    return (len('{"id":,"op":"","status":"","code":""}\n') + 20 + longest(o.name for o in Op) + 7
            + longest(s.name for s in Status) + 2
            + len(',"stamp":,"available":,"approved_amount":,"review":false,"auth_code":""') + 3 * 20 + 6
            + len(',"account":,"balance":,"credit_limit":,"held":,"account_status":""') + 5 * 20
            + longest(s.name for s in AccountStatus))


assert _longest_line() < ANSWER_BYTES_MAX
