"""Short fuzzing runs of every parser in CI (issue 7); the long run is
bench/fuzz.py (docs/security.md).  Each target drives the real protocol
session on a real in-memory engine; bench/fuzz.py states the invariants."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("authcore_bench_fuzz", ROOT / "bench" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

seconds_per_target = float(os.environ.get("AUTHCORE_FUZZ_SECONDS", "1.5"))
runs_per_target_max = 20_000
hyp = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_mutational_fuzz_finds_nothing(target):
    r = fuzz.run_random(target, seconds_per_target, seed=7, max_runs=runs_per_target_max)
    assert r["runs"] > 50  # it really ran


@pytest.mark.parametrize("target", fuzz.TARGETS)
@hyp
@given(data=st.binary(max_size=4096))
def test_random_bytes(target, data):
    fuzz.FUNCS[target](data)


_ops = ["open", "deposit", "withdraw", "authorize", "increment", "capture", "void", "refund", "purchase", "transfer",
        "set_limits", "freeze", "unfreeze", "close", "issue_card", "query", "auth", "nope"]  # fmt: skip
_fields = ["id", "account", "to", "auth", "amount", "currency", "merchant", "mcc", "country", "channel", "kind",
           "allow_partial", "credit_limit", "single_limit", "daily_limit", "pan", "set_all"]  # fmt: skip
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=24) | st.sampled_from(["online", "pos", "wallet", "merchant", "4111111111111111"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@hyp
@given(st.lists(st.fixed_dictionaries({"op": st.sampled_from(_ops)}, optional={f: _json_value for f in _fields}), max_size=12))
def test_json_lines_structured(objs):
    data = b"\x00" + b"".join(json.dumps(o).encode() + b"\n" for o in objs)  # json: ints beyond 64 bits too
    fuzz.fuzz_json(data)


# --- bounded memory: streams that never end a message -----------------------------------


def _session(cls):
    from authcore.server import SessionState

    s = cls(fuzz.server())
    s.connection_made(fuzz.FakeTransport())
    assert s.state == SessionState.open
    return s


def test_endless_json_line_is_discarded_not_buffered():
    from authcore.protocols.json_lines import JsonLinesSession

    s = _session(JsonLinesSession)
    for _ in range(2_000):  # 8 MB without a newline
        s.feed(b"x" * 4096)
        assert len(s.buf) <= fuzz.line_bytes_max
    s.feed(b'\n{"op":"query","account":1}\n')
    lines = bytes(s.transport.out).splitlines()
    assert len(lines) == 2 and b"exceeds" in lines[0] and b"no_account" in lines[1]


def test_huge_binary_frame_header_is_skipped_not_buffered():
    from authcore.protocols import binary as wire

    s = _session(wire.BinarySession)
    s.feed(wire.hello_frame())
    s.feed(wire.HEADER.pack(wire.MAGIC, wire.FrameType.requests, 0, 0xFFFFFFF0, 1))  # claims ~4 GiB
    for _ in range(1_000):
        s.feed(b"\0" * 8192)
        assert len(s.buf) <= wire.header_size
    assert b"exceeds" in bytes(s.transport.out)


def test_iso_partial_frame_is_bounded():
    from authcore.protocols.iso8583 import IsoSession, frame_header_size, frame_payload_max

    s = _session(IsoSession)
    s.feed(b"\xff\xff" + b"0" * 1000)
    for _ in range(100):
        s.feed(b"0" * 1000)
        assert len(s.buf) <= frame_header_size + frame_payload_max


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "binary", "--engine", "atheris",
                        "--seconds", "2"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Done" in r.stderr
