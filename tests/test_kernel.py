"""The kernel's own mechanics: bounded memories, table growth, state images.

The reference-model tests check *what* is decided; these check the
machinery that must not change it: the idempotency ring evicting its oldest
ids, closed holds being forgotten (open ones never), activity rows reused
only when stale, export/import giving the same digest and the same future
decisions, and bad batches refused before anything is applied.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
import pytest

from authcore import constants as C
from authcore.config import Config
from authcore.engine import Engine
from authcore.layout import ACCOUNT_DTYPE
from authcore.records import requests_from_json

T0 = 1_700_000_000_000_000


class Clock:
    def __init__(self, t: int = T0):
        self.t = t

    def __call__(self) -> int:
        return self.t


def small_engine(clock=None, **engine_cfg) -> Engine:
    cfg = Config.from_dict({"engine": engine_cfg}) if engine_cfg else Config.default()
    return Engine(cfg, clock=clock or Clock(), pan_key=b"k" * 32)


def open_funded(eng: Engine, account: int, amount: int = 10**9, rid: int | None = None) -> None:
    rid = rid or account * 1000
    assert eng.execute({"op": "open", "id": rid, "account": account, "currency": 978})["status"] == "approved"
    assert eng.execute({"op": "deposit", "id": rid + 1, "account": account, "amount": amount})["status"] == "approved"


def test_layout_sizes_are_pinned():
    assert C.REQUEST_DTYPE.itemsize == 64
    assert C.ANSWER_DTYPE.itemsize == 64
    assert ACCOUNT_DTYPE.itemsize == 128


def test_idempotency_memory_evicts_oldest_beyond_its_bound():
    eng = small_engine(idempotency_ids_max=1024)
    open_funded(eng, 1)
    first = eng.execute({"op": "deposit", "id": 5, "account": 1, "amount": 1})
    assert eng.execute({"op": "deposit", "id": 5, "account": 1, "amount": 999}) == first
    for i in range(2000):
        eng.execute({"op": "deposit", "id": 10_000 + i, "account": 1, "amount": 1})
    counters = eng.counters()
    assert counters["remembered_tail"] - counters["remembered_head"] <= 1024
    # id 5 was forgotten: it is decided afresh (and remembered again).
    again = eng.execute({"op": "deposit", "id": 5, "account": 1, "amount": 7})
    assert again["stamp"] != first["stamp"]
    # a recent id is still remembered
    recent = eng.execute({"op": "deposit", "id": 10_000 + 1999, "account": 1, "amount": 123})
    assert recent["stamp"] < again["stamp"]
    assert eng.verify()


def _ids_random(rng, k, n):
    return np.unique(rng.integers(1, 2**63, size=n, dtype=np.uint64))


def _ids_sequential(rng, k, n):  # a gateway's counter: runs of 8 share a home line
    return np.arange(k * n, (k + 1) * n, dtype=np.uint64) + np.uint64(10**6)


def _ids_multiples_of_8(rng, k, n):  # every id at offset 0 of its line
    return (np.arange(k * n, (k + 1) * n, dtype=np.uint64) + np.uint64(10**6)) * np.uint64(8)


def _ids_high_bits(rng, k, n):  # same low bits, a counter in the high ones
    return (np.arange(k * n + 1, (k + 1) * n + 1, dtype=np.uint64) << np.uint64(40)) | np.uint64(5)


@pytest.mark.parametrize("make_ids", [_ids_random, _ids_sequential, _ids_multiples_of_8, _ids_high_bits])
def test_index_stays_consistent_under_eviction_churn(make_ids):
    """Ids collide in a small index; every eviction is a backward-shift
    delete that finds homes from slot tags alone.  After each batch the
    index must still find exactly the remembered ids, whatever the ids'
    pattern (sequential ids share home cache lines by design)."""
    bound = 1024
    eng = small_engine(idempotency_ids_max=bound)
    open_funded(eng, 1)
    rng = np.random.default_rng(3)
    seen: list[int] = []
    first: dict[int, int] = {}
    for k in range(12):
        ids = make_ids(rng, k, 300)
        reqs = np.zeros(len(ids), C.REQUEST_DTYPE)
        reqs["op"], reqs["id"], reqs["account"], reqs["amount"] = C.Op.deposit, ids, 1, 1
        ans = eng.submit(reqs)
        first.update(zip(ids.tolist(), ans["stamp"].tolist()))
        seen.extend(ids.tolist())
        assert eng.verify()
        # a sample of the newest ids (well inside the bound): their first answers
        sample = rng.choice(np.array(seen[-600:], np.uint64), size=40, replace=False)
        again = np.zeros(len(sample), C.REQUEST_DTYPE)
        again["op"], again["id"], again["account"], again["amount"] = C.Op.deposit, sample, 1, 999
        assert eng.submit(again)["stamp"].tolist() == [first[i] for i in sample.tolist()]
    # the first batch's ids are long forgotten: decided afresh
    old = np.zeros(1, C.REQUEST_DTYPE)
    old["op"], old["id"], old["account"], old["amount"] = C.Op.deposit, seen[0], 1, 5
    assert eng.submit(old)["stamp"][0] > max(first.values())
    assert eng.verify()


def test_closed_holds_are_forgotten_open_ones_never():
    """The hold ring forgets from its oldest end only, and only closed holds:
    an open hold there (at most hold_ttl old) holds eviction back."""
    eng = Engine(Config.from_dict({"engine": {"holds_retained_max": 1024}, "fraud": {"enabled": False}}),
                 clock=Clock(), pan_key=b"k" * 32)
    open_funded(eng, 1)

    def purchase(i):
        r = eng.execute({"op": "purchase", "id": i, "account": 1, "amount": 1, "currency": 978, "merchant": 3})
        assert r["status"] == "approved", r

    for i in range(100, 600):
        purchase(i)
    keep = eng.execute({"op": "authorize", "id": 77, "account": 1, "amount": 5, "currency": 978, "merchant": 3})
    assert keep["status"] == "approved"
    for i in range(600, 3000):
        purchase(i)
    holds = eng.holds()
    assert holds[77]["state"] == "open"
    # forgetting stopped at the open hold: everything after it is kept
    assert 100 not in holds and 599 not in holds
    assert 600 in holds and 2999 in holds
    assert eng.execute({"op": "refund", "id": 9_000_001, "auth": 100, "amount": 1})["status"] == "no_auth"
    assert eng.execute({"op": "refund", "id": 9_000_002, "auth": 2000, "amount": 1})["status"] == "approved"
    assert eng.execute({"op": "capture", "id": 9_000_003, "auth": 77})["status"] == "approved"
    for i in range(3000, 3100):
        purchase(i)
    assert len(eng.holds()) <= 1024
    assert eng.verify()


def test_tables_grow_past_their_initial_size():
    eng = small_engine()
    n = 3 * C.table_rows_initial + 5
    reqs = requests_from_json(
        [{"op": "open", "id": i + 1, "account": i + 1, "currency": 156} for i in range(n)], eng.hasher)
    assert (eng.submit(reqs)["status"] == C.Status.approved).all()
    assert len(eng.accounts()) == n
    assert eng.query(n)["status"] == "approved"
    assert eng.verify()


def test_export_import_gives_same_digest_and_same_future_answers():
    clock = Clock()
    a = small_engine(clock)
    open_funded(a, 1)
    open_funded(a, 2)
    a.execute({"op": "issue_card", "id": 50, "account": 1, "pan": "4111111111111111"})
    for i in range(40):
        clock.t += 1_000_000
        a.execute({"op": "authorize", "id": 100 + i, "account": 1 + i % 2, "amount": 150 + i, "currency": 978,
                   "merchant": 900 + i % 3, "channel": "qr", "country": 250 + i % 2})
    arrays, meta = a.export_state()
    b = small_engine(Clock(clock.t))
    b.load_state(arrays, meta)
    assert b.digest() == a.digest()
    assert b.card_account("4111111111111111") == 1
    follow = [{"op": "authorize", "id": 500 + i, "account": 1, "amount": 100, "currency": 978, "merchant": 901,
               "channel": "card_present", "country": 250} for i in range(12)]
    follow.append({"op": "capture", "id": 600, "auth": 101})
    assert a.execute_many(follow) == b.execute_many(follow)
    assert a.digest() == b.digest()


def test_digest_changes_with_state():
    eng = small_engine()
    d0 = eng.digest()
    open_funded(eng, 1)
    assert eng.digest() != d0


def test_activity_rows_are_reused_once_stale():
    clock = Clock()
    eng = small_engine(clock)
    for acc in range(1, 41):
        open_funded(eng, acc)
    for acc in range(1, 21):
        eng.execute({"op": "authorize", "id": 5_000_000 + acc, "account": acc, "amount": 10, "currency": 978,
                     "merchant": 5})
    high = eng.counters()["act_high"]
    assert high == 20
    clock.t += 3600 * C.us_per_s  # every earlier attempt is now outside every window
    for acc in range(21, 41):
        eng.execute({"op": "authorize", "id": 6_000_000 + acc, "account": acc, "amount": 10, "currency": 978,
                     "merchant": 5})
    assert eng.counters()["act_high"] == high  # reused, not grown


def test_batch_with_wrong_dtype_is_refused_before_anything_is_applied():
    eng = small_engine()
    bad = np.zeros(3, dtype=[("id", "<u8")])
    with pytest.raises(TypeError, match="REQUEST_DTYPE"):
        eng.submit(bad)
    with pytest.raises(ValueError, match="1-d"):
        eng.submit(np.zeros((2, 2), C.REQUEST_DTYPE))
    assert eng.accounts() == {}
    assert eng.last_stamp == 0


def test_unknown_op_in_a_batch_is_bad_request_and_not_remembered():
    eng = small_engine()
    reqs = np.zeros(2, C.REQUEST_DTYPE)
    reqs["id"] = [1, 1]
    reqs["op"] = [200, C.Op.open]
    reqs["account"] = 9
    reqs["currency"] = 156
    ans = eng.submit(reqs)
    assert ans["status"].tolist() == [C.Status.bad_request, C.Status.approved]


def test_batch_answers_with_codes_carry_what_the_json_answers_carry():
    """SPEC §7: batch answers carry ``code`` and (approved authorize and
    purchase) ``auth_code`` like single ones; submit(codes=True) adds them."""
    from authcore.records import answers_to_json, auth_code, auth_codes

    eng = small_engine()
    open_funded(eng, 1, amount=5000)
    reqs = requests_from_json([
        {"op": "authorize", "id": 10, "account": 1, "amount": 700, "currency": 978, "merchant": 9},
        {"op": "purchase", "id": 11, "account": 1, "amount": 900, "currency": 978, "merchant": 9},
        {"op": "authorize", "id": 12, "account": 1, "amount": 10**9, "currency": 978, "merchant": 9},
        {"op": "authorize", "id": 13, "account": 1, "amount": 10**9, "currency": 978, "merchant": 9,
         "allow_partial": True},
        {"op": "capture", "id": 14, "auth": 10, "amount": 0},
        {"op": "deposit", "id": 15, "account": 2, "amount": 1},
        {"op": "query", "account": 1},
    ], eng.hasher)
    ans = eng.submit(reqs, codes=True)
    assert ans.dtype.names[: len(C.ANSWER_DTYPE.names)] == C.ANSWER_DTYPE.names
    want = answers_to_json(reqs, ans[list(C.ANSWER_DTYPE.names)].astype(C.ANSWER_DTYPE))
    assert [a["code"] for a in want] == ans["code"].tolist() == ["00", "00", "51", "10", "00", "14", "00"]
    assert [a.get("auth_code", "") for a in want] == ans["auth_code"].tolist()
    assert ans["auth_code"].tolist()[:4] == [auth_code(10), auth_code(11), "", auth_code(13)]
    ids = np.array([0, 1, 2**63, 2**64 - 1, 123456789], np.uint64)
    assert auth_codes(ids).tolist() == [auth_code(int(i)) for i in ids]


def test_a_malformed_retry_of_a_known_id_gets_the_first_answer_embedded():
    from authcore.records import RequestError

    eng = small_engine()
    open_funded(eng, 1, amount=5000, rid=10)
    first = eng.execute({"op": "authorize", "id": 20, "account": 1, "amount": 700, "currency": 978, "merchant": 9})
    for retry in ({"op": "authorize", "id": 20}, {"id": 20}, {"op": "nope", "id": 20},
                  {"op": "capture", "id": 20, "auth": "x"}):
        assert eng.execute(retry) == first
    with pytest.raises(RequestError, match="account"):
        eng.execute({"op": "authorize", "id": 21})  # a new id: malformed, and not remembered
    later = eng.execute({"op": "deposit", "id": 21, "account": 1, "amount": 1})
    assert (later["status"], later["available"]) == ("approved", 5000 - 700 + 1)


def test_numpy_integers_are_integers_to_the_embedded_api():
    eng = small_engine()
    ans = eng.execute({"op": "open", "id": np.uint64(7), "account": np.int64(70), "currency": np.uint16(978)})
    assert (ans["status"], ans["id"]) == ("approved", 7)
    from authcore.records import RequestError

    with pytest.raises(RequestError, match="must be an integer, got float"):
        eng.execute({"op": "deposit", "id": 8, "account": 70, "amount": np.float64(1.0)})


def test_batches_larger_than_the_maximum_are_refused_whole():
    """One batch is one log record: a larger one is refused, not split (a
    split batch could be half applied when a later part is unavailable)."""
    eng = small_engine()
    reqs = np.zeros(C.batch_count_max + 1, C.REQUEST_DTYPE)
    reqs["op"] = C.Op.query
    reqs["account"] = 1
    with pytest.raises(ValueError, match="at most"):
        eng.submit(reqs)
    assert eng.last_stamp == 0
    assert len(eng.submit(reqs[: C.batch_count_max])) == C.batch_count_max


def test_stamps_strictly_increase_even_when_the_clock_goes_back():
    clock = Clock()
    eng = small_engine(clock)
    open_funded(eng, 1)
    s1 = eng.execute({"op": "deposit", "id": 7, "account": 1, "amount": 1})["stamp"]
    clock.t -= 10_000_000
    s2 = eng.execute({"op": "deposit", "id": 8, "account": 1, "amount": 1})["stamp"]
    assert s2 == s1 + 1


def test_amount_spike_is_exact_beyond_64_bits():
    """amount * count > factor * total must not overflow (128-bit in C)."""
    clock = Clock()
    eng = small_engine(clock)
    open_funded(eng, 1, amount=C.amount_max)
    for i in range(6):
        assert eng.execute({"op": "deposit", "id": 50 + i, "account": 1, "amount": C.amount_max})["status"] == "approved"
    eng.execute({"op": "set_limits", "id": 3, "account": 1, "credit_limit": 0})
    for i in range(6):
        clock.t += 7200 * C.us_per_s
        r = eng.execute({"op": "purchase", "id": 100 + i, "account": 1, "amount": 10**15, "currency": 978,
                         "merchant": 4})
        assert r["status"] == "approved", r
    # total 6e15, count 6: 10^15 * 6 > 10 * 6e15 is false -> no spike points
    clock.t += 7200 * C.us_per_s
    r = eng.execute({"op": "purchase", "id": 200, "account": 1, "amount": 10**15, "currency": 978, "merchant": 4})
    assert r["status"] == "approved" and r["review"] is False


def test_presized_tables_decide_and_digest_like_small_ones():
    """Capacities are not state: a presized engine (what `serve` uses) and a
    minimal one give the same answers and the same digest."""
    small, big = small_engine(Clock()), Engine(Config.default(), clock=Clock(), pan_key=b"k" * 32, presize=True)
    reqs = [{"op": "open", "id": i, "account": i, "currency": 156} for i in range(1, 300)]
    reqs += [{"op": "deposit", "id": 1000 + i, "account": i, "amount": 10_000} for i in range(1, 300)]
    reqs += [{"op": "authorize", "id": 5000 + i, "account": 1 + i % 299, "amount": 50 + i, "currency": 156,
              "merchant": 7 + i % 5} for i in range(2000)]
    assert small.execute_many(reqs) == big.execute_many(reqs)
    assert small.digest() == big.digest()
    arrays, meta = big.export_state()
    restored = small_engine(Clock())
    restored.load_state(arrays, meta)
    assert restored.digest() == big.digest()


def test_refusals_before_the_account_check_still_carry_its_available():
    """SPEC §10.12: an answer naming an existing account carries available."""
    eng = small_engine()
    open_funded(eng, 1, amount=500)
    eng.execute({"op": "authorize", "id": 9, "account": 1, "amount": 100, "currency": 978, "merchant": 2})
    for req in (
        {"op": "authorize", "id": 10, "account": 1, "amount": 0, "currency": 978, "merchant": 2},
        {"op": "authorize", "id": 11, "account": 1, "amount": 5, "currency": 978, "merchant": 0},
        {"op": "transfer", "id": 12, "account": 1, "to": 1, "amount": 5},
        {"op": "capture", "id": 13, "auth": 9, "amount": -1},
        {"op": "deposit", "id": 14, "account": 1, "amount": 10**15 + 1},
    ):
        ans = eng.execute(req)
        assert ans["status"] in ("invalid_request", "invalid_amount"), ans
        assert ans["available"] == 400, ans
    assert "available" not in eng.execute({"op": "deposit", "id": 15, "account": 2, "amount": 0})


def test_set_limits_in_a_foreign_currency_is_a_mismatch():
    eng = small_engine()
    open_funded(eng, 1)
    ans = eng.execute({"op": "set_limits", "id": 5, "account": 1, "credit_limit": 7, "currency": 156})
    assert ans["status"] == "currency_mismatch"
    assert eng.accounts()[1]["credit_limit"] == 0


LIBC = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4


def _pages(arr: np.ndarray) -> tuple[int, int, int]:
    """The whole pages inside the array: (start, length, page size)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-arr.ctypes.data // page) * page
    end = (arr.ctypes.data + arr.nbytes) // page * page
    return start, end - start, page


