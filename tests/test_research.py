"""Research on the demo's recordings: the CDDL format, export, filters, diff, stats, the plot.

One real `scaiwave demo` run (two daemons, real TLS, the whole admin guide)
leaves a recording per server; every test here reads those, through the
command line the way a researcher would, or through the Python API.

The format check uses pycddl (the Rust ``cddl`` crate's validator, a wheel
that needs no network once installed) against the ```cddl block of
docs/replay.md itself, so the document cannot drift from the writer.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import cbor2
import pycddl
import pytest

from scaiwave_federation.shell.research.export import (
    DECISION_COLUMNS, RECORD_COLUMNS, Filter, decision_rows, parse_time, plain, record_rows,
)
from scaiwave_federation.shell.research.stats import percentile
from scaiwave_federation.shell.research.replay import open_recording, replay

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def _cli(*args: str, check: int | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "scaiwave_federation.shell.cli", *args], capture_output=True,
                          text=True, timeout=240)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("research") / "demo-run"
    _cli("demo", "--dir", str(directory), check=0)
    paths = {p.parent.name: p for p in directory.glob("*/recording.cbor")}
    assert set(paths) == {"your-host.test", "peer.test"}
    return paths


def _items(path: Path) -> list[bytes]:
    """Every item of a recording, as its raw CBOR bytes."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    out = []
    while stream.tell() < len(data):
        start = stream.tell()
        decoder.decode()
        out.append(data[start:stream.tell()])
    return out


@pytest.fixture(scope="module")
def schema() -> pycddl.Schema:
    doc = (ROOT / "docs" / "replay.md").read_text()
    (block,) = re.findall(r"```cddl\n(.*?)```", doc, re.S)
    return pycddl.Schema(block)


# -- the format --------------------------------------------------------------------------


def test_every_item_of_the_demo_recordings_matches_the_cddl(demo, schema):
    kinds = set()
    for path in demo.values():
        items = _items(path)
        assert cbor2.loads(items[0])["format"] == "scaiwave-recording"
        for raw in items:
            schema.validate_cbor(raw)
            kinds.add(cbor2.loads(raw).get("kind"))
    # The demo exercises every kind but one (a handshake we start and end is there too).
    assert kinds >= {None, "policy", "settings", "own_keys", "descriptor", "nonces", "inbound", "outbound",
                     "handshake_start", "handshake_end", "backfill_start", "backfill_page", "backfill_end"}


@pytest.mark.parametrize("change", [
    lambda r: r["context"].update(surprise=True),             # an undocumented context key
    lambda r: r.update(received_at=-1),                        # a negative clock
    lambda r: r.update(body="text, not bytes"),                # text where bytes belong
    lambda r: r["timings"].update(verify_us="fast"),            # a timing that is no number
    lambda r: r.pop("status"),                                  # a required field missing
    lambda r: r["context"].setdefault("heads", {}).update({"!r:x": {"known": True, "host": None, "head": [4]}}),
], ids=["context-key", "negative-clock", "text-body", "timing-type", "no-status", "bad-head"])
def test_the_cddl_refuses_records_that_drift(demo, schema, change):
    inbound = next(cbor2.loads(raw) for raw in _items(demo["your-host.test"])
                   if cbor2.loads(raw).get("kind") == "inbound" and "/send/" in cbor2.loads(raw)["target"]
                   and "timings" in cbor2.loads(raw))
    schema.validate_cbor(cbor2.dumps(inbound))
    change(inbound)
    with pytest.raises(pycddl.ValidationError):
        schema.validate_cbor(cbor2.dumps(inbound))


# -- export ---------------------------------------------------------------------------------


def test_export_jsonl_has_one_row_per_decision(demo):
    path = demo["your-host.test"]
    out = _cli("replay", str(path), "--export", "jsonl", check=0).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    result = replay(path)
    assert len(rows) == len(result.decisions) > 5
    assert all(list(row) == list(DECISION_COLUMNS) for row in rows)
    assert [r["index"] for r in rows] == [d.index for d in result.decisions]
    assert all(type(r["now"]) is int for r in rows)
    assert {r["kind"] for r in rows} == {"inbound", "handshake", "backfill"}
    pages = [r for r in rows if r["kind"] == "backfill" and r["pages"]]
    assert pages and all(r["verify_us"] > 0 and r["decode_us"] > 0 for r in pages)
    sends = [r for r in rows if r["endpoint"] == "send" and r["live_code"] is None]
    assert sends and all(r["total_us"] >= r["decode_us"] + r["verify_us"] for r in sends)
    # The API gives the same rows, as plain dicts.
    assert decision_rows(result) == rows


