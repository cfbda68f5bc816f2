"""Logs are JSON, carry the correlation id, and never carry contact points or free text."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys

import pytest

from shared import logging as winback_logging


def capture(fn: object) -> dict[str, object]:
    stream = io.StringIO()
    winback_logging.configure("INFO", "test", log_format="json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        fn()  # type: ignore[operator]
    finally:
        logging.getLogger().handlers.clear()
    line: dict[str, object] = json.loads(stream.getvalue().strip().splitlines()[-1])
    return line


def test_a_log_line_is_json_with_the_correlation_id_of_the_event_being_handled() -> None:
    def emit() -> None:
        with winback_logging.correlated("corr-42"):
            logging.getLogger("winback.test").info("handled")

    line = capture(emit)
    assert line["message"] == "handled"
    assert line["correlation_id"] == "corr-42"
    assert line["service"] == "test"
    assert line["level"] == "INFO"


def test_emails_phones_and_comments_never_reach_the_log() -> None:
    def emit() -> None:
        logging.getLogger("winback.test").warning(
            "mail to aino@example.com or call +358 40 123 4567 from 127.0.0.1:8081",
            extra={"comment": "my number is +358401234567", "customer": {"email": "a@b.fi"}},
        )

    line = capture(emit)
    text = json.dumps(line)
    assert "aino@example.com" not in text
    assert "+358 40 123 4567" not in text
    assert "+358401234567" not in text
    assert "a@b.fi" not in text
    assert "127.0.0.1:8081" in str(line["message"])  # addresses of servers are not phones
    assert line["comment"] == "[redacted]"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Timers:
    """Stands in for the timer thread: records what the throttle asked to run, and when."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, object]] = []

    def __call__(self, delay: float, fn: object) -> None:
        self.pending.append((delay, fn))

    def fire(self) -> None:
        pending, self.pending = self.pending, []
        for _, fn in pending:
            fn()  # type: ignore[operator]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def throttled_handler(
    interval: float = 10.0,
) -> tuple[_Lines, _Clock, _Timers, winback_logging.RepeatThrottle]:
    clock, timers, lines = _Clock(), _Timers(), _Lines()
    throttle = winback_logging.RepeatThrottle(interval, clock=clock, schedule=timers)
    lines.addFilter(throttle)
    return lines, clock, timers, throttle


def attached(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def detach(handler: logging.Handler, *names: str) -> None:
    for name in names:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).propagate = True


def test_repeats_of_a_kafka_error_are_counted_and_summarised_once_per_interval() -> None:
    lines, clock, timers, _ = throttled_handler(10.0)
    kafka = attached(lines, "aiokafka.client")
    try:
        for attempt in range(500):
            clock.now += 0.01
            kafka.error("Unable connect to node with id %s: %s", 1, f"attempt {attempt}")
        # the first passes at once, with its arguments; the other 499 are held
        assert lines.messages == ["Unable connect to node with id 1: attempt 0"]
        assert len(timers.pending) == 1
        delay, _ = timers.pending[0]
        assert 0 < delay <= 10.0

        clock.now += 10.0
        timers.fire()
        assert len(lines.records) == 2
        summary = lines.records[1]
        assert summary.getMessage() == (
            "499 similar aiokafka errors in the last 10 s: "
            "Unable connect to node with id 1: attempt 0"
        )
        assert summary.levelno == logging.ERROR
        assert summary.name == "aiokafka.client"
        assert summary.__dict__["repeats"] == 499

        # the outage goes on: one more summary for the next interval, not 300 lines
        for _ in range(300):
            clock.now += 0.01
            kafka.error("Unable connect to node with id %s: %s", 1, "again")
        assert len(lines.records) == 2
        clock.now += 10.0
        timers.fire()
        assert len(lines.records) == 3
        assert lines.messages[2].startswith("300 similar aiokafka errors in the last 10 s: ")

        # quiet for an interval: forgotten, so the next one passes in full
        clock.now += 10.0
        timers.fire()
        assert timers.pending == []
        kafka.error("Unable connect to node with id %s: %s", 1, "back again")
        assert lines.messages[-1] == "Unable connect to node with id 1: back again"
        assert len(lines.records) == 4
    finally:
        detach(lines, "aiokafka.client")


def test_a_single_record_leaves_no_summary_behind() -> None:
    lines, clock, timers, throttle = throttled_handler(10.0)
    kafka = attached(lines, "aiokafka.conn")
    try:
        kafka.error("Unexpected exception in AIOKafkaConnection")
        clock.now += 30
        throttle.flush()
        assert lines.messages == ["Unexpected exception in AIOKafkaConnection"]
        assert timers.pending == []
    finally:
        detach(lines, "aiokafka.conn")


