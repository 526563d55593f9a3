"""Verified ingest against a Matrix-style pipeline: the same events, the same durability.

``python -m bench.pipeline [--events N] [--repeat R] [--seed S]``

Both sides take a batch of chained, signed events as they arrive off the wire
and end with them stored, linked and durable in a fresh SQLite file of the
daemon's schema (WAL, ``synchronous=FULL``, one transaction for the batch):

- **ScaiWave**: the envelopes (canonical CBOR) through the core's
  ``verify_events`` (strict decode, event id hash, key lookup, signature) and
  ``link_run`` (the chain), signatures on the daemon's verify pool
  (``shell.verify_pool.threaded_verifier``, as the daemon ingests), then
  ``Store.store_events``;
- **Matrix-style**: the same events as Matrix PDUs (JSON, ``hashes``,
  ``signatures``, ``prev_events``), each as Synapse checks one: parse, content
  hash over canonical JSON, signature with signedjson (``verify_signed_json``),
  reference hash for the event id, ``prev_events``/depth link; then the same
  ``Store.store_events`` (the JSON as the stored envelope).

The target is ``matrix / scaiwave >= 1.3`` (best of R, interleaved). Also
printed, not a target: the core with signatures checked on the calling
thread, like for like with the single-threaded Matrix-style checks.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from canonicaljson import encode_canonical_json
from signedjson.key import decode_signing_key_base64, get_verify_key
from signedjson.sign import sign_json, verify_signed_json
from unpaddedbase64 import decode_base64, encode_base64

from bench.ingest import HOST, ROOM, build_batch
from scaiwave_federation.core import Event, Federation
from scaiwave_federation.core.events import verify_events
from scaiwave_federation.core.rooms import link_run
from scaiwave_federation.shell.store.store import Store
from scaiwave_federation.shell.runtime.verify_pool import threaded_verifier

TARGET = 1.3


def _redact_for_hash(pdu: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pdu.items() if k not in ("signatures", "unsigned", "hashes")}


def matrix_pdus(events: list[Event], seed: bytes) -> tuple[list[bytes], Any]:
    """The events as Matrix PDUs (JSON bytes), chained by reference hash, signed with signedjson."""
    signing_key = decode_signing_key_base64("ed25519", "bench", encode_base64(seed))
    pdus, prev_id = [], None
    for event in events:
        pdu: dict[str, Any] = {
            "room_id": ROOM, "sender": event.sender, "origin": HOST, "type": event.type,
            "content": event.content, "depth": event.depth, "origin_server_ts": event.ts,
            "prev_events": [prev_id] if prev_id else [], "auth_events": [],
        }
        pdu["hashes"] = {"sha256": encode_base64(hashlib.sha256(encode_canonical_json(pdu)).digest())}
        pdu = sign_json(pdu, HOST, signing_key)
        prev_id = "$" + encode_base64(_reference_hash(pdu), urlsafe=True)
        pdus.append(json.dumps(pdu).encode())
    return pdus, get_verify_key(signing_key)


def _reference_hash(pdu: dict[str, Any]) -> bytes:
    return hashlib.sha256(encode_canonical_json({k: v for k, v in pdu.items()
                                                 if k not in ("signatures", "unsigned")})).digest()


def matrix_ingest(pdus: list[bytes], verify_key: Any) -> list[dict[str, Any]]:
    """Synapse's checks of each PDU, in order; returns the rows to store."""
    rows: list[dict[str, Any]] = []
    prev_id, prev_depth = None, 0
    for raw in pdus:
        pdu = json.loads(raw)
        expected = decode_base64(pdu["hashes"]["sha256"])
        if hashlib.sha256(encode_canonical_json(_redact_for_hash(pdu))).digest() != expected:
            raise SystemExit("content hash mismatch")
        verify_signed_json(pdu, pdu["origin"], verify_key)
        event_id = _reference_hash(pdu)
        expected_prev = ["$" + encode_base64(prev_id, urlsafe=True)] if prev_id else None
        if pdu["depth"] != prev_depth + 1 or (prev_id and pdu["prev_events"] != expected_prev):
            raise SystemExit("chain broken")
        rows.append({"event_id": event_id, "depth": pdu["depth"], "sender": pdu["sender"], "origin": pdu["origin"],
                     "type": pdu["type"], "ts": pdu["origin_server_ts"], "envelope": raw})
        prev_id, prev_depth = event_id, pdu["depth"]
    return rows


def stored_in_fresh_file(rows: Callable[[], list[dict[str, Any]]]) -> float:
    """``rows()`` then one durable write of them into a fresh database (opened
    and migrated before the clock starts); the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        store.create_room(room_id=ROOM, room_type="group", host=HOST, creator=f"@bob:{HOST}", created_at=0)
        gc.collect()
        started = time.perf_counter()
        made = rows()
        if store.store_events(ROOM, made) != len(made):
            raise SystemExit("not every event was stored")
        seconds = time.perf_counter() - started
        store.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    local, host, events = build_batch(args.events, args.seed)
    envelopes = [e.envelope for e in events]
    pdus, verify_key = matrix_pdus(events, bytes([2]) * 32)
    pool = ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="verify")
    threaded = Federation(local.server_name, keyring=local.keyring, policy=local.policy,
                          verifier=threaded_verifier(pool))
    threaded.keys = local.keys

    def ours(node: Federation) -> Callable[[], list[dict[str, Any]]]:
        def rows() -> list[dict[str, Any]]:
            results = verify_events(envelopes, node.lookup, verifier=node.batch_verifier)
            linked, refusal = link_run(results, None)
            if refusal is not None or linked != len(envelopes):
                raise SystemExit(f"the core refused a valid event: {refusal}")
            return [r.as_record() for r in results]
        return rows

    sides = (ours(threaded), lambda: matrix_ingest(pdus, verify_key), ours(local))
    best = [stored_in_fresh_file(side) for side in sides]
    for _ in range(args.repeat):  # interleaved, so that machine drift hits all sides alike
        best = [min(b, stored_in_fresh_file(side)) for b, side in zip(best, sides)]
    t_ours, t_matrix, t_single = best
    pool.shutdown()
    n = len(events)
    ratio = t_matrix / t_ours
    print(f"{n} chained signed events, verified, linked and stored durably; best of {args.repeat}")
    print(f"scaiwave (daemon's ingest, verify pool): {t_ours * 1000:8.1f} ms ({t_ours / n * 1e6:5.1f} us/event)")
    print(f"scaiwave, signatures on one thread:      {t_single * 1000:8.1f} ms ({t_single / n * 1e6:5.1f} us/event)")
    print(f"matrix-style (signedjson + canonicaljson): {t_matrix * 1000:6.1f} ms ({t_matrix / n * 1e6:5.1f} us/event)")
    print(f"single-threaded ratio (not a target): {t_matrix / t_single:.2f}x")
    print(f"verified ingest vs Matrix-style pipeline: {ratio:.2f}x (target >= {TARGET}x) "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
