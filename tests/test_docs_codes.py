"""docs/protocol.md cannot drift from the code.

Three tables in the document are rendered from the code: the error codes
(``core/codes.py`` ``DESCRIPTIONS`` and ``RETRYABLE`` with the shell's status table), the
handshake state table (``core/handshake.py`` ``TRANSITIONS``) and the limits
(the modules' constants). Each test asserts the document contains the
rendered table verbatim; on a mismatch the failure message is the table to
paste. Run ``python tests/test_docs_codes.py`` to print all three.
"""

from __future__ import annotations

import re
from pathlib import Path

from scaiwave_federation.core import backfill, descriptor, events, handshake, keycache, keys, requests, rooms, wire
from scaiwave_federation.core.codes import DESCRIPTIONS, RETRYABLE, Code
from scaiwave_federation.core.handshake import TRANSITIONS
from scaiwave_federation.shell.http.errors import STATUS

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def render_code_table() -> str:
    """Every code, in definition order: code, HTTP status, whether a sender retries, meaning."""
    rows = ["| code | HTTP | retry | meaning |", "|---|---|---|---|"]
    for code in Code:
        retry = "yes" if code in RETRYABLE else "no"
        rows.append(f"| `{code.value}` | {STATUS[code]} | {retry} | {DESCRIPTIONS[code]} |")
    return "\n".join(rows)


def render_transitions() -> str:
    """The initiator's state table."""
    rows = ["| state | input | next state |", "|---|---|---|"]
    for (state, event), targets in TRANSITIONS.items():
        rows.append(f"| `{state}` | `{event}` | {' or '.join(f'`{t}`' for t in targets)} |")
    return "\n".join(rows)


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _ms(n: int) -> str:
    for unit, size in (("days", keys.DAY_MS), ("s", 1000)):
        if n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} ms"


def render_limits() -> str:
    """The numeric limits an implementation must apply, from the constants."""
    rows = [
        ("CBOR nesting depth (default; smaller where noted)", str(wire.MAX_DEPTH), "`wire.MAX_DEPTH`"),
        ("arrays and maps in a CBOR input of more than "
         f"{wire.PRESCAN_ABOVE} bytes", f"{wire.CONTAINER_FLOOR} + size / {wire.BYTES_PER_CONTAINER}",
         "`wire.CONTAINER_FLOOR`, `wire.BYTES_PER_CONTAINER`"),
        ("descriptor body", _bytes(descriptor.MAX_DESCRIPTOR_BYTES), "`descriptor.MAX_DESCRIPTOR_BYTES`"),
        ("descriptor old keys", str(descriptor._MAX_OLD_KEYS), "`descriptor._MAX_OLD_KEYS`"),
        ("event envelope (and its body)", _bytes(events.MAX_EVENT_BYTES), "`events.MAX_EVENT_BYTES`"),
        ("`Authorization` header", f"{requests.MAX_HEADER_CHARS} characters", "`requests.MAX_HEADER_CHARS`"),
        ("request clock skew (either way)", _ms(requests.DEFAULT_SKEW_MS), "`requests.DEFAULT_SKEW_MS`"),
        ("handshake body (hello, welcome, error)", _bytes(handshake.MAX_HANDSHAKE_BYTES),
         "`handshake.MAX_HANDSHAKE_BYTES`"),
        ("invite or transaction body", _bytes(rooms.MAX_TXN_BYTES), "`rooms.MAX_TXN_BYTES`"),
        ("events in a transaction", str(rooms.MAX_TXN_EVENTS), "`rooms.MAX_TXN_EVENTS`"),
        ("events in a backfill page (serving cap)", str(backfill.PAGE_CAP), "`backfill.PAGE_CAP`"),
        ("backfill page body", _bytes(backfill.MAX_PAGE_BYTES), "`backfill.MAX_PAGE_BYTES`"),
        ("a backfill page's events, encoded (the host cuts the page there)", _bytes(backfill.PAGE_BYTES),
         "`backfill.PAGE_BYTES`"),
        ("events a page the request budget counts on", str(backfill.BUDGET_PAGE), "`backfill.BUDGET_PAGE`"),
        ("events in one backfill pull", str(backfill.MAX_PULL), "`backfill.MAX_PULL`"),
        ("page requests in one pull beyond the pages its limit needs", str(backfill.BUDGET_SLACK),
         "`backfill.BUDGET_SLACK`"),
        ("a page asked again after \"not now\", in a row (waiting "
         + ", ".join(f"{backfill.PAGE_RETRY_MS * 2 ** k / 1000:g}" for k in range(backfill.PAGE_RETRIES)) + " s)",
         str(backfill.PAGE_RETRIES),
         "`backfill.PAGE_RETRIES`"),
        ("old key still valid for live requests after `expired_at`", _ms(keys.GRACE_MS), "`keys.GRACE_MS`"),
        ("key rotation period", _ms(keys.ROTATION_PERIOD_MS), "`keys.ROTATION_PERIOD_MS`"),
        ("descriptor refetch, per server (default)", _ms(keycache.DEFAULT_REFETCH_INTERVAL_MS),
         "`keycache.DEFAULT_REFETCH_INTERVAL_MS`"),
        ("descriptor refetch for a key id not yet asked about", _ms(keycache.NEW_KEY_FLOOR_MS),
         "`keycache.NEW_KEY_FLOOR_MS`"),
    ]
    lines = ["| limit | value | constant |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {name} |" for what, value, name in rows]
    return "\n".join(lines)


def _doc() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


def test_every_code_appears_in_the_protocol_doc():
    doc = _doc()
    missing = [code.value for code in Code if f"`{code.value}`" not in doc]
    assert not missing, f"docs/protocol.md does not mention: {', '.join(missing)}"


def test_the_code_table_is_current():
    table = render_code_table()
    assert table in _doc(), f"docs/protocol.md: replace the code table with\n\n{table}\n"


def test_every_code_has_a_description_and_a_status():
    assert set(DESCRIPTIONS) == set(Code)
    assert set(STATUS) == set(Code)


def test_the_handshake_state_table_is_current():
    table = render_transitions()
    assert table in _doc(), f"docs/protocol.md: replace the handshake state table with\n\n{table}\n"


def test_the_limits_table_is_current():
    table = render_limits()
    assert table in _doc(), f"docs/protocol.md: replace the limits table with\n\n{table}\n"


def test_the_doc_links_the_vectors_and_its_links_resolve():
    doc = _doc()
    assert "(vectors.md)" in doc
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc):
        assert (PROTOCOL.parent / target).exists(), f"broken link in docs/protocol.md: {target}"


if __name__ == "__main__":
    print(render_code_table(), render_transitions(), render_limits(), sep="\n\n")


def test_every_test_the_protocol_doc_names_exists():
    """The authorization rules in docs/protocol.md each name the test that proves it."""
    text = PROTOCOL.read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", text))
    assert named, "the protocol doc names no tests"
    defined = set()
    for path in PROTOCOL.parents[1].joinpath("tests").glob("test_*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", path.read_text(), re.M))
    assert named <= defined, sorted(named - defined)
