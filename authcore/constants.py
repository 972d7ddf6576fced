"""Every number, enum and record layout authcore depends on, in one place.

Goals: one source of truth for the kernel, the log, the protocols and the
tests; named limits (``<thing>_<max|min>`` first, unit last) with a comment
saying why each value was chosen; import-time checks that the limits fit
together and that record layouts are exactly the size the wire and the log
promise.  Non-goal: configuration that operators tune at run time (that is
``authcore.config``).
"""

from __future__ import annotations

import enum

import numpy as np

# --- money and time (SPEC §1, §3) -----------------------------------------

amount_max = 10**15  # SPEC §1: 0 < amount <= 10^15.
balance_bound = 2**62  # SPEC §3: no balance may leave ±2^62.
limit_max = amount_max  # credit/single/daily limits share the amount bound,
# so balance + credit_limit can never overflow int64 (2^62 + 10^15 < 2^63).
us_per_s = 1_000_000
us_per_day = 86_400 * us_per_s  # UTC day for daily limits (SPEC §4 step 5).
currency_max = 999  # ISO 4217 numeric codes are three digits.
mcc_max = 9999  # merchant category codes are four digits.
country_max = 999  # ISO 3166-1 numeric codes are three digits.
pan_digits_min = 12  # SPEC §3 issue_card.
pan_digits_max = 19
pan_hash_size = 32  # HMAC-SHA-256 digest bytes (SPEC §8).

# --- memory of answers and holds ------------------------------------------

idempotency_ids_min = 10**8  # SPEC §1: remember at least the last 10^8 ids.
idempotency_ids_max_default = 1 << 27  # 134,217,728 >= 10^8, power of two.
holds_retained_max_default = 1 << 27  # closed holds kept for refunds; the
# oldest closed ones are forgotten beyond this (open holds never are).
table_rows_initial = 1024  # every table starts here and doubles.
index_load_max_num = 1  # open-addressing tables stay at most half full:
index_load_max_den = 2  # linear probing degrades sharply above ~0.7.
activity_probe_max = 8  # stale-slot probes before the activity table grows.
risky_mcc_max = 64  # configured risky MCCs (SPEC §5 risky_mcc.mccs).
account_rows_max = (1 << 32) - 2  # rows are uint32 in holds and activity owners (row + 1)
ring_size_max = 256  # largest attempts/last_attempts a fraud rule may use:
# every ring lives inline in a table row, so it must stay small.

# --- batches ----------------------------------------------------------------

batch_count_max = 65_536  # requests decided (and logged) as one batch.
batch_count_default = 8192  # what the server gathers per loop turn at most.


class Op(enum.IntEnum):
    """Operation codes (SPEC §3).  Values are part of the log and wire."""

    open = 1
    deposit = 2
    withdraw = 3
    authorize = 4
    increment = 5
    capture = 6
    void = 7
    refund = 8
    purchase = 9
    transfer = 10
    set_limits = 11
    freeze = 12
    unfreeze = 13
    close = 14
    issue_card = 15
    query = 16


class Status(enum.IntEnum):
    """Answer statuses (SPEC §6).  Values are part of the log and wire."""

    approved = 0
    partial = 1
    invalid_amount = 2
    invalid_request = 3
    currency_mismatch = 4
    insufficient_funds = 5
    no_auth = 6
    amount_exceeds_hold = 7
    not_captured = 8
    account_exists = 9
    unavailable = 10
    no_account = 11
    invalid_card = 12
    account_inactive = 13
    not_permitted = 14
    limit_exceeded = 15
    suspected_fraud = 16
    auth_closed = 17
    amount_exceeds_capture = 18
    bad_request = 19
    account_not_empty = 20


# SPEC §6: the ISO 8583 response code of each status.
STATUS_CODE: dict[Status, str] = {
    Status.approved: "00",
    Status.partial: "10",
    Status.invalid_amount: "13",
    Status.invalid_request: "12",
    Status.currency_mismatch: "12",
    Status.insufficient_funds: "51",
    Status.no_auth: "25",
    Status.amount_exceeds_hold: "13",
    Status.not_captured: "12",
    Status.account_exists: "12",
    Status.unavailable: "96",
    Status.no_account: "14",
    Status.invalid_card: "14",
    Status.account_inactive: "62",
    Status.not_permitted: "57",
    Status.limit_exceeded: "61",
    Status.suspected_fraud: "59",
    Status.auth_closed: "12",
    Status.amount_exceeds_capture: "13",
    Status.bad_request: "30",
    Status.account_not_empty: "12",
}


