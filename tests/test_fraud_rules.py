"""Each fraud rule of SPEC §5 at its boundary, on the model and the engine.

Every rule is isolated: the others get 0 points, ``review_score`` is 1 and
``decline_score`` out of reach, so an approval's ``review`` says exactly
whether the rule fired.  Boundaries: a count at the threshold against one
below; a window's oldest attempt exactly ``window`` old (does not count)
against one µs younger (counts); strict "less than" for impossible_travel
and new_account.  The clock is injected and set to exact stamps.
"""

from __future__ import annotations

import pytest

from authcore import constants as C
from authcore.config import Config

from conftest import EPOCH_US, FakeClock, Session

USD, EUR = 840, 978
MERCHANT, OTHER_MERCHANT = 900_001, 900_002
US = C.us_per_s
RULES = ("velocity", "card_testing", "amount_spike", "impossible_travel", "new_account", "risky_mcc", "merchant_burst")
OLD = 10 * C.us_per_day  # accounts opened this long before a test are not "new"


def only(rule: str, **params) -> dict:
    """A config dict where ``rule`` alone scores, and any score reviews."""
    fraud: dict = {r: {"points": 0} for r in RULES if r != rule}
    fraud[rule] = params
    fraud.update(review_score=1, decline_score=10**9)
    return {"fraud": fraud}


def session(impl_factory, cfg: dict | None = None, start: int = EPOCH_US) -> Session:
    clock = FakeClock(start)
    config = Config.from_dict(cfg) if cfg is not None else None
    return Session(impl_factory(config, clock), clock)


def wallet(api: Session, account: int, amount: int = 10**9, currency: int = USD, **limits) -> None:
    """A funded wallet opened long ago (so new_account never fires)."""
    now = api.clock.now
    api.clock.set(now - OLD)
    api.funded(account, amount, currency=currency, **limits)
    api.clock.set(now)


def auth(api: Session, account: int, amount: int, **kw) -> dict:
    fields = dict(account=account, amount=amount, currency=USD, merchant=MERCHANT, mcc=5411, channel="online", country=840)
    fields.update(kw)
    return api("authorize", **fields)


def fired(ans: dict) -> bool:
    assert ans["status"] in ("approved", "partial"), ans
    return ans["review"]


# --- velocity -----------------------------------------------------------------


@pytest.mark.parametrize("earlier, expected", [(9, False), (10, True)])
def test_velocity_threshold(impl_factory, earlier, expected):
    api = session(impl_factory, only("velocity"))
    wallet(api, 1)
    for _ in range(earlier):
        assert not fired(auth(api, 1, 1000))
    assert fired(auth(api, 1, 1000)) is expected


@pytest.mark.parametrize("age_offset, expected", [(0, False), (-1, True)])
def test_velocity_window_edge(impl_factory, age_offset, expected):
    window = 60 * US
    api = session(impl_factory, only("velocity", window_seconds=60))
    wallet(api, 1)
    stamps = [auth(api, 1, 1000)["stamp"] for _ in range(10)]
    api.clock.set(stamps[0] + window + age_offset)  # the oldest is exactly `window` old, or 1 µs younger
    ans = auth(api, 1, 1000)
    assert ans["stamp"] == stamps[0] + window + age_offset
    assert fired(ans) is expected


def test_velocity_counts_declines_and_transfers(impl_factory):
    api = session(impl_factory, only("velocity"))
    wallet(api, 1, amount=100)
    wallet(api, 2)
    for _ in range(4):
        assert auth(api, 1, 10**6)["status"] == "insufficient_funds"
    for _ in range(3):
        assert api("transfer", account=1, to=2, amount=10**6)["status"] == "insufficient_funds"
    assert api("transfer", account=1, to=3, amount=5)["status"] == "no_account"  # sender's attempt
    assert api("transfer", account=1, to=2, amount=5, currency=EUR)["status"] == "currency_mismatch"
    assert api("purchase", account=1, amount=5, currency=USD, merchant=MERCHANT)["status"] == "approved"
    assert fired(auth(api, 1, 10))  # 10 earlier attempts


