"""authcore side by side with PostgreSQL and Redis, on this machine, in one run.

Goals:
- One command, ``python bench/peers/compare.py``: installs PostgreSQL and
  Redis from Debian's packages if they are missing, starts each (and an
  authcore server) on 127.0.0.1 on a free port with its data in a temporary
  directory, runs the same durable authorisation workload against each, in
  turn, stops it, and prints one table: throughput, p50, p99 and how many
  times authcore's throughput each peer's is.  The table is appended to
  bench/RESULTS.md (``--results``); ``--json`` prints one JSON object keyed
  by system as the last line.
- The same workload everywhere: the same accounts (1..N with a credit line,
  16 accounts with no money), the same request streams (connection c sends
  the same ids, accounts and amounts to every system) and the same
  measurement (authcore's load generator: warm-up, then ``--duration``
  seconds, latency from send to answer in HdrHistogram).  The operation is
  SPEC §4's funds check with idempotency, durably: 97% authorisations, 2%
  funds declines, 1% retransmissions of an earlier id.
- Each system used the way it is meant to be used for throughput:
  authcore with binary frames (``--batch`` requests, ``--window`` frames in
  flight per connection); Redis with pipelines of FCALLs (``--redis-pipeline``,
  16 by default as in issue 6's reference figure; a comma list runs several);
  PostgreSQL with one transaction in flight per connection (psycopg 3).

Non-goals: tuning the peers beyond their durable defaults; captures, voids
and fraud rules (authcore runs its fraud rules in this comparison, the
peers do not: the comparison favours them).

    python bench/peers/compare.py                       # ~10 s per system
    python bench/peers/compare.py --duration 3 --json   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_here = Path(__file__).resolve().parent
_root = _here.parent.parent
for _p in (str(_root), str(_here)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import orjson  # noqa: E402

from authcore import loadgen as L  # noqa: E402

import common  # noqa: E402

SYSTEMS = ("authcore", "postgresql", "redis")
mix = "authorize=97,decline=2,duplicate=1"
duration_default_s = 10.0
warmup_default_s = 2.0
accounts_default = 100_000
connections_default = 16
processes_default = 2
authcore_batch_default = 512
authcore_window_default = 2
redis_pipelines_default = "16"
results_default = _root / "bench" / "RESULTS.md"
fsync_probe_s = 0.5  # how long the disk's fdatasync rate is probed


def fsync_probe(directory: str) -> float:
    """Average ms of a 4 KiB write + fdatasync in ``directory`` (context for the numbers)."""
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < fsync_probe_s:
            os.write(fd, b"\0" * 4096)
            os.fdatasync(fd)
            n += 1
        return (time.perf_counter() - t0) / n * 1000
    finally:
        os.close(fd)
        os.unlink(path)


def machine_info() -> dict:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(load[0], 2),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "fdatasync_ms": round(fsync_probe(tempfile.gettempdir()), 2),
    }


def _spec(args: argparse.Namespace, wl: L.Workload, id_base: int, **kw: Any) -> L.DriveSpec:
    return L.DriveSpec(
        workload=wl, connections=args.connections, processes=args.processes, warmup=args.warmup,
        duration=args.duration, id_base=id_base, **kw,
    )  # fmt: skip


def run_authcore(args, wl, id_base, progress, log) -> dict:
    with L.ServerUnderTest(None, "binary", "always") as sut:
        L.setup_accounts(*sut.setup, wl.accounts, cards=False)
        spec = _spec(args, wl, id_base, host=sut.host, port=sut.port, batch=args.batch, window=args.window,
                     label="authcore")  # fmt: skip
        r = L.drive(spec, progress)
    r["config"] = f"binary, frames of {args.batch}, {args.window} in flight/conn, sync always, fraud rules on"
    r["version"] = "this tree"
    return r


def run_postgresql(args, wl, id_base, progress, log) -> dict:
    import postgres

    with postgres.PostgresServer(log) as srv:
        srv.setup_accounts(wl.accounts)
        spec = _spec(args, wl, id_base, host="127.0.0.1", port=srv.port, codec_options={"dsn": srv.dsn},
                     worker=postgres.pg_worker_main, batch=1, window=1, label="postgresql")  # fmt: skip
        r = L.drive(spec, progress)
        r["version"] = srv.version.split()[0]
    r["config"] = "psycopg 3 async, 1 transaction in flight/conn, fsync on, synchronous_commit on"
    return r


def run_redis(args, wl, id_base, progress, log, pipeline: int) -> dict:
    import redis_peer

    with redis_peer.RedisServer(log) as srv:
        srv.setup_accounts(wl.accounts)
        spec = _spec(args, wl, id_base, host="127.0.0.1", port=srv.port, codec="redis_peer:RespCodec",
                     sys_path=[str(_here)], batch=pipeline, window=1, label=f"redis pipeline {pipeline}")  # fmt: skip
        r = L.drive(spec, progress)
        r["version"] = srv.version
    r["config"] = f"Lua function (FCALL), pipelines of {pipeline}, appendonly yes, appendfsync always"
    return r


def compare(args: argparse.Namespace, log=print) -> dict[str, dict]:
    wl = L.Workload(accounts=args.accounts, skew=args.skew, mix=tuple(L.parse_mix(mix).items()), seed=args.seed)
    id_base = L.new_id_base(10**10)  # one block: every system sees the same ids
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"--systems: unknown {', '.join(sorted(unknown))} (known: {', '.join(SYSTEMS)})")
    if not args.no_install:
        common.ensure_packages([p for s, p in (("postgresql", "postgresql"), ("redis", "redis-server")) if s in systems], log)
    results: dict[str, dict] = {}
    for s in systems:
        if s == "authcore":
            log("authcore ...")
            results["authcore"] = run_authcore(args, wl, id_base, progress, log)
        elif s == "postgresql":
            log("postgresql ...")
            results["postgresql"] = run_postgresql(args, wl, id_base, progress, log)
        else:
            for i, p in enumerate(int(x) for x in args.redis_pipeline.split(",")):
                key = "redis" if i == 0 else f"redis_pipeline_{p}"
                log(f"redis (pipelines of {p}) ...")
                results[key] = run_redis(args, wl, id_base, progress, log, p)
    return results


# --- presentation (tested on fake results) ------------------------------------------------


def summary(results: dict[str, dict]) -> dict[str, dict]:
    """The JSON object: per system throughput, p50_us, p99_us (+ ratio to authcore)."""
    base = results.get("authcore", {}).get("throughput")
    out = {}
    for name, r in results.items():
        row = {k: r[k] for k in ("throughput", "p50_us", "p99_us", "p999_us", "errors") if k in r}
        if base and name != "authcore" and r.get("throughput"):
            row["authcore_ratio"] = round(base / r["throughput"], 1)
        out[name] = row
    return out


def _ms(us: float) -> str:
    return f"{us / 1000:,.2f} ms"


def label(name: str, r: dict) -> str:
    """``redis_pipeline_512`` + version -> ``redis 7.0.15 (pipelines of 512)``."""
    system, _, depth = name.partition("_pipeline_")
    version = f" {r['version']}" if r.get("version") and r["version"] != "this tree" else ""
    return f"{system}{version}" + (f" (pipelines of {depth})" if depth else "")


def markdown_table(results: dict[str, dict]) -> str:
    base = results.get("authcore", {}).get("throughput")
    lines = [
        "| system | throughput (authorisations/s) | p50 | p99 | authcore's throughput is | errors | configuration |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        ratio = "1×" if name == "authcore" else (f"{base / r['throughput']:,.1f}×" if base and r.get("throughput") else "—")
        lines.append(
            f"| {label(name, r)} | {r['throughput']:,} | {_ms(r['p50_us'])} | {_ms(r['p99_us'])} | {ratio} | "
            f"{r.get('errors', 0):,} | {r.get('config', '')} |"
        )
    return "\n".join(lines)


def results_section(results: dict[str, dict], machine: dict, argv: list[str], options: dict) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(["python bench/peers/compare.py", *argv])
    shared = " (shared with other work: the load average was above 1 before the run)" if machine["load_avg_1m"] > 1 else ""
    return "\n".join([
        f"### Comparison, {when}",
        "",
        f"`{cmd}`: {options['duration']:g} s measured per system after {options['warmup']:g} s of warm-up, "
        f"{options['connections']} connections from {options['processes']} processes, {options['accounts']:,} accounts "
        f"({options['skew']}), mix {mix}; the same ids, accounts and amounts for every system.",
        "",
        f"Machine: {machine['cpus']} CPUs{shared}, load average {machine['load_avg_1m']} at the start, "
        f"4 KiB write + fdatasync {machine['fdatasync_ms']} ms, Python {machine['python']}, Linux {machine['kernel']}.",
        "",
        markdown_table(results),
        "",
    ])  # fmt: skip


def print_table(results: dict[str, dict], file: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    base = results.get("authcore", {}).get("throughput")
    t = Table(title="durable authorisations, same workload, same machine")
    for col, just in (("system", "left"), ("throughput /s", "right"), ("p50", "right"), ("p99", "right"),
                      ("authcore is", "right"), ("errors", "right")):  # fmt: skip
        t.add_column(col, justify=just)
    for name, r in results.items():
        ratio = "1×" if name == "authcore" else (f"{base / r['throughput']:,.1f}×" if base and r.get("throughput") else "—")
        t.add_row(name, f"{r['throughput']:,}", _ms(r["p50_us"]), _ms(r["p99_us"]), ratio, f"{r.get('errors', 0):,}")
    Console(file=file, width=110).print(t)


def append_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    marker = "## Side by side: PostgreSQL and Redis"
    if marker not in text:
        text = text.rstrip("\n") + f"\n\n{marker}\n\nAppended by `python bench/peers/compare.py`, newest last.\n"
    path.write_text(text.rstrip("\n") + "\n\n" + section)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=duration_default_s, help="seconds measured per system")
    p.add_argument("--warmup", type=float, default=warmup_default_s)
    p.add_argument("--accounts", type=int, default=accounts_default)
    p.add_argument("--skew", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--connections", type=int, default=connections_default)
    p.add_argument("--processes", type=int, default=processes_default)
    p.add_argument("--batch", type=int, default=authcore_batch_default, help="authcore: requests per binary frame")
    p.add_argument("--window", type=int, default=authcore_window_default, help="authcore: frames in flight per connection")
    p.add_argument("--redis-pipeline", default=redis_pipelines_default, help="FCALLs per pipeline; a comma list runs each")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--seed", type=int, default=20240917)
    p.add_argument("--results", default=str(results_default), help="markdown file the table is appended to ('' = none)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install missing peers")
    p.add_argument("--json", action="store_true", help="last line: one JSON object keyed by system")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"compare: {msg}", file=sys.stderr, flush=True)

    machine = machine_info()
    results = compare(args, log)
    print_table(results, sys.stderr if args.json else sys.stdout)
    if args.results:
        options = {k: getattr(args, k) for k in ("duration", "warmup", "connections", "processes", "accounts", "skew")}
        append_results(Path(args.results), results_section(results, machine, argv, options))
        log(f"table appended to {args.results}")
    if args.json:
        print(orjson.dumps(summary(results)).decode(), flush=True)
    return 1 if any(r.get("errors") for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
