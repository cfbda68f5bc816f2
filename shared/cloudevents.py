"""CloudEvents 1.0: the envelope of every event, on Kafka (both bindings) and over HTTP.

We read the structured mode (``application/cloudevents+json``: the whole event is the JSON
value) and the binary mode (attributes as ``ce_`` headers, the record value is the data); we
write structured. Every failure is an ``InvalidEvent`` naming the attribute at fault — never
another exception, whatever the bytes (a Hypothesis property in the unit tests holds us to it).

What an accepted event can hold is bounded, so that it can always be stored (PostgreSQL text
cannot hold NUL, timestamps beyond year 9999 do not exist in Python) and makes sense:

- every string attribute has a maximum length (``MAX_*_CHARS`` below) and no control
  character (C0, DEL, C1) nor lone surrogate;
- ``time`` (and every other timestamp we validate, ``TIME_RANGE``) lies in
  [1970-01-01, 2200-01-01) UTC after conversion to UTC;
- at most ``MAX_EXTENSIONS`` extension attributes, named ``[a-z0-9]{1,20}``, scalar values of
  at most ``MAX_EXTENSION_VALUE_CHARS``;
- JSON nests at most ``MAX_JSON_DEPTH`` levels (the envelope is the first);
- Kafka header names must be UTF-8 (``invalid_header``), ``ce_`` header values too.
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
_EXT_NAME = re.compile(r"[a-z0-9]{1,20}")
CORRELATION = "correlationid"

# -- limits (characters); the README's "Events in" names them --------------------------------
MAX_ID_CHARS = 256
MAX_SOURCE_CHARS = 512
MAX_TYPE_CHARS = 256
MAX_SUBJECT_CHARS = 256
MAX_DATASCHEMA_CHARS = 1024
MAX_DATACONTENTTYPE_CHARS = 128
MAX_SPECVERSION_CHARS = 16
MAX_TIME_CHARS = 64
MAX_EXTENSIONS = 32
MAX_EXTENSION_VALUE_CHARS = 1024
MAX_JSON_DEPTH = 32
ATTRIBUTE_LIMITS: Mapping[str, int] = {
    "id": MAX_ID_CHARS,
    "source": MAX_SOURCE_CHARS,
    "specversion": MAX_SPECVERSION_CHARS,
    "type": MAX_TYPE_CHARS,
    "subject": MAX_SUBJECT_CHARS,
    "datacontenttype": MAX_DATACONTENTTYPE_CHARS,
    "dataschema": MAX_DATASCHEMA_CHARS,
}
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
"""The earliest timestamp accepted (inclusive), after conversion to UTC."""
MAX_TIME = datetime(2200, 1, 1, tzinfo=UTC)
"""The first timestamp no longer accepted (exclusive), after conversion to UTC."""
TIME_RANGE = f"{MIN_TIME:%Y-%m-%d} to {MAX_TIME:%Y-%m-%d} UTC"

# C0 controls, DEL, C1 controls, lone surrogates (which UTF-8 cannot encode)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# the same, but tab, line feed and carriage return are text
_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

Headers = Sequence[tuple[str | bytes, bytes | None]]


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


# -- checks shared with the payload validation of the services --------------------------------
def control_character(value: str, multiline: bool = False) -> str | None:
    """The first control character (or lone surrogate) in ``value`` as ``U+XXXX``, or None.
    ``multiline`` lets tab, line feed and carriage return through (free text)."""
    found = (_CONTROL_MULTILINE if multiline else _CONTROL).search(value)
    return f"U+{ord(found.group()):04X}" if found else None


def utc_in_range(when: datetime) -> datetime:
    """``when`` (aware) in UTC, or ``ValueError`` if it is outside ``TIME_RANGE`` — including
    a time that overflows on the way (``0001-01-01T00:00:00+01:00``)."""
    try:
        utc = when.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"out of range: must be within {TIME_RANGE}") from None
    if not MIN_TIME <= utc < MAX_TIME:
        raise ValueError(f"out of range: must be within {TIME_RANGE}")
    return utc


def parse_time(value: Any, attribute: str = "time") -> datetime:
    if not isinstance(value, str):
        raise InvalidEvent("invalid_attribute", "must be an RFC 3339 timestamp string", attribute)
    if len(value) > MAX_TIME_CHARS:
        raise InvalidEvent(
            "invalid_attribute", f"longer than {MAX_TIME_CHARS} characters", attribute
        )
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError):
        raise InvalidEvent(
            "invalid_attribute", f"not an RFC 3339 timestamp: {value[:40]!r}", attribute
        ) from None
    if parsed.tzinfo is None:
        raise InvalidEvent("invalid_attribute", "timestamp needs a UTC offset", attribute)
    try:
        return utc_in_range(parsed)
    except ValueError as exc:
        raise InvalidEvent("invalid_attribute", str(exc), attribute) from None


def _text(value: str, name: str, limit: int, field: str | None = None) -> str:
    if len(value) > limit:
        raise InvalidEvent("invalid_attribute", f"longer than {limit} characters", field or name)
    bad = control_character(value)
    if bad is not None:
        raise InvalidEvent(
            "invalid_attribute", f"control character {bad} is not allowed", field or name
        )
    return value


def _field(name: str) -> str:
    """An attribute name as the error's field: as given if short and plain, else quoted."""
    if len(name) <= 40 and control_character(name) is None:
        return name
    return repr(name[:40])


