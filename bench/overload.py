"""Overload: a flood beyond its rate limit is shed; a well-behaved client's
latency stays close to its unloaded value (issue 7).

Setup: a server process (in-memory engine, API-key identities, no TLS) with
three clients: ``admin`` (setup), ``good`` (a gateway at a modest paced
rate, well inside its limit) and ``flood`` (a gateway limited to
``--flood-limit`` requests/s that pipelines as fast as it can from
``--flood-procs`` processes).  Phases, each ``--seconds`` long:

1. unloaded: only ``good`` (closed loop, paced at ``--good-rate``);
2. flooded: ``good`` again while ``flood`` runs;
3. (``--unlimited``) the same flood from a client with no limit, to show
   what the limit buys;
4. (``--idle N``) ``good`` again with N idle connections open (slowloris
   style: connected, a few bytes of an unfinished line, then silence).

Prints one JSON object: good's p50/p99/max per phase, the p99 ratio
flooded/unloaded, the flood's sent/served/refused counts, and the server's
RSS before and after.  Run: ``python bench/overload.py --seconds 5``.
Non-goals: TLS cost (same path once the handshake is done), multi-host.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import orjson  # noqa: E402

KEYS = {"admin": "overload-admin-key-0123456789", "good": "overload-good-key-0123456789",
        "flood": "overload-flood-key-0123456789", "wild": "overload-wild-key-0123456789"}  # fmt: skip
accounts = 1000
flood_batch = 2000  # requests per pipelined flood exchange
server_start_seconds = 30.0


def _serve(config_path: str) -> None:
    """Child: an in-memory engine on free ports; prints the ports, runs until killed."""
    import asyncio

    import uvloop

    from authcore.config import Config
    from authcore.engine import Engine
    from authcore.server import start_engine

    cfg = Config.from_toml(config_path)

    async def main() -> None:
        sys.setswitchinterval(0.001)
        eng = Engine(cfg, pan_key=b"overload-bench-pan-key-32-bytes!")
        running = await start_engine(eng, cfg, ports={k: 0 for k in ("binary", "json", "iso8583", "metrics")})
        print(orjson.dumps(running.ports).decode(), flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _flood(port: int, key: str, seconds: float, out: mp.Queue) -> None:
    """Child: pipeline authorize/query batches as fast as the server takes them."""
    from authcore.client import Client

    reqs = [{"op": "query", "account": 1 + i % accounts} for i in range(flood_batch)]
    sent = served = refused = 0
    end = time.monotonic() + seconds
    with Client("127.0.0.1", port, "json", api_key=key, timeout=60) as c:
        while time.monotonic() < end:
            ans = c.batch(reqs)
            sent += len(ans)
            for a in ans:
                if a.get("error") == "rate limit exceeded":
                    refused += 1
                else:
                    served += 1
    out.put({"sent": sent, "served": served, "refused": refused})


def _good(port: int, rate: float, seconds: float, id0: int) -> np.ndarray:
    """Paced closed loop: one authorize at a time; returns latencies (s)."""
    from authcore.client import Client

    lat = []
    gap = 1.0 / rate
    with Client("127.0.0.1", port, "json", api_key=KEYS["good"]) as c:
        t_next = time.perf_counter()
        end = t_next + seconds
        i = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if now < t_next:
                time.sleep(t_next - now)
            t0 = time.perf_counter()
            a = c.request({"op": "authorize", "id": id0 + i, "account": 1 + i % accounts, "amount": 1,
                           "currency": 978, "merchant": 1})  # fmt: skip
            lat.append(time.perf_counter() - t0)
            assert a["status"] == "approved", a
            i += 1
            t_next += gap
    return np.array(lat)


def _summary(lat: np.ndarray) -> dict:
    return {"n": len(lat), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3), "max_ms": round(float(lat.max()) * 1e3, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--good-rate", type=float, default=500.0, help="good client's paced requests/s")
    p.add_argument("--flood-limit", type=float, default=2000.0, help="flood client's rate limit, requests/s")
    p.add_argument("--flood-procs", type=int, default=2)
    p.add_argument("--unlimited", action="store_true", help="also run the flood from a client without a limit")
    p.add_argument("--idle", type=int, default=0, help="also measure with this many idle connections open")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        _serve(a.serve)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="authcore-overload-"))
    (tmp / "keys").write_text("".join(f"{n} {k}\n" for n, k in KEYS.items()))
    (tmp / "config.toml").write_text(f"""