def test_velocity_ignores_non_attempts(impl_factory):
    api = session(impl_factory, only("velocity"))
    wallet(api, 1)
    wallet(api, 2)
    first = auth(api, 1, 100)
    for _ in range(8):
        auth(api, 1, 100)
    assert auth(api, 1, 100, currency=EUR)["status"] == "currency_mismatch"  # not in its currency
    assert auth(api, 1, 0, currency=EUR)["status"] == "invalid_amount"  # nor this one
    assert auth(api, 99, 5)["status"] == "no_account"  # names no existing account
    assert api("transfer", account=2, to=1, amount=5)["status"] == "approved"  # the receiver's: no
    assert auth(api, 1, 100, id=first["id"]) == first  # a repeat is no attempt
    hold = auth(api, 1, 100)  # the 10th attempt
    assert api("increment", auth=hold["id"], amount=5)["status"] == "approved"  # not an attempt
    assert not fired(hold)
    assert fired(auth(api, 1, 100))


def test_velocity_counts_probes_refused_before_the_account_check(impl_factory):
    """SPEC §10.3: an attempt "whatever its answer": an authorize naming an
    existing account in its currency, refused invalid_amount or
    invalid_request, and a transfer from an existing sender refused so."""
    api = session(impl_factory, only("velocity"))
    wallet(api, 1)
    wallet(api, 2)
    for _ in range(3):
        auth(api, 1, 100)
    assert auth(api, 1, 0)["status"] == "invalid_amount"
    assert auth(api, 1, -5)["status"] == "invalid_amount"
    assert auth(api, 1, 10**15 + 1)["status"] == "invalid_amount"
    assert auth(api, 1, 5, merchant=0)["status"] == "invalid_request"
    assert api("transfer", account=1, to=1, amount=5)["status"] == "invalid_request"
    assert not fired(auth(api, 1, 100))  # sees 8 earlier attempts: none counted twice
    assert api("transfer", account=1, to=2, amount=0)["status"] == "invalid_amount"
    # Exactly 10 earlier attempts only if every refused one above counted.
    assert fired(auth(api, 1, 100))


# --- card_testing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "amounts, expected",
    [
        ([200] * 4, False),
        ([200] * 5, True),
        ([1, 2, 3, 200, 201], False),
        ([1, 2, 3, 200, 201, 5], True),
    ],
)
def test_card_testing_threshold(impl_factory, amounts, expected):
    api = session(impl_factory, only("card_testing"))
    wallet(api, 1)
    for a in amounts:
        assert not fired(auth(api, 1, a))
    assert fired(auth(api, 1, 50_000)) is expected  # the current amount need not be small


@pytest.mark.parametrize("age_offset, expected", [(0, False), (-1, True)])
def test_card_testing_window_edge(impl_factory, age_offset, expected):
    window = 600 * US
    api = session(impl_factory, only("card_testing", window_seconds=600))
    wallet(api, 1)
    stamps = [auth(api, 1, 100)["stamp"] for _ in range(5)]
    api.clock.set(stamps[0] + window + age_offset)
    assert fired(auth(api, 1, 100)) is expected


def test_card_testing_counts_declined_small_attempts(impl_factory):
    api = session(impl_factory, only("card_testing"))
    wallet(api, 1, amount=0)
    for _ in range(5):
        assert auth(api, 1, 150)["status"] == "insufficient_funds"
    api("deposit", account=1, amount=10**6)
    assert fired(auth(api, 1, 150))