def _resident_fraction(arr: np.ndarray) -> float:
    """Share of the array's pages in memory, by mincore(2)."""
    start, length, page = _pages(arr)
    vec = (ctypes.c_ubyte * (length // page))()
    if LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec) / len(vec)


def _drop_pages(arr: np.ndarray) -> None:
    """Give a zero array's pages back (MADV_DONTNEED: they read as zeros)."""
    start, length, _ = _pages(arr)
    assert not arr.view(np.uint8).any()
    if LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise")


def test_prefault_touches_pages_but_changes_nothing():
    eng = small_engine()
    open_funded(eng, 1)
    before = eng.digest()
    eng.prefault()
    assert eng.digest() == before
    assert eng.query(1)["balance"] == 10**9


@pytest.mark.skipif(sys.platform != "linux", reason="mincore(2) semantics checked on Linux")
def test_prefault_makes_the_tables_resident():
    # 2^21 ids: 80 MiB of remembered rows, untouched (calloc) until prefault
    # writes every page.
    eng = Engine(Config.from_dict({"engine": {"ids_initial": 1 << 21}}))
    remembered = eng._kernel.tables()["remembered"]
    _drop_pages(remembered)  # calloc may have handed out resident memory
    assert _resident_fraction(remembered) < 0.05
    eng.prefault()
    assert _resident_fraction(remembered) == 1.0


@pytest.mark.skipif(sys.platform != "linux" or tuple(map(int, os.uname().release.split(".")[:2])) < (5, 14),
                    reason="MADV_POPULATE_WRITE is Linux 5.14+")
def test_populate_makes_pages_resident_without_changing_them():
    """Recovery faults its new tables in on a second core while the snapshot
    reader fills them: populate must never write."""
    from authcore._kernel import populate

    data = np.random.default_rng(14).integers(0, 255, size=3 << 20, dtype=np.uint8)
    keep = data.copy()
    fresh = np.zeros(16 << 20, np.uint8)
    _drop_pages(fresh)
    assert _resident_fraction(fresh) < 0.05
    assert populate([data, fresh[7:], fresh[:0]])  # an unaligned start, an empty array
    assert _resident_fraction(fresh) == 1.0
    assert (data == keep).all() and not fresh.any()


def _vm_flags(addr: int) -> set[str]:
    """VmFlags of the mapping holding ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc")
def test_forked_snapshot_children_do_not_inherit_the_indexes():
    """Index slot tables are MADV_DONTFORK (the parent's random writes into
    them cost no copy-on-write faults while a child writes the rows); row
    tables are inherited, and the child's export works."""
    eng = Engine(Config.from_dict({"engine": {"ids_initial": 1 << 16}}))
    open_funded(eng, 1)
    tables = eng._kernel.tables()
    slots = [n for n in tables if n.endswith("_slots")]
    assert len(slots) == 5
    for name, arr in tables.items():
        assert ("dc" in _vm_flags(arr.ctypes.data)) == name.endswith("_slots"), name
    before = tables["account_slots"]
    n = len(before)  # more accounts than the index holds: it is rebuilt bigger
    eng.execute_many([{"op": "open", "id": 10 + i, "account": 10 + i, "currency": 978} for i in range(n)])
    grown = eng._kernel.tables()["account_slots"]
    assert len(grown) > len(before) and "dc" in _vm_flags(grown.ctypes.data)
    assert eng.query(n + 9)["status"] == "approved"


def test_merchant_rows_are_reused_once_stale():
    clock = Clock()
    eng = small_engine(clock)
    open_funded(eng, 1)
    for m in range(20):
        eng.execute({"op": "authorize", "id": 7_000_000 + m, "account": 1, "amount": 1000, "currency": 978,
                     "merchant": 100 + m})
    assert eng.counters()["merchant_count"] == 20
    clock.t += 3600 * C.us_per_s  # past merchant_burst's window
    for m in range(20):
        eng.execute({"op": "authorize", "id": 8_000_000 + m, "account": 1, "amount": 1000, "currency": 978,
                     "merchant": 500 + m})
    assert eng.counters()["merchant_count"] == 20  # reused, not grown
    arrays, meta = eng.export_state()
    copy = small_engine(Clock(clock.t))
    copy.load_state(arrays, meta)
    assert copy.digest() == eng.digest()


def test_growth_while_deciding_is_counted_and_a_long_one_is_logged(caplog, monkeypatch):
    """Growth stops decisions (copy + rehash); operators must hear of it."""
    import authcore.engine as E

    eng = small_engine()
    open_funded(eng, 1)
    assert eng.growths == 0
    capacity = len(eng._kernel.tables()["remembered"])
    monkeypatch.setattr(E, "growth_warn_seconds", 0.0)
    with caplog.at_level("WARNING", logger="authcore.engine"):
        eng.execute_many([{"op": "deposit", "id": 100 + i, "account": 1, "amount": 1} for i in range(capacity)])
    assert eng.growths >= 1 and eng.growth_seconds > 0
    assert any("tables grew while deciding" in r.message and "remembered" in r.message for r in caplog.records)
