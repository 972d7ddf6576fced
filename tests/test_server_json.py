"""The JSON-lines server over real sockets on 127.0.0.1.

Each test starts an in-process server (``ServerThread``) on free ports over
an in-memory engine with a fake clock, and talks to it with raw sockets or
``authcore.client``: every SPEC status through JSON lines, pipelined order
with bad lines interleaved, many concurrent connections, malformed and
oversized input (hypothesis), backpressure against a client that stops
reading, timeouts, the connection limit, metrics over HTTP.  The fast
parser and encoder are checked against ``authcore.records``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authcore import constants as C
from authcore.cards import PanHasher
from authcore.client import AsyncClient, Client
from authcore.config import Config
from authcore.protocols._json_codec import parse_requests
from authcore.protocols.json_lines import encode_answers
from authcore.records import RequestError, answers_to_json, request_tuple

from conftest import PAN_KEY, kernel_built, start_server as start

pytestmark = pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")

USD, EUR = 840, 978
MERCHANT = 900_001
PAN_OK = "4111111111111111"


def make_config(**server) -> Config:
    return Config.from_dict({"server": server}) if server else Config.default()




class Lines:
    """A raw JSON-lines connection: send bytes, read answer objects."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, n: int) -> list[dict]:
        out: list[dict] = []
        while len(out) < n:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError(f"closed after {len(out)} of {n} answers")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            out.append(orjson.loads(line))
        return out

    def ask(self, *reqs: dict) -> list[dict]:
        self.send(b"".join(orjson.dumps(r) + b"\n" for r in reqs))
        return self.read(len(reqs))

    def closed_by_peer(self, wait: float = 5.0) -> bool:
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return True
                self.buf += chunk
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def status_of(ans: dict, status: str) -> dict:
    assert ans["status"] == status, ans
    assert ans["code"] == C.STATUS_CODE[C.Status[status]], ans
    return ans


# --- every status of SPEC §6 through JSON lines ----------------------------------


class FailingLog:
    """An attached log that cannot make anything durable."""

    def log_batch(self, stamp0, requests):
        from authcore.engine import Unavailable

        raise Unavailable("injected: disk full")


def test_every_status_reachable_over_json_lines(srv):
    c = Lines(srv.ports["json"])
    seen: dict[str, dict] = {}
    n = [10]

    def go(op: str, expect: str, **f) -> dict:
        if op != "query":
            f.setdefault("id", n[0])
            n[0] += 1
        (ans,) = c.ask({"op": op, **f})
        seen[expect] = status_of(ans, expect)
        return ans

    auth = dict(currency=USD, merchant=MERCHANT, mcc=5411, channel="online", country=840)
    go("open", "approved", account=1, currency=USD, kind="wallet")
    go("open", "account_exists", account=1, currency=USD)
    go("open", "approved", account=2, currency=USD, kind="wallet", single_limit=1000)
    go("open", "approved", account=MERCHANT, currency=USD, kind="merchant")
    go("deposit", "approved", account=1, amount=10_000)
    go("deposit", "approved", account=2, amount=10_000)
    go("deposit", "invalid_amount", account=1, amount=0)
    (ans,) = c.ask({"op": "deposit", "id": 0, "account": 1, "amount": 5})
    seen["invalid_request"] = status_of(ans, "invalid_request")
    go("deposit", "no_account", account=77, amount=5)
    go("deposit", "currency_mismatch", account=1, amount=5, currency=EUR)
    go("withdraw", "insufficient_funds", account=1, amount=10**9)
    a = go("authorize", "approved", account=1, amount=1000, **auth)
    assert a["auth_code"] and a["approved_amount"] == 1000 and a["available"] == 9000
    go("authorize", "partial", account=1, amount=20_000, allow_partial=True, **auth)
    go("capture", "no_auth", auth=999_999)
    go("capture", "amount_exceeds_hold", auth=a["id"], amount=5000)
    go("capture", "approved", auth=a["id"], amount=0)
    go("capture", "auth_closed", auth=a["id"])
    go("refund", "amount_exceeds_capture", auth=a["id"], amount=5000)
    b = go("authorize", "limit_exceeded", account=2, amount=2000, **auth)
    assert b["approved_amount"] == 0
    hold = go("authorize", "approved", account=2, amount=500, **auth)
    go("refund", "not_captured", auth=hold["id"], amount=1)
    go("authorize", "not_permitted", account=MERCHANT, amount=10, **auth)
    go("issue_card", "invalid_card", account=1, pan="4111111111111112")
    go("issue_card", "approved", account=1, pan=PAN_OK)
    go("close", "account_not_empty", account=1)
    go("freeze", "approved", account=2)
    go("authorize", "account_inactive", account=2, amount=10, **auth)
    # card testing (5 small earlier attempts: 60) + risky MCC (20) = 80: declined
    go("open", "approved", account=3, currency=USD, kind="wallet")
    go("deposit", "approved", account=3, amount=10_000)
    for _ in range(5):
        go("authorize", "approved", account=3, amount=100, **auth)
    go("authorize", "suspected_fraud", account=3, amount=100, **{**auth, "mcc": 7995})
    go("query", "approved", account=3)
    (bad,) = c.ask({"op": "deposit", "id": 500, "account": "one", "amount": 5})
    seen["bad_request"] = status_of(bad, "bad_request")
    assert bad["id"] == 500 and "account" in bad["error"]
    srv.engine.attach_log(FailingLog())
    (un,) = c.ask({"op": "deposit", "id": 501, "account": 3, "amount": 5})
    seen["unavailable"] = status_of(un, "unavailable")
    srv.engine.attach_log(None)
    (again,) = c.ask({"op": "deposit", "id": 501, "account": 3, "amount": 5})
    status_of(again, "approved")  # unavailable is not remembered: the retry is decided
    assert set(seen) == {s.name for s in C.Status}, sorted({s.name for s in C.Status} - set(seen))
    c.close()


