"""Ingest decodes inbound events through the shared contracts (``shared.contracts.registry``
``INBOUND``) and publishes with their models: it accepts exactly the registry's inbound types,
each payload is its contract's model, and over payloads mixing good and hostile values for
every field it decides as the contract does — the same payload accepted, or refused with the
same reason and the same field. No model of the contracts is defined again in ingest."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.ingest import events as ingest
from shared import contracts
from shared.cloudevents import CloudEvent
from shared.contracts import examples, inbound, registry
from shared.contracts.base import Published, Received
from shared.errors import InvalidEvent

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
PREFIX = "com.example"
BAD_TEXT = ["", " ", "a\x00b", "tab\there", "line\nbreak", "\x7f", "\u0085", "\ud800", "é" * 201]


def event(name: str, data: Any) -> CloudEvent:
    return CloudEvent(id="e1", source="/s", type=f"{PREFIX}.{name}", time=NOW, data=data)


def ingest_decides(name: str, data: dict[str, Any]) -> Any:
    try:
        got = ingest.decode(event(name, data), PREFIX, NOW, 300)
    except InvalidEvent as exc:
        return ("refused", exc.code, exc.field, exc.reason)
    return ("ok", type(got.payload), got.payload)


def contract_decides(name: str, data: dict[str, Any]) -> Any:
    try:
        payload = registry.INBOUND[name].decode(data)
    except InvalidEvent as exc:
        return ("refused", exc.code, exc.field, exc.reason)
    return ("ok", type(payload), payload)


def test_ingest_accepts_exactly_the_registrys_inbound_types() -> None:
    for name, contract in registry.INBOUND.items():
        got = ingest.decode(event(name, examples.INBOUND[name]), PREFIX, NOW, 300)
        assert got.name == name
        assert type(got.payload) is contract.model is inbound.INBOUND[name]
        assert got.payload == contract.decode(examples.INBOUND[name])
    # our own types are not inbound ones, with or without the prefix
    for published in registry.PUBLISHED:
        for type_ in (published, f"{PREFIX}.{published}", f"{PREFIX}.nope.{published}"):
            raw = CloudEvent(id="e1", source="/s", type=type_, time=NOW, data={})
            with pytest.raises(InvalidEvent) as info:
                ingest.decode(raw, PREFIX, NOW, 300)
            assert (info.value.code, info.value.field) == ("unknown_type", "type"), type_


def test_what_ingest_publishes_is_typed_by_the_registry() -> None:
    ours = {c.name: c.model for c in registry.CONTRACTS if "ingest" in c.producers}
    assert {c.name: model for model, c in ingest.PUBLISHES.items()} == ours
    assert all(c.topic == "domain" for c in ingest.PUBLISHES.values())


def strings(limit: int) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.text(max_size=limit + 2),
        st.sampled_from([*BAD_TEXT, "x" * limit, "x" * (limit + 1), "  padded  "]),
        st.integers(),
        st.none(),
    )


VALUES: dict[str, st.SearchStrategy[Any]] = {
    "customer_id": st.one_of(strings(200), st.just("cus_42")),
    "feature": st.one_of(strings(200), st.just("sso_login")),
    "email": st.sampled_from(["aino@Example.COM", "a@b..c", " a@b.fi ", "x" * 250 + "@b.fi"]),
    "phone": st.sampled_from(["+358401234567", "0401234567", "+3584\x001234567", None]),
    "timezone": st.sampled_from(["Europe/Helsinki", "Mars/Olympus", "../etc/passwd", ""]),
    "currency": st.sampled_from(["eur", "EU", "€UR", None, 978]),
    "customer_since": st.sampled_from(
        ["2024-05-01T03:00:00+03:00", "2024-05-01T00:00:00", "2200-01-01T00:00:00Z", 1_700_000]
    ),
    "engagement": st.sampled_from(["high", "HIGH", None]),
    "mrr_minor": st.sampled_from([-1, 4900, 2**63 - 1, 2**63, "4900", 49.5, True, None]),
    "days_inactive": st.one_of(st.integers(-1, 100_001), st.just("30")),
    "usage_drop_percent": st.sampled_from([-1, 50.5, 101, float("nan")]),
    "channel": st.sampled_from(["email", "sms", "all", "fax", "", None]),
    "comment": strings(5000),
    "description": strings(2000),
}


def payloads(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    fields = {name: VALUES.get(name, strings(200)) for name in model.model_fields}
    fields.pop("customer", None)
    optional = {**fields, "unknown_field": st.integers()}
    if "customer" in model.model_fields:
        profile = {name: VALUES.get(name, strings(200)) for name in inbound.Profile.model_fields}
        optional["customer"] = st.one_of(
            st.fixed_dictionaries({}, optional=profile), st.sampled_from(["x", None, []])
        )
    return st.fixed_dictionaries({}, optional=optional)


@pytest.mark.parametrize("name", sorted(registry.INBOUND))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_ingest_decides_as_the_contract_does(name: str, data: st.DataObject) -> None:
    payload = data.draw(payloads(registry.INBOUND[name].model))
    assert ingest_decides(name, payload) == contract_decides(name, payload)


def test_ingest_defines_no_model_of_the_contracts_again() -> None:
    names = {
        model.__name__
        for contract in contracts.CONTRACTS
        for model in (contract.model, *_nested(contract.model))
    }
    for path in sorted((ROOT / "services/ingest").rglob("*.py")):
        defined = {
            node.name
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ClassDef)
        }
        assert not defined & names, f"{path.relative_to(ROOT)} defines {defined & names}"


def _nested(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The models a contract's model is made of (``CustomerEvent``'s ``Profile``, …)."""
    found = [base for base in model.__mro__[1:] if issubclass(base, BaseModel)]
    for field in model.model_fields.values():
        for arg in getattr(field.annotation, "__args__", (field.annotation,)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                found.append(arg)
    # the contract modules' own models (not the bases every contract shares)
    return [m for m in found if m.__module__.startswith("shared.contracts.") and m not in BASES]


BASES = (Published, Received)