# --- amount_spike ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spends, amount, expected",
    [
        ([5000] * 5, 50_000, False),  # 50,000 x 5 == 10 x 25,000: not "more than"
        ([5000] * 5, 50_001, True),
        ([5000] * 4, 10**6, False),  # 4 approved spends only
        ([1000] * 5, 49_999, False),  # under min_amount although 10x the mean
        ([1000] * 5, 50_000, True),
    ],
)
def test_amount_spike_threshold(impl_factory, spends, amount, expected):
    api = session(impl_factory, only("amount_spike"))
    wallet(api, 1)
    for s in spends:
        assert not fired(auth(api, 1, s))
    assert fired(auth(api, 1, amount)) is expected


def test_amount_spike_counts_approved_spends_only(impl_factory):
    api = session(impl_factory, only("amount_spike"))
    wallet(api, 1, amount=4000)
    wallet(api, 2)
    h = auth(api, 1, 1000)
    assert api("increment", auth=h["id"], amount=1000)["status"] == "approved"  # not a spend
    assert api("transfer", account=1, to=2, amount=1000)["status"] == "approved"  # a spend
    assert api("purchase", account=1, amount=500, currency=USD, merchant=MERCHANT)["status"] == "approved"
    assert auth(api, 1, 10**6)["status"] == "insufficient_funds"  # declined: no spend
    ans = auth(api, 1, 10**6, allow_partial=True)  # partial: counts at the approved amount (500)
    assert ans["status"] == "partial" and ans["approved_amount"] == 500 and not ans["review"]
    # 4 approved spends so far (1000 + 1000 + 500 + 500 = 3000): not yet.
    api("deposit", account=1, amount=10**9)
    assert not fired(auth(api, 1, 50_000))
    # 5 spends, total 53,000: 10x the mean is 106,000.
    assert not fired(auth(api, 1, 106_000))
    # 6 spends, total 159,000: amount x 6 > 1,590,000 <=> amount > 265,000.
    assert not fired(auth(api, 1, 265_000))
    api2 = session(impl_factory, only("amount_spike"))
    wallet(api2, 1)
    for s in (1000, 1000, 500, 500, 50_000, 106_000):
        auth(api2, 1, s)
    assert fired(auth(api2, 1, 265_001))


# --- impossible_travel ---------------------------------------------------------------


@pytest.mark.parametrize("elapsed_offset, expected", [(0, False), (-1, True)])
def test_impossible_travel_strict_window(impl_factory, elapsed_offset, expected):
    window = 3600 * US
    api = session(impl_factory, only("impossible_travel"))
    wallet(api, 1)
    first = auth(api, 1, 1000, channel="qr", country=840)
    api.clock.set(first["stamp"] + window + elapsed_offset)
    ans = auth(api, 1, 1000, channel="card_present", country=156)
    assert ans["stamp"] - first["stamp"] == window + elapsed_offset
    assert fired(ans) is expected


@pytest.mark.parametrize(
    "channel, country, expected",
    [("qr", 156, True), ("card_present", 156, True), ("online", 156, False), ("qr", 840, False)],
)
def test_impossible_travel_channel_and_country(impl_factory, channel, country, expected):
    api = session(impl_factory, only("impossible_travel"))
    wallet(api, 1)
    assert api("purchase", account=1, amount=10, currency=USD, merchant=MERCHANT, channel="card_present", country=840)[
        "status"
    ] == "approved"
    assert fired(auth(api, 1, 10, channel=channel, country=country)) is expected


def test_impossible_travel_only_approved_qr_card_present(impl_factory):
    api = session(impl_factory, only("impossible_travel"))
    wallet(api, 1, amount=100)
    assert not fired(auth(api, 1, 10, channel="qr", country=840))
    # A declined card_present attempt abroad and an approved online one do not move "last travel".
    assert auth(api, 1, 10**6, channel="card_present", country=156)["status"] == "insufficient_funds"
    assert not fired(auth(api, 1, 10, channel="online", country=156))
    assert not fired(auth(api, 1, 10, channel="qr", country=840))
    # A transfer (p2p) neither scores nor travels.
    wallet(api, 2)
    assert not api("transfer", account=1, to=2, amount=10)["review"]
    assert fired(auth(api, 1, 10, channel="qr", country=250))  # 840 -> 250
    assert fired(auth(api, 1, 10, channel="qr", country=840))  # a partial/approved one moved it to 250