def test_different_templates_levels_and_loggers_are_not_merged() -> None:
    lines, clock, timers, _ = throttled_handler(10.0)
    client = attached(lines, "aiokafka.client")
    coordinator = attached(lines, "aiokafka.consumer.group_coordinator")
    legacy = attached(lines, "kafka.conn")
    try:
        for _ in range(3):
            clock.now += 0.1
            client.error("Unable connect to node with id %s: %s", 1, "refused")
            client.error("Unable to update metadata from %s", [1])
            client.warning("Unable to update metadata from %s", [1])
            coordinator.error("Unable to update metadata from %s", [1])
            legacy.error("Unable to update metadata from %s", [1])
        assert sorted(lines.messages) == sorted(
            [
                "Unable connect to node with id 1: refused",
                "Unable to update metadata from [1]",
                "Unable to update metadata from [1]",
                "Unable to update metadata from [1]",
                "Unable to update metadata from [1]",
            ]
        )
        clock.now += 10
        timers.fire()
        summaries = [r for r in lines.records if "similar" in r.getMessage()]
        assert len(summaries) == 5
        assert {(r.name, r.levelno) for r in summaries} == {
            ("aiokafka.client", logging.ERROR),
            ("aiokafka.client", logging.WARNING),
            ("aiokafka.consumer.group_coordinator", logging.ERROR),
            ("kafka.conn", logging.ERROR),
        }
        assert all(r.getMessage().startswith("2 similar ") for r in summaries)
        warning = next(r for r in summaries if r.levelno == logging.WARNING)
        assert "aiokafka warnings" in warning.getMessage()
        assert any("kafka errors" in r.getMessage() for r in summaries if r.name == "kafka.conn")
    finally:
        detach(lines, "aiokafka.client", "aiokafka.consumer.group_coordinator", "kafka.conn")


def test_our_own_logs_pass_unless_a_retry_loop_asks_for_throttling() -> None:
    lines, clock, timers, _ = throttled_handler(10.0)
    ours = attached(lines, "shared.messaging.test")
    try:
        for offset in range(5):
            ours.warning("dead-lettering a record", extra={"offset": offset})
        assert len(lines.records) == 5  # per-record lines are not throttled

        retrying = winback_logging.throttled(ours)
        for attempt in range(5):
            clock.now += 0.5
            retrying.warning("relay failed; retrying", extra={"attempt": attempt})
        assert len(lines.records) == 6
        assert lines.records[5].__dict__["attempt"] == 0  # the call's extra survives
        clock.now += 10
        timers.fire()
        assert lines.messages[-1] == (
            "4 similar shared.messaging.test warnings in the last 10 s: relay failed; retrying"
        )
    finally:
        detach(lines, "shared.messaging.test")


def test_configured_logs_throttle_kafka_chatter_and_still_scrub_the_summary() -> None:
    stream = io.StringIO()
    winback_logging.configure("INFO", "test", repeat_interval=3600, log_format="json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    throttle = next(f for f in handler.filters if isinstance(f, winback_logging.RepeatThrottle))
    try:
        for _ in range(50):
            logging.getLogger("aiokafka.client").error("Unable connect to %s", "ops@example.com")
        throttle.flush(force=True)
    finally:
        logging.getLogger().handlers.clear()
    out = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in out] == [
        "Unable connect to [email]",
        "49 similar aiokafka errors in the last 3600 s: Unable connect to [email]",
    ]
    assert out[1]["level"] == "ERROR"
    assert out[1]["name"] == "aiokafka.client"
    assert out[1]["repeats"] == 49


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_timestamps_are_rfc3339_in_utc_with_milliseconds() -> None:
    assert winback_logging.rfc3339(1_796_007_600.123_4) == "2026-11-30T03:00:00.123Z"
    assert winback_logging.rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    line = capture(lambda: logging.getLogger("winback.test").info("now"))
    assert RFC3339_UTC.match(str(line["time"])), line["time"]


def test_no_ansi_escapes_reach_a_json_line() -> None:
    # uvicorn logs "Started server process [%d]" with a coloured copy in color_message
    def emit() -> None:
        logging.getLogger("uvicorn.error").info(
            "Started server \x1b[1mprocess\x1b[0m [%d]",
            42,
            extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
        )

    stream = io.StringIO()
    winback_logging.configure("INFO", "test", log_format="json", stream=stream)
    try:
        emit()
    finally:
        logging.getLogger().handlers.clear()
    text = stream.getvalue()
    line = json.loads(text)
    assert line["message"] == "Started server process [42]"
    assert "color_message" not in line
    assert "\x1b" not in text
    assert "\\u001b" not in text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("setting", "tty", "expected"),
    [
        ("auto", True, "console"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("console", False, "console"),
    ],
)
def test_the_format_follows_the_stream_unless_forced(
    setting: str, tty: bool, expected: str
) -> None:
    stream = _Tty() if tty else io.StringIO()
    assert winback_logging.choose_format(setting, stream) == expected
    assert winback_logging.configure(log_format=setting, stream=stream) == expected
    logging.getLogger().handlers.clear()


def test_a_closed_stream_gets_json() -> None:
    stream = io.StringIO()
    stream.close()
    assert winback_logging.choose_format("auto", stream) == "json"


CHILD = """
import logging
from shared import logging as winback_logging
winback_logging.configure(log_format={fmt!r})
logging.getLogger("winback.test").warning(
    "hello %s", "there", extra={{"port": 8081, "operation": "reaching the database"}}
)
"""


def _child_stderr_on_a_terminal(fmt: str) -> str:
    """A child process whose stderr is a pseudo-terminal: what it logged there."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD.format(fmt=fmt)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
            timeout=60,
            check=True,
        )
        assert proc.stdout == b""
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child's end is closed and everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    return out.decode()


def test_a_terminal_gets_readable_lines_and_a_pipe_gets_json() -> None:
    text = _child_stderr_on_a_terminal("auto")
    when, level, rest = text.strip().split(maxsplit=2)
    assert RFC3339_UTC.match(when)
    assert (level, rest) == (
        "WARNING",
        'winback.test: hello there  port=8081 operation="reaching the database"',
    )
    assert "{" not in text

    forced = json.loads(_child_stderr_on_a_terminal("json"))
    assert (forced["message"], forced["port"]) == ("hello there", 8081)

    piped = subprocess.run(
        [sys.executable, "-c", CHILD.format(fmt="auto")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert json.loads(piped.stderr)["message"] == "hello there"
