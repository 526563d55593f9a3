"""Signed federation requests: every check of the verifier, with its code."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corehelpers import A, B, DAY, NOW, descriptor_bytes, make_node, pair, seed
from scaiwave_federation.core import Authenticated, Code, NeedKeys, Refused, sign_request
from scaiwave_federation.core.requests import DEFAULT_SKEW_MS, ReplayGuard, parse_authorization
from scaiwave_federation.core.wire import b64e, encode

TARGET = "/_scaiwave/federation/v1/send/txn1"
BODY = b"\xa0"


def _peers():
    """B knows A's descriptor already."""
    a, b = pair()
    assert not isinstance(b.learn_descriptor(A, descriptor_bytes(a), NOW), Refused)
    return a, b


def _sign(a, *, now=NOW, destination=B, method="PUT", target=TARGET, body=BODY, key=None):
    return sign_request(key or a.keyring.current, origin=A, destination=destination, method=method,
                        target=target, body=body, now=now)


def _verify(b, auth, *, now=NOW, method="PUT", target=TARGET, body=BODY):
    return b.authenticate(method=method, target=target, authorization=auth, body=body, now=now)


def test_sign_and_verify():
    a, b = _peers()
    result = _verify(b, _sign(a))
    assert isinstance(result, Authenticated)
    assert result.origin == A and result.key_id == a.keyring.current.key_id
    assert result.nonce_expires_at == NOW + DEFAULT_SKEW_MS + 1


def test_method_is_case_insensitive():
    a, b = _peers()
    assert isinstance(_verify(b, _sign(a, method="put"), method="Put"), Authenticated)


@pytest.mark.parametrize(
    "signed, received",
    [
        ({"destination": "other.test"}, {}),
        ({"method": "POST"}, {}),
        ({}, {"method": "POST"}),
        ({"target": "/_scaiwave/federation/v1/send/txn2"}, {}),
        ({}, {"target": TARGET + "?x=1"}),
    ],
)
def test_wrong_destination_method_or_path(signed, received):
    a, b = _peers()
    result = _verify(b, _sign(a, **signed), **received)
    assert isinstance(result, Refused) and result.code is Code.WRONG_DESTINATION


def test_changed_body_is_bad_signature():
    a, b = _peers()
    result = _verify(b, _sign(a), body=b"\xa1")
    assert isinstance(result, Refused) and result.code is Code.BAD_SIGNATURE


def test_forged_signature_is_bad_signature():
    a, b = _peers()
    signed_text, sig_text = _sign(a).split(" ", 1)[1].split(".")
    forged = f"ScaiWave-Sig {signed_text}.{b64e(bytes(64))}"
    result = _verify(b, forged)
    assert isinstance(result, Refused) and result.code is Code.BAD_SIGNATURE
    # A signature by another key, under A's key id, is just as bad.
    c_key = make_node("c.test", 3).keyring.current
    signed = parse_authorization(_sign(a)).signed
    from scaiwave_federation.core.keys import Domain, sign

    other = f"ScaiWave-Sig {signed_text}.{b64e(sign(c_key, Domain.REQUEST, signed))}"
    assert _verify(b, other).code is Code.BAD_SIGNATURE


def test_an_event_signature_is_no_request_signature():
    a, b = _peers()
    signed = parse_authorization(_sign(a)).signed
    from scaiwave_federation.core.keys import Domain, sign

    cross = f"ScaiWave-Sig {b64e(signed)}.{b64e(sign(a.keyring.current, Domain.EVENT, signed))}"
    assert _verify(b, cross).code is Code.BAD_SIGNATURE


@pytest.mark.parametrize("offset", [DEFAULT_SKEW_MS + 1, -(DEFAULT_SKEW_MS + 1), 10 * DAY, -10 * DAY])
def test_clock_skew_both_directions(offset):
    a, b = _peers()
    result = _verify(b, _sign(a, now=NOW + offset))
    assert isinstance(result, Refused) and result.code is Code.CLOCK_SKEW


