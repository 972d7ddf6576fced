"""JSON lines: one request object per line in, one answer object per line out.

Goals: SPEC §7 and §10.12 exactly (``"op"`` names the operation, integers for
ids/amounts/currency/mcc/country, ``pan`` a string, lowercase enum names);
every line gets exactly one answer line, in order; anything malformed (bad
JSON, not an object, unknown op, missing or mistyped field, a line over
``server.line_bytes_max``) is answered ``{"status": "bad_request", "code":
"30", "error": ...}`` naming the problem (with ``id`` when it could be read)
and the connection stays usable.  Blank lines are ignored (no answer).

Non-goals: JSON arrays of requests (use pipelining), pretty-printed
multi-line objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from ..constants import REQUEST_DTYPE, STATUS_CODE, Status
from ..records import retry_id, retry_probe
from ..server import Session, _Entry
from ._json_codec import encode_answers, parse_requests

_OPT = orjson.OPT_APPEND_NEWLINE
_BAD_CODE = STATUS_CODE[Status.bad_request]
error_message_chars_max = 200  # an error names the problem, it does not echo input


def bad_request_line(error: str, request_id: Any = None) -> bytes:
    """The bad_request answer line (SPEC §7), with the id if it was readable."""
    out: dict[str, Any] = {}
    if type(request_id) is int and 0 <= request_id < 1 << 64:
        out["id"] = request_id
    out["status"] = "bad_request"
    out["code"] = _BAD_CODE
    out["error"] = error[:error_message_chars_max]
    return orjson.dumps(out, option=_OPT)


# --- answers -------------------------------------------------------------------
#
# records.answers_to_json is the reference (one dict per answer).
# _json_codec.encode_answers writes the same bytes from the answer records
# in C; tests check it on random answers.


def _encode_with_refusals(entry: _Entry, client: str | None) -> bytes:
    """Answer lines of a submit some of whose records security refused."""
    from ..security import refusal_json

    refused = entry.refused
    keep = entry.keep
    out: list = [None] * len(refused)
    if len(keep):
        lines = encode_answers(entry.requests[keep], entry.answers[keep]).split(b"\n")
        for i, line in zip(keep.tolist(), lines):
            out[i] = line + b"\n"
    ids, ops = entry.requests["id"].tolist(), entry.requests["op"].tolist()
    for i in np.flatnonzero(refused).tolist():
        out[i] = orjson.dumps(refusal_json(ids[i], ops[i], int(refused[i]), client), option=_OPT)
    return b"".join(out)


# --- requests --------------------------------------------------------------------
#
# records.request_tuple is the reference parser (it names the field of every
# error and clamps out-of-range money).  _json_codec.parse_requests parses
# the hot operations in C when every field is present, well typed and in
# range, and stops at the first line it does not take; that line goes
# through orjson + request_tuple.  tests/test_server_json.py checks the two
# agree on hypothesis-generated lines.


class JsonLinesSession(Session):
    protocol_name = "json"

    def __init__(self, server):
        super().__init__(server)
        from ..records import RequestError, request_tuple

        self._slow_parse = request_tuple
        self._request_error = RequestError
        self.line_max = server.limits.line_bytes_max
        self.buf = b""  # an incomplete line (at most line_max bytes)
        self.discarding = False  # inside an oversized line, already answered

    def has_partial(self) -> bool:
        return bool(self.buf) or self.discarding

    def feed(self, data: bytes) -> None:
        if self.discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1 :]
            self.discarding = False
        if self.buf:
            data = self.buf + data
            self.buf = b""
        lines = data.split(b"\n")
        tail = lines.pop()
        if lines:
            self._lines(lines)
        if len(tail) > self.line_max:
            self._bad(f"line exceeds {self.line_max} bytes")
            self.discarding = True
        else:
            self.buf = tail

    def _lines(self, lines: list[bytes]) -> None:
        recs: list = []  # reference-parsed tuples not yet submitted
        slow = self._slow_parse
        hasher = self.server.hasher
        loads = orjson.loads
        line_max = self.line_max
        i, n = 0, len(lines)
        out: np.ndarray | None = None  # rows for every fast line of this read (one per line at most)
        used = 0
        while i < n:
            if self.awaiting_key:  # identities without a client certificate: the first line is the API key
                line = lines[i]
                i += 1
                if not line.strip():
                    continue
                if not self._authenticate(line):
                    return
                continue
            if out is None:
                out, used = np.empty(n - i, REQUEST_DTYPE), 0
            i, rows = parse_requests(lines, i, line_max, out[used:])
            if rows:
                self._submit(recs)
                recs = []
                self.submit(out[used : used + rows])
                used += rows
            if i == n:
                break
            line = lines[i]  # one the C parser did not take: the reference decides
            i += 1
            if len(line) > line_max:
                self._submit(recs)
                recs = []
                self._bad(f"line exceeds {line_max} bytes")
                continue
            try:
                obj = loads(line)
            except orjson.JSONDecodeError as e:
                if not line.strip():
                    continue  # blank line (or a lone \r): no request, no answer
                self._submit(recs)
                recs = []
                self._bad(f"malformed JSON: {e}")
                continue
            if type(obj) is not dict:
                self._submit(recs)
                recs = []
                self._bad("a request must be a JSON object")
                continue
            try:
                recs.append(slow(obj, hasher))
            except self._request_error as e:
                self._submit(recs)
                recs = []
                self._malformed(obj, str(e), e.id if e.id is not None else obj.get("id"))
            except (TypeError, ValueError, OverflowError) as e:
                # A value of a type the parser did not expect (a list where a
                # name belongs): still a bad request, never a dead connection.
                self._submit(recs)
                recs = []
                self._malformed(obj, f"malformed request: {type(e).__name__}", obj.get("id"))
        self._submit(recs)

    def _malformed(self, obj: dict, error: str, request_id: Any) -> None:
        """A request object that cannot be decided: bad_request, unless it
        repeats a remembered id (SPEC §1: the first answer "whatever the
        repeated request contains").  Only the engine knows the ids, so one
        with a readable id goes there as a probe (records.retry_probe);
        ``encode`` turns a bad_request answer to it into this error.  Not
        with client identities: a probe would bypass their op permissions."""
        rid = retry_id(obj)
        if rid is None or getattr(self.server.security, "identities", None):
            self._bad(error, request_id)
            return
        self.submit(retry_probe(rid), context=error)

    def _authenticate(self, line: bytes) -> bool:
        """``{"op": "auth", "api_key": "..."}`` -> ``{"status": "approved", "client": name}``."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        key = obj.get("api_key") if type(obj) is dict and obj.get("op") == "auth" else None
        name = self.server.security.authenticate_key(self, key.encode()) if type(key) is str else None
        if name is None:
            if type(key) is not str:
                self.server.security.refused(self.protocol_name, self.peer or "?", "bad_api_key", "first line is not an auth line")
            self.reply(orjson.dumps({"op": "auth", "status": "not_permitted", "code": STATUS_CODE[Status.not_permitted],
                                     "error": 'authentication required: send {"op": "auth", "api_key": ...} first'},
                                    option=_OPT))  # fmt: skip
            self.start_draining()
            return False
        self.reply(orjson.dumps({"op": "auth", "status": "approved", "code": "00", "client": name}, option=_OPT))
        return True

    def _submit(self, recs: list) -> None:
        if not recs:
            return
        self.submit(np.array(recs, REQUEST_DTYPE))

    def _bad(self, error: str, request_id: Any = None) -> None:
        self.server.metrics.bad_requests.labels(self.protocol_name).inc()
        self.reply(bad_request_line(error, request_id))

    def encode(self, entry: _Entry) -> bytes:
        if entry.refused is not None:  # security refused rows (a rate limit: a probe too)
            return _encode_with_refusals(entry, self.client_name)
        if type(entry.context) is str:  # a retry probe (_malformed): the first answer or the error
            assert len(entry.requests) == 1, len(entry.requests)
            if entry.answers["status"][0] == Status.bad_request:
                self.server.metrics.bad_requests.labels(self.protocol_name).inc()
                return bad_request_line(entry.context, int(entry.requests["id"][0]))
        return encode_answers(entry.requests, entry.answers)

    def send_error(self, message: str) -> None:
        self._write(bad_request_line(message))
