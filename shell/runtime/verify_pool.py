"""A :data:`~scaiwave_federation.core.keys.BatchVerifier` that spreads signature checks over threads.

The core gathers every signature of a batch (a transaction, an invite, a
backfill page) and hands them to one ``BatchVerifier`` call, so the host
decides how to run them. pynacl calls libsodium through cffi, which releases
the GIL for the duration of each call, so ed25519 verification on a thread
pool runs truly in parallel: on two cores, two threads verify a large batch
about 1.8 times as fast as one (``python -m bench.ingest`` measures it).

Usage::

    from concurrent.futures import ThreadPoolExecutor
    from scaiwave_federation.core import Federation
    from scaiwave_federation.shell.runtime.verify_pool import threaded_verifier

    pool = ThreadPoolExecutor(2, thread_name_prefix="verify")
    node = Federation(name, keyring=ring, verifier=threaded_verifier(pool))

The returned callable blocks its caller until the batch is checked; under
Trio, call the core from ``trio.to_thread.run_sync`` when batches are large,
or accept the (shortened) block. Small batches are checked in the calling
thread, where handing them to the pool would cost more than it saves.
Results keep the input order, and the verdicts are exactly those of
:func:`~scaiwave_federation.core.keys.verify_batch`: this changes speed only.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Sequence

from scaiwave_federation.core import BatchVerifier, verify_batch

__all__ = ["threaded_verifier", "MIN_CHUNK"]

#: Below this many signatures per thread, the batch is verified inline.
MIN_CHUNK = 16


def threaded_verifier(executor: Executor, *, workers: int | None = None, min_chunk: int = MIN_CHUNK) -> BatchVerifier:
    """A ``BatchVerifier`` that splits each batch into one chunk per worker of ``executor``.

    ``workers`` defaults to the executor's ``max_workers`` (2 if it does not
    say). The executor is the caller's: it is neither created nor shut down here.
    """
    if workers is None:
        # ThreadPoolExecutor keeps its size in a private attribute; fall back to 2.
        workers = getattr(executor, "_max_workers", None) or 2
    if workers < 1 or min_chunk < 1:
        raise ValueError("workers and min_chunk must be at least 1")

    def verify(items: Sequence[tuple[bytes, bytes, bytes]]) -> list[bool]:
        items = list(items)
        chunks = min(workers, len(items) // min_chunk)
        if chunks < 2:
            return verify_batch(items)
        size = -(-len(items) // chunks)
        futures = [executor.submit(verify_batch, items[i:i + size]) for i in range(0, len(items), size)]
        out: list[bool] = []
        for future in futures:
            out.extend(future.result())
        return out

    return verify
