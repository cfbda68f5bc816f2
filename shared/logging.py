"""Structured JSON logs with a correlation id carried from the incoming event to every
outgoing one. Email addresses, phone numbers and free text never reach the log.

Timestamps are RFC 3339 in UTC with milliseconds (``2026-11-30T03:00:00.123Z``). A log
stream that is a terminal gets one readable line per record instead of JSON
(``log_format``: ``auto``, the default; ``json`` or ``console`` to force either). ANSI
escapes never reach a line (uvicorn's ``color_message`` extra is dropped).

Repeats are throttled: while the broker is down, aiokafka logs every reconnect attempt of
every client, thousands of lines a minute. ``RepeatThrottle`` lets the first record of a
kind through (same logger, level and message template), counts the repeats for an interval
and then writes one summary line with the count. Our own retry loops opt in per call with
``throttled(log)`` (or ``extra={"throttle": True}``)."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import IO, Any, Literal

from pythonjsonlogger.json import JsonFormatter

correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)

LogFormat = Literal["auto", "json", "console"]
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# extras that are our own plumbing (or a colour copy of the message), not fields of a line
_DROP = {"color_message"}
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE = re.compile(r"\+\d[\d\s().-]{6,}\d")
# keys whose values are never logged, whatever they hold
_REDACT_KEYS = {"email", "phone", "comment", "body", "html", "text", "to", "address"}

# loggers whose repeats are always throttled: the Kafka clients' connection chatter
THROTTLED_LOGGERS = ("aiokafka", "kafka")
REPEAT_INTERVAL_SECONDS = 10.0
THROTTLE = "throttle"  # a record with this attribute set is throttled whatever its logger
_SUMMARY = "throttle_summary"


def scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _PHONE.sub("[phone]", _EMAIL.sub("[email]", value))
    if isinstance(value, dict):
        return {k: "[redacted]" if k in _REDACT_KEYS else scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


class _PiiFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "\x1b" in text:
            text = _ANSI.sub("", text)
        record.msg = scrub(text)
        record.args = None
        for key in _DROP & record.__dict__.keys():
            del record.__dict__[key]
        for key, value in list(record.__dict__.items()):
            if key in _REDACT_KEYS:
                record.__dict__[key] = "[redacted]"
            elif key not in _STD and isinstance(value, str | dict | list):
                record.__dict__[key] = scrub(value)
        cid = correlation_id.get()
        if cid is not None:
            record.correlation_id = cid
        return True


_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

Schedule = Callable[[float, Callable[[], None]], None]


def _timer(delay: float, fn: Callable[[], None]) -> None:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.name = "log-throttle"
    timer.start()


@dataclass
class _Window:
    start: float
    first: str
    name: str
    levelno: int
    kind: str
    repeats: int = 0
    armed: bool = False


class RepeatThrottle(logging.Filter):
    """A handler filter: the first record of a kind (logger + level + message template
    ``record.msg``, not its arguments) passes; repeats within ``interval`` seconds are
    counted and dropped; when the interval ends, one summary record
    ``"N similar aiokafka errors in the last 10 s: <first message>"`` goes out through the
    logger that made them, and counting goes on for another interval while repeats come.
    A kind that stays quiet for a whole interval is forgotten: its next record passes.

    Throttled are records of ``loggers`` (and their children) and any record carrying a
    true ``throttle`` attribute. ``clock`` and ``schedule`` (run a callback after a delay;
    a daemon timer thread by default) are injectable for tests."""

    def __init__(
        self,
        interval: float = REPEAT_INTERVAL_SECONDS,
        loggers: tuple[str, ...] = THROTTLED_LOGGERS,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _timer,
    ) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self.loggers = loggers
        self.clock = clock
        self.schedule = schedule
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()

    def _kind(self, record: logging.LogRecord) -> str | None:
        for prefix in self.loggers:
            if record.name == prefix or record.name.startswith(prefix + "."):
                return prefix
        if getattr(record, THROTTLE, False):
            return record.name
        return None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        kind = self._kind(record)
        if kind is None:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        stale: _Window | None = None
        delay: float | None = None
        with self._lock:
            window = self._windows.get(key)
            passes = window is None or now - window.start >= self.interval + self._slack(window)
            if passes:
                # the first of its kind, or one whose window no timer closed
                if window is not None and window.repeats:
                    stale = window
                self._windows[key] = _Window(now, _first(record), record.name, record.levelno, kind)
            elif window is not None:
                window.repeats += 1
                if not window.armed:
                    window.armed = True
                    delay = max(0.0, window.start + self.interval - now)
        if stale is not None:
            self._emit(stale)
        if delay is not None:
            self.schedule(delay, self.flush)
        return passes

    def _slack(self, window: _Window) -> float:
        # while a timer is armed, the timer closes the window, not a late record
        return self.interval if window.armed else 0.0

    def flush(self, force: bool = False) -> None:
        """Write the summary of every window whose interval has ended (every window with
        repeats if ``force``). A window with repeats starts a new interval; one without is
        forgotten."""
        now = self.clock()
        due: list[_Window] = []
        with self._lock:
            for key, window in list(self._windows.items()):
                if not force and now - window.start < self.interval:
                    continue
                if window.repeats:
                    due.append(replace(window))
                    window.start, window.repeats, window.armed = now, 0, False
                else:
                    del self._windows[key]
        for window in due:
            self._emit(window)

    def _emit(self, window: _Window) -> None:
        what = "errors" if window.levelno >= logging.ERROR else "warnings"
        if window.levelno < logging.WARNING:
            what = "messages"
        record = logging.getLogger(window.name).makeRecord(
            window.name,
            window.levelno,
            __file__,
            0,
            "%d similar %s %s in the last %s s: %s",
            (window.repeats, window.kind, what, f"{self.interval:g}", window.first),
            None,
            extra={_SUMMARY: True, "repeats": window.repeats},
        )
        logging.getLogger(window.name).handle(record)


def _first(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:
        text = str(record.msg)
    return text if len(text) <= 500 else text[:500] + "…"


class _Throttled(logging.LoggerAdapter[logging.Logger]):
    """``LoggerAdapter`` that marks every record for throttling and keeps the call's own
    ``extra`` (3.11's adapter would replace it)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra: Mapping[str, Any] = kwargs.get("extra") or {}
        kwargs["extra"] = {**extra, THROTTLE: True}
        return msg, kwargs


def throttled(logger: logging.Logger) -> logging.LoggerAdapter[logging.Logger]:
    """``logger`` with repeats throttled: for a retry loop's "failed; retrying" line. The
    first failure is logged in full (traceback and all); repeats within the interval become
    one summary line with the count."""
    return _Throttled(logger, {})


def rfc3339(created: float) -> str:
    """``created`` (seconds since the epoch) as RFC 3339 in UTC with milliseconds:
    ``2026-11-30T03:00:00.123Z``."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class _Json(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)


class ConsoleFormatter(logging.Formatter):
    """One readable line per record, for a terminal:
    ``2026-11-30T03:00:00.123Z INFO    winback.cli: message  key=value ...`` (the record's
    extra fields after the message; a traceback on the lines below)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{rfc3339(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        )
        extras = [
            f"{key}={_console_value(value)}"
            for key, value in record.__dict__.items()
            if key not in _STD and key not in _DROP and key not in (THROTTLE, _SUMMARY)
        ]
        if extras:
            line += "  " + " ".join(extras)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _console_value(value: Any) -> str:
    """A field's value as ``key=value`` shows it: quoted (JSON string) when it has spaces."""
    text = str(value)
    if not text or any(c.isspace() or c == '"' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def choose_format(setting: str, stream: IO[str]) -> Literal["json", "console"]:
    """``json`` or ``console`` as set; ``auto``: ``console`` when ``stream`` is a terminal,
    ``json`` otherwise (a pipe, a file, a container's log collector)."""
    if setting == "json":
        return "json"
    if setting == "console":
        return "console"
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or closed
        return "json"


def configure(
    level: str = "INFO",
    service: str = "winback",
    repeat_interval: float = REPEAT_INTERVAL_SECONDS,
    log_format: str = "auto",
    stream: IO[str] | None = None,
) -> Literal["json", "console"]:
    """Send every log record to ``stream`` (stderr) as JSON or, on a terminal, as readable
    lines (``choose_format``); return the format chosen."""
    out = stream if stream is not None else sys.stderr
    chosen = choose_format(log_format, out)
    handler = logging.StreamHandler(out)
    if chosen == "console":
        handler.setFormatter(ConsoleFormatter())
    else:
        handler.setFormatter(
            _Json(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time"},
                static_fields={"service": service},
            )
        )
    # the throttle first: it groups by the message template, which the PII filter replaces
    handler.addFilter(RepeatThrottle(repeat_interval))
    handler.addFilter(_PiiFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel("WARNING")
    logging.getLogger("uvicorn.access").setLevel("WARNING")
    logging.getLogger("alembic.runtime.plugins").setLevel("WARNING")  # a line per plugin
    return chosen


@contextmanager
def correlated(cid: str | None) -> Iterator[None]:
    token = correlation_id.set(cid)
    try:
        yield
    finally:
        correlation_id.reset(token)
