"""A slow, plain-Python reference model of authcore's decisions.

Goals: implement SPEC.md §1-§6 and §10, as read precisely in
docs/semantics.md, so obviously that a reader can check it line by line
against the text; same single-request interface as ``Engine.execute`` and
the same introspection shapes as ``Engine.accounts()/holds()/settlement()``,
so tests can run one scenario on both and compare answers exactly.  It is an
*independent* implementation: Python ints (no overflow, no 128-bit tricks),
full sorted lists of attempt stamps counted per decision (bisect) instead
of rings, ``held`` recomputed from each account's open holds, expiry from
a creation-ordered queue, raw PANs in a dict.  Non-goals: speed beyond
"a 40k-request test runs in a second", durability, the request parser
(requests are assumed well formed: the JSON shape ``records.parse_request``
accepts; out-of-int64 amounts and limits are simply invalid_amount, as the
parser clamps them).

Readings where SPEC.md and docs/semantics.md leave something open (each
is what the model does; the kernel is checked against it):

* Answer shape (JSON dict, as ``Engine.execute`` returns it): ``id``,
  ``op``, ``status``, ``code`` always; ``stamp`` on every non-query answer;
  ``available`` whenever the request names an existing account (directly,
  or through a hold), even when it was refused before the account check
  (invalid_request, invalid_amount);
  ``approved_amount`` on authorize/purchase/transfer and on the hold ops
  increment/capture/void/refund (0 on declines; a capture or void of 0
  approves, and reports, the whole remaining hold); ``auth_code`` on
  approvals (approved or partial) of authorize/purchase; ``review`` on
  approvals of authorize/purchase/transfer; an approved query answer adds
  ``account``, ``balance``, ``credit_limit``, ``held``, ``available``,
  ``account_status`` and nothing else.
* freeze/unfreeze/close accept an optional ``currency`` (0 = not given)
  and, when given, check it right after the account lookup (SPEC §3's
  common checks: "account exists, currency matches, then the operation's
  own"); set_limits and issue_card carry no currency (the JSON parser
  ignores one).
* A query of account 0 is invalid_request (SPEC §3: "anything naming
  account 0 is invalid_request"; docs/semantics.md says no_account, SPEC
  wins).
* A query consumes a stamp (so expiry runs at it) but its answer carries
  none; its id is ignored (not checked against, not remembered).
* A repeated id returns the first answer whole (its op included), expiry
  still runs at the repeat's stamp, nothing else happens.
* An expired hold keeps ``remaining`` at 0 (it reserves nothing); a voided
  hold reaches 0 by construction; a captured hold has remaining 0.
* "Current UTC day" of a stamp is ``stamp // 86_400_000_000``.
* Fraud disabled: score 0, never declines, never reviews.
* A capture/purchase whose merchant id is the payer's own account id
  credits that account (the rule "the account whose id is the merchant id,
  if it exists in the same currency" read literally).
* open's ``available`` is the new account's; on account_exists it is the
  existing account's.
* A transfer whose request currency differs from the sender's is still an
  attempt of the sender (§10.3 "a transfer from an existing sender,
  whatever its answer" over §5's "naming an existing account in its
  currency"); an authorize/purchase in a foreign currency is not.
* Holds expire in creation order (one ttl for all); a purchase's hold is
  born captured and never expires.
* ``review`` is computed from the score at the fraud step; a decline
  before it (limits, inactive) has no score, and declines carry no review.
"""

from __future__ import annotations

import bisect
import collections
import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from authcore import constants as C
from authcore.cards import luhn_valid
from authcore.records import auth_code

US = C.us_per_s
DAY_US = C.us_per_day
AMOUNT_MAX = C.amount_max
BOUND = C.balance_bound
PAN_RE = re.compile(r"[0-9]{12,19}")

CHANNELS = ("online", "qr", "card_present", "p2p")
TRAVEL_CHANNELS = ("qr", "card_present")
HOLD_OPS = ("increment", "capture", "void", "refund")
SPEND_OPS = ("authorize", "purchase", "transfer")


