"""The app every service starts from: operation ids chosen by hand, error answers documented as
problem+json, /metrics as the Prometheus text format, the request body of POST /v1/events per
event type, /ready without exception text, and request metrics by route template."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
from fastapi import APIRouter
from prometheus_client import REGISTRY

from services.dispatcher import bootstrap as dispatcher
from services.ingest import bootstrap as ingest
from services.scheduler import bootstrap as scheduler
from shared.contracts.registry import INBOUND
from shared.errors import ConfigError
from shared.http.app import create_app, operation_id
from shared.http.auth import require_scope
from shared.http.metrics import UNMATCHED
from shared.http.problems import PROBLEM, Problem
from shared.runtime import NotStarted
from shared.settings import load_settings
from tests.support.http import serve

PROBLEM_CONTENT = {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _documents() -> dict[str, dict[str, Any]]:
    settings = load_settings(
        environment="test",
        database={"url": "postgresql+asyncpg://unused@127.0.0.1:9/unused"},
        kafka={"bootstrap_servers": "127.0.0.1:9"},
    )
    return {
        "ingest": ingest.bootstrap(settings).app.openapi(),
        "scheduler": scheduler.bootstrap(settings).app.openapi(),
        "dispatcher": dispatcher.bootstrap(settings).app.openapi(),
    }


DOCUMENTS = _documents()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_operation_ids_are_chosen_not_generated_and_unique(service: str) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(DOCUMENTS[service])]
    assert ids, service
    assert not [i for i in ids if "_v1_" in i or i.endswith(("_get", "_post", "_delete"))]
    assert len(ids) == len(set(ids)), ids
    # camelCase: a verb and what it acts on
    camel = re.compile(r"[a-z]+(?:[A-Z][a-z0-9]*)*")
    assert [i for i in ids if not camel.fullmatch(i)] == []


def test_operation_ids_of_the_status_api_and_the_probes() -> None:
    ids = {(m, p): o["operationId"] for m, p, o in operations(DOCUMENTS["scheduler"])}
    assert ids[("GET", "/v1/customers/{customer_id}/winback")] == "getCustomerWinback"
    assert ids[("GET", "/v1/cases")] == "listCases"
    assert ids[("DELETE", "/v1/customers/{customer_id}")] == "eraseCustomer"
    assert ids[("GET", "/health")] == "getHealth"
    assert ids[("GET", "/metrics")] == "getMetrics"
    ingest_ids = {(m, p): o["operationId"] for m, p, o in operations(DOCUMENTS["ingest"])}
    assert ingest_ids[("POST", "/v1/events")] == "postEvents"


def test_a_route_name_becomes_camel_case() -> None:
    route = APIRouter()
    route.add_api_route("/x", lambda: None, name="list_dead_letters")
    assert operation_id(route.routes[0]) == "listDeadLetters"


def test_two_routes_with_one_operation_id_fail_the_document() -> None:
    router = APIRouter()
    router.add_api_route("/a", lambda: None, operation_id="same")
    router.add_api_route("/b", lambda: None, operation_id="same")
    app = create_app("dup", checks=[], routers=[router])
    # FastAPI only warns; the document refuses to be built
    with (
        pytest.warns(UserWarning, match="Duplicate Operation ID same"),
        pytest.raises(ValueError, match="'same' is used by GET /a and GET /b"),
    ):
        app.openapi()


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_every_error_answer_is_documented_as_problem_json(service: str) -> None:
    document = DOCUMENTS[service]
    assert "Problem" in document["components"]["schemas"]
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if status[0] in "45":
                assert response["content"] == PROBLEM_CONTENT, (method, path, status)
        if path not in ("/health", "/metrics"):
            assert "503" in operation["responses"], (method, path)
        for requirement in operation.get("security", []):
            if "HTTPBearer" in requirement:
                assert {"401", "403"} <= set(operation["responses"]), (method, path)


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_metrics_are_documented_as_prometheus_text(service: str) -> None:
    answer = DOCUMENTS[service]["paths"]["/metrics"]["get"]["responses"]["200"]
    assert answer["content"] == {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}


def test_the_events_body_is_one_envelope_per_event_type_or_a_batch() -> None:
    body = DOCUMENTS["ingest"]["paths"]["/v1/events"]["post"]["requestBody"]
    schemas = DOCUMENTS["ingest"]["components"]["schemas"]
    branches = schemas["CloudEvent"]["oneOf"]
    assert len(branches) == len(INBOUND)
    assert {b["properties"]["type"]["const"].rsplit(".", 2)[-2:][0] for b in branches}
    assert schemas["CloudEventBatch"]["items"] == {"$ref": "#/components/schemas/CloudEvent"}
    assert set(body["content"]) == {
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/json",
    }


async def test_ready_names_the_dependency_without_the_exception_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def database() -> None:
        raise OSError("connect to db.internal:5432 as winback_admin refused")

    async def kafka() -> None:
        raise NotStarted("start-up is waiting for kafka: broker-7:9092 refused", "waiting")

    app = create_app("ready", checks=[("database", database), ("kafka", kafka)])
    with caplog.at_level(logging.WARNING, logger="shared.http.app"):
        async with serve(app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
            answer = await http.get("/ready")
    assert answer.status_code == 503
    assert answer.headers["content-type"] == PROBLEM
    problem = answer.json()
    assert problem["errors"] == [
        {"field": "database", "reason": "unreachable"},
        {"field": "kafka", "reason": "waiting"},
    ]
    assert "db.internal" not in answer.text
    assert "broker-7" not in answer.text
    # the log has what went wrong
    errors = {r.dependency: r.error for r in caplog.records if hasattr(r, "dependency")}  # type: ignore[attr-defined]
    assert "db.internal:5432" in errors["database"]
    assert "broker-7" in errors["kafka"]


async def test_requests_are_counted_by_route_template_and_status() -> None:
    router = APIRouter()

    @router.get("/v1/things/{thing_id}/winback", dependencies=[require_scope("read")])
    async def get_thing(thing_id: str) -> dict[str, str]:
        if thing_id == "missing":
            raise Problem(404, "Not found")
        return {"id": thing_id}

    app = create_app("metered", checks=[], routers=[router], api_keys=["k" * 20])
    route = "/v1/things/{thing_id}/winback"

    def count(method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        return REGISTRY.get_sample_value("winback_http_requests_total", labels) or 0.0

    def observed(method: str, route: str) -> float:
        labels = {"method": method, "route": route}
        return REGISTRY.get_sample_value("winback_http_request_duration_seconds_count", labels) or 0

    before = {s: count("GET", route, s) for s in ("200", "404", "401")}
    before_unmatched = count("GET", UNMATCHED, "404")
    before_timed = observed("GET", route)
    async with (
        serve(app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, headers={"authorization": "Bearer " + "k" * 20}) as http,
    ):
        for thing in ("a", "b", "c"):
            assert (await http.get(f"/v1/things/{thing}/winback")).status_code == 200
        assert (await http.get("/v1/things/missing/winback")).status_code == 404
        assert (await http.get(route.replace("{thing_id}", "x"), headers={})).status_code == 200
        assert (await http.get("/nowhere/at/all")).status_code == 404
        unauthorized = await http.get("/v1/things/a/winback", headers={"authorization": "x"})
        assert unauthorized.status_code == 401
        metrics = (await http.get("/metrics")).text
    assert count("GET", route, "200") - before["200"] == 4
    assert count("GET", route, "404") - before["404"] == 1
    assert count("GET", route, "401") - before["401"] == 1
    assert count("GET", UNMATCHED, "404") - before_unmatched == 1
    assert observed("GET", route) - before_timed == 6
    # one series per template: the raw paths never become labels
    assert not re.search(r'route="/v1/things/(a|b|c|missing)/', metrics)
    assert 'winback_http_requests_total{method="GET",route="/v1/things/{thing_id}/winback"' in (
        metrics
    )


@pytest.mark.parametrize(
    "media_type",
    ["application/cloudevents+json", "application/cloudevents-batch+json", "application/json"],
)
def test_each_events_example_fits_the_documented_body(media_type: str) -> None:
    document = DOCUMENTS["ingest"]
    content = document["paths"]["/v1/events"]["post"]["requestBody"]["content"][media_type]
    schema = {**content["schema"], "components": document["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    examples = content["examples"]
    singles = [e["value"] for e in examples.values() if isinstance(e["value"], dict)]
    if media_type != "application/cloudevents-batch+json":
        prefix = load_settings(environment="test").ingest.event_type_prefix
        assert sorted(e["type"] for e in singles) == sorted(f"{prefix}.{n}" for n in INBOUND)
    for name, example in examples.items():
        errors = [e.message for e in validator.iter_errors(example["value"])]
        assert errors == [], (name, errors)


def test_api_keys_from_the_environment_plain_or_with_scopes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WINBACK_HTTP__API_KEYS", "first-key, second-key")
    plain = load_settings(environment="test").http.api_keys
    assert [k.key.get_secret_value() for k in plain] == ["first-key", "second-key"]
    assert all(k.scopes == ["ingest", "read", "operate", "erase"] for k in plain)
    monkeypatch.setenv(
        "WINBACK_HTTP__API_KEYS",
        '[{"key": "reader-key", "scopes": ["read"]},'
        ' {"key": "ops", "scopes": ["read", "operate"]}]',
    )
    scoped = load_settings(environment="test").http.api_keys
    assert [(k.key.get_secret_value(), k.scopes) for k in scoped] == [
        ("reader-key", ["read"]),
        ("ops", ["read", "operate"]),
    ]
    monkeypatch.setenv("WINBACK_HTTP__API_KEYS", '[{"key": "k", "scopes": ["admin"]}]')
    with pytest.raises(ConfigError, match=r"http\.api_keys"):
        load_settings(environment="test")


def test_a_route_cannot_ask_for_a_scope_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="unknown scope 'admin'"):
        require_scope("admin")


async def test_a_dependency_unreachable_mid_request_is_503_problem_json_not_500() -> None:
    router = APIRouter()

    @router.get("/v1/down")
    async def down() -> None:
        raise ConnectionRefusedError("connect to db.internal:5432 refused")

    app = create_app("outage", checks=[], routers=[router])
    async with serve(app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.get("/v1/down")
    assert answer.status_code == 503
    assert answer.headers["content-type"] == PROBLEM
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["type"] == "/problems/unavailable"
    assert "db.internal" not in answer.text


# routes with their own authentication (a provider's signature or credentials, the link token)
PUBLIC = re.compile(r"^/v1/(webhooks|billing)/|^/u/")


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_every_api_route_names_the_scope_it_needs(service: str) -> None:
    for method, path, operation in operations(DOCUMENTS[service]):
        if not path.startswith("/v1/") or PUBLIC.search(path):
            assert not any("HTTPBearer" in r for r in operation.get("security", [])), path
            continue
        [requirement] = operation["security"]
        [scope] = requirement["HTTPBearer"]
        assert scope in ("ingest", "read", "operate", "erase"), (method, path)
        assert f"`{scope}` scope" in operation["description"], (method, path)


@pytest.mark.parametrize("service", sorted(DOCUMENTS))
def test_every_tag_used_is_described(service: str) -> None:
    document = DOCUMENTS[service]
    used = {tag for _, _, operation in operations(document) for tag in operation["tags"]}
    described = {t["name"]: t.get("description") for t in document["tags"]}
    assert set(described) == used
    assert all(described.values()), described
