"""The invite exchange on the wire: where it goes, what it carries, what comes back.

The room's host sends ``PUT {prefix}invite/{room_id}`` with one event, the
``m.member`` invite (:func:`invite_body`); the invitee's server decides with
:meth:`~.node.Federation.on_invite` and answers :data:`INVITE_ACCEPTED`, or a
refusal (:func:`~.handshake.refusal_body`). The host reads the answer with
:func:`decode_invite_reply`. Every host uses these, so no host guesses the shape.
"""

from __future__ import annotations

from .codes import Code, Refused
from .events import Event
from .handshake import decode_refusal
from .rooms import encode_events_body
from .wire import decode, encode

__all__ = ["INVITE_ACCEPTED", "invite_target", "invite_body", "decode_invite_reply"]

#: The body of an accepted invite's 200 answer (canonical CBOR ``{"ok": true}``).
INVITE_ACCEPTED: bytes = encode({"ok": True})


def invite_target(room_id: str) -> str:
    """The request target of an invite into ``room_id``."""
    return f"/_scaiwave/federation/v1/invite/{room_id}"


def invite_body(invite: Event) -> bytes:
    """The request body: the one invite event."""
    return encode_events_body([invite.envelope])


def decode_invite_reply(status: int, body: bytes) -> Refused | None:
    """``None``: the invitee's server accepted the invite; else why not."""
    if status != 200:
        return decode_refusal(status, body)
    value = decode(body, max_size=1024, max_depth=2)
    if isinstance(value, dict) and value.get("ok") is True:
        return None
    return Refused(Code.MALFORMED, "an accepted invite is answered {ok: true}")
