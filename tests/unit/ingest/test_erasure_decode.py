"""Ingest's erasure consumer decodes ``customer.erased`` through its contract: the customer's
id, or a refusal naming the field (the record dead-letters at decode time)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.ingest.erasure import ErasureHandler
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts import examples
from shared.errors import InvalidEvent

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
ERASED = examples.PUBLISHED[de.CUSTOMER_ERASED.removeprefix(de.PREFIX + ".")]


def erased(data: Any, type_: str = de.CUSTOMER_ERASED) -> CloudEvent:
    return CloudEvent(id="e1", source="/scheduler", type=type_, time=NOW, data=data)


def test_the_customer_id_of_an_erasure() -> None:
    assert ErasureHandler().decode(erased(ERASED)) == ERASED["customer_id"]


def test_a_field_added_by_a_newer_scheduler_is_ignored() -> None:
    assert ErasureHandler().decode(erased({**ERASED, "later": 1})) == ERASED["customer_id"]


def test_another_type_on_the_topic_is_not_ingests() -> None:
    assert ErasureHandler().decode(erased(ERASED, de.CASE_CLOSED)) is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({k: v for k, v in ERASED.items() if k != "customer_id"}, "data.customer_id"),
        ({**ERASED, "customer_id": ""}, "data.customer_id"),
        ({**ERASED, "customer_id": 42}, "data.customer_id"),
        ({**ERASED, "erased_at": "yesterday"}, "data.erased_at"),
        ([ERASED], "data"),
        (None, "data"),
    ],
)
def test_a_malformed_erasure_is_refused_naming_the_field(data: Any, field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        ErasureHandler().decode(erased(data))
    assert (info.value.code, info.value.field) == ("invalid_payload", field)
