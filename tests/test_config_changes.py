"""Settings that change between restarts must not change what replay decides.

The decision settings and the engine's memory bounds (how many ids and
closed holds it remembers) both shape answers; a restart with new values
logs them as a CONFIG record, so replay applies each where it took effect.
"""

from __future__ import annotations

from authcore import constants as C
from authcore.config import Config
from authcore.engine import Engine
from authcore.storage import Storage, replay, verify

T0 = 1_700_000_000_000_000


def run_session(data, cfg: Config, requests: list[dict], clock) -> str:
    st = Storage.open(data, cfg)
    eng = Engine(cfg, clock=clock, pan_key=b"k" * 32)
    st.recover(eng)
    eng.attach_log(st)
    for r in requests:
        eng.execute(r)
    digest = eng.digest()
    st.close()
    return digest


def test_changed_memory_bounds_replay_exactly(tmp_path):
    t = [T0]

    def clock():
        t[0] += 1000
        return t[0]

    small = Config.from_dict({"engine": {"idempotency_ids_max": 1024}})
    big = Config.from_dict({"engine": {"idempotency_ids_max": 1 << 20}})
    first = [{"op": "open", "id": 1, "account": 1, "currency": 156}]
    first += [{"op": "deposit", "id": 10 + i, "account": 1, "amount": 1} for i in range(2000)]
    run_session(tmp_path, small, first, clock)
    # id 10 was forgotten under the small bound: repeating it deposits again
    live = run_session(tmp_path, big, [{"op": "deposit", "id": 10, "account": 1, "amount": 5}], clock)
    assert verify(tmp_path).digest == live
    assert replay(tmp_path) == live


def test_lowered_hold_ttl_still_expires_holds(tmp_path):
    t = [T0]
    clock = lambda: t[0]  # noqa: E731
    eng = Engine(Config.from_dict({"hold_ttl_seconds": 100}), clock=clock, pan_key=b"k" * 32)
    eng.execute({"op": "open", "id": 1, "account": 1, "currency": 156})
    eng.execute({"op": "deposit", "id": 2, "account": 1, "amount": 1000})
    eng.execute({"op": "authorize", "id": 3, "account": 1, "amount": 100, "currency": 156, "merchant": 9})
    eng.set_decision_config(Config.from_dict({"hold_ttl_seconds": 10}).decision_dict())
    t[0] += 1 * C.us_per_s
    eng.execute({"op": "authorize", "id": 4, "account": 1, "amount": 100, "currency": 156, "merchant": 9})
    # hold 4 may live past its 10 s (it expires with hold 3, at most the old
    # TTL late) but it does expire: expiry stays sorted for the cursor
    t[0] += 101 * C.us_per_s
    assert eng.execute({"op": "capture", "id": 5, "auth": 4})["status"] == "auth_closed"
    assert eng.execute({"op": "capture", "id": 6, "auth": 3})["status"] == "auth_closed"
    assert eng.query(1)["held"] == 0
    assert eng.verify()


def test_changed_ring_sizes_rebuild_the_fraud_rings_even_at_the_same_row_width():
    """(3, 3) -> (5, 2) attempts keep the padded row at 8 words; the old ring
    positions must not be reused (they pointed past the new card ring, into
    the next account's row)."""
    t = [T0]
    clock = lambda: t[0]  # noqa: E731

    def rules(velocity: int, card: int) -> dict:
        return Config.from_dict({"fraud": {"velocity": {"attempts": velocity},
                                           "card_testing": {"attempts": card}}}).decision_dict()

    eng = Engine(Config.from_dict({"fraud": {"velocity": {"attempts": 3}, "card_testing": {"attempts": 3}}}),
                 clock=clock, pan_key=b"k" * 32)
    rid = iter(range(1, 1000))
    for acc in (1, 2):
        eng.execute({"op": "open", "id": next(rid), "account": acc, "currency": 156})
        eng.execute({"op": "deposit", "id": next(rid), "account": acc, "amount": 10**6})

    def small(acc: int) -> dict:
        t[0] += C.us_per_s
        return eng.execute({"op": "authorize", "id": next(rid), "account": acc, "amount": 100, "currency": 156,
                            "merchant": 9})

    small(1), small(1), small(2)
    assert eng.counters()["act_high"] == 2
    eng.set_decision_config(rules(5, 2))
    assert eng.counters()["act_high"] == 0  # recent attempts forgotten, rows rebuilt
    # the new card_testing ring: the third small attempt sees two before it
    assert [small(1)["review"] for _ in range(3)] == [False, False, True]
    assert small(2)["review"] is False
    assert eng.counters()["act_high"] == 2  # account 2 kept to its own row
    assert eng.verify()
