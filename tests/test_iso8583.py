"""ISO 8583 listener (SPEC §7, §10.13; docs/iso8583.md), with pyiso8583 as
the independent reference and client.

Two layers:
- The C codec against pyiso8583 on hypothesis-generated messages: encode is
  byte-for-byte pyiso8583's, decode gives pyiso8583's dict and never accepts
  what pyiso8583 refuses; every answer frame is canonical pyiso8583; the
  request mapping (ids, ops, amounts, channel) equals a Python re-statement
  of docs/iso8583.md computed with hashlib.
- The listener end to end: a real server (ServerThread, in-memory engine)
  on 127.0.0.1, a blocking socket client that frames pyiso8583 messages.
  Every MTI; approvals and declines (51, 14, 62, 61, 59); reversal releases
  the hold; completion captures; retransmission answers the same without a
  second hold; echo; malformed input answered 30 or the connection closed,
  and the server lives; no full PAN in logs or metrics.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
from pathlib import Path

import iso8583
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iso8583.specs import default_ascii as SPEC

from authcore import constants as C
from authcore.cards import luhn_valid
from authcore.config import Config

from conftest import PAN_KEY, FakeClock

if "_iso_codec" in (Path(__file__).resolve().parents[1] / "setup.py").read_text():
    from authcore.protocols import _iso_codec as codec  # built with the kernel: never skip
else:
    codec = pytest.importorskip("authcore.protocols._iso_codec")

USD = 840
ALICE = 1001  # wallet, 100,000 USD, card PAN_A
BOB = 1002  # wallet, single_limit 5,000, card PAN_B
CAROL = 1003  # wallet, frozen, card PAN_C
SHOP = 900_001  # merchant account (captures credit it)
MID = f"{SHOP:015d}"  # field 42
ALICE_FUNDS = 100_000


def with_check_digit(body: str) -> str:
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError(body)


PAN_A = with_check_digit("411111111111111")
PAN_B = with_check_digit("550000000000000")
PAN_C = with_check_digit("360000000000000")
PAN_UNKNOWN = with_check_digit("400000000000999")

CODE = {s.name: c for s, c in C.STATUS_CODE.items()}
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- reference helpers (plain Python, independent of the C codec) ------------


def ref_id(tag: str, rrn: str, mid: str, doc: dict | None = None) -> int:
    """docs/iso8583.md: BLAKE2b-64 of b"iso8583/<tag>/<37>/<42>", little-endian;
    with ``doc`` (a 0220/04x0) also b"/", a presence digit and fields 7, 11, 41."""
    data = b"iso8583/" + tag.encode() + b"/" + rrn.encode() + b"/" + mid.encode()
    if doc is not None:
        present = [f for f in ("7", "11", "41") if f in doc]
        mask = sum(1 << i for i, f in enumerate(("7", "11", "41")) if f in doc)
        data += b"/" + str(mask).encode() + b"".join(doc[f].encode() for f in present)
    v = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return v or 1


def ref_channel(f22: str | None) -> int:
    two = (f22 or "01")[:2]
    if two == "03":
        return C.Channel.qr
    if two in ("05", "07", "90", "91"):
        return C.Channel.card_present
    return C.Channel.online


def frame(payload: bytes) -> bytes:
    return struct.pack(">H", len(payload)) + payload


def enc(doc: dict) -> bytes:
    return bytes(iso8583.encode(dict(doc), SPEC)[0])


def split_frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">H", data, pos)
        out.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    assert pos == len(data)
    return out


def base(rrn: str = "000000000001", stan: str = "000001", amount: int = 1000, pan: str = PAN_A, **extra) -> dict:
    doc = {
        "2": pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1124120000",
        "11": stan,
        "18": "5411",
        "19": "840",
        "22": "051",
        "37": rrn,
        "41": "TERM0001",
        "42": MID,
        "49": "840",
    }
    doc.update(extra)
    return {k: v for k, v in doc.items() if v is not None}


# --- the codec against pyiso8583 ---------------------------------------------


def test_spec_table_is_default_ascii():
    for f in range(1, 129):
        s = SPEC[str(f)]
        assert (s["data_enc"], s["len_enc"]) == ("ascii", "ascii")
        assert codec.SPEC_LEN_TYPE.get(f, 0) == s["len_type"], f
        assert codec.SPEC_MAX_LEN[f] == s["max_len"], f
    assert SPEC["h"]["max_len"] == 0 and SPEC["p"]["max_len"] == 16


@HYP
@given(st.binary(max_size=128))
def test_blake2b_64_is_hashlib(data):
    assert codec.blake2b_64(data) == int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@HYP
@given(st.integers(0, 2**64 - 1))
def test_auth_code_is_records_auth_code(i):
    from authcore.records import auth_code

    assert codec.auth_code(i) == auth_code(i)


ascii_char = st.characters(max_codepoint=127)
FIELDS = [f for f in range(2, 129) if f != 65]


@st.composite
def iso_docs(draw, fields=st.sets(st.sampled_from(FIELDS), max_size=24)):
    doc = {"t": draw(st.text(ascii_char, min_size=4, max_size=4))}
    for f in sorted(draw(fields)):
        s = SPEC[str(f)]
        if s["len_type"]:
            doc[str(f)] = draw(st.text(ascii_char, max_size=min(s["max_len"], 40)))
        else:
            doc[str(f)] = draw(st.text(ascii_char, min_size=s["max_len"], max_size=s["max_len"]))
    return doc


@HYP
@given(iso_docs())
def test_encode_and_decode_are_pyiso8583(doc):
    ref = enc(doc)
    assert codec.encode(dict(doc)) == ref
    assert codec.decode(ref) == iso8583.decode(ref, SPEC)[0]


# What decode refuses although pyiso8583 takes it (module docstring).
STRICTER = {
    "bitmap is not 16 hex digits",  # pyiso8583's bytes.fromhex skips whitespace
    "length prefix is not digits",  # pyiso8583's int() takes " 5", "+5", "-0", "1_0"
    "tertiary bitmap (fields 129-192) not supported",  # default_ascii has no 129+
}


def both_decode(data: bytes):
    try:
        mine = codec.decode(data)
    except codec.IsoDecodeError as e:
        mine = e
    try:
        ref = iso8583.decode(data, SPEC)[0]
    except Exception as e:  # DecodeError, or KeyError for fields 129+
        ref = e
    return mine, ref


@HYP
@given(iso_docs(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 3))
def test_decode_accepts_no_more_than_pyiso8583(doc, edits, cut):
    data = bytearray(enc(doc))
    for pos, byte in edits:
        data[pos % len(data)] = byte
    data = bytes(data[: len(data) - cut])
    mine, ref = both_decode(data)
    if isinstance(mine, dict):
        assert mine == ref
    elif isinstance(ref, dict):
        assert mine.reason in STRICTER, mine


@HYP
@given(st.binary(max_size=80))
def test_decode_of_noise_agrees(data):
    mine, ref = both_decode(b"0200" + data)
    if isinstance(mine, dict):
        assert mine == ref
    elif isinstance(ref, dict):
        assert mine.reason in STRICTER, mine


def test_decode_refusals_name_a_reason_and_field_never_data():
    good = enc({"t": "0100", **base()})
    cases = {
        b"01": "t",
        good[:4] + b"Z" + good[5:]: "p",
        good[:-1]: "49",
        good + b"9": "49",
        good[:20] + b"1X" + good[22:]: "2",
        good[:20] + b"25" + good[22:]: "2",
        b"0100C000000000000000" + b"8" + b"0" * 15: "1",  # tertiary bitmap
    }
    for data, field in cases.items():
        with pytest.raises(codec.IsoDecodeError) as e:
            codec.decode(data)
        assert e.value.field == field, (data, e.value)
        assert PAN_A not in str(e.value)


# --- request mapping, against docs/iso8583.md restated in Python ---------------

digits = lambda n: st.text("0123456789", min_size=n, max_size=n)  # noqa: E731
rrn_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=12, max_size=12)


@st.composite
def requests(draw):
    # Repeats (4th digit 1) are their originals' class.
    mti = draw(st.sampled_from(["0100", "0200", "0220", "0400", "0420", "0101", "0201", "0221", "0401", "0421"]))
    doc = {"t": mti, "37": draw(rrn_text), "42": draw(digits(15))}
    mti = base_mti(mti)
    if mti in ("0100", "0200") or draw(st.booleans()):
        # Mostly digits; sometimes not (invalid_card, not a format error: SPEC §10.15).
        alphabet = st.sampled_from(["0123456789", "0123456789x -"])
        doc["2"] = draw(alphabet.flatmap(lambda a: st.text(a, min_size=1, max_size=19)))
    if mti in ("0100", "0200") or draw(st.booleans()):
        doc["4"] = draw(digits(12))
    if mti in ("0100", "0200") or draw(st.booleans()):
        doc["49"] = draw(digits(3))
    for f, n in (("3", 6), ("7", 10), ("11", 6), ("18", 4), ("19", 3), ("22", 3)):
        if draw(st.booleans()):
            doc[f] = draw(digits(n))
    if draw(st.booleans()):
        doc["22"] = draw(st.sampled_from(["010", "810", "031", "051", "071", "901", "912", "021"]))
    if draw(st.booleans()):
        doc["41"] = draw(rrn_text.map(lambda s: s[:8]))
    if mti in ("0400", "0420") and draw(st.booleans()):
        doc["90"] = draw(st.sampled_from(["0100", "0200", "0220", "0110"])) + draw(digits(38))
    if mti in ("0400", "0420") and draw(st.booleans()):
        doc["95"] = draw(digits(12)) + draw(st.text(ascii_char, min_size=30, max_size=30))
    return doc


def base_mti(mti: str) -> str:
    """A repeat (0101, 0421...) is decided as its original (0100, 0420)."""
    return mti[:3] + "0"


def ref_record(doc: dict):
    """(op, id, account, to, amount, currency, mcc, country, channel) or None (answered 30)."""
    mti, rrn, mid = base_mti(doc["t"]), doc["37"], doc["42"]
    if mti in ("0100", "0200"):
        op = C.Op.authorize if mti == "0100" else C.Op.purchase
        rid = ref_id("A" if mti == "0100" else "P", rrn, mid)
        return (op, rid, 0, int(mid), int(doc["4"]), int(doc["49"]), int(doc.get("18", 0)),
                int(doc.get("19", 0)), ref_channel(doc.get("22")))
    if mti == "0220":
        return (C.Op.capture, ref_id("C", rrn, mid, doc), ref_id("A", rrn, mid), 0, int(doc.get("4", 0)), 0, 0, 0, 0)
    op, hold = C.Op.void, ref_id("A", rrn, mid)
    orig = doc.get("90", "0100")[:4]
    if orig == "0200":
        op, hold = C.Op.refund, ref_id("P", rrn, mid)
    elif orig == "0220":
        op = C.Op.refund
    elif orig != "0100":
        return None
    original = int(doc["4"]) if "4" in doc else None
    if "95" in doc:
        actual = int(doc["95"][:12])
        if original is None or actual >= original:
            return None
        amount = original - actual if (actual > 0 or op == C.Op.refund) else 0
    elif op == C.Op.void:
        amount = 0
    elif original is None:
        return None
    else:
        amount = original
    # Without field 90 the kernel may refund the 0200 instead (FLAG_OR_PURCHASE).
    alt = ref_id("P", rrn, mid) if "90" not in doc else 0
    return (op, ref_id("R", rrn, mid, doc), hold, alt, amount, 0, 0, 0, 0)


@HYP
@given(st.lists(requests(), min_size=1, max_size=6))
def test_scan_maps_requests_as_documented(docs):
    chunk = b"".join(frame(enc(d)) for d in docs)
    b = codec.scan(chunk, 0, 100)
    assert not b.fatal and b.consumed == len(chunk) and b.n_msgs == len(docs)
    recs = iter(b.records)
    pans = iter(zip(b.pan_rows, b.pans))
    answered_here = 0
    for i, doc in enumerate(docs):
        want = ref_record(doc)
        if want is None:
            answered_here += 1
            continue
        r = next(recs)
        got = (r["op"], r["id"], r["account"], r["to"], r["amount"], r["currency"], r["mcc"], r["country"], r["channel"])
        assert tuple(int(x) for x in got) == tuple(int(x) for x in want), doc
        if base_mti(doc["t"]) in ("0100", "0200"):
            if 12 <= len(doc["2"]) <= 19 and doc["2"].isdigit():
                assert next(pans)[1] == doc["2"]
                assert r["flags"] == 0
            else:
                assert r["flags"] == C.FLAG_NO_CARD
        assert bytes(r["_pad"]) == bytes(6)
    assert b.n_records + answered_here == len(docs)


@HYP
@given(st.lists(requests(), min_size=1, max_size=6), st.data())
def test_answers_are_canonical_and_carry_the_outcome(docs, data):
    chunk = b"".join(frame(enc(d)) for d in docs)
    b = codec.scan(chunk, 0, 100)
    answers = np.zeros(b.n_records, C.ANSWER_DTYPE)
    for i in range(len(answers)):
        answers["status"][i] = data.draw(st.sampled_from(list(C.Status)))
        answers["has_available"][i] = data.draw(st.booleans())
        answers["available"][i] = data.draw(st.integers(-(10**13), 10**13))
        answers["approved_amount"][i] = data.draw(st.integers(0, 10**12 - 1))
    answers["id"] = b.records["id"]
    frames = split_frames(b.encode(answers))
    assert len(frames) == len(docs)
    k = 0
    for doc, raw in zip(docs, frames):
        got = iso8583.decode(raw, SPEC)[0]
        assert enc(got) == raw  # canonical: exactly what pyiso8583 would send
        assert got["t"] == doc["t"][:2] + str(int(doc["t"][2]) + 1) + "0"
        for f in ("2", "3", "7", "11", "37", "41", "42", "49"):
            assert got.get(f) == doc.get(f), f
        if ref_record(doc) is None:
            assert got["39"] == "30" and "38" not in got
            continue
        a, r = answers[k], b.records[k]
        k += 1
        status = C.Status(int(a["status"]))
        assert got["39"] == C.STATUS_CODE[status]
        approved = status in (C.Status.approved, C.Status.partial)
        spend = base_mti(doc["t"]) in ("0100", "0200")
        assert ("38" in got) == approved
        if approved:
            from authcore.records import auth_code

            assert got["38"] == auth_code(int(r["id"] if spend else r["account"]))
        if spend and approved and 0 < a["approved_amount"]:  # what was approved, e.g. by a first answer
            assert got["4"] == f"{int(a['approved_amount']):012d}"
        else:
            assert got.get("4") == doc.get("4")
        avail = int(a["available"])
        show = spend and a["has_available"] and status != C.Status.currency_mismatch and abs(avail) < 10**12
        assert ("54" in got) == bool(show)
        if show:
            assert got["54"] == "0002" + doc["49"] + ("C" if avail >= 0 else "D") + f"{abs(avail):012d}"
    assert k == b.n_records


def test_scan_stops_at_msgs_max_and_keeps_partial_frames():
    one = frame(enc({"t": "0800", "11": "000001", "70": "301"}))
    chunk = b"\x00\x00" + one * 5 + one[:7]
    b = codec.scan(chunk, 0, 3)
    assert (b.n_msgs, b.more, b.fatal) == (3, True, False)
    b2 = codec.scan(chunk, b.consumed, 3)
    assert (b2.n_msgs, b2.more) == (2, False)
    assert b2.consumed == len(chunk) - 7  # the partial frame is left
    only_keepalives = codec.scan(b"\x00\x00" * 3 + b"\x00", 0, 3)
    assert (only_keepalives.n_msgs, only_keepalives.consumed) == (0, 6)


# --- the listener over a real socket -------------------------------------------


def ok(ans: dict) -> dict:
    assert ans["status"] == "approved", ans
    return ans


def make_engine(clock=None, config=None):
    from authcore.engine import Engine

    eng = Engine(config or Config.default(), clock=clock or FakeClock(), pan_key=PAN_KEY)
    rid = iter(range(1, 1000))
    ex = lambda **kw: ok(eng.execute({"id": next(rid), **kw}))  # noqa: E731
    ex(op="open", account=ALICE, currency=USD, kind="wallet")
    ex(op="deposit", account=ALICE, amount=ALICE_FUNDS)
    ex(op="open", account=BOB, currency=USD, kind="wallet", single_limit=5000)
    ex(op="deposit", account=BOB, amount=50_000)
    ex(op="open", account=CAROL, currency=USD, kind="wallet")
    ex(op="deposit", account=CAROL, amount=50_000)
    ex(op="freeze", account=CAROL)
    ex(op="open", account=SHOP, currency=USD, kind="merchant")
    for acct, pan in ((ALICE, PAN_A), (BOB, PAN_B), (CAROL, PAN_C)):
        ex(op="issue_card", account=acct, pan=pan)
    return eng


class IsoClient:
    """A gateway: pyiso8583 messages over a NACChannel-framed socket."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def close(self) -> None:
        self.sock.close()

    def send(self, doc: dict) -> None:
        self.sock.sendall(frame(enc(doc)))

    def send_payload(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def recv_raw(self) -> bytes:
        (n,) = struct.unpack(">H", self._exactly(2))
        return self._exactly(n)

    def recv(self) -> dict:
        raw = self.recv_raw()
        doc = iso8583.decode(raw, SPEC)[0]
        assert enc(doc) == raw  # every answer is canonical pyiso8583
        return doc

    def call(self, doc: dict) -> dict:
        self.send(doc)
        return self.recv()

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def world():
    """(engine, port, clients): a ServerThread serving a fresh in-memory engine."""
    from authcore.server import ServerThread

    eng = make_engine()
    srv = ServerThread(engine=eng).start()
    clients: list[IsoClient] = []

    def connect() -> IsoClient:
        c = IsoClient(srv.ports["iso8583"])
        clients.append(c)
        return c

    try:
        yield eng, srv, connect
    finally:
        for c in clients:
            c.close()
        srv.stop()


def held(eng, account: int) -> int:
    return eng.accounts()[account]["held"]


def balance(eng, account: int) -> int:
    return eng.accounts()[account]["balance"]


ECHOED = ("2", "3", "4", "7", "11", "37", "41", "42", "49")


def test_0100_approved_echoes_fields_and_holds(world):
    eng, _srv, connect = world
    c = connect()
    req = {"t": "0100", **base(amount=2500)}
    ans = c.call(req)
    assert ans["t"] == "0110" and ans["39"] == "00"
    for f in ECHOED:
        assert ans[f] == req[f], f
    hold_id = ref_id("A", req["37"], MID)
    from authcore.records import auth_code

    assert ans["38"] == auth_code(hold_id)
    assert ans["54"] == f"0002840C{ALICE_FUNDS - 2500:012d}"
    assert eng.holds()[hold_id]["remaining"] == 2500
    assert held(eng, ALICE) == 2500


def test_0100_declines(world):
    eng, _srv, connect = world
    c = connect()
    # 51: more than available; 54 says what is available.
    a = c.call({"t": "0100", **base(rrn="000000000051", amount=ALICE_FUNDS + 1)})
    assert (a["39"], a["54"]) == ("51", f"0002840C{ALICE_FUNDS:012d}") and "38" not in a
    # 14: a valid card bound to nothing, and a card that fails Luhn.
    assert c.call({"t": "0100", **base(rrn="000000000014", pan=PAN_UNKNOWN)})["39"] == "14"
    assert c.call({"t": "0100", **base(rrn="000000000114", pan=PAN_A[:-1] + str((int(PAN_A[-1]) + 1) % 10))})["39"] == "14"
    assert c.call({"t": "0100", **base(rrn="000000000214", pan="4111")})["39"] == "14"
    # 62: the card's account is frozen.
    assert c.call({"t": "0100", **base(rrn="000000000062", pan=PAN_C)})["39"] == "62"
    # 61: over the account's single-transaction limit.
    assert c.call({"t": "0100", **base(rrn="000000000061", pan=PAN_B, amount=5001)})["39"] == "61"
    assert c.call({"t": "0100", **base(rrn="000000000161", pan=PAN_B, amount=5000)})["39"] == "00"
    # 12: currency mismatch, and no field 54 in a currency that is not the account's.
    a = c.call({"t": "0100", **base(rrn="000000000012", **{"49": "978"})})
    assert a["39"] == "12" and "54" not in a
    assert held(eng, ALICE) == 0 and held(eng, BOB) == 5000


def test_0100_suspected_fraud_59(world):
    eng, _srv, connect = world
    c = connect()
    # card_testing (5 earlier attempts <= 200 in 600 s: 60) + risky MCC 7995 (20) = 80.
    for i in range(5):
        assert c.call({"t": "0100", **base(rrn=f"00000000010{i}", amount=100)})["39"] == "00"
    a = c.call({"t": "0100", **base(rrn="000000000059", amount=1000, **{"18": "7995"})})
    assert a["39"] == "59" and "38" not in a
    assert held(eng, ALICE) == 500


def test_0200_purchase_moves_money_to_the_merchant(world):
    eng, _srv, connect = world
    c = connect()
    a = c.call({"t": "0200", **base(amount=3000, **{"22": "031"})})
    assert (a["t"], a["39"]) == ("0210", "00") and len(a["38"]) == 6
    assert a["54"] == f"0002840C{ALICE_FUNDS - 3000:012d}"
    assert balance(eng, ALICE) == ALICE_FUNDS - 3000 and held(eng, ALICE) == 0
    assert balance(eng, SHOP) == 3000


def test_0220_completion_captures_the_authorisation(world):
    eng, _srv, connect = world
    c = connect()
    auth = c.call({"t": "0100", **base(amount=5000)})
    assert auth["39"] == "00"
    done = c.call({"t": "0220", **base(amount=4000, stan="000002")})
    assert (done["t"], done["39"], done["38"]) == ("0230", "00", auth["38"])
    assert done["4"] == f"{4000:012d}"
    hold = eng.holds()[ref_id("A", "000000000001", MID)]
    assert (hold["state"], hold["captured"]) == ("captured", 4000)
    assert balance(eng, ALICE) == ALICE_FUNDS - 4000 and held(eng, ALICE) == 0
    assert balance(eng, SHOP) == 4000
    # A retransmission (same 7, 11, 37, 41, 42; a repeat MTI too): the first answer.
    assert c.call({"t": "0220", **base(amount=4000, stan="000002")}) == done
    assert c.call({"t": "0221", **base(amount=4000, stan="000002")}) == done
    # Completion of nothing: no_auth (25); a second completion (another STAN): auth_closed (12).
    assert c.call({"t": "0220", **base(rrn="000000000999")})["39"] == "25"
    assert c.call({"t": "0220", **base(rrn="000000000001", amount=1, stan="000003")})["39"] == "12"
    assert balance(eng, ALICE) == ALICE_FUNDS - 4000


def test_a_refused_completion_can_be_corrected_with_a_new_stan(world):
    """A completion is identified by 7, 11, 37, 41 and 42 (SPEC §7): one
    refused for its amount is not the answer to every later completion."""
    eng, _srv, connect = world
    c = connect()
    assert c.call({"t": "0100", **base(amount=1000)})["39"] == "00"
    assert c.call({"t": "0220", **base(amount=5000, stan="000002")})["39"] == "13"  # amount_exceeds_hold
    assert c.call({"t": "0220", **base(amount=5000, stan="000002")})["39"] == "13"  # its retransmission
    ok = c.call({"t": "0220", **{k: v for k, v in base(stan="000003").items() if k != "4"}})
    assert ok["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS - 1000 and balance(eng, SHOP) == 1000


def test_a_pan_with_non_digits_is_invalid_card(world):
    """SPEC §10.15: anything but 12-19 digits is invalid_card (14), not a format error."""
    _eng, _srv, connect = world
    c = connect()
    for i, pan in enumerate((PAN_A[:4] + "x" + PAN_A[5:], PAN_A[:4] + " " + PAN_A[5:], "4111-1111-1111")):
        ans = c.call({"t": "0100", **base(pan=pan, rrn=f"{900 + i:012d}")})  # each a new transaction
        assert (ans["t"], ans["39"]) == ("0110", "14") and "38" not in ans


def test_0400_reversal_releases_the_hold_and_0420_repeats_it(world):
    eng, _srv, connect = world
    c = connect()
    assert c.call({"t": "0100", **base(amount=7000)})["39"] == "00"
    assert held(eng, ALICE) == 7000
    rev = c.call({"t": "0400", **base(amount=7000, stan="000002")})
    assert (rev["t"], rev["39"]) == ("0410", "00") and len(rev["38"]) == 6
    assert held(eng, ALICE) == 0
    assert eng.holds()[ref_id("A", "000000000001", MID)]["state"] == "voided"
    # The advice of the same reversal (same class, 7, 11, 37, 41, 42), and its
    # repeat: the first answer, no new effect.
    adv = c.call({"t": "0420", **base(amount=7000, stan="000002")})
    assert (adv["t"], adv["39"], adv["38"]) == ("0430", "00", rev["38"])
    assert c.call({"t": "0421", **base(amount=7000, stan="000002")})["t"] == "0430"
    # A new reversal (another STAN) of the reversed authorisation: auth_closed.
    assert c.call({"t": "0400", **base(amount=7000, stan="000004")})["39"] == "12"
    assert held(eng, ALICE) == 0 and balance(eng, ALICE) == ALICE_FUNDS
    # A reversal with no authorisation: no_auth.
    assert c.call({"t": "0400", **base(rrn="000000000777")})["39"] == "25"


def test_a_reversal_without_field_90_reverses_a_purchase_in_order(world):
    """SPEC §7: a reversal finds its transaction by 37 + 42.  Without field
    90 and with no 0100 under them, the 0200's is refunded: decided by the
    kernel in order, so a 0200 in the same write (one batch) counts."""
    eng, _srv, connect = world
    c = connect()
    buy = {"t": "0200", **base(amount=3000, rrn="PURCH0000001")}
    rev = {"t": "0420", **base(amount=3000, rrn="PURCH0000001", stan="000002")}
    c.sock.sendall(frame(enc(buy)) + frame(enc(rev)))  # back to back: one batch
    got_buy, got_rev = c.recv(), c.recv()
    assert got_buy["39"] == "00" and (got_rev["t"], got_rev["39"], got_rev["38"]) == ("0430", "00", got_buy["38"])
    assert balance(eng, ALICE) == ALICE_FUNDS and balance(eng, SHOP) == 0
    assert c.call({**rev, "t": "0421"}) == got_rev  # its repeat: the first answer, 38 included
    assert c.call({**rev, "11": "000003"})["39"] == "13"  # a new reversal: nothing left to refund
    # Field 95 (1,000 stands) refunds 1,500 of 2,500; no field 4: all that is left.
    assert c.call({"t": "0200", **base(amount=2500, rrn="PURCH0000002")})["39"] == "00"
    stands = f"{1000:012d}" + "0" * 30
    assert c.call({"t": "0400", **base(amount=2500, rrn="PURCH0000002", stan="000005", **{"95": stands})})["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS - 1000
    no4 = {k: v for k, v in base(rrn="PURCH0000002", stan="000006").items() if k != "4"}
    assert c.call({"t": "0400", **no4})["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS
    # Where a 0100 has the 37 + 42, it is the one reversed.
    assert c.call({"t": "0200", **base(amount=700, rrn="PURCH0000003")})["39"] == "00"
    assert c.call({"t": "0100", **base(amount=400, rrn="PURCH0000003")})["39"] == "00"
    assert c.call({"t": "0400", **base(amount=400, rrn="PURCH0000003", stan="000007")})["39"] == "00"
    assert held(eng, ALICE) == 0 and balance(eng, ALICE) == ALICE_FUNDS - 700


def test_partial_reversal_by_field_95(world):
    eng, _srv, connect = world
    c = connect()
    assert c.call({"t": "0100", **base(amount=5000)})["39"] == "00"
    replacement = f"{3000:012d}" + "0" * 30  # the amount that stands: 3,000
    rev = c.call({"t": "0400", **base(amount=5000, **{"95": replacement})})
    assert rev["39"] == "00"
    assert held(eng, ALICE) == 3000
    # 95 not below 4: nothing to reverse, a format error.
    bad = c.call({"t": "0400", **base(rrn="000000000002", amount=5000, **{"95": f"{5000:012d}" + "0" * 30})})
    assert bad["39"] == "30"


def test_reversal_of_a_purchase_refunds_it(world):
    eng, _srv, connect = world
    c = connect()
    assert c.call({"t": "0200", **base(amount=3000)})["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS - 3000
    orig = "0200" + "000001" + "1124120000" + "0" * 22  # field 90: original MTI, STAN, time, ids
    rev = c.call({"t": "0400", **base(amount=3000, stan="000002", **{"90": orig})})
    assert rev["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS and balance(eng, SHOP) == 0
    # Without field 90 the reversal looks for a 0100: there is none.
    assert c.call({"t": "0400", **base(rrn="000000000002", **{"90": None})})["39"] == "25"


def test_reversal_of_a_completion_refunds_the_capture(world):
    eng, _srv, connect = world
    c = connect()
    assert c.call({"t": "0100", **base(amount=5000)})["39"] == "00"
    assert c.call({"t": "0220", **base(amount=5000)})["39"] == "00"
    orig = "0220" + "000001" + "1124120000" + "0" * 22
    assert c.call({"t": "0420", **base(amount=5000, **{"90": orig})})["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS and balance(eng, SHOP) == 0


def test_retransmission_gets_the_first_answer_without_a_second_hold(world):
    eng, _srv, connect = world
    c = connect()
    req = {"t": "0100", **base(amount=4000)}
    first = c.call(req)
    assert first["39"] == "00"
    again = c.call(req)
    assert again == first
    # Over a new connection too (the gateway reconnected), and pipelined twice.
    c2 = connect()
    c2.sock.sendall(frame(enc(req)) * 2)
    assert c2.recv() == first and c2.recv() == first
    assert held(eng, ALICE) == 4000
    assert len([h for h in eng.holds().values() if h["account"] == ALICE]) == 1
    # The same 37 + 42 with another amount and STAN is answered as the first
    # was, and says so: field 4 is the amount approved then (docs/iso8583.md).
    other = c.call({**req, "4": f"{7000:012d}", "11": "000099"})
    assert (other["39"], other["38"], other["4"]) == ("00", first["38"], f"{4000:012d}")
    assert held(eng, ALICE) == 4000
    # 0200 with the same 37 + 42 is another class: a new purchase.
    assert c.call({"t": "0200", **base(amount=1000)})["39"] == "00"
    assert balance(eng, ALICE) == ALICE_FUNDS - 1000


def test_0800_echo(world):
    _eng, _srv, connect = world
    c = connect()
    ans = c.call({"t": "0800", "7": "1124120000", "11": "000042", "70": "301"})
    assert ans == {"t": "0810", "p": ans["p"], "1": ans["1"], "7": "1124120000", "11": "000042", "39": "00", "70": "301"}
    # Sign-on and an echo without field 70 are answered too.
    assert c.call({"t": "0800", "11": "000043", "70": "001"})["39"] == "00"
    assert c.call({"t": "0800", "11": "000044"})["39"] == "00"


MALFORMED = [
    # (payload, response MTI) — each answered 39 = 30.
    (b"0100" + b"Z" * 16, "0110"),  # bitmap not hex
    (enc({"t": "0100", **base()})[:20] + b"1X" + enc({"t": "0100", **base()})[22:], "0110"),  # LL not digits
    (enc({"t": "0100", **base()})[:20] + b"25" + enc({"t": "0100", **base()})[22:], "0110"),  # LL over max
    (enc({"t": "0100", **base()})[:-2], "0110"),  # truncated
    (enc({"t": "0100", **base()}) + b"00", "0110"),  # extra data
    (enc({"t": "0100", **base(**{"4": "00000000100A"})}), "0110"),  # non-digit amount
    (enc({"t": "0100", **base(**{"42": "MERCHANT000001X"})}), "0110"),  # non-digit merchant
    (enc({"t": "0200", **base(**{"42": None})}), "0210"),  # no merchant
    (enc({"t": "0200", **base(**{"4": None})}), "0210"),  # no amount
    (enc({"t": "0220", **base(**{"37": None})}), "0230"),  # no RRN
    (enc({"t": "0400", **base(**{"90": "0110" + "0" * 38})}), "0410"),  # reversal of a response?
    (enc({"t": "0300", **base()}), "0310"),  # unsupported MTI
    (enc({"t": "1100", **base()}), "1110"),  # 1993 version
    (enc({"t": "0800", "11": "000001", "70": "30X"}), "0810"),
    (enc({"t": "0100", **base(), "1": "0", "127": "x"})[:20] + b"8" + b"0" * 15 + b"abc", "0110"),  # tertiary
]


def test_malformed_messages_are_answered_30_and_the_connection_lives(world, caplog):
    eng, srv, connect = world
    c = connect()
    caplog.set_level(logging.DEBUG)
    for payload, mti in MALFORMED:
        c.send_payload(payload)
        ans = c.recv()
        assert (ans["t"], ans["39"]) == (mti, "30"), (payload, ans)
        assert "38" not in ans
    # The same connection still works.
    assert c.call({"t": "0100", **base(amount=10)})["39"] == "00"
    assert held(eng, ALICE) == 10
    # Echo fields survive in a format-error answer when they could be read.
    ans = c.call({"t": "0100", **base(stan="000777", **{"4": "00000000100A"})})
    assert (ans["11"], ans["37"], ans["2"]) == ("000777", "000000000001", PAN_A)
    # No full PAN in any log line or metric.
    assert PAN_A not in caplog.text
    assert srv.call(lambda: PAN_A.encode() not in srv.server.metrics.render())


@pytest.mark.parametrize("payload", [b"01", b"ABCD" + b"0" * 16, b"0110" + b"0" * 16, b"01\xff0" + b"0" * 16])
def test_unidentifiable_message_closes_only_that_connection(world, payload, caplog):
    eng, _srv, connect = world
    caplog.set_level(logging.DEBUG)
    c = connect()
    other = connect()
    # An answer queued before the bad message is still delivered, then EOF.
    c.sock.sendall(frame(enc({"t": "0100", **base(amount=10, pan=PAN_A)})) + frame(payload)
                   + frame(enc({"t": "0800", "11": "000001"})))
    assert c.recv()["39"] == "00"
    assert c.at_eof()
    # The server lives: other and new connections are served.
    assert other.call({"t": "0800", "11": "000002"})["39"] == "00"
    assert connect().call({"t": "0800", "11": "000003"})["39"] == "00"
    assert PAN_A not in caplog.text


def test_pipelined_and_split_frames_answer_in_order(world):
    eng, _srv, connect = world
    c = connect()
    n = 300
    stream = b"".join(
        frame(enc({"t": "0100", **base(rrn=f"{i:012d}", stan=f"{i:06d}", amount=10)}))
        + (frame(enc({"t": "0800", "11": f"{i:06d}"})) if i % 7 == 0 else b"")
        + (b"\x00\x00" if i % 11 == 0 else b"")  # keep-alives: no answer
        for i in range(n)
    )
    for k in range(0, len(stream), 997):  # cut mid-frame
        c.sock.sendall(stream[k : k + 997])
    approved = 0
    for i in range(n):
        a = c.recv()
        assert (a["t"], a["11"]) == ("0110", f"{i:06d}")
        approved += a["39"] == "00"  # the rest: 59, velocity and card testing
        if i % 7 == 0:
            assert (c.recv()["t"]) == "0810"
    assert approved >= 5
    assert held(eng, ALICE) == 10 * approved


def test_unavailable_is_96():
    from authcore.engine import Unavailable
    from authcore.server import ServerThread

    eng = make_engine()

    class Broken:
        """The engine with a log that cannot sync."""

        hasher = eng.hasher
        config = eng.config

        def card_account(self, pan):
            return eng.card_account(pan)

        def submit(self, requests):
            raise Unavailable("disk full")

    srv = ServerThread(engine=Broken(), config=eng.config).start()
    try:
        c = IsoClient(srv.ports["iso8583"])
        ans = c.call({"t": "0100", **base()})
        assert (ans["t"], ans["39"]) == ("0110", "96") and "38" not in ans
        assert c.call({"t": "0800", "11": "000002"})["39"] == "00"
        c.close()
    finally:
        srv.stop()
    assert held(eng, ALICE) == 0


def test_served_by_authcore_start_with_a_log(tmp_path):
    """The ISO port of a real ``start`` (storage, sync always) answers."""
    from authcore.server import ServerThread

    srv = ServerThread(data_dir=tmp_path).start()
    try:
        eng = srv.server.engine
        c = IsoClient(srv.ports["iso8583"])
        assert c.call({"t": "0800", "11": "000001", "70": "301"})["39"] == "00"
        # A card nobody issued: no_account, decided and logged by the engine.
        ans = c.call({"t": "0100", **base()})
        assert ans["39"] == "14"
        assert eng.last_stamp > 0
        c.close()
    finally:
        srv.stop()


def test_reads_split_across_engine_batches_keep_their_cards():
    """batch_max 7: one read's records reach the engine in several batches;
    each part's PAN lookup (the prepare hook) must find its own cards."""
    from authcore.server import ServerThread

    config = Config.from_dict({"server": {"batch_max": 7}, "fraud": {"enabled": False}})
    eng = make_engine(config=config)
    srv = ServerThread(engine=eng, config=config).start()
    try:
        c = IsoClient(srv.ports["iso8583"])
        cards = [PAN_A, PAN_B, PAN_UNKNOWN, PAN_C, "4111"]
        want = {PAN_A: "00", PAN_B: "00", PAN_UNKNOWN: "14", PAN_C: "62", "4111": "14"}
        n = 60
        c.sock.sendall(b"".join(
            frame(enc({"t": "0100", **base(rrn=f"{i:012d}", stan=f"{i:06d}", amount=10, pan=cards[i % len(cards)])}))
            + (frame(enc({"t": "0800", "11": f"{i:06d}"})) if i % 9 == 0 else b"")
            for i in range(n)
        ))
        for i in range(n):
            a = c.recv()
            assert (a["11"], a["39"]) == (f"{i:06d}", want[cards[i % len(cards)]])
            if i % 9 == 0:
                assert c.recv()["t"] == "0810"
        c.close()
    finally:
        srv.stop()
    assert held(eng, ALICE) == 10 * 12 and held(eng, BOB) == 10 * 12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=60), requests().map(enc), iso_docs().map(enc)), min_size=1, max_size=8))
def test_garbage_never_hurts_the_server(world, caplog, payloads):
    eng, srv, connect = world
    caplog.set_level(logging.WARNING)
    c = connect()
    c.sock.sendall(b"".join(frame(p) for p in payloads))
    c.sock.shutdown(socket.SHUT_WR)
    while True:  # every answer is canonical pyiso8583, until the server closes
        try:
            c.recv()
        except EOFError:
            break
    assert connect().call({"t": "0800", "11": "000001"})["39"] == "00"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
