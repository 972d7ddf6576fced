"""Every status of SPEC §6 reached on purpose, on the model and the engine.

Each test drives one implementation (the ``api`` fixture runs it twice:
reference model, Cython engine) into one status and checks the code and
the state the answer implies, so a kernel that gets the right status by
accident still fails on the numbers.
"""

from __future__ import annotations

import pytest

from authcore import constants as C
from authcore.cards import luhn_valid
from authcore.config import Config

from conftest import FakeClock, Session

USD, EUR = 840, 978
MERCHANT = 900_001
DAY0 = 19_675  # a UTC day number (2023-11-14)


def with_check_digit(body: str) -> str:
    """``body`` plus the digit that makes it Luhn-valid."""
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError(body)


PAN_A = "4111111111111111"  # Luhn-valid test PANs
PAN_B = "5500000000000004"
PAN_12 = with_check_digit("41111111111")  # the shortest valid length
PAN_19 = with_check_digit("411111111111111111")  # the longest
assert len(PAN_12) == 12 and len(PAN_19) == 19


def code_of(status: str) -> str:
    return C.STATUS_CODE[C.Status[status]]


def check(ans: dict, status: str) -> dict:
    assert ans["status"] == status, ans
    assert ans["code"] == code_of(status), ans
    return ans


def auth(api: Session, account: int, amount: int, **kw) -> dict:
    fields = dict(account=account, amount=amount, currency=USD, merchant=MERCHANT, mcc=5411, channel="online", country=840)
    fields.update(kw)
    return api("authorize", **fields)


# --- approved / partial ----------------------------------------------------------


def test_approved_lifecycle(api):
    check(api("open", account=1, currency=USD, kind="wallet", credit_limit=500), "approved")
    check(api("open", account=MERCHANT, currency=USD, kind="merchant"), "approved")
    ans = check(api("deposit", account=1, amount=1000), "approved")
    assert ans["available"] == 1500
    ans = check(auth(api, 1, 1200), "approved")
    assert ans["approved_amount"] == 1200 and ans["available"] == 300
    assert ans["review"] is False and len(ans["auth_code"]) == 6
    hold = ans["id"]
    check(api("increment", auth=hold, amount=100), "approved")
    ans = check(api("capture", auth=hold, amount=0), "approved")  # 0 = the whole hold
    assert ans["available"] == 200
    q = api.query(1)
    assert (q["balance"], q["held"], q["credit_limit"], q["available"]) == (-300, 0, 500, 200)
    assert q["account_status"] == "active" and q["status"] == "approved" and q["code"] == "00"
    assert api.query(MERCHANT)["balance"] == 1300
    check(api("refund", auth=hold, amount=300), "approved")
    assert api.query(1)["balance"] == 0
    assert api.query(MERCHANT)["balance"] == 1000
    check(api("withdraw", account=MERCHANT, amount=1000), "approved")  # merchants withdraw takings
    check(api("freeze", account=1), "approved")
    check(api("unfreeze", account=1), "approved")
    check(api("set_limits", account=1, credit_limit=0), "approved")
    check(api("issue_card", account=1, pan=PAN_A), "approved")
    check(api("close", account=1), "approved")
    assert api.query(1)["account_status"] == "closed"


def test_approved_purchase_and_transfer(api):
    api.funded(1, 1000)
    api.open(2)
    ans = check(api("purchase", account=1, amount=400, currency=USD, merchant=MERCHANT, channel="qr", country=156), "approved")
    assert ans["approved_amount"] == 400 and ans["available"] == 600 and "auth_code" in ans
    ans = check(api("transfer", account=1, to=2, amount=600), "approved")
    assert ans["approved_amount"] == 600 and ans["available"] == 0 and ans["review"] is False
    assert "auth_code" not in ans
    assert api.query(2)["balance"] == 600
    check(api("refund", auth=ans["id"] - 1, amount=400), "approved")  # a purchase is refunded by its id
    assert api.query(1)["balance"] == 400