# --- order, pipelining, concurrency ----------------------------------------------


def test_pipelined_order_with_bad_lines_interleaved(srv):
    c = Lines(srv.ports["json"])
    c.ask({"op": "open", "id": 1, "account": 1, "currency": USD})
    reqs: list[bytes] = []
    expect: list[tuple[str, int | None]] = []
    for i in range(3000):
        if i % 97 == 5:
            reqs.append(b'{"op": "deposit", "id": ' + str(10_000 + i).encode() + b', "amount": 1}')  # no account
            expect.append(("bad_request", 10_000 + i))
        elif i % 89 == 7:
            reqs.append(b"{not json")
            expect.append(("bad_request", None))
        else:
            reqs.append(orjson.dumps({"op": "deposit", "id": 10_000 + i, "account": 1, "amount": 1}))
            expect.append(("approved", 10_000 + i))
    c.send(b"\n".join(reqs) + b"\n")
    answers = c.read(len(reqs))
    for ans, (status, rid) in zip(answers, expect):
        assert ans["status"] == status, ans
        assert ans.get("id") == rid, (ans, rid)
    stamps = [a["stamp"] for a in answers if a["status"] == "approved"]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    (q,) = c.ask({"op": "query", "account": 1})
    assert q["balance"] == sum(1 for s, _ in expect if s == "approved")
    c.close()


