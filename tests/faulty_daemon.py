"""``scaiwave serve`` with one fault: a host that lies in backfill pages.

The end-to-end tests start it (``python -m faulty_daemon serve``, tests/ on
``PYTHONPATH``) to check that the puller refuses a tampered event and stores
nothing below it. ``TAMPERED_EVENT=ROOM_ID@DEPTH`` names the event served
with its content changed and its signature kept. The fault lives here, in
the tests, so that no installed server can be told to lie.
"""

from __future__ import annotations

import logging
import os
import sys

import cbor2

from scaiwave_federation.core import encode
from scaiwave_federation.shell import cli
from scaiwave_federation.shell.api import federation

TAMPERED = os.environ["TAMPERED_EVENT"]
_build_page = federation.build_page


def _tamper(envelope: bytes) -> bytes:
    body, key_id, signature = cbor2.loads(envelope)
    fields = cbor2.loads(body)
    fields["content"] = {**fields["content"], "body": "tampered in transit"}
    return encode([encode(fields), key_id, signature])


def build_page(room_id: str, before, envelopes, depths) -> bytes:
    out = []
    for envelope, depth in zip(envelopes, depths):
        if f"{room_id}@{depth}" == TAMPERED:
            logging.getLogger("faulty_daemon").warning("serving %s tampered (a test fault)", TAMPERED)
            envelope = _tamper(envelope)
        out.append(envelope)
    return _build_page(room_id, before, out, depths)


federation.build_page = build_page

if __name__ == "__main__":
    sys.exit(cli.main())
