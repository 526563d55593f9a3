"""Replay throughput: events per second through the core, against raw ed25519 verification.

``python -m bench.replay [--events 2000] [--rounds 5]``

Builds a synthetic recording (fixed seeds, so every run replays the same
bytes): peer.test:8449 hosts a group room and sends its chain to
your-host.test in ``send`` transactions of 100 events, each request signed.
The recording goes to a temporary file and is read back with the researchers'
API, then replayed ``--rounds`` times (the best round counts). In the same run,
the same signatures (every event's and every request's) are verified with
pynacl directly, one call each. The ratio is replay events/s over raw-verify
events/s: 1.0 would mean the replay costs nothing beyond the signature checks
it cannot skip (decoding, canonical checks, hashing, chain links, the replay's
own bookkeeping make up the rest). Prints PASS/FAIL against the target (0.85)
and exits 1 if it is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from nacl.bindings import crypto_sign_open

from scaiwave_federation.core import Head, KeyRing, Policy, chain_event, sign_request
from scaiwave_federation.core.events import decode_event
from scaiwave_federation.core.keys import Domain
from scaiwave_federation.core.node import Federation
from scaiwave_federation.core.replay import replay_records
from scaiwave_federation.core.requests import parse_authorization
from scaiwave_federation.core.wire import decode, encode
from scaiwave_federation.shell.recorder import Recorder
from scaiwave_federation.shell.research.replay import open_recording

HOST, PEER = "your-host.test", "peer.test:8449"
NOW = 1_764_000_000_000
TXN = 100
TARGET = 0.85


def _node(name: str, seed_byte: int, peer: str) -> Federation:
    ring = KeyRing().generate(bytes([seed_byte]) * 32, NOW)
    return Federation(name, keyring=ring, policy=Policy("invite_only", frozenset({peer})))


def build(path: Path, events: int) -> list[tuple[bytes, bytes, bytes]]:
    """Write the recording; returns every signature in it as ``(public_key, signed, signature)``."""
    host, peer = _node(HOST, 1, PEER), _node(PEER, 2, HOST)
    key = peer.keyring.current
    room = f"!bench:{PEER}"
    rec = Recorder.open(path, HOST, now=NOW)
    rec.record("policy", NOW, policy=host.policy.as_dict())
    rec.record("own_keys", NOW, public=host.descriptor(f"https://{HOST}/_scaiwave/federation/v1"))
    rec.record("descriptor", NOW, server=PEER, body=json.dumps(peer.descriptor("https://x")).encode(),
               cached=True, fetched_at=NOW)
    signatures: list[tuple[bytes, bytes, bytes]] = []
    head: Head | None = None
    for t, start in enumerate(range(0, events, TXN)):
        context = {"peered": True, "heads": {room: {"known": True, "host": PEER,
                                                     "head": [head.depth, head.event_id] if head else None}}}
        chain = []
        for i in range(start, min(events, start + TXN)):
            event = chain_event(key, head=head, room_id=room, room_type="group", sender=f"@bob:{PEER}",
                                type="m.message" if i else "m.create", ts=NOW + i, content={"body": f"message {i}"})
            signatures.append((key.public_key, Domain.EVENT + event.body, event.signature))
            chain.append(event)
            head = Head(event.depth, event.event_id)
        body = encode({"events": [e.envelope for e in chain]})
        target = f"/_scaiwave/federation/v1/send/bench-{t}"
        now = NOW + 10_000 + t
        auth = sign_request(key, origin=PEER, destination=HOST, method="PUT", target=target, body=body, now=now)
        signed = parse_authorization(auth)
        signatures.append((key.public_key, Domain.REQUEST + signed.signed, signed.signature))
        reply = encode({"results": [{"event_id": e.id_text, "ok": True} for e in chain], "events": []})
        rec.record("inbound", now + 3, received_at=now, method="PUT", target=target, authorization=auth, body=body,
                   context=context, status=200, response=reply)
    rec.close()
    return signatures


def raw_verify(signatures: list[tuple[bytes, bytes, bytes]]) -> None:
    for public_key, signed, signature in signatures:
        crypto_sign_open(signature + signed, public_key)


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark, print the figures; returns the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.cbor"
        signatures = build(path, args.events)
        size = path.stat().st_size
        started = time.perf_counter()
        recording = open_recording(path)
        read_s = time.perf_counter() - started
    envelopes = [e for r in recording.records if r["kind"] == "inbound"
                 for e in decode(r["body"], max_size=1 << 24)["events"]]
    best_replay = best_raw = best_decode = float("inf")
    for _ in range(args.rounds):
        # Interleaved, best of each: the fairest figures on a busy machine.
        started = time.perf_counter()
        result = replay_records(recording.server_name, recording.records)
        best_replay = min(best_replay, time.perf_counter() - started)
        started = time.perf_counter()
        raw_verify(signatures)
        best_raw = min(best_raw, time.perf_counter() - started)
        started = time.perf_counter()
        for envelope in envelopes:
            decode_event(envelope)
        best_decode = min(best_decode, time.perf_counter() - started)
    stored = sum(d.replay.events.count("ok") for d in result.decisions)
    assert stored == args.events and not result.differing, "the benchmark recording must replay cleanly"
    replay_eps, raw_eps = args.events / best_replay, args.events / best_raw
    ratio = replay_eps / raw_eps
    print(f"recording: {args.events} events in {len(result.decisions)} transactions, {size} bytes, "
          f"read in {read_s * 1000:.1f} ms")
    print(f"replay: {replay_eps:,.0f} events/s ({best_replay * 1000:.1f} ms, best of {args.rounds})")
    print(f"  of which decoding the envelopes (core.events.decode_event, no verify): {best_decode * 1000:.1f} ms")
    print(f"raw pynacl verify of the same {len(signatures)} signatures: {raw_eps:,.0f} events/s ({best_raw * 1000:.1f} ms)")
    print(f"replay ratio vs raw verify: {ratio:.2f} (target >= {TARGET}) {'PASS' if ratio >= TARGET else 'FAIL'}")
    return ratio


if __name__ == "__main__":
    sys.exit(0 if main() >= TARGET else 1)