@pytest.mark.parametrize("offset", [DEFAULT_SKEW_MS, -DEFAULT_SKEW_MS])
def test_skew_at_the_edge_is_accepted(offset):
    a, b = _peers()
    assert isinstance(_verify(b, _sign(a, now=NOW + offset)), Authenticated)


def test_replay_is_refused_inside_the_window_then_by_the_clock():
    a, b = _peers()
    auth = _sign(a)
    assert isinstance(_verify(b, auth), Authenticated)
    for later in (0, 1, DEFAULT_SKEW_MS):
        result = _verify(b, auth, now=NOW + later)
        assert isinstance(result, Refused) and result.code is Code.REPLAYED_REQUEST
    # After the window the nonce may be forgotten: the time check refuses the replay.
    b.handle_timer(NOW + DEFAULT_SKEW_MS + 1)
    assert len(b.requests.replay) == 0
    result = _verify(b, auth, now=NOW + DEFAULT_SKEW_MS + 1)
    assert isinstance(result, Refused) and result.code is Code.CLOCK_SKEW


def test_forged_requests_do_not_fill_the_replay_window():
    a, b = _peers()
    _verify(b, _sign(a), body=b"\xa1")  # bad_signature
    assert len(b.requests.replay) == 0


def test_unknown_key_needs_keys_then_verifies_after_learning():
    a, b = _peers()
    # A rotates; B has only the old descriptor.
    a.keyring = a.keyring.rotate(seed(11), NOW)
    auth = _sign(a, now=NOW + 60_000)
    need = _verify(b, auth, now=NOW + 60_000)
    assert need == NeedKeys(A, a.keyring.current.key_id)
    assert not isinstance(b.learn_descriptor(A, descriptor_bytes(a), NOW + 60_000), Refused)
    assert isinstance(_verify(b, auth, now=NOW + 60_000), Authenticated)


def test_origin_never_seen_needs_keys():
    a, b = pair()
    assert _verify(b, _sign(a)) == NeedKeys(A, a.keyring.current.key_id)


def test_refetch_is_rate_limited_then_unknown_key():
    a, b = _peers()  # B fetched A's descriptor at NOW
    made_up = make_node(A, 12).keyring.current  # a key A never published
    # Inside the 1 s floor even a new key id may not trigger a fetch.
    result = _verify(b, _sign(a, key=made_up, now=NOW + 500), now=NOW + 500)
    assert isinstance(result, Refused) and result.code is Code.UNKNOWN_KEY
    # A key id not yet asked about may trigger one fetch after the floor...
    assert _verify(b, _sign(a, key=made_up, now=NOW + 1000), now=NOW + 1000) == NeedKeys(A, made_up.key_id)
    b.keys.fetch_attempted(A, NOW + 1000, made_up.key_id)
    # ...but asking again for the same (still unknown) id waits for the full interval.
    result = _verify(b, _sign(a, key=made_up, now=NOW + 3000), now=NOW + 3000)
    assert isinstance(result, Refused) and result.code is Code.UNKNOWN_KEY
    later = NOW + 1000 + b.keys.refetch_interval_ms
    assert _verify(b, _sign(a, key=made_up, now=later), now=later) == NeedKeys(A, made_up.key_id)


def test_rotated_key_accepted_for_30_days_then_expired():
    a, b = pair()
    old_key = a.keyring.current
    rotated_at = NOW
    a.keyring = a.keyring.rotate(seed(11), rotated_at)
    b.learn_descriptor(A, descriptor_bytes(a), NOW)
    inside = rotated_at + 29 * DAY
    assert isinstance(_verify(b, _sign(a, key=old_key, now=inside), now=inside), Authenticated)
    after = rotated_at + 31 * DAY
    result = _verify(b, _sign(a, key=old_key, now=after), now=after)
    assert isinstance(result, Refused) and result.code is Code.EXPIRED_KEY
    # The new key works all along.
    assert isinstance(_verify(b, _sign(a, now=after), now=after), Authenticated)


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header_is_unauthorized(header):
    _, b = _peers()
    result = _verify(b, header)
    assert isinstance(result, Refused) and result.code is Code.UNAUTHORIZED


