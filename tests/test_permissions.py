"""Client identities, per-operation permissions, rate limits and the audit
log (issue 7).  API-key identities over plain TCP keep most tests fast; one
test uses certificate subjects over mutual TLS (with the ISO 8583 port)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from authcore.client import Client, ProtocolError
from authcore.config import Config, ConfigError
from authcore.constants import REQUEST_DTYPE, Op, Status
from authcore.security import ADMIN_OPS, GATEWAY_OPS
from authcore.server import ServerThread

PAN_KEY = b"authcore-tests-pan-key-32-bytes!"
GW_KEY = "gw-key-" + "x" * 24
ADMIN_KEY = "admin-key-" + "y" * 22
PAN = "4000001234567899"  # Luhn-valid


def keyed_config(tmp_path: Path, *, clients=None, limits=None) -> Config:
    keys = tmp_path / "api-keys"
    keys.write_text(f"# test keys\ngw {GW_KEY}\nadm {ADMIN_KEY}\n")
    clients = clients or [{"name": "gw", "role": "gateway"}, {"name": "adm", "role": "admin"}]
    d = {"auth": {"api_keys_file": str(keys), "audit_file": str(tmp_path / "audit.jsonl"), "clients": clients}}
    if limits:
        d["limits"] = limits
    return Config.from_dict(d)


@pytest.fixture
def keyed(tmp_path):
    from authcore.engine import Engine

    cfg = keyed_config(tmp_path)
    eng = Engine(cfg, pan_key=PAN_KEY)
    with ServerThread(engine=eng, config=cfg) as s:
        s.audit_path = tmp_path / "audit.jsonl"
        yield s


def audit(path: Path) -> list[dict]:
    time.sleep(0.05)
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def metric(s: ServerThread, prefix: str) -> float:
    text = s.call(lambda: s.server.metrics.render().decode())
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def one_of_each_op(id0: int) -> np.ndarray:
    """A record of every operation (fields valid enough for the wire check)."""
    recs = np.zeros(len(Op), REQUEST_DTYPE)
    for i, op in enumerate(Op):
        recs[i]["id"] = id0 + i
        recs[i]["op"] = int(op)
        recs[i]["account"] = 1
        recs[i]["amount"] = 100
        recs[i]["currency"] = 978
    return recs


# --- the default rules, from both sides -----------------------------------------------


@pytest.mark.parametrize("who,key,allowed", [("gw", GW_KEY, GATEWAY_OPS), ("adm", ADMIN_KEY, ADMIN_OPS)])
def test_default_rules_every_op_both_sides(keyed, who, key, allowed):
    eng = keyed.engine
    with Client("127.0.0.1", keyed.ports["binary"], "binary", api_key=key) as c:
        before = eng.last_stamp
        recs = one_of_each_op(1000 if who == "gw" else 2000)
        ans = c.submit(recs)
    assert list(ans["id"]) == list(recs["id"])  # one answer each, in order
    for r, a in zip(recs, ans):
        op = Op(int(r["op"])).name
        if op in allowed:
            assert not (a["status"] == Status.not_permitted and a["stamp"] == 0), op  # reached the engine
        else:
            assert a["status"] == Status.not_permitted and a["stamp"] == 0, op
    forbidden = sorted(set(o.name for o in Op) - allowed)
    assert forbidden == ([] if who == "adm" else sorted(["open", "deposit", "withdraw", "transfer", "set_limits", "freeze",
                                                         "unfreeze", "close", "issue_card"]))  # fmt: skip
    # the forbidden records never reached the kernel or the log: the stamps
    # consumed are exactly those of the permitted state-changing records
    stamped = int((ans["stamp"] != 0).sum())
    assert eng.last_stamp - before >= stamped
    assert metric(keyed, f'authcore_forbidden_total{{client="{who}"') == len(forbidden)


def test_forbidden_call_json_answer_audit_and_no_state_change(keyed):
    eng = keyed.engine
    with Client("127.0.0.1", keyed.ports["json"], "json", api_key=ADMIN_KEY) as admin:
        assert admin.client_name == "adm"
        assert admin.open_account(id=1, account=7, currency=978)["status"] == "approved"
        assert admin.deposit(id=2, account=7, amount=10_000)["status"] == "approved"
    digest = eng.digest()
    with Client("127.0.0.1", keyed.ports["json"], "json", api_key=GW_KEY) as gw:
        out = gw.batch([
            {"op": "authorize", "id": 10, "account": 7, "amount": 500, "currency": 978, "merchant": 5},
            {"op": "withdraw", "id": 11, "account": 7, "amount": 9_000},
            {"op": "issue_card", "id": 12, "account": 7, "pan": PAN},
            {"op": "query", "account": 7},
        ])  # fmt: skip
    assert [a["status"] for a in out] == ["approved", "not_permitted", "not_permitted", "approved"]
    w = out[1]
    assert w == {"id": 11, "op": "withdraw", "status": "not_permitted", "code": "57",
                 "error": "operation withdraw not permitted for client gw"}  # fmt: skip
    assert out[3]["available"] == 9_500  # the withdraw did not happen
    assert eng.digest() != digest  # (the authorize did)
    events = audit(keyed.audit_path)
    forb = [e for e in events if e["event"] == "forbidden"]
    assert {(e["client"], e["op"]) for e in forb} == {("gw", "withdraw"), ("gw", "issue_card")}
    raw = keyed.audit_path.read_text()
    assert PAN not in raw and PAN[-10:] not in raw and GW_KEY not in raw and ADMIN_KEY not in raw
    assert all(set(e) <= {"ts", "event", "protocol", "peer", "client", "op", "count", "first_id", "method", "reason",
                          "detail", "refused", "suppressed_before"} for e in events)  # fmt: skip


def test_api_key_refusals(keyed):
    port_j, port_b = keyed.ports["json"], keyed.ports["binary"]
    # wrong key (JSON): one not_permitted line, then the server closes
    with pytest.raises(ProtocolError, match="authentication required"):
        Client("127.0.0.1", port_j, "json", api_key="not-a-key", retries=0)
    # no auth line at all: the request is the first line -> refused and closed
    with socket.create_connection(("127.0.0.1", port_j), timeout=5) as s:
        s.sendall(b'{"op":"query","account":7}\n{"op":"query","account":7}\n')
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    lines = data.splitlines()
    assert len(lines) == 1 and orjson.loads(lines[0])["status"] == "not_permitted"
    # binary without a key after the hello: error frame, closed
    with pytest.raises(ProtocolError, match="API key"):
        Client("127.0.0.1", port_b, "binary", retries=0)
    with pytest.raises(ProtocolError, match="API key"):
        Client("127.0.0.1", port_b, "binary", api_key="nope", retries=0)
    # the ISO 8583 port needs certificates once identities exist
    if keyed.ports["iso8583"]:
        with socket.create_connection(("127.0.0.1", keyed.ports["iso8583"]), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(100) == b""
    events = [e for e in audit(keyed.audit_path) if e["event"] == "connection_refused"]
    reasons = [e["reason"] for e in events]
    assert reasons.count("bad_api_key") >= 4 and "no_certificate" in reasons
    assert "not-a-key" not in keyed.audit_path.read_text()
    assert metric(keyed, 'authcore_auth_refused_total{protocol="json",reason="bad_api_key"}') >= 2


def test_custom_ops_list_overrides_role(tmp_path):
    from authcore.engine import Engine

    cfg = keyed_config(tmp_path, clients=[{"name": "gw", "role": "gateway", "ops": ["query"]}, {"name": "adm", "role": "admin"}])
    with ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg) as s:
        with Client("127.0.0.1", s.ports["json"], "json", api_key=GW_KEY) as c:
            assert c.query(account=1)["status"] == "no_account"
            assert c.authorize(id=1, account=1, amount=1, currency=978)["status"] == "not_permitted"


def test_a_void_that_may_refund_a_purchase_needs_refund_permission_too(tmp_path):
    """An ISO reversal without field 90 is a void the kernel may turn into a
    refund of the purchase (FLAG_OR_PURCHASE): a client allowed void but not
    refund may not send it; plain voids stay allowed."""
    from types import SimpleNamespace

    from authcore.constants import FLAG_OR_PURCHASE
    from authcore.metrics import Metrics
    from authcore.security import Security

    cfg = keyed_config(tmp_path, clients=[{"name": "gw", "role": "gateway", "ops": ["purchase", "void", "query"]},
                                          {"name": "adm", "role": "admin"}])
    sec = Security(cfg, Metrics())
    try:
        reqs = np.zeros(3, REQUEST_DTYPE)
        reqs["op"] = [Op.void, Op.void, Op.purchase]
        reqs["flags"] = [0, FLAG_OR_PURCHASE, 0]
        for name, want in (("gw", [0, 1, 0]), ("adm", None)):
            session = SimpleNamespace(client=sec.by_name[name], bucket=None, client_name=name,
                                      protocol_name="iso8583", peer="test")
            refused = sec.check(session, reqs)
            assert (refused is None) if want is None else ((refused != 0).astype(int).tolist() == want)
    finally:
        sec.close()


# --- rate limits ------------------------------------------------------------------------


def test_rate_limit_answers_then_recovers(tmp_path):
    from authcore.engine import Engine

    cfg = keyed_config(tmp_path, clients=[{"name": "gw", "role": "gateway", "rate_per_second": 100.0, "burst": 50},
                                          {"name": "adm", "role": "admin"}])  # fmt: skip
    with ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg) as s:
        with Client("127.0.0.1", s.ports["json"], "json", api_key=GW_KEY) as c:
            out = c.batch([{"op": "query", "account": 1}] * 200)
            statuses = [a["status"] for a in out]
            served = statuses.count("no_account")
            assert 50 <= served <= 100  # the burst (plus a refill if the 200 lines took two reads)
            assert statuses[:50] == ["no_account"] * 50  # first come, first served, in order
            limited = [a for a in out if a["status"] == "bad_request"]
            assert len(limited) == 200 - served
            assert all(a["error"] == "rate limit exceeded" and a["code"] == "30" for a in limited)
            time.sleep(0.6)  # refill
            assert c.query(account=1)["status"] == "no_account"
        # an admin has no limit and is unaffected
        with Client("127.0.0.1", s.ports["binary"], "binary", api_key=ADMIN_KEY) as a:
            ans = a.submit(one_of_each_op(1)[[-1] * 300])
            assert (ans["status"] == Status.no_account).all()
        assert metric(s, 'authcore_rate_limited_total{client="gw"}') == 200 - served
        assert any(e["event"] == "rate_limited" and e["client"] == "gw" for e in audit(tmp_path / "audit.jsonl"))


def test_rate_limit_per_connection_in_open_identity_mode():
    from authcore.engine import Engine

    cfg = Config.from_dict({"limits": {"rate_per_second": 1000.0, "burst": 20}})
    with ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg) as s:
        with Client("127.0.0.1", s.ports["binary"], "binary") as c:  # no key needed: no identities
            ans = c.submit(one_of_each_op(1)[[-1] * 100])
            assert (ans["status"] == Status.no_account).sum() >= 20
            assert (ans["status"] == Status.bad_request).sum() >= 1


def test_rate_limited_retry_probes_are_answered_and_the_connection_lives():
    """Malformed lines with ids go to the engine as retry probes; once the
    rate limit refuses them they are answered like any refused request."""
    from authcore.engine import Engine

    cfg = Config.from_dict({"limits": {"rate_per_second": 1.0, "burst": 2}})
    with ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg) as s:
        sock = socket.create_connection(("127.0.0.1", s.ports["json"]))
        sock.settimeout(10)
        sock.sendall(b'{"id": 5}\n' * 6)
        buf = b""
        while buf.count(b"\n") < 6:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {buf!r}"
            buf += chunk
        answers = [orjson.loads(line) for line in buf.split(b"\n")[:6]]
        assert all(a["status"] == "bad_request" and a["code"] == "30" for a in answers), answers
        assert sum("rate limit" in a["error"] for a in answers) >= 3
        assert sum("missing field" in a["error"] for a in answers) >= 1
        sock.close()


# --- open local mode ------------------------------------------------------------------


def test_open_local_mode_is_logged_and_unrestricted(caplog):
    from authcore.engine import Engine

    caplog.set_level(logging.INFO, logger="authcore.server")
    with ServerThread(engine=Engine(pan_key=PAN_KEY)) as s:
        assert s.server.security is None
        with Client("127.0.0.1", s.ports["json"], "json") as c:
            assert c.open_account(id=1, account=1, currency=978)["status"] == "approved"
    assert sum("open local mode" in r.getMessage() for r in caplog.records) == 1


# --- config -------------------------------------------------------------------------------


def test_config_auth_sections(tmp_path):
    cfg = keyed_config(tmp_path)
    assert Config.from_dict(cfg.to_dict()) == cfg  # round trip with an array of tables
    base = keyed_config(tmp_path).to_dict()
    for bad, msg in [
        ({"name": "x", "color": "red"}, "unknown configuration key: auth.clients[0].color"),
        ({"name": "x", "ops": ["steal"]}, "not an operation"),
        ({"name": "x", "role": "root"}, "role"),
        ({"name": "", "role": "admin"}, "name"),
    ]:
        d = dict(base)
        d["auth"] = dict(base["auth"], clients=[bad])
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            Config.from_dict(d)
    with pytest.raises(ConfigError, match="unknown configuration key: limits.rate"):
        Config.from_dict({"limits": {"rate": 5}})


def test_unusable_security_files_refuse_to_start(tmp_path):
    from authcore.engine import Engine
    from authcore.security import SecurityError

    cfg = Config.from_dict({"auth": {"api_keys_file": str(tmp_path / "missing"), "clients": [{"name": "gw"}]}})
    with pytest.raises(SecurityError, match="missing"):
        ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg).start()
    cfg = Config.from_dict({"tls": {"cert_file": str(tmp_path / "no.crt"), "key_file": str(tmp_path / "no.key")}})
    with pytest.raises(OSError):
        ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg).start()


def test_api_key_file_naming_unknown_client_is_refused(tmp_path):
    from authcore.security import Security, SecurityError
    from authcore.metrics import Metrics

    keys = tmp_path / "k"
    keys.write_text("ghost abc\n")
    cfg = Config.from_dict({"auth": {"api_keys_file": str(keys), "clients": [{"name": "gw"}]}})
    with pytest.raises(SecurityError, match="ghost"):
        Security(cfg, Metrics())


# --- identities by certificate subject (mutual TLS) ----------------------------------------


def test_certificate_subjects_map_to_clients_iso_and_json(tmp_path_factory, tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI needed")
    from test_tls import ctx, make_pki

    from authcore.engine import Engine

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    cfg = Config.from_dict({
        "tls": {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key"),
                "client_ca_file": str(pki / "ca.crt"), "require_client_cert": True},
        "auth": {"audit_file": str(tmp_path / "audit.jsonl"),
                 "clients": [{"name": "gw1", "subject": "CN=gw1,O=Acme", "ops": ["purchase", "query"]},
                             {"name": "boss", "subject": "CN=admin1", "role": "admin"}]},
    })  # fmt: skip
    with ServerThread(engine=Engine(cfg, pan_key=PAN_KEY), config=cfg) as s:
        with Client("127.0.0.1", s.ports["json"], "json", tls=ctx(pki, "admin1")) as boss:
            assert boss.open_account(id=1, account=9, currency=978)["status"] == "approved"
            assert boss.deposit(id=2, account=9, amount=5_000)["status"] == "approved"
            assert boss.issue_card(id=3, account=9, pan=PAN)["status"] == "approved"
        with Client("127.0.0.1", s.ports["json"], "json", tls=ctx(pki, "gw1")) as gw:
            assert gw.deposit(id=4, account=9, amount=1)["status"] == "not_permitted"
        port = s.ports["iso8583"]
        if port is not None:
            import iso8583
            from iso8583.specs import default_ascii

            def msg(mti: str, stan: str, amount: str) -> bytes:
                raw, _ = iso8583.encode({"t": mti, "2": PAN, "3": "000000", "4": amount, "7": "1124120000", "11": stan,
                                         "18": "5411", "19": "978", "22": "051", "37": "000000" + stan,
                                         "41": "TERM0001", "42": "000000000000042", "49": "978"}, default_ascii)  # fmt: skip
                return len(raw).to_bytes(2, "big") + bytes(raw)

            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with ctx(pki, "gw1").wrap_socket(raw, server_hostname="127.0.0.1") as t:
                    t.settimeout(5)
                    # one read: an 0100 (authorize: not in gw1's ops) between two 0200s
                    t.sendall(msg("0200", "000001", "000000000100") + msg("0100", "000002", "000000000100")
                              + msg("0200", "000003", "000000000200"))  # fmt: skip
                    data = b""
                    answers = []
                    while len(answers) < 3:
                        data += t.recv(65536)
                        while len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
                            n = int.from_bytes(data[:2], "big")
                            answers.append(iso8583.decode(bytearray(data[2 : 2 + n]), default_ascii)[0])
                            data = data[2 + n :]
            assert [(a["t"], a["39"]) for a in answers] == [("0210", "00"), ("0110", "57"), ("0210", "00")]
            assert s.engine.accounts()[9]["balance"] == 5_000 - 300
    events = audit(tmp_path / "audit.jsonl")
    forb = [(e["client"], e["op"], e["protocol"]) for e in events if e["event"] == "forbidden"]
    assert ("gw1", "deposit", "json") in forb
    if port is not None:
        assert ("gw1", "authorize", "iso8583") in forb
        assert PAN not in (tmp_path / "audit.jsonl").read_text()


# --- units ------------------------------------------------------------------------------------


def test_token_bucket():
    from authcore.security import TokenBucket

    b = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert b.take(8, 0.0) == 5  # the burst
    assert b.take(1, 0.05) == 0  # half a token
    assert b.take(3, 0.25) == 2  # 2.5 tokens
    assert b.take(100, 100.0) == 5  # never more than the burst saved up
    assert abs(b.refill_seconds() - 0.5) < 1e-9


def test_audit_caps_bursts_and_reports_suppressed(tmp_path, monkeypatch):
    from authcore import security

    now = [1000.25]
    monkeypatch.setattr(security.time, "time", lambda: now[0])
    a = security.Audit(str(tmp_path / "a.jsonl"))
    for i in range(100):
        a.event("forbidden", client="gw", op="deposit", count=1, first_id=i)
    a.event("forbidden", client="other", op="deposit", count=1, first_id=0)  # its own budget
    now[0] = 1001.5
    a.event("forbidden", client="gw", op="deposit", count=1, first_id=7)
    a.close()
    lines = [orjson.loads(x) for x in (tmp_path / "a.jsonl").read_bytes().splitlines()]
    gw = [x for x in lines if x["client"] == "gw"]
    assert len(gw) == security.audit_events_per_second_max + 1
    assert gw[-1]["suppressed_before"] == 100 - security.audit_events_per_second_max
    assert any(x["client"] == "other" for x in lines)
    assert lines[0]["ts"] == "1970-01-01T00:16:40.250000Z"