def test_partial(api):
    api.funded(1, 700, credit_limit=100)
    ans = check(auth(api, 1, 1000, allow_partial=True), "partial")
    assert ans["approved_amount"] == 800 and ans["available"] == 0 and "auth_code" in ans
    # Nothing left: partial cannot approve 0.
    check(auth(api, 1, 10, allow_partial=True), "insufficient_funds")
    # Partial purchase moves the approved amount only.
    api.funded(2, 50)
    ans = check(api("purchase", account=2, amount=80, currency=USD, merchant=MERCHANT, allow_partial=True), "partial")
    assert ans["approved_amount"] == 50 and api.query(2)["balance"] == 0


# --- invalid_amount / invalid_request --------------------------------------------


@pytest.mark.parametrize("amount", [0, -1, -(10**15), C.amount_max + 1, 2**63 - 1])
def test_invalid_amount_bad_amounts(api, amount):
    api.funded(1, 10)
    ans = check(api("deposit", account=1, amount=amount), "invalid_amount")
    assert "stamp" in ans
    check(api("withdraw", account=1, amount=amount), "invalid_amount")
    check(auth(api, 1, amount), "invalid_amount")
    check(api("transfer", account=1, to=2, amount=amount), "invalid_amount")
    if amount < 0 or amount > C.amount_max:  # capture/void take 0 as "all"
        check(api("capture", auth=77, amount=amount), "invalid_amount")
        check(api("void", auth=77, amount=amount), "invalid_amount")
    check(api("refund", auth=77, amount=amount), "invalid_amount")
    check(api("increment", auth=77, amount=amount), "invalid_amount")
    assert api.query(1)["balance"] == 10


def test_amount_max_is_valid(api):
    api.open(1)
    check(api("deposit", account=1, amount=C.amount_max), "approved")
    assert api.query(1)["balance"] == C.amount_max


@pytest.mark.parametrize("field", ["credit_limit", "single_limit", "daily_limit"])
@pytest.mark.parametrize("value", [-1, C.limit_max + 1])
def test_invalid_amount_bad_limits(api, field, value):
    check(api("open", account=1, currency=USD, kind="wallet", **{field: value}), "invalid_amount")
    check(api("open", account=1, currency=USD, kind="wallet", **{field: C.limit_max}), "approved")
    check(api("set_limits", account=1, **{field: value}), "invalid_amount")
    check(api("set_limits", account=99, **{field: value}), "invalid_amount")  # IA before no_account


def test_invalid_amount_balance_bound(api):
    """±2^62 applies to every balance, the settlement's included (§10.10)."""
    api.open(1)
    api.open(2, credit_limit=100)
    check(api("deposit", account=2, amount=10), "approved")
    full = C.balance_bound // C.amount_max  # 4611 deposits of 10^15 fit
    for _ in range(full):
        check(api("deposit", account=1, amount=C.amount_max), "approved")
    rest = C.balance_bound - full * C.amount_max - 10
    check(api("deposit", account=1, amount=rest + 1), "invalid_amount")  # settlement below -2^62
    check(api("deposit", account=1, amount=rest), "approved")  # settlement exactly -2^62
    assert api.query(1)["balance"] == C.balance_bound - 10
    check(api("deposit", account=2, amount=1), "invalid_amount")
    check(api("transfer", account=2, to=1, amount=11), "invalid_amount")  # receiver above 2^62
    assert api.query(2)["balance"] == 10
    check(api("transfer", account=2, to=1, amount=10), "approved")  # exactly 2^62 is inside
    assert api.query(1)["balance"] == C.balance_bound
    check(api("withdraw", account=1, amount=5), "approved")
    check(api("deposit", account=2, amount=5), "approved")
    check(api("deposit", account=2, amount=1), "invalid_amount")


def test_invalid_request(api):
    api.funded(1, 100)
    api.open(2)
    check(api("deposit", id=0, account=1, amount=5), "invalid_request")
    check(api("deposit", account=0, amount=5), "invalid_request")
    check(api("deposit", account=0, amount=0), "invalid_request")  # IR before IA
    check(api("transfer", account=1, to=1, amount=5), "invalid_request")
    check(api("transfer", account=1, to=0, amount=5), "invalid_request")
    check(auth(api, 1, 5, merchant=0), "invalid_request")
    check(api("open", account=3, currency=0, kind="wallet"), "invalid_request")
    check(api("open", account=0, currency=USD, kind="wallet"), "invalid_request")
    check(api("capture", auth=0, amount=0), "invalid_request")
    check(api("freeze", account=0), "invalid_request")
    check(api("close", account=0), "invalid_request")
    check(api("issue_card", account=0, pan=PAN_A), "invalid_request")
    assert api.query(1)["balance"] == 100