class Channel(enum.IntEnum):
    online = 0
    qr = 1
    card_present = 2
    p2p = 3


class Kind(enum.IntEnum):
    wallet = 0
    merchant = 1


class AccountStatus(enum.IntEnum):
    active = 0
    frozen = 1
    closed = 2


class HoldState(enum.IntEnum):
    open = 1
    captured = 2
    voided = 3
    expired = 4


# Request flags (REQUEST_DTYPE.flags).
FLAG_ALLOW_PARTIAL = 1 << 0
FLAG_SET_CREDIT = 1 << 1  # set_limits: credit_limit present (absent = unchanged)
FLAG_SET_SINGLE = 1 << 2
FLAG_SET_DAILY = 1 << 3
FLAG_NO_CARD = 1 << 4  # ISO 8583: the PAN is bound to no account -> no_account
# ISO 8583 reversal without field 90 (a void): if hold `account` does not
# exist but hold `to` (the 0200 with the same 37 + 42) does, refund `to` of
# `single_limit` (0: all still refundable).  Decided by the kernel, in order.
FLAG_OR_PURCHASE = 1 << 5
FLAG_SET_ALL = FLAG_SET_CREDIT | FLAG_SET_SINGLE | FLAG_SET_DAILY

# --- record layouts ----------------------------------------------------------
#
# A request is 64 bytes: it is the unit of the binary protocol, of the
# embedded batch API and of the write-ahead log.  Fields are reused by
# operations that do not need them (documented in docs/protocol.md):
#   account: the account, or the hold's id for increment/capture/void/refund;
#   to: the transfer's receiver, or the merchant of authorize/purchase;
#   amount: the amount, or credit_limit for open and set_limits;
#   issue_card: bytes 16..48 (to, amount, single_limit, daily_limit) hold the
#   HMAC-SHA-256 of the PAN; all zero means "not a valid PAN".
REQUEST_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("account", "<u8"),
        ("to", "<u8"),
        ("amount", "<i8"),
        ("single_limit", "<i8"),
        ("daily_limit", "<i8"),
        ("currency", "<u2"),
        ("mcc", "<u2"),
        ("country", "<u2"),
        ("op", "u1"),
        ("channel", "u1"),
        ("kind", "u1"),
        ("flags", "u1"),
        ("_pad", "V6"),
    ]
)
request_size = 64
PAN_HASH_OFFSET = 16

# An answer is 64 bytes.  Repeats of an id return the stored answer whole
# (the idempotency memory keeps id, stamp, available, approved_amount,
# status and review; the query-only fields are zero in a repeat).
ANSWER_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("stamp", "<i8"),  # 0 for a query (queries are not state-changing)
        ("available", "<i8"),
        ("approved_amount", "<i8"),
        ("balance", "<i8"),  # query only
        ("credit_limit", "<i8"),  # query only
        ("held", "<i8"),  # query only
        ("status", "u1"),
        ("review", "u1"),
        ("account_status", "u1"),  # query only
        ("op", "u1"),  # the request's op, echoed so answers stand alone
        ("has_available", "u1"),  # 1 when an account was named and found
        ("_pad", "V3"),
    ]
)
answer_size = 64

# --- import-time checks: the limits fit together --------------------------

assert REQUEST_DTYPE.itemsize == request_size, REQUEST_DTYPE.itemsize
assert REQUEST_DTYPE.fields["_pad"][1] == 58
assert ANSWER_DTYPE.itemsize == answer_size, ANSWER_DTYPE.itemsize
assert amount_max < balance_bound
assert balance_bound + limit_max < 2**63  # available never overflows int64
assert idempotency_ids_max_default >= idempotency_ids_min
assert table_rows_initial & (table_rows_initial - 1) == 0
assert batch_count_default <= batch_count_max
assert len(STATUS_CODE) == len(Status)
assert all(len(c) == 2 for c in STATUS_CODE.values())
assert PAN_HASH_OFFSET + pan_hash_size == REQUEST_DTYPE.fields["currency"][1]
