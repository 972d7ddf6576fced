"""The benchmark scripts run, in a short form, and report what they claim.

bench/RESULTS.md quotes their figures; a script that broke, or that let a
table grow while it was timing, would quietly publish wrong numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("steady", [False, True])
def test_kernel_bench_is_deterministic_and_grows_nothing_while_timed(steady):
    args = ["--accounts", "5000", "--batch", "4096", "--seconds", "0.3"]
    if steady:
        args += ["--steady", "--ids-max", "65536", "--holds-max", "65536"]
    a = run_bench("kernel.py", *args)
    b = run_bench("kernel.py", *args)
    assert a["tables_grown_while_timed"] == [] and b["tables_grown_while_timed"] == []
    assert a["answers_digest"] == b["answers_digest"]  # the same answers, whatever the speed
    assert a["ops_per_s"] > 0 and a["auth_per_s"] < a["ops_per_s"]
    assert a["statuses"]["approved"] > 0
    if steady:
        assert a["warmup_batches"] > 1  # the memories filled before timing


def test_durability_bench_replays_and_recovers_to_the_live_digest(tmp_path):
    r = run_bench("durability.py", "--accounts", "10000", "--seconds", "0.5", "--dir", str(tmp_path))
    assert r["replay_digest_matches_live"] is True
    assert r["recovered_digest_matches_live"] is True
    assert r["snapshot_load_digest_matches"] is True  # read back as recovery reads it
    assert r["always_over_none"] > 0 and r["snapshot_write_gb_per_s"] > 0
