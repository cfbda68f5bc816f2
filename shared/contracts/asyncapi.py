"""The AsyncAPI 3.0 document of winback's events, generated from the contracts
(``registry.CONTRACTS``) and the topic settings: ``winback asyncapi > docs/asyncapi.yaml``.

- one channel per topic (each inbound topic, ``domain``, ``dispatch``, ``outcomes``,
  ``erasure``, ``dead_letter``), with its Kafka binding (partitions, replicas);
- one message per event type, named by its CloudEvent ``type``: the record value is the whole
  CloudEvent (structured mode) — the envelope schema with ``type`` fixed and ``data`` the
  JSON Schema of the contract's model; the Kafka headers, the record key, the correlation id,
  who produces and who consumes it (``x-producers``, ``x-consumers``) and an example;
- send and receive operations per service;
- every model's JSON Schema under ``components/schemas``, pydantic's ``$defs`` lifted there
  and every ``$ref`` pointing at them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from importlib import metadata
from typing import Any

import yaml

from shared.cloudevents import STRUCTURED, format_time
from shared.contracts.base import Published, Received
from shared.contracts.registry import CONTRACTS, SERVICES, Contract
from shared.domain_events import PREFIX
from shared.settings import IngestSettings, TopicSettings

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
SCHEMAS = "#/components/schemas/"
DEAD_LETTER = "winback.dead-letter"
EXAMPLE_TIME = "2026-03-02T08:00:00Z"
SOURCES = {
    "ingest": "/winback/ingest",
    "scheduler": "/winback/scheduler",
    "dispatcher": "/winback/dispatcher",
}

_DESCRIPTION = """\
Events between winback's services (ingest → scheduler → dispatcher) and the lifecycle events
billing and product systems send in.

Every record value is a CloudEvent 1.0 in structured mode (`content-type:
application/cloudevents+json`; the message payload below is the whole event, its `data` the
event type's contract). Inbound topics also accept the binary mode (attributes as `ce_`
headers, the value is the data). Records are keyed by customer id (feature id for feature
releases), so one customer's events stay in order. A record that cannot be handled goes to the
dead-letter topic with its original bytes and headers plus `winback-dlq-*` headers naming the
error; the consumer moves on.

