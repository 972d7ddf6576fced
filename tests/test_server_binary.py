"""The native binary protocol over real sockets, and docs/protocol.md.

Covers the handshake (version, limits, refusals), frames in and out in
order with their tags, every frame error (named, and the connection kept
whenever the stream can be resynchronised), issue_card's ASCII PAN turned
into the HMAC by the server, frames larger than a batch, ``unavailable``
for a whole batch, agreement with the JSON protocol, and random bytes that
never take the server down.
"""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authcore import constants as C
from authcore.client import Client, ProtocolError, records_from_dicts
from authcore.config import Config
from authcore.protocols import binary as wire

from conftest import FakeClock, kernel_built, start_server as start

pytestmark = pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")

USD = 840
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"




class Raw:
    """A raw binary connection: frames out, frames in."""

    def __init__(self, port: int, hello: bool = True, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        if hello:
            self.sock.sendall(wire.hello_frame())
            ftype, tag, payload = self.frame()
            assert ftype == wire.FrameType.hello_ok, (ftype, payload)
            self.hello = wire.HELLO_OK.unpack(payload)

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def frame(self) -> tuple[int, int, bytes]:
        self._need(wire.header_size)
        magic, ftype, flags, length, tag = wire.HEADER.unpack_from(self.buf)
        assert magic == wire.MAGIC and flags == 0
        self._need(wire.header_size + length)
        payload = self.buf[wire.header_size : wire.header_size + length]
        self.buf = self.buf[wire.header_size + length :]
        return ftype, tag, payload

    def send_records(self, recs: np.ndarray, tag: int) -> None:
        self.sock.sendall(wire.frame(wire.FrameType.requests, recs.tobytes(), tag))

    def answers(self, tag: int) -> np.ndarray:
        ftype, got_tag, payload = self.frame()
        assert got_tag == tag
        if ftype == wire.FrameType.error:
            raise ProtocolError(*_err(payload))
        assert ftype == wire.FrameType.answers
        return np.frombuffer(payload, C.ANSWER_DTYPE)

    def error(self, tag: int | None = None) -> tuple[int, int, str]:
        ftype, got_tag, payload = self.frame()
        assert ftype == wire.FrameType.error, ftype
        if tag is not None:
            assert got_tag == tag
        return wire.parse_error(payload)

    def closed_by_peer(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return True
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def _err(payload: bytes) -> tuple[str, int, int]:
    code, record, msg = wire.parse_error(payload)
    return msg, code, record


def recs(*dicts: dict) -> np.ndarray:
    return records_from_dicts(list(dicts))


def test_handshake_announces_version_and_limits(srv):
    r = Raw(srv.ports["binary"])
    pid, version, _f, rsz, asz, fmax, inflight, batch, _ = r.hello
    lim = srv.config.server
    assert (pid, version, rsz, asz) == (b"AUTHCORE", wire.VERSION, 64, 64)
    assert (fmax, inflight, batch) == (lim.frame_bytes_max, lim.inflight_max, lim.batch_max)
    # an empty frame is a ping: answered by an empty answers frame with its tag
    r.send_records(np.zeros(0, C.REQUEST_DTYPE), 77)
    assert len(r.answers(77)) == 0
    r.close()


@pytest.mark.parametrize(
    "first, code",
    [
        (wire.hello_frame(version=99), wire.ErrorCode.unsupported_version),
        (wire.frame(wire.FrameType.requests, b""), wire.ErrorCode.handshake_required),
        (wire.frame(wire.FrameType.hello, struct.pack("<8sHHI", b"HTTP/1.1", 1, 0, 0)), wire.ErrorCode.handshake_required),
        (b"GET / HTTP/1.1\r\n\r\n", wire.ErrorCode.bad_magic),
    ],
)
def test_bad_handshakes_are_named_then_closed(srv, first, code):
    r = Raw(srv.ports["binary"], hello=False)
    r.sock.sendall(first)
    got_code, _rec, msg = r.error()
    assert got_code == code, msg
    assert msg
    assert r.closed_by_peer()
    r.close()


def test_frames_answered_in_order_with_their_tags(srv):
    r = Raw(srv.ports["binary"])
    r.send_records(recs({"op": "open", "id": 1, "account": 1, "currency": USD}), 1)
    assert r.answers(1)["status"][0] == C.Status.approved
    n_frames, per = 40, 250
    ids = np.arange(1000, 1000 + n_frames * per, dtype=np.uint64)
    batch = np.zeros(len(ids), C.REQUEST_DTYPE)
    batch["id"] = ids
    batch["op"] = C.Op.deposit
    batch["account"] = 1
    batch["amount"] = 3
    data = b"".join(
        wire.frame(wire.FrameType.requests, batch[k * per : (k + 1) * per].tobytes(), 5000 + k) for k in range(n_frames)
    )
    r.sock.sendall(data)
    stamps = []
    for k in range(n_frames):
        a = r.answers(5000 + k)
        assert (a["id"] == ids[k * per : (k + 1) * per]).all()
        assert (a["status"] == C.Status.approved).all()
        assert (a["op"] == C.Op.deposit).all()
        stamps.append(a["stamp"])
    s = np.concatenate(stamps)
    assert (np.diff(s) > 0).all()
    r.send_records(recs({"op": "query", "account": 1}), 9)
    assert r.answers(9)["balance"][0] == 3 * n_frames * per
    r.close()


def test_frame_errors_are_named_and_the_stream_resynchronises(srv):
    r = Raw(srv.ports["binary"])
    good = recs({"op": "open", "id": 1, "account": 1, "currency": USD})
    # payload not a multiple of 64: refused, skipped
    r.sock.sendall(wire.frame(wire.FrameType.requests, good.tobytes() + b"xyz", 11))
    code, _, msg = r.error(11)
    assert code == wire.ErrorCode.bad_length and "multiple of 64" in msg
    # unknown frame type: refused, skipped
    r.sock.sendall(wire.frame(9, b"\x00" * 10, 12))
    code, _, msg = r.error(12)
    assert code == wire.ErrorCode.bad_frame_type
    # header flags set
    r.sock.sendall(wire.frame(wire.FrameType.requests, good.tobytes(), 13, flags=1))
    assert r.error(13)[0] == wire.ErrorCode.bad_header_flags
    # bad enum values: the whole frame is refused, nothing of it applied
    for field, value, words in (("op", 0, "op 0"), ("op", 99, "op 99"), ("channel", 9, "channel 9"), ("kind", 5, "kind 5"),
                                ("flags", 0x80, "flags")):  # fmt: skip
        bad = np.concatenate([good, good])
        bad["id"][1] = 2
        bad[field][1] = value
        r.send_records(bad, 14)
        code, record, msg = r.error(14)
        assert code == wire.ErrorCode.bad_record and record == 1 and words in msg, msg
    pad = good.copy()
    pad.view(np.uint8)[60] = 1
    r.send_records(pad, 15)
    code, record, msg = r.error(15)
    assert code == wire.ErrorCode.bad_record and record == 0 and "reserved" in msg
    # after all that, the connection works and nothing was applied
    r.send_records(recs({"op": "query", "account": 1}), 16)
    assert r.answers(16)["status"][0] == C.Status.no_account
    r.send_records(good, 17)
    assert r.answers(17)["status"][0] == C.Status.approved
    r.close()


def test_frame_too_large_is_skipped_without_buffering():
    s = start(Config.from_dict({"server": {"frame_bytes_max": 64 * 100}}))
    try:
        r = Raw(s.ports["binary"])
        assert r.hello[5] == 6400
        big = np.zeros(1000, C.REQUEST_DTYPE)
        big["op"] = C.Op.query
        r.sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.FrameType.requests, 0, big.nbytes, 21))
        code, _, msg = r.error(21)
        assert code == wire.ErrorCode.frame_too_large and "6400" in msg
        for i in range(0, big.nbytes, 4096):  # the payload is skipped as it streams
            r.sock.sendall(big.tobytes()[i : i + 4096])
        r.send_records(recs({"op": "query", "account": 5}), 22)
        assert r.answers(22)["status"][0] == C.Status.no_account
        assert s.call(lambda: max(len(x.buf) for x in s.server.sessions)) == 0
        r.close()
    finally:
        s.stop()


