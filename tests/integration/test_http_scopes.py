"""Scoped API keys over real HTTP: each route takes only a key with its scope (ingest, read,
operate, erase). No key or an unknown one: 401; a known key without the scope: 403 naming it;
a plain key (the single-key settings of before) has every scope."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from shared.settings import ApiKey, Settings
from tests.support.http import serve
from tests.support.kafka import cloudevent

pytestmark = pytest.mark.integration

KEYS = {scope: f"key-with-only-{scope}-scope" for scope in ("ingest", "read", "operate", "erase")}
LEGACY = "a-plain-key-has-every-scope"
NO_CASE = "00000000-0000-4000-8000-000000000000"


def with_keys(settings: Settings) -> Settings:
    keys = [ApiKey(key=SecretStr(key), scopes=[scope]) for scope, key in KEYS.items()]
    keys.append(ApiKey.model_validate(LEGACY))
    return settings.model_copy(update={"http": settings.http.model_copy(update={"api_keys": keys})})


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def refused_for_scope(answer: httpx.Response, scope: str) -> None:
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"] == "/problems/missing-scope"
    assert scope in problem["detail"]
    assert problem["errors"] == [
        {"field": "scope", "reason": f"needs {scope}", "code": "missing_scope"}
    ]


# (method, path, scope, what the right key gets: past the check, the route itself answers)
SCHEDULER_ROUTES: list[tuple[str, str, str, int]] = [
    ("GET", "/v1/cases", "read", 200),
    ("GET", "/v1/customers/nobody/winback", "read", 404),
    ("GET", "/v1/reports/messages", "read", 200),
    ("GET", "/v1/reports/winback", "read", 200),
    ("GET", "/v1/playbooks", "read", 200),
    ("POST", "/v1/simulate", "read", 422),  # past the check: no body
    ("POST", f"/v1/cases/{NO_CASE}/pause", "operate", 404),
    ("POST", f"/v1/cases/{NO_CASE}/resume", "operate", 404),
    ("POST", f"/v1/cases/{NO_CASE}/cancel", "operate", 404),
    ("DELETE", "/v1/customers/nobody", "erase", 404),
]


async def test_each_scheduler_route_takes_only_a_key_with_its_scope(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = scheduler_bootstrap(with_keys(settings), engine=engine)
    seen: list[tuple[str, str, str, int]] = []
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        for method, path, scope, expected in SCHEDULER_ROUTES:
            nobody = await http.request(method, path)
            assert nobody.status_code == 401, (path, nobody.text)
            assert nobody.headers["www-authenticate"] == "Bearer"
            assert nobody.headers["content-type"] == "application/problem+json"
            unknown = await http.request(method, path, headers=bearer("not-a-key-we-know"))
            assert unknown.status_code == 401, (path, unknown.text)
            for other, key in KEYS.items():
                answer = await http.request(method, path, headers=bearer(key))
                if other == scope:
                    assert answer.status_code == expected, (path, answer.text)
                else:
                    refused_for_scope(answer, scope)
                seen.append((method, path, other, answer.status_code))
            legacy = await http.request(method, path, headers=bearer(LEGACY))
            assert legacy.status_code == expected, (path, legacy.text)
    assert len(seen) == len(SCHEDULER_ROUTES) * len(KEYS)


async def test_the_migration_route_needs_the_operate_scope(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = scheduler_bootstrap(with_keys(settings), engine=engine)
    body = {"from_version": 1, "dry_run": True}
    path = f"/v1/playbooks/{service.playbooks[0].name}/migrations"
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        read = await http.post(path, json=body, headers=bearer(KEYS["read"]))
        operate = await http.post(path, json=body, headers=bearer(KEYS["operate"]))
    refused_for_scope(read, "operate")
    assert operate.status_code in (200, 422), operate.text  # past the check: the route's answer
    assert operate.status_code != 403


async def test_posting_events_needs_the_ingest_scope(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = ingest_bootstrap(with_keys(settings), engine=engine)
    event: dict[str, Any] = cloudevent(
        "subscription.cancelled",
        {"customer_id": "cus_scoped", "reason": "too_expensive", "customer": {"timezone": "UTC"}},
    )
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        nobody = await http.post("/v1/events", json=event)
        read = await http.post("/v1/events", json=event, headers=bearer(KEYS["read"]))
        erase = await http.post("/v1/events", json=event, headers=bearer(KEYS["erase"]))
        ingest = await http.post("/v1/events", json=event, headers=bearer(KEYS["ingest"]))
        legacy = await http.post("/v1/events", json=event, headers=bearer(LEGACY))
    assert nobody.status_code == 401
    refused_for_scope(read, "ingest")
    refused_for_scope(erase, "ingest")
    assert ingest.status_code == 202, ingest.text
    assert ingest.json() == {"accepted": 1, "duplicates": 0}
    assert legacy.status_code == 202, legacy.text
    assert legacy.json() == {"accepted": 0, "duplicates": 1}


async def test_the_openapi_documents_say_each_operations_scope(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = scheduler_bootstrap(with_keys(settings), engine=engine)
    async with serve(service.app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        document = (await http.get("/openapi.json")).json()
    documented = {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    for method, path, scope, _ in SCHEDULER_ROUTES:
        template = path.replace(NO_CASE, "{case_id}").replace("nobody", "{customer_id}")
        operation = documented[(method, template)]
        assert operation["security"] == [{"HTTPBearer": [scope]}], template
        assert f"Needs an API key with the `{scope}` scope" in operation["description"]
        for status in ("401", "403"):
            content = operation["responses"][status]["content"]
            assert content == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }
