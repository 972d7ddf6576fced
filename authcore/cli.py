"""The ``authcore`` command (SPEC §9): serve, verify, replay, backtest, bench.

Goals: ``authcore serve`` runs with everything defaulted; its first line on
stdout is the JSON ``{"listening": {...}}`` with the ports actually bound,
and every log line goes to stderr, so scripts can start it with port 0 and
read where it listens.  ``verify``/``replay``/``backtest`` are thin wrappers
over ``authcore.storage``.  ``bench`` is a small, honest closed-loop load
driver (binary frames or pipelined JSON lines) printing one JSON line; the
full load tester (open loop, mixes, processes, plots) is issue 6.

Exit codes: 0 success, 1 corruption or failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from . import server as srv

log = logging.getLogger("authcore.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
spawn_timeout_seconds = 60.0  # a started server must print its ports by then
bench_requests_default = 200_000
bench_accounts_default = 100_000
bench_batch_default = 8192  # binary: records per frame; JSON: lines per write
bench_window_default = 4  # binary frames / JSON writes in flight
bench_seed = 20240917  # fixed: a run is reproducible
bench_base_id = 1 << 40  # request ids of the measured phase start here
bench_currency = 840
bench_deposit = 10**12  # every bench account can pay for any run


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_config(path: str | None):
    from .config import Config, ConfigError

    try:
        return Config.from_toml(path) if path else Config.default()
    except ConfigError as e:
        print(f"authcore: configuration error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _run(coro) -> Any:
    """Run a coroutine on uvloop (the loop policy of every authcore process)."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(coro)


# --- serve ------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    ports = {"binary": args.port, "json": args.json_port, "iso8583": args.iso_port, "metrics": args.metrics_port}
    try:
        return _run(srv.serve(args.data, config, host=args.host, ports=ports, truncate_corrupt=args.truncate_corrupt))
    except Exception as e:  # port in use, corrupt log (file and offset), directory locked
        log.error("cannot serve: %s", e)
        return EXIT_FAILURE


# --- verify / replay / backtest -----------------------------------------------


def _report_dict(result: Any) -> dict[str, Any] | None:
    if isinstance(result, dict):
        return result
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return None


