"""CloudEvents 1.0: the envelope of every event, on Kafka (both bindings) and over HTTP.

We read the structured mode (``application/cloudevents+json``: the whole event is the JSON
value) and the binary mode (attributes as ``ce_`` headers, the record value is the data); we
write structured. Every failure is an ``InvalidEvent`` naming the attribute at fault.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.errors import InvalidEvent

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
REQUIRED = ("id", "source", "specversion", "type")
_CONTEXT = {
    "id",
    "source",
    "specversion",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
}
_EXT_NAME = re.compile(r"^[a-z0-9]{1,20}$")
CORRELATION = "correlationid"

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class CloudEvent:
    id: str
    source: str
    type: str
    data: Any = None
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str | None = "application/json"
    dataschema: str | None = None
    extensions: Mapping[str, str] = field(default_factory=dict)
    specversion: str = SPECVERSION

    @property
    def correlation_id(self) -> str:
        return self.extensions.get(CORRELATION) or self.id

    def to_json_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
        }
        if self.time is not None:
            out["time"] = format_time(self.time)
        for name in ("subject", "datacontenttype", "dataschema"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update(self.extensions)
        if self.data is not None:
            out["data"] = self.data
        return out

    def to_structured(self) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The Kafka record value and headers for structured mode."""
        return orjson.dumps(self.to_json_dict()), [("content-type", STRUCTURED.encode())]


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any, attribute: str = "time") -> datetime:
    if not isinstance(value, str):
        raise InvalidEvent("invalid_attribute", "must be an RFC 3339 timestamp string", attribute)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidEvent(
            "invalid_attribute", f"not an RFC 3339 timestamp: {value[:40]!r}", attribute
        ) from None
    if parsed.tzinfo is None:
        raise InvalidEvent("invalid_attribute", "timestamp needs a UTC offset", attribute)
    return parsed.astimezone(UTC)


def from_json_dict(obj: Any) -> CloudEvent:
    """Validate a structured-mode event already parsed from JSON."""
    if not isinstance(obj, dict):
        raise InvalidEvent("malformed_json", "a CloudEvent must be a JSON object")
    for name in REQUIRED:
        if name not in obj or obj[name] in (None, ""):
            raise InvalidEvent("missing_attribute", "required attribute is missing", name)
        if not isinstance(obj[name], str):
            raise InvalidEvent("invalid_attribute", "must be a string", name)
    if obj["specversion"] != SPECVERSION:
        raise InvalidEvent(
            "invalid_attribute", f"unsupported specversion {obj['specversion']!r}", "specversion"
        )
    time = parse_time(obj["time"]) if obj.get("time") is not None else None
    extensions: dict[str, str] = {}
    for name, value in obj.items():
        if name in _CONTEXT:
            continue
        if not _EXT_NAME.match(name):
            raise InvalidEvent("invalid_attribute", "extension names are [a-z0-9]{1,20}", name)
        if isinstance(value, dict | list):
            raise InvalidEvent("invalid_attribute", "extension values must be scalars", name)
        extensions[name] = str(value)
    data = obj.get("data")
    if data is None and obj.get("data_base64") is not None:
        raise InvalidEvent("invalid_attribute", "binary data is not accepted", "data_base64")
    return CloudEvent(
        id=obj["id"],
        source=obj["source"],
        type=obj["type"],
        specversion=obj["specversion"],
        time=time,
        subject=_opt_str(obj, "subject"),
        datacontenttype=_opt_str(obj, "datacontenttype"),
        dataschema=_opt_str(obj, "dataschema"),
        data=data,
        extensions=extensions,
    )


def _opt_str(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent("invalid_attribute", "must be a string", name)
    return value


def loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("malformed_json", f"not valid JSON: {exc}") from None


def from_kafka(value: bytes | None, headers: Headers) -> CloudEvent:
    """Decode a Kafka record in either binding."""
    header_map = {name.lower(): raw for name, raw in headers}
    content_type = _decode_header(header_map.get("content-type", b""), "content-type")
    if content_type.lower().startswith("application/cloudevents"):
        if value is None:
            raise InvalidEvent("malformed_json", "structured event with an empty value")
        return from_json_dict(loads(value))
    if "ce_specversion" not in header_map and "ce_id" not in header_map:
        # no content type and no ce_ headers: try structured JSON as a courtesy
        if value is not None and value[:1] == b"{":
            return from_json_dict(loads(value))
        raise InvalidEvent("missing_attribute", "neither structured nor binary mode", "specversion")
    attrs: dict[str, Any] = {}
    for name, raw in header_map.items():
        if name.startswith("ce_"):
            attrs[name[3:]] = _decode_header(raw, name)
    if content_type:
        attrs["datacontenttype"] = content_type
    if value is not None:
        if content_type and "json" not in content_type.lower():
            raise InvalidEvent(
                "invalid_attribute",
                f"only JSON data is accepted, got {content_type}",
                "datacontenttype",
            )
        attrs["data"] = loads(value)
    return from_json_dict(attrs)


def _decode_header(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("invalid_attribute", "header is not UTF-8", name) from None