def test_id_zero_is_not_remembered(api):
    api.open(1)
    check(api("deposit", id=0, account=1, amount=5), "invalid_request")
    check(api("deposit", id=0, account=1, amount=5), "invalid_request")
    a1 = check(api("deposit", id=5, account=0, amount=5), "invalid_request")
    a2 = api("deposit", id=5, account=1, amount=5)
    assert a2 == a1  # an IR with a non-zero id is remembered


# --- currency_mismatch / no_account / account_exists ----------------------------------


def test_currency_mismatch(api):
    api.funded(1, 100)
    api.funded(2, 100, currency=EUR)
    check(api("deposit", account=1, amount=5, currency=EUR), "currency_mismatch")
    check(api("deposit", account=1, amount=5, currency=USD), "approved")
    check(api("withdraw", account=1, amount=5, currency=EUR), "currency_mismatch")
    check(auth(api, 1, 5, currency=EUR), "currency_mismatch")
    check(auth(api, 1, 5, currency=0), "currency_mismatch")  # authorize must name it
    check(api("transfer", account=1, to=2, amount=5), "currency_mismatch")
    check(api("transfer", account=1, to=2, amount=5, currency=EUR), "currency_mismatch")
    assert api.query(1)["balance"] == 105 and api.query(2)["balance"] == 100


def test_no_account(api):
    api.funded(1, 100)
    assert "available" not in check(api("deposit", account=2, amount=5), "no_account")
    check(api("withdraw", account=2, amount=5), "no_account")
    check(auth(api, 2, 5), "no_account")
    check(api("transfer", account=2, to=1, amount=5), "no_account")
    ans = check(api("transfer", account=1, to=2, amount=5), "no_account")
    assert ans["available"] == 100  # the sender's
    check(api("set_limits", account=2, credit_limit=5), "no_account")
    check(api("freeze", account=2), "no_account")
    check(api("close", account=2), "no_account")
    check(api("issue_card", account=2, pan=PAN_A), "no_account")
    q = check(api.query(2), "no_account")
    assert "balance" not in q
    check(api.query(0), "invalid_request")  # SPEC §3: anything naming account 0


def test_account_exists(api):
    api.funded(1, 100)
    ans = check(api("open", account=1, currency=EUR, kind="merchant", credit_limit=7), "account_exists")
    assert ans["available"] == 100
    q = api.query(1)
    assert q["balance"] == 100 and q["credit_limit"] == 0


# --- insufficient_funds ------------------------------------------------------------------


def test_insufficient_funds(api):
    api.funded(1, 100, credit_limit=1000)
    check(api("withdraw", account=1, amount=101), "insufficient_funds")  # no credit for withdrawals
    hold = check(auth(api, 1, 60), "approved")["id"]
    check(api("withdraw", account=1, amount=41), "insufficient_funds")  # balance - held
    check(api("withdraw", account=1, amount=40), "approved")
    check(auth(api, 1, 1001), "insufficient_funds")  # available is 1000 now
    check(api("transfer", account=1, to=2, amount=5), "no_account")
    api.open(2)
    check(api("transfer", account=1, to=2, amount=1001, allow_partial=True), "insufficient_funds")
    check(api("increment", auth=hold, amount=1001), "insufficient_funds")
    check(api("increment", auth=hold, amount=1000), "approved")
    assert api.query(1)["available"] == 0


def test_lowered_credit_makes_available_negative(api):
    api.funded(1, 100, credit_limit=500)
    check(auth(api, 1, 550), "approved")
    check(api("set_limits", account=1, credit_limit=0), "approved")
    assert api.query(1)["available"] == -450
    check(auth(api, 1, 1, allow_partial=True), "insufficient_funds")
    check(api("deposit", account=1, amount=451), "approved")
    check(auth(api, 1, 1), "approved")


