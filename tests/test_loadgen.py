"""The load tester (``authcore bench``, issue 6) and the peers' presentation.

Short real runs against a server on 127.0.0.1 (a second or two each, small
accounts), the workload generator's invariants, the codecs' bytes checked
with independent decoders (orjson, pyiso8583), HDR bucketing against hdrh,
coordinated-omission correction against a server that stalls on purpose,
and compare.py's table and JSON on fake results (no PostgreSQL or Redis).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from authcore import loadgen as L
from authcore.constants import REQUEST_DTYPE, Op

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
ACCOUNTS = 500


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    L.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from authcore.cli import spawn_server, stop_server

    root = tmp_path_factory.mktemp("bench-server")
    cfg = root / "c.toml"
    cfg.write_text('[durability]\nsync = "none"\n')
    proc, ports = spawn_server(root / "data", config_path=str(cfg), stderr=subprocess.DEVNULL)
    yield ports
    assert stop_server(proc) == 0


# --- pure parts ------------------------------------------------------------------


def test_mix_presets_and_errors():
    m = L.parse_mix("mixed")
    assert set(m) == set(L.KINDS) and abs(sum(m.values()) - 1) < 1e-9
    assert L.parse_mix("authorize") == {"authorize": 1.0}
    assert L.parse_mix("authorize=3,decline=1") == {"authorize": 0.75, "decline": 0.25}
    for bad, word in (("authorise=1", "unknown kind"), ("authorize=x", "number"), ("authorize=0", "more than 0"),
                      ("void=-1", ">= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            L.parse_mix(bad)


def test_hdr_buckets_match_hdrh():
    from hdrh.histogram import HdrHistogram

    rng = np.random.default_rng(1)
    values = np.concatenate([rng.integers(1, 3000, 5000), rng.lognormal(9, 2, 20000).astype(np.int64) + 1])
    values = np.minimum(values, L.latency_us_max)
    direct = HdrHistogram(1, L.latency_us_max, 3)
    for v in values:
        direct.record_value(int(v))
    counts = np.bincount(L.hdr_keys_of(values), minlength=L.hdr_keys)
    assert all(L.hdr_key(int(v)) == k for v, k in zip(values[:2000], L.hdr_keys_of(values[:2000])))
    ours = L.to_hdr(counts)
    for p in (1, 50, 90, 99, 99.9, 100):
        assert ours.get_value_at_percentile(p) == direct.get_value_at_percentile(p), p
    assert ours.get_total_count() == len(values)
    # the bucket's recorded value lands in the same hdrh bucket
    for k in range(1, L.hdr_keys, 97):
        assert L.hdr_key(L.hdr_value(k)) == k
    assert L.percentiles_of(counts, (50,))[0] == pytest.approx(direct.get_value_at_percentile(50), rel=1e-3)


def test_latency_ramp_is_per_request():
    lat = L.Latencies()
    lat.add_ramp(1000.0, 10.0, 100)  # 1000, 990, ..., 10 µs
    assert lat.counts.sum() == 100 and lat.max_us == 1000
    assert L.percentiles_of(lat.counts, (50,))[0] in range(500, 512)


def workload(**kw) -> L.Workload:
    return L.Workload(accounts=ACCOUNTS, mix=tuple(L.parse_mix(kw.pop("mix", "mixed")).items()), **kw)


def test_pattern_invariants():
    wl = workload(skew="zipf")
    p = L.build_pattern(wl, 8192, stream=3)
    r = p.records
    assert np.array_equal(L.build_pattern(wl, 8192, 3).records, r)  # seeded: reproducible
    assert not np.array_equal(L.build_pattern(wl, 8192, 4).records, r)  # streams differ
    pos = np.arange(p.n)
    dup = p.kind == L.K_DUPLICATE
    # every non-repeat carries its own position as relative id; a repeat an earlier one
    assert np.array_equal(r["id"][~dup], pos[~dup])
    lag = pos[dup] - r["id"][dup].astype(np.int64)
    assert (lag > 0).all() and np.median(lag) <= L.duplicate_lag_max  # (a repeat of a repeat goes further back)
    src = r["id"][dup].astype(np.int64)
    assert np.array_equal(r[dup], r[src]) and (p.kind[src] != L.K_DUPLICATE).all()
    # captures/voids name an earlier authorisation of this pattern, each hold once
    cv = np.flatnonzero(((r["op"] == Op.capture) | (r["op"] == Op.void)) & ~dup)
    holds = r["account"][cv].astype(np.int64)
    assert len(cv) > 500 and p.ref[cv].all()
    assert (holds < cv).all() and len(np.unique(holds)) == len(holds)
    assert (r["op"][holds] == Op.authorize).all() and (p.kind[holds] == L.K_AUTHORIZE).all()
    # accounts: wallets 1..N, declines on the empty accounts, no self-transfer
    own = ~p.ref
    dec = p.kind == L.K_DECLINE
    acct = r["account"][own & ~dec & ~dup]
    assert acct.min() >= 1 and acct.max() <= ACCOUNTS
    assert ((r["account"][dec] >= L.decline_account_base) & (r["account"][dec] < L.decline_account_base + L.decline_accounts)).all()
    tr = r["op"] == Op.transfer
    assert tr.any() and (r["to"][tr] != r["account"][tr]).all() and (r["to"][tr] <= ACCOUNTS).all()
    amounts = r["amount"][own]
    assert (amounts >= L.amount_min).all() and (amounts <= L.amount_max).all()
    # zipf: the hottest account takes far more than its uniform share
    counts = np.bincount(acct.astype(np.int64))
    assert counts.max() > 20 * len(acct) / ACCOUNTS
    # authorisation counting over any slice
    is_auth = np.isin(p.kind, L.AUTHORISATION_KINDS)
    assert p.authorisations(p.n + 100, p.n + 612) == int(is_auth[100:612].sum())


def test_iso_patterns_have_no_transfers():
    p = L.build_pattern(workload(transfers=False), 4096, 0)
    assert set(np.unique(p.records["op"])) <= {Op.authorize, Op.purchase, Op.capture, Op.void}


def _stream_ids(p: L.Pattern, start: int, stop: int, conn: int, conns: int, base: int):
    cyc, lo = divmod(start, p.n)
    rel = p.records["id"][lo : lo + stop - start].astype(object)
    ref = p.records["account"][lo : lo + stop - start].astype(object)
    gid = [base + (cyc * p.n + int(x)) * conns + conn for x in rel]
    gref = [base + (cyc * p.n + int(x)) * conns + conn for x in ref]
    return lo, gid, gref


def test_binary_and_json_codecs_encode_the_pattern():
    p = L.build_pattern(workload(), 4096, 1)
    base = L.new_id_base(10**6)
    start, stop = 3 * 4096 + 256, 3 * 4096 + 512  # cycle 3
    lo, gid, gref = _stream_ids(p, start, stop, 2, 5, base)
    frame = L.BinaryCodec(p, 2, 5, base, {}).encode(start, stop)
    rec = np.frombuffer(frame[16:], REQUEST_DTYPE)
    assert rec["id"].tolist() == gid
    ref = p.ref[lo : lo + 256]
    assert rec["account"][ref].tolist() == [g for g, f in zip(gref, ref) if f]
    assert np.array_equal(rec["amount"], p.records["amount"][lo : lo + 256])
    lines = L.JsonCodec(p, 2, 5, base, {}).encode(start, stop).split(b"\n")
    assert lines[-1] == b"" and len(lines) == 257
    for i, line in enumerate(lines[:-1]):
        d = orjson.loads(line)
        r = p.records[lo + i]
        assert d["op"] == Op(int(r["op"])).name and d["id"] == gid[i]
        if ref[i]:
            assert d["auth"] == gref[i] and d["amount"] == 0
        else:
            assert d["account"] == int(r["account"]) and d["amount"] == int(r["amount"])
    assert all(len(str(g)) == L.id_digits for g in gid)


def test_iso_codec_encodes_valid_messages():
    import iso8583
    from iso8583.specs import default_ascii

    p = L.build_pattern(workload(transfers=False), 4096, 0)
    base = L.new_id_base(10**6)
    c = L.IsoCodec(p, 0, 1, base, {})
    data = c.encode(4096, 4096 + 512)
    lo, gid, gref = _stream_ids(p, 4096, 4096 + 512, 0, 1, base)
    pos = 0
    mti_of = {Op.authorize: "0100", Op.purchase: "0200", Op.capture: "0220", Op.void: "0400"}
    for i in range(512):
        size = int.from_bytes(data[pos : pos + 2], "big")
        doc, _ = iso8583.decode(data[pos + 2 : pos + 2 + size], default_ascii)
        pos += 2 + size
        r = p.records[lo + i]
        assert doc["t"] == mti_of[Op(int(r["op"]))]
        assert doc["11"] == f"{gid[i] % 10**6:06d}"
        if p.ref[lo + i]:
            assert doc["37"] == f"{gref[i] % 10**12:012d}" and int(doc["4"]) == 0
            hold = p.records[int(r["account"])]
            assert doc["2"] == L.card_pan(int(hold["account"]))
        else:
            assert doc["37"] == f"{gid[i] % 10**12:012d}" and int(doc["4"]) == int(r["amount"])
            assert doc["2"] == L.card_pan(int(r["account"]))
    assert pos == len(data)
    # answers: field 39 found by the cached walker
    ans = iso8583.encode({"t": "0110", "2": doc["2"], "11": "000001", "37": doc["37"], "38": "ABC123", "39": "51"},
                         default_ascii)[0]  # fmt: skip
    framed = len(ans).to_bytes(2, "big") + bytes(ans)
    assert c.feed(framed[:7]) == 0 and c.feed(framed[7:] + framed) == 2
    assert c.statuses == {"51": 2} and c.errors == 0


def test_card_pans_are_luhn_valid_and_distinct():
    from authcore.cards import luhn_valid

    pans = {L.card_pan(a) for a in (1, 2, ACCOUNTS, L.decline_account_base + 15)}
    assert len(pans) == 4 and all(len(x) == 16 and luhn_valid(x) for x in pans)


# --- real runs ---------------------------------------------------------------------


def _check(result: dict, protocol_statuses: set[str]) -> None:
    brief = {k: v for k, v in result.items() if k != "timeline"}
    assert result["errors"] == 0 and result["lost"] == 0, brief
    assert result["throughput"] > 0 and result["authorisations_per_s"] > 0, brief
    assert 0 < result["p50_us"] <= result["p90_us"] <= result["p99_us"] <= result["p999_us"] <= result["max_us"], brief
    assert set(result["statuses"]) <= protocol_statuses, brief


def test_closed_loop_binary_mixed_counts_every_request(server):
    args = parse(["--target", f"127.0.0.1:{server['binary']}", "--requests", "20000", "--accounts", str(ACCOUNTS),
                  "--connections", "3", "--processes", "1", "--batch", "100", "--mix", "mixed", "--no-progress"])  # fmt: skip
    r = L.run(args)
    # no capture overtook its authorisation, no repeat was new: approvals and the planned declines only
    _check(r, {"approved", "insufficient_funds"})
    assert r["requests"] == 20000 and sum(r["statuses"].values()) == 20000
    declines = r["statuses"].get("insufficient_funds", 0)
    assert 0.005 * 20000 < declines < 0.05 * 20000  # 2% declines (+ their repeats)
    assert r["authorisations_per_s"] < r["throughput"]  # captures, voids, repeats are not authorisations
    assert r["options"]["requests"] == 20000 and r["options"]["sync"] == "target"


def test_json_and_iso_runs_against_a_target(server):
    j = L.run(parse(["--target", f"127.0.0.1:{server['json']}", "--protocol", "json", "--duration", "1",
                     "--warmup", "0.2", "--accounts", str(ACCOUNTS), "--connections", "2", "--processes", "1",
                     "--batch", "64", "--no-progress"]))  # fmt: skip
    _check(j, {"approved", "insufficient_funds"})
    i = L.run(parse(["--target", f"127.0.0.1:{server['iso8583']}", "--setup-target", f"127.0.0.1:{server['binary']}",
                     "--protocol", "iso8583", "--duration", "1", "--warmup", "0.2", "--accounts", str(ACCOUNTS),
                     "--connections", "2", "--processes", "1", "--batch", "64", "--skew", "zipf", "--no-progress"]))  # fmt: skip
    _check(i, {"00", "51"})
    assert i["statuses"]["00"] > 100, i
    with pytest.raises(ValueError, match="setup-target"):
        L.run(parse(["--target", f"127.0.0.1:{server['iso8583']}", "--protocol", "iso8583", "--no-progress"]))


def test_open_loop_holds_the_rate(server):
    r = L.run(parse(["--target", f"127.0.0.1:{server['binary']}", "--rate", "4000", "--batch", "10", "--duration",
                     "1.5", "--warmup", "0.3", "--accounts", str(ACCOUNTS), "--connections", "4", "--processes", "2",
                     "--mix", "authorize", "--no-progress"]))  # fmt: skip
    _check(r, {"approved"})
    assert r["mode"] == "open_loop"
    assert 3000 < r["throughput"] < 5000 and 4500 < r["requests"] < 7500


class _StallingJsonServer:
    """Answers JSON lines with approvals, but stops answering once, for ``stall`` seconds."""

    def __init__(self, stall_after: int, stall: float):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stall_after, self.stall = stall_after, stall
        self.seen = 0
        self.stalled = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                buf += data
                n = buf.count(b"\n")
                buf = buf[buf.rfind(b"\n") + 1 :]
                self.seen += n
                if self.seen >= self.stall_after and not self.stalled:
                    self.stalled = True
                    time.sleep(self.stall)
                conn.sendall(b'{"status":"approved"}\n' * n)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("open_loop", [True, False])
def test_coordinated_omission_correction(open_loop):
    """A 0.35 s stall in a 1.2 s run: open loop charges it to every request
    that should have been sent meanwhile (~30% of them wait > 100 ms),
    closed loop only to the one request in flight."""
    srv = _StallingJsonServer(stall_after=800, stall=0.35)
    try:
        spec = L.DriveSpec(host="127.0.0.1", port=srv.port, codec=L.CODECS["json"], workload=workload(mix="authorize"),
                           connections=1, processes=1, batch=1, window=1, rate=2000.0 if open_loop else None,
                           warmup=0.0, duration=1.2)  # fmt: skip
        r = L.drive(spec)
    finally:
        srv.close()
    assert r["errors"] == 0 and r["max_us"] > 300_000
    if open_loop:
        assert r["p90_us"] > 100_000 and r["p50_us"] < 100_000
    else:
        assert r["p99_us"] < 100_000


def test_cli_bench_json_last_line(server):
    """``authcore bench`` (the command) prints the table, then one JSON line."""
    cmd = [sys.executable, "-m", "authcore.loadgen", "--target", f"127.0.0.1:{server['binary']}", "--requests",
           "5000", "--accounts", str(ACCOUNTS), "--connections", "2", "--processes", "1", "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    out = orjson.loads(line)
    for key in ("throughput", "authorisations_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "errors", "options"):
        assert key in out
    assert out["requests"] == 5000 and sum(out["statuses"].values()) == 5000
    assert "throughput" in r.stderr  # the summary table went to stderr
    bad = subprocess.run([*cmd[:3], "--mix", "authorise=1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and "unknown kind" in bad.stderr


def test_plot_sweep(server, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the optional "bench" extra
    monkeypatch.setattr(L, "plot_fractions", (0.3, 0.6, 1.0))
    png = tmp_path / "lat.png"
    r = L.run(parse(["--target", f"127.0.0.1:{server['binary']}", "--duration", "0.4", "--warmup", "0.1",
                     "--accounts", str(ACCOUNTS), "--connections", "2", "--processes", "1", "--batch", "50",
                     "--rate", "3000", "--mix", "authorize", "--plot", str(png), "--no-progress"]))  # fmt: skip
    assert len(r["sweep"]) == len(L.plot_fractions) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates = [p["rate"] for p in r["sweep"]]
    assert rates == sorted(rates) and all(p["errors"] == 0 for p in r["sweep"])


# --- the peers, without PostgreSQL or Redis ---------------------------------------------


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(PEERS))
    import compare
    import redis_peer

    return compare, redis_peer


FAKE = {
    "authcore": {"throughput": 300_000, "p50_us": 20_000, "p99_us": 90_000, "p999_us": 1, "errors": 0, "config": "binary", "version": "this tree"},
    "postgresql": {"throughput": 3_000, "p50_us": 5_000, "p99_us": 17_000, "p999_us": 1, "errors": 0, "config": "psycopg", "version": "15.18"},
    "redis": {"throughput": 25_000, "p50_us": 8_000, "p99_us": 22_000, "p999_us": 1, "errors": 0, "config": "fcall", "version": "7.0.15"},
}


def test_compare_table_and_json(peers, tmp_path):
    compare, _ = peers
    s = compare.summary(FAKE)
    assert list(s) == ["authcore", "postgresql", "redis"]
    assert s["postgresql"]["authcore_ratio"] == 100.0 and s["redis"]["authcore_ratio"] == 12.0
    assert all({"throughput", "p50_us", "p99_us"} <= set(v) for v in s.values())
    table = compare.markdown_table(FAKE)
    assert "| postgresql 15.18 | 3,000 | 5.00 ms | 17.00 ms | 100.0× |" in table
    assert "| authcore | 300,000 | 20.00 ms | 90.00 ms | 1× |" in table
    assert compare.label("redis_pipeline_512", FAKE["redis"]) == "redis 7.0.15 (pipelines of 512)"
    machine = {"cpus": 2, "load_avg_1m": 3.5, "python": "3.11", "kernel": "6", "fdatasync_ms": 3.2}
    opts = {"duration": 10, "warmup": 2, "connections": 16, "processes": 2, "accounts": 100_000, "skew": "uniform"}
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier text\n")
    compare.append_results(results, compare.results_section(FAKE, machine, ["--duration", "10"], opts))
    compare.append_results(results, compare.results_section(FAKE, machine, [], opts))
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier text\n")
    assert text.count("## Side by side: PostgreSQL and Redis") == 1 and text.count("### Comparison,") == 2
    assert "shared with other work" in text and "python bench/peers/compare.py --duration 10" in text


def test_redis_codec_commands_and_replies(peers):
    _, redis_peer = peers
    p = L.build_pattern(workload(mix="authorize=90,duplicate=5,decline=5"), 4096, 0)
    base = L.new_id_base(10**6)
    c = redis_peer.RespCodec(p, 1, 2, base, {})
    data = c.encode(0, 16)
    lo, gid, _ = _stream_ids(p, 0, 16, 1, 2, base)
    cmds = data.split(b"*7\r\n")[1:]
    assert len(cmds) == 16
    for i, cmd in enumerate(cmds):
        parts = cmd.split(b"\r\n")
        assert parts[1] == b"FCALL" and parts[3] == b"authorize" and parts[5] == b"2"
        assert parts[7] == f"a:{int(p.records['account'][i])}".encode() and parts[9] == f"r:{gid[i]}".encode()
        assert parts[11] == str(int(p.records["amount"][i])).encode()
    assert c.feed(b":100\r\n:5") == 1 and c.feed(b"0\r\n:-5\r\n-ERR boom\r\n") == 3
    assert c.statuses == {"approved": 2, "insufficient_funds": 1, "error": 1} and c.errors == 1
    with pytest.raises(ValueError, match="authorisations only"):
        redis_peer.RespCodec(L.build_pattern(workload(), 4096, 0), 0, 1, base, {})


@pytest.mark.parametrize("codec", ["json", "iso8583"])
def test_small_frames_encode_the_same_bytes_in_python(codec, monkeypatch):
    """Open-loop frames of a few records take a plain-Python path; it must
    write exactly what the vectorised one does."""
    p = L.build_pattern(workload(transfers=codec == "json"), 4096, 3)
    base = L.new_id_base(10**6)
    cls = L.JsonCodec if codec == "json" else L.IsoCodec
    small, vectorised = cls(p, 3, 7, base, {}), cls(p, 3, 7, base, {})
    rng = np.random.default_rng(4)
    frames = [(s, s + int(rng.integers(1, L.small_frame_records + 1))) for s in rng.integers(0, 5 * 4096, 200).tolist()]
    frames = [(a, min(b, (a // 4096 + 1) * 4096)) for a, b in frames]  # a frame never crosses a cycle
    got = [small.encode(a, b) for a, b in frames]
    monkeypatch.setattr(L, "small_frame_records", 0)
    assert got == [vectorised.encode(a, b) for a, b in frames]


def test_small_ramps_count_like_the_vectorised_ones(monkeypatch):
    a, b = L.Latencies(), L.Latencies()
    cases = [(5000.7, 125.0, 8), (3.2, 2.0, 5), (10**7 + 0.5, 1000.0, 32), (0.4, 0.1, 3)]
    for first, step, count in cases:
        a.add_ramp(first, step, count)
    monkeypatch.setattr(L, "small_frame_records", 0)
    for first, step, count in cases:
        b.add_ramp(first, step, count)
    assert np.array_equal(a.counts, b.counts) and a.max_us == b.max_us


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pin_puts_server_and_generator_on_different_cpus(monkeypatch):
    """--pin: a started server runs on one CPU (every thread: the mask is set
    before exec), the generator processes on the others."""
    server_cpus, generator_cpus = L.pin_cpus()
    assert len(server_cpus) == 1 and generator_cpus and not set(server_cpus) & set(generator_cpus)
    seen = {}
    real_spawn = __import__("authcore.cli", fromlist=["spawn_server"]).spawn_server

    def spawn(*a, **kw):
        proc, ports = real_spawn(*a, **kw)
        seen["server"] = os.sched_getaffinity(proc.pid)
        seen["config"] = Path(kw["config_path"]).read_text()
        return proc, ports

    monkeypatch.setattr("authcore.cli.spawn_server", spawn)
    r = L.run(parse(["--requests", "2000", "--accounts", "100", "--connections", "1", "--processes", "1",
                     "--pin", "--prefault", "--no-progress"]))  # fmt: skip
    _check(r, {"approved", "insufficient_funds"})
    assert seen["server"] == set(server_cpus) and "prefault = true" in seen["config"]
    assert r["options"]["pin"] and r["options"]["prefault"]


def test_open_loop_waits_shorter_than_epolls_millisecond_are_polled():
    """epoll rounds timeouts up to whole milliseconds: a pinned open loop's
    short waits must poll (timeout 0), longer ones wake early and poll the
    rest; otherwise (closed loop, or no core of its own) it just waits."""
    from authcore.loadgen import _select_timeout, spin_below_s

    assert _select_timeout(0.00007, spin=True) == 0.0
    assert _select_timeout(-1.0, spin=True) == 0.0
    assert _select_timeout(0.01, spin=True) == pytest.approx(0.01 - spin_below_s)
    assert _select_timeout(0.00007, spin=False) == 0.00007
