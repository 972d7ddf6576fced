"""Shared fixtures: an injectable clock and the two implementations.

Every decision test runs on the reference model (tests/model.py) and on
the Cython engine, like uvloop's test base runs each test on two loops.
The engine parameter is skipped only while the kernel extension is not
built; once it exists, an import error is a failure, never a skip.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The source checkout first, so `pytest` works without an install (and
# tests the tree, not a stale installed copy).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from authcore import constants as C  # noqa: E402

PAN_KEY = b"authcore-tests-pan-key-32-bytes!"
# 2023-11-14T22:13:20Z: an arbitrary fixed epoch, well inside a UTC day.
EPOCH_US = 1_700_000_000 * C.us_per_s


class FakeClock:
    """A clock callable (int µs) that moves only when a test moves it."""

    def __init__(self, now: int = EPOCH_US):
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, us: int) -> None:
        assert us >= 0
        self.now += us

    def set(self, us: int) -> None:
        self.now = us


def kernel_built() -> bool:
    """True once the extension and its engine wrapper exist (then never skip)."""
    return all(importlib.util.find_spec(m) is not None for m in ("authcore._kernel", "authcore.engine"))


def make_model(config=None, clock=None):
    from model import Model

    return Model(config, clock)


def make_engine(config=None, clock=None):
    from authcore.engine import Engine

    return Engine(config, clock=clock, pan_key=PAN_KEY)


IMPLS = {"model": make_model, "engine": make_engine}


@pytest.fixture(params=sorted(IMPLS))
def impl_factory(request):
    """``make(config=None, clock=None)`` building the model or the engine."""
    if request.param == "engine" and not kernel_built():
        pytest.skip("authcore._kernel is not built yet")
    return IMPLS[request.param]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def impl(impl_factory, clock):
    """The model or the engine with the default config and ``clock``."""
    return impl_factory(None, clock)


class Session:
    """Sends requests to an implementation, numbering ids automatically."""

    def __init__(self, impl, clock: FakeClock, first_id: int = 1000):
        self.impl = impl
        self.clock = clock
        self.next_id = first_id

    def __call__(self, op: str, **fields) -> dict:
        if "id" not in fields:
            fields["id"] = self.next_id
            self.next_id += 1
        return self.impl.execute({"op": op, **fields})

    def open(self, account: int, currency: int = 840, kind: str = "wallet", **limits) -> dict:
        ans = self("open", account=account, currency=currency, kind=kind, **limits)
        assert ans["status"] == "approved", ans
        return ans

    def funded(self, account: int, amount: int, currency: int = 840, **limits) -> None:
        """Open a wallet and deposit ``amount`` (if any) into it."""
        self.open(account, currency, **limits)
        if amount:
            ans = self("deposit", account=account, amount=amount)
            assert ans["status"] == "approved", ans

    def query(self, account: int) -> dict:
        return self.impl.execute({"op": "query", "id": 0, "account": account})


@pytest.fixture
def api(impl, clock):
    return Session(impl, clock)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (root only); always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(path):
    """Write a file until ENOSPC; returns its path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def start_server(config=None, clock=None):
    """An in-process server (ServerThread) on free ports, in-memory engine."""
    from authcore.engine import Engine
    from authcore.server import ServerThread

    eng = Engine(config, clock=clock or FakeClock(), pan_key=PAN_KEY)
    return ServerThread(engine=eng, config=config).start()


@pytest.fixture
def srv():
    s = start_server()
    yield s
    s.stop()
