"""A real daemon with rogue TLS hosts in the loop (tests/roguehost.py): what
a hostile or broken peer can no longer do (issue 16)."""

from __future__ import annotations

from pathlib import Path

import trio
import trustme

from roguehost import RogueHost, daemon, in_rogue_room, join_rogue_room, messages, set_up
from shellhelpers import trusting, wait_for
from scaiwave_federation.core import Code, Refused
from scaiwave_federation.core.backfill import PAGE_RETRY_MS, build_page
from scaiwave_federation.core.handshake import refusal_body


async def test_a_host_answering_moved_cursors_gets_a_bounded_backfill(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """Every page after the first comes back with a moved cursor and no
    events. The admin's backfill used to ask again until the host said 404
    (151 requests); now it ends at the first such page with ``no_progress``,
    and what it stored stays."""
    async with in_rogue_room(tmp_path, ca, history=30) as (rogue, b, room):
        pages = []

        async def moved(room_id, before, limit):
            pages.append(before)
            if len(pages) == 1:
                return 200, rogue.page(room_id, before, 1)  # an honest first page, of one event
            if len(pages) > 200:
                return 404, b""  # (what ended the loop before the fix)
            return 200, build_page(room_id, (before or 1000) + 7, [], [])

        rogue.backfill = moved
        status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{room}/backfill",
                                    {"limit": 20, "wait": True, "peer": rogue.server_name})
        assert status == 200, job
        assert len(pages) <= 3, f"{len(pages)} page requests"
        assert job["state"] == "failed" and job["error"]["code"] == "no_progress", job
        assert job["stored"] >= 1


async def test_a_host_limiting_our_rate_gets_the_page_asked_again_not_a_failed_job(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """The host answers the first page request ``rate_limited`` (HTTP 429, as
    our own daemon answers an origin over its rate). The admin's pull used to
    fail there; now the page is asked again a second later and the job is
    done, with the whole history stored."""
    async with in_rogue_room(tmp_path, ca, history=30) as (rogue, b, room):
        asked: list[tuple[int | None, float]] = []

        async def limiting(room_id, before, limit):
            asked.append((before, trio.current_time()))
            if len(asked) == 1:
                return 429, refusal_body(Refused(Code.RATE_LIMITED, "over 50 requests a second"))
            return None  # the honest page

        rogue.backfill = limiting
        status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{room}/backfill",
                                    {"limit": 100, "wait": True, "peer": rogue.server_name})
        assert status == 200, job
        assert job["state"] == "done" and job["error"] is None, job
        assert job["stored"] >= 30 and job["reached_start"], job  # the messages, the room and the join
        (first, at), (again, later) = asked[:2]
        assert again == first and later - at >= PAGE_RETRY_MS / 1000 * 0.9


