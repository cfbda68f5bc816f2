"""Logs are JSON, carry the correlation id, and never carry contact points or free text."""

from __future__ import annotations

import io
import json
import logging

from shared import logging as winback_logging


def capture(fn: object) -> dict[str, object]:
    stream = io.StringIO()
    winback_logging.configure("INFO", "test")
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