def test_counts_have_one_meaning_live_and_replayed(demo):
    for path in demo.values():
        rec = open_recording(path)
        rows = decision_rows(replay(rec))
        stored_by_records = sum(r.get("stored", 0) for r in rec.of_kind("inbound")) + sum(
            r["stored"] for r in rec.of_kind("backfill_end"))
        assert sum(r["live_stored"] or 0 for r in rows) == stored_by_records
        for row in rows:
            if row["comparable"]:
                assert (row["live_stored"], row["live_echoed"], row["live_refused"]) == (
                    row["replay_stored"], row["replay_echoed"], row["replay_refused"]), row
    # peer.test receives the DM host's chained copy of bob's own proposals
    # (already held from the reply): echoed, not stored.
    peer_rows = decision_rows(replay(demo["peer.test"]))
    assert sum(r["live_echoed"] or 0 for r in peer_rows) > 0


def test_export_csv_and_record_rows(demo, tmp_path):
    path = demo["your-host.test"]
    text = _cli("replay", str(path), "--export", "csv", check=0).stdout
    table = list(csv.DictReader(io.StringIO(text)))
    assert list(table[0]) == list(DECISION_COLUMNS) and len(table) == len(replay(path).decisions)
    lines = _cli("replay", str(path), "--export", "jsonl", "--rows", "records", check=0).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    rec = open_recording(path)
    assert len(rows) == len(rec.records) and all(list(r) == list(RECORD_COLUMNS) for r in rows)
    inbound = next(r for r in rows if r["kind"] == "inbound" and r["record"]["body"]["$bytes"])
    assert base64.b64decode(inbound["record"]["body"]["$bytes"]) == rec.records[inbound["index"]]["body"]
    refused = [r for r in rows if r["code"]]
    assert {"peer_not_allowed", "room_incognito"} <= {r["code"] for r in refused}
    csv_records = list(csv.DictReader(io.StringIO(
        _cli("replay", str(path), "--export", "csv", "--rows", "records", check=0).stdout)))
    assert json.loads(csv_records[0]["record"])["kind"] == rec.records[0]["kind"]


def test_plain_takes_hostile_values():
    value = {b"k": [b"\x00\xff", float("nan"), 2**80, {"n": None}], 3: True}
    assert json.loads(json.dumps(plain(value))) == {
        "b'k'": [{"$bytes": "AP8="}, "nan", 2**80, {"n": None}], "3": True}


# -- filters --------------------------------------------------------------------------------


