"""The ``authcore`` command as a subprocess (SPEC §9, §10.14).

``serve`` on free ports prints one JSON line with the bound ports; SIGTERM
(and SIGINT) drain with exit 0 and nothing acknowledged is lost: after a
restart on the same data directory every acknowledged deposit is there,
and re-sending everything with the same ids returns the first answers.
``verify`` and ``replay`` print the same digest; corruption before the tail
exits non-zero naming the file; ``backtest`` and ``bench`` print JSON.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from authcore import cli
from authcore.client import Client

from conftest import kernel_built

pytestmark = pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")

ROOT = Path(__file__).resolve().parent.parent
USD = 840


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "authcore", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_parser_defaults_match_spec():
    a = cli.build_parser().parse_args(["serve"])
    assert (a.data, a.host) == ("./authcore-data", "127.0.0.1")
    assert (a.port, a.json_port, a.iso_port, a.metrics_port) == (7400, 7401, 7402, 7403)
    assert a.config is None


def test_serve_line_health_and_sigint(tmp_path):
    proc, ports = cli.spawn_server(tmp_path / "data", stderr=subprocess.DEVNULL)
    try:
        assert list(ports) == ["binary", "json", "iso8583", "metrics"]
        assert all(isinstance(p, int) and p > 0 for p in ports.values())
        assert len(set(ports.values())) == 4
        for path in ("/health", "/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}{path}", timeout=10) as r:
                assert r.status == 200
        with Client("127.0.0.1", ports["json"]) as c:
            assert c.open_account(id=1, account=1, currency=USD)["status"] == "approved"
        with Client("127.0.0.1", ports["binary"], "binary") as c:
            assert c.query(account=1)["status"] == "approved"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        cli.stop_server(proc)


def test_sigterm_drain_loses_nothing_acknowledged(tmp_path):
    data = tmp_path / "data"
    proc, ports = cli.spawn_server(data, stderr=subprocess.DEVNULL)
    n = 150_000  # ~8 MB: more than the drain lets in after the signal
    try:
        with Client("127.0.0.1", ports["json"]) as c:
            c.open_account(id=1, account=1, currency=USD)
        lines = [orjson.dumps({"op": "deposit", "id": 100 + i, "account": 1, "amount": 1}) + b"\n" for i in range(n)]
        sock = socket.create_connection(("127.0.0.1", ports["json"]), timeout=30)

        def send() -> None:
            try:
                for k in range(0, n, 500):
                    sock.sendall(b"".join(lines[k : k + 500]))
                    time.sleep(0.002)  # ~0.6 s of sending: the signal lands mid-stream
            except OSError:
                pass  # the server closed while we were still sending: expected

        sender = threading.Thread(target=send)
        sender.start()
        acknowledged: list[dict] = []
        buf = b""
        signalled = False
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
            parts = buf.split(b"\n")
            buf = parts.pop()
            acknowledged += [orjson.loads(p) for p in parts]
            if not signalled and len(acknowledged) >= 2000:
                proc.send_signal(signal.SIGTERM)
                signalled = True
        sender.join()
        sock.close()
        assert proc.wait(30) == 0
        assert signalled and 2000 <= len(acknowledged) < n, len(acknowledged)
        assert buf == b""  # no torn answer line: the drain finished what it started
        assert [a["id"] for a in acknowledged] == [100 + i for i in range(len(acknowledged))]
        assert all(a["status"] == "approved" for a in acknowledged)
    finally:
        cli.stop_server(proc)

    proc, ports = cli.spawn_server(data, stderr=subprocess.DEVNULL)
    try:
        with Client("127.0.0.1", ports["json"]) as c:
            # every acknowledged deposit survived; every request the server read was answered
            assert c.query(account=1)["balance"] == len(acknowledged)
            again = c.batch([orjson.loads(x) for x in lines])
            assert again[: len(acknowledged)] == acknowledged  # first answers, whole
            assert c.query(account=1)["balance"] == n
    finally:
        assert cli.stop_server(proc) == 0

    v = run_cli("verify", "--data", str(data))
    r = run_cli("replay", "--data", str(data))
    assert v.returncode == 0, v.stderr
    assert r.returncode == 0, r.stderr
    digest = v.stdout.strip()
    assert len(digest) == 64 and digest == r.stdout.strip()
    vj = run_cli("verify", "--data", str(data), "--json")
    assert orjson.loads(vj.stdout)["digest"] == digest


def test_verify_refuses_corruption_before_the_tail(tmp_path):
    data = tmp_path / "data"
    proc, ports = cli.spawn_server(data, stderr=subprocess.DEVNULL)
    try:
        with Client("127.0.0.1", ports["json"]) as c:
            c.open_account(id=1, account=1, currency=USD)
            for i in range(5):
                c.deposit(id=10 + i, account=1, amount=5)
    finally:
        assert cli.stop_server(proc) == 0
    assert run_cli("verify", "--data", str(data)).returncode == 0
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (seg,) = sorted((bad / "wal").glob("*.log"))[:1]
    raw = bytearray(seg.read_bytes())
    raw[70] ^= 0xFF  # inside the first record's body; valid records follow
    seg.write_bytes(bytes(raw))
    v = run_cli("verify", "--data", str(bad))
    assert v.returncode != 0
    assert seg.name in v.stderr and "offset" in v.stderr.lower(), v.stderr
    missing = run_cli("verify", "--data", str(tmp_path / "nothing-here"))
    assert missing.returncode != 0 and "no such directory" in missing.stderr


def test_backtest_reports_changed_decisions(tmp_path):
    data = tmp_path / "data"
    proc, ports = cli.spawn_server(data, stderr=subprocess.DEVNULL)
    try:
        with Client("127.0.0.1", ports["json"]) as c:
            c.open_account(id=1, account=1, currency=USD)
            c.deposit(id=2, account=1, amount=100_000)
            c.batch([{"op": "authorize", "id": 10 + i, "account": 1, "amount": 50, "currency": USD, "merchant": 7}
                     for i in range(8)])  # fmt: skip
    finally:
        cli.stop_server(proc)
    strict = tmp_path / "strict.toml"
    strict.write_text("[fraud]\ndecline_score = 40\n")
    b = run_cli("backtest", "--data", str(data), "--config", str(strict), "--json")
    assert b.returncode == 0, b.stderr
    report = orjson.loads(b.stdout)
    assert report["changed"] > 0  # card testing (60 points) now declines


def test_config_errors_exit_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nframe_bytes_maxx = 5\n")
    r = run_cli("serve", "--data", str(tmp_path / "d"), "--config", str(cfg), "--port", "0")
    assert r.returncode == 2
    assert "server.frame_bytes_maxx" in r.stderr
    assert r.stdout == ""


def test_port_in_use_fails_cleanly(tmp_path):
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        r = run_cli("serve", "--data", str(tmp_path / "d"), "--port", str(port), "--json-port", "0",
                    "--iso-port", "0", "--metrics-port", "0", timeout=60)  # fmt: skip
        assert r.returncode == 1 and "cannot serve" in r.stderr
        assert r.stdout == ""
    finally:
        blocker.close()


@pytest.mark.parametrize("protocol, n", [("binary", 30_000), ("json", 5_000)])
def test_bench_prints_one_json_line(protocol, n):
    r = run_cli("bench", "--protocol", protocol, "--requests", str(n), "--accounts", "2000", "--batch", "1024", "--json")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    out = orjson.loads(line)
    assert out["protocol"] == protocol and out["requests"] == n
    assert out["throughput"] > 0 and 0 < out["p50_us"] <= out["p99_us"] <= out["max_us"]
    assert sum(out["statuses"].values()) == n and out["errors"] == 0


def test_serve_refuses_a_corrupt_log_then_truncate_corrupt_starts(tmp_path):
    data = tmp_path / "data"
    proc, ports = cli.spawn_server(data, stderr=subprocess.DEVNULL)
    try:
        with Client("127.0.0.1", ports["json"]) as c:
            c.open_account(id=1, account=1, currency=USD)
            for i in range(3):
                c.deposit(id=10 + i, account=1, amount=5)
    finally:
        assert cli.stop_server(proc) == 0
    (seg,) = sorted((data / "wal").glob("*.log"))[:1]
    raw = bytearray(seg.read_bytes())
    raw[70] ^= 0xFF
    seg.write_bytes(bytes(raw))
    r = run_cli("serve", "--data", str(data), "--port", "0", "--json-port", "0", "--iso-port", "0", "--metrics-port", "0")
    assert r.returncode == 1 and r.stdout == ""
    assert "corrupt log" in r.stderr and seg.name in r.stderr and "offset" in r.stderr
    proc, ports = cli.spawn_server(data, stderr=subprocess.DEVNULL, extra=["--truncate-corrupt"])
    try:
        with Client("127.0.0.1", ports["json"]) as c:
            assert c.query(account=1)["status"] == "no_account"  # everything after the damage was cut
    finally:
        assert cli.stop_server(proc) == 0