The `data` schemas are generated from the pydantic models in `shared/contracts/` (producers
build with them, consumers decode with them). Regenerate with
`winback asyncapi > docs/asyncapi.yaml`; a test fails while the committed file is stale.
"""


def document(
    topics: TopicSettings | None = None, inbound_prefix: str | None = None
) -> dict[str, Any]:
    """The AsyncAPI document as plain data (defaults: the settings' defaults)."""
    topics = topics if topics is not None else TopicSettings()
    prefix = (inbound_prefix or IngestSettings().event_type_prefix).rstrip(".")
    schemas = _schemas(CONTRACTS)
    messages = {_message_id(c, prefix): _message(c, prefix) for c in CONTRACTS}
    messages[DEAD_LETTER] = _dead_letter_message()
    channels = _channels(topics, prefix)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "winback events",
            "version": metadata.version("winback"),
            "description": _DESCRIPTION,
        },
        "defaultContentType": STRUCTURED,
        "servers": {
            "kafka": {
                "host": "localhost:9092",
                "protocol": "kafka",
                "description": "The Kafka cluster: WINBACK_KAFKA__BOOTSTRAP_SERVERS.",
            }
        },
        "channels": channels,
        "operations": _operations(topics, prefix),
        "components": {
            "messages": messages,
            "schemas": schemas,
            "correlationIds": {
                "correlationid": {
                    "description": "The CloudEvents extension `correlationid`: carried from "
                    "the event that started a chain through every event it causes.",
                    "location": "$message.payload#/correlationid",
                }
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (``|``), everything else as PyYAML writes it."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(doc: Mapping[str, Any]) -> str:
    return yaml.dump(dict(doc), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


# -- channels ----------------------------------------------------------------------------------


def _channel_id(topic: str, address: str) -> str:
    if topic == "inbound":
        return "inbound." + re.sub(r"[^A-Za-z0-9.\-_]", "_", address)
    return {"dead_letter": "deadLetter"}.get(topic, topic)


def _topic_addresses(topics: TopicSettings) -> list[tuple[str, str]]:
    return [
        *(("inbound", address) for address in topics.inbound),
        ("domain", topics.domain),
        ("dispatch", topics.dispatch),
        ("outcomes", topics.outcomes),
        ("erasure", topics.erasure),
        ("dead_letter", topics.dead_letter),
    ]


_CHANNEL_TEXT = {
    "inbound": "Lifecycle events from billing and product systems; ingest validates them.",
    "domain": "What ingest makes of them: churns, returns, activity, profile and consent "
    "changes, feature releases.",
    "dispatch": "Dispatch commands, scheduler → dispatcher: one per step to send.",
    "outcomes": "What happened: case events (scheduler), message outcomes and unsubscribes "
    "(dispatcher).",
    "erasure": "GDPR erasure requests; every service removes the person's data.",
    "dead_letter": "Records no consumer could handle, with the reason (`winback-dlq-*` "
    "headers); for operators.",
}


def _channels(topics: TopicSettings, prefix: str) -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for topic, address in _topic_addresses(topics):
        on_it = [c for c in CONTRACTS if c.topic == topic]
        ids = [_message_id(c, prefix) for c in on_it] or [DEAD_LETTER]
        channels[_channel_id(topic, address)] = {
            "address": address,
            "title": address,
            "description": f"`topics.{topic}`. {_CHANNEL_TEXT[topic]}",
            "messages": {i: {"$ref": f"#/components/messages/{i}"} for i in ids},
            "bindings": {
                "kafka": {
                    "topic": address,
                    "partitions": topics.partitions,
                    "replicas": topics.replication,
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
        }
    return channels


# -- operations --------------------------------------------------------------------------------


def _operations(topics: TopicSettings, prefix: str) -> dict[str, Any]:
    """Per service and channel: a ``receive`` of the types it acts on, a ``send`` of those it
    produces; every service may dead-letter."""
    operations: dict[str, Any] = {}
    for service in SERVICES:
        for topic, address in _topic_addresses(topics):
            channel = _channel_id(topic, address)
            on_it = [c for c in CONTRACTS if c.topic == topic]
            for action, chosen in (
                ("receive", [c for c in on_it if service in c.consumers]),
                ("send", [c for c in on_it if service in c.producers]),
            ):
                if not chosen:
                    continue
                operations[f"{service}.{action}.{channel}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{channel}"},
                    "title": f"{service} {action}s on {address}",
                    "summary": ", ".join(c.name for c in chosen),
                    "messages": [
                        {"$ref": f"#/channels/{channel}/messages/{_message_id(c, prefix)}"}
                        for c in chosen
                    ],
                }
        operations[f"{service}.send.deadLetter"] = {
            "action": "send",
            "channel": {"$ref": "#/channels/deadLetter"},
            "title": f"{service} dead-letters what it cannot handle",
            "messages": [{"$ref": f"#/channels/deadLetter/messages/{DEAD_LETTER}"}],
        }
    return operations


# -- messages ----------------------------------------------------------------------------------


def _message_id(contract: Contract, prefix: str) -> str:
    return contract.event_type(prefix)


def _message(contract: Contract, prefix: str) -> dict[str, Any]:
    event_type = contract.event_type(prefix)
    model = contract.model
    producers = list(contract.producers)
    return {
        "name": event_type,
        "title": contract.name.removeprefix(PREFIX + "."),
        "summary": contract.summary,
        "description": _model_text(model),
        "contentType": STRUCTURED,
        "headers": {"$ref": SCHEMAS + ("InboundHeaders" if contract.inbound else "Headers")},
        "payload": {
            "allOf": [
                {"$ref": SCHEMAS + "CloudEvent"},
                {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "type": {"const": event_type},
                        "data": {"$ref": SCHEMAS + model.__name__},
                    },
                },
            ]
        },
        "correlationId": {"$ref": "#/components/correlationIds/correlationid"},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": f"the {contract.key}"},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
        "x-producers": producers,
        "x-consumers": list(contract.consumers),
        "examples": [
            {
                "name": contract.name.rsplit(".", 1)[-1] if not contract.inbound else "billing",
                "summary": f"{contract.name.removeprefix(PREFIX + '.')} as it travels",
                "headers": {"content-type": STRUCTURED},
                "payload": _envelope(contract, event_type),
            }
        ],
    }


def _model_text(model: type[Published] | type[Received]) -> str:
    doc = (model.__doc__ or "").strip()
    return re.sub(r"\s*\n\s*", " ", doc)


def _envelope(contract: Contract, event_type: str) -> dict[str, Any]:
    data = copy.deepcopy(dict(contract.example))
    subject = data.get("customer_id") or (data.get("customer") or {}).get("id")
    source = "/billing" if contract.inbound else SOURCES.get(contract.producers[0], "/winback")
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"example-{contract.name}",
        "source": source,
        "type": event_type,
        "time": EXAMPLE_TIME,
    }
    if subject and not contract.inbound:
        envelope["subject"] = subject
    envelope["datacontenttype"] = "application/json"
    if not contract.inbound:
        envelope["correlationid"] = "example-correlation"
    envelope["data"] = data
    return envelope


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": DEAD_LETTER,
        "title": "dead letter",
        "summary": "A record no consumer could handle: its original bytes and headers, plus "
        "headers naming the error and where it came from.",
        "contentType": "application/octet-stream",
        "headers": {"$ref": SCHEMAS + "DeadLetterHeaders"},
        "payload": {"description": "the original record value, unchanged"},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": "the original record key"},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
        "x-producers": list(SERVICES),
        "x-consumers": [],
        "examples": [
            {
                "name": "invalid_payload",
                "headers": {
                    "content-type": STRUCTURED,
                    "winback-dlq-error-code": "invalid_payload",
                    "winback-dlq-error-reason": "Input should be a valid integer",
                    "winback-dlq-error-field": "data.customer.mrr_minor",
                    "winback-dlq-source-topic": "billing.lifecycle",
                    "winback-dlq-source-partition": "3",
                    "winback-dlq-source-offset": "1207",
                    "winback-dlq-consumer": "ingest",
                    "winback-dlq-dead-lettered-at": format_time(_example_time()),
                },
            }
        ],
    }


def _example_time() -> datetime:
    return datetime.fromisoformat(EXAMPLE_TIME.replace("Z", "+00:00"))


# -- schemas -----------------------------------------------------------------------------------


def _schemas(contracts: Iterable[Contract]) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "CloudEvent": _cloudevent_schema(),
        "Headers": {
            "type": "object",
            "description": "Kafka record headers: structured mode.",
            "required": ["content-type"],
            "properties": {"content-type": {"const": STRUCTURED}},
        },
        "InboundHeaders": _inbound_headers_schema(),
        "DeadLetterHeaders": _dead_letter_headers_schema(),
    }
    for model in dict.fromkeys(c.model for c in contracts):
        schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
        for name, definition in schema.pop("$defs", {}).items():
            _put(schemas, name, definition)
        _put(schemas, model.__name__, schema)
    return schemas


