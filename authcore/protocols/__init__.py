"""Wire protocols of the server, one module each.

Every protocol is an ``authcore.server.Session`` subclass: it parses what it
reads into REQUEST_DTYPE records, hands them to the server with ``submit``
(one batch writer for every connection), answers malformed input itself with
``reply``, and turns the engine's ANSWER_DTYPE records back into bytes in
``encode``.  Order of answers per connection is kept by the base class.

- ``json_lines``: one JSON object per line (SPEC §7, §10.12).
- ``binary``: length-prefixed frames of 64-byte records (docs/protocol.md).
- ``iso8583``: the card networks' messages (SPEC §7); optional, provides
  ``make_iso_protocol(server)`` returning a protocol factory.
"""

from __future__ import annotations

LISTENERS = ("binary", "json", "iso8583")  # the order of the startup line
