"""Server load: binary frames and pipelined JSON lines against a real server.

Goals: the two server benchmarks of issue 4, reproducible with one command,
on a server started as a subprocess with ``sync = "always"`` (durable):

1. binary protocol, frames of 8192 authorisations, a window of frames in
   flight on one connection;
2. JSON lines, one connection, pipelined writes of many lines.

Each scenario prints one JSON line (``authcore bench`` output: throughput,
latency percentiles from HdrHistogram, statuses) and the run ends with a
markdown table for bench/RESULTS.md.  Closed loop: latency is per frame or
per write from send to answer, so it includes queueing behind the window.

Non-goals: open-loop rates, mixes, many processes (issue 6's load tester).

    python bench/server_load.py                 # real sizes
    AUTHCORE_BENCH_SCALE=0.05 python bench/server_load.py   # a quick run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from authcore.cli import bench_seed, run_bench  # noqa: E402

scale = float(os.environ.get("AUTHCORE_BENCH_SCALE", "1"))
binary_requests = 4_000_000  # ~0.5-2 s at the target rates
json_requests = 1_000_000
accounts = 100_000  # spreads the fraud windows: mostly approvals
binary_batch = 8192  # records per frame = the server's default batch_max
binary_window = 4  # frames in flight
json_batch = 4096  # lines per write
json_window = 8  # writes in flight


def scenarios(sync: str) -> list[dict]:
    return [
        dict(protocol="binary", requests=max(binary_batch, int(binary_requests * scale)), batch=binary_batch,
             window=binary_window, sync=sync),
        dict(protocol="json", requests=max(json_batch, int(json_requests * scale)), batch=json_batch,
             window=json_window, sync=sync),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sync", choices=("always", "none"), default="always")
    p.add_argument("--only", choices=("binary", "json"), default=None)
    args = p.parse_args(argv)
    results = []
    for sc in scenarios(args.sync):
        if args.only and sc["protocol"] != args.only:
            continue
        r = run_bench(target=None, accounts=max(1000, int(accounts * min(1.0, scale * 10))), seed=bench_seed, **sc)
        print(orjson.dumps(r).decode(), flush=True)
        results.append(r)
    print()
    print("| protocol | sync | requests | batch x window | throughput req/s | p50 µs | p99 µs | max µs |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['protocol']} | {r['sync']} | {r['requests']:,} | {r['batch']} x {r['window']} | "
            f"{r['throughput']:,} | {r['p50_us']:,} | {r['p99_us']:,} | {r['max_us']:,} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