@dataclass
class Account:
    id: int
    currency: int
    kind: str  # "wallet" | "merchant"
    credit_limit: int
    single_limit: int
    daily_limit: int
    opened_at: int
    status: str = "active"  # "active" | "frozen" | "closed"
    balance: int = 0
    attempt_stamps: list[int] = field(default_factory=list)  # every attempt, in stamp order
    small_attempt_stamps: list[int] = field(default_factory=list)  # those with amount <= card_testing.max_amount
    spent_day: int = -1  # UTC day of spent_total ...
    spent_total: int = 0  # ... and the approved spend stamped on that day
    approved_count: int = 0  # amount_spike: lifetime approved spends ...
    approved_total: int = 0  # ... and their sum (Python int: exact)
    open_holds: dict[int, "Hold"] = field(default_factory=dict)  # this account's open holds by id
    last_travel: tuple[int, int] | None = None  # (country, stamp) of last approved qr/card_present auth
    may_go_negative: bool = False  # test aid: credit lowered by set_limits, or debited by a refund


@dataclass
class Hold:
    id: int
    account: int
    merchant: int
    created: int
    remaining: int
    state: str = "open"  # "open" | "captured" | "voided" | "expired"
    captured: int = 0
    refunded: int = 0
    credited: int | None = None  # account id credited at capture; None = settlement


def in_window(stamps: list[int], after: int) -> int:
    """How many of the (increasing) ``stamps`` are > ``after``."""
    return len(stamps) - bisect.bisect_right(stamps, after)


