"""Two cores over the fake link: key rotation on a simulated clock.

B hosts a room whose history was signed under its first key. B rotates. On
A's clock, inside the 30-day window B's requests under the old key still
authenticate; past it they are refused ``expired_key``; requests under the
new key are learned from B's descriptor without any manual refresh; and the
old history keeps verifying and backfilling a year later.
"""

from __future__ import annotations

from corehelpers import A, B, DAY, NOW, BackfillRun, hosted_pair, run_backfill, seed
from scaiwave_federation.core import BackfillPuller, Code, Event, SendRequest, sign_request
from scaiwave_federation.core.keys import GRACE_MS


def _send(link, key, now: int) -> tuple[int, bytes]:
    """B sends A a transaction (one of its room's events) signed with ``key`` at ``now``."""
    room = link.server(B).rooms[f"!grp:{B}"]
    from corehelpers import events_body

    body = events_body(room.events[-1:])
    target = f"/_scaiwave/federation/v1/send/t{now}"
    auth = sign_request(key, origin=B, destination=A, method="PUT", target=target, body=body, now=now)
    return link.deliver(B, SendRequest(A, "PUT", target, body, auth), now)


def _code(reply: tuple[int, bytes]) -> str | None:
    import cbor2

    status, body = reply
    return None if status == 200 else cbor2.loads(body)["error"]["code"]


def test_rotation_inside_and_past_the_grace_window_over_the_link():
    link, chain, room_id = hosted_pair(30)
    b = link.server(B).node
    old_key = b.keyring.current
    rotated_at = NOW + 10 * DAY
    b.keyring = b.keyring.rotate(seed(99), rotated_at)
    new_key = b.keyring.current

    # Inside the window: the old key still authenticates live traffic.
    assert _code(_send(link, old_key, rotated_at + 29 * DAY)) is None
    # The new key is unknown to A: it re-fetches B's descriptor by itself.
    fetches = len(link.fetches)
    assert _code(_send(link, new_key, rotated_at + 29 * DAY + 1)) is None
    assert link.fetches[fetches:] == [B]
    # Past the window: refused, while the new key keeps working.
    past = rotated_at + GRACE_MS + 1
    assert _code(_send(link, old_key, past)) == Code.EXPIRED_KEY.value
    assert _code(_send(link, new_key, past)) is None

    # A year later, A backfills the history signed under the old key: it verifies.
    later = rotated_at + 365 * DAY
    run: BackfillRun = run_backfill(link, BackfillPuller(
        server_name=A, room_id=room_id, peer=B, key=link.server(A).node.keyring.current,
        keys=link.server(A).node.keys), now=later)
    assert run.done is not None and run.done.refusal is None and run.done.reached_start
    assert [e.event_id for e in run.stored] == [e.event_id for e in reversed(chain)]
    assert all(isinstance(e, Event) and e.key_id == old_key.key_id for e in run.stored)
