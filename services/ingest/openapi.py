"""What ``POST /v1/events`` accepts, as JSON Schema for its OpenAPI document.

The route reads the raw body (structured mode: one CloudEvent or a JSON array batch, under
``application/cloudevents+json``, ``application/cloudevents-batch+json`` or plain
``application/json``; binary mode: ``ce-`` headers with the data as the body), so FastAPI
cannot derive the schema: it is built here from the same limits and payload models the
decoding applies (``shared.cloudevents``, the inbound contracts of ``shared.contracts``). One
branch per event type: the ``type`` (with the configured prefix) decides the ``data`` schema.
What JSON Schema cannot say — a time at most a few minutes ahead, a phone number that exists,
an IANA zone — the 422 answer names."""

from __future__ import annotations

from typing import Any

from shared.cloudevents import (
    ATTRIBUTE_LIMITS,
    MAX_EXTENSION_VALUE_CHARS,
    MAX_EXTENSIONS,
    SPECVERSION,
    STRUCTURED,
    TIME_RANGE,
)
from shared.contracts.registry import INBOUND

BATCH = "application/cloudevents-batch+json"
# no control characters (C0, DEL, C1): what shared.cloudevents refuses in an attribute
NO_CONTROL = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
# years 1970 to 2199 (shared.cloudevents.TIME_RANGE, give or take the offset)
IN_RANGE = "^(19[7-9][0-9]|2[01][0-9][0-9])-"
_DEFS = "#/$defs/"  # hoisted into components/schemas by shared.http.app


def _text(name: str, description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": ATTRIBUTE_LIMITS[name],
        "pattern": NO_CONTROL,
        "description": description,
    }


def _attributes() -> dict[str, Any]:
    return {
        "specversion": {"type": "string", "const": SPECVERSION},
        "id": _text("id", "unique per source; a repeat is a duplicate, not a second event"),
        "source": _text("source", "URI reference of the producer, e.g. /billing"),
        "time": {
            "type": "string",
            "format": "date-time",
            "pattern": IN_RANGE,
            "description": f"RFC 3339 with an offset, within {TIME_RANGE}, not in the future "
            "(a few minutes of clock skew allowed); default: when it arrives",
        },
        "subject": _text("subject", "optional"),
        "datacontenttype": _text("datacontenttype", "optional; the data is JSON"),
        "dataschema": _text("dataschema", "optional URI"),
    }


def request_body(type_prefix: str, batch_limit: int) -> dict[str, Any]:
    """``openapi_extra`` for the route: the request body in each structured content type."""
    defs: dict[str, Any] = {}
    branches: list[dict[str, Any]] = []
    for name, contract in INBOUND.items():
        model = contract.model
        schema = model.model_json_schema(ref_template=_DEFS + "{model}")
        defs.update(schema.pop("$defs", {}))
        defs[model.__name__] = schema
        full = f"{type_prefix.rstrip('.')}.{name}"
        branches.append(
            {
                "type": "object",
                "title": full,
                "required": ["specversion", "id", "source", "type", "data"],
                "properties": {
                    **_attributes(),
                    "type": {"type": "string", "const": full},
                    "data": {"$ref": _DEFS + model.__name__},
                },
                # extension attributes: lowercase names, scalar values
                "propertyNames": {"pattern": "^[a-z0-9]{1,20}$"},
                "additionalProperties": {
                    "type": ["string", "number", "boolean", "null"],
                    "maxLength": MAX_EXTENSION_VALUE_CHARS,
                    "pattern": NO_CONTROL,
                },
                "maxProperties": len(_attributes()) + 2 + MAX_EXTENSIONS,
            }
        )
    defs["CloudEvent"] = {
        "description": "A CloudEvent 1.0 in structured mode; its type decides its data.",
        "oneOf": branches,
    }
    defs["CloudEventBatch"] = {
        "type": "array",
        "items": {"$ref": _DEFS + "CloudEvent"},
        "minItems": 1,
        "maxItems": batch_limit,
    }
    one = {"$ref": _DEFS + "CloudEvent", "$defs": defs}
    many = {"$ref": _DEFS + "CloudEventBatch", "$defs": defs}
    either = {"oneOf": [{"$ref": _DEFS + "CloudEvent"}, {"$ref": _DEFS + "CloudEventBatch"}]}
    return {
        "requestBody": {
            "required": True,
            "description": "One event or a batch. Binary mode: the event's attributes as "
            "`ce-` headers (`ce-specversion`, `ce-id`, `ce-source`, `ce-type`, …) and its "
            "data as an `application/json` body.",
            "content": {
                STRUCTURED: {"schema": one},
                BATCH: {"schema": many},
                "application/json": {"schema": {**either, "$defs": defs}},
            },
        }
    }
