"""The traffic recorder: every federation exchange, appended to a CBOR sequence.

Format ``scaiwave-recording`` version 1 (RFC 8742 CBOR sequence): the first
item is a header ``{"format": "scaiwave-recording", "version": 1,
"server_name": str, "started_at": ms}``; every later item is a record
``{"kind": str, "now": ms, ...}``. Kinds:

- ``policy`` ``{policy}``: the policy in force from here on (also at daemon start);
- ``own_keys`` ``{public}``: our descriptor at start and after a key change (public halves only);
- ``descriptor`` ``{server, body | error}``: a descriptor fetch and its bytes; at
  daemon start ``{server, body, cached: true, fetched_at}`` for each descriptor
  the key cache is restored with;
- ``settings`` ``{refetch_interval_ms, skew_ms}``: the core's tunables, at daemon start;
- ``nonces`` ``{nonces: [[nonce, expires_at], ...]}``: the replay window restored at start;
- ``inbound`` ``{method, target, authorization, body, context, status, response,
  received_at, timings, stored?}``: a federation request that reached the core,
  the stored state its decision read (``context``: ``peered``, ``local_users``,
  ``heads``, ``held``, ``rooms``, ``proposals``, the room fields of a
  backfill...), our reply, and the live processing times (``shell/runtime/timings.py``);
- ``outbound`` ``{peer, method, target, body, status, response | error}``;
- ``handshake_start`` ``{peer, nonce}`` ... ``handshake_end`` ``{peer, protocol_version | error}``;
- ``backfill_start`` ``{room_id, peer, limit, cursor}``, a ``backfill_page``
  ``{room_id, peer, stored, refused, decode_us, verify_us, store_us}`` per page
  received, ... ``backfill_end`` ``{room_id, peer, stored, reached_start, error}``.

``scaiwave replay`` (:mod:`.replay`) reads this format; docs/replay.md
specifies it in CDDL, with the version rule: new kinds, optional fields and
``context`` keys keep version 1 (readers skip what they do not know).

Only federation traffic is recorded: admin and user bearer tokens never reach
the file (client and admin requests are not recorded at all). Each record is
written with one ``write`` and flushed, so a crash leaves at most one torn
record at the end, which readers skip.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

import cbor2

__all__ = ["Recorder", "read_recording", "FORMAT", "VERSION", "RecordingError"]

FORMAT = "scaiwave-recording"
VERSION = 1


class RecordingError(Exception):
    """The file is not a scaiwave recording (or of a newer version)."""


class Recorder:
    """Appends records to a recording file."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    @classmethod
    def open(cls, path: Path, server_name: str, now: int | None = None) -> "Recorder":
        """Open ``path`` for appending; writes the header if the file is new."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        fh = open(path, "ab")
        rec = cls(fh)
        if new:
            import time

            rec._write({"format": FORMAT, "version": VERSION, "server_name": server_name,
                        "started_at": now if now is not None else time.time_ns() // 1_000_000})
        return rec

    def _write(self, item: dict[str, Any]) -> None:
        self._fh.write(cbor2.dumps(item, canonical=True))
        self._fh.flush()

    def record(self, kind: str, now: int, **fields: Any) -> None:
        """Append one record."""
        self._write({"kind": kind, "now": now, **fields})

    def close(self) -> None:
        self._fh.close()


def read_recording(path: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Read a recording: returns ``(header, records, torn)``.

    A record cut off by a crash ends the list (``torn`` is then True):
    everything before it stands. Raises :class:`RecordingError` if the file
    is not a recording (or of a newer version), ``OSError`` if unreadable.
    """
    data = Path(path).read_bytes()
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    try:
        header = decoder.decode()
    except (cbor2.CBORDecodeError, EOFError) as exc:
        raise RecordingError(f"{path}: not a scaiwave recording ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RecordingError(f"{path}: not a scaiwave recording")
    if header.get("version") != VERSION:
        raise RecordingError(f"{path}: recording version {header.get('version')} is not supported (this reads {VERSION})")
    records: list[dict[str, Any]] = []
    while stream.tell() < len(data):
        try:
            item = decoder.decode()
        except (cbor2.CBORDecodeError, EOFError):
            return header, records, True
        if isinstance(item, dict) and "kind" in item:
            records.append(item)
    return header, records, False