class Model:
    """Reference model: ``Model(config, clock).execute(request) -> answer``."""

    def __init__(self, config: Any = None, clock: Callable[[], int] | None = None):
        if config is None:
            from authcore.config import Config

            config = Config.default()
        assert clock is not None, "the model needs an injected clock"
        self.cfg = config
        self.clock = clock
        self.last_stamp = 0
        self.accts: dict[int, Account] = {}
        self.hold_map: dict[int, Hold] = {}
        self.settle: dict[int, int] = {}
        self.answers: dict[int, dict] = {}
        self.cards: dict[str, int] = {}  # raw PAN -> account id (test code only)
        self.merchant_attempts: dict[int, list[tuple[int, bool]]] = {}  # merchant -> [(stamp, approved)]
        self.by_creation: collections.deque[tuple[int, int]] = collections.deque()  # (created, hold id)

    # --- introspection, same shapes as Engine --------------------------------

    def held(self, account_id: int) -> int:
        return sum(h.remaining for h in self.accts[account_id].open_holds.values())

    def available(self, account_id: int) -> int:
        a = self.accts[account_id]
        return a.balance + a.credit_limit - self.held(account_id)

    def accounts(self) -> dict[int, dict]:
        return {
            a.id: {
                "balance": a.balance,
                "credit_limit": a.credit_limit,
                "held": self.held(a.id),
                "status": a.status,
                "kind": a.kind,
                "currency": a.currency,
                "single_limit": a.single_limit,
                "daily_limit": a.daily_limit,
                "opened_at": a.opened_at,
            }
            for a in self.accts.values()
        }

    def holds(self) -> dict[int, dict]:
        return {
            h.id: {
                "account": h.account,
                "remaining": h.remaining,
                "captured": h.captured,
                "refunded": h.refunded,
                "state": h.state,
            }
            for h in self.hold_map.values()
        }

    def settlement(self) -> dict[int, int]:
        return {cur: bal for cur, bal in self.settle.items() if bal != 0}

    # --- the request loop ------------------------------------------------------

    def execute(self, req: dict) -> dict:
        stamp = max(int(self.clock()), self.last_stamp + 1)
        self.last_stamp = stamp
        self._expire(stamp)
        op = req["op"]
        rid = int(req.get("id", 0))
        if op == "query":
            return self._query(req)
        if rid != 0 and rid in self.answers:
            return copy.deepcopy(self.answers[rid])
        handler = getattr(self, "_" + op)
        ans = handler(req, stamp)
        if ans["status"] in ("invalid_request", "invalid_amount") and "available" not in ans:
            named = self._named_account(req)
            if named is not None:
                ans["available"] = self.available(named)
        if rid != 0:
            self.answers[rid] = copy.deepcopy(ans)
        return ans

    def _named_account(self, req: dict) -> int | None:
        """The existing account a request names, directly or through a hold
        (SPEC §10.12: such answers carry its available, even a request that
        failed before the account was checked)."""
        if req["op"] in HOLD_OPS:
            h = self.hold_map.get(int(req.get("auth", 0)))
            return None if h is None else h.account
        acct = int(req.get("account", 0))
        return acct if acct != 0 and acct in self.accts else None

    def _expire(self, stamp: int) -> None:
        ttl = self.cfg.hold_ttl_seconds * US
        # Holds are created in stamp order and share one ttl: expire from the oldest.
        while self.by_creation and self.by_creation[0][0] + ttl <= stamp:
            _, hid = self.by_creation.popleft()
            h = self.hold_map[hid]
            if h.state == "open":
                self._end_hold(h, "expired")
                h.remaining = 0

    def _end_hold(self, h: "Hold", state: str) -> None:
        """The one way a hold leaves "open"."""
        assert h.state == "open" and state in ("captured", "voided", "expired")
        h.state = state
        del self.accts[h.account].open_holds[h.id]

    # --- answer building -----------------------------------------------------

    def _answer(
        self,
        req: dict,
        stamp: int,
        status: str,
        account: int | None = None,
        approved_amount: int = 0,
        score: int = 0,
    ) -> dict:
        op = req["op"]
        ans: dict[str, Any] = {
            "id": int(req.get("id", 0)),
            "op": op,
            "status": status,
            "code": C.STATUS_CODE[C.Status[status]],
            "stamp": stamp,
        }
        if account is not None:
            ans["available"] = self.available(account)
        approved = status in ("approved", "partial")
        if op in SPEND_OPS or op in HOLD_OPS:
            ans["approved_amount"] = approved_amount if approved else 0
        if op in SPEND_OPS:
            if approved:
                ans["review"] = self._review(score)
                if op != "transfer":
                    ans["auth_code"] = auth_code(ans["id"])
        return ans

    def _query(self, req: dict) -> dict:
        acct_id = int(req.get("account", 0))
        ans: dict[str, Any] = {"id": int(req.get("id", 0)), "op": "query"}
        if acct_id == 0:  # SPEC §3: "anything naming account 0 is invalid_request"
            ans.update(status="invalid_request", code=C.STATUS_CODE[C.Status.invalid_request])
            return ans
        a = self.accts.get(acct_id)
        if a is None:
            ans.update(status="no_account", code=C.STATUS_CODE[C.Status.no_account])
            return ans
        ans.update(
            status="approved",
            code="00",
            account=acct_id,
            available=self.available(acct_id),
            balance=a.balance,
            credit_limit=a.credit_limit,
            held=self.held(acct_id),
            account_status=a.status,
        )
        return ans

    # --- helpers ---------------------------------------------------------------

    @staticmethod
    def _amount_ok(x: int) -> bool:
        return 0 < x <= AMOUNT_MAX

    @staticmethod
    def _limit_ok(x: int) -> bool:
        return 0 <= x <= AMOUNT_MAX

    @staticmethod
    def _in_bounds(x: int) -> bool:
        return -BOUND <= x <= BOUND

    def _credited_balance(self, credited: int | None, currency: int) -> int:
        return self.accts[credited].balance if credited is not None else self.settle.get(currency, 0)

    def _move_credited(self, credited: int | None, currency: int, delta: int) -> None:
        if credited is not None:
            self.accts[credited].balance += delta
        else:
            self.settle[currency] = self.settle.get(currency, 0) + delta

    def _merchant_account(self, merchant: int, currency: int) -> int | None:
        m = self.accts.get(merchant)
        return merchant if m is not None and m.currency == currency else None

    @staticmethod
    def _day(stamp: int) -> int:
        return stamp // DAY_US

    def _spent_today(self, a: Account, stamp: int) -> int:
        return a.spent_total if a.spent_day == self._day(stamp) else 0

    def _add_daily_spend(self, a: Account, stamp: int, amount: int) -> None:
        a.spent_total = self._spent_today(a, stamp) + amount
        a.spent_day = self._day(stamp)

    def _single_exceeded(self, a: Account, total: int) -> bool:
        return a.single_limit > 0 and total > a.single_limit

    def _daily_exceeded(self, a: Account, stamp: int, amount: int) -> bool:
        return a.daily_limit > 0 and self._spent_today(a, stamp) + amount > a.daily_limit

    def _review(self, score: int) -> bool:
        f = self.cfg.fraud
        return bool(f.enabled and score >= f.review_score)

    # --- fraud (SPEC §5) -------------------------------------------------------

    def _score(self, a: Account, stamp: int, amount: int, channel: str, country: int, mcc: int, merchant: int) -> int:
        f = self.cfg.fraud
        if not f.enabled:
            return 0
        score = 0
        # velocity: earlier attempts with stamp > now - window.
        w = f.velocity.window_seconds * US
        if in_window(a.attempt_stamps, stamp - w) >= f.velocity.attempts:
            score += f.velocity.points
        # card_testing: earlier small attempts in the window.
        ct = f.card_testing
        w = ct.window_seconds * US
        if in_window(a.small_attempt_stamps, stamp - w) >= ct.attempts:
            score += ct.points
        # amount_spike: lifetime approved spends, exact integers.
        sp = f.amount_spike
        count, total = a.approved_count, a.approved_total
        if count >= sp.min_approved and amount >= sp.min_amount and amount * count > sp.factor * total:
            score += sp.points
        # impossible_travel: strict "less than".
        it = f.impossible_travel
        if channel in TRAVEL_CHANNELS and a.last_travel is not None:
            country0, stamp0 = a.last_travel
            if country0 != country and stamp - stamp0 < it.window_seconds * US:
                score += it.points
        # new_account: strict "less than".
        na = f.new_account
        if stamp - a.opened_at < na.age_seconds * US and amount >= na.min_amount:
            score += na.points
        # risky_mcc.
        if mcc in f.risky_mcc.mccs:
            score += f.risky_mcc.points
        # merchant_burst: the merchant's last N attempts inside the window.
        mb = f.merchant_burst
        if merchant != 0:
            w = mb.window_seconds * US
            last = self.merchant_attempts.get(merchant, [])[-mb.last_attempts :]
            recent = [ok for s, ok in last if s > stamp - w]
            if sum(1 for ok in recent if not ok) >= mb.declines:
                score += mb.points
        return score

    def _record_attempt(self, a: Account, stamp: int, amount: int, merchant: int, status: str) -> None:
        a.attempt_stamps.append(stamp)
        if amount <= self.cfg.fraud.card_testing.max_amount:
            a.small_attempt_stamps.append(stamp)
        if merchant != 0:
            self.merchant_attempts.setdefault(merchant, []).append((stamp, status in ("approved", "partial")))

    def _refused_attempt(self, req: dict, stamp: int, status: str, acct_id: int, amount: int,
                         merchant: int = 0, currency: int | None = None) -> dict:
        """§10.3: an authorize/purchase naming an existing account in its
        currency (currency given), or a transfer from an existing sender
        (currency None), is an attempt "whatever its answer", even one
        refused as invalid_request or invalid_amount."""
        a = self.accts.get(acct_id)
        if a is not None and (currency is None or currency == a.currency):
            self._record_attempt(a, stamp, amount, merchant, status)
        return self._answer(req, stamp, status)

    # --- operations --------------------------------------------------------------

    def _open(self, req: dict, stamp: int) -> dict:
        rid, acct_id = int(req.get("id", 0)), int(req.get("account", 0))
        currency, kind = int(req.get("currency", 0)), req.get("kind", "wallet")
        credit = int(req.get("credit_limit", 0))
        single = int(req.get("single_limit", 0))
        daily = int(req.get("daily_limit", 0))
        if rid == 0 or acct_id == 0 or currency == 0 or currency > C.currency_max or kind not in ("wallet", "merchant"):
            return self._answer(req, stamp, "invalid_request")
        if not (self._limit_ok(credit) and self._limit_ok(single) and self._limit_ok(daily)):
            return self._answer(req, stamp, "invalid_amount")
        if acct_id in self.accts:
            return self._answer(req, stamp, "account_exists", acct_id)
        self.accts[acct_id] = Account(acct_id, currency, kind, credit, single, daily, opened_at=stamp)
        return self._answer(req, stamp, "approved", acct_id)

    def _deposit_withdraw(self, req: dict, stamp: int, sign: int) -> dict:
        rid, acct_id, amount = int(req.get("id", 0)), int(req.get("account", 0)), int(req.get("amount", 0))
        currency = int(req.get("currency", 0))
        if rid == 0 or acct_id == 0:
            return self._answer(req, stamp, "invalid_request")
        if not self._amount_ok(amount):
            return self._answer(req, stamp, "invalid_amount")
        a = self.accts.get(acct_id)
        if a is None:
            return self._answer(req, stamp, "no_account")
        if currency != 0 and currency != a.currency:
            return self._answer(req, stamp, "currency_mismatch", acct_id)
        if a.status != "active":
            return self._answer(req, stamp, "account_inactive", acct_id)
        if sign < 0 and a.balance - self.held(acct_id) < amount:
            return self._answer(req, stamp, "insufficient_funds", acct_id)
        settle = self.settle.get(a.currency, 0)
        if not (self._in_bounds(a.balance + sign * amount) and self._in_bounds(settle - sign * amount)):
            return self._answer(req, stamp, "invalid_amount", acct_id)
        a.balance += sign * amount
        self.settle[a.currency] = settle - sign * amount
        return self._answer(req, stamp, "approved", acct_id)

    def _deposit(self, req: dict, stamp: int) -> dict:
        return self._deposit_withdraw(req, stamp, +1)

    def _withdraw(self, req: dict, stamp: int) -> dict:
        return self._deposit_withdraw(req, stamp, -1)

    def _authorize(self, req: dict, stamp: int) -> dict:
        return self._spend(req, stamp, purchase=False)

    def _purchase(self, req: dict, stamp: int) -> dict:
        return self._spend(req, stamp, purchase=True)

    def _spend(self, req: dict, stamp: int, purchase: bool) -> dict:
        rid, acct_id, amount = int(req.get("id", 0)), int(req.get("account", 0)), int(req.get("amount", 0))
        merchant, currency = int(req.get("merchant", 0)), int(req.get("currency", 0))
        channel = req.get("channel", "online")
        mcc, country = int(req.get("mcc", 0)), int(req.get("country", 0))
        allow_partial = bool(req.get("allow_partial", False))
        if rid == 0 or acct_id == 0 or merchant == 0 or channel not in CHANNELS:
            return self._refused_attempt(req, stamp, "invalid_request", acct_id, amount, merchant, currency)
        if not self._amount_ok(amount):
            return self._refused_attempt(req, stamp, "invalid_amount", acct_id, amount, merchant, currency)
        a = self.accts.get(acct_id)
        if a is None:
            return self._answer(req, stamp, "no_account")
        if currency != a.currency:
            return self._answer(req, stamp, "currency_mismatch", acct_id)
        # From here on the request is an attempt (recorded after the decision).
        score = self._score(a, stamp, amount, channel, country, mcc, merchant)
        status, approved = self._spend_decision(req, a, stamp, amount, score, allow_partial, purchase, merchant)
        if status in ("approved", "partial"):
            self._apply_spend(req, a, stamp, approved, purchase, merchant, channel, country)
        self._record_attempt(a, stamp, amount, merchant, status)
        return self._answer(req, stamp, status, acct_id, approved, score)

    def _spend_decision(self, req, a, stamp, amount, score, allow_partial, purchase, merchant):
        if a.status != "active":
            return "account_inactive", 0
        if a.kind != "wallet":
            return "not_permitted", 0
        if self._single_exceeded(a, amount):
            return "limit_exceeded", 0
        if self._daily_exceeded(a, stamp, amount):
            return "limit_exceeded", 0
        if self.cfg.fraud.enabled and score >= self.cfg.fraud.decline_score:
            return "suspected_fraud", 0
        avail = self.available(a.id)
        status, approved = "approved", amount
        if amount > avail:
            if allow_partial and avail > 0:
                status, approved = "partial", avail
            else:
                return "insufficient_funds", 0
        if purchase:
            credited = self._merchant_account(merchant, a.currency)
            if credited != a.id and not self._in_bounds(self._credited_balance(credited, a.currency) + approved):
                return "invalid_amount", 0
        return status, approved

    def _apply_spend(self, req, a, stamp, approved, purchase, merchant, channel, country) -> None:
        rid = int(req["id"])
        h = Hold(rid, a.id, merchant, created=stamp, remaining=approved)
        self.hold_map[rid] = h
        if purchase:
            credited = self._merchant_account(merchant, a.currency)
            a.balance -= approved
            self._move_credited(credited, a.currency, +approved)
            h.state, h.captured, h.remaining, h.credited = "captured", approved, 0, credited
        else:
            a.open_holds[rid] = h
            self.by_creation.append((stamp, rid))
        self._add_daily_spend(a, stamp, approved)
        a.approved_count += 1
        a.approved_total += approved
        if channel in TRAVEL_CHANNELS:
            a.last_travel = (int(req.get("country", 0)), stamp)

    def _hold_request(self, req: dict, stamp: int, amount_may_be_zero: bool):
        """Common front of increment/capture/void/refund: (answer, None) or (None, hold)."""
        rid, hid, amount = int(req.get("id", 0)), int(req.get("auth", 0)), int(req.get("amount", 0))
        if rid == 0 or hid == 0:
            return self._answer(req, stamp, "invalid_request"), None
        ok = self._limit_ok(amount) if amount_may_be_zero else self._amount_ok(amount)
        if not ok:
            return self._answer(req, stamp, "invalid_amount"), None
        h = self.hold_map.get(hid)
        if h is None:
            return self._answer(req, stamp, "no_auth"), None
        return None, h

    def _increment(self, req: dict, stamp: int) -> dict:
        ans, h = self._hold_request(req, stamp, amount_may_be_zero=False)
        if ans is not None:
            return ans
        amount = int(req["amount"])
        a = self.accts[h.account]
        if h.state != "open":
            return self._answer(req, stamp, "auth_closed", a.id)
        if a.status != "active":
            return self._answer(req, stamp, "account_inactive", a.id)
        if self._single_exceeded(a, h.remaining + amount):
            return self._answer(req, stamp, "limit_exceeded", a.id)
        if self._daily_exceeded(a, stamp, amount):
            return self._answer(req, stamp, "limit_exceeded", a.id)
        if amount > self.available(a.id):
            return self._answer(req, stamp, "insufficient_funds", a.id)
        h.remaining += amount
        self._add_daily_spend(a, stamp, amount)
        return self._answer(req, stamp, "approved", a.id, amount)

    def _capture(self, req: dict, stamp: int) -> dict:
        ans, h = self._hold_request(req, stamp, amount_may_be_zero=True)
        if ans is not None:
            return ans
        amount = int(req["amount"])
        a = self.accts[h.account]
        if h.state != "open":
            return self._answer(req, stamp, "auth_closed", a.id)
        if amount > h.remaining:
            return self._answer(req, stamp, "amount_exceeds_hold", a.id)
        if amount == 0:
            amount = h.remaining
        credited = self._merchant_account(h.merchant, a.currency)
        if credited != a.id:  # (a payer paying itself moves no balance)
            if not (
                self._in_bounds(a.balance - amount)
                and self._in_bounds(self._credited_balance(credited, a.currency) + amount)
            ):
                return self._answer(req, stamp, "invalid_amount", a.id)
        a.balance -= amount
        self._move_credited(credited, a.currency, +amount)
        self._end_hold(h, "captured")
        h.captured, h.remaining, h.credited = amount, 0, credited
        return self._answer(req, stamp, "approved", a.id, amount)

    def _void(self, req: dict, stamp: int) -> dict:
        ans, h = self._hold_request(req, stamp, amount_may_be_zero=True)
        if ans is not None:
            return ans
        amount = int(req["amount"])
        a = self.accts[h.account]
        if h.state != "open":
            return self._answer(req, stamp, "auth_closed", a.id)
        if amount > h.remaining:
            return self._answer(req, stamp, "amount_exceeds_hold", a.id)
        if amount == 0:
            amount = h.remaining
        h.remaining -= amount
        if h.remaining == 0:
            self._end_hold(h, "voided")
        return self._answer(req, stamp, "approved", a.id, amount)

    def _refund(self, req: dict, stamp: int) -> dict:
        ans, h = self._hold_request(req, stamp, amount_may_be_zero=False)
        if ans is not None:
            return ans
        amount = int(req["amount"])
        a = self.accts[h.account]
        if h.state != "captured":
            return self._answer(req, stamp, "not_captured", a.id)
        if a.status == "closed":
            return self._answer(req, stamp, "account_inactive", a.id)
        if h.refunded + amount > h.captured:
            return self._answer(req, stamp, "amount_exceeds_capture", a.id)
        if h.credited == a.id:
            in_bounds = True  # the payer pays itself back: no balance moves
        else:
            in_bounds = self._in_bounds(a.balance + amount) and self._in_bounds(
                self._credited_balance(h.credited, a.currency) - amount
            )
        if not in_bounds:
            return self._answer(req, stamp, "invalid_amount", a.id)
        a.balance += amount
        self._move_credited(h.credited, a.currency, -amount)
        if h.credited is not None:
            self.accts[h.credited].may_go_negative = True  # refunds debit with no funds check
        h.refunded += amount
        return self._answer(req, stamp, "approved", a.id, amount)

    def _transfer(self, req: dict, stamp: int) -> dict:
        rid, acct_id, amount = int(req.get("id", 0)), int(req.get("account", 0)), int(req.get("amount", 0))
        to_id, currency = int(req.get("to", 0)), int(req.get("currency", 0))
        if rid == 0 or acct_id == 0 or to_id == 0 or to_id == acct_id:
            return self._refused_attempt(req, stamp, "invalid_request", acct_id, amount)
        if not self._amount_ok(amount):
            return self._refused_attempt(req, stamp, "invalid_amount", acct_id, amount)
        a = self.accts.get(acct_id)
        if a is None:
            return self._answer(req, stamp, "no_account")
        # From here on the request is an attempt of the sender.
        score = self._score(a, stamp, amount, "p2p", 0, 0, 0)
        status = self._transfer_decision(a, to_id, currency, stamp, amount, score)
        if status == "approved":
            b = self.accts[to_id]
            a.balance -= amount
            b.balance += amount
            self._add_daily_spend(a, stamp, amount)
            a.approved_count += 1
            a.approved_total += amount
        self._record_attempt(a, stamp, amount, 0, status)
        return self._answer(req, stamp, status, acct_id, amount, score)

    def _transfer_decision(self, a: Account, to_id: int, currency: int, stamp: int, amount: int, score: int) -> str:
        if currency != 0 and currency != a.currency:
            return "currency_mismatch"
        b = self.accts.get(to_id)
        if b is None:
            return "no_account"
        if b.currency != a.currency:
            return "currency_mismatch"
        if b.status != "active":
            return "account_inactive"
        if a.status != "active":
            return "account_inactive"
        if a.kind != "wallet":
            return "not_permitted"
        if self._single_exceeded(a, amount):
            return "limit_exceeded"
        if self._daily_exceeded(a, stamp, amount):
            return "limit_exceeded"
        if self.cfg.fraud.enabled and score >= self.cfg.fraud.decline_score:
            return "suspected_fraud"
        if amount > self.available(a.id):
            return "insufficient_funds"
        if not self._in_bounds(b.balance + amount):
            return "invalid_amount"
        return "approved"

    def _set_limits(self, req: dict, stamp: int) -> dict:
        rid, acct_id = int(req.get("id", 0)), int(req.get("account", 0))
        if rid == 0 or acct_id == 0:
            return self._answer(req, stamp, "invalid_request")
        present = {k: int(req[k]) for k in ("credit_limit", "single_limit", "daily_limit") if k in req}
        if not all(self._limit_ok(v) for v in present.values()):
            return self._answer(req, stamp, "invalid_amount")
        a = self.accts.get(acct_id)
        if a is None:
            return self._answer(req, stamp, "no_account")
        if a.status == "closed":
            return self._answer(req, stamp, "account_inactive", acct_id)
        if "credit_limit" in present and present["credit_limit"] < a.credit_limit:
            a.may_go_negative = True
        for k, v in present.items():
            setattr(a, k, v)
        return self._answer(req, stamp, "approved", acct_id)

    def _status_change(self, req: dict, stamp: int, new_status: str) -> dict:
        rid, acct_id = int(req.get("id", 0)), int(req.get("account", 0))
        if rid == 0 or acct_id == 0:
            return self._answer(req, stamp, "invalid_request")
        a = self.accts.get(acct_id)
        if a is None:
            return self._answer(req, stamp, "no_account")
        currency = int(req.get("currency", 0))
        if currency != 0 and currency != a.currency:  # SPEC §3 common checks
            return self._answer(req, stamp, "currency_mismatch", acct_id)
        if new_status == "closed":
            if self.held(acct_id) != 0 or a.balance != 0:
                return self._answer(req, stamp, "account_not_empty", acct_id)
        elif a.status == "closed":
            return self._answer(req, stamp, "account_inactive", acct_id)
        a.status = new_status
        return self._answer(req, stamp, "approved", acct_id)

    def _freeze(self, req: dict, stamp: int) -> dict:
        return self._status_change(req, stamp, "frozen")

    def _unfreeze(self, req: dict, stamp: int) -> dict:
        return self._status_change(req, stamp, "active")

    def _close(self, req: dict, stamp: int) -> dict:
        return self._status_change(req, stamp, "closed")

    def _issue_card(self, req: dict, stamp: int) -> dict:
        rid, acct_id, pan = int(req.get("id", 0)), int(req.get("account", 0)), str(req.get("pan", ""))
        if rid == 0 or acct_id == 0:
            return self._answer(req, stamp, "invalid_request")
        a = self.accts.get(acct_id)
        if a is None:
            return self._answer(req, stamp, "no_account")
        if a.status == "closed":
            return self._answer(req, stamp, "account_inactive", acct_id)
        if not (PAN_RE.fullmatch(pan) and luhn_valid(pan)):
            return self._answer(req, stamp, "invalid_card", acct_id)
        if self.cards.get(pan, acct_id) != acct_id:
            return self._answer(req, stamp, "invalid_card", acct_id)
        self.cards[pan] = acct_id
        return self._answer(req, stamp, "approved", acct_id)

    # --- test aids -----------------------------------------------------------------

    def card_account(self, pan: str) -> int | None:
        return self.cards.get(pan)