# --- holds: no_auth, auth_closed, amount_exceeds_hold, not_captured, amount_exceeds_capture --


def test_no_auth(api):
    api.funded(1, 100)
    for op in ("increment", "capture", "void", "refund"):
        ans = check(api(op, auth=4242, amount=5), "no_auth")
        assert "available" not in ans
    declined = check(auth(api, 1, 500), "insufficient_funds")["id"]
    check(api("capture", auth=declined, amount=0), "no_auth")  # a decline creates no hold


def test_amount_exceeds_hold(api):
    api.funded(1, 100)
    hold = check(auth(api, 1, 60), "approved")["id"]
    check(api("capture", auth=hold, amount=61), "amount_exceeds_hold")
    check(api("void", auth=hold, amount=61), "amount_exceeds_hold")
    check(api("void", auth=hold, amount=20), "approved")
    check(api("capture", auth=hold, amount=41), "amount_exceeds_hold")
    ans = check(api("capture", auth=hold, amount=40), "approved")
    assert ans["available"] == 60
    assert api.query(1)["held"] == 0


def test_auth_closed(api):
    api.funded(1, 100)
    h1 = check(auth(api, 1, 10), "approved")["id"]
    check(api("capture", auth=h1, amount=5), "approved")  # partial capture closes the hold
    assert api.query(1)["held"] == 0
    for op in ("capture", "void", "increment"):
        check(api(op, auth=h1, amount=1), "auth_closed")
    h2 = check(auth(api, 1, 10), "approved")["id"]
    check(api("void", auth=h2, amount=4), "approved")
    check(api("void", auth=h2, amount=0), "approved")  # 0 = the rest; closes it
    check(api("capture", auth=h2, amount=0), "auth_closed")
    p = check(api("purchase", account=1, amount=10, currency=USD, merchant=MERCHANT), "approved")["id"]
    check(api("capture", auth=p, amount=0), "auth_closed")


def test_hold_expiry_exact(impl_factory):
    clock = FakeClock()
    ttl_s = 30
    api = Session(impl_factory(Config.default().replace(hold_ttl_seconds=ttl_s), clock), clock)
    api.funded(1, 100)
    ans = check(auth(api, 1, 60), "approved")
    created = ans["stamp"]
    clock.set(created + ttl_s * C.us_per_s - 1)
    q = api.query(1)  # one µs before expiry: still held
    assert q["held"] == 60
    clock.set(created + ttl_s * C.us_per_s)
    q = api.query(1)  # the query's stamp is exactly at expiry: released
    assert q["held"] == 0 and q["available"] == 100
    check(api("capture", auth=ans["id"], amount=0), "auth_closed")
    check(api("increment", auth=ans["id"], amount=1), "auth_closed")
    check(api("refund", auth=ans["id"], amount=1), "not_captured")


def test_increment_does_not_extend_expiry(impl_factory):
    clock = FakeClock()
    api = Session(impl_factory(Config.default().replace(hold_ttl_seconds=10), clock), clock)
    api.funded(1, 100)
    ans = check(auth(api, 1, 10), "approved")
    clock.advance(9 * C.us_per_s)
    check(api("increment", auth=ans["id"], amount=5), "approved")
    clock.set(ans["stamp"] + 10 * C.us_per_s)
    check(api("capture", auth=ans["id"], amount=0), "auth_closed")
    assert api.query(1)["held"] == 0


def test_not_captured(api):
    api.funded(1, 100)
    h = check(auth(api, 1, 10), "approved")["id"]
    ans = check(api("refund", auth=h, amount=5), "not_captured")
    assert ans["available"] == 90
    check(api("void", auth=h, amount=0), "approved")
    check(api("refund", auth=h, amount=5), "not_captured")


