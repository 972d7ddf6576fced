"""Redis as the authorisation store: a Lua function, appendfsync always.

Goals:
- The same authorisation as authcore's hot path (SPEC §4 funds check with
  idempotency), as a payments team would write it on Redis: one server-side
  function per request, so the check and the hold are atomic.  It reads the
  request's idempotency record (a repeat returns the first answer), checks
  currency, status and ``balance + credit - held >= amount``, adds the hold
  and stores the answer with the request id.
- Durable like authcore with ``sync = "always"``: ``appendonly yes``,
  ``appendfsync always`` (Redis fsyncs the AOF before it answers the
  commands of an event-loop turn), no RDB snapshots.
- A client that is not the bottleneck: the load goes through authcore's own
  load generator (same processes, connections, streams and HdrHistogram
  measurement as authcore's run) speaking RESP directly, with pipelines of
  ``batch`` FCALLs and ``window`` pipelines in flight per connection.  Each
  command is a pre-rendered template with the request id patched in, and
  each reply is one RESP line.  redis-py (with its hiredis parser when
  installed) costs tens of µs of Python per command, which on this 2-core
  machine would measure redis-py, not Redis; it loads the function and the
  accounts.

Non-goals: captures, voids, fraud rules, daily limits (authcore does all of
these in the same run; Redis does only the funds check).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from authcore import loadgen as L
from authcore.constants import Op

import common

LUA = r"""#!lua name=authcore
-- KEYS[1] account hash (balance, credit, held, status, currency)
-- KEYS[2] this request's idempotency record
-- ARGV[1] amount, ARGV[2] currency
-- returns available after the hold (>= 0) or minus authcore's status code
local function authorize(keys, args)
  local prior = redis.call('GET', keys[2])
  if prior then return tonumber(string.match(prior, '^[^|]+')) end
  local amount = tonumber(args[1])
  local a = redis.call('HMGET', keys[1], 'balance', 'credit', 'held', 'status', 'currency')
  local answer
  if not a[1] then answer = -11                -- no_account
  elseif a[5] ~= args[2] then answer = -4      -- currency_mismatch
  elseif a[4] ~= '0' then answer = -13         -- account_inactive
  else
    local available = tonumber(a[1]) + tonumber(a[2]) - tonumber(a[3])
    if amount > available then answer = -5     -- insufficient_funds
    else
      redis.call('HINCRBY', keys[1], 'held', amount)
      answer = available - amount
    end
  end
  redis.call('SET', keys[2], answer .. '|' .. keys[1] .. '|' .. args[1])
  return answer
end
redis.register_function('authorize', authorize)
"""

STATUS_OF = {-11: "no_account", -4: "currency_mismatch", -13: "account_inactive", -5: "insufficient_funds"}
setup_pipeline = 10_000  # HSETs per pipeline when loading accounts


class RespCodec(L._TemplateCodec):
    """FCALL authorize over RESP, one template per pattern record."""

    name = "redis"

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        r = self.p.records
        if not np.isin(r["op"], [Op.authorize]).all():
            raise ValueError("the Redis peer implements authorisations only (use --mix authorize,duplicate,decline)")
        parts = []
        starts = [0]
        offs = []
        size = 0
        for i in range(self.p.n):
            akey = f"a:{int(r['account'][i])}".encode()
            amount = str(int(r["amount"][i])).encode()
            cur = str(int(r["currency"][i])).encode()
            head = b"*7\r\n$5\r\nFCALL\r\n$9\r\nauthorize\r\n$1\r\n2\r\n" + b"$%d\r\n%s\r\n" % (len(akey), akey)
            head += b"$%d\r\nr:" % (L.id_digits + 2)
            offs.append(size + len(head))
            cmd = head + b"0" * L.id_digits + b"\r\n" + b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(amount), amount, len(cur), cur)
            parts.append(cmd)
            size += len(cmd)
            starts.append(size)
        self.buf = np.frombuffer(b"".join(parts), np.uint8)
        self.starts = np.array(starts, np.int64)
        self.patches = [(np.arange(self.p.n), np.array(offs, np.int64), False, L.id_digits, 0)]
        self.partial = b""

    def feed(self, data: bytes) -> int:
        if self.partial:
            data = self.partial + data
        cut = data.rfind(b"\r\n") + 2
        if cut < 2:
            self.partial = data
            return 0
        chunk, self.partial = data[:cut], data[cut:]
        n = chunk.count(b"\r\n")
        odd = chunk.count(b"\n-") + chunk.count(b":-") + chunk.startswith(b"-")
        if not odd:
            self.statuses["approved"] += n
            return n
        for line in chunk.split(b"\r\n")[:-1]:
            if line.startswith(b":"):
                v = int(line[1:])
                self.statuses["approved" if v >= 0 else STATUS_OF.get(v, f"status_{-v}")] += 1
            else:
                self.statuses["error"] += 1
                self.errors += 1
        return n


class RedisServer:
    """redis-server on 127.0.0.1, its AOF in a temporary directory."""

    def __init__(self, log=print):
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "RedisServer":
        common.ensure_packages(["redis-server"], self.log)
        self.tmp = tempfile.TemporaryDirectory(prefix="authcore-peer-redis-")
        self.port = common.free_port()
        cmd = [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.tmp.name,
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", str(Path(self.tmp.name) / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        common.wait_port(self.port, self.proc)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        cfg = self.client.config_get("append*")
        assert cfg.get("appendonly") == "yes" and cfg.get("appendfsync") == "always", cfg
        self.version = self.client.info("server")["redis_version"]
        self.client.function_load(LUA, replace=True)
        return self

    def setup_accounts(self, accounts: int, currency: int = L.currency_default) -> None:
        """The same accounts as authcore's run: 1..N with credit, the decline ones without."""
        ids = list(range(1, accounts + 1))
        poor = [L.decline_account_base + i for i in range(L.decline_accounts)]
        pipe = self.client.pipeline(transaction=False)
        for k, (acct, credit) in enumerate([(a, L.credit_default) for a in ids] + [(a, 0) for a in poor]):
            pipe.hset(f"a:{acct}", mapping={"balance": 0, "credit": credit, "held": 0, "status": 0, "currency": currency})
            if k % setup_pipeline == setup_pipeline - 1:
                pipe.execute()
        pipe.execute()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.client.shutdown(nosave=True)
                except Exception:  # shutdown closes the connection under us
                    pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if self.tmp is not None:
                self.tmp.cleanup()