def test_other_scheme_is_unauthorized():
    a, b = _peers()
    token = _sign(a).split(" ", 1)[1]
    assert _verify(b, f"Bearer {token}").code is Code.UNAUTHORIZED


def test_own_key_missing_is_refused_first():
    a, _ = _peers()
    keyless = make_node(B, None, allowed=[A])
    result = _verify(keyless, _sign(a))
    assert isinstance(result, Refused) and result.code is Code.OWN_KEY_MISSING
    assert keyless.sign(destination=A, method="GET", target="/", body=b"", now=NOW).code is Code.OWN_KEY_MISSING


def _header(fields: dict, signature: bytes = bytes(64)) -> str:
    return f"ScaiWave-Sig {b64e(encode(fields))}.{b64e(signature)}"


GOOD_FIELDS = {
    "origin": A, "destination": B, "method": "PUT", "target": TARGET, "time": NOW,
    "digest": hashlib.sha256(BODY).digest(), "key_id": "ed25519:AAAAAAAA",
}


@pytest.mark.parametrize(
    "header, code",
    [
        ("ScaiWave-Sig", Code.MALFORMED),
        ("ScaiWave-Sig abc", Code.MALFORMED),
        ("ScaiWave-Sig a.b", Code.MALFORMED),
        ("ScaiWave-Sig AA==.AA", Code.MALFORMED),
        (f"ScaiWave-Sig {b64e(encode(GOOD_FIELDS))}.{b64e(bytes(63))}", Code.MALFORMED),
        (_header({k: v for k, v in GOOD_FIELDS.items() if k != "time"}), Code.MALFORMED),
        (_header({**GOOD_FIELDS, "extra": 1}), Code.MALFORMED),
        (_header({**GOOD_FIELDS, "time": -1}), Code.MALFORMED),
        (_header({**GOOD_FIELDS, "time": "now"}), Code.MALFORMED),
        (_header({**GOOD_FIELDS, "digest": b"short"}), Code.MALFORMED),
        (_header({**GOOD_FIELDS, "origin": "not a server"}), Code.MALFORMED),
        (_header({**GOOD_FIELDS, "method": 1}), Code.MALFORMED),
        (_header([1, 2]), Code.MALFORMED),
        (f"ScaiWave-Sig {b64e(bytes.fromhex('1801'))}.{b64e(bytes(64))}", Code.NON_CANONICAL),
        ("ScaiWave-Sig " + "A" * 3000, Code.TOO_LARGE),
    ],
)
def test_malformed_headers(header, code):
    result = parse_authorization(header)
    assert isinstance(result, Refused) and result.code is code


@given(st.text(max_size=200))
def test_any_header_text_is_refused_never_raised(text):
    _, b = _peers()
    result = _verify(b, text)
    assert isinstance(result, Refused)
    result = _verify(b, "ScaiWave-Sig " + text)
    assert isinstance(result, Refused)


def test_replay_guard_bookkeeping():
    guard = ReplayGuard()
    assert guard.next_expiry() is None and not guard.seen(b"n", NOW)
    guard.remember(b"n", NOW + 10)
    guard.remember(b"n", NOW + 5)  # restoring an older record never shortens it
    guard.remember(b"m", NOW + 20)
    assert guard.seen(b"n", NOW + 9) and not guard.seen(b"n", NOW + 10)
    assert guard.next_expiry() == NOW + 10
    assert guard.expire(NOW + 10) == 1 and len(guard) == 1
    assert guard.next_expiry() == NOW + 20