def test_amount_exceeds_capture(api):
    api.funded(1, 100)
    api.open(MERCHANT, kind="merchant")
    h = check(auth(api, 1, 50), "approved")["id"]
    check(api("capture", auth=h, amount=30), "approved")
    check(api("refund", auth=h, amount=31), "amount_exceeds_capture")
    check(api("refund", auth=h, amount=20), "approved")
    check(api("refund", auth=h, amount=11), "amount_exceeds_capture")
    check(api("refund", auth=h, amount=10), "approved")
    check(api("refund", auth=h, amount=1), "amount_exceeds_capture")
    assert api.query(1)["balance"] == 100 and api.query(MERCHANT)["balance"] == 0


def test_refund_without_funds_check_and_closed_payer(api):
    api.funded(1, 100)
    api.open(MERCHANT, kind="merchant")
    p = check(api("purchase", account=1, amount=80, currency=USD, merchant=MERCHANT), "approved")["id"]
    check(api("withdraw", account=MERCHANT, amount=80), "approved")
    check(api("refund", auth=p, amount=30), "approved")  # merchant goes negative: no funds check
    assert api.query(MERCHANT)["balance"] == -30
    check(api("withdraw", account=1, amount=50), "approved")
    check(api("close", account=1), "approved")
    check(api("refund", auth=p, amount=10), "account_inactive")


# --- invalid_card ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pan",
    ["4111111111111112", "00000000000", "0" * 20, "41111111111111a1", "", "4111 1111 1111 1111"],
)
def test_invalid_card(api, pan):
    api.open(1)
    ans = check(api("issue_card", account=1, pan=pan), "invalid_card")
    assert ans["available"] == 0


def test_invalid_card_bound_elsewhere(api):
    api.open(1)
    api.open(2)
    for pan in (PAN_A, PAN_12, PAN_19):
        check(api("issue_card", account=1, pan=pan), "approved")
    check(api("issue_card", account=1, pan=PAN_A), "approved")  # re-binding the same account
    check(api("issue_card", account=2, pan=PAN_A), "invalid_card")
    check(api("issue_card", account=2, pan=PAN_B), "approved")
    check(api("freeze", account=2), "approved")
    check(api("issue_card", account=2, pan=PAN_B), "approved")  # frozen may bind
    check(api("close", account=1), "approved")
    check(api("issue_card", account=2, pan=PAN_A), "invalid_card")  # still bound to the closed one
    check(api("issue_card", account=1, pan=PAN_B), "account_inactive")


# --- account_inactive / not_permitted ---------------------------------------------------------


def test_account_inactive_frozen(api):
    api.funded(1, 100)
    api.open(2)
    h = check(auth(api, 1, 30), "approved")["id"]
    h2 = check(auth(api, 1, 30), "approved")["id"]
    check(api("freeze", account=1), "approved")
    check(api("deposit", account=1, amount=5), "account_inactive")
    check(api("withdraw", account=1, amount=5), "account_inactive")
    check(auth(api, 1, 5), "account_inactive")
    check(api("increment", auth=h, amount=5), "account_inactive")
    check(api("transfer", account=1, to=2, amount=5), "account_inactive")
    check(api("transfer", account=2, to=1, amount=5), "account_inactive")  # `to` frozen
    check(api("capture", auth=h, amount=0), "approved")  # capture and void work on frozen
    check(api("void", auth=h2, amount=0), "approved")
    check(api("set_limits", account=1, single_limit=5), "approved")
    check(api("freeze", account=1), "approved")
    check(api("unfreeze", account=1), "approved")
    check(api("deposit", account=1, amount=5), "approved")


def test_account_inactive_closed(api):
    api.open(1)
    api.open(2)
    check(api("close", account=1), "approved")
    check(api("close", account=1), "approved")  # closing a closed empty account
    for op, fields in (
        ("deposit", dict(amount=5)),
        ("withdraw", dict(amount=5)),
        ("set_limits", dict(credit_limit=5)),
        ("freeze", {}),
        ("unfreeze", {}),
        ("issue_card", dict(pan=PAN_A)),
    ):
        ans = check(api(op, account=1, **fields), "account_inactive")
        assert ans["available"] == 0
    check(auth(api, 1, 5), "account_inactive")
    check(api("transfer", account=1, to=2, amount=5), "account_inactive")
    check(api("transfer", account=2, to=1, amount=5), "account_inactive")
    assert api.query(1)["account_status"] == "closed"


