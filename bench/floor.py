"""The floor: what a minimal *strict* ingest pipeline costs, next to raw verify.

``python -m bench.floor``

Not the core: throwaway pipelines that keep only the heavy checks the issue
requires (strict cbor2 decode with no tags, no indefinite lengths, no
duplicate or non-text keys; canonical re-encode; sha256 id; signature) and
none of the rest (field checks, names, the Event object, chain links). One
decodes today's map bodies, one a *positional* (array) body. They bound what
the ingest target (raw / core >= 0.85) leaves for everything else. On the
development machine: map floor about 0.88, positional floor about 0.91, the
core 0.80 to 0.81 (``python -m bench.ingest``).
"""

from __future__ import annotations

import hashlib
import time

import cbor2
from nacl.bindings import crypto_sign_open

from bench.ingest import build_batch
from scaiwave_federation.core import events as ev
from scaiwave_federation.core.keys import Domain, sign

_TYPES = (int, str, str, int, bytes, str, str, str, int, dict)


def main() -> float:
    _local, host, events = build_batch(2000, 1)
    key = host.keyring.current
    assert key is not None
    pk = key.public_key
    envelopes = []
    for e in events[1:]:
        body = cbor2.dumps([1, e.room_id, e.room_type, e.depth, e.prev, e.origin, e.sender, e.type, e.ts, e.content],
                           canonical=True)
        envelopes.append(cbor2.dumps([body, key.key_id, sign(key, Domain.EVENT, body)], canonical=True))
    strict = ev._STRICT

    map_envelopes = [e.envelope for e in events[1:]]
    key_orders = ev._KEY_ORDERS

    def map_pipeline() -> None:
        jobs = []
        for envelope in map_envelopes:
            body, _key_id, signature = ev._split_envelope(envelope)
            fields = cbor2.loads(body, **strict)
            if type(fields) is not dict or tuple(fields) not in key_orders or cbor2.dumps(fields) != body:
                raise SystemExit("floor pipeline refused a valid event")
            jobs.append((hashlib.sha256(body).digest(), signature + Domain.EVENT + body))
        for _id, signed in jobs:
            crypto_sign_open(signed, pk)

    def pipeline() -> None:
        jobs = []
        for envelope in envelopes:
            body, _key_id, signature = ev._split_envelope(envelope)
            fields = cbor2.loads(body, **strict)
            if type(fields) is not list or tuple(map(type, fields)) != _TYPES or cbor2.dumps(fields) != body:
                raise SystemExit("floor pipeline refused a valid event")
            jobs.append((hashlib.sha256(body).digest(), signature + Domain.EVENT + body))
        for _id, signed in jobs:
            crypto_sign_open(signed, pk)

    def raw() -> None:
        for e in events[1:]:
            crypto_sign_open(e.signature + Domain.EVENT + e.body, pk)

    def best(fn) -> float:
        times = []
        for _ in range(9):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    r, m, p = best(raw), best(map_pipeline), best(pipeline)
    n = len(envelopes)
    print(f"raw verify {r / n * 1e6:.1f} us/event; minimal strict pipeline: map body {m / n * 1e6:.1f}, "
          f"positional body {p / n * 1e6:.1f} us/event")
    print(f"floor ratio vs raw verify: map body {r / m:.3f}, positional body {r / p:.3f} (the ingest target is 0.85)")
    return r / m


if __name__ == "__main__":
    main()
