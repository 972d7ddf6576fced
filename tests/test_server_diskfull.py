"""Disk full during load, through the server (issue 7): requests are
answered ``unavailable``, the server stays up (and says not ready), it
resumes when space returns, and ``authcore verify`` passes afterwards.
The engine-level version of this is tests/test_crash.py; this one goes over
a socket with the real storage on a 1 MiB tmpfs (root only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


from authcore.client import Client
from authcore.config import Config
from authcore.server import ServerThread
from conftest import fill_disk

ROOT = Path(__file__).resolve().parent.parent


def _ready(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        return int(s.recv(100).split()[1])


def test_disk_full_answers_unavailable_stays_up_resumes_and_verifies(tiny_fs):
    cfg = Config.from_dict({"durability": {"segment_bytes": 64 * 1024, "snapshot_interval_requests": 0}})
    data = tiny_fs / "data"
    with ServerThread(data_dir=data, config=cfg) as s:
        with Client("127.0.0.1", s.ports["json"], "json") as c:
            assert c.open_account(id=1, account=1, currency=978)["status"] == "approved"
            filler = fill_disk(tiny_fs / "filler")
            next_id, unavailable = 100, None
            for _ in range(400):  # the preallocated segment fills, then no new one can be made
                batch = [{"op": "deposit", "id": next_id + i, "account": 1, "amount": 1} for i in range(50)]
                out = c.batch(batch)
                if any(a["status"] == "unavailable" for a in out):
                    unavailable = batch
                    assert all(a["status"] == "unavailable" for a in out)  # a batch is all or nothing
                    break
                next_id += 50
            assert unavailable is not None, "the disk never filled"
            assert _ready(s.ports["metrics"]) == 503
            before = c.query(account=1)
            assert before["status"] == "approved"  # still up and answering reads
            assert c.batch(unavailable)[0]["status"] == "unavailable"  # still full: still refused
            os.unlink(filler)
            out = c.batch(unavailable)  # same ids again: now decided once
            assert all(a["status"] == "approved" for a in out)
            after = c.query(account=1)
            assert after["balance"] == before["balance"] + 50
            assert _ready(s.ports["metrics"]) == 200
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "authcore", "verify", "--data", str(data)], capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
