"""The Cython engine against the reference model, on random workloads.

A hypothesis state machine sends the same random requests (every op, good
and bad: unknown and repeated ids, ids of 0, foreign currencies, amounts at
and beyond the bounds, merchants that are accounts, PANs valid and not) to
``Engine`` and ``tests/model.Model`` sharing one injected clock, and
requires identical answer dicts.  Time moves by small and large steps and
jumps to exact window edges (stamp + window - 1/0/+1), under configs with
tiny windows and a short hold_ttl, so velocity, card_testing,
merchant_burst, new_account, daily limits across UTC midnight and hold
expiry all get exercised.  After every step the state introspection must
match and the invariants hold (held == open holds, balances sum to zero per
currency, available >= 0 unless credit was lowered or a refund debited).

A second test checks that ``Engine.submit`` on numpy batches answers as one
``execute`` at a time does, with the same clock.

A third runs seeded workloads over thousands of accounts, holds, merchants
and ids, so every kernel table and index grows past its initial size.

Scale: the default runs take ~10 s; the ``slow`` variants (~1 min at the
default ``AUTHCORE_SLOW_SCALE=1``) multiply their sizes by that variable.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from authcore import constants as C
from authcore.cards import luhn_valid
from authcore.config import Config

from conftest import EPOCH_US, FakeClock, kernel_built, make_engine
from model import Model

US = C.us_per_s
DAY = C.us_per_day
SLOW_SCALE = float(os.environ.get("AUTHCORE_SLOW_SCALE", "1"))
examples_default = 200  # state machine runs in the default suite (~10 s)
steps_default = 50  # requests (and clock moves) per run
examples_slow = 250  # per unit of AUTHCORE_SLOW_SCALE (~40 s at 1)
steps_slow = 100
batch_examples_default = 60

# --- configs: default-ish and tiny windows -------------------------------------

TINY = {
    "hold_ttl_seconds": 20,
    "fraud": {
        "velocity": {"window_seconds": 5, "attempts": 3},
        "card_testing": {"window_seconds": 10, "attempts": 2, "max_amount": 200},
        "amount_spike": {"min_approved": 2, "min_amount": 1000, "factor": 3},
        "impossible_travel": {"window_seconds": 10},
        "new_account": {"age_seconds": 30, "min_amount": 5000},
        "merchant_burst": {"window_seconds": 10, "last_attempts": 4, "declines": 2},
    },
}
CONFIGS = {
    "default_short_ttl": Config.from_dict({"hold_ttl_seconds": 60}),
    # Any rule firing alone shows as `review`, so a rule off by one is visible.
    "tiny_review_any": Config.from_dict({**TINY, "fraud": {**TINY["fraud"], "review_score": 1, "decline_score": 10**6}}),
    "tiny": Config.from_dict(TINY),
    "tiny_low_thresholds": Config.from_dict({**TINY, "fraud": {**TINY["fraud"], "review_score": 30, "decline_score": 60}}),
    "fraud_off": Config.from_dict({"hold_ttl_seconds": 15, "fraud": {"enabled": False}}),
}


def windows_us(cfg: Config) -> list[int]:
    """Every time constant of a config, in µs (for jumps to window edges)."""
    f = cfg.fraud
    return [
        cfg.hold_ttl_seconds * US,
        f.velocity.window_seconds * US,
        f.card_testing.window_seconds * US,
        f.impossible_travel.window_seconds * US,
        f.new_account.age_seconds * US,
        f.merchant_burst.window_seconds * US,
    ]


# --- value pools -------------------------------------------------------------------

ACCOUNTS = [1, 2, 3, 4, 5, 2**64 - 1]
MERCHANTS = [4, 5, 1, 900_001, 900_002]  # 4 and 5 are often merchant accounts; 1 a wallet
CURRENCIES = [840, 840, 978, 156]
CHANNELS = ["online", "qr", "card_present", "p2p"]
COUNTRIES = [840, 156, 250]
MCCS = [5411, 7995, 4829, 0, 6051, 6211]
PANS = [
    "4111111111111111",
    "5500000000000004",
    "411111111116",  # 12 digits, Luhn-valid
    "4111111111111111113",  # 19 digits, Luhn-valid
    "4111111111111112",  # bad check digit
    "41111111116",  # 11 digits
    "41111111111111111110",  # 20 digits
    "4111x11111111111",
]
EDGE_AMOUNTS = [0, -1, 1, 200, 201, 1000, 5000, 50_000, 100_000, C.amount_max, C.amount_max + 1, 2**63 - 1, -(2**63), 10**30]
TIME_STEPS = [0, 0, 1, 2, 10, 999_999, US, 3 * US, 5 * US, 10 * US, 20 * US, 60 * US, 600 * US, 3600 * US, DAY]

amounts = st.one_of(
    st.integers(1, 300),
    st.integers(1, 20_000),
    st.integers(1, 2_000_000),
    st.sampled_from(EDGE_AMOUNTS),
)
deposit_amounts = st.one_of(st.integers(1, 10**7), st.sampled_from(EDGE_AMOUNTS))
limits = st.one_of(st.integers(0, 20_000), st.sampled_from([0, 0, -1, 1000, C.limit_max, C.limit_max + 1, -(10**30)]))


def edge_rule(kind: str):
    """One state-machine rule per boundary kind, so each gets its share of steps."""

    def edge(self, data, delta):
        self.edge_probe(data, kind, delta)

    edge.__name__ = f"edge_{kind}"
    return rule(data=st.data(), delta=st.sampled_from([-1, 0]))(edge)


class EngineVsModel(RuleBasedStateMachine):
    """Same requests to the engine and the model; answers must be equal."""

    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.model: Model | None = None
        self.engine = None
        self.next_id = 1
        self.used_ids: list[int] = []
        self.auth_ids: list[int] = []
        self.stamps: list[int] = []
        self.windows: list[int] = []
        self.trace: list[dict] = []  # the requests so far, for a failure's report

    # --- plumbing ----------------------------------------------------------------

    @initialize(
        name=st.sampled_from(sorted(CONFIGS)),
        start=st.sampled_from([EPOCH_US, 19_675 * DAY + DAY - 30 * US, 19_676 * DAY]),
        data=st.data(),
    )
    def setup(self, name, start, data):
        """Two engines-to-be: open most accounts up front so requests hit them."""
        cfg = CONFIGS[name]
        self.clock.set(start)
        self.model = Model(cfg, self.clock)
        self.engine = make_engine(cfg, self.clock) if kernel_built() else None
        self.windows = windows_us(cfg)
        for account in ACCOUNTS:
            if data.draw(st.integers(0, 9), label="skip_open") == 0:
                continue
            kind = "merchant" if account in (4, 5) and data.draw(st.booleans(), label="merchant") else "wallet"
            currency = data.draw(st.sampled_from([840, 840, 840, 978]), label="currency")
            self.send({"op": "open", "id": self.fresh_id(), "account": account, "currency": currency, "kind": kind,
                       "credit_limit": data.draw(st.sampled_from([0, 0, 1000, 100_000]), label="credit"),
                       "single_limit": data.draw(st.sampled_from([0, 0, 0, 5000, 10**6]), label="single"),
                       "daily_limit": data.draw(st.sampled_from([0, 0, 0, 20_000, 10**6]), label="daily")})
            amount = data.draw(st.sampled_from([0, 10_000, 10**6, 10**8]), label="deposit")
            if amount:
                self.send({"op": "deposit", "id": self.fresh_id(), "account": account, "amount": amount})
        self.clock.advance(data.draw(st.sampled_from([0, 1, 10 * US, 40 * US, DAY]), label="after_setup"))

    def fresh_id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        self.used_ids.append(rid)
        return rid

    def send(self, req: dict) -> dict:
        self.trace.append(req)
        want = self.model.execute(copy.deepcopy(req))
        if self.engine is not None:
            got = self.engine.execute(copy.deepcopy(req))
            assert got == want, f"request #{len(self.trace)} {req}\nengine {got}\nmodel  {want}"
        if "stamp" in want:
            self.stamps.append(want["stamp"])
        return want

    def draw_id(self, data) -> int:
        kind = data.draw(st.sampled_from(["fresh"] * 8 + ["repeat", "repeat", "zero", "huge"]), label="id_kind")
        if kind == "repeat" and self.used_ids:
            return data.draw(st.sampled_from(self.used_ids), label="repeat_id")
        if kind == "zero":
            return 0
        if kind == "huge":
            self.used_ids.append(2**64 - 1)
            return 2**64 - 1
        return self.fresh_id()

    def draw_account(self, data) -> int:
        return data.draw(st.sampled_from(ACCOUNTS * 3 + [0, 77]), label="account")

    def draw_currency(self, data, account: int, optional: bool) -> int:
        a = self.model.accts.get(account)
        own = a.currency if a is not None else 840
        choices = [own, own, own, 978] + ([0, 0] if optional else [0])
        return data.draw(st.sampled_from(choices), label="currency")

    def draw_hold(self, data) -> int:
        holds = self.model.hold_map.values()
        open_holds = [h.id for h in holds if h.state == "open"]
        captured = [h.id for h in holds if h.state == "captured"][-8:]
        closed = [h.id for h in holds if h.state in ("voided", "expired")][-4:]
        pool = open_holds * 6 + captured * 3 + closed + self.auth_ids[-8:] + [0, 424_242] + self.used_ids[-3:]
        return data.draw(st.sampled_from(pool), label="hold")

    # --- clock ----------------------------------------------------------------------

    @rule(step=st.one_of(st.sampled_from(TIME_STEPS), st.integers(0, 30 * US)))
    def advance(self, step):
        self.clock.advance(step)

    @rule(data=st.data())
    def to_next_midnight(self, data):
        delta = data.draw(st.sampled_from([-1, 0, 1]), label="delta")
        target = (max(self.clock.now, self.model.last_stamp) // DAY + 1) * DAY + delta
        self.clock.set(max(self.clock.now, target))

    @precondition(lambda self: self.stamps)
    @rule(data=st.data())
    def to_window_edge(self, data):
        """Move the clock to (an earlier stamp) + window - 1, +0 or +1."""
        s = data.draw(st.sampled_from(self.stamps[-20:]), label="stamp")
        w = data.draw(st.sampled_from(self.windows), label="window")
        delta = data.draw(st.sampled_from([-1, 0, 1]), label="delta")
        target = s + w + delta
        if target > self.clock.now:
            self.clock.set(target)

    def edge_probe(self, data, kind: str, delta: int) -> None:
        """A request placed exactly on (delta 0) or just inside (-1) a boundary.

        Reads the model's state to aim: a window's oldest counted attempt,
        a hold's expiry, an account's age, the daily/single limit left, the
        available balance, amount_spike's 10x-mean line.  Random steps alone
        almost never land on these edges.
        """
        m = self.model
        cfg, f = m.cfg, m.cfg.fraud
        fits = {
            "travel": lambda a: a.last_travel is not None,
            "expiry": lambda a: bool(a.open_holds),
            "velocity": lambda a: len(a.attempt_stamps) >= f.velocity.attempts,
            "card_testing": lambda a: len(a.small_attempt_stamps) >= f.card_testing.attempts,
            "daily": lambda a: a.daily_limit > 0,
            "single": lambda a: a.single_limit > 0,
            "spike": lambda a: a.approved_count > 0,
            "hold_amounts": lambda a: bool(a.open_holds) or any(
                m.hold_map[h].state == "captured" for h in self.auth_ids[-30:] if h in m.hold_map and m.hold_map[h].account == a.id),
        }.get(kind, lambda a: a.kind == "wallet")
        candidates = sorted(i for i, a in m.accts.items() if fits(a))
        wallets = sorted(i for i, a in m.accts.items() if a.kind == "wallet" and a.status == "active")
        merchant = data.draw(st.sampled_from(MERCHANTS), label="merchant")
        if kind == "new_account" and data.draw(st.booleans(), label="fresh_account"):
            acct = 1000 + self.next_id  # a new wallet, so its age is still under the limit
            self.send({"op": "open", "id": self.fresh_id(), "account": acct, "currency": 840, "kind": "wallet"})
            self.send({"op": "deposit", "id": self.fresh_id(), "account": acct, "amount": 10**7})
            candidates = [acct]
        elif not candidates and wallets and kind in ("travel", "card_testing", "expiry", "hold_amounts"):
            # Make the state the edge needs: an approved qr spend, small attempts, a hold.
            acct = data.draw(st.sampled_from(wallets), label="seed_account")
            n = f.card_testing.attempts if kind == "card_testing" else 1
            for _ in range(n):
                self.send({"op": "authorize", "id": self.fresh_id(), "account": acct, "amount": 1 + n,
                           "currency": m.accts[acct].currency, "merchant": merchant, "channel": "qr",
                           "country": 840})
            candidates = sorted(i for i, a in m.accts.items() if fits(a))
        if not candidates:
            return
        a = m.accts[data.draw(st.sampled_from(candidates), label="account")]
        if kind == "merchant_burst":
            ready = sorted(k for k, v in m.merchant_attempts.items()
                           if sum(1 for _, ok in v[-f.merchant_burst.last_attempts :] if not ok) >= f.merchant_burst.declines)
            if ready:
                merchant = data.draw(st.sampled_from(ready), label="burst_merchant")
        at = None  # the stamp to aim at, if time matters
        req = {"op": "authorize", "id": self.fresh_id(), "account": a.id, "amount": 1000, "currency": a.currency,
               "merchant": merchant, "channel": "online", "country": 840, "mcc": 5411,
               "allow_partial": data.draw(st.booleans(), label="allow_partial")}
        if kind == "travel":
            country, s = a.last_travel
            at = s + f.impossible_travel.window_seconds * US + delta
            req.update(channel=data.draw(st.sampled_from(["qr", "card_present"]), label="channel"),
                       country=next(c for c in COUNTRIES if c != country))
        elif kind == "new_account":
            at = a.opened_at + f.new_account.age_seconds * US + delta
            req["amount"] = f.new_account.min_amount
        elif kind == "expiry":
            h = a.open_holds[data.draw(st.sampled_from(sorted(a.open_holds)), label="hold")]
            at = h.created + cfg.hold_ttl_seconds * US + delta
            op = data.draw(st.sampled_from(["capture", "void", "increment"]), label="op")
            req = {"op": op, "id": req["id"], "auth": h.id, "amount": 1 if op == "increment" else 0}
        elif kind == "velocity":
            at = a.attempt_stamps[-f.velocity.attempts] + f.velocity.window_seconds * US + delta
        elif kind == "card_testing":
            at = a.small_attempt_stamps[-f.card_testing.attempts] + f.card_testing.window_seconds * US + delta
        elif kind == "merchant_burst":
            last = m.merchant_attempts.get(merchant, [])[-f.merchant_burst.last_attempts :]
            declined = [s for s, ok in last if not ok]
            if len(declined) >= f.merchant_burst.declines:
                at = declined[-f.merchant_burst.declines] + f.merchant_burst.window_seconds * US + delta
        elif kind == "daily":
            stamp = max(self.clock.now, m.last_stamp + 1)
            req["amount"] = max(1, a.daily_limit - m._spent_today(a, stamp) + delta + 1)
        elif kind == "single":
            req["amount"] = a.single_limit + delta + 1
        elif kind == "funds":
            avail = m.available(a.id)
            if avail > 0 and data.draw(st.booleans(), label="drain_first"):
                self.send(dict(req, amount=avail, allow_partial=False))  # leaves available at exactly 0
                req = dict(req, id=self.fresh_id())
            req["amount"] = max(1, m.available(a.id) + delta + 1)
        elif kind == "spike":
            line = f.amount_spike.factor * a.approved_total // a.approved_count
            req["amount"] = max(f.amount_spike.min_amount + delta + 1, line + delta + 1)
        elif kind == "hold_amounts":
            holds = [h for h in m.hold_map.values() if h.account == a.id and h.state in ("open", "captured")]
            if holds:
                h = holds[data.draw(st.integers(0, len(holds) - 1), label="hold")]
                if h.state == "captured":  # refund up to (and one past) what is left
                    req = {"op": "refund", "auth": h.id, "amount": h.captured - h.refunded + delta + 1}
                else:
                    op = data.draw(st.sampled_from(["capture", "void", "increment"]), label="op")
                    room = h.remaining if op != "increment" or a.single_limit == 0 else a.single_limit - h.remaining
                    req = {"op": op, "auth": h.id, "amount": max(1, room + delta + 1)}
                req["id"] = self.fresh_id()
        elif kind == "inactive":
            # Freeze or close an account, then name it as payer, payee or hold owner.
            status_op = data.draw(st.sampled_from(["freeze", "freeze", "close"]), label="status_op")
            self.send({"op": status_op, "id": self.fresh_id(), "account": a.id})
            other = data.draw(st.sampled_from(ACCOUNTS), label="other")
            holds = sorted(h.id for h in m.hold_map.values() if h.account == a.id)
            choice = data.draw(st.sampled_from(["to", "from", "deposit", "hold"]), label="role")
            if choice == "to":
                req = {"op": "transfer", "id": req["id"], "account": other, "to": a.id, "amount": 10}
            elif choice == "deposit":
                req = {"op": "deposit", "id": req["id"], "account": a.id, "amount": 10}
            elif choice == "hold" and holds:
                op = data.draw(st.sampled_from(["capture", "void", "increment", "refund"]), label="op")
                req = {"op": op, "id": req["id"], "auth": data.draw(st.sampled_from(holds), label="hold"),
                       "amount": 0 if op in ("capture", "void") else 1}
        if at is not None and at > max(self.clock.now, m.last_stamp):
            self.clock.set(at)
        if req["op"] == "authorize" and kind != "travel" and data.draw(st.integers(0, 3), label="as") == 0:
            req = {"op": "transfer", "id": req["id"], "account": a.id,
                   "to": data.draw(st.sampled_from(ACCOUNTS), label="to"), "amount": req["amount"]}
        elif req["op"] == "authorize" and data.draw(st.integers(0, 3), label="as") == 0:
            req["op"] = "purchase"
        self.send(req)
        if req["op"] in ("authorize", "purchase"):
            self.auth_ids.append(req["id"])

    edge_travel = edge_rule("travel")
    edge_new_account = edge_rule("new_account")
    edge_expiry = edge_rule("expiry")
    edge_velocity = edge_rule("velocity")
    edge_card_testing = edge_rule("card_testing")
    edge_merchant_burst = edge_rule("merchant_burst")
    edge_daily = edge_rule("daily")
    edge_single = edge_rule("single")
    edge_funds = edge_rule("funds")
    edge_spike = edge_rule("spike")
    edge_hold_amounts = edge_rule("hold_amounts")
    edge_inactive = edge_rule("inactive")

    # --- operations -----------------------------------------------------------------

    @rule(data=st.data())
    def open(self, data):
        req = {
            "op": "open",
            "id": self.draw_id(data),
            "account": data.draw(st.sampled_from(ACCOUNTS + ACCOUNTS + [0]), label="account"),
            "currency": data.draw(st.sampled_from(CURRENCIES + [0, 999, 1000]), label="currency"),
            "kind": data.draw(st.sampled_from(["wallet", "wallet", "merchant"]), label="kind"),
        }
        for k in ("credit_limit", "single_limit", "daily_limit"):
            if data.draw(st.booleans(), label=f"has_{k}"):
                req[k] = data.draw(limits, label=k)
        self.send(req)

    @rule(data=st.data(), op=st.sampled_from(["deposit", "deposit", "withdraw"]))
    def deposit_withdraw(self, data, op):
        account = self.draw_account(data)
        req = {"op": op, "id": self.draw_id(data), "account": account, "amount": data.draw(deposit_amounts, label="amount")}
        currency = self.draw_currency(data, account, optional=True)
        if currency:
            req["currency"] = currency
        self.send(req)

    @rule(data=st.data(), op=st.sampled_from(["authorize", "authorize", "purchase"]))
    def spend(self, data, op):
        account = self.draw_account(data)
        req = {
            "op": op,
            "id": self.draw_id(data),
            "account": account,
            "amount": data.draw(amounts, label="amount"),
            "currency": self.draw_currency(data, account, optional=False),
            "merchant": data.draw(st.sampled_from(MERCHANTS + [0]), label="merchant"),
            "mcc": data.draw(st.sampled_from(MCCS), label="mcc"),
            "channel": data.draw(st.sampled_from(CHANNELS), label="channel"),
            "country": data.draw(st.sampled_from(COUNTRIES), label="country"),
            "allow_partial": data.draw(st.booleans(), label="allow_partial"),
        }
        self.send(req)
        if req["id"] not in self.auth_ids:
            self.auth_ids.append(req["id"])

    @rule(data=st.data())
    def burst(self, data):
        """Rapid small attempts on one account at one merchant (fraud rules' food)."""
        account = data.draw(st.sampled_from(ACCOUNTS[:5]), label="account")
        merchant = data.draw(st.sampled_from(MERCHANTS), label="merchant")
        a = self.model.accts.get(account)
        currency = a.currency if a is not None else 840
        for _ in range(data.draw(st.integers(2, 8), label="n")):
            op = data.draw(st.sampled_from(["authorize", "authorize", "purchase", "transfer"]), label="op")
            amount = data.draw(st.sampled_from([1, 150, 200, 201, 999, 6000, 60_000, 10**7]), label="amount")
            rid = self.draw_id(data)
            if op == "transfer":
                to = data.draw(st.sampled_from(ACCOUNTS[:5]), label="to")
                self.send({"op": op, "id": rid, "account": account, "to": to, "amount": amount})
            else:
                self.send({"op": op, "id": rid, "account": account, "amount": amount, "currency": currency,
                           "merchant": merchant, "channel": data.draw(st.sampled_from(CHANNELS[:3]), label="channel"),
                           "country": data.draw(st.sampled_from(COUNTRIES), label="country"),
                           "mcc": data.draw(st.sampled_from(MCCS), label="mcc")})
                if rid not in self.auth_ids:
                    self.auth_ids.append(rid)
            self.clock.advance(data.draw(st.sampled_from([0, 1, 100_000, US, 3 * US]), label="gap"))

    @rule(data=st.data(), op=st.sampled_from(["increment", "capture", "capture", "void", "refund", "refund"]))
    def hold_op(self, data, op):
        hid = self.draw_hold(data)
        h = self.model.hold_map.get(hid)
        base = h.remaining if h is not None and h.state == "open" else (h.captured if h is not None else 100)
        amount = data.draw(
            st.one_of(
                st.sampled_from([0, 1, base, base + 1, max(base - 1, 0), base // 2, -1, C.amount_max + 1]),
                amounts,
            ),
            label="amount",
        )
        self.send({"op": op, "id": self.draw_id(data), "auth": hid, "amount": amount})

    @rule(data=st.data())
    def transfer(self, data):
        account = self.draw_account(data)
        req = {
            "op": "transfer",
            "id": self.draw_id(data),
            "account": account,
            "to": data.draw(st.sampled_from(ACCOUNTS + [0, 77, account]), label="to"),
            "amount": data.draw(amounts, label="amount"),
        }
        currency = self.draw_currency(data, account, optional=True)
        if currency:
            req["currency"] = currency
        self.send(req)

    @rule(data=st.data())
    def set_limits(self, data):
        req = {"op": "set_limits", "id": self.draw_id(data), "account": self.draw_account(data)}
        for k in ("credit_limit", "single_limit", "daily_limit"):
            if data.draw(st.booleans(), label=f"has_{k}"):
                req[k] = data.draw(limits, label=k)
        self.send(req)

    @rule(data=st.data(), op=st.sampled_from(["freeze", "unfreeze", "unfreeze", "close"]))
    def status_change(self, data, op):
        req = {"op": op, "id": self.draw_id(data), "account": self.draw_account(data)}
        if data.draw(st.booleans(), label="with_currency"):
            req["currency"] = data.draw(st.sampled_from(CURRENCIES), label="currency")  # ignored
        self.send(req)

    @rule(data=st.data())
    def drain_and_close(self, data):
        """Empty an account (void its holds, withdraw or top up) and close it."""
        account = data.draw(st.sampled_from(ACCOUNTS), label="account")
        a = self.model.accts.get(account)
        if a is None:
            return
        for h in list(self.model.hold_map.values()):
            if h.account == account and h.state == "open":
                self.send({"op": "void", "id": self.draw_id(data), "auth": h.id, "amount": 0})
        if a.balance > 0:
            self.send({"op": "withdraw", "id": self.draw_id(data), "account": account, "amount": a.balance})
        elif a.balance < 0:
            self.send({"op": "deposit", "id": self.draw_id(data), "account": account, "amount": -a.balance})
        self.send({"op": "close", "id": self.draw_id(data), "account": account})

    @rule(data=st.data())
    def issue_card(self, data):
        req = {
            "op": "issue_card",
            "id": self.draw_id(data),
            "account": self.draw_account(data),
            "pan": data.draw(st.sampled_from(PANS), label="pan"),
        }
        self.send(req)

    @rule(data=st.data())
    def query(self, data):
        req = {"op": "query", "account": self.draw_account(data)}
        if data.draw(st.booleans(), label="with_id"):
            req["id"] = data.draw(st.sampled_from(self.used_ids + [0, 999_999]), label="id")
        self.send(req)

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def state_matches(self):
        if self.model is None:
            return
        accounts, holds, settlement = self.model.accounts(), self.model.holds(), self.model.settlement()
        if self.engine is not None:
            assert self.engine.accounts() == accounts
            assert self.engine.holds() == holds
            assert self.engine.settlement() == settlement
            assert self.engine.last_stamp == self.model.last_stamp
        check_invariants(accounts, holds, settlement, self.model)

    def teardown(self):
        if self.engine is not None and self.model is not None:
            assert self.engine.accounts() == self.model.accounts()
            assert self.engine.holds() == self.model.holds()
            assert self.engine.settlement() == self.model.settlement()
            for pan in PANS:
                assert self.engine.card_account(pan) == self.model.card_account(pan), pan


def check_invariants(accounts: dict, holds: dict, settlement: dict, model: Model) -> None:
    """SPEC §2's invariants on one implementation's introspection."""
    open_held: dict[int, int] = {}
    for h in holds.values():
        assert h["remaining"] >= 0 and h["captured"] >= 0 and 0 <= h["refunded"] <= h["captured"]
        if h["state"] == "open":
            assert h["remaining"] > 0
            open_held[h["account"]] = open_held.get(h["account"], 0) + h["remaining"]
    totals: dict[int, int] = {}
    for acct_id, a in accounts.items():
        assert a["held"] == open_held.get(acct_id, 0), acct_id
        available = a["balance"] + a["credit_limit"] - a["held"]
        if not model.accts[acct_id].may_go_negative:
            assert available >= 0, (acct_id, a)
        assert -C.balance_bound <= a["balance"] <= C.balance_bound
        totals[a["currency"]] = totals.get(a["currency"], 0) + a["balance"]
    for cur, bal in settlement.items():
        totals[cur] = totals.get(cur, 0) + bal
    assert all(v == 0 for v in totals.values()), totals


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


TestEngineVsModel = EngineVsModel.TestCase
TestEngineVsModel.settings = _settings(examples_default, steps_default)


@pytest.mark.slow
def test_engine_vs_model_long():
    run_state_machine_as_test(EngineVsModel, settings=_settings(int(examples_slow * SLOW_SCALE), steps_slow))


# --- the batch API answers as one request at a time ------------------------------------------


def _request(draw) -> dict:
    """One random request over small pools (no state needed: many are declines)."""
    op = draw(st.sampled_from([o.name for o in C.Op]))
    rid = draw(st.one_of(st.integers(1, 40), st.just(0)))
    account = draw(st.sampled_from(ACCOUNTS[:4] + [0]))
    amount = draw(amounts)
    if op == "open":
        return {"op": op, "id": rid, "account": account, "currency": draw(st.sampled_from([840, 978])),
                "kind": draw(st.sampled_from(["wallet", "wallet", "merchant"])), "credit_limit": draw(limits)}
    if op in ("deposit", "withdraw"):
        return {"op": op, "id": rid, "account": account, "amount": draw(deposit_amounts)}
    if op in ("authorize", "purchase"):
        return {"op": op, "id": rid, "account": account, "amount": amount, "currency": 840,
                "merchant": draw(st.sampled_from(MERCHANTS)), "channel": draw(st.sampled_from(CHANNELS)),
                "country": draw(st.sampled_from(COUNTRIES)), "mcc": draw(st.sampled_from(MCCS)),
                "allow_partial": draw(st.booleans())}
    if op in ("increment", "capture", "void", "refund"):
        return {"op": op, "id": rid, "auth": draw(st.integers(1, 40)), "amount": draw(st.one_of(st.just(0), amounts))}
    if op == "transfer":
        return {"op": op, "id": rid, "account": account, "to": draw(st.sampled_from(ACCOUNTS[:4])), "amount": amount}
    if op == "set_limits":
        return {"op": op, "id": rid, "account": account, "daily_limit": draw(limits)}
    if op == "issue_card":
        return {"op": op, "id": rid, "account": account, "pan": draw(st.sampled_from(PANS))}
    if op == "query":
        return {"op": op, "account": account}
    return {"op": op, "id": rid, "account": account}


@st.composite
def batches(draw):
    """A setup batch (opens, deposits) and random batches, with clock steps."""
    setup = []
    for i, account in enumerate(ACCOUNTS[:4]):
        kind = "merchant" if account == 4 else "wallet"
        setup.append({"op": "open", "id": 100 + i, "account": account, "currency": 840, "kind": kind, "credit_limit": 500})
        setup.append({"op": "deposit", "id": 200 + i, "account": account, "amount": 100_000})
    out = [(0, setup)]
    for _ in range(draw(st.integers(1, 6))):
        step = draw(st.sampled_from([0, 1, US, 5 * US, 30 * US, DAY]))
        out.append((step, [_request(draw) for _ in range(draw(st.integers(1, 25)))]))
    return out


@pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")
@settings(max_examples=batch_examples_default, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(work=batches(), name=st.sampled_from(["tiny", "fraud_off"]))
def test_batch_submit_equals_single_execute(work, name):
    from authcore.records import answers_to_json, requests_from_json

    cfg = CONFIGS[name]
    clock_b, clock_s, clock_m = FakeClock(), FakeClock(), FakeClock()
    batched, single = make_engine(cfg, clock_b), make_engine(cfg, clock_s)
    model = Model(cfg, clock_m)
    for step, reqs in work:
        for c in (clock_b, clock_s, clock_m):
            c.advance(step)
        arr = requests_from_json(reqs, batched.hasher)
        assert arr.dtype == C.REQUEST_DTYPE
        got = answers_to_json(arr, batched.submit(arr))
        want = [single.execute(copy.deepcopy(r)) for r in reqs]
        assert got == want
        assert [model.execute(copy.deepcopy(r)) for r in reqs] == want
        assert batched.last_stamp == single.last_stamp
    assert batched.accounts() == single.accounts() == model.accounts()
    assert batched.holds() == single.holds() == model.holds()


def test_batch_of_parse_request_records(clock):
    """``records.parse_request`` rows stacked into an array are a valid batch."""
    if not kernel_built():
        pytest.skip("authcore._kernel is not built yet")
    from authcore.records import answers_to_json, parse_request

    eng = make_engine(None, clock)
    reqs = [
        {"op": "open", "id": 1, "account": 1, "currency": 840, "kind": "wallet"},
        {"op": "deposit", "id": 2, "account": 1, "amount": 500},
        {"op": "authorize", "id": 3, "account": 1, "amount": 200, "currency": 840, "merchant": 9},
        {"op": "query", "account": 1},
        {"op": "deposit", "id": 2, "account": 1, "amount": 7},
    ]
    arr = np.array([parse_request(r, eng.hasher) for r in reqs], dtype=C.REQUEST_DTYPE)
    answers = answers_to_json(arr, eng.submit(arr))
    stamp0 = clock.now
    assert [a["status"] for a in answers] == ["approved"] * 5
    assert [a.get("stamp") for a in answers] == [stamp0, stamp0 + 1, stamp0 + 2, None, stamp0 + 1]
    assert answers[3]["held"] == 200 and answers[3]["available"] == 300
    assert eng.last_stamp == stamp0 + 4


def test_digest_same_for_batched_and_single():
    """Equal states give equal digests, empty tables included."""
    if not kernel_built():
        pytest.skip("authcore._kernel is not built yet")
    from authcore.records import requests_from_json

    reqs = [
        {"op": "open", "id": 1, "account": 1, "currency": 840, "kind": "wallet"},
        {"op": "deposit", "id": 2, "account": 1, "amount": 500},
        {"op": "authorize", "id": 3, "account": 1, "amount": 200, "currency": 840, "merchant": 9},
    ]
    batched, single = make_engine(None, FakeClock()), make_engine(None, FakeClock())
    assert batched.digest() == single.digest()  # fresh: every table empty
    batched.submit(requests_from_json(reqs, batched.hasher))
    for r in reqs:
        single.execute(r)
    assert batched.digest() == single.digest()
    single.execute({"op": "deposit", "id": 4, "account": 1, "amount": 1})
    assert batched.digest() != single.digest()


# --- many accounts, holds, merchants and ids: the kernel's tables grow -----------------------

big_accounts_default = 2500  # > 2 x table_rows_initial: every table and index grows
big_requests_default = 20_000  # > 2 x table_rows_initial remembered ids and holds
big_merchants = 700
big_accounts_slow = 10_000  # per unit of AUTHCORE_SLOW_SCALE (~5 s each at 1)
big_requests_slow = 60_000


def big_workload(seed: int, n_accounts: int, n_requests: int):
    """Batches (clock step, requests) over many accounts, seeded and repeatable."""
    import random

    rng = random.Random(seed)
    accounts = [rng.randrange(1, 2**64) if i % 7 == 0 else i + 1 for i in range(n_accounts)]
    merchants = [900_000 + i for i in range(big_merchants)]
    merchant_accounts = set(merchants[::3])
    opens = []
    rid = 1
    for acct in accounts + sorted(merchant_accounts):
        kind = "merchant" if acct in merchant_accounts else "wallet"
        opens.append({"op": "open", "id": rid, "account": acct, "currency": 840 if rng.random() < 0.9 else 978,
                      "kind": kind, "credit_limit": rng.choice([0, 0, 5000]),
                      "single_limit": rng.choice([0, 0, 0, 50_000]), "daily_limit": rng.choice([0, 0, 0, 200_000])})
        rid += 1
        opens.append({"op": "deposit", "id": rid, "account": acct, "amount": rng.choice([0, 10_000, 1_000_000]) or 1})
        rid += 1
    batches_out = [(0, opens[i : i + 1000]) for i in range(0, len(opens), 1000)]
    auths: list[int] = []
    pans = [f"4{rng.randrange(10**13, 10**14)}" for _ in range(n_accounts // 2)]
    pans = [p + next(d for d in "0123456789" if luhn_valid(p + d)) for p in pans]
    done = 0
    while done < n_requests:
        batch = []
        for _ in range(rng.randint(1, 400)):
            r = rng.random()
            acct = rng.choice(accounts)
            if r < 0.03 and rid > 2:
                req = {"op": "deposit", "id": rng.randrange(1, rid), "account": acct, "amount": 5}  # a repeat
            elif r < 0.40:
                op = "authorize" if r < 0.30 else "purchase"
                req = {"op": op, "id": rid, "account": acct, "amount": rng.choice([50, 150, 900, 4000, 60_000, 300_000]),
                       "currency": 840, "merchant": rng.choice(merchants), "mcc": rng.choice(MCCS),
                       "channel": rng.choice(CHANNELS[:3]), "country": rng.choice(COUNTRIES),
                       "allow_partial": rng.random() < 0.3}
                auths.append(rid)
            elif r < 0.58 and auths:
                op = rng.choice(["capture", "capture", "void", "increment", "refund", "refund"])
                req = {"op": op, "id": rid, "auth": rng.choice(auths[-3000:]), "amount": rng.choice([0, 10, 100, 1000])}
                if op in ("increment", "refund") and req["amount"] == 0:
                    req["amount"] = 1
            elif r < 0.70:
                req = {"op": "transfer", "id": rid, "account": acct, "to": rng.choice(accounts),
                       "amount": rng.choice([10, 150, 2000, 150_000])}
            elif r < 0.80:
                req = {"op": rng.choice(["deposit", "withdraw"]), "id": rid, "account": acct,
                       "amount": rng.choice([100, 5000, 100_000])}
            elif r < 0.87:
                req = {"op": "query", "account": acct}
            elif r < 0.93:
                req = {"op": "issue_card", "id": rid, "account": acct, "pan": rng.choice(pans)}
            elif r < 0.96:
                req = {"op": "set_limits", "id": rid, "account": acct, "credit_limit": rng.choice([0, 1000, 5000])}
            else:
                req = {"op": rng.choice(["freeze", "unfreeze", "unfreeze", "close"]), "id": rid, "account": acct}
            rid += 1
            batch.append(req)
        done += len(batch)
        batches_out.append((rng.choice([0, 1, 1000, 100_000, US, 5 * US, 30 * US]), batch))
    return batches_out


def run_big(seed: int, n_accounts: int, n_requests: int) -> None:
    from authcore.records import answers_to_json, requests_from_json

    cfg = CONFIGS["tiny"]
    clock_e, clock_m = FakeClock(), FakeClock()
    eng, model = make_engine(cfg, clock_e), Model(cfg, clock_m)
    for n, (step, reqs) in enumerate(big_workload(seed, n_accounts, n_requests)):
        clock_e.advance(step)
        clock_m.advance(step)
        arr = requests_from_json(reqs, eng.hasher)
        got = answers_to_json(arr, eng.submit(arr))
        for i, r in enumerate(reqs):
            want = model.execute(copy.deepcopy(r))
            assert got[i] == want, f"batch {n} request {i}: {r}\nengine {got[i]}\nmodel  {want}"
    assert eng.accounts() == model.accounts()
    assert eng.holds() == model.holds()
    assert eng.settlement() == model.settlement()
    assert eng.verify()


def test_many_accounts_tables_grow():
    if not kernel_built():
        pytest.skip("authcore._kernel is not built yet")
    run_big(1, big_accounts_default, big_requests_default)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_many_accounts_long(seed):
    if not kernel_built():
        pytest.skip("authcore._kernel is not built yet")
    run_big(seed, int(big_accounts_slow * SLOW_SCALE), int(big_requests_slow * SLOW_SCALE))