def test_frame_larger_than_a_batch_is_split_and_reassembled():
    s = start(Config.from_dict({"server": {"batch_max": 100}}))
    try:
        with Client("127.0.0.1", s.ports["binary"], "binary") as c:
            c.open_account(id=1, account=1, currency=USD)
            n = 1234
            batch = np.zeros(n, C.REQUEST_DTYPE)
            batch["id"] = np.arange(10, 10 + n)
            batch["op"] = C.Op.deposit
            batch["account"] = 1
            batch["amount"] = np.arange(1, n + 1)
            a = c.submit(batch)
            assert (a["id"] == batch["id"]).all()
            assert (a["available"] == np.cumsum(batch["amount"])).all()
            assert c.query(account=1)["balance"] == n * (n + 1) // 2
        sizes = s.call(lambda: s.server.metrics.batch_size.collect()[0].samples)
        assert max(smp.value for smp in sizes if smp.name.endswith("_sum")) > 0
    finally:
        s.stop()


def test_issue_card_carries_ascii_pan_and_server_hashes_it(srv):
    pan = "4111111111111111"
    with Client("127.0.0.1", srv.ports["binary"], "binary") as c:
        c.open_account(id=1, account=1, currency=USD)
        c.open_account(id=2, account=2, currency=USD)
        assert c.issue_card(id=3, account=1, pan=pan)["status"] == "approved"
        assert c.issue_card(id=4, account=2, pan=pan)["status"] == "invalid_card"  # bound elsewhere
        assert c.issue_card(id=5, account=2, pan="4111111111111112")["status"] == "invalid_card"  # Luhn
        assert c.issue_card(id=6, account=2, pan="41111")["status"] == "invalid_card"  # too short
        assert c.issue_card(id=7, account=2, pan="\u00e9" * 20)["status"] == "invalid_card"  # not ASCII
    assert srv.call(lambda: None) is None
    assert srv.engine.card_account(pan) == 1


