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