# --- new_account -------------------------------------------------------------------------


@pytest.mark.parametrize("age_offset, amount, expected", [(-1, 100_000, True), (0, 100_000, False), (-1, 99_999, False)])
def test_new_account_strict_age(impl_factory, age_offset, amount, expected):
    age = 86_400 * US
    api = session(impl_factory, only("new_account"))
    opened = api("open", account=1, currency=USD, kind="wallet")["stamp"]
    api("deposit", account=1, amount=10**9)
    api.clock.set(opened + age + age_offset)
    ans = auth(api, 1, amount)
    assert ans["stamp"] - opened == age + age_offset
    assert fired(ans) is expected


def test_new_account_scores_transfers(impl_factory):
    api = session(impl_factory, only("new_account"))
    api.funded(1, 10**9)
    api.funded(2, 0)
    assert api("transfer", account=1, to=2, amount=100_000)["review"]
    assert not api("transfer", account=1, to=2, amount=99_999)["review"]


# --- risky_mcc -------------------------------------------------------------------------


@pytest.mark.parametrize("mcc, expected", [(7995, True), (4829, True), (6051, True), (6211, True), (7994, False), (0, False)])
def test_risky_mcc(impl_factory, mcc, expected):
    api = session(impl_factory, only("risky_mcc"))
    wallet(api, 1)
    assert fired(auth(api, 1, 1000, mcc=mcc)) is expected


def test_risky_mcc_configured_list(impl_factory):
    api = session(impl_factory, only("risky_mcc", mccs=[5411]))
    wallet(api, 1)
    assert fired(auth(api, 1, 1000, mcc=5411))
    assert not fired(auth(api, 1, 1000, mcc=7995))


# --- merchant_burst ---------------------------------------------------------------------


def declines_at(api: Session, merchant: int, n: int) -> list[int]:
    """n non-approved attempts at ``merchant``, of several kinds and accounts; their stamps."""
    stamps = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            ans = auth(api, 90, 10**6, merchant=merchant)  # insufficient_funds
        elif kind == 1:
            ans = auth(api, 91, 10, merchant=merchant)  # account_inactive (frozen)
        else:
            ans = auth(api, 92, 10**6, merchant=merchant)  # limit_exceeded (single limit)
        assert ans["status"] in ("insufficient_funds", "account_inactive", "limit_exceeded"), ans
        stamps.append(ans["stamp"])
    return stamps


def burst_session(impl_factory, **params) -> Session:
    api = session(impl_factory, only("merchant_burst", **params))
    wallet(api, 1)
    wallet(api, 90, amount=100)
    wallet(api, 91)
    api("freeze", account=91)
    wallet(api, 92, single_limit=100)
    return api


@pytest.mark.parametrize("declines, expected", [(9, False), (10, True)])
def test_merchant_burst_threshold(impl_factory, declines, expected):
    api = burst_session(impl_factory)
    declines_at(api, MERCHANT, declines)
    assert fired(auth(api, 1, 1000, merchant=OTHER_MERCHANT)) is False
    assert fired(auth(api, 1, 1000)) is expected


@pytest.mark.parametrize("approvals, expected", [(10, True), (11, False)])
def test_merchant_burst_last_attempts(impl_factory, approvals, expected):
    api = burst_session(impl_factory)
    declines_at(api, MERCHANT, 10)
    for _ in range(approvals - 1):
        assert auth(api, 1, 10)["status"] == "approved"
    # A partial counts as approved.
    api.funded(5, 5)
    assert auth(api, 5, 10, allow_partial=True)["status"] == "partial"
    assert fired(auth(api, 1, 1000)) is expected