def test_not_permitted(api):
    api.open(MERCHANT, kind="merchant", credit_limit=1000)
    api.open(1)
    check(api("deposit", account=MERCHANT, amount=500), "approved")  # merchants deposit
    check(auth(api, MERCHANT, 5), "not_permitted")
    check(api("purchase", account=MERCHANT, amount=5, currency=USD, merchant=7), "not_permitted")
    check(api("transfer", account=MERCHANT, to=1, amount=5), "not_permitted")
    check(api("transfer", account=1, to=MERCHANT, amount=5), "insufficient_funds")  # merchants receive


# --- limit_exceeded ------------------------------------------------------------------------------


def test_limit_exceeded_single(api):
    api.funded(1, 10_000, single_limit=100)
    check(auth(api, 1, 101), "limit_exceeded")
    check(auth(api, 1, 101, allow_partial=True), "limit_exceeded")
    h = check(auth(api, 1, 100), "approved")["id"]
    check(api("increment", auth=h, amount=1), "limit_exceeded")  # remaining + amount
    check(api("void", auth=h, amount=30), "approved")
    check(api("increment", auth=h, amount=31), "limit_exceeded")
    check(api("increment", auth=h, amount=30), "approved")
    api.open(2)
    check(api("transfer", account=1, to=2, amount=101), "limit_exceeded")
    check(api("set_limits", account=1, single_limit=0), "approved")  # 0 = no limit
    check(auth(api, 1, 5000), "approved")


def test_limit_exceeded_daily_and_day_boundary(impl_factory):
    day = C.us_per_day
    clock = FakeClock(DAY0 * day + day - 10 * C.us_per_s)  # 10 s before midnight UTC
    api = Session(impl_factory(None, clock), clock)
    api.funded(1, 100_000, daily_limit=1000)
    api.open(2)
    h = check(auth(api, 1, 600), "approved")["id"]
    check(api("void", auth=h, amount=0), "approved")  # voids do not give the allowance back
    check(auth(api, 1, 401), "limit_exceeded")
    check(api("transfer", account=1, to=2, amount=401), "limit_exceeded")
    h = check(auth(api, 1, 300), "approved")["id"]
    check(api("increment", auth=h, amount=101), "limit_exceeded")
    check(api("increment", auth=h, amount=100), "approved")  # increments count: 1000 spent
    check(auth(api, 1, 1), "limit_exceeded")
    clock.set((DAY0 + 1) * day - 1)
    check(auth(api, 1, 1), "limit_exceeded")
    clock.set((DAY0 + 1) * day)  # a new UTC day
    check(api("transfer", account=1, to=2, amount=1000), "approved")
    check(auth(api, 1, 1), "limit_exceeded")


def test_partial_counts_at_approved_amount_for_daily_limit(api):
    api.funded(1, 300, daily_limit=1000)
    check(auth(api, 1, 1000, allow_partial=True), "partial")  # checked at 1000, counts 300
    check(api("deposit", account=1, amount=5000), "approved")
    check(auth(api, 1, 701), "limit_exceeded")
    check(auth(api, 1, 700), "approved")
    api.funded(2, 300, daily_limit=1000)
    check(auth(api, 2, 1001, allow_partial=True), "limit_exceeded")


# --- suspected_fraud ------------------------------------------------------------------------------


def test_suspected_fraud(api):
    api.funded(1, 10**6)
    # velocity 40 + risky_mcc 20 = 60: review; card_testing adds 60 later.
    for _ in range(10):
        check(auth(api, 1, 500), "approved")
    ans = check(auth(api, 1, 500, mcc=7995), "approved")
    assert ans["review"] is True
    ans = check(auth(api, 1, 500, mcc=7995, currency=EUR), "currency_mismatch")  # no attempt
    for _ in range(5):
        auth(api, 1, 100)
    before = api.query(1)
    ans = check(auth(api, 1, 500), "suspected_fraud")  # 40 + 60
    assert ans["approved_amount"] == 0 and "review" not in ans and "auth_code" not in ans
    assert ans["available"] == before["available"]
    assert api.query(1)["held"] == before["held"]