def from_json_dict(obj: Any) -> CloudEvent:
    """Validate a structured-mode event already parsed from JSON."""
    if not isinstance(obj, dict):
        raise InvalidEvent("malformed_json", "a CloudEvent must be a JSON object")
    for name in REQUIRED:
        if name not in obj or obj[name] is None or obj[name] == "":
            raise InvalidEvent("missing_attribute", "required attribute is missing", name)
        if not isinstance(obj[name], str):
            raise InvalidEvent("invalid_attribute", "must be a string", name)
        _text(obj[name], name, ATTRIBUTE_LIMITS[name])
    if obj["specversion"] != SPECVERSION:
        raise InvalidEvent(
            "invalid_attribute", f"unsupported specversion {obj['specversion']!r}", "specversion"
        )
    time = parse_time(obj["time"]) if obj.get("time") is not None else None
    extensions: dict[str, str] = {}
    for name, value in obj.items():
        if name in _CONTEXT:
            continue
        if not isinstance(name, str) or not _EXT_NAME.fullmatch(name):
            raise InvalidEvent(
                "invalid_attribute", "extension names are [a-z0-9]{1,20}", _field(str(name))
            )
        if value is None:
            continue  # a null attribute is an absent one
        if isinstance(value, dict | list):
            raise InvalidEvent("invalid_attribute", "extension values must be scalars", name)
        if len(extensions) == MAX_EXTENSIONS:
            raise InvalidEvent(
                "invalid_attribute", f"more than {MAX_EXTENSIONS} extension attributes", name
            )
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = value
        else:
            text = str(value)
        extensions[name] = _text(text, name, MAX_EXTENSION_VALUE_CHARS)
    data = obj.get("data")
    if obj.get("data_base64") is not None:
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
    return _text(value, name, ATTRIBUTE_LIMITS[name])


def loads(raw: bytes) -> Any:
    """Parse JSON; nesting deeper than ``MAX_JSON_DEPTH`` is ``too_deep``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson's own limit (1024) is far beyond ours
            raise InvalidEvent(
                "too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        raise InvalidEvent("malformed_json", f"not valid JSON: {exc}") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise InvalidEvent("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects/arrays nest more than ``limit`` levels (``{}`` is one). Iterative:
    deep input must not exhaust the Python stack here or in whoever walks it next."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def from_kafka(value: bytes | None, headers: Headers) -> CloudEvent:
    """Decode a Kafka record in either binding."""
    header_map: dict[str, bytes] = {}
    for raw_name, raw in headers:
        name = _header_name(raw_name).lower()
        if name != "content-type" and not name.startswith("ce_"):
            continue  # not ours to read: it travels with the record, unread
        raw = _header_value(raw, name)
        if header_map.get(name, raw) != raw:
            raise InvalidEvent(
                "invalid_attribute", "header given twice with different values", _field(name)
            )
        header_map[name] = raw
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
            attribute = name[3:]
            if attribute in ("data", "data_base64", "datacontenttype"):
                raise InvalidEvent(
                    "invalid_attribute",
                    "not a header in binary mode (data is the value, its type content-type)",
                    _field(name),
                )
            attrs[attribute] = _decode_header(raw, name)
    if content_type:
        attrs["datacontenttype"] = content_type
    if value is not None:
        if content_type and "json" not in content_type.lower():
            raise InvalidEvent(
                "invalid_attribute",
                f"only JSON data is accepted, got {content_type[:100]!r}",
                "datacontenttype",
            )
        attrs["data"] = loads(value)
    return from_json_dict(attrs)


def _header_name(raw: Any) -> str:
    """A header name as text. Kafka defines them as UTF-8; anything else is refused."""
    if isinstance(raw, str):
        if _SURROGATE.search(raw):
            raise InvalidEvent(
                "invalid_header", f"header name {raw[:40]!r} is not UTF-8", "headers"
            )
        return raw
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent(
                "invalid_header", f"header name {bytes(raw)[:40]!r} is not UTF-8", "headers"
            ) from None
    raise InvalidEvent("invalid_header", f"header name is a {type(raw).__name__}", "headers")


def _header_value(raw: Any, name: str) -> bytes:
    if raw is None:
        return b""
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw)
    raise InvalidEvent("invalid_header", f"header value is a {type(raw).__name__}", _field(name))


def _decode_header(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("invalid_attribute", "header is not UTF-8", _field(name)) from None
