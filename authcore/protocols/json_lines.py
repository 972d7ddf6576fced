"""JSON lines: one request object per line in, one answer object per line out.

Goals: SPEC §7 and §10.12 exactly (``"op"`` names the operation, integers for
ids/amounts/currency/mcc/country, ``pan`` a string, lowercase enum names);
every line gets exactly one answer line, in order; anything malformed (bad
JSON, not an object, unknown op, missing or mistyped field, a line over
``server.line_bytes_max``) is answered ``{"status": "bad_request", "code":
"30", "error": ...}`` naming the problem (with ``id`` when it could be read)
and the connection stays usable.  Blank lines are ignored (no answer).

Non-goals: JSON arrays of requests (use pipelining), pretty-printed
multi-line objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from ..constants import FLAG_ALLOW_PARTIAL, REQUEST_DTYPE, STATUS_CODE, AccountStatus, Channel, Op, Status
from ..records import auth_code_len
from ..server import Session, _Entry

_OPT = orjson.OPT_APPEND_NEWLINE
_BAD_CODE = STATUS_CODE[Status.bad_request]
error_message_chars_max = 200  # an error names the problem, it does not echo input


def bad_request_line(error: str, request_id: Any = None) -> bytes:
    """The bad_request answer line (SPEC §7), with the id if it was readable."""
    out: dict[str, Any] = {}
    if type(request_id) is int and 0 <= request_id < 1 << 64:
        out["id"] = request_id
    out["status"] = "bad_request"
    out["code"] = _BAD_CODE
    out["error"] = error[:error_message_chars_max]
    return orjson.dumps(out, option=_OPT)


# --- answers: a batch at a time ------------------------------------------------
#
# records.answers_to_json is the reference (one dict per answer, built from
# numpy scalars, field by field).  The encoder below gives the same bytes
# (tests check it on random answers), several times faster.  The fields an
# answer carries depend only on its (op, status, has_available), so each such
# "shape" gets a small generated builder: a list comprehension with a dict
# literal over the shape's columns, which is CPython's fastest way to make
# dicts.  The batch is grouped by shape with numpy, each column becomes a
# Python list once, the whole batch is one orjson call, and the JSON array is
# split into lines at "},{" -- exact because every string in an answer comes
# from a fixed vocabulary with no braces and nothing to escape (names,
# codes, auth codes [0-9A-Z]).

_OP_NAMES = {int(o): o.name for o in Op}
_STATUS_NAMES = [s.name for s in Status]
_CODES = [STATUS_CODE[s] for s in Status]
_SPENDS = frozenset(int(o) for o in (Op.authorize, Op.purchase, Op.transfer))
_AMOUNT_OPS = _SPENDS | frozenset(int(o) for o in (Op.increment, Op.capture, Op.void, Op.refund))
_CODE_OPS = frozenset(int(o) for o in (Op.authorize, Op.purchase))
_QUERY = int(Op.query)
_APPROVED = (int(Status.approved), int(Status.partial))
_NO_STAMP = (int(Status.bad_request), int(Status.unavailable))
_ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
_ACCOUNT_STATUS = np.array([s.name for s in AccountStatus], dtype=object)
_VOCAB = _STATUS_NAMES + list(_OP_NAMES.values()) + _CODES + list(_ACCOUNT_STATUS) + ["unknown"]
assert all(w.replace("_", "").isalnum() and w.isascii() for w in _VOCAB)  # no braces, nothing to escape


def auth_codes(ids: np.ndarray) -> list[str]:
    """records.auth_code for many ids at once (splitmix64, base 36)."""
    x = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    digits = np.empty((len(ids), auth_code_len), np.uint8)
    for k in range(auth_code_len):
        digits[:, k] = _ALPHABET[(x % np.uint64(36)).astype(np.intp)]
        x //= np.uint64(36)
    return digits.view(f"S{auth_code_len}").ravel().astype(f"U{auth_code_len}").tolist()


def _column(name: str, requests: np.ndarray, answers: np.ndarray, idx) -> list:
    if name == "account":
        return requests["account"][idx].tolist()
    if name == "review":
        return (answers["review"][idx] != 0).tolist()
    if name == "auth_code":
        return auth_codes(answers["id"][idx])
    if name == "account_status":
        return _ACCOUNT_STATUS[np.minimum(answers["account_status"][idx], len(_ACCOUNT_STATUS) - 1)].tolist()
    return answers[name][idx].tolist()


def _shape(op: int, status: int, has_available: int) -> tuple[Any, tuple[str, ...]]:
    """The dict builder of one answer shape, and the columns it takes."""
    items = [("id", None), ("op", _OP_NAMES.get(op, "unknown")), ("status", _STATUS_NAMES[status]),
             ("code", _CODES[status])]  # fmt: skip
    if op == _QUERY:
        if status == Status.approved:
            items += [(c, None) for c in ("account", "balance", "credit_limit", "held", "available", "account_status")]
    elif status not in _NO_STAMP:
        items.append(("stamp", None))
        if has_available:
            items.append(("available", None))
        if op in _AMOUNT_OPS:
            items.append(("approved_amount", None))
        if status in _APPROVED:
            if op in _SPENDS:
                items.append(("review", None))
            if op in _CODE_OPS:
                items.append(("auth_code", None))
    cols = tuple(k for k, const in items if const is None)
    # Keys and constants come from the fixed vocabulary above, never from input.
    body = ", ".join(f"{k!r}: {k}" if const is None else f"{k!r}: {const!r}" for k, const in items)
    src = f"def build({', '.join(cols)}):\n    return [{{{body}}} for ({', '.join(cols)},) in zip({', '.join(cols)})]\n"
    scope: dict[str, Any] = {}
    exec(compile(src, f"<answer shape {op}/{status}/{has_available}>", "exec"), scope)
    return scope["build"], cols


_shapes: dict[int, tuple[Any, tuple[str, ...]]] = {}


def answer_dicts(requests: np.ndarray, answers: np.ndarray) -> list[dict]:
    """The same list as records.answers_to_json, built shape by shape."""
    n = len(answers)
    assert len(requests) == n
    if n == 0:
        return []
    key = (answers["op"].astype(np.int64) << 9) | (answers["status"].astype(np.int64) << 1) | (answers["has_available"] != 0)
    first = int(key[0])
    if (key == first).all():
        groups = [(first, slice(None))]
    else:
        groups = [(k, np.flatnonzero(key == k)) for k in np.unique(key).tolist()]
    out: list = [] if len(groups) == 1 else [None] * n
    for k, idx in groups:
        shape = _shapes.get(k)
        if shape is None:
            shape = _shapes[k] = _shape(k >> 9, (k >> 1) & 0xFF, k & 1)
        build, cols = shape
        dicts = build(*[_column(c, requests, answers, idx) for c in cols])
        if len(groups) == 1:
            return dicts
        for i, d in zip(idx.tolist(), dicts):
            out[i] = d
    return out


def encode_answers(requests: np.ndarray, answers: np.ndarray) -> bytes:
    """The answer lines of a batch, exactly as records.answers_to_json + orjson."""
    if len(answers) == 0:
        return b""
    body = orjson.dumps(answer_dicts(requests, answers))
    return body[1:-1].replace(b"},{", b"}\n{") + b"\n"


def _encode_with_refusals(entry: _Entry, client: str | None) -> bytes:
    """Answer lines of a submit some of whose records security refused."""
    from ..security import refusal_json

    refused = entry.refused
    keep = entry.keep
    out: list = [None] * len(refused)
    if len(keep):
        for i, d in zip(keep.tolist(), answer_dicts(entry.requests[keep], entry.answers[keep])):
            out[i] = d
    ids, ops = entry.requests["id"].tolist(), entry.requests["op"].tolist()
    for i in np.flatnonzero(refused).tolist():
        out[i] = refusal_json(ids[i], ops[i], int(refused[i]), client)
    return b"".join(orjson.dumps(d, option=_OPT) for d in out)


# --- requests: a fast path for the hot operations ---------------------------------
#
# records.request_tuple is the reference parser (it names the field of every
# error and clamps out-of-range money).  The hot operations below are parsed
# here with the same result when every field is present, well typed and in
# range; anything else falls back to request_tuple, which then gives the
# exact answer or error.  tests/test_server_json.py checks the two agree on
# hypothesis-generated objects.

_U64 = (1 << 64) - 1
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_U16 = (1 << 16) - 1
_CHANNELS = {c.name: int(c) for c in Channel}
_FLAG_PARTIAL = FLAG_ALLOW_PARTIAL
_OP = {o.name: int(o) for o in Op}


def _fast_authorize(obj: dict, op: int):
    g = obj.get
    rid, acc, amt, cur = g("id"), g("account"), g("amount"), g("currency")
    mer, mcc, cty = g("merchant", 0), g("mcc", 0), g("country", 0)
    ch, ap = g("channel", "online"), g("allow_partial", False)
    if (
        type(rid) is int and type(acc) is int and type(amt) is int and type(cur) is int
        and type(mer) is int and type(mcc) is int and type(cty) is int and type(ch) is str
        and (ap is False or ap is True)
        and 0 <= rid <= _U64 and 0 <= acc <= _U64 and _I64_MIN <= amt <= _I64_MAX and 0 <= cur <= _U16
        and 0 <= mer <= _U64 and 0 <= mcc <= _U16 and 0 <= cty <= _U16
    ):  # fmt: skip
        chv = _CHANNELS.get(ch)
        if chv is not None:
            return (rid, acc, mer, amt, 0, 0, cur, mcc, cty, op, chv, 0, _FLAG_PARTIAL if ap else 0, b"")
    return None


def _fast_hold(obj: dict, op: int):
    g = obj.get
    rid, auth, amt = g("id"), g("auth"), g("amount", 0)
    if op == _INCREMENT or op == _REFUND:
        if amt is None or "amount" not in obj:
            return None
    if (
        type(rid) is int and type(auth) is int and type(amt) is int
        and 0 <= rid <= _U64 and 0 <= auth <= _U64 and _I64_MIN <= amt <= _I64_MAX
    ):  # fmt: skip
        return (rid, auth, 0, amt, 0, 0, 0, 0, 0, op, 0, 0, 0, b"")
    return None


def _fast_money(obj: dict, op: int):
    g = obj.get
    rid, acc, amt, cur = g("id"), g("account"), g("amount"), g("currency", 0)
    to = g("to") if op == _TRANSFER else 0
    if (
        type(rid) is int and type(acc) is int and type(amt) is int and type(cur) is int and type(to) is int
        and 0 <= rid <= _U64 and 0 <= acc <= _U64 and _I64_MIN <= amt <= _I64_MAX and 0 <= cur <= _U16
        and 0 <= to <= _U64
    ):  # fmt: skip
        return (rid, acc, to, amt, 0, 0, cur, 0, 0, op, 0, 0, 0, b"")
    return None


def _fast_query(obj: dict, op: int):
    rid, acc = obj.get("id", 0), obj.get("account")
    if type(rid) is int and type(acc) is int and 0 <= rid <= _U64 and 0 <= acc <= _U64:
        return (rid, acc, 0, 0, 0, 0, 0, 0, 0, op, 0, 0, 0, b"")
    return None


_INCREMENT, _REFUND, _TRANSFER = int(Op.increment), int(Op.refund), int(Op.transfer)
_FAST = {
    "authorize": (_fast_authorize, int(Op.authorize)),
    "purchase": (_fast_authorize, int(Op.purchase)),
    "capture": (_fast_hold, int(Op.capture)),
    "void": (_fast_hold, int(Op.void)),
    "increment": (_fast_hold, _INCREMENT),
    "refund": (_fast_hold, _REFUND),
    "deposit": (_fast_money, int(Op.deposit)),
    "withdraw": (_fast_money, int(Op.withdraw)),
    "transfer": (_fast_money, _TRANSFER),
    "query": (_fast_query, _QUERY),
}


def request_tuple_fast(obj: dict, hasher, slow=None):
    """records.request_tuple, faster for well-formed hot operations."""
    op = obj.get("op")
    if type(op) is str:
        fast = _FAST.get(op)
        if fast is not None:
            t = fast[0](obj, fast[1])
            if t is not None:
                return t
    if slow is None:
        from ..records import request_tuple as slow
    return slow(obj, hasher)


class JsonLinesSession(Session):
    protocol_name = "json"

    def __init__(self, server):
        super().__init__(server)
        from ..records import RequestError, request_tuple

        self._slow_parse = request_tuple
        self._request_error = RequestError
        self.line_max = server.limits.line_bytes_max
        self.buf = b""  # an incomplete line (at most line_max bytes)
        self.discarding = False  # inside an oversized line, already answered

    def has_partial(self) -> bool:
        return bool(self.buf) or self.discarding

    def feed(self, data: bytes) -> None:
        if self.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1 :]
            self.discarding = False
        if self.buf:
            data = self.buf + data
            self.buf = b""
        lines = data.split(b"\n")
        tail = lines.pop()
        if lines:
            self._lines(lines)
        if len(tail) > self.line_max:
            self._bad(f"line exceeds {self.line_max} bytes")
            self.discarding = True
        else:
            self.buf = tail

    def _lines(self, lines: list[bytes]) -> None:
        recs: list = []
        fast = _FAST
        slow = self._slow_parse
        hasher = self.server.hasher
        loads = orjson.loads
        line_max = self.line_max
        for line in lines:
            if self.awaiting_key:  # identities without a client certificate: the first line is the API key
                if not line.strip():
                    continue
                if not self._authenticate(line):
                    return
                continue
            if len(line) > line_max:
                self._submit(recs)
                recs = []
                self._bad(f"line exceeds {line_max} bytes")
                continue
            try:
                obj = loads(line)
            except orjson.JSONDecodeError as e:
                if not line.strip():
                    continue  # blank line (or a lone \r): no request, no answer
                self._submit(recs)
                recs = []
                self._bad(f"malformed JSON: {e}")
                continue
            if type(obj) is not dict:
                self._submit(recs)
                recs = []
                self._bad("a request must be a JSON object")
                continue
            op = obj.get("op")
            f = fast.get(op) if type(op) is str else None
            t = f[0](obj, f[1]) if f is not None else None
            if t is not None:
                recs.append(t)
                continue
            try:
                recs.append(slow(obj, hasher))
            except self._request_error as e:
                self._submit(recs)
                recs = []
                self._bad(str(e), e.id if e.id is not None else obj.get("id"))
            except (TypeError, ValueError, OverflowError) as e:
                # A value of a type the parser did not expect (a list where a
                # name belongs): still a bad request, never a dead connection.
                self._submit(recs)
                recs = []
                self._bad(f"malformed request: {type(e).__name__}", obj.get("id"))
        self._submit(recs)

    def _authenticate(self, line: bytes) -> bool:
        """``{"op": "auth", "api_key": "..."}`` -> ``{"status": "approved", "client": name}``."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        key = obj.get("api_key") if type(obj) is dict and obj.get("op") == "auth" else None
        name = self.server.security.authenticate_key(self, key.encode()) if type(key) is str else None
        if name is None:
            if type(key) is not str:
                self.server.security.refused(self.protocol_name, self.peer or "?", "bad_api_key", "first line is not an auth line")
            self.reply(orjson.dumps({"op": "auth", "status": "not_permitted", "code": STATUS_CODE[Status.not_permitted],
                                     "error": 'authentication required: send {"op": "auth", "api_key": ...} first'},
                                    option=_OPT))  # fmt: skip
            self.start_draining()
            return False
        self.reply(orjson.dumps({"op": "auth", "status": "approved", "code": "00", "client": name}, option=_OPT))
        return True

    def _submit(self, recs: list) -> None:
        if not recs:
            return
        self.submit(np.array(recs, REQUEST_DTYPE))

    def _bad(self, error: str, request_id: Any = None) -> None:
        self.server.metrics.bad_requests.labels(self.protocol_name).inc()
        self.reply(bad_request_line(error, request_id))

    def encode(self, entry: _Entry) -> bytes:
        if entry.refused is not None:
            return _encode_with_refusals(entry, self.client_name)
        return encode_answers(entry.requests, entry.answers)

    def send_error(self, message: str) -> None:
        self._write(bad_request_line(message))
