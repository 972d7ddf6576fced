"""PostgreSQL as the authorisation store: one durable transaction per request.

Goals:
- The same authorisation as authcore's hot path (SPEC §4 funds check with
  idempotency), as a payments team would write it on PostgreSQL: one
  statement, so one transaction and one round trip, holding a conditional
  UPDATE of the account (``balance + credit_limit - held >= amount``, the
  row lock serialises concurrent holds) and the INSERT of the answer keyed
  by the request id (the idempotency record, which is also the hold).  A
  repeated id violates the primary key, the whole statement rolls back (so
  the hold is not taken twice) and the client reads the stored answer.
- Durable like authcore with ``sync = "always"``: ``fsync = on``,
  ``synchronous_commit = on`` (the defaults, asserted), WAL flushed before
  each commit returns; concurrent commits share flushes (group commit).
- Driver: psycopg 3 (``psycopg[binary]``), async, autocommit, server-side
  prepared statements; each process runs its connections as coroutines,
  each with one transaction in flight (a transaction waits for its WAL
  flush; pipelining on one connection cannot share a flush).  Latency is
  recorded into the same HDR buckets as authcore's run.

Non-goals: captures, voids, fraud rules, daily limits (authcore does all of
these in the same run), tuning PostgreSQL beyond memory settings.
"""

from __future__ import annotations

import asyncio
import collections
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from authcore import loadgen as L
from authcore.constants import Op

import common

user = "postgres"  # Debian's package creates it; initdb refuses to run as root
database = "postgres"
connections_max = 300
server_settings = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "512MB",
    "wal_buffers": "16MB",
    "max_wal_size": "4GB",  # no forced checkpoint inside a 10-second run
    "checkpoint_timeout": "30min",
    "max_connections": str(connections_max),
    "listen_addresses": "127.0.0.1",
}

SCHEMA = """
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    currency integer NOT NULL,
    status smallint NOT NULL DEFAULT 0,
    balance bigint NOT NULL DEFAULT 0,
    credit_limit bigint NOT NULL DEFAULT 0,
    held bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 80);
CREATE TABLE answers (
    id bigint PRIMARY KEY,
    account bigint NOT NULL,
    amount bigint NOT NULL,
    status smallint NOT NULL,
    available bigint
);
"""

# One statement: conditional hold + idempotency insert, atomically.
AUTHORIZE = """
WITH upd AS (
    UPDATE accounts SET held = held + %(amount)s
     WHERE id = %(account)s AND currency = %(currency)s AND status = 0
       AND balance + credit_limit - held >= %(amount)s
    RETURNING balance + credit_limit - held AS available)
INSERT INTO answers (id, account, amount, status, available)
SELECT %(id)s, %(account)s, %(amount)s, CASE WHEN upd.available IS NULL THEN 5 ELSE 0 END, upd.available
  FROM (SELECT 1) AS one LEFT JOIN upd ON true
RETURNING status
"""
ANSWER = "SELECT status FROM answers WHERE id = %(id)s"
STATUS_NAMES = {0: "approved", 5: "insufficient_funds"}