def test_many_concurrent_connections(srv):
    port = srv.ports["json"]
    conns, per = 64, 150

    async def one(k: int) -> list[dict]:
        async with AsyncClient("127.0.0.1", port) as c:
            acct = 1000 + k
            out = [await c.open_account(id=acct, account=acct, currency=USD)]
            out += await c.batch([{"op": "deposit", "id": 10**6 * (k + 1) + i, "account": acct, "amount": 2} for i in range(per)])
            out.append(await c.query(account=acct))
            return out

    async def main():
        return await asyncio.gather(*(one(k) for k in range(conns)))

    results = asyncio.run(main())
    for k, out in enumerate(results):
        assert out[0]["status"] == "approved"
        ids = [a["id"] for a in out[1:-1]]
        assert ids == [10**6 * (k + 1) + i for i in range(per)]
        assert all(a["status"] == "approved" for a in out[1:-1])
        assert out[-1]["balance"] == 2 * per
    stats = srv.call(lambda: (len(srv.server.sessions), srv.server.pending_count))
    assert stats[1] == 0
    # answers of all connections went through few, large batches: group commit
    body = http_get(srv.ports["metrics"], "/metrics")[1]
    count = _sample(body, "authcore_batch_size_count")
    assert count < conns * (per + 2), count


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _sample(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


# --- malformed and oversized input ------------------------------------------------


@pytest.mark.parametrize(
    "line, words",
    [
        (b"{", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"deposit"', "JSON object"),
        (b'{"id": 1}', "op"),
        (b'{"op": "teleport", "id": 3}', "unknown op"),
        (b'{"op": 7, "id": 3}', "op"),
        (b'{"op": "deposit", "id": 3, "account": 1}', "amount"),
        (b'{"op": "deposit", "id": 3, "account": 1.5, "amount": 1}', "account"),
        (b'{"op": "deposit", "id": -3, "account": 1, "amount": 1}', "id"),
        (b'{"op": "deposit", "id": true, "account": 1, "amount": 1}', "id"),
        (b'{"op": "authorize", "id": 3, "account": 1, "amount": 1, "currency": 840, "channel": "telepathy"}', "channel"),
        (b'{"op": "authorize", "id": 3, "account": 1, "amount": 1, "currency": 840, "channel": ["qr"]}', ""),
        (b'{"op": "open", "id": 3, "account": 1, "currency": 840, "kind": {"x": 1}}', ""),
        (b'{"op": "issue_card", "id": 3, "account": 1, "pan": 4111111111111111}', "pan"),
        (b'{"op": "query", "account": 18446744073709551616}', "account"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
    ],
)
def test_malformed_lines_get_bad_request_and_connection_stays(srv, line, words):
    c = Lines(srv.ports["json"])
    c.send(line + b"\n" + orjson.dumps({"op": "query", "account": 1}) + b"\n")
    bad, after = c.read(2)
    status_of(bad, "bad_request")
    assert words in bad["error"], bad
    if b'"id": 3' in line:
        assert bad.get("id") == 3
    status_of(after, "no_account")
    c.close()


def test_a_malformed_retry_of_a_known_id_gets_the_first_answer(srv):
    """SPEC §1: a repeated id returns the first answer "whatever the repeated
    request contains", missing fields and unknown ops included; a malformed
    request with a new id is bad_request, remembered nowhere."""
    c = Lines(srv.ports["json"])
    (opened,) = c.ask({"op": "open", "id": 501, "account": 77, "currency": USD})
    (first,) = c.ask({"op": "deposit", "id": 502, "account": 77, "amount": 900})
    assert first["status"] == "approved"
    retries = [b'{"op": "deposit", "id": 502}', b'{"id": 502}', b'{"op": "teleport", "id": 502}',
               b'{"op": "withdraw", "id": 502, "account": "77", "amount": 1}', b'{"op": "deposit", "id": 501}']
    c.send(b"\n".join(retries) + b"\n")
    *again, second_open = c.read(len(retries))
    assert again == [first] * 4 and second_open == opened
    (fresh,) = c.ask({"op": "deposit", "id": 503})  # a new id: not decidable, and not remembered
    assert (fresh["status"], fresh["code"], fresh["id"]) == ("bad_request", "30", 503) and "account" in fresh["error"]
    (later,) = c.ask({"op": "deposit", "id": 503, "account": 77, "amount": 1})
    assert later["status"] == "approved" and later["available"] == 901
    c.close()


def test_oversized_lines_are_answered_and_skipped():
    s = start(make_config(line_bytes_max=1024))
    try:
        c = Lines(s.ports["json"])
        huge = b'{"op": "query", "account": 1, "pad": "' + b"x" * 5000 + b'"}'
        q = orjson.dumps({"op": "query", "account": 1})
        # whole oversized line in one write, then one streamed without a newline for a while
        c.send(huge + b"\n" + q + b"\n")
        bad, ok = c.read(2)
        assert bad["status"] == "bad_request" and "exceeds 1024" in bad["error"]
        status_of(ok, "no_account")
        for _ in range(20):
            c.send(b"y" * 700)
        (bad2,) = c.read(1)
        assert bad2["status"] == "bad_request" and "exceeds" in bad2["error"]
        c.send(b"still the same line\n" + q + b"\n")
        (ok2,) = c.read(1)
        status_of(ok2, "no_account")
        assert s.call(lambda: max(len(x.buf) for x in s.server.sessions)) == 0
        c.close()
    finally:
        s.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)  # fmt: skip
field_names = st.sampled_from(
    ["id", "account", "to", "auth", "amount", "currency", "merchant", "mcc", "country", "channel", "kind",
     "credit_limit", "single_limit", "daily_limit", "allow_partial", "pan"]
)  # fmt: skip
request_objects = st.fixed_dictionaries(
    {"op": st.sampled_from([o.name for o in C.Op]) | json_values},
    optional={"id": st.integers(0, 2**64) | json_values},
).flatmap(
    lambda base: st.dictionaries(field_names, st.integers(-(2**64), 2**65) | json_values, max_size=8).map(
        lambda extra: {**extra, **base}
    )
)


def reference(line: bytes):
    """What orjson + records.request_tuple make of one line: a REQUEST_DTYPE
    row's bytes, or None (bad JSON, not an object, a request error)."""
    try:
        obj = orjson.loads(line)
        return np.array([request_tuple(obj, PanHasher(PAN_KEY))], C.REQUEST_DTYPE).tobytes()
    except (orjson.JSONDecodeError, RequestError, TypeError, ValueError, OverflowError):
        return None


def c_parse(line: bytes, line_max: int = 1 << 20):
    """The C parser on one line: the row's bytes, or None (not taken)."""
    out = np.empty(1, C.REQUEST_DTYPE)
    return out.tobytes() if parse_requests([line], 0, line_max, out) == (1, 1) else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=request_objects, spaced=st.booleans())
def test_c_parser_takes_nothing_the_reference_would_not(obj, spaced):
    line = json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":")).encode()
    got = c_parse(line)
    assert got is None or got == reference(line)