@pytest.mark.parametrize("age_offset, expected", [(0, False), (-1, True)])
def test_merchant_burst_window_edge(impl_factory, age_offset, expected):
    window = 600 * US
    api = burst_session(impl_factory)
    stamps = declines_at(api, MERCHANT, 10)
    api.clock.set(stamps[0] + window + age_offset)
    assert fired(auth(api, 1, 1000)) is expected


def test_merchant_burst_counts_purchases_and_ignores_transfers(impl_factory):
    api = burst_session(impl_factory)
    wallet(api, 2)
    for _ in range(10):
        ans = api("purchase", account=90, amount=10**6, currency=USD, merchant=MERCHANT)
        assert ans["status"] == "insufficient_funds"
    assert fired(api("purchase", account=1, amount=10, currency=USD, merchant=MERCHANT))
    api2 = burst_session(impl_factory)
    wallet(api2, 2)
    for _ in range(10):
        assert api2("transfer", account=90, to=2, amount=10**6)["status"] == "insufficient_funds"
    assert not fired(auth(api2, 1, 10))


# --- thresholds (defaults: review 50, decline 80) ---------------------------------------------


def test_review_and_decline_thresholds(impl_factory):
    # velocity alone: 40 < 50, no review.
    api = session(impl_factory)
    wallet(api, 1)
    for _ in range(10):
        auth(api, 1, 1000)
    assert not fired(auth(api, 1, 1000))
    # impossible_travel alone: exactly 50, review.
    api = session(impl_factory)
    wallet(api, 1)
    auth(api, 1, 1000, channel="qr", country=840)
    assert fired(auth(api, 1, 1000, channel="qr", country=156))
    # travel 50 + risky_mcc 20 = 70: approved with review.
    assert fired(auth(api, 1, 1000, channel="qr", country=840, mcc=7995))
    # travel 50 + new_account 30 = 80 = decline_score: suspected_fraud.
    api = session(impl_factory)
    api.funded(1, 10**9)
    auth(api, 1, 1000, channel="qr", country=840)
    ans = auth(api, 1, 100_000, channel="qr", country=156)
    assert ans["status"] == "suspected_fraud" and ans["code"] == "59"
    assert api.query(1)["held"] == 1000
    # ... 79 is not: a config with decline_score 81 approves the same.
    api = session(impl_factory, {"fraud": {"decline_score": 81}})
    api.funded(1, 10**9)
    auth(api, 1, 1000, channel="qr", country=840)
    assert fired(auth(api, 1, 100_000, channel="qr", country=156))


def run_many(impl, reqs: list[dict]) -> list[dict]:
    """Many requests: as engine batches when the implementation has them."""
    if hasattr(impl, "execute_many"):
        out: list[dict] = []
        for i in range(0, len(reqs), 4096):
            out.extend(impl.execute_many(reqs[i : i + 4096]))
        return out
    return [impl.execute(r) for r in reqs]


@pytest.mark.parametrize("amount, expected", [(10**15 - 10, False), (10**15 - 9, True)])
def test_amount_spike_exact_beyond_64_bits(impl_factory, amount, expected):
    """amount x count and factor x total exceed 2^64 here: the comparison must stay exact."""
    spends, each = 20_000, 10**14 - 1  # total ~2e18: 10 x total ~2e19 > 2^64
    api = session(impl_factory, only("amount_spike"))
    wallet(api, 1, amount=10**15)
    reqs = []
    for i in range(spends):
        rid = 10_000 + 2 * i
        reqs.append(dict(op="authorize", id=rid, account=1, amount=each, currency=USD, merchant=MERCHANT))
        reqs.append(dict(op="void", id=rid + 1, auth=rid, amount=0))
    answers = run_many(api.impl, reqs)
    assert all(a["status"] == "approved" for a in answers)
    assert (amount * spends > 10 * spends * each) is expected  # the arithmetic the rule must do
    assert fired(auth(api, 1, amount)) is expected
