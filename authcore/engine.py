"""The embedded engine: clock, log and kernel behind one small API.

Goals: the same answers whether a request comes one at a time
(``execute``), as a numpy batch (``submit``), over TCP or from the log
(``replay_batch``); the kernel never sees a clock (the engine stamps each
batch and passes the time in); nothing is decided before the log has made
it durable.  Non-goals: networking (authcore.server) and file formats
(authcore.storage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np

from . import constants as C
from .cards import PanHasher
from .config import Config
from .constants import ANSWER_DTYPE, REQUEST_DTYPE, AccountStatus, HoldState, Kind, Status
from .records import RequestError, answer_json, answers_to_json, requests_from_json, retry_id, retry_probe, with_codes

try:
    from ._kernel import Kernel, populate
except ImportError as e:  # pragma: no cover - a source checkout without a build
    raise ImportError(
        "authcore's Cython kernel is not built: run `pip install -e .` "
        "(or `python setup.py build_ext --inplace`)"
    ) from e

from .wal import Unavailable

growth_warn_seconds = 0.05  # a growth that stops decisions longer than this is logged as a warning
_log = logging.getLogger("authcore.engine")

digest_version = b"authcore-state-v2"  # v2: activity rows packed into whole cache lines
# What `authcore serve` allocates when the config leaves sizes automatic:
# enough for ~20 s of a load test at 1M requests/s without a growth pause
# (a doubling of 2^22 holds stopped the server for ~1 s), and only virtual
# memory until used (calloc): a ring fills from the front, an index as
# entries arrive.
server_sizes_initial = {"accounts": 1 << 20, "holds": 1 << 24, "ids": 1 << 25}


class Log(Protocol):
    def log_batch(self, stamp0: int, requests: np.ndarray) -> None: ...


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class Engine:
    """One shard of accounts: decide, log, remember.

    Single writer: call it from one thread at a time (the server has one
    writer thread; embedded callers own their engine).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Callable[[], int] | None = None,
        pan_key: bytes | None = None,
        presize: bool = False,
    ):
        self.config = config or Config.default()
        self._clock = clock or wall_clock_us
        self._kernel = Kernel(
            self.config.decision_dict(),
            self.config.engine.idempotency_ids_max,
            self.config.engine.holds_retained_max,
            self._initial_sizes(presize),
        )
        self._hasher = PanHasher(pan_key if pan_key is not None else os.urandom(32))
        self._log: Log | None = None
        self.last_stamp = 0
        self.growths = 0  # tables grown while deciding, and the seconds it stopped decisions
        self.growth_seconds = 0.0

    def _initial_sizes(self, presize: bool) -> dict[str, int]:
        """Table sizes at start: configured, else the server's or the minimum."""
        e = self.config.engine
        auto = server_sizes_initial if presize else {}
        return {
            "accounts": e.accounts_initial or auto.get("accounts", C.table_rows_initial),
            "holds": e.holds_initial or auto.get("holds", C.table_rows_initial),
            "ids": e.ids_initial or auto.get("ids", C.table_rows_initial),
        }

    # -- time ------------------------------------------------------------------

    def _stamp(self, n: int) -> int:
        """Stamps for n requests: strictly increasing, never behind the clock."""
        now = int(self._clock())
        stamp0 = max(now, self.last_stamp + 1)
        self.last_stamp = stamp0 + n - 1
        return stamp0

    # -- deciding --------------------------------------------------------------

    def attach_log(self, log: Log | None) -> None:
        self._log = log

    @property
    def hasher(self) -> PanHasher:
        return self._hasher

    def submit(self, requests: np.ndarray, *, codes: bool = False) -> np.ndarray:
        """Decide a batch; durable before it returns when a log is attached.

        Returns ANSWER_DTYPE records (status as a ``Status`` value), or with
        ``codes=True`` ANSWER_CODES_DTYPE: the same plus SPEC §7's ``code``
        and ``auth_code`` columns (made after deciding; the server's hot
        path does without).  Raises ``Unavailable`` when the log cannot make
        the batch durable; then nothing of it was applied.
        """
        if codes:
            return with_codes(self.submit(requests))
        if not isinstance(requests, np.ndarray) or requests.dtype != REQUEST_DTYPE:
            raise TypeError("requests: expected a numpy array of authcore.constants.REQUEST_DTYPE")
        if requests.ndim != 1:
            raise ValueError(f"requests: expected a 1-d array, got shape {requests.shape}")
        n = len(requests)
        if n == 0:
            return np.zeros(0, ANSWER_DTYPE)
        if n > C.batch_count_max:
            raise ValueError(f"requests: {n} in one batch; at most {C.batch_count_max} (one log record each)")
        requests = np.ascontiguousarray(requests)
        # Grow the tables *before* the batch is logged: growth is the only
        # step of deciding that can fail (MemoryError), and a batch that is in
        # the log must be decided, or live state and replay would differ.
        t0 = time.perf_counter()
        grown = self._kernel.reserve(n)
        if grown:
            self._report_growth(grown, time.perf_counter() - t0)
        stamp0 = self._stamp(n)
        if self._log is not None:
            self._log.log_batch(stamp0, requests)
        return self._kernel.decide(requests, stamp0)

    def _report_growth(self, names: list[str], seconds: float) -> None:
        """Growth copies and rehashes a table while no decision is made
        (5.1 s for the id memory at 2^25 on this VM): say so, and how to
        avoid it, every time it happens."""
        self.growths += 1
        self.growth_seconds += seconds
        if seconds < growth_warn_seconds:  # small tables double in microseconds: by design
            return
        sizes = ", ".join(f"{name} -> {len(t):,} rows" for name, t in self._kernel.tables().items() if name in names)
        _log.warning("tables grew while deciding (%s): decisions stopped for %.3f s; size engine.accounts_initial, "
                     "holds_initial and ids_initial for this host's load", sizes, seconds)

    def expect_requests(self, n: int) -> None:
        """Size the id and hold memories for ``n`` requests to come (replay
        knows the log's length); answers are unaffected."""
        self._kernel.grow_memories(n)

    def replay_batch(self, stamp0: int, requests: np.ndarray) -> np.ndarray:
        """Decide a batch that is already in the log, at its logged stamps."""
        assert stamp0 > self.last_stamp, (stamp0, self.last_stamp)
        answers = self._kernel.decide(requests, stamp0)
        self.last_stamp = stamp0 + len(requests) - 1
        return answers

    def execute(self, request: dict) -> dict:
        """One JSON-shaped request, one JSON-shaped answer.

        Raises ``records.RequestError`` for a malformed request (unless it
        repeats a remembered id: then the first answer, SPEC §1) and
        ``Unavailable`` when it cannot be made durable.
        """
        try:
            batch = requests_from_json([request], self._hasher)
        except RequestError:
            rid = retry_id(request)
            if rid is None:
                raise
            # A malformed retry of a known id still gets its first answer (SPEC §1).
            probe = retry_probe(rid)
            answers = self.submit(probe)
            if answers["status"][0] == Status.bad_request:
                raise
            return answers_to_json(probe, answers)[0]
        return answers_to_json(batch, self.submit(batch))[0]

    def execute_many(self, requests: list[dict]) -> list[dict]:
        batch = requests_from_json(requests, self._hasher)
        return answers_to_json(batch, self.submit(batch))

    def query(self, account: int) -> dict:
        return self.execute({"op": "query", "account": account})

    def card_account(self, pan: str) -> int | None:
        """The account a PAN is bound to (looked up by its keyed hash)."""
        h = self._hasher.digest(pan)
        if h == bytes(C.pan_hash_size):
            return None
        return self._kernel.card_account(h)

    def prefault(self) -> None:
        """Fault every table page in now (config ``engine.prefault``)."""
        self._kernel.prefault()

    # -- configuration -----------------------------------------------------

    def set_decision_config(self, decision: dict[str, Any]) -> None:
        """Apply decision settings (from config or a CONFIG log record)."""
        self.config = Config.from_decision_dict(self.config, decision)
        self._kernel.set_rules(self.config.decision_dict())

    def memory_bounds(self) -> dict[str, int]:
        """How much the engine remembers: it decides answers too (a forgotten
        id is decided afresh), so replay must use the logged bounds."""
        return {"idempotency_ids_max": int(self._kernel.remembered_max),
                "holds_retained_max": int(self._kernel.holds_retained_max)}

    def logged_config(self) -> dict[str, Any]:
        """Everything replay needs to decide alike (a CONFIG record's body)."""
        return {"decision": self.config.decision_dict(), "engine": self.memory_bounds()}

    def apply_logged_config(self, doc: dict[str, Any]) -> None:
        """Put a CONFIG record's settings in force."""
        if doc["decision"] != self.config.decision_dict():
            self.set_decision_config(doc["decision"])
        bounds = doc.get("engine") or {}
        if bounds:
            self.config = self.config.replace(engine=dataclasses.replace(self.config.engine, **bounds))
            self._kernel.remembered_max = bounds["idempotency_ids_max"]
            self._kernel.holds_retained_max = bounds["holds_retained_max"]

    # -- state -----------------------------------------------------------------

    def export_state(self, copy: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """A consistent image of the state.  ``copy=False`` returns views,
        each ring as the list of its runs in order (snapshot.write_snapshot
        takes such lists), for a forked snapshot child: its copy-on-write
        pages already freeze the state, and gathering a ring into one array
        there cost a copy of up to GBs."""
        arrays, counters = self._kernel.export_state() if copy else self._kernel.state_views(ring_runs=True)
        meta = {"counters": counters, "last_stamp": self.last_stamp, "decision": self.config.decision_dict(),
                "memory": self.memory_bounds(), "digest_version": digest_version.decode()}
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Install an exported state (copied; ``arrays`` stay the caller's)."""

        def copy_into(dests: dict[str, list[np.ndarray]]) -> None:
            for name, pieces in dests.items():
                flat = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
                at = 0
                for piece in pieces:
                    piece[:] = flat[at : at + len(piece)]
                    at += len(piece)
                assert at == len(flat), name

        self.load_state_from({k: (a.dtype, a.shape) for k, a in arrays.items()}, meta, copy_into)

    def load_state_from(self, specs: dict[str, tuple[Any, tuple[int, ...]]], meta: dict[str, Any],
                        fill: Callable[[dict[str, list[np.ndarray]]], None]) -> None:
        """Install a state whose arrays have ``specs`` (name -> (dtype,
        shape)); ``fill(dests)`` writes each array's bytes into its views
        (a snapshot read straight into the new tables).  If ``fill`` raises,
        the engine is unchanged."""
        layout = meta.get("digest_version")
        if layout != digest_version.decode():
            raise ValueError(f"state layout {layout!r}; this build reads {digest_version.decode()!r}")
        tables, dests = self._kernel.stage_import(specs, meta["counters"])
        last_stamp = int(meta["last_stamp"])
        # A second core faults the new tables in ahead of the reader, in the
        # order it fills them, then the index slots the install fills.
        order = [p for pieces in dests.values() for p in pieces]
        order += [t for name, t in tables.items() if name.endswith("_slots")]
        stop = np.zeros(1, np.uint8)  # set: the helper gives up at its next step
        helper = threading.Thread(target=populate, args=(order, stop), name="authcore-populate", daemon=True)
        helper.start()
        try:
            fill(dests)
        except BaseException:
            stop[0] = 1
            raise
        finally:
            helper.join()
        before = {"decision": self.config.decision_dict(), "engine": self.memory_bounds()}
        try:
            if meta.get("decision"):
                self.apply_logged_config({"decision": meta["decision"], "engine": meta.get("memory")})
            self._kernel.install_import(tables, meta["counters"])
        except BaseException:
            self.apply_logged_config(before)  # the image does not fit these rules: as it was
            raise
        self.last_stamp = last_stamp

    def digest(self) -> str:
        """BLAKE2b-256 of the logical state in canonical order.

        Capacities, index layouts and the clock are excluded, so a live
        engine, a snapshot plus its log tail and a full replay agree.
        """
        arrays, counters = self._kernel.state_views()
        h = hashlib.blake2b(digest_version, digest_size=32)
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            if a.size:
                h.update(memoryview(a).cast("B"))
        h.update(repr(sorted(counters.items())).encode())
        return h.hexdigest()

    def verify(self) -> bool:
        """O(n) invariant checks (held == open holds, balances sum to 0)."""
        return self._kernel.verify()

    # -- introspection (O(n), for tests and tools) ---------------------

    def accounts(self) -> dict[int, dict[str, Any]]:
        arrays, _ = self._kernel.state_views()
        out = {}
        for a in arrays["accounts"]:
            out[int(a["id"])] = {
                "balance": int(a["balance"]),
                "credit_limit": int(a["credit_limit"]),
                "held": int(a["held"]),
                "status": AccountStatus(int(a["status"])).name,
                "kind": Kind(int(a["kind"])).name,
                "currency": int(a["currency"]),
                "single_limit": int(a["single_limit"]),
                "daily_limit": int(a["daily_limit"]),
                "opened_at": int(a["opened_at"]),
            }
        return out

    def holds(self) -> dict[int, dict[str, Any]]:
        arrays, _ = self._kernel.state_views()
        ids = arrays["accounts"]["id"]
        out = {}
        for h in arrays["holds"]:
            out[int(h["id"])] = {
                "account": int(ids[int(h["account"])]),
                "remaining": int(h["remaining"]),
                "captured": int(h["captured"]),
                "refunded": int(h["refunded"]),
                "state": HoldState(int(h["state"])).name,
            }
        return out

    def settlement(self) -> dict[int, int]:
        arrays, _ = self._kernel.state_views()
        s = arrays["settlement"]
        return {int(c): int(s[c]) for c in np.nonzero(s)[0]}

    def counters(self) -> dict[str, int]:
        return self._kernel.counters()


__all__ = ["Engine", "Unavailable", "Status", "answer_json"]
