"""ISO 8583 listener: the card networks' messages in, engine decisions out.

Goals (SPEC §7, §10.13; the wire mapping is docs/iso8583.md):
- A gateway points its existing jPOS-style connector at authcore: 1987
  messages with ``iso8583.specs.default_ascii`` fields, each framed by a
  2-byte big-endian length (NACChannel).  0100 -> authorize (0110), 0200 ->
  purchase (0210), 0220 -> capture (0230), 0400/0420 -> void (0410/0430),
  0800 -> echo (0810, answered here).
- Retransmissions get the first answer: a request's id is derived from its
  class and fields 37 + 42 (BLAKE2b-64; for completions and reversals also
  7, 11 and 41), so the engine's idempotency memory answers a repeat, and a
  completion or reversal names its authorisation's hold by 37 + 42.
- Malformed messages get the response MTI with 39 = 30 when their type can
  be read; otherwise (no 4-digit request MTI) the connection is closed after
  the answers before it.  The server never fails because of a message.
- Speed: one C call (``_iso_codec.scan``) decodes every complete frame of a
  read into REQUEST_DTYPE records; one C call encodes their answers.  Only
  the PAN lookup runs per message in Python.
- A full PAN never reaches a log line, a metric label or an error message:
  problems are logged by reason and field number only.

Non-goals: MACs, key exchange (0800 70=161), 1993/2003 message versions,
multi-currency conversion, partial approvals requested by the acquirer (no
1987 field says "partial allowed"; code 10 never occurs here).

Interface with ``authcore.server`` (its ``Session`` contract):
``make_iso_protocol(server)`` returns the protocol factory the server passes
to ``server.listen("iso8583", factory, host, port)``.  Each connection is an
``IsoSession`` (a ``server.Session``): ``feed`` scans what was read and
calls ``Session.submit(records, context=batch, prepare=...)`` once per read
(or ``Session.reply`` when the read held no engine work).  The ``prepare``
hook runs on the server's writer thread just before the batch goes to
``Engine.submit``; it resolves PANs with ``engine.card_account`` there,
because the card table belongs to the writer (a lookup from the loop thread
could race with an ``issue_card`` being decided with the GIL released).
``encode(entry)`` turns the answers (and the answers made here) back into
frames, in arrival order.
"""

from __future__ import annotations

import bisect
import functools
import logging
from typing import Any

import numpy as np

from ..server import Session, _Entry
from ._iso_codec import Batch, scan

log = logging.getLogger("authcore.iso8583")

protocol_name = "iso8583"
scan_messages_max = 8192  # messages decoded per scan call: bounds one entry's arrays
# (a read is at most 256 KiB, >= 2,000 messages of >= 120 bytes, so one call
# usually takes a whole read).
frame_header_size = 2  # NACChannel: 2-byte big-endian length before each message
frame_payload_max = 0xFFFF  # what 2 bytes can say; a partial frame is at most this
problems_logged_max = 8  # malformed messages logged per read (the rest are counted)

_MISSING = object()


def make_iso_protocol(server: Any):
    """The asyncio protocol factory for the ISO 8583 port."""
    return functools.partial(IsoSession, server)


def _prepare(batch: Batch, engine: Any, records: np.ndarray) -> None:
    """Writer thread: set the account (or FLAG_NO_CARD) of each 0100/0200.

    ``records`` is the next part of ``batch.records`` in the engine's batch
    (the server may split one read's records across batches, in order).
    """
    first = batch.cursor
    n = len(records)
    batch.cursor = first + n
    assert first + n <= batch.n_records, (first, n, batch.n_records)
    assert np.array_equal(records["id"], batch.records["id"][first : first + n])
    rows = batch.pan_rows
    lo = bisect.bisect_left(rows, first)
    hi = bisect.bisect_left(rows, first + n)
    if lo < hi:
        card_account = engine.card_account
        seen: dict[str, Any] = {}  # one read often repeats a card; one HMAC each
        accounts = []
        for pan in batch.pans[lo:hi]:
            a = seen.get(pan, _MISSING)
            if a is _MISSING:
                a = seen[pan] = card_account(pan)
            accounts.append(a)
        batch.set_accounts(records, first, rows[lo:hi], accounts)
    if first + n == batch.n_records:
        batch.drop_pans()  # the clear PANs live no longer than their batch


class IsoSession(Session):
    """One gateway connection."""

    protocol_name = protocol_name

    def __init__(self, server: Any):
        super().__init__(server)
        self.buf = b""  # an incomplete frame (< 2 + frame_payload_max bytes)

    def has_partial(self) -> bool:
        return bool(self.buf)

    def feed(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        elif type(data) is not bytes:
            data = bytes(data)
        pos = 0
        while True:
            batch = scan(data, pos, scan_messages_max)
            if batch.problems:
                self._report(batch)
            if batch.n_msgs:
                self._dispatch(batch)
            pos = batch.consumed
            if batch.fatal:
                self.start_draining()  # answer what came before, then close
                return
            if not batch.more:
                break
        if pos < len(data):
            self.buf = data[pos:]
            assert len(self.buf) < frame_header_size + frame_payload_max + 1

    def _dispatch(self, batch: Batch) -> None:
        if batch.n_records == 0:
            self.reply(batch.encode(None))  # echoes and malformed messages only
            return
        prepare = functools.partial(_prepare, batch) if batch.pan_rows else None
        self.submit(batch.records, context=batch, prepare=prepare)

    def _report(self, batch: Batch) -> None:
        """Count and log refused messages: type, reason, field; never data."""
        metrics = getattr(self.server, "metrics", None)
        refused = [p for p in batch.problems if not p[3]]
        if metrics is not None and refused:
            metrics.bad_requests.labels(self.protocol_name).inc(len(refused))
        for mti, reason, field, fatal in batch.problems[:problems_logged_max]:
            if fatal:
                log.warning("iso8583: closing connection: %s (message type %s)", reason, mti)
            else:
                log.debug("iso8583: %s answered 30: %s (field %d)", mti, reason, field)

    def encode(self, entry: _Entry) -> bytes:
        batch = entry.context
        assert isinstance(batch, Batch)
        return batch.encode(entry.answers)

    def send_error(self, message: str) -> None:
        # ISO 8583 has no error text; the server closes the connection after
        # this (timeouts, connection limit), which is what a gateway expects.
        log.info("iso8583: closing connection: %s", message)


__all__ = ["IsoSession", "make_iso_protocol", "protocol_name"]