def test_fraud_disabled_never_declines(impl_factory):
    clock = FakeClock()
    cfg = Config.from_dict({"fraud": {"enabled": False}})
    api = Session(impl_factory(cfg, clock), clock)
    api.funded(1, 10**6)
    for _ in range(20):
        ans = check(auth(api, 1, 100, mcc=7995), "approved")
        assert ans["review"] is False


# --- account_not_empty -------------------------------------------------------------------------------


def test_account_not_empty(api):
    api.funded(1, 100)
    check(api("close", account=1), "account_not_empty")
    check(api("withdraw", account=1, amount=100), "approved")
    api.open(2, credit_limit=50)
    h = check(auth(api, 2, 10), "approved")["id"]
    check(api("close", account=2), "account_not_empty")  # held != 0
    check(api("void", auth=h, amount=0), "approved")
    check(api("close", account=2), "approved")
    # A closed merchant still receives captures, and then is not empty.
    api.open(MERCHANT, kind="merchant")
    check(api("close", account=MERCHANT), "approved")
    api.funded(3, 100)
    check(api("purchase", account=3, amount=40, currency=USD, merchant=MERCHANT), "approved")
    assert api.query(MERCHANT)["balance"] == 40
    check(api("close", account=MERCHANT), "account_not_empty")


# --- duplicate ids ---------------------------------------------------------------------------------------


def test_duplicate_id_returns_first_answer(api):
    api.funded(1, 1000)
    first = check(auth(api, 1, 300, id=77), "approved")
    api.clock.advance(5 * C.us_per_s)
    again = api("deposit", id=77, account=1, amount=999_999)
    assert again == first
    again = api("open", id=77, account=5, currency=USD, kind="wallet")
    assert again == first
    assert api.query(1)["balance"] == 1000 and api.query(1)["held"] == 300
    check(api.query(5), "no_account")
    decl = check(api("withdraw", id=78, account=1, amount=10**6), "insufficient_funds")
    check(api("deposit", account=1, amount=10**7), "approved")
    assert api("withdraw", id=78, account=1, amount=10) == decl  # declines are remembered too


def test_query_ids_are_ignored(api):
    api.funded(1, 1000)
    q = api("query", id=55, account=1)
    assert "stamp" not in q
    check(api("deposit", id=55, account=1, amount=5), "approved")  # 55 was not remembered
    q = api("query", id=55, account=1)
    assert q["balance"] == 1005 and q["op"] == "query"


def test_stamps_strictly_increase(api):
    api.open(1)
    stamps = [api("deposit", account=1, amount=1)["stamp"] for _ in range(5)]
    assert stamps == list(range(stamps[0], stamps[0] + 5))  # clock stands still: last + 1
    assert stamps[0] > api.clock.now
    api.clock.advance(10**6)
    assert api("deposit", account=1, amount=1)["stamp"] == api.clock.now


# --- unavailable (the engine's log refuses) ---------------------------------------------------------------


def test_unavailable_applies_nothing(impl_factory):
    if impl_factory.__name__ != "make_engine":
        pytest.skip("durability is the engine's: the model has no log")
    import numpy as np

    from authcore.cards import PanHasher
    from authcore.engine import Unavailable
    from authcore.records import parse_request

    from conftest import PAN_KEY

    clock = FakeClock()
    eng = impl_factory(None, clock)
    api = Session(eng, clock)
    api.funded(1, 100)

    class BrokenLog:
        def log_batch(self, stamp0, requests):
            raise Unavailable("disk full")

    eng.attach_log(BrokenLog())
    hasher = PanHasher(PAN_KEY)
    reqs = np.array([parse_request({"op": "withdraw", "id": 9, "account": 1, "amount": 60}, hasher)])
    with pytest.raises(Unavailable):
        eng.submit(reqs)
    assert eng.accounts()[1]["balance"] == 100

    class GoodLog:
        def log_batch(self, stamp0, requests):
            pass

    eng.attach_log(GoodLog())
    check(api("withdraw", id=9, account=1, amount=60), "approved")  # id 9 was not remembered
    assert eng.accounts()[1]["balance"] == 40