HOT_OPS = ["authorize", "purchase", "capture", "void", "increment", "refund", "deposit", "withdraw", "transfer", "query"]
_u64 = st.integers(0, 2**64 - 1) | st.sampled_from([0, 2**63, 2**64 - 1, 2**64, -1])
_i64 = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-(2**63), -(2**63) - 1, 2**63 - 1, 2**63, 0])
_u16 = st.integers(0, 2**16 - 1) | st.sampled_from([2**16 - 1, 2**16, -1])
HOT_FIELDS = {
    "id": _u64, "account": _u64, "auth": _u64, "to": _u64, "merchant": _u64, "amount": _i64, "currency": _u16,
    "mcc": _u16, "country": _u16, "allow_partial": st.booleans() | st.sampled_from([0, 1, None]),
    "channel": st.sampled_from([c.name for c in C.Channel] + ["ONLINE", "", "atm"]),
    "note": st.text(max_size=6),  # a field nobody reads: any string, escapes and Unicode included
}  # fmt: skip
_ws = st.sampled_from(["", " ", "  ", "\t", "\r"])
MUTATIONS = ["none", "none", "none", "duplicate", "float", "exponent", "leading_zero", "minus_zero", "trailing_comma",
             "garbage", "truncate", "null", "nested", "escape_in_op"]  # fmt: skip