async def test_a_slow_host_holds_up_only_its_own_catch_up(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """Two rooms on two hosts, both with a gap above bob's copy. The slow host
    trickles its page a byte at a time (each read on time, so httpx's per-read
    timeout never fires): its catch-up ends at the request's total deadline,
    and the other host's catch-up is not queued behind it."""
    authority, _ = ca
    async with trio.open_nursery() as nursery:
        slow = await RogueHost(authority, "slow.test").start(nursery)
        fast = await RogueHost(authority, "fast.test", seed=b"\x67" * 32).start(nursery)
        async with daemon(tmp_path, ca, "peer.test", slow, fast, SCAIWAVE_OUTBOUND_DEADLINE="4s") as b:
            token = await set_up(b, slow.server_name, fast.server_name)
            slow_room = await join_rogue_room(b, slow, token, "slowroom")
            fast_room = await join_rogue_room(b, fast, token, "fastroom")
            asked = trio.Event()

            async def trickled(room_id, before, limit):
                slow.trickle = 0.05  # ~20 bytes a second: every read on time, the page never done
                asked.set()
                return None

            slow.backfill = trickled
            for rogue, room in ((slow, slow_room), (fast, fast_room)):
                missed = rogue.chain(room, rogue.user("mallory"), "m.message", {"body": "missed"})
                above = rogue.chain(room, rogue.user("mallory"), "m.message", {"body": "above the gap"})
                del missed
                status, reply = await rogue.send(b, [above.envelope])
                assert status == 200 and reply["results"][0]["error"]["code"] == "chain_broken", reply
                if rogue is slow:
                    with trio.fail_after(5):
                        await asked.wait()
            start = trio.current_time()

            async def fast_caught_up():
                return await messages(b, fast_room, token) == ["missed", "above the gap"]

            await wait_for(fast_caught_up, timeout=3)
            assert trio.current_time() - start < 3
            assert await messages(b, slow_room, token) == []  # still being trickled

            async def slow_job_ended():
                for job_id in (1, 2):
                    status, job = await b.admin("GET", f"/v1/admin/federation/backfills/{job_id}")
                    if job["peer"] == slow.server_name and job["state"] != "running":
                        return job
                return None

            job = await wait_for(slow_job_ended, timeout=8)
            assert job["error"]["code"] == "peer_unreachable" and "within 4s" in job["error"]["message"], job
        nursery.cancel_scope.cancel()


async def test_a_host_that_chains_a_proposal_twice_shows_it_once(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """bob's single "I agree" comes back from the host chained twice, in the
    reply and again in order through a transaction. bob's server stores the
    first and refuses the second (``conflict``): bob sees it once."""
    authority, _ = ca
    async with trio.open_nursery() as nursery:
        rogue = await RogueHost(authority, "rogue.test").start(nursery)
        async with daemon(tmp_path, ca, "peer.test", rogue) as b:
            token = await set_up(b, rogue.server_name)
            room = await join_rogue_room(b, rogue, token)
            rogue.chain_twice = True
            status, posted = await b.request("POST", f"/v1/rooms/{room}/messages", {"body": "I agree"}, token=token)
            assert status == 200, posted
            assert await messages(b, room, token) == ["I agree"]
            first, second = rogue.rooms[room][-2:]
            status, reply = await rogue.send(b, [first.envelope, second.envelope])
            assert status == 200
            assert reply["results"][0] == {"event_id": first.id_text, "ok": True}
            assert reply["results"][1]["error"]["code"] == "conflict", reply
            assert await messages(b, room, token) == ["I agree"]
        nursery.cancel_scope.cancel()


async def test_a_host_chains_each_proposal_once(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """A member server sends the same proposal again in a new transaction: the
    host refuses it (``conflict``) instead of chaining it a second time."""
    authority, _ = ca
    async with trio.open_nursery() as nursery:
        rogue = await RogueHost(authority, "rogue.test").start(nursery)
        async with daemon(tmp_path, ca, "your-host.test", rogue) as a:
            token = await set_up(a, rogue.server_name)
            status, room = await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=token)
            room_id = room["room_id"]
            status, body = await a.request("POST", f"/v1/rooms/{room_id}/invite", {"user": rogue.user("mallory")},
                                           token=token)
            assert status == 200, body
            join = rogue.propose(room_id, "mallory", "m.member", {"membership": "join", "user": rogue.user("mallory")})
            status, reply = await rogue.send(a, [join.envelope])
            assert status == 200 and reply["results"][0]["ok"], reply
            agree = rogue.propose(room_id, "mallory", "m.message", {"body": "I agree"})
            status, reply = await rogue.send(a, [agree.envelope, agree.envelope])
            assert reply["results"][0]["ok"] and reply["results"][1]["error"]["code"] == "conflict", reply
            status, reply = await rogue.send(a, [agree.envelope])
            assert status == 200 and reply["results"][0]["error"]["code"] == "conflict", reply
            assert reply["events"] == []
            assert await messages(a, room_id, token) == ["I agree"]
        nursery.cancel_scope.cancel()


async def test_a_member_cannot_cut_the_hosts_history_short(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """A member server (the rogue) wrote into a room hosted by your-host, then
    rotated its key and re-published the old one as rotated out in 1970. A
    newcomer's backfill from the host used to stop at ``expired_key`` on the
    first event whose ``source`` the member signed; the host's signature
    vouches for those proposals, so the whole history now arrives."""
    from scaiwave_federation.shell.demo.testbed import free_port

    authority, _ = ca
    port_a, port_b = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        rogue = await RogueHost(authority, "rogue.test").start(nursery)
        async with daemon(tmp_path, ca, "your-host.test", rogue, port=port_a,
                          resolve=f"peer.test:{port_b}:127.0.0.1") as a, \
                daemon(tmp_path, ca, "peer.test", rogue, port=port_b,
                       resolve=f"your-host.test:{port_a}:127.0.0.1") as b:
            alice = await set_up(a, rogue.server_name, b.server_name)
            bob = await set_up(b, a.server_name)
            room = (await a.request("POST", "/v1/rooms", {"room_type": "group"}, token=alice))[1]["room_id"]
            assert (await a.request("POST", f"/v1/rooms/{room}/invite", {"user": rogue.user("mallory")},
                                    token=alice))[0] == 200
            join = rogue.propose(room, "mallory", "m.member", {"membership": "join", "user": rogue.user("mallory")})
            assert (await rogue.send(a, [join.envelope]))[1]["results"][0]["ok"]
            for i in range(3):
                said = rogue.propose(room, "mallory", "m.message", {"body": f"mallory {i}"})
                assert (await rogue.send(a, [said.envelope]))[1]["results"][0]["ok"]
            rogue.rewrite_past(b"\x77" * 32, expired_at=0)
            status, body = await a.request("POST", f"/v1/rooms/{room}/invite", {"user": f"@bob:{b.server_name}"},
                                           token=alice)
            assert status == 200, body
            assert (await b.request("POST", f"/v1/invites/{room}/accept", token=bob))[0] == 200
            status, job = await b.admin("POST", f"/v1/admin/federation/rooms/{room}/backfill",
                                        {"wait": True, "peer": a.server_name})
            assert status == 200 and job["state"] == "done" and job["reached_start"], job
            assert await messages(b, room, bob) == ["mallory 0", "mallory 1", "mallory 2"]
        nursery.cancel_scope.cancel()


async def test_an_origin_over_its_rate_is_refused_first_and_shown_to_the_admin(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """A peer sends requests as fast as it can: past its burst it is refused
    ``rate_limited`` (429, which a sender retries) before anything else
    happens, and the admin sees who is being limited. Sequential requests
    each release their slot (a concurrency of 2 never refuses them)."""
    authority, _ = ca
    async with trio.open_nursery() as nursery:
        rogue = await RogueHost(authority, "rogue.test").start(nursery)
        async with daemon(tmp_path, ca, "peer.test", rogue, SCAIWAVE_FEDERATION_RATE="1",
                          SCAIWAVE_FEDERATION_BURST="6", SCAIWAVE_FEDERATION_CONCURRENT="2") as b:
            await set_up(b, rogue.server_name)
            assert (await b.admin("POST", f"/v1/admin/federation/peers/{rogue.server_name}/handshake"))[0] == 200
            target = f"/_scaiwave/federation/v1/rooms/!nothing:{b.server_name}/backfill"
            answers = [await rogue.signed(b.server_name, "GET", target) for _ in range(12)]
            codes = [body["error"]["code"] for _status, body in answers]
            # The handshake took one token (b's answer... no: b asked us); each GET takes one.
            print(codes)
            assert codes[:4] == ["not_found"] * 4 and codes[-5:] == ["rate_limited"] * 5, codes
            assert {status for status, body in answers if body["error"]["code"] == "rate_limited"} == {429}
            status, view = await b.admin("GET", "/v1/admin/federation/limits")
            assert status == 200 and view["settings"]["rate"] == 1 and view["settings"]["concurrent"] == 2
            [limited] = view["limited"]
            assert limited["origin"] == rogue.server_name and limited["refused"] >= 5
            assert "more than 1 requests a second" in limited["reason"]
            assert view["busy"] == []  # every admitted request released its slot
        nursery.cancel_scope.cancel()


async def test_strangers_cannot_fill_our_outbound_capacity(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """110 requests claiming 110 different origins, each of whose descriptors
    trickles in a byte at a time. They used to cause 110 simultaneous
    descriptor fetches that filled the shared connection pool (100), and a
    local user's post to a healthy peer then failed with 504. Now at most
    ``descriptor_fetches_total`` fetches run at once, the rest are refused
    ``rate_limited`` at once, and bob's post goes through."""
    import httpx

    from roguehost import now_ms
    from scaiwave_federation.core import Federation, KeyRing
    from test_shell_client_limits import Rogue, serve

    authority, _ = ca
    count = 110
    names = [f"s{i}.test" for i in range(count)]
    async with trio.open_nursery() as nursery:
        trickle = Rogue(0.2, b"{" * 400)
        port = await serve(nursery, authority, trickle, *names)
        strangers = [Federation(f"{n}:{port}", keyring=KeyRing().generate(bytes([i + 1]) * 32, now_ms()))
                     for i, n in enumerate(names)]
        fast = await RogueHost(authority, "fast.test").start(nursery)
        resolve = ",".join(f"{n}:{port}:127.0.0.1" for n in names)
        async with daemon(tmp_path, ca, "peer.test", fast, resolve=resolve, SCAIWAVE_DESCRIPTOR_FETCHES_TOTAL="4",
                          SCAIWAVE_OUTBOUND_DEADLINE="30s") as b:
            token = await set_up(b, fast.server_name, mode="open")
            room = await join_rogue_room(b, fast, token)
            target = f"/_scaiwave/federation/v1/rooms/!x:{b.server_name}/backfill"
            statuses = []

            async def claim(stranger: Federation, http: httpx.AsyncClient) -> None:
                auth = stranger.sign(destination=b.server_name, method="GET", target=target, body=b"", now=now_ms())
                resp = await http.get(f"https://127.0.0.1:{b.port}{target}", extensions={"sni_hostname": b.host},
                                      headers={"host": b.server_name, "authorization": auth})
                statuses.append(resp.status_code)

            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(verify=trusting(authority), limits=limits,
                                         timeout=60) as http, trio.open_nursery() as flood:
                for stranger in strangers:
                    flood.start_soon(claim, stranger, http)
                with trio.fail_after(10):
                    while len(statuses) < count - 4:
                        await trio.sleep(0.05)
                assert trickle.held == trickle.most == 4
                assert statuses.count(429) >= count - 4
                start = trio.current_time()
                status, posted = await b.request("POST", f"/v1/rooms/{room}/messages", {"body": "still here"},
                                                 token=token)
                assert status == 200, posted
                assert trio.current_time() - start < 3
                status, view = await b.admin("GET", "/v1/admin/federation/limits")
                assert view["descriptor_fetches"]["caused_by_peers"] == 4
                assert len(view["limited"]) == min(count - 4, view["settings"]["max_shown"])
                flood.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_catch_ups_from_one_host_are_bounded(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """Three rooms on one host with a gap each: at most ``catch_ups_per_peer``
    (here 2) of its catch-ups run at once; the third starts when one ends."""
    authority, _ = ca
    async with trio.open_nursery() as nursery:
        slow = await RogueHost(authority, "slow.test").start(nursery)
        async with daemon(tmp_path, ca, "peer.test", slow, SCAIWAVE_CATCH_UPS_PER_PEER="2",
                          SCAIWAVE_OUTBOUND_DEADLINE="30s") as b:
            token = await set_up(b, slow.server_name)
            rooms = [await join_rogue_room(b, slow, token, f"r{i}") for i in range(3)]
            release, held = trio.Event(), []

            async def hold(room_id, before, limit):
                held.append(room_id)
                await release.wait()
                return None

            slow.backfill = hold
            for room in rooms:
                slow.chain(room, slow.user("mallory"), "m.message", {"body": "missed"})
                above = slow.chain(room, slow.user("mallory"), "m.message", {"body": "above the gap"})
                assert (await slow.send(b, [above.envelope]))[1]["results"][0]["error"]["code"] == "chain_broken"
            async def two_held():
                return len(held) >= 2

            await wait_for(two_held)
            await trio.sleep(0.5)
            assert len(held) == 2  # the third waits for a slot
            release.set()

            async def all_caught_up():
                return all([await messages(b, r, token) == ["missed", "above the gap"] for r in rooms])

            await wait_for(all_caught_up)
            assert sorted(held) == sorted(rooms)
        nursery.cancel_scope.cancel()


async def test_a_peer_refused_for_a_busy_fetch_slot_is_fetched_as_soon_as_one_frees(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """A stranger's trickling descriptor holds the only fetch slot: a real new
    peer's request is refused ``rate_limited``, and its retry once the slot is
    free is served (the refused fetch did not count as a fetch attempt, which
    would have locked the peer out for the 30 s refetch interval)."""
    from roguehost import now_ms
    from scaiwave_federation.core import Federation, KeyRing
    from test_shell_client_limits import Rogue, serve

    authority, _ = ca
    async with trio.open_nursery() as nursery:
        trickle = Rogue(0.05, b"{" * 100)
        port = await serve(nursery, authority, trickle, "stranger.test")
        stranger = Federation(f"stranger.test:{port}", keyring=KeyRing().generate(b"\x09" * 32, now_ms()))
        newcomer = await RogueHost(authority, "newcomer.test").start(nursery)
        async with daemon(tmp_path, ca, "peer.test", newcomer, resolve=f"stranger.test:{port}:127.0.0.1",
                          SCAIWAVE_DESCRIPTOR_FETCHES_TOTAL="1", SCAIWAVE_KEY_REFETCH_INTERVAL="30s",
                          SCAIWAVE_OUTBOUND_DEADLINE="2s") as b:
            await set_up(b, mode="open")
            target = f"/_scaiwave/federation/v1/rooms/!x:{b.server_name}/backfill"

            async def stranger_claims():
                await newcomer.signed(b.server_name, "GET", target, origin_node=stranger)

            nursery.start_soon(stranger_claims)
            async def slot_taken():
                return trickle.held == 1

            await wait_for(slot_taken)
            status, body = await newcomer.signed(b.server_name, "GET", target)
            assert (status, body["error"]["code"]) == (429, "rate_limited"), body

            async def slot_free():
                return trickle.held == 0

            await wait_for(slot_free)
            status, body = await newcomer.signed(b.server_name, "GET", target)
            assert body["error"]["code"] == "not_peered", body  # authenticated: its descriptor was fetched
        nursery.cancel_scope.cancel()


async def test_one_origin_causes_at_most_its_share_of_descriptor_fetches(
        tmp_path: Path, ca: tuple[trustme.CA, Path]) -> None:
    """A peered host sends three transactions at once, each carrying an event
    whose ``source`` names another server with a trickling descriptor: the
    fetches it causes are capped at ``descriptor_fetches_per_origin`` (2)."""
    from roguehost import now_ms
    from scaiwave_federation.core import Federation, KeyRing, make_event
    from test_shell_client_limits import Rogue, serve

    authority, _ = ca
    names = ["t0.test", "t1.test", "t2.test"]
    async with trio.open_nursery() as nursery:
        trickle = Rogue(0.05, b"{" * 400)
        port = await serve(nursery, authority, trickle, *names)
        rogue = await RogueHost(authority, "rogue.test").start(nursery)
        async with daemon(tmp_path, ca, "peer.test", rogue, resolve=",".join(f"{n}:{port}:127.0.0.1" for n in names),
                          SCAIWAVE_DESCRIPTOR_FETCHES_PER_ORIGIN="2", SCAIWAVE_OUTBOUND_DEADLINE="3s") as b:
            token = await set_up(b, rogue.server_name)
            room = await join_rogue_room(b, rogue, token)
            envelopes = []
            for i, name in enumerate(names):
                other = Federation(f"{name}:{port}", keyring=KeyRing().generate(bytes([0x30 + i]) * 32, now_ms()))
                said = make_event(other.keyring.current, room_id=room, room_type="group", depth=0, prev=None,
                                  origin=other.server_name, sender=f"@x:{other.server_name}", type="m.message",
                                  ts=now_ms(), content={"body": name})
                envelopes.append(rogue.chain(room, said.sender, "m.message", said.content, source=said.envelope).envelope)
            results = []

            async def send(envelope):
                results.append(await rogue.send(b, [envelope]))

            async with trio.open_nursery() as inner:
                for envelope in envelopes:
                    inner.start_soon(send, envelope)
            assert trickle.most == 2
            assert all(status == 200 for status, _ in results)
            status, view = await b.admin("GET", "/v1/admin/federation/limits")
            assert view["limited"][0]["origin"] == rogue.server_name
            assert "requests have 2 descriptor fetches in flight" in view["limited"][0]["reason"]
        nursery.cancel_scope.cancel()
