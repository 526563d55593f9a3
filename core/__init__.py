"""ScaiWave Federation core: deterministic, sans-IO.

Inputs in (bytes, clock readings as integer milliseconds, injected random
seeds), effects and decisions out as values. Nothing here performs I/O,
reads a clock, draws randomness or looks at the environment (a test enforces
it), so the same core runs under Trio, asyncio, a blocking server or a replay
of recorded traffic, and gives the same outputs for the same inputs.

Modules, by what they own:

- :mod:`.codes` -- the refusal code table, :class:`Refused`, :class:`LocalProtocolError`
- :mod:`.wire` -- canonical CBOR, strict bounded decoding
- :mod:`.layouts` -- the usual byte layouts, read without a decoder (only ever accepts)
- :mod:`.names` -- server names, user and room ids
- :mod:`.keys` -- ed25519 keys, key ring, rotation and validity rules
- :mod:`.descriptor` -- ``/.well-known/scaiwave`` documents
- :mod:`.keycache` -- peers' keys and the refetch rate limit
- :mod:`.requests` -- signed requests and the replay window
- :mod:`.policy` -- who may federate, which rooms may leave
- :mod:`.handshake` -- the peering state machine
- :mod:`.events` -- signed, hash-chained events
- :mod:`.rooms` -- chaining, proposals, invites and transactions
- :mod:`.authz` -- room authorization: who may enter, speak in and read a room
- :mod:`.backfill` -- paged history pulls and serving
- :mod:`.delivery` -- what goes to each peer, batched and in order; retries and backoff
- :mod:`.leases` -- which worker delivers to which peer and runs the singleton jobs, with failover
- :mod:`.limits` -- per-origin rate and concurrency, caps on descriptor fetches peers cause
- :mod:`.proposals` -- each proposal chained at most once per room
- :mod:`.effects` -- what the core asks its host to do
- :mod:`.drive` -- one answer for every effect, the reference driver, conformance checks
- :mod:`.receive` -- one inbound request routed and authenticated, its key fetch an effect
- :mod:`.invites` -- the invite exchange's target, body and reply
- :mod:`.inbound` -- a verified transaction decided whole from a snapshot
- :mod:`.node` -- :class:`Federation`, the per-server facade
"""

from .authz import Party, RoomFacts
from .backfill import (MAX_PULL, PAGE_BYTES, PAGE_CAP, PAGE_ENVELOPE_HEAD, BackfillDone, BackfillPuller, build_page,
                       decode_page)
from .codes import DESCRIPTIONS, Code, LocalProtocolError, Refused
from .descriptor import PROTOCOL_VERSIONS, build_descriptor, parse_descriptor
from .drive import HostError, Machine, answer, check_driver, check_timer_host, drive
from .effects import Failed, FetchDescriptor, KeyRotated, PeerAgreed, SendRequest, StoreEvents
from .events import Event, NeedKeys, decode_event, make_event, verify_events
from .handshake import Initiator, answer_hello
from .keycache import KeyCache
from .keys import GRACE_MS, ROTATION_PERIOD_MS, KeyRing, ServerKeys, SigningKey, verify_batch
from .invites import INVITE_ACCEPTED, decode_invite_reply, invite_body, invite_target
from .node import Federation, InviteDecision, Route
from .receive import Receive
from .policy import Policy, room_refusal
from .requests import Authenticated, RequestVerifier, sign_request
from .rooms import Head, chain_event, check_proposal, link

# The host API beyond the machines: what a host (the daemon, an embedder, the
# replay) needs to carry out decisions, encode and decode protocol objects.
from .authz import may_answer, may_invite, may_leave, may_post, may_read, push_targets
from .codes import HTTP_STATUS
from .delivery import Deferred, Delivered, Delivery, Dropped, Rehandshake, SendTransaction, backoff_ms
from .leases import (DEFAULT_LEASE_MS, TIMERS, Claim, LeaseRow, Leases, Release, Renew, peer_lease, pull_lease,
                     worker_lease)
from .handover import LOOK_SOON_MS, Handover
from .handshake import decode_refusal, refusal_body
from .inbound import (
    RoomState, TxnDecision, TxnSnapshot, decode_txn_reply, held_needed, proposals_needed, rooms_needed, snapshot_context,
)
from .keys import BatchVerifier, OldKey
from .limits import Limits, OriginLimiter
from .names import (
    canonical_room_id, canonical_server_name, canonical_user_id, server_name_problem, server_of, split_server_name,
    user_id, valid_server_name,
)
from .netguard import Network, address_refusal, parse_networks
from .policy import EDITS, MODES, ROOM_TYPES, edit_policy, policy_change
from .replay import Decision, Outcome, ReplayResult, SUBSTITUTE_SEED, replay_records
from .requests import DEFAULT_SKEW_MS, parse_authorization
from .rooms import decode_events_body, encode_events_body, invitee_of
from .wire import b64e, decode, encode

__all__ = [
    "may_answer", "may_invite", "may_leave", "may_post", "may_read", "push_targets",
    "HTTP_STATUS",
    "Deferred", "Delivered", "Delivery", "Dropped", "Rehandshake", "SendTransaction", "backoff_ms",
    "DEFAULT_LEASE_MS", "TIMERS", "Claim", "LeaseRow", "Leases", "Release", "Renew", "peer_lease", "pull_lease",
    "worker_lease", "Handover", "LOOK_SOON_MS",
    "decode_refusal", "refusal_body",
    "RoomState", "TxnDecision", "TxnSnapshot", "decode_txn_reply",
    "held_needed", "proposals_needed", "rooms_needed", "snapshot_context",
    "BatchVerifier", "OldKey",
    "Limits", "OriginLimiter",
    "canonical_room_id", "canonical_server_name", "canonical_user_id", "server_name_problem", "server_of",
    "split_server_name", "user_id", "valid_server_name",
    "Network", "address_refusal", "parse_networks",
    "EDITS", "MODES", "ROOM_TYPES", "edit_policy", "policy_change",
    "Decision", "Outcome", "ReplayResult", "SUBSTITUTE_SEED", "replay_records",
    "DEFAULT_SKEW_MS", "parse_authorization",
    "decode_events_body", "encode_events_body", "invitee_of",
    "b64e", "decode", "encode",
    "MAX_PULL", "PAGE_BYTES", "PAGE_CAP", "PAGE_ENVELOPE_HEAD", "BackfillDone", "BackfillPuller", "build_page",
    "decode_page",
    "DESCRIPTIONS", "Code", "LocalProtocolError", "Refused",
    "PROTOCOL_VERSIONS", "build_descriptor", "parse_descriptor",
    "Failed", "FetchDescriptor", "KeyRotated", "PeerAgreed", "SendRequest", "StoreEvents",
    "HostError", "Machine", "answer", "check_driver", "check_timer_host", "drive", "Receive",
    "Event", "NeedKeys", "decode_event", "make_event", "verify_events",
    "Initiator", "answer_hello", "KeyCache",
    "GRACE_MS", "ROTATION_PERIOD_MS", "KeyRing", "ServerKeys", "SigningKey", "verify_batch",
    "Federation", "InviteDecision", "Route", "Policy", "room_refusal",
    "INVITE_ACCEPTED", "decode_invite_reply", "invite_body", "invite_target",
    "Authenticated", "RequestVerifier", "sign_request",
    "Head", "chain_event", "check_proposal", "link", "Party", "RoomFacts",
]
