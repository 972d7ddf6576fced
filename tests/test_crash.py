"""Crash safety: SIGKILL a loaded engine at random moments, restart, check
that every acknowledged answer survived and the state equals a full replay;
a real disk-full run on a tiny filesystem.

The child (``CHILD`` below) runs an Engine with a Storage under load and
writes each acknowledged answer to its stdout *after* ``submit`` returned,
i.e. after the batch was synced.  A fault hook sleeps before some syncs so
that kills also land between write and sync.  Background snapshots run
during the load, so kills also hit snapshot children.

``AUTHCORE_SLOW_SCALE`` multiplies the rounds of the slow variant.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fill_disk, kernel_built

pytestmark = pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from durability import StepClock, Workload  # noqa: E402

from authcore import storage as S  # noqa: E402
from authcore.config import Config  # noqa: E402
from authcore.constants import REQUEST_DTYPE, Op, Status  # noqa: E402

ACCOUNTS = 400
SLOW_SCALE = int(os.environ.get("AUTHCORE_SLOW_SCALE", "1"))

CHILD = r"""
import os, sys, time, random
sys.path.insert(0, sys.argv[1] + "/bench")
sys.path.insert(0, sys.argv[1])
import numpy as np
from durability import Workload
from authcore import wal as W
from authcore.config import Config
from authcore.constants import Op
from authcore.engine import Engine
from authcore.storage import Storage

data, seed, run = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = Config.from_dict({"hold_ttl_seconds": 1, "durability": {"segment_bytes": 128 * 1024, "snapshots_kept": 2}})

class SlowSync(W.FaultHook):
    # Widen the window between write and sync so that kills land in it.
    def before_sync(self, wal):
        if random.random() < 0.3:
            time.sleep(0.003)

random.seed(seed)
st = Storage.open(data, cfg, fault=SlowSync())
eng = Engine(cfg)
st.recover(eng)
eng.attach_log(st)
wl = Workload(seed, %(accounts)d)
wl.next_id = run << 40  # fresh ids per run; repeats of earlier runs' ids still happen below
if run == 0:
    for b in wl.setup():
        eng.submit(b)
out = sys.stdout.buffer
out.write(b"ready\n"); out.flush()
i = 0
while True:
    reqs = wl.batch(random.randint(1, 300))
    if run and i %% 7 == 0:
        k = min(3, len(reqs))
        reqs["id"][:k] = np.arange(1, k + 1, dtype=np.uint64) + np.uint64(random.randint(0, 50))
    ans = eng.submit(reqs)
    keep = reqs["op"] != Op.query
    lines = [b"%%d %%d %%d %%d %%d %%d\n" %% t for t in zip(ans["id"][keep].tolist(), ans["stamp"][keep].tolist(), ans["status"][keep].tolist(),
             ans["approved_amount"][keep].tolist(), ans["available"][keep].tolist(), ans["review"][keep].tolist())]
    out.write(b"".join(lines)); out.flush()  # acknowledged: durable before this line left
    i += 1
    if i %% 25 == 0:
        st.snapshot(eng, background=True)
""" % {"accounts": ACCOUNTS}

CFG = Config.from_dict({"hold_ttl_seconds": 1, "durability": {"segment_bytes": 128 * 1024, "snapshots_kept": 2}})


def run_child_and_kill(data: Path, seed: int, run: int, kill_after_s: float) -> list[bytes]:
    """Start the child, let it work, SIGKILL it; the complete lines it wrote."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT), str(data), str(seed), str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stdout.read1(1 << 16), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not b"".join(chunks).startswith(b"ready\n"):
        if p.poll() is not None:
            raise AssertionError(f"child died: {p.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, "child did not start"
        time.sleep(0.01)
    time.sleep(kill_after_s)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    reader.join(timeout=30)
    err = p.stderr.read().decode()
    p.stdout.close()
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL, err[-3000:]
    data_out = b"".join(chunks)[len(b"ready\n") :]
    return data_out.split(b"\n")[:-1]  # the last piece may be a torn line


def check_recovery(data: Path, acked: dict[int, tuple[int, ...]]) -> str:
    """Restart (cuts a torn tail), check acknowledged answers and the digest."""
    from authcore.engine import Engine

    st = S.Storage.open(data, CFG)
    eng = Engine(CFG)
    rep = st.recover(eng)
    st.close()
    assert eng.verify()
    digest = eng.digest()
    assert S.replay(data) == digest, "snapshot + tail must equal a full replay"
    d2, report = S.verify(data)
    assert d2 == digest and report.ok, report.problems
    # Every acknowledged answer is reflected: asking again returns it whole.
    ids = np.fromiter(acked, dtype=np.uint64, count=len(acked))
    for start in range(0, len(ids), 8192):
        part = ids[start : start + 8192]
        reqs = np.zeros(len(part), REQUEST_DTYPE)
        reqs["id"] = part
        reqs["op"] = Op.deposit
        reqs["account"] = 1
        reqs["amount"] = 1
        ans = eng.submit(reqs)  # no log attached: a throwaway engine
        for a in ans:
            want = acked[int(a["id"])]
            got = (int(a["stamp"]), int(a["status"]), int(a["approved_amount"]), int(a["available"]), int(a["review"]))
            assert got == want, (int(a["id"]), got, want, rep)
    return digest


def crash_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = tmp_path / "data"
    acked: dict[int, tuple[int, ...]] = {}
    total = 0
    for run in range(rounds):
        lines = run_child_and_kill(data, seed * 1000 + run, run, float(rng.uniform(0.3, 1.2)))
        for line in lines:
            rid, *rest = (int(x) for x in line.split())
            t = tuple(rest)
            if rid in acked:  # a repeat returns the first answer, across restarts too
                assert acked[rid] == t, (rid, acked[rid], t)
            acked[rid] = t
        total += len(lines)
        check_recovery(data, acked)
    assert total > 0, "the child acknowledged nothing"
    statuses = {v[1] for v in acked.values()}
    assert Status.approved in statuses and len(statuses) > 3


def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path):
    crash_rounds(tmp_path, rounds=3, seed=1)


@pytest.mark.slow
def test_sigkill_soak(tmp_path):
    crash_rounds(tmp_path, rounds=12 * SLOW_SCALE, seed=2)


# --- a real disk-full run ------------------------------------------------------------


def test_engine_on_a_full_disk_answers_unavailable_then_resumes(tiny_fs):
    from authcore.engine import Engine, Unavailable

    cfg = Config.from_dict({"hold_ttl_seconds": 1, "durability": {"segment_bytes": 64 * 1024}})
    data = tiny_fs / "data"
    st = S.Storage.open(data, cfg)
    eng = Engine(cfg, clock=StepClock())
    st.recover(eng)
    eng.attach_log(st)
    wl = Workload(3, 50)
    for b in wl.setup():
        eng.submit(b)
    filler = fill_disk(tiny_fs / "filler")
    acked = 0
    with pytest.raises(Unavailable):
        for _ in range(1000):  # the preallocated segment fills, then a new one cannot be made
            eng.submit(wl.batch(40))
            acked += 1
    before = eng.digest()
    failed = wl.batch(40)
    with pytest.raises(Unavailable):
        eng.submit(failed)
    assert eng.digest() == before, "a batch answered unavailable changed nothing"
    os.unlink(filler)
    eng.submit(failed)  # the disk works again: served
    eng.submit(wl.batch(40))
    live = eng.digest()
    st.close()
    assert S.replay(data) == live
    st = S.Storage.open(data, cfg)
    eng2 = Engine(cfg)
    st.recover(eng2)
    st.close()
    assert eng2.digest() == live
