"""Many peers: does the number of peers with a backlog slow the queueing of a post?

``python -m bench.peers [--peers N] [--posts N] [--rounds R]``

A big server has peers that are down, each with a queue waiting on its
backoff. Every post into a room with a remote member is handed to the
delivery machine (``core.delivery``) through the handover
(``core.handover``), and the host asks whether its sender must wake; every
look (each ``SCAIWAVE_OUTBOX_POLL``) asks, of each row queued since the last,
whether the machine holds it already. This measures that bookkeeping per
queued post, as ``Outbox._queued`` and ``Workers.look_outbox`` drive it:
``Handover.handle_queued``, ``Delivery.handle_enqueue``, ``Delivery.due_now``,
and a look's ``Delivery.queued`` of each new row, with 1 peer waiting and
with ``--peers`` (1,000) waiting, interleaved round by round; the best round
of each counts.

And a wake of the sender (``Outbox.outbox_worker``): the transactions due
(``Delivery.poll_transmit`` until None), then when to wake next
(``Delivery.poll_timeout``), with the host's lease check, while one peer is
busy and the others wait on their backoff.

Targets: with 1,000 peers waiting, a post's bookkeeping costs <= 1.5x what
it costs with one (it was 28x: the machine scanned every peer's queue for
each post, 84 us a post at 1,000 peers), and so does a wake of the sender
(it was O(peers): both calls scanned every peer with a queue; now a heap of
due times). Prints PASS/FAIL; exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import sys
import time

from scaiwave_federation.core import Delivery, Handover

TARGET = 1.5
ENVELOPE = [b"x" * 400]


def per_post(waiting: int, posts: int) -> float:
    """Seconds of CPU per queued post with ``waiting`` peers backed off."""
    delivery, handover = Delivery(), Handover()
    item = 0
    for n in range(waiting):
        item += 1
        delivery.handle_enqueue(f"p{n}.test", item, ENVELOPE, attempts=3, retry_at=2**62)
    start = time.process_time()
    for n in range(posts):
        item += 1
        if handover.handle_queued("dm.test", (item,), (), delivery.queued):
            delivery.handle_enqueue("dm.test", item, ENVELOPE)
            delivery.due_now("dm.test", 0)
        if n % 100 == 99:  # a look: each row queued since the last one
            for row in range(item - 99, item + 1):
                delivery.queued(row)
    return (time.process_time() - start) / posts


def per_wake(waiting: int, wakes: int) -> float:
    """Seconds of CPU per wake of the sender with ``waiting`` peers backed
    off and one peer busy: what ``Outbox.outbox_worker`` asks the machine
    each time it wakes (transactions due until none, then when to wake
    next, the host's lease check for the peers it considers), plus the
    busy peer's post and answer."""
    delivery = Delivery(pace_ms=0)
    item = 0
    for n in range(waiting):
        item += 1
        delivery.handle_enqueue(f"p{n}.test", item, ENVELOPE, attempts=3, retry_at=2**62)
    may_send = {f"p{n}.test" for n in range(waiting)} | {"dm.test"}
    start = time.process_time()
    for now in range(1, wakes + 1):
        item += 1
        delivery.handle_enqueue("dm.test", item, ENVELOPE, now=now)
        while (txn := delivery.poll_transmit(now, may_send=may_send.__contains__)) is not None:
            delivery.handle_result(txn.peer, txn.txn_id, (200, b""), now)
            while delivery.poll() is not None:
                pass
        delivery.poll_timeout(may_send=may_send.__contains__)
    return (time.process_time() - start) / wakes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="peers waiting (default 1000)")
    parser.add_argument("--posts", type=int, default=20_000, help="posts queued per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, interleaved (default 5)")
    args = parser.parse_args(argv)
    one, many, wake_one, wake_many = [], [], [], []
    for _ in range(args.rounds):
        one.append(per_post(1, args.posts))
        many.append(per_post(args.peers, args.posts))
        wake_one.append(per_wake(1, args.posts // 4))
        wake_many.append(per_wake(args.peers, args.posts // 4))
    ratio = min(many) / min(one)
    ok = ratio <= TARGET
    print(f"queueing a post: {min(many) * 1e6:.2f} us with {args.peers} peers waiting vs "
          f"{min(one) * 1e6:.2f} us with 1: {ratio:.2f}x (target <= {TARGET}x) {'PASS' if ok else 'FAIL'}")
    wake_ratio = min(wake_many) / min(wake_one)
    wake_ok = wake_ratio <= TARGET
    print(f"a sender wake: {min(wake_many) * 1e6:.2f} us with {args.peers} peers waiting vs "
          f"{min(wake_one) * 1e6:.2f} us with 1: {wake_ratio:.2f}x (target <= {TARGET}x) "
          f"{'PASS' if wake_ok else 'FAIL'}")
    return 0 if ok and wake_ok else 1


if __name__ == "__main__":
    sys.exit(main())
