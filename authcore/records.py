"""Requests and answers as JSON objects <-> 64-byte records.

Goals: one strict translation used by the embedded ``Engine.execute``, the
JSON-lines server and the tests, so every interface answers alike (SPEC
§7, §10.12); every malformed request raises ``RequestError`` naming the
field.  Values that are well-typed but out of range are *not* errors here:
the kernel answers them with a status (an amount of 10^30 is
``invalid_amount``, not ``bad_request``).  Non-goal: speed for bulk
traffic, which uses the binary protocol's records directly.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from .constants import (
    ANSWER_DTYPE,
    FLAG_ALLOW_PARTIAL,
    FLAG_SET_CREDIT,
    FLAG_SET_DAILY,
    FLAG_SET_SINGLE,
    REQUEST_DTYPE,
    STATUS_CODE,
    AccountStatus,
    Channel,
    Kind,
    Op,
    Status,
)

u64_max = 2**64 - 1
i64_min, i64_max = -(2**63), 2**63 - 1
u16_max = 2**16 - 1
auth_code_len = 6
_AUTH_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

OPS = {op.name: op for op in Op}
CHANNELS = {c.name: c for c in Channel}
KINDS = {k.name: k for k in Kind}
STATUS_NAMES = [s.name for s in Status]
CODES = [STATUS_CODE[s] for s in Status]
ACCOUNT_STATUS_NAMES = [s.name for s in AccountStatus]
OP_NAMES = {int(op): op.name for op in Op}
_SPENDS = (Op.authorize, Op.purchase, Op.transfer)
_AUTH_CODE_OPS = (Op.authorize, Op.purchase)
_HOLD_OPS = (Op.increment, Op.capture, Op.void, Op.refund)
_PAN_WORDS = struct.Struct("<Qqqq")  # the PAN hash over to/amount/single/daily
assert _PAN_WORDS.size == 32


class RequestError(ValueError):
    """A request that cannot be decoded: answered ``bad_request`` (code 30)."""

    def __init__(self, message: str, id: int | None = None):
        super().__init__(message)
        self.id = id


def _int(obj: dict, name: str, lo: int, hi: int, default: int | None = None, clamp: bool = False) -> int:
    v = obj.get(name)
    if v is None:
        if default is None:
            raise RequestError(f"missing field `{name}`")
        return default
    if type(v) is not int:
        if not isinstance(v, np.integer):  # embedded callers often hold numpy integers
            raise RequestError(f"field `{name}` must be an integer, got {type(v).__name__}")
        v = int(v)
    if v < lo or v > hi:
        if clamp:  # out-of-range money is a status (invalid_amount), not a decode error
            return lo if v < lo else hi
        raise RequestError(f"field `{name}` out of range {lo}..{hi}")
    return v


def _amount(obj: dict, name: str, default: int | None = None) -> int:
    return _int(obj, name, i64_min, i64_max, default, clamp=True)


def _id(obj: dict, name: str, default: int | None = None) -> int:
    return _int(obj, name, 0, u64_max, default)


OP_RETRY_PROBE = 0  # no operation: the kernel answers it from the id memory, else bad_request


def retry_id(obj: Any) -> int | None:
    """The id of a request too malformed to decide, if one can be read.

    SPEC §1: a repeated id returns the first answer "whatever the repeated
    request contains", so a retry missing fields (or with an unknown op)
    still gets it.  Queries ignore ids, so none is read from them.
    """
    if not isinstance(obj, dict) or obj.get("op") == "query":
        return None
    rid = obj.get("id")
    if isinstance(rid, np.integer):  # as _int takes them
        rid = int(rid)
    return rid if type(rid) is int and 0 < rid <= u64_max else None


def retry_probe(rid: int) -> np.ndarray:
    """One record asking the engine for id ``rid``'s first answer: op 0
    passes the kernel's idempotency check like any request and is then
    answered bad_request (not remembered).  Like every request it is logged
    and stamped, and holds due at its stamp expire; nothing else changes."""
    assert 0 < rid <= u64_max
    rec = np.zeros(1, REQUEST_DTYPE)
    rec["id"] = rid
    rec["op"] = OP_RETRY_PROBE
    return rec


def request_tuple(obj: Any, hasher: Any) -> tuple:
    """One JSON request object as a REQUEST_DTYPE tuple (raises RequestError)."""
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    name = obj.get("op")
    if not isinstance(name, str):
        raise RequestError("missing field `op`" if name is None else "field `op` must be a string")
    op = OPS.get(name)
    rid = obj.get("id")
    rid = rid if type(rid) is int and 0 <= rid <= u64_max else None
    if op is None:
        shown = name[:32] if name.isascii() and not any(c.isdigit() for c in name) else "…"
        raise RequestError(f"unknown op `{shown}`", rid)  # never echo digits: they may be a PAN
    try:
        return _fields(op, obj, hasher)
    except RequestError as e:
        e.id = rid
        raise


def _fields(op: Op, obj: dict, hasher: Any) -> tuple:
    account = to = amount = single = daily = 0
    currency = mcc = country = channel = kind = flags = 0
    rid = _id(obj, "id", 0 if op == Op.query else None)
    if op == Op.query:
        account = _id(obj, "account")
    elif op in _HOLD_OPS:
        account = _id(obj, "auth")
        needs_amount = op in (Op.increment, Op.refund)
        amount = _amount(obj, "amount", None if needs_amount else 0)
    elif op in (Op.authorize, Op.purchase):
        account = _id(obj, "account")
        amount = _amount(obj, "amount")
        currency = _int(obj, "currency", 0, u16_max)
        to = _id(obj, "merchant", 0)
        mcc = _int(obj, "mcc", 0, u16_max, 0)
        country = _int(obj, "country", 0, u16_max, 0)
        ch = obj.get("channel", "online")
        if not isinstance(ch, str) or ch not in CHANNELS:
            raise RequestError(f"field `channel` must be one of {', '.join(CHANNELS)}")
        channel = CHANNELS[ch]
        partial = obj.get("allow_partial", False)
        if type(partial) is not bool:
            raise RequestError("field `allow_partial` must be true or false")
        flags = FLAG_ALLOW_PARTIAL if partial else 0
    elif op == Op.transfer:
        account = _id(obj, "account")
        to = _id(obj, "to")
        amount = _amount(obj, "amount")
        currency = _int(obj, "currency", 0, u16_max, 0)
    elif op in (Op.deposit, Op.withdraw):
        account = _id(obj, "account")
        amount = _amount(obj, "amount")
        currency = _int(obj, "currency", 0, u16_max, 0)
    elif op == Op.open:
        account = _id(obj, "account")
        currency = _int(obj, "currency", 0, u16_max)
        k = obj.get("kind", "wallet")
        if not isinstance(k, str) or k not in KINDS:
            raise RequestError("field `kind` must be wallet or merchant")
        kind = KINDS[k]
        amount = _amount(obj, "credit_limit", 0)
        single = _amount(obj, "single_limit", 0)
        daily = _amount(obj, "daily_limit", 0)
    elif op == Op.set_limits:
        account = _id(obj, "account")
        for field, flag in (("credit_limit", FLAG_SET_CREDIT), ("single_limit", FLAG_SET_SINGLE),
                            ("daily_limit", FLAG_SET_DAILY)):
            if obj.get(field) is not None:
                flags |= flag
        amount = _amount(obj, "credit_limit", 0)
        single = _amount(obj, "single_limit", 0)
        daily = _amount(obj, "daily_limit", 0)
        currency = _int(obj, "currency", 0, u16_max, 0)
    elif op == Op.issue_card:
        account = _id(obj, "account")
        currency = _int(obj, "currency", 0, u16_max, 0)
        pan = obj.get("pan")
        if not isinstance(pan, str):
            raise RequestError("missing field `pan`" if pan is None else "field `pan` must be a string of digits")
        to, amount, single, daily = _PAN_WORDS.unpack(hasher.digest(pan))
    else:  # freeze, unfreeze, close
        account = _id(obj, "account")
        currency = _int(obj, "currency", 0, u16_max, 0)
    return (rid, account, to, amount, single, daily, currency, mcc, country, int(op), int(channel), int(kind),
            flags, b"")


def parse_request(obj: Any, hasher: Any) -> np.void:
    """One JSON request object as a REQUEST_DTYPE record."""
    arr = np.zeros(1, REQUEST_DTYPE)
    arr[0] = request_tuple(obj, hasher)
    return arr[0]


def requests_from_json(objs: list, hasher: Any) -> np.ndarray:
    """Many JSON request objects as one batch (raises on the first bad one)."""
    arr = np.zeros(len(objs), REQUEST_DTYPE)
    for i, obj in enumerate(objs):
        arr[i] = request_tuple(obj, hasher)
    return arr


def auth_code(request_id: int) -> str:
    """Six characters [0-9A-Z] derived from the request id alone (SPEC §10.11)."""
    x = (request_id + 0x9E3779B97F4A7C15) & u64_max
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & u64_max
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & u64_max
    x ^= x >> 31
    out = []
    for _ in range(auth_code_len):
        x, r = divmod(x, 36)
        out.append(_AUTH_ALPHABET[r])
    return "".join(out)


def answer_json(ans: Any, account: int | None = None) -> dict:
    """One ANSWER_DTYPE row as the JSON answer object (SPEC §7, §10.12).

    ``ans`` may be a numpy record or a dict-like of its fields; ``account``
    is the queried account, echoed in query answers.
    """
    op = int(ans["op"])
    status = int(ans["status"])
    d: dict[str, Any] = {"id": int(ans["id"]), "op": OP_NAMES.get(op, "unknown"),
                         "status": STATUS_NAMES[status], "code": CODES[status]}
    if op == Op.query:
        if status == Status.approved:
            d.update(account=account, balance=int(ans["balance"]), credit_limit=int(ans["credit_limit"]),
                     held=int(ans["held"]), available=int(ans["available"]),
                     account_status=ACCOUNT_STATUS_NAMES[int(ans["account_status"])])
        return d
    if status in (Status.bad_request, Status.unavailable):
        return d
    d["stamp"] = int(ans["stamp"])
    if ans["has_available"]:
        d["available"] = int(ans["available"])
    approved = status in (Status.approved, Status.partial)
    if op in _SPENDS or op in _HOLD_OPS:
        d["approved_amount"] = int(ans["approved_amount"])
    if approved and op in _SPENDS:
        d["review"] = bool(ans["review"])
    if approved and op in _AUTH_CODE_OPS:
        d["auth_code"] = auth_code(int(ans["id"]))
    return d


ANSWER_CODES_DTYPE = np.dtype(ANSWER_DTYPE.descr + [("code", "U2"), ("auth_code", f"U{auth_code_len}")])


def auth_codes(ids: np.ndarray) -> np.ndarray:
    """``auth_code`` of every id at once (``U6``), by the codecs' C version."""
    from ._kernel import auth_codes as c_auth_codes  # lazily: the client imports records, not the kernel

    return c_auth_codes(ids).astype(f"U{auth_code_len}")