class PostgresServer:
    """A throw-away cluster: initdb into a temporary directory, pg_ctl start."""

    def __init__(self, log=print):
        self.log = log
        self.tmp: str | None = None
        self.started = False

    def _as_user(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess:
        pw = pwd.getpwnam(user)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)

        def demote() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

        r = subprocess.run(list(cmd), preexec_fn=demote if os.geteuid() == 0 else None, text=True, **kw)
        if r.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def __enter__(self) -> "PostgresServer":
        common.ensure_packages(["postgresql"], self.log)
        bin_dir = common.pg_bin_dir()
        assert bin_dir is not None
        self.tmp = tempfile.mkdtemp(prefix="authcore-peer-pg-")
        pw = pwd.getpwnam(user)
        os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        data = Path(self.tmp) / "data"
        self.port = common.free_port()
        self._as_user(str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = " ".join(f"-c {k}={v}" for k, v in server_settings.items())
        opts += f" -p {self.port} -k {self.tmp}"
        self._as_user(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(Path(self.tmp) / "server.log"), "-o", opts,
                      "-w", "-t", str(int(common.start_timeout_s)), "start")  # fmt: skip
        self.started = True
        self.bin_dir = bin_dir
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as c:
            self.version = c.execute("SHOW server_version").fetchone()[0]
            for k in ("fsync", "synchronous_commit"):
                v = c.execute(f"SHOW {k}").fetchone()[0]
                assert v == "on", (k, v)
            c.execute(SCHEMA)
        return self

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={database}"

    def setup_accounts(self, accounts: int, currency: int = L.currency_default) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as c:
            with c.cursor().copy("COPY accounts (id, currency, credit_limit) FROM STDIN") as cp:
                for a in range(1, accounts + 1):
                    cp.write_row((a, currency, L.credit_default))
                for i in range(L.decline_accounts):
                    cp.write_row((L.decline_account_base + i, currency, 0))
            c.execute("VACUUM ANALYZE accounts")
            c.execute("CHECKPOINT")

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.started:
                data = Path(self.tmp) / "data"
                self._as_user(str(self.bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)


# --- the load: a loadgen worker speaking SQL -------------------------------------------


def pg_worker_main(spec: L.WorkerSpec, pipe: Any) -> None:
    """loadgen's worker protocol (ready, go, progress, done) over psycopg."""
    try:
        result = asyncio.run(_PgWorker(spec, pipe).run())
        pipe.send(("done", result))
    except BaseException as e:
        pipe.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        pipe.close()


class _PgWorker:
    def __init__(self, spec: L.WorkerSpec, pipe: Any):
        self.spec = spec
        self.pipe = pipe
        self.lat = L.Latencies()
        self.answered = 0
        self.answered_window = 0
        self.auth_window = 0
        self.errors = 0
        self.statuses: collections.Counter = collections.Counter()
        self.sent = 0
        self.t_first = float("inf")
        self.t_last = 0.0
        self.tl_answers: list[int] = []
        self.tl_max_us: list[int] = []

    async def run(self) -> dict:
        import psycopg

        s = self.spec
        dsn = s.codec_options["dsn"]
        conns = []
        for c in s.conns:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
            pattern = L.build_pattern(s.workload, s.pattern_n, c)
            if not np.isin(pattern.records["op"], [Op.authorize]).all():
                raise ValueError("the PostgreSQL peer implements authorisations only")
            conns.append((c, conn, pattern))
        self.pipe.send(("ready", None))
        kind, t_start = self.pipe.recv()
        assert kind == "go"
        self.t_start = t_start
        self.w0 = t_start + s.warmup
        self.w1 = self.w0 + s.duration if s.duration is not None else float("inf")
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        reporter = asyncio.ensure_future(self._report())
        k = len(conns)
        quotas = [None if s.requests is None else s.requests // k + (1 if i < s.requests % k else 0) for i in range(k)]
        try:
            await asyncio.gather(*(self._connection(c, conn, p, q) for (c, conn, p), q in zip(conns, quotas)))
        finally:
            reporter.cancel()
            for _c, conn, _p in conns:
                await conn.close()
        keys, counts = L.Latencies.compact(self.lat.counts)
        return {
            "keys": keys, "counts": counts, "max_us": self.lat.max_us, "answered": self.answered,
            "answered_window": self.answered_window, "auth_window": self.auth_window,
            "measured": int(self.lat.counts.sum()), "errors": self.errors, "lost": 0,
            "statuses": dict(self.statuses), "t_first": self.t_first, "t_last": self.t_last, "sent": self.sent,
            "tl_answers": self.tl_answers, "tl_max_us": self.tl_max_us,
        }  # fmt: skip

    async def _connection(self, c: int, conn: Any, p: L.Pattern, quota: int | None) -> None:
        import psycopg

        s = self.spec
        n = p.n
        C = s.conns_total
        rel = p.records["id"].astype(np.int64).tolist()
        accounts = p.records["account"].astype(np.int64).tolist()
        amounts = p.records["amount"].tolist()
        currencies = p.records["currency"].tolist()
        is_auth = np.isin(p.kind, L.AUTHORISATION_KINDS).tolist()
        cur = conn.cursor()
        i = 0
        measured_sent = 0
        while True:
            t = time.perf_counter()
            if t >= self.w1:
                break
            measured = t >= self.w0
            if measured and quota is not None:
                if measured_sent >= quota:
                    break
                measured_sent += 1
            cycle, pos = divmod(i, n)
            args = {"id": s.id_base + (cycle * n + rel[pos]) * C + c, "account": accounts[pos],
                    "amount": amounts[pos], "currency": currencies[pos]}  # fmt: skip
            try:
                await cur.execute(AUTHORIZE, args)
                status = (await cur.fetchone())[0]
            except psycopg.errors.UniqueViolation:
                await cur.execute(ANSWER, args)
                status = (await cur.fetchone())[0]
            except psycopg.Error as e:
                self.errors += 1
                self.statuses[type(e).__name__] += 1
                status = None
            done = time.perf_counter()
            sec = int(done - self.t_start)
            while len(self.tl_answers) <= sec:
                self.tl_answers.append(0)
                self.tl_max_us.append(0)
            self.tl_answers[sec] += 1
            if measured:
                self.tl_max_us[sec] = max(self.tl_max_us[sec], int((done - t) * 1e6))
            i += 1
            self.sent += 1
            self.answered += 1
            if status is not None:
                self.statuses[STATUS_NAMES.get(status, f"status_{status}")] += 1
            if measured:
                self.lat.add((done - t) * 1e6, 1)
                self.t_first = min(self.t_first, t)
                self.t_last = done
            if self.w0 <= done < self.w1:
                self.answered_window += 1
                self.auth_window += is_auth[pos]

    async def _report(self) -> None:
        reported = np.zeros(L.hdr_keys, np.int64)
        while True:
            await asyncio.sleep(L.progress_interval_s)
            delta = self.lat.counts - reported
            reported = self.lat.counts.copy()
            keys, counts = L.Latencies.compact(delta)
            self.pipe.send(("progress", {"answered": self.answered, "keys": keys, "counts": counts}))