def test_unavailable_answers_every_request_of_the_batch(srv):
    from authcore.engine import Unavailable

    class Failing:
        def log_batch(self, stamp0, requests):
            raise Unavailable("injected")

    r = Raw(srv.ports["binary"])
    r.send_records(recs({"op": "open", "id": 1, "account": 1, "currency": USD}), 1)
    r.answers(1)
    srv.engine.attach_log(Failing())
    batch = np.zeros(500, C.REQUEST_DTYPE)
    batch["id"] = np.arange(100, 600)
    batch["op"] = C.Op.deposit
    batch["account"] = 1
    batch["amount"] = 1
    r.send_records(batch, 2)
    a = r.answers(2)
    assert (a["status"] == C.Status.unavailable).all() and (a["id"] == batch["id"]).all()
    srv.engine.attach_log(None)
    r.send_records(batch, 3)
    assert (r.answers(3)["status"] == C.Status.approved).all()  # not remembered: retried for real
    r.close()


def test_binary_and_json_give_the_same_answers():
    script = [
        {"op": "open", "id": 1, "account": 1, "currency": USD, "credit_limit": 100},
        {"op": "open", "id": 2, "account": 900, "currency": USD, "kind": "merchant"},
        {"op": "deposit", "id": 3, "account": 1, "amount": 5000},
        {"op": "authorize", "id": 4, "account": 1, "amount": 300, "currency": USD, "merchant": 900, "mcc": 5411,
         "channel": "qr", "country": 156},
        {"op": "authorize", "id": 5, "account": 1, "amount": 9000, "currency": USD, "merchant": 900, "allow_partial": True},
        {"op": "capture", "id": 6, "auth": 4},
        {"op": "refund", "id": 7, "auth": 4, "amount": 100},
        {"op": "set_limits", "id": 8, "account": 1, "single_limit": 50},
        {"op": "purchase", "id": 9, "account": 1, "amount": 60, "currency": USD, "merchant": 900},
        {"op": "transfer", "id": 10, "account": 1, "to": 900, "amount": 10},
        {"op": "issue_card", "id": 11, "account": 1, "pan": "5500000000000004"},
        {"op": "query", "account": 1},
        {"op": "deposit", "id": 3, "account": 1, "amount": 1},
    ]  # fmt: skip
    out = {}
    for proto in ("json", "binary"):
        s = start(clock=FakeClock())
        try:
            with Client("127.0.0.1", s.ports[proto], proto) as c:
                out[proto] = c.batch(script)
        finally:
            s.stop()
    assert out["json"] == out["binary"]
    assert [a["status"] for a in out["json"]][:6] == ["approved"] * 4 + ["partial", "approved"]


