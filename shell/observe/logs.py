"""Logging: plain text or JSON lines, and the level and format settings.

``SCAIWAVE_LOG_FORMAT`` (TOML ``log_format``) is ``text`` (the default) or
``json``; ``SCAIWAVE_LOG_LEVEL`` is a level name in any case (``debug``,
``Info``, ``WARNING``...). In JSON, every record is one line
``{"ts", "level", "logger", "msg", ...}``; structured lines (the access line,
the audit line: see :mod:`.observe`) add their fields at the top level, so a
log pipeline can filter on ``route`` or ``action`` without parsing ``msg``. A
traceback goes into ``exc`` as one JSON string, never onto lines of its own.

Fields are passed as ``log.info(msg, extra={"fields": {...}})``. In text, a
structured line is its message; the message of an access or audit line is
built from values that were checked or bounded first (a route template, a
server name that parsed), so a hostile peer cannot forge a log line with a
newline.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "LineHandler", "parse_level", "parse_format", "setup_logging",
           "write_held_lines", "root_line_handler", "HELD_LINES_MAX"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
# The keys a record's own data uses: fields may not overwrite them.
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})


def parse_level(value: str | None, setting: str = "SCAIWAVE_LOG_LEVEL") -> int:
    """A level name in any case (``info``, ``Warning``); empty or None means INFO.

    Raises :class:`~.config.ConfigError` naming ``setting`` for anything else.
    """
    from ..config import ConfigError

    text = (value if isinstance(value, str) else "" if value is None else "?").strip().upper() or "INFO"
    if text not in _LEVELS:
        raise ConfigError(f"{setting}: expected one of debug, info, warning, error, critical, got {value!r}",
                          setting)
    return _LEVELS[text]


def parse_format(value: object, setting: str = "SCAIWAVE_LOG_FORMAT") -> str:
    """``text`` or ``json`` in any case; raises ConfigError naming ``setting`` otherwise."""
    from ..config import ConfigError

    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in LOG_FORMATS:
        raise ConfigError(f"{setting}: expected text or json, got {value!r}", setting)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (UTF-8, no ASCII escaping)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in _RESERVED)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, with the time's text made once a second rather than
    once a line (an access line per request: ``strftime`` showed up)."""

    _second: int | None = None
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time_text(record.created, record.msecs)

    def _time_text(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.default_time_format, self.converter(second))
        return f"{self._text},{int(msecs):03d}"  # logging's default_msec_format

    def line(self, created: float, levelname: str, name: str, message: str) -> str | None:
        """The text :meth:`format` makes of a record with these fields and no
        traceback, made without a record (the access line's: one a request);
        None if this formatter was given another format."""
        if self._fmt != TEXT_FORMAT:
            return None
        return f"{self._time_text(created, int((created - int(created)) * 1000))} {levelname} {name}: {message}"

    def format(self, record: logging.LogRecord) -> str:
        # TEXT_FORMAT written out (Formatter.format looks for %(asctime)s in the
        # format and fills it from the record's whole __dict__, once a line);
        # a record with a traceback or stack takes the general path.
        if record.exc_info or record.exc_text or record.stack_info or self._fmt != TEXT_FORMAT:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}: {record.message}"


#: Held access lines are written once this many wait, whatever the interval
#: (about 64 KiB of text lines: memory stays bounded under any load).
HELD_LINES_MAX = 512


class LineHandler(logging.StreamHandler):
    """The handler :func:`setup_logging` installs: a StreamHandler that also
    writes a record handed to it directly (:meth:`write_line`), for the access
    line, which would otherwise pass through the logger's and the handler's
    dispatch once a request (see ``observe.requests.emit_access``).

    While the daemon serves, access lines are *held* and written together
    (:func:`write_held_lines`, every ``SCAIWAVE_ACCESS_LOG_FLUSH``): one
    ``write`` for many lines instead of one per request, which was about 5 %
    of a small request's cost on a log file (Envoy holds its access log the
    same way; nginx's ``buffer=``). Any other record writes the held lines
    first, so lines keep their order; a stop, ``flush()`` and the logging
    module's exit hook write them too. What a ``kill -9`` can lose: the access
    lines of the last interval."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.holding = False
        self._held: list[str] = []

    def write_line(self, record: logging.LogRecord) -> None:
        """What ``handle(record)`` does when this handler has no filters: format,
        then :meth:`write_text`."""
        try:
            self.write_text(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_text(self, line: str) -> None:
        """Write a formatted line under the handler's lock and flush (a
        line-buffered stream, like stderr, has flushed already); held instead
        while :attr:`holding`. A failing stream is reported as logging
        reports it (:meth:`handleError`), never raised: a log on a closed
        pipe or a full disk does not fail the request."""
        with self.lock:  # type: ignore[union-attr]
            if self.holding:
                self._held.append(line)
                if len(self._held) < HELD_LINES_MAX:
                    return
                line = self._take_held()
            self._write(line)

    def hold(self, on: bool) -> None:
        """Hold access lines from now on (``True``), or write the held ones and
        stop holding (``False``)."""
        with self.lock:  # type: ignore[union-attr]
            self.holding = on
            if not on:
                self.write_held()

    def write_held(self) -> None:
        """Write the held access lines, in one write."""
        with self.lock:  # type: ignore[union-attr]
            if self._held:
                self._write(self._take_held())

    def emit(self, record: logging.LogRecord) -> None:
        if self._held:  # the lock is held (Handler.handle): the lines before this one
            self.write_held()
        super().emit(record)

    def flush(self) -> None:
        self.write_held()
        super().flush()

    def _take_held(self) -> str:
        text = "".join(self._held)
        self._held.clear()
        return text

    def close(self) -> None:
        # A second setup_logging (basicConfig(force=True)) closes this handler
        # without flushing it: what it holds goes out first.
        self.write_held()
        super().close()

    def _write(self, text: str) -> None:
        try:
            stream = self.stream
            stream.write(text)
            if not getattr(stream, "line_buffering", False):
                stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"name": "scaiwave.access", "msg": "%d access line(s)",
                                                    "args": (text.count("\n"),)}))


def root_line_handler() -> LineHandler | None:
    """:func:`setup_logging`'s handler, when it is the root logger's only one."""
    handlers = logging.getLogger().handlers
    return handlers[0] if len(handlers) == 1 and type(handlers[0]) is LineHandler else None


async def write_held_lines(interval_ms: int) -> None:
    """While the daemon serves: hold access lines and write them every
    ``interval_ms`` (0: each at once, as the CLI does); when cancelled, write
    what is held and stop holding."""
    import trio

    handler = root_line_handler()
    if handler is None or interval_ms <= 0:
        return
    handler.hold(True)
    try:
        while True:
            await trio.sleep(interval_ms / 1000)
            handler.write_held()
    finally:
        handler.hold(False)


def setup_logging(level: int, fmt: str) -> None:
    """(Re)configure the root logger: ``level``, text or JSON lines, on stderr."""
    # No format of ours shows the caller's file and line, thread or process:
    # not looking them up saves a stack walk per record (the logging docs'
    # "Optimization" advice), which counts at one access line per request.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request at INFO: the access line and the metrics say it better.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