def with_codes(answers: np.ndarray) -> np.ndarray:
    """A batch's answers with SPEC §7's ``code`` (every answer) and
    ``auth_code`` (approved authorize/purchase; "" otherwise) as columns:
    what ``Engine.submit(..., codes=True)`` returns."""
    assert answers.dtype == ANSWER_DTYPE, answers.dtype
    out = np.zeros(len(answers), ANSWER_CODES_DTYPE)
    for name in ANSWER_DTYPE.names:
        out[name] = answers[name]
    out["code"] = np.array(CODES, "U2")[answers["status"]]
    approved = np.isin(answers["status"], (Status.approved, Status.partial))
    spends = approved & np.isin(answers["op"], [int(op) for op in _AUTH_CODE_OPS])
    out["auth_code"][spends] = auth_codes(answers["id"][spends])
    return out


def answers_to_json(requests: np.ndarray, answers: np.ndarray) -> list[dict]:
    """A batch's answers as JSON objects (query answers echo the account)."""
    assert len(requests) == len(answers)
    ops = requests["op"]
    accounts = requests["account"]
    return [answer_json(answers[i], int(accounts[i]) if ops[i] == Op.query else None)
            for i in range(len(answers))]


assert OP_RETRY_PROBE not in {int(op) for op in Op}
assert ANSWER_DTYPE.names is not None and "has_available" in ANSWER_DTYPE.names