def _storage_call(name: str, *a: Any, as_json: bool = False) -> int:
    """Run a storage tool; print its digest (or report) on stdout.

    verify and replay print the digest alone on stdout's first line (so
    ``authcore verify`` and ``authcore replay`` can be compared with diff);
    the report goes to stderr, or to stdout as one JSON line with --json.
    """
    from . import storage

    try:
        result = getattr(storage, name)(*a)
    except Exception as e:  # corruption names file and offset; never a traceback
        print(f"authcore {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    report = _report_dict(result)
    digest = result if isinstance(result, str) else getattr(result, "digest", None)
    if as_json:
        print(orjson.dumps(report if report is not None else {"digest": digest}, default=str).decode())
    elif digest is not None:
        print(digest)
        if report is not None:
            print(orjson.dumps(report, default=str).decode(), file=sys.stderr)
    else:
        print(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2).decode())
    ok = getattr(result, "ok", True)
    if not ok:
        problems = getattr(result, "problems", None)
        print(f"authcore {name}: FAILED {problems or ''}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_verify(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        print(f"authcore verify: {args.data}: no such directory", file=sys.stderr)
        return EXIT_FAILURE
    return _storage_call("verify", args.data, as_json=args.json)


def cmd_replay(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        print(f"authcore replay: {args.data}: no such directory", file=sys.stderr)
        return EXIT_FAILURE
    return _storage_call("replay", args.data, as_json=args.json)


def cmd_backtest(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        print(f"authcore backtest: {args.data}: no such directory", file=sys.stderr)
        return EXIT_FAILURE
    config = _load_config(args.config)
    return _storage_call("backtest", args.data, config, as_json=args.json)


# --- spawning a server (bench, tests) -------------------------------------------


def spawn_server(
    data_dir: str | os.PathLike,
    *,
    config_path: str | None = None,
    host: str = "127.0.0.1",
    extra: list[str] | None = None,
    stderr: Any = None,
    cpus: tuple[int, ...] | None = None,
) -> tuple[subprocess.Popen, dict[str, int]]:
    """Start ``python -m authcore serve`` on free ports; returns (process, ports).
    ``cpus``: the server and every thread it starts run on these CPUs only."""
    cmd = [sys.executable, "-m", "authcore", "serve", "--data", str(data_dir), "--host", host]
    cmd += ["--port", "0", "--json-port", "0", "--iso-port", "0", "--metrics-port", "0"]
    if config_path:
        cmd += ["--config", str(config_path)]
    cmd += extra or []
    env = dict(os.environ)
    # The child imports this very package, installed or not.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # before exec: every thread inherits it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, preexec_fn=pin)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(spawn_timeout_seconds):
            proc.kill()
            raise RuntimeError("server did not print its ports in time")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"server exited with {proc.returncode} before listening")
    return proc, orjson.loads(line)["listening"]


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM and wait: the server drains and exits 0."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


# --- bench -------------------------------------------------------------------


def _percentiles(hist) -> dict[str, float]:
    return {
        "p50_us": hist.get_value_at_percentile(50.0),
        "p90_us": hist.get_value_at_percentile(90.0),
        "p99_us": hist.get_value_at_percentile(99.0),
        "p999_us": hist.get_value_at_percentile(99.9),
        "max_us": hist.get_max_value(),
    }


def bench_requests(n: int, accounts: int, seed: int = bench_seed, base_id: int = bench_base_id) -> np.ndarray:
    """n authorisations spread uniformly over accounts 1..accounts."""
    from .constants import REQUEST_DTYPE, Channel, Op

    rng = np.random.default_rng(seed)
    r = np.zeros(n, REQUEST_DTYPE)
    r["id"] = base_id + np.arange(n, dtype=np.uint64)
    r["op"] = Op.authorize
    r["account"] = rng.integers(1, accounts + 1, n, dtype=np.uint64)
    r["to"] = 900_000_000  # the merchant
    r["amount"] = rng.integers(500, 20_000, n)
    r["currency"] = bench_currency
    r["mcc"] = 5411
    r["country"] = bench_currency
    r["channel"] = Channel.online
    return r


def bench_setup(host: str, binary_port: int, accounts: int, base_id: int = 1) -> None:
    """Open and fund the bench accounts over the binary protocol (idempotent)."""
    from .client import Client
    from .constants import REQUEST_DTYPE, Kind, Op, limit_max

    ids = np.arange(1, accounts + 1, dtype=np.uint64)
    opens = np.zeros(accounts, REQUEST_DTYPE)
    opens["id"] = base_id + ids - 1
    opens["op"] = Op.open
    opens["account"] = ids
    opens["currency"] = bench_currency
    opens["kind"] = Kind.wallet
    opens["amount"] = 0  # credit limit
    deps = np.zeros(accounts, REQUEST_DTYPE)
    deps["id"] = base_id + accounts + ids - 1
    deps["op"] = Op.deposit
    deps["account"] = ids
    deps["amount"] = min(bench_deposit, limit_max)
    with Client(host, binary_port, "binary") as c:
        c.submit(opens)
        c.submit(deps)


def _drive(sock: socket.socket, chunks: list[bytes], counts: list[int], decode, window: int, hist) -> tuple[float, list]:
    """Closed loop: keep ``window`` chunks in flight; latency per chunk."""
    sock.setblocking(False)
    sent_at: list[float] = [0.0] * len(chunks)
    next_send = 0
    answered = 0  # requests answered
    chunk_done = 0  # chunks fully answered
    done_in_chunk = 0
    outbox = memoryview(b"")
    results: list = []
    total = sum(counts)
    t0 = time.perf_counter()
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while answered < total:
            while next_send < len(chunks) and next_send - chunk_done < window and not outbox:
                outbox = memoryview(chunks[next_send])
                sent_at[next_send] = time.perf_counter()
                next_send += 1
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if outbox else 0)
            sel.modify(sock, want)
            for _k, mask in sel.select(30.0) or [(None, 0)]:
                if mask == 0:
                    raise TimeoutError("bench: no progress for 30 s")
                if mask & selectors.EVENT_WRITE and outbox:
                    try:
                        k = sock.send(outbox)
                        outbox = outbox[k:]
                    except BlockingIOError:
                        pass
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 20)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise ConnectionError("server closed the connection")
                    got = decode(data)
                    now = time.perf_counter()
                    results.extend(got)
                    k = sum(len(g) if isinstance(g, np.ndarray) else 1 for g in got)
                    answered += k
                    while k:
                        take = min(k, counts[chunk_done] - done_in_chunk)
                        hist.record_value(max(1, int((now - sent_at[chunk_done]) * 1e6)), take)
                        done_in_chunk += take
                        k -= take
                        if done_in_chunk == counts[chunk_done]:
                            chunk_done += 1
                            done_in_chunk = 0
    return time.perf_counter() - t0, results


