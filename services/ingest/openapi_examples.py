"""Examples for ``POST /v1/events`` in its OpenAPI document: one CloudEvent per inbound event
type (the contracts' own examples, ``shared.contracts.examples``, in a structured-mode envelope)
and a batch, under each content type the route takes. A test holds each one to the request
body's schema; Schemathesis sends them too."""

from __future__ import annotations

import copy
from typing import Any

from shared.cloudevents import SPECVERSION, STRUCTURED
from shared.contracts.registry import INBOUND

BATCH = "application/cloudevents-batch+json"
SOURCE = "/billing"
TIME = "2026-03-02T08:00:00Z"


def envelope(name: str, type_prefix: str) -> dict[str, Any]:
    """The contract's example data for ``name`` as a CloudEvent, with the configured prefix."""
    contract = INBOUND[name]
    return {
        "specversion": SPECVERSION,
        "id": f"example-{name.replace('.', '-')}",
        "source": SOURCE,
        "type": contract.event_type(type_prefix),
        "time": TIME,
        "datacontenttype": "application/json",
        "data": copy.deepcopy(dict(contract.example)),
    }


def with_examples(extra: dict[str, Any], type_prefix: str) -> dict[str, Any]:
    """``extra`` (the route's ``openapi_extra``) with ``examples`` on each request body
    content type: every event type alone, and a batch of two."""
    singles = {
        name.replace(".", "_"): {
            "summary": f"{name}: {INBOUND[name].summary}",
            "value": envelope(name, type_prefix),
        }
        for name in INBOUND
    }
    batch = {
        "batch": {
            "summary": "a batch: a cancellation and a profile update, stored all or nothing",
            "value": [
                envelope("subscription.cancelled", type_prefix),
                envelope("customer.updated", type_prefix),
            ],
        }
    }
    extra = copy.deepcopy(extra)
    content = extra["requestBody"]["content"]
    for media_type, examples in (
        (STRUCTURED, singles),
        (BATCH, batch),
        ("application/json", {**singles, **batch}),
    ):
        if media_type in content:
            content[media_type]["examples"] = copy.deepcopy(examples)
    return extra