def _put(schemas: dict[str, Any], name: str, schema: Any) -> None:
    if name in schemas and schemas[name] != schema:
        raise ValueError(f"two different schemas are both named {name!r}")
    schemas[name] = schema


def _cloudevent_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A CloudEvent 1.0 in structured mode. Extension attributes are "
        "lower-case `[a-z0-9]{1,20}` names with scalar values.",
        "required": ["specversion", "id", "source", "type"],
        "properties": {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "minLength": 1, "description": "unique per source"},
            "source": {"type": "string", "minLength": 1, "format": "uri-reference"},
            "type": {"type": "string", "minLength": 1},
            "time": {"type": "string", "format": "date-time"},
            "subject": {"type": "string", "description": "the customer id"},
            "datacontenttype": {"type": "string", "const": "application/json"},
            "dataschema": {"type": "string", "format": "uri"},
            "correlationid": {
                "type": "string",
                "description": "extension: the id of the event that started the chain",
            },
            "data": {"description": "the event type's contract"},
        },
    }


def _inbound_headers_schema() -> dict[str, Any]:
    attributes = ("specversion", "id", "source", "type", "time", "subject")
    return {
        "type": "object",
        "description": "Kafka record headers. Structured mode: `content-type: "
        f"{STRUCTURED}`. Binary mode: the attributes as `ce_` headers, `content-type` the "
        "data's (JSON), the value is the data.",
        "properties": {
            "content-type": {"type": "string"},
            **{f"ce_{name}": {"type": "string"} for name in attributes},
        },
    }


def _dead_letter_headers_schema() -> dict[str, Any]:
    fields = {
        "error-code": "malformed_json, too_deep, missing_attribute, invalid_attribute, "
        "invalid_header, unknown_type, invalid_payload, oversize, future_time, decode_error, "
        "handler_error",
        "error-reason": "why, in words",
        "error-field": "the field at fault (`data.customer.phone`), or empty",
        "source-topic": "where the record was read",
        "source-partition": "its partition",
        "source-offset": "its offset",
        "consumer": "the consumer group that gave up on it",
        "dead-lettered-at": "when (RFC 3339)",
    }
    return {
        "type": "object",
        "description": "The original record's headers, plus these.",
        "required": [f"winback-dlq-{name}" for name in fields],
        "properties": {
            f"winback-dlq-{name}": {"type": "string", "description": text}
            for name, text in fields.items()
        },
    }