[durability]
sync = "none"
[auth]
api_keys_file = "{tmp / 'keys'}"
audit_file = "{tmp / 'audit.jsonl'}"
[[auth.clients]]
name = "admin"
role = "admin"
[[auth.clients]]
name = "good"
role = "gateway"
rate_per_second = {a.good_rate * 4}
[[auth.clients]]
name = "flood"
role = "gateway"
rate_per_second = {a.flood_limit}
burst = {int(a.flood_limit)}
[[auth.clients]]
name = "wild"
role = "gateway"
""")
    srv = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "config.toml")], stdout=subprocess.PIPE,
                           text=True, cwd=ROOT)  # fmt: skip
    try:
        ports = orjson.loads(srv.stdout.readline())
        port = ports["json"]
        from authcore.client import Client

        with Client("127.0.0.1", port, "json", api_key=KEYS["admin"]) as admin:
            setup = []
            for acc in range(1, accounts + 1):
                setup.append({"op": "open", "id": 10 * acc, "account": acc, "currency": 978, "credit_limit": 10**9})
            setup.append({"op": "open", "id": 5, "account": 1_000_000, "currency": 978, "kind": "merchant"})
            assert all(x["status"] == "approved" for x in admin.batch(setup))
        rss0 = _rss_kib(srv.pid)
        _good(port, a.good_rate, 1.0, 10**9)  # warm-up
        result: dict = {"seconds": a.seconds, "good_rate": a.good_rate, "flood_limit": a.flood_limit,
                        "flood_procs": a.flood_procs, "cpus": os.cpu_count()}  # fmt: skip
        result["unloaded"] = _summary(_good(port, a.good_rate, a.seconds, 2 * 10**9))

        def flooded(who: str) -> tuple[dict, dict]:
            q: mp.Queue = mp.Queue()
            procs = [mp.Process(target=_flood, args=(port, KEYS[who], a.seconds + 1.0, q)) for _ in range(a.flood_procs)]
            for pr in procs:
                pr.start()
            time.sleep(0.5)  # the flood is on before measuring
            good = _summary(_good(port, a.good_rate, a.seconds, (3 if who == "flood" else 4) * 10**9))
            counts = [q.get(timeout=120) for _ in procs]
            for pr in procs:
                pr.join(30)
            total = {k: sum(c[k] for c in counts) for k in ("sent", "served", "refused")}
            total["served_per_s"] = round(total["served"] / (a.seconds + 1.0), 1)
            return good, total

        result["flooded"], result["flood"] = flooded("flood")
        result["p99_ratio"] = round(result["flooded"]["p99_ms"] / result["unloaded"]["p99_ms"], 2)
        if a.unlimited:
            result["unlimited_flooded"], result["unlimited_flood"] = flooded("wild")
            result["unlimited_p99_ratio"] = round(result["unlimited_flooded"]["p99_ms"] / result["unloaded"]["p99_ms"], 2)
        if a.idle:
            import socket

            idle = []
            for _ in range(a.idle):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b'{"op":"auth","api_k')  # never finished
                idle.append(s)
            time.sleep(1.0)
            result["idle_connections"] = a.idle
            result["with_idle"] = _summary(_good(port, a.good_rate, a.seconds, 5 * 10**9))
            result["idle_p99_ratio"] = round(result["with_idle"]["p99_ms"] / result["unloaded"]["p99_ms"], 2)
            result["idle_rss_mib"] = round(_rss_kib(srv.pid) / 1024, 1)
            for s in idle:
                s.close()
        result["server_rss_mib"] = {"before": round(rss0 / 1024, 1), "after": round(_rss_kib(srv.pid) / 1024, 1)}
        print(orjson.dumps(result).decode(), flush=True)
        return 0
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    sys.exit(main())