def test_client_raises_protocol_error_on_refused_frame(srv):
    with Client("127.0.0.1", srv.ports["binary"], "binary") as c:
        bad = np.zeros(2, C.REQUEST_DTYPE)
        bad["op"] = [C.Op.query, 200]
        with pytest.raises(ProtocolError) as e:
            c.submit(bad)
        assert e.value.code == wire.ErrorCode.bad_record and e.value.record == 1
        assert c.query(account=1)["status"] == "no_account"  # same connection still usable


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), handshake=st.booleans())
def test_random_bytes_never_kill_the_server(shared, data, handshake):
    r = Raw(shared.ports["binary"], hello=handshake)
    r.sock.settimeout(0.2)
    try:
        r.sock.sendall(data)
    except OSError:
        pass
    r.closed_by_peer()  # drain whatever came back: errors or answers
    r.close()
    ok = Raw(shared.ports["binary"])
    ok.send_records(recs({"op": "query", "account": 3}), 1)
    assert ok.answers(1)["status"][0] == C.Status.no_account
    ok.close()


@pytest.fixture(scope="module")
def shared():
    s = start()
    yield s
    s.stop()


def test_docs_protocol_md_matches_the_code():
    text = DOC.read_text()
    assert f"0x{wire.MAGIC:04X}" in text
    assert f"version {wire.VERSION}" in text.lower() or f"VERSION = {wire.VERSION}" in text
    for t in wire.FrameType:
        assert re.search(rf"\|\s*{int(t)}\s*\|\s*`?{t.name}`?\s*\|", text), t
    for e in wire.ErrorCode:
        assert re.search(rf"\|\s*{int(e)}\s*\|\s*`?{e.name}`?\s*\|", text), e
    for name, (dt, off) in C.REQUEST_DTYPE.fields.items():
        if name != "_pad":
            assert re.search(rf"\|\s*{off}\s*\|\s*{dt.itemsize}\s*\|\s*`{name}`", text), name
    for name, (dt, off) in C.ANSWER_DTYPE.fields.items():
        if name != "_pad":
            assert re.search(rf"\|\s*{off}\s*\|\s*{dt.itemsize}\s*\|\s*`{name}`", text), name
    for s in C.Status:
        assert re.search(rf"\|\s*{int(s)}\s*\|\s*`{s.name}`\s*\|\s*{C.STATUS_CODE[s]}\s*\|", text), s
    for o in C.Op:
        assert re.search(rf"\|\s*{int(o)}\s*\|\s*`{o.name}`", text), o


def _valid_then_mutated(n: int, seed: int, pos: int, byte: int) -> bytes:
    rng = np.random.default_rng(seed)
    r = np.zeros(n, C.REQUEST_DTYPE)
    r["id"] = rng.integers(0, 2**63, n)
    r["op"] = rng.integers(1, 17, n)
    r["channel"] = rng.integers(0, 4, n)
    r["kind"] = rng.integers(0, 2, n)
    r["flags"] = rng.integers(0, 16, n)
    r["currency"] = rng.integers(0, 2**16, n)
    raw = bytearray(r.tobytes())
    raw[pos % len(raw)] = byte
    return bytes(raw)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(min_size=64, max_size=64 * 8).map(lambda b: b[: len(b) // 64 * 64])
    | st.builds(_valid_then_mutated, st.integers(1, 8), st.integers(0, 2**32), st.integers(0, 511), st.integers(0, 255))
)
def test_vectorised_record_check_matches_per_field_reading(raw):
    reqs = np.frombuffer(raw, C.REQUEST_DTYPE)
    want = None
    for i, r in enumerate(reqs):
        if (
            int(r["op"]) not in {int(o) for o in C.Op}
            or r["channel"] > max(C.Channel)
            or r["kind"] > max(C.Kind)
            or int(r["flags"]) & ~wire.client_flags & 0xFF
            or any(raw[i * 64 + 58 : i * 64 + 64])
        ):
            want = i
            break
    got = wire.check_records(reqs)
    assert (got[0] if got else None) == want
