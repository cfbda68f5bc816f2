"""The inbound contracts (``shared.contracts.inbound``) carry exactly ingest's validation
(``services.ingest.events``): over payloads mixing good and hostile values for every field,
both accept the same ones with the same result and refuse the same ones naming the same field
and reason. When ingest's rules change, this fails until the contract follows (or until ingest
decodes with the contract itself)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from services.ingest import events as ingest
from shared.contracts import inbound

BAD_TEXT = ["", " ", "a\x00b", "tab\there", "line\nbreak", "\x7f", "\u0085", "\ud800", "é" * 201]


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
    "email": st.sampled_from(
        [
            "aino@Example.COM",
            "a@b",
            "no-at",
            "a@b..c",
            " a@b.fi ",
            "x" * 250 + "@b.fi",
            "ä@b.fi",
            None,
        ]
    ),
    "phone": st.sampled_from(
        [
            "+358401234567",
            "+358 40 123 4567",
            "0401234567",
            "+1",
            "+3584\x001234567",
            "+" + "1" * 70,
            None,
        ]
    ),
    "timezone": st.sampled_from(
        ["Europe/Helsinki", "UTC", "Mars/Olympus", "../etc/passwd", "Europe/Hel\x00sinki", "", None]
    ),
    "currency": st.sampled_from(["eur", "EUR", "EU", "EURO", "€UR", "e1r", None, 978]),
    "customer_since": st.sampled_from(
        [
            "2024-05-01T00:00:00Z",
            "2024-05-01T03:00:00+03:00",
            "2024-05-01",
            "2024-05-01T00:00:00",
            "1969-12-31T23:59:59Z",
            "2199-12-31T23:59:59Z",
            "2200-01-01T00:00:00Z",
            "0001-01-01T00:00:00+01:00",
            1_700_000_000,
            "yesterday",
            None,
        ]
    ),
    "locale": st.sampled_from(["fi-FI", "en", "zz_ZZZZZZZZZ", "f", "fi-FI-" + "x" * 40, None]),
    "engagement": st.sampled_from(["high", "low", "HIGH", "none", None]),
    "mrr_minor": st.one_of(
        st.integers(min_value=-5, max_value=2**64),
        st.sampled_from([2**63 - 1, 2**63, "4900", 49.0, 49.5, True, None]),
    ),
    "days_inactive": st.one_of(st.integers(-1, 100_001), st.just("30")),
    "usage_drop_percent": st.one_of(
        st.floats(min_value=-1, max_value=101), st.sampled_from([float("nan"), float("inf")])
    ),
    "channel": st.sampled_from(["email", "sms", "all", "fax", "", None]),
    "comment": strings(5000),
    "description": strings(2000),
}
SHORT = strings(200)


def value(name: str) -> st.SearchStrategy[Any]:
    return VALUES.get(name, SHORT)


def payloads(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    fields = {name: value(name) for name in model.model_fields if name != "customer"}
    optional = {**fields, "unknown_field": st.integers()}
    if "customer" in model.model_fields:
        profile = {name: value(name) for name in inbound.Profile.model_fields}
        optional["customer"] = st.one_of(
            st.fixed_dictionaries({}, optional=profile), st.sampled_from(["x", None, []])
        )
    return st.fixed_dictionaries({}, optional=optional)


def outcome(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return ("ok", model.model_validate(data).model_dump())
    except ValidationError as exc:
        first = exc.errors()[0]
        return ("refused", first["loc"], first["msg"])


@pytest.mark.parametrize("name", sorted(ingest.PAYLOADS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_contract_decides_as_ingest_does(name: str, data: st.DataObject) -> None:
    assert set(inbound.INBOUND) == set(ingest.PAYLOADS)
    ours, theirs = inbound.INBOUND[name], ingest.PAYLOADS[name]
    assert set(ours.model_fields) == set(theirs.model_fields)
    payload = data.draw(payloads(theirs))
    assert outcome(ours, payload) == outcome(theirs, payload)


def test_the_examples_mean_the_same_to_ingest() -> None:
    from shared.contracts import examples

    for name, example in examples.INBOUND.items():
        assert outcome(inbound.INBOUND[name], example) == outcome(ingest.PAYLOADS[name], example)
        assert outcome(ingest.PAYLOADS[name], example)[0] == "ok", name
