"""authcore.client: blocking and asyncio clients, both protocols, retries.

The retry tests put a proxy between client and server that cuts the
connection in the middle of a pipelined batch; the client reconnects and
sends what was not answered with the same ids, and the account shows every
deposit applied exactly once (idempotency makes the retry safe).
"""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np
import pytest

from authcore import constants as C
from authcore.client import AsyncClient, Client
from authcore.server import ServerThread

from conftest import PAN_KEY, FakeClock, kernel_built

pytestmark = pytest.mark.skipif(not kernel_built(), reason="authcore._kernel is not built yet")

USD = 840


@pytest.fixture
def srv():
    from authcore.engine import Engine

    s = ServerThread(engine=Engine(clock=FakeClock(), pan_key=PAN_KEY)).start()
    yield s
    s.stop()


class CuttingProxy:
    """Forwards to ``port``; the first ``cuts`` connections are cut after the
    server has sent ``after`` bytes back (answers lost in flight)."""

    def __init__(self, port: int, after: int, cuts: int = 1):
        self.port = port
        self.after = after
        self.cuts = cuts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.connections = 0
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            cut = self.connections <= self.cuts
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.after if cut else None), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.stop = True
        self.listener.close()


def test_blocking_client_json_and_binary_single_and_batch(srv):
    for proto in ("json", "binary"):
        base = 1 if proto == "json" else 10_000
        with Client("127.0.0.1", srv.ports[proto], proto) as c:
            acct = base
            assert c.open_account(id=base, account=acct, currency=USD)["status"] == "approved"
            answers = c.batch([{"op": "deposit", "id": base + 1 + i, "account": acct, "amount": 10} for i in range(500)])
            assert [a["id"] for a in answers] == [base + 1 + i for i in range(500)]
            assert answers[-1]["available"] == 5000
            a = c.authorize(id=base + 600, account=acct, amount=700, currency=USD, merchant=9)
            assert a["status"] == "approved" and len(a["auth_code"]) == 6
            assert c.capture(id=base + 601, auth=base + 600)["approved_amount"] == 700
            assert c.request({"op": "query", "account": acct})["balance"] == 4300


def test_binary_submit_numpy_roundtrip(srv):
    with Client("127.0.0.1", srv.ports["binary"], "binary") as c:
        c.open_account(id=1, account=1, currency=USD)
        n = 20_000  # several frames
        r = np.zeros(n, C.REQUEST_DTYPE)
        r["id"] = np.arange(100, 100 + n)
        r["op"] = C.Op.deposit
        r["account"] = 1
        r["amount"] = 1
        a = c.submit(r)
        assert a.dtype == C.ANSWER_DTYPE and len(a) == n
        assert (a["id"] == r["id"]).all() and (a["available"] == np.arange(1, n + 1)).all()
        assert c.frame_records <= c.server_limits["batch_max"]


def test_async_client_both_protocols(srv):
    async def main():
        out = {}
        for proto, base in (("json", 1), ("binary", 50_000)):
            async with AsyncClient("127.0.0.1", srv.ports[proto], proto) as c:
                await c.open_account(id=base, account=base, currency=USD)
                got = await c.batch([{"op": "deposit", "id": base + 1 + i, "account": base, "amount": 3} for i in range(300)])
                out[proto] = (got[-1]["available"], (await c.query(account=base))["balance"])
                if proto == "binary":
                    r = np.zeros(2, C.REQUEST_DTYPE)
                    r["op"] = C.Op.query
                    r["account"] = base
                    assert ((await c.submit(r))["balance"] == 900).all()
        return out

    assert asyncio.run(main()) == {"json": (900, 900), "binary": (900, 900)}


@pytest.mark.parametrize("proto", ["json", "binary"])
def test_reconnect_and_retry_applies_each_request_once(srv, proto):
    with Client("127.0.0.1", srv.ports[proto], proto) as c:
        c.open_account(id=1, account=1, currency=USD)
    # cut after part of the answers went back: some deposits were applied and
    # answered-but-lost, the rest maybe not even read by the server
    after = 200 * 60 if proto == "json" else 64 * 300 + 16 + 52
    proxy = CuttingProxy(srv.ports[proto], after=after, cuts=2)
    try:
        with Client(*proxy.addr, protocol=proto, retries=5) as c:
            if proto == "binary":
                c.frame_records = 100  # several frames, so a cut falls between them
            reqs = [{"op": "deposit", "id": 1000 + i, "account": 1, "amount": 1} for i in range(2000)]
            answers = c.batch(reqs)
            assert c.reconnects >= 1
            assert [a["id"] for a in answers] == [r["id"] for r in reqs]
            assert all(a["status"] == "approved" for a in answers)
            stamps = [a["stamp"] for a in answers]
            assert len(set(stamps)) == len(stamps)  # repeats returned first answers, whole
        with Client("127.0.0.1", srv.ports["json"]) as direct:
            assert direct.query(account=1)["balance"] == 2000  # each deposit exactly once
    finally:
        proxy.close()


def test_gives_up_after_retries():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def slam():
        for _ in range(10):
            try:
                s, _ = listener.accept()
            except OSError:
                return
            s.close()

    threading.Thread(target=slam, daemon=True).start()
    c = Client("127.0.0.1", port, "json", retries=2)
    with pytest.raises(ConnectionError, match="gave up after 2"):
        c.query(account=1)
    assert c.reconnects == 2
    listener.close()


def test_protocol_argument_is_checked():
    with pytest.raises(ValueError, match="protocol"):
        Client("127.0.0.1", 1, "xml", connect=False)
    with pytest.raises(ValueError, match="binary"):
        Client("127.0.0.1", 1, "json", connect=False).submit(np.zeros(1, C.REQUEST_DTYPE))