@st.composite
def hot_lines(draw):
    """Lines of the hot operations as gateways write them, with the textual
    variations JSON allows and some it does not.  (line, in_grammar):
    in_grammar when the C parser's grammar covers the line."""
    fields = {"op": draw(st.sampled_from(HOT_OPS))}
    for k in draw(st.lists(st.sampled_from(sorted(HOT_FIELDS)), unique=True, max_size=9)):
        fields[k] = draw(HOT_FIELDS[k])
    items = [(k, json.dumps(v)) for k, v in fields.items()]
    order = draw(st.permutations(range(len(items))))
    items = [items[i] for i in order]
    mutation = draw(st.sampled_from(MUTATIONS))
    ints = [i for i, (k, v) in enumerate(items) if v.lstrip("-").isdigit()]
    if mutation == "duplicate":
        k, _ = draw(st.sampled_from(items))
        items.append((k, json.dumps(draw(HOT_FIELDS.get(k, st.just("authorize"))))))
    elif mutation in ("float", "exponent", "leading_zero", "minus_zero") and ints:
        i = draw(st.sampled_from(ints))
        k, v = items[i]
        v = {"float": v + ".0", "exponent": v + "e0", "leading_zero": "0" + v, "minus_zero": "-0"}[mutation]
        items[i] = (k, v)
    elif mutation == "null":
        i = draw(st.integers(0, len(items) - 1))
        items[i] = (items[i][0], "null")
    elif mutation == "nested":
        items.append(("note", draw(st.sampled_from(['[1]', '{"a":1}', "[]"]))))
    elif mutation == "escape_in_op":
        items = [(k, '"\\u0061uthorize"' if k == "op" else v) for k, v in items]
    else:
        mutation = "none" if mutation in ("float", "exponent", "leading_zero", "minus_zero") else mutation
    sep = [draw(_ws) for _ in range(4)]
    body = ("," + sep[0]).join(f'"{k}"{sep[1]}:{sep[2]}{v}' for k, v in items)
    line = f"{sep[3]}{{{sep[0]}{body}{sep[1]}}}{sep[2]}"
    if mutation == "trailing_comma":
        line = line.replace("}", ",}")
    elif mutation == "garbage":
        line += draw(st.sampled_from(["x", "}", ",", '"']))
    elif mutation == "truncate":
        line = line[: draw(st.integers(0, max(0, len(line) - 1)))]
    raw = line.encode()
    plain = all(not isinstance(fields.get(k), str) or (fields[k].isascii() and fields[k].isprintable()
                                                         and '"' not in fields[k] and "\\" not in fields[k])
                for k in fields)  # fmt: skip
    small = all(not isinstance(v, int) or abs(v) < 2**64 for v in fields.values())  # wider: the reference's
    return raw, mutation in ("none", "minus_zero") and plain and small


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hot_lines())
def test_c_parser_agrees_with_records_on_hot_lines(case):
    """Whatever the C parser takes, it takes exactly as the reference does;
    and it takes every line of its grammar that the reference accepts, so
    the fast path is the common path, not a rare one."""
    line, in_grammar = case
    got, want = c_parse(line), reference(line)
    if got is not None:
        assert got == want, line
    elif in_grammar:
        assert want is None, line


def test_c_parser_stops_at_the_first_line_it_does_not_take():
    ok = b'{"op":"query","account":7}'
    lines = [ok, b"", b" \t\r", ok, b'{"op":"open","id":1,"account":2,"currency":840}', ok, b"x" * 40 + ok]
    out = np.empty(len(lines), C.REQUEST_DTYPE)
    assert parse_requests(lines, 0, 1 << 20, out) == (4, 2)  # blank lines: passed over, no row
    assert parse_requests(lines, 5, 1 << 20, out) == (6, 1)  # starts anywhere, writes from row 0
    assert out[0]["account"] == 7 and out[0]["op"] == C.Op.query
    assert parse_requests([ok], 0, len(ok) - 1, out) == (0, 0)  # over the line limit: the reference answers
    with pytest.raises(ValueError):
        parse_requests(lines, 0, 1 << 20, out[:2])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300))
def test_fast_encoder_is_byte_identical_to_records(seed, n):
    rng = np.random.default_rng(seed)
    a = np.zeros(n, C.ANSWER_DTYPE)
    r = np.zeros(n, C.REQUEST_DTYPE)
    for f in ("id", "stamp", "available", "approved_amount", "balance", "credit_limit", "held"):
        a[f] = rng.integers(0 if f == "id" else -(2**62), 2**62, n)
    a["status"] = rng.integers(0, len(C.Status), n)
    a["review"] = rng.integers(0, 2, n)
    a["account_status"] = rng.integers(0, 3, n)
    a["op"] = rng.integers(0, 20, n)  # 0 and 17-19: "unknown"
    a["has_available"] = rng.integers(0, 2, n)
    r["op"] = a["op"]
    r["account"] = rng.integers(0, 2**63, n)
    want = b"".join(orjson.dumps(d, option=orjson.OPT_APPEND_NEWLINE) for d in answers_to_json(r, a))
    assert encode_answers(r, a) == want


