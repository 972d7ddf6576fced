"""TLS and mutual TLS on the listeners (issue 7).

A throwaway PKI is generated per module with the openssl CLI into a tmp
dir (never committed): a CA, a server certificate for 127.0.0.1, client
certificates signed by that CA, and one signed by a stranger CA.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from authcore.client import Client
from authcore.config import Config
from authcore.security import client_tls_context
from authcore.server import ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make test certificates")

PAN_KEY = b"authcore-tests-pan-key-32-bytes!"
cert_days = "2"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", "-days", cert_days, cwd=d)  # fmt: skip


def _leaf(d: Path, name: str, subject: str, ca: str, ext: str = "") -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)  # fmt: skip
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", cert_days]  # fmt: skip
    if ext:
        (d / f"{name}.ext").write_text(ext)
        args += ["-extfile", f"{name}.ext"]
    _openssl(*args, cwd=d)


def make_pki(d: Path) -> Path:
    """ca, server (127.0.0.1), gw1 + admin1 (trusted), stranger (other CA)."""
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "/CN=authcore-test-server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _leaf(d, "gw1", "/CN=gw1/O=Acme", "ca")
    _leaf(d, "admin1", "/CN=admin1/O=Acme", "ca")
    _leaf(d, "stranger", "/CN=gw1/O=Acme", "other-ca")  # same subject, wrong issuer
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(pki: Path, *, mutual: bool, clients: list | None = None, audit: Path | None = None, **auth) -> Config:
    tls = {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")}
    if mutual:
        tls |= {"client_ca_file": str(pki / "ca.crt"), "require_client_cert": True}
    a = {"clients": clients or []} | auth
    if audit is not None:
        a["audit_file"] = str(audit)
    return Config.from_dict({"tls": tls, "auth": a})


def serve(config: Config) -> ServerThread:
    from authcore.engine import Engine

    return ServerThread(engine=Engine(config, pan_key=PAN_KEY), config=config).start()


def ctx(pki: Path, who: str | None) -> ssl.SSLContext:
    if who is None:
        return client_tls_context(str(pki / "ca.crt"))
    return client_tls_context(str(pki / "ca.crt"), str(pki / f"{who}.crt"), str(pki / f"{who}.key"))


def audit_events(path: Path, deadline_s: float = 3.0) -> list[dict]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size:
            break
        time.sleep(0.02)
    time.sleep(0.05)
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def refused_by_server(context: ssl.SSLContext, port: int) -> bool:
    """True if the server refuses this client: at the handshake, or (TLS 1.3,
    where the client finishes first) by an alert/close before any answer."""
    try:
        with Client("127.0.0.1", port, "json", tls=context, retries=0, timeout=5) as c:
            c.request({"op": "query", "account": 1})
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


# --- server-authenticated TLS ------------------------------------------------


def test_tls_json_and_binary_roundtrip_and_plain_tcp_gets_nothing(pki):
    with serve(tls_config(pki, mutual=False)) as s:
        for proto in ("json", "binary"):
            with Client("127.0.0.1", s.ports[proto], proto, tls=ctx(pki, None)) as c:
                assert c.open_account(id=1 if proto == "json" else 2, account=10 if proto == "json" else 11,
                                      currency=978)["status"] == "approved"  # fmt: skip
        # A large pipelined batch over TLS (many TLS records per read, both ways).
        for proto in ("json", "binary"):
            with Client("127.0.0.1", s.ports[proto], proto, tls=ctx(pki, None)) as c:
                answers = c.batch([{"op": "query", "account": 10}] * 20_000)
                assert len(answers) == 20_000 and all(a["status"] == "approved" for a in answers)
        # A client speaking plain JSON to a TLS port never gets an answer.
        with socket.create_connection(("127.0.0.1", s.ports["json"]), timeout=5) as raw:
            raw.sendall(b'{"op":"query","account":10}\n')
            raw.settimeout(3)
            try:
                data = raw.recv(4096)
            except (TimeoutError, ConnectionError):
                data = b""
            assert b"approved" not in data
        # The client refuses a server it cannot verify (no CA given).
        with pytest.raises(ssl.SSLError):
            Client("127.0.0.1", s.ports["json"], "json", tls=ssl.create_default_context(), retries=0)


def test_tls_async_client(pki):
    from authcore.client import AsyncClient

    with serve(tls_config(pki, mutual=False)) as s:

        async def main():
            async with AsyncClient("127.0.0.1", s.ports["binary"], "binary", tls=ctx(pki, None)) as c:
                a = await c.open_account(id=5, account=50, currency=978)
                q = await c.query(account=50)
            return a, q

        a, q = asyncio.run(main())
        assert a["status"] == "approved" and q["status"] == "approved"


def test_metrics_port_is_tls_too(pki):
    with serve(tls_config(pki, mutual=True)) as s:
        with socket.create_connection(("127.0.0.1", s.ports["metrics"]), timeout=5) as raw:
            with ctx(pki, None).wrap_socket(raw, server_hostname="127.0.0.1") as t:
                t.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert t.recv(4096).startswith(b"HTTP/1.1 200")


# --- mutual TLS ------------------------------------------------------------------


def test_mtls_trusted_served_untrusted_and_no_cert_refused(pki, tmp_path):
    audit = tmp_path / "audit.jsonl"
    with serve(tls_config(pki, mutual=True, audit=audit)) as s:
        port = s.ports["json"]
        with Client("127.0.0.1", port, "json", tls=ctx(pki, "gw1")) as c:
            assert c.open_account(id=1, account=1, currency=978)["status"] == "approved"
        assert refused_by_server(ctx(pki, "stranger"), port)
        assert refused_by_server(ctx(pki, None), port)
        # still serving the trusted one afterwards
        with Client("127.0.0.1", s.ports["binary"], "binary", tls=ctx(pki, "gw1")) as c:
            assert c.query(account=1)["status"] == "approved"
        events = audit_events(audit)
        refused = [e for e in events if e["event"] == "connection_refused"]
        assert len(refused) >= 2 and all(e["reason"] == "tls_handshake" and e["protocol"] == "json" for e in refused)
        assert all(e["peer"].startswith("127.0.0.1:") for e in refused)
        text = s.call(lambda: s.server.metrics.render().decode())
        assert 'authcore_auth_refused_total{protocol="json",reason="tls_handshake"}' in text


def _echo_frame() -> bytes:
    import iso8583
    from iso8583.specs import default_ascii

    raw, _ = iso8583.encode({"t": "0800", "11": "000001", "70": "301"}, default_ascii)
    return len(raw).to_bytes(2, "big") + bytes(raw)


def _iso_exchange(context: ssl.SSLContext, port: int) -> bytes:
    """Send one 0800 echo over TLS; the bytes answered (b"" if refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as t:
                t.settimeout(5)
                t.sendall(_echo_frame())
                return t.recv(4096)
    except (ssl.SSLError, ConnectionError, OSError):
        return b""


def test_mtls_iso8583_listener(pki):
    with serve(tls_config(pki, mutual=True)) as s:
        port = s.ports["iso8583"]
        if port is None:
            pytest.skip("ISO 8583 codec not built")
        assert b"0810" in _iso_exchange(ctx(pki, "gw1"), port)
        assert _iso_exchange(ctx(pki, "stranger"), port) == b""
        assert _iso_exchange(ctx(pki, None), port) == b""


def test_handshake_timeout_cuts_silent_tls_peer(pki, tmp_path):
    audit = tmp_path / "audit.jsonl"
    cfg = tls_config(pki, mutual=True, audit=audit)
    cfg = cfg.replace(tls=cfg.tls.__class__(**{**cfg.to_dict()["tls"], "handshake_timeout_seconds": 0.5}))
    with serve(cfg) as s:
        with socket.create_connection(("127.0.0.1", s.ports["binary"]), timeout=5) as raw:
            raw.settimeout(5)
            t0 = time.monotonic()
            assert raw.recv(100) == b""  # the server gives up on a client that never says hello
            assert time.monotonic() - t0 < 4
        assert any(e["reason"] == "tls_handshake" for e in audit_events(audit))


def test_config_checks_tls_pairs():
    from authcore.config import ConfigError

    with pytest.raises(ConfigError, match="tls.cert_file"):
        Config.from_dict({"tls": {"cert_file": "x.crt"}})
    with pytest.raises(ConfigError, match="require_client_cert"):
        Config.from_dict({"tls": {"cert_file": "a", "key_file": "b", "require_client_cert": True}})
    with pytest.raises(ConfigError, match="unknown configuration key: tls.certfile"):
        Config.from_dict({"tls": {"certfile": "a"}})
