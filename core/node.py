"""The federation node: one server's core state and its inbound decisions.

:class:`Federation` bundles what every decision needs (our name, key ring,
policy, peers' keys, the replay window, the clock readings passed in) and
answers the questions the host asks for each federation request:

1. :meth:`Federation.route` -- which endpoint is this (``not_found`` otherwise)?
2. :meth:`Federation.receive` -- is it signed by who it claims, now? A
   machine (:mod:`.receive`) whose key fetch is a :class:`~.events.NeedKeys`
   effect answered through :func:`~.drive.answer`.
3. the endpoint's own decision: :meth:`on_handshake`, :meth:`on_invite`,
   :meth:`on_events`, :meth:`on_backfill`.

Decisions that need stored state (a room's head, a member's membership) take
that state as arguments: the node never reads storage. The same node type
serves the Trio daemon, an embedding host and ``scaiwave replay``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .codes import Code, Refused
from .descriptor import PROTOCOL_VERSIONS, build_descriptor
from .effects import KeyRotated, PeerAgreed
from .events import Event, NeedKeys, verify_events
from .handshake import answer_hello
from .inbound import TxnDecision, TxnSnapshot, decide_transaction
from .keycache import DEFAULT_REFETCH_INTERVAL_MS, KeyCache, PeerDescriptor
from .keys import BatchVerifier, KeyRing, ServerKeys, verify_batch
from .authz import Party, RoomFacts, may_receive_invite, server_may_read_history
from .policy import Policy, room_refusal
from .receive import Receive
from .requests import DEFAULT_SKEW_MS, Authenticated, RequestVerifier, sign_request
from . import backfill
from .names import server_of
from .rooms import decode_events_body

__all__ = ["Federation", "Route", "ROUTES", "InviteDecision", "FEDERATION_PREFIX"]

FEDERATION_PREFIX = "/_scaiwave/federation/v1/"

#: (method, path pattern) -> endpoint name. Anything else is ``not_found``.
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"handshake"), "handshake"),
    ("PUT", re.compile(r"invite/(?P<room_id>![^/?#]{1,255})"), "invite"),
    ("PUT", re.compile(r"send/(?P<txn_id>[A-Za-z0-9._~-]{1,128})"), "send"),
    ("GET", re.compile(r"rooms/(?P<room_id>![^/?#]{1,255})/backfill"), "backfill"),
)


@dataclass(frozen=True, slots=True)
class Route:
    """A recognised federation endpoint and its path parameter."""

    endpoint: str
    param: str | None = None


@dataclass(frozen=True, slots=True)
class InviteDecision:
    """An accepted invite: keep ``event`` and notify ``invitee``."""

    room_id: str
    room_type: str
    invitee: str
    inviter: str
    event: Event


class Federation:
    """One server's federation core. All time arguments are integer milliseconds."""

    def __init__(
        self,
        server_name: str,
        *,
        keyring: KeyRing | None = None,
        policy: Policy | None = None,
        skew_ms: int = DEFAULT_SKEW_MS,
        refetch_interval_ms: int = DEFAULT_REFETCH_INTERVAL_MS,
        versions: tuple[str, ...] = PROTOCOL_VERSIONS,
        verifier: BatchVerifier = verify_batch,
    ) -> None:
        self.server_name = server_name
        self.keyring = keyring or KeyRing()
        self.policy = policy or Policy()
        self.versions = versions
        self.keys = KeyCache(refetch_interval_ms=refetch_interval_ms)
        self.requests = RequestVerifier(server_name, self.keys, skew_ms=skew_ms)
        self.batch_verifier = verifier

    # -- our own identity ----------------------------------------------------------

    def descriptor(self, federation_endpoint: str) -> dict[str, Any]:
        """Our signed descriptor (JSON-ready)."""
        return build_descriptor(self.server_name, self.keyring, federation_endpoint=federation_endpoint,
                                protocol_versions=self.versions)

    def lookup(self, server: str) -> ServerKeys | None:
        """Keys of ``server``: ours from the key ring, others' from the cache."""
        if server == self.server_name:
            return self.keyring.public(self.server_name)
        return self.keys.keys(server)

    def sign(self, *, destination: str, method: str, target: str, body: bytes, now: int) -> str | Refused:
        """The Authorization header for an outbound request, or ``own_key_missing``."""
        key = self.keyring.current
        if key is None:
            return Refused(Code.OWN_KEY_MISSING, "no federation key: run `scaiwave admin federation key generate`")
        return sign_request(key, origin=self.server_name, destination=destination, method=method,
                            target=target, body=body, now=now)

    def learn_descriptor(self, server: str, data: bytes, now: int) -> PeerDescriptor | Refused:
        """Feed fetched descriptor bytes of ``server`` into the key cache."""
        return self.keys.learn(server, data, now)

    def timers(self) -> dict[str, int]:
        """When to call :meth:`handle_timer` next, per reason (``rotate_key``, ``expire_nonces``)."""
        out = {}
        due = self.keyring.rotation_due_at()
        if due is not None:
            out["rotate_key"] = due
        nonce = self.requests.replay.next_expiry()
        if nonce is not None:
            out["expire_nonces"] = nonce
        return out

    def poll_timeout(self) -> int | None:
        """When (ms) to call :meth:`handle_timeout` next; ``None``: no timer is set
        (quinn-proto's ``poll_timeout``: one deadline, whatever it is for)."""
        return min(self.timers().values(), default=None)

    def handle_timeout(self, now: int, *, seed: bytes, singleton: bool = True) -> list[KeyRotated]:
        """Run every timer due at ``now``: forget expired replay-window entries,
        and rotate our key when its year is up, with ``seed`` (32 fresh random
        bytes from the host: the core draws no randomness; unused otherwise).
        Returns :class:`~.effects.KeyRotated` with the new key ring to persist.
        ``singleton``: whether this worker runs the jobs that must run once
        across workers (``core.leases``: the holder of ``job:timers``); the
        others only forget their own expired replay-window entries."""
        if not singleton:
            self.requests.replay.expire(now)
            return []
        if "rotate_key" in self.handle_timer(now):
            self.keyring = self.keyring.rotate(seed, now)
            return [KeyRotated(self.keyring)]
        return []

    @staticmethod
    def nonce_stored(fresh: bool) -> Refused | None:
        """The answer to an authenticated request once its nonce went into the
        shared replay window (the database, the authority when several
        workers serve one name): ``fresh`` False means another worker (or
        this one, before a restart) received this very request already, so it
        is refused exactly as a replay one worker sees itself."""
        return None if fresh else Refused(Code.REPLAYED_REQUEST, "this signed request was already received")

    def handle_timer(self, now: int) -> list[str]:
        """Run what is due at ``now``. Returns the due actions the host must carry
        out with its own randomness (``"rotate_key"``: call ``keyring.rotate``)."""
        self.requests.replay.expire(now)
        due = self.keyring.rotation_due_at()
        return ["rotate_key"] if due is not None and now >= due else []

    # -- inbound -------------------------------------------------------------------

    def route(self, method: str, path: str) -> Route | Refused:
        """Which federation endpoint ``method path`` is (path without query)."""
        if not path.startswith(FEDERATION_PREFIX):
            return Refused(Code.NOT_FOUND, f"no federation endpoint {path[:120]}")
        rest = path[len(FEDERATION_PREFIX):]
        for want_method, pattern, name in ROUTES:
            match = pattern.fullmatch(rest)
            if match:
                if method.upper() != want_method:
                    return Refused(Code.NOT_FOUND, f"{name} takes {want_method}")
                params = match.groupdict()
                return Route(name, next(iter(params.values()), None))
        return Refused(Code.NOT_FOUND, f"no federation endpoint {path[:120]}")

    def receive(self, *, method: str, target: str, authorization: str | None, body: bytes) -> Receive:
        """The machine that routes and authenticates one inbound request (its
        key fetch an effect): what every host drives, see :mod:`.receive`."""
        return Receive(self, method=method, target=target, authorization=authorization, body=body)

    def authenticate(self, *, method: str, target: str, authorization: str | None, body: bytes,
                     now: int) -> Authenticated | Refused | NeedKeys:
        """Check the request signature (see :mod:`.requests`) and our own state.

        The *claimed* origin must be admitted by our policy before anything
        else is done for it: a stranger gets its refusal, and no descriptor
        fetch (:class:`NeedKeys`), replay-window entry or other trace.
        """
        if self.keyring.current is None:
            # Without a key we cannot prove anything to anyone: refuse first.
            return Refused(Code.OWN_KEY_MISSING, f"{self.server_name} has no federation key yet")
        return self.requests.verify(authorization, method=method, target=target, body=body, now=now,
                                    admit=self.policy.admits)

    def on_transaction(self, auth: Authenticated, results: list[Event | Refused | NeedKeys],
                       snapshot: TxnSnapshot, now: int) -> TxnDecision:
        """Decide a verified transaction (``on_events``' results) from the stored
        state in ``snapshot``: see :mod:`.inbound`. Pure: the host stores,
        pushes and reports what the decision says."""
        return decide_transaction(server_name=self.server_name, key=self.keyring.current, origin=auth.origin,
                                  results=results, snapshot=snapshot, now=now, unverifiable=self.unverifiable)

    def on_proposal_reply(self, host: str, results: list[Event | Refused | NeedKeys], snapshot: TxnSnapshot,
                          now: int) -> TxnDecision:
        """What to store of the chained events a room's ``host`` answered our own
        proposal with (``decode_txn_reply``'s envelopes, verified with
        :func:`~.events.verify_events` under :meth:`lookup`). Decided like a
        transaction from the host, except that a room we hold nothing of yet
        starts with them (our join: its history before comes by backfill)."""
        checked = [Refused(Code.FORBIDDEN, f"{host[:100]} answered with an event of {r.origin[:100]}")
                   if isinstance(r, Event) and r.origin != host else r for r in results]
        return decide_transaction(server_name=self.server_name, key=None, origin=host, results=checked,
                                  snapshot=snapshot, now=now, unverifiable=self.unverifiable, starts_rooms=True)

    def _content_refusal(self, server: str) -> Refused | None:
        """Whose signed words we never verify (and so never fetch keys for): a
        blocked server, or anyone when federation is closed. ``invite_only``
        governs whom we peer with, not whose proposals a peer's room may
        relay: a room's member on a third server is verified like any other."""
        refusal = self.policy.admits(server)
        return None if refusal is None or refusal.code is Code.PEER_NOT_ALLOWED else refusal

    def unverifiable(self, need: NeedKeys) -> Refused:
        """What an event whose keys we could not get is refused with: the
        policy's refusal when we never fetch from its server, else ``unknown_key``."""
        refusal = self._content_refusal(need.server)
        if refusal is not None:
            return refusal
        return Refused(Code.UNKNOWN_KEY, f"{need.server[:100]} key {str(need.key_id)[:64]} is unknown")

    def may_fetch_keys(self, server: str, now: int, key_id: str | None = None) -> Refused | None:
        """May the host fetch ``server``'s descriptor now, for traffic (not an
        admin's explicit request)? Never from a blocked server or when
        federation is closed (a request's claimed origin was already admitted
        by :meth:`authenticate`), and no more often than the key cache's rate
        limit allows."""
        refusal = self._content_refusal(server)
        if refusal is not None:
            return refusal
        if not self.keys.may_fetch(server, now, key_id):
            return Refused(Code.UNKNOWN_KEY, f"{server} was asked for its keys moments ago")
        return None

    def on_handshake(self, auth: Authenticated, body: bytes) -> tuple[bytes, PeerAgreed] | Refused:
        """The responder's side of the handshake."""
        return answer_hello(origin=auth.origin, body=body, server_name=self.server_name,
                            key=self.keyring.current, policy=self.policy, versions=self.versions,
                            origin_key_id=auth.key_id)

    def admit(self, auth: Authenticated, *, peered: bool) -> Refused | None:
        """May this authenticated origin use invite/send/backfill now?"""
        refusal = self.policy.admits(auth.origin)
        if refusal is not None:
            return refusal
        if not peered:
            return Refused(Code.NOT_PEERED, f"{auth.origin} has not completed a handshake with {self.server_name}")
        return None

    def on_invite(self, auth: Authenticated, room_id: str, body: bytes, *,
                  local_user: Callable[[str], Party | None],
                  members: Mapping[str, str] | None = None) -> InviteDecision | Refused:
        """An invite of one of our users into ``room_id`` hosted by the origin.

        ``local_user(user_id)`` answers what we know of a user of ours (``None``:
        no such user); ``members`` is the room's memberships as we store them
        (see :func:`~.rooms.invitee_of` to learn whom to look up first).
        """
        if server_of(room_id) != auth.origin:
            return Refused(Code.FORBIDDEN, f"{auth.origin} does not host {room_id[:100]}")
        decoded = decode_events_body(body)
        if isinstance(decoded, Refused):
            return decoded
        if len(decoded[0]) != 1:
            return Refused(Code.MALFORMED, "an invite carries exactly one event: the m.member invite")
        invite = verify_events(decoded[0], self.lookup, verifier=self.batch_verifier)[0]
        if isinstance(invite, NeedKeys):
            # The request was signed with a key we hold; an invite signed with
            # another is refused, not fetched for (the host re-sends).
            return self.unverifiable(invite)
        if not isinstance(invite, Event):
            return invite
        if invite.room_id != room_id or invite.depth < 1:
            return Refused(Code.WRONG_ROOM, f"the invite event is not a chained event of {room_id[:100]}")
        invitee = invite.content.get("user")
        if invite.type != "m.member" or invite.content.get("membership") != "invite" or not isinstance(invitee, str):
            return Refused(Code.MALFORMED, "the last event of an invite is an m.member invite")
        refusal = may_receive_invite(server_name=self.server_name, origin=auth.origin, room_id=room_id,
                                     room_type=invite.room_type, inviter=invite.sender,
                                     invitee=local_user(invitee) if server_of(invitee) == self.server_name else None,
                                     invitee_id=invitee, membership=(members or {}).get(invitee))
        if refusal is not None:
            return refusal
        return InviteDecision(room_id, invite.room_type, invitee, invite.sender, invite)

    def on_events(self, auth: Authenticated, body: bytes) -> list[Event | Refused | NeedKeys] | Refused:
        """A transaction: decode and verify every event (chain links are the caller's,
        against its stored heads, with :func:`~.rooms.link`)."""
        decoded = decode_events_body(body)
        if isinstance(decoded, Refused):
            return decoded
        results = verify_events(decoded[0], self.lookup, verifier=self.batch_verifier)
        origin = auth.origin
        checked: dict[tuple[str, str], Refused | None] = {}  # (room, room type): one check per room
        for index, result in enumerate(results):
            if type(result) is not Event:
                continue
            if result.depth == 0:
                # Proposals come from the sender's server (their origin, checked with the signature).
                refusal = room_refusal(result.room_type)
                if refusal is None and result.origin != origin:
                    refusal = Refused(Code.FORBIDDEN, f"{origin} may not relay proposals of {result.origin[:100]}")
            else:
                # Chained events come from their host.
                room = (result.room_id, result.room_type)
                refusal = checked[room] if room in checked else checked.setdefault(room, self._host_refusal(room, origin))
            if refusal is not None:
                results[index] = refusal
        return results

    @staticmethod
    def _host_refusal(room: tuple[str, str], origin: str) -> Refused | None:
        room_id, room_type = room
        refusal = room_refusal(room_type)
        if refusal is None and server_of(room_id) != origin:
            refusal = Refused(Code.FORBIDDEN, f"{origin} does not host {room_id[:100]}")
        return refusal

    def on_backfill(self, auth: Authenticated, room_id: str, query: Mapping[str, str], *,
                    room_type: str | None, tenant_federates: bool,
                    members: Mapping[str, str]) -> tuple[int | None, int] | Refused:
        """May ``auth.origin`` read ``room_id``'s history? Returns ``(before, limit)``
        for storage, then :func:`~.backfill.build_page` encodes the page.

        ``room_type`` is ``None`` when we host no such room; ``members`` are
        its memberships (user id -> membership) as stored here.
        """
        if room_type is None or server_of(room_id) != self.server_name:
            return Refused(Code.NOT_FOUND, f"{self.server_name} hosts no room {room_id[:100]}")
        refusal = server_may_read_history(
            RoomFacts(room_id, room_type, tenant_federates=tenant_federates, members=members), auth.origin)
        if refusal is not None:
            return refusal
        return backfill.parse_query(query)