@pytest.fixture(scope="module")
def shared_srv():
    s = start(make_config(line_bytes_max=4096))
    yield s
    s.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=600) | st.builds(lambda o: json.dumps(o).encode(), request_objects), min_size=1, max_size=12))
def test_hypothesis_garbage_never_kills_the_server(shared_srv, chunks):
    """Random bytes and random objects: one answer per non-blank line, server alive."""
    data = b"\n".join(chunks) + b"\n"
    lines = data.split(b"\n")[:-1]
    expected = sum(1 for ln in lines if ln.strip() or len(ln) > 4096)
    c = Lines(shared_srv.ports["json"])
    try:
        c.send(data + orjson.dumps({"op": "query", "account": 424242}) + b"\n")
        answers = c.read(expected + 1)
        for ans in answers:
            assert ans["status"] in C.Status.__members__, ans
            assert ans["code"] == C.STATUS_CODE[C.Status[ans["status"]]]
        status_of(answers[-1], "no_account")
    finally:
        c.close()


# --- backpressure: a client that stops reading ----------------------------------------


def test_client_that_stops_reading_is_bounded():
    """Flood queries without reading: the server stops reading from us once its
    buffer is above the high-water mark, so our sends block; nothing grows
    past the limits; when we read again every answer arrives in order."""
    high, inflight = 64 << 10, 2048
    s = start(make_config(write_buffer_high_bytes=high, inflight_max=inflight))
    try:
        sock = socket.create_connection(("127.0.0.1", s.ports["json"]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        line = orjson.dumps({"op": "query", "account": 7}) + b"\n"
        chunk = line * 2000
        total_lines = 400_000  # ~14 MB of requests, ~37 MB of answers if all were buffered
        sock.settimeout(2.0)
        sent = 0
        try:
            while sent < total_lines * len(line):
                sent += sock.send(chunk)
        except (TimeoutError, socket.timeout):
            pass
        assert sent < total_lines * len(line), "the server never stopped reading"
        time.sleep(0.3)

        def probe():
            (sess,) = [x for x in s.server.sessions]
            return sess.transport.get_write_buffer_size(), sess.inflight, s.server.pending_count, sess.read_paused

        buffered, inflight_now, pending, paused = s.call(probe)
        assert paused
        answer_bytes = 200  # a query answer line is ~150 bytes
        batch_bytes = s.config.server.batch_max * answer_bytes
        assert buffered <= high + batch_bytes + (1 << 20), buffered
        read_chunk = 256 << 10  # uvloop's read size: one read is parsed whole before pausing
        assert inflight_now <= inflight + read_chunk // len(line) + 1, inflight_now
        assert pending <= inflight_now
        # read everything back: order and count intact
        sock.settimeout(10.0)
        lines_sent = sent // len(line)
        buf = b""
        got = 0
        while got < lines_sent:
            data = sock.recv(1 << 20)
            assert data
            buf += data
            parts = buf.split(b"\n")
            buf = parts.pop()
            got += len(parts)
            assert all(p.startswith(b'{"id":0,"op":"query","status":"no_account"') for p in parts[:3])
        assert got == lines_sent
        sock.close()
    finally:
        s.stop()


# --- limits and timeouts -------------------------------------------------------------


def test_connection_limit():
    s = start(make_config(connections_max=2))
    try:
        a, b = Lines(s.ports["json"]), Lines(s.ports["json"])
        a.ask({"op": "query", "account": 1})
        b.ask({"op": "query", "account": 1})
        c = Lines(s.ports["json"])
        (refused,) = c.read(1)
        assert refused["status"] == "bad_request" and "too many connections" in refused["error"]
        assert c.closed_by_peer()
        a.close()
        time.sleep(0.2)
        d = Lines(s.ports["json"])
        status_of(d.ask({"op": "query", "account": 1})[0], "no_account")
        for x in (b, c, d):
            x.close()
    finally:
        s.stop()


def test_read_and_idle_timeouts():
    s = start(make_config(read_timeout_seconds=1.0, idle_timeout_seconds=2.0))
    try:
        slow = Lines(s.ports["json"])
        slow.send(b'{"op": "query", ')  # a line begun and never finished
        idle = Lines(s.ports["json"])
        idle.ask({"op": "query", "account": 1})
        t0 = time.monotonic()
        assert slow.closed_by_peer(wait=5.0)
        assert b"incomplete message timeout" in slow.buf
        assert idle.closed_by_peer(wait=6.0)
        assert b"idle timeout" in idle.buf
        assert time.monotonic() - t0 < 6.0
        slow.close()
        idle.close()
    finally:
        s.stop()


# --- metrics -------------------------------------------------------------------------


def test_metrics_health_ready(srv):
    port = srv.ports["metrics"]
    with Client("127.0.0.1", srv.ports["json"]) as c:
        c.open_account(id=1, account=1, currency=USD)
        c.batch([{"op": "deposit", "id": 100 + i, "account": 1, "amount": 1} for i in range(50)])
        c.request({"op": "deposit", "id": 1, "account": 1, "amount": 1})  # repeat of open's id
        c.batch([{"op": "nope"}])
        assert http_get(port, "/health") == (200, "ok\n")
        assert http_get(port, "/ready") == (200, "ready\n")
        code, body = http_get(port, "/metrics")
        assert code == 200
        assert _sample(body, 'authcore_requests_total{op="deposit",status="approved"}') == 51  # a repeat counts as its request's op
        assert _sample(body, 'authcore_requests_total{op="open",status="approved"}') == 1
        assert _sample(body, 'authcore_bad_requests_total{protocol="json"}') == 1
        assert _sample(body, 'authcore_connections{protocol="json"}') == 1
        assert _sample(body, "authcore_sync_seconds_count") == 0  # no log attached
        assert _sample(body, "authcore_decision_seconds_count") >= 1
        c.batch([{"op": "deposit", "id": 10_000 + i, "account": 1, "amount": 1} for i in range(C.table_rows_initial)])
        grown = _sample(http_get(port, "/metrics")[1], "authcore_table_growth_seconds_total")
        assert srv.engine.growths >= 1 and grown == pytest.approx(srv.engine.growth_seconds)  # the id memory doubled
        srv.engine.attach_log(FailingLog())
        assert c.request({"op": "deposit", "id": 999, "account": 1, "amount": 1})["status"] == "unavailable"
        assert http_get(port, "/ready")[0] == 503
        assert _sample(http_get(port, "/metrics")[1], "authcore_unavailable_batches_total") == 1
        srv.engine.attach_log(None)
        assert c.request({"op": "deposit", "id": 999, "account": 1, "amount": 1})["status"] == "approved"
        assert http_get(port, "/ready")[0] == 200
        assert http_get(port, "/nothing")[0] == 404


def test_metrics_http_refuses_garbage(srv):
    s = socket.create_connection(("127.0.0.1", srv.ports["metrics"]), timeout=5)
    s.sendall(b"NOT-HTTP\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    s = socket.create_connection(("127.0.0.1", srv.ports["metrics"]), timeout=5)
    s.sendall(b"GET /" + b"a" * 9000)
    assert s.recv(100).startswith(b"HTTP/1.1 431")
    s.close()


def test_half_close_still_gets_answers(srv):
    c = Lines(srv.ports["json"])
    c.send(b"".join(orjson.dumps({"op": "query", "account": i}) + b"\n" for i in range(1, 200)))
    c.sock.shutdown(socket.SHUT_WR)
    answers = c.read(199)
    assert all(a["status"] == "no_account" for a in answers)
    assert c.closed_by_peer()
    c.close()


def test_server_thread_stop_drains_inflight():
    s = start()
    c = Lines(s.ports["json"])
    c.ask({"op": "open", "id": 1, "account": 1, "currency": USD})
    c.send(b"".join(orjson.dumps({"op": "deposit", "id": 10 + i, "account": 1, "amount": 1}) + b"\n" for i in range(20_000)))
    time.sleep(0.05)
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    got = []
    try:
        while True:
            got += c.read(1)
    except (ConnectionError, OSError):
        pass
    stopper.join()
    assert got, "nothing answered before the drain closed the connection"
    assert all(a["status"] == "approved" for a in got)
    # every request the server read was answered before it closed: the
    # balance is exactly what the answers acknowledge
    assert s.engine.accounts()[1]["balance"] == len(got)
    c.close()


def test_client_that_never_reads_is_cut_after_the_read_timeout():
    s = start(make_config(write_buffer_high_bytes=64 << 10, read_timeout_seconds=1.0))
    try:
        sock = socket.create_connection(("127.0.0.1", s.ports["json"]))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.settimeout(0.5)
        # The cut is seen as "no sessions left": first wait until the server
        # has registered this one, or an early check passes vacuously.
        for _ in range(250):
            if s.call(lambda: len(s.server.sessions)) == 1:
                break
            time.sleep(0.02)
        assert s.call(lambda: len(s.server.sessions)) == 1
        chunk = (orjson.dumps({"op": "query", "account": 7}) + b"\n") * 2000
        cut = False
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline:
            try:
                sock.send(chunk)
            except (TimeoutError, socket.timeout):
                pass
            except OSError:  # EPIPE / ECONNRESET: the server aborted us
                cut = True
                break
            if s.call(lambda: len(s.server.sessions)) == 0:
                cut = True
                break
        assert cut, "a client that never reads kept its connection"
        for _ in range(100):  # the abort reaches connection_lost a loop turn later
            if s.call(lambda: len(s.server.sessions)) == 0:
                break
            time.sleep(0.02)
        assert s.call(lambda: len(s.server.sessions)) == 0
        body = http_get(s.ports["metrics"], "/metrics")[1]
        assert _sample(body, 'authcore_connections_timed_out_total{protocol="json"}') == 1
        sock.close()
    finally:
        s.stop()


class _Recorder:
    """A JSON-lines session without a server: records submits and replies."""

    def __new__(cls):
        import types

        from authcore.protocols.json_lines import JsonLinesSession
        from authcore.records import RequestError as _RE

        class Session(JsonLinesSession):
            def __init__(self):
                counter = types.SimpleNamespace(labels=lambda *a: counter, inc=lambda *a: None)
                self.server = types.SimpleNamespace(hasher=PanHasher(PAN_KEY), metrics=types.SimpleNamespace(bad_requests=counter))
                self.line_max, self.buf, self.discarding, self.awaiting_key = 200, b"", False, False
                self._slow_parse, self._request_error = request_tuple, _RE
                self.events, self.submits = [], []

            def submit(self, requests, context=None, prepare=None):
                self.submits.append(requests)
                self.events += [("req", int(r)) for r in requests["id"]]

            def reply(self, payload):
                self.events.append(("bad", orjson.loads(payload).get("id")))

        return Session()


def test_lines_keep_their_order_and_fast_runs_stay_one_submit():
    q = lambda i: b'{"op":"query","id":%d,"account":7}' % i  # noqa: E731
    o = lambda i: b'{"op":"open","id":%d,"account":%d,"currency":840}' % (i, i)  # noqa: E731
    s = _Recorder()
    s.feed(b"\n".join([q(1), o(2), b"", q(3), b"junk", q(4), b"x" * 300, o(5), q(6), b"\r", q(7), b'{"op":"query","id":8}'])
           + b"\n")  # fmt: skip
    assert s.events == [("req", 1), ("req", 2), ("req", 3), ("bad", None), ("req", 4), ("bad", None), ("req", 5),
                        ("req", 6), ("req", 7), ("bad", 8)]  # fmt: skip
    s = _Recorder()  # blank lines between fast ones: still one submit, one buffer
    s.feed(b"".join(q(i) + b"\n\n" for i in range(1, 3001)))
    assert len(s.submits) == 1 and s.submits[0]["id"].tolist() == list(range(1, 3001))