def test_filters_by_peer_room_kind_code_and_time(demo):
    path = demo["your-host.test"]
    rec = open_recording(path)
    result = replay(rec)
    peer = result.decisions[0].peer
    upper = _cli("replay", str(path), "--export", "jsonl", "--peer", peer.upper(), check=0).stdout.splitlines()
    assert len(upper) == sum(1 for d in result.decisions if d.peer == peer) > 0
    pulls = _cli("replay", str(path), "--export", "jsonl", "--kind", "backfill", check=0).stdout.splitlines()
    assert {json.loads(x)["kind"] for x in pulls} == {"backfill"}
    room = json.loads(pulls[0])["room"]
    in_room = [json.loads(x) for x in _cli("replay", str(path), "--export", "jsonl", "--room", room,
                                            check=0).stdout.splitlines()]
    assert in_room and all(room in r["room"].split() for r in in_room)
    text = _cli("replay", str(path), "--code", "room_incognito", check=0).stdout
    assert text.startswith("filter: 1 of ") and "refused room_incognito" in text
    middle = result.decisions[len(result.decisions) // 2].now
    early = decision_rows(result, Filter.of(until=middle))
    late = decision_rows(result, Filter.of(since=middle))
    assert len(early) + len(late) == len(result.decisions) and early and late
    start = rec.header["started_at"]
    assert parse_time("+2s", start) == start + 2000
    assert parse_time("1970-01-01T00:00:01Z", 0) == 1000 == parse_time("1000", 0)
    records = record_rows(rec.records, Filter.of(kinds=["backfill_page"]))
    assert records and all(r["kind"] == "backfill_page" and r["verify_us"] is not None for r in records)


def test_bad_options_exit_2_with_one_line(demo, tmp_path):
    path = str(demo["your-host.test"])
    for args in (["--since", "yesterday"], ["--kind", "nonsense"], ["--clock-offset", "soon"],
                 ["--key-clock-offset", "x"], ["--plot", str(tmp_path / "no" / "such" / "dir.png")],
                 [str(tmp_path / "missing.cbor")]):
        proc = _cli("replay", path, *args) if args[0].startswith("--") else _cli("replay", *args)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


# -- diff -----------------------------------------------------------------------------------


def test_diff_one_recording_under_two_policies(demo, tmp_path):
    path = str(demo["your-host.test"])
    same = _cli("replay", "diff", path, check=0).stdout
    assert "0 differ" in same
    closed = tmp_path / "closed.toml"
    closed.write_text('default_mode = "closed"\nallowed_peers = []\nblocked_peers = []\n')
    out = _cli("replay", "diff", path, "--right-policy", str(closed), check=1).stdout
    lines = out.splitlines()
    changed = [line for line in lines if "| #" in line and "refused federation_closed" in line]
    assert changed, out
    assert re.search(r"^  federation_closed\s+0\s+\d+  \*$", out, re.M), out
    total = int(re.search(r"(\d+) decisions paired", out).group(1))
    assert total == len(replay(demo["your-host.test"]).decisions)


def test_diff_two_recordings_and_two_clocks(demo):
    a, b = str(demo["your-host.test"]), str(demo["peer.test"])
    out = _cli("replay", "diff", a, b, check=1).stdout
    assert "differ" in out and "on one side only" in out
    skew = _cli("replay", "diff", a, "--right-clock-offset", "31d", check=1).stdout
    assert re.search(r"^  clock_skew\s+0\s+\d+  \*$", skew, re.M), skew
    keys = _cli("replay", "diff", a, "--right-key-clock-offset", "31d")
    assert "clock_skew" not in keys.stdout and keys.returncode in (0, 1)


# -- stats, speed, the plot -------------------------------------------------------------------


def test_stats_counts_percentiles_and_speed(demo):
    out = _cli("replay", str(demo["your-host.test"]), "--stats", check=0).stdout
    stats = out[out.index("stats:"):]
    assert re.search(r"^    peer\.test:\d+: .*peer_not_allowed 1", stats, re.M), stats
    assert re.search(r"transaction times \(\d+\), p50, p90, p99, max:", stats)
    assert re.search(r"backfill page times \(\d+\)", stats)
    assert re.search(r"^    verify\s+\S+ \S+ / ", stats, re.M)
    assert re.search(r"speed: live core \d+ events in [\d.]+ (ms|us) \(decode \+ verify\) = [\d,]+ events/s; "
                     r"replay \d+ events", stats), stats
    assert "events, replay: stored" in out


def test_percentile_is_nearest_rank():
    assert percentile([5], 99) == 5
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([3, 1, 2], 90) == 3


def test_plot_draws_a_real_picture(demo, tmp_path):
    import matplotlib.image

    png = tmp_path / "timeline.png"
    _cli("replay", str(demo["your-host.test"]), "--plot", str(png), check=0)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    pixels = matplotlib.image.imread(png)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 200
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::7].round(2).tolist()}
    assert len(colours) > 20  # axes, labels, dots of several colours: not a blank canvas


# -- hostile and old recordings ---------------------------------------------------------------


def test_hostile_and_old_recordings_never_crash_the_tools(demo, tmp_path):
    """Lying fields (wrong types, negative or huge numbers), foreign items and a
    recording made before the live timings: rows, stats, diff and the plot
    still come out, and say what is not recorded."""
    from scaiwave_federation.core.replay import replay_records
    from scaiwave_federation.shell.research.diff import render_diff
    from scaiwave_federation.shell.research.plot import plot
    from scaiwave_federation.shell.research.stats import render_stats

    rec = open_recording(demo["your-host.test"])
    lies = [dict(r) for r in rec.records]
    for r in lies:
        if r.get("kind") == "inbound":
            r["timings"] = {"decode_us": "fast", "verify_us": -5, "store_us": 2**70}
            r["stored"] = -3
            r["authorization"] = 12
        if r.get("kind") == "backfill_page":
            r.update(stored="many", refused=-1, decode_us=None, now="later")
    lies += [["not", "a", "map"], {"kind": 7}, {"kind": "backfill_page", "now": 1}]
    lied = replay_records(rec.server_name, lies)
    assert len(decision_rows(lied)) == len(lied.decisions) and record_rows(lies)
    json.dumps(record_rows(lies))
    assert "stats:" in render_stats(lied, lied.decisions, 0.01)
    assert "summary:" in render_diff(lied, replay(rec), "lies", "truth")[0]
    plot(lied.decisions, tmp_path / "lies.png", title="lies")
    # A recording from before the timings and counts: told as not recorded.
    old = [{k: v for k, v in r.items() if k not in ("timings", "stored")} for r in rec.records
           if r.get("kind") != "backfill_page"]
    result = replay_records(rec.server_name, old)
    assert "holds no live processing times" in render_stats(result, result.decisions, 0.01)
    from scaiwave_federation.shell.research.replay import render

    assert re.search(r"live: stored \d+, echoed \d+, refused 0, not told \d+", render(result))
