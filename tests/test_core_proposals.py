"""core.proposals: a proposal is chained at most once per room, by the host
and as accepted by receivers; and the store enforces it as a last line."""

from __future__ import annotations

from pathlib import Path

import pytest

from corehelpers import A, B, NOW, build_chain, make_node
from scaiwave_federation.core import Code, Head, chain_event, make_event
from scaiwave_federation.core.proposals import chained_once, may_chain, proposal_id
from scaiwave_federation.shell.store import schema
from scaiwave_federation.shell.store.store import Store, StorageError

ROOM = f"!grp:{B}"


def _setup():
    a, b = make_node(A, 1), make_node(B, 2)
    chain = build_chain(b.keyring.current, ROOM, 3)
    proposal = make_event(a.keyring.current, room_id=ROOM, room_type="group", depth=0, prev=None, origin=A,
                          sender=f"@alice:{A}", type="m.message", ts=NOW, content={"body": "I agree"})

    def chained(head):
        return chain_event(b.keyring.current, head=Head(head.depth, head.event_id), room_id=ROOM,
                           room_type="group", sender=proposal.sender, type="m.message", ts=NOW,
                           content=proposal.content, source=proposal.envelope)

    first = chained(chain[-1])
    second = chained(first)
    return chain, proposal, first, second


def test_a_proposal_is_chained_and_accepted_once():
    chain, proposal, first, second = _setup()
    assert proposal_id(first) == proposal_id(second) == proposal.event_id
    assert proposal_id(chain[0]) is None
    assert may_chain(proposal, None) is None
    refusal = may_chain(proposal, first.event_id)
    assert refusal.code is Code.CONFLICT and first.id_text in refusal.detail
    assert chained_once(first, None) is None
    assert chained_once(first, first.event_id) is None  # the same event again: a duplicate, fine
    refusal = chained_once(second, first.event_id)
    assert refusal.code is Code.CONFLICT and "already chained" in refusal.detail
    assert first.as_record()["proposal_id"] == proposal.event_id and "proposal_id" not in chain[0].as_record()


def test_the_store_keeps_one_chained_event_per_proposal(tmp_path: Path):
    chain, proposal, first, second = _setup()
    with Store.open(tmp_path) as store:
        store.store_events(ROOM, [e.as_record() for e in chain] + [first.as_record()])
        assert store.proposal_chained(ROOM, proposal.event_id) == first.event_id
        assert store.store_events(ROOM, [first.as_record()]) == 0  # again: fine
        with pytest.raises(StorageError) as info:
            store.store_events(ROOM, [second.as_record()])
        assert info.value.code == "conflict"
        assert store.head(ROOM)["event_id"] == first.event_id


def test_the_migration_fills_the_table_from_stored_events(tmp_path: Path):
    chain, proposal, first, _ = _setup()
    with Store.open(tmp_path) as store:
        store.store_events(ROOM, [e.as_record() for e in chain] + [first.as_record()])
        store.db.execute("DROP TABLE proposals")
        store.db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        # Migration 2 alone: the later ones are in place already.
        assert schema.migrate(store.db, schema.MIGRATIONS[:2]) == 2
        store.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(schema.SCHEMA_VERSION)])
        assert store.proposal_chained(ROOM, proposal.event_id) == first.event_id