def bench_binary(host: str, port: int, reqs: np.ndarray, batch: int, window: int) -> dict:
    from hdrh.histogram import HdrHistogram

    from .client import Client, _FrameDecoder, _frame_answers
    from .constants import Status
    from .protocols import binary as wire

    c = Client(host, port, "binary")
    frame_records = min(batch, c.frame_records)
    chunks, counts = [], []
    for i, lo in enumerate(range(0, len(reqs), frame_records)):
        part = reqs[lo : lo + frame_records]
        chunks.append(wire.frame(wire.FrameType.requests, part.tobytes(), i + 1))
        counts.append(len(part))
    dec = _FrameDecoder()
    hist = HdrHistogram(1, 60_000_000, 3)
    assert c.sock is not None
    seconds, frames = _drive(c.sock, chunks, counts, lambda d: [_frame_answers(f) for f in dec.feed(d)], window, hist)
    c.close()
    answers = np.concatenate(frames)
    st = np.bincount(answers["status"], minlength=len(Status))
    return {
        "protocol": "binary",
        "requests": len(reqs),
        "seconds": round(seconds, 4),
        "throughput": round(len(reqs) / seconds),
        "authorisations_per_s": round(len(reqs) / seconds),
        **_percentiles(hist),
        "errors": int(st[Status.unavailable] + st[Status.bad_request]),
        "statuses": {Status(i).name: int(v) for i, v in enumerate(st) if v},
        "batch": frame_records,
        "window": window,
    }


def bench_json(host: str, port: int, reqs: np.ndarray, batch: int, window: int) -> dict:
    from hdrh.histogram import HdrHistogram

    from .constants import Channel, Op

    ops = {int(o): o.name for o in Op}
    chans = {int(c): c.name for c in Channel}
    lines = [
        orjson.dumps(
            {
                "op": ops[int(r["op"])], "id": int(r["id"]), "account": int(r["account"]), "amount": int(r["amount"]),
                "currency": int(r["currency"]), "merchant": int(r["to"]), "mcc": int(r["mcc"]),
                "channel": chans[int(r["channel"])], "country": int(r["country"]),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        for r in reqs
    ]  # fmt: skip
    chunks, counts = [], []
    for lo in range(0, len(lines), batch):
        chunks.append(b"".join(lines[lo : lo + batch]))
        counts.append(len(lines[lo : lo + batch]))
    buf = [b""]

    def decode(data: bytes) -> list:
        data = buf[0] + data
        parts = data.split(b"\n")
        buf[0] = parts.pop()
        return parts

    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hist = HdrHistogram(1, 60_000_000, 3)
    seconds, out = _drive(sock, chunks, counts, decode, window, hist)
    sock.close()
    statuses: dict[str, int] = {}
    for line in out:
        s = orjson.loads(line)["status"]
        statuses[s] = statuses.get(s, 0) + 1
    return {
        "protocol": "json",
        "requests": len(reqs),
        "seconds": round(seconds, 4),
        "throughput": round(len(reqs) / seconds),
        "authorisations_per_s": round(len(reqs) / seconds),
        **_percentiles(hist),
        "errors": statuses.get("unavailable", 0) + statuses.get("bad_request", 0),
        "statuses": statuses,
        "batch": batch,
        "window": window,
    }


def run_bench(
    *,
    target: str | None,
    protocol: str,
    requests: int,
    accounts: int,
    batch: int,
    window: int,
    sync: str,
    seed: int = bench_seed,
) -> dict:
    """Start a server (or use ``target``), set up accounts, drive, measure."""
    proc = None
    tmp = None
    try:
        if target:
            host, _, port_s = target.rpartition(":")
            port = int(port_s)
            # --target names the port of the chosen protocol; accounts are set
            # up over JSON when that is all we know of the server.
            ports = {protocol: port}
        else:
            tmp = tempfile.TemporaryDirectory(prefix="authcore-bench-")
            cfg = Path(tmp.name) / "bench.toml"
            cfg.write_text(f'[durability]\nsync = "{sync}"\n')
            proc, ports = spawn_server(Path(tmp.name) / "data", config_path=str(cfg))
            host = "127.0.0.1"
        if "binary" in ports:
            bench_setup(host, ports["binary"], accounts)
        else:
            _setup_over_json(host, ports["json"], accounts)
        reqs = bench_requests(requests, accounts, seed)
        if protocol == "binary":
            result = bench_binary(host, ports["binary"], reqs, batch, window)
        else:
            result = bench_json(host, ports["json"], reqs, batch, window)
        result.update({"accounts": accounts, "sync": sync if not target else "target", "seed": seed, "mode": "closed_loop"})
        return result
    finally:
        if proc is not None:
            stop_server(proc)
        if tmp is not None:
            tmp.cleanup()


def _setup_over_json(host: str, port: int, accounts: int) -> None:
    from .client import Client

    with Client(host, port, "json") as c:
        ids = range(1, accounts + 1)
        c.batch([{"op": "open", "id": i, "account": i, "currency": bench_currency, "kind": "wallet"} for i in ids])
        c.batch([{"op": "deposit", "id": accounts + i, "account": i, "amount": bench_deposit} for i in ids])


def cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(
        target=args.target,
        protocol=args.protocol,
        requests=args.requests,
        accounts=args.accounts,
        batch=args.batch,
        window=args.window,
        sync=args.sync,
    )
    print(orjson.dumps(result).decode(), flush=True)
    return EXIT_OK


# --- argument parsing -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="authcore", description="Transaction authorisation core")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error (logs go to stderr)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (SPEC §9)")
    s.add_argument("--data", default=srv.default_data_dir, help="data directory (log, snapshots, PAN key)")
    s.add_argument("--host", default=srv.default_host)
    s.add_argument("--port", type=int, default=srv.default_ports["binary"], help="binary protocol port")
    s.add_argument("--json-port", type=int, default=srv.default_ports["json"])
    s.add_argument("--iso-port", type=int, default=srv.default_ports["iso8583"])
    s.add_argument("--metrics-port", type=int, default=srv.default_ports["metrics"])
    s.add_argument("--config", default=None, help="TOML configuration file")
    s.add_argument(
        "--truncate-corrupt",
        action="store_true",
        help="cut the log at the first corrupt record instead of refusing to start (loses what follows)",
    )
    s.set_defaults(func=cmd_serve)

    v = sub.add_parser("verify", help="check snapshots and log, print the state digest")
    v.add_argument("--data", default=srv.default_data_dir)
    v.add_argument("--json", action="store_true", help="print the whole report as one JSON line")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("replay", help="rebuild state from the log alone, print the digest")
    r.add_argument("--data", default=srv.default_data_dir)
    r.add_argument("--json", action="store_true", help='print {"digest": ...} as one JSON line')
    r.set_defaults(func=cmd_replay)

    b = sub.add_parser("backtest", help="replay the log under other fraud settings, report changed decisions")
    b.add_argument("--data", default=srv.default_data_dir)
    b.add_argument("--config", required=True, help="the TOML with the settings to try")
    b.add_argument("--json", action="store_true", help="print the report as one JSON line (default: indented)")
    b.set_defaults(func=cmd_backtest)

    n = sub.add_parser("bench", help="load tester: drive a server (or one it starts), print throughput and latency")
    from . import loadgen  # issue 6: the options and the run live there

    loadgen.add_arguments(n)
    n.set_defaults(func=loadgen.cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
