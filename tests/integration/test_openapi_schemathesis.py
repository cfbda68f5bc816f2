"""Schemathesis against the three services' OpenAPI documents: every documented operation,
with generated requests (valid and invalid), on the real apps served by uvicorn on loopback
with the real PostgreSQL and Kafka. No server error, and every answer conforms to the
document: its status code is documented, its content type and body match the schema.

The services run in a thread of their own with their own event loop: Schemathesis calls
them synchronously from the test, as an outside client would. Generation is derandomized
with a bounded number of examples per operation, so a run is the same every time."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from schemathesis.config import SchemathesisConfig

from services.dispatcher import bootstrap as dispatcher
from services.dispatcher.signatures import (
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    TWILIO_SIGNATURE_HEADER,
    UnsubscribeTokens,
    twilio_signature,
)
from services.ingest import bootstrap as ingest
from services.scheduler import bootstrap as scheduler
from shared.clock import SystemClock
from shared.runtime import Runtime
from shared.settings import DEV_SECRET, DEV_UNSUBSCRIBE_KEY, Settings, load_settings
from tests.support.http import free_port
from tests.support.kafka import cloudevent

pytestmark = pytest.mark.integration
T = TypeVar("T")

MAX_EXAMPLES = 20
BATCH_LIMIT = 5
SEED = 20_260_509
BEARER = {"Authorization": f"Bearer {DEV_SECRET}"}
POSTMARK = ("postmark-hooks", "postmark-hook-password")
CUSTOMER = "schemathesis-customer"
SEEDED_CASE = "00000000-0000-4000-8000-00000000c0de"
TWILIO_TOKEN = "twilio-auth-token-for-schemathesis"


@dataclass
class Stack:
    """The three services, each a real uvicorn on a free loopback port, in one thread."""

    settings: Settings
    urls: dict[str, str] = field(default_factory=dict)
    case_id: str | None = None
    runtimes: list[Runtime] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _failed: list[BaseException] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> Stack:
        self._thread = threading.Thread(target=self._run, name="schemathesis-services")
        self._thread.start()
        if not self._ready.wait(120) or self._failed:
            self.__exit__()
            raise RuntimeError(f"the services did not start: {self._failed!r}")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)

    def call(self, work: Callable[[], Coroutine[Any, Any, T]], timeout: float = 120) -> T:
        """Run ``work`` in the services' event loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work(), self._loop).result(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._failed.append(exc)
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ing = ingest.bootstrap(self.settings)
        sch = scheduler.bootstrap(self.settings)
        dis = dispatcher.bootstrap(self.settings)
        apps: dict[str, FastAPI] = {"ingest": ing.app, "scheduler": sch.app, "dispatcher": dis.app}
        servers: list[uvicorn.Server] = []  # off the main thread: no signal handlers
        # consumers, relays and timers run only while the test seeds (``call``): Hypothesis
        # refuses to generate while another thread draws from ``random`` (aiokafka does)
        self.runtimes = [ing.core.runtime, sch.core.runtime]
        for name, app in apps.items():
            port = free_port()
            config = uvicorn.Config(
                app, host="127.0.0.1", port=port, log_config=None, lifespan="off"
            )
            servers.append(uvicorn.Server(config))
            self.urls[name] = f"http://127.0.0.1:{port}"
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        try:
            while not all(s.started for s in servers):
                for task in tasks:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.02)
            self._ready.set()
            await self._stop.wait()
        finally:
            for server in servers:
                server.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            await dis.aclose()
            for core in (ing.core, sch.core, dis.core):
                await core.engine.dispose()


SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())


def _settings(database_url: str, kafka: str) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    public = SENDGRID_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return load_settings(
        environment="test",
        database={"url": database_url, "pool_size": 4},
        kafka={"bootstrap_servers": kafka},
        # the document says maxItems: the coverage phase sends a batch of exactly that many
        ingest={"http_batch_limit": BATCH_LIMIT},
        topics={
            "inbound": [f"billing-{suffix}"],
            "domain": f"domain-{suffix}",
            "dispatch": f"dispatch-{suffix}",
            "outcomes": f"outcomes-{suffix}",
            "dead_letter": f"dlq-{suffix}",
            "partitions": 1,
        },
        dispatcher={
            "webhooks": {
                "sendgrid_public_key": base64.b64encode(public).decode(),
                "twilio_auth_token": TWILIO_TOKEN,
                "postmark_username": POSTMARK[0],
                "postmark_password": POSTMARK[1],
            }
        },
    )


def _documents() -> tuple[dict[str, dict[str, Any]], str]:
    """The OpenAPI documents, from the same bootstrap the servers run (Schemathesis makes its
    tests at collection; nothing connects here; the test checks the servers serve these),
    and the name of a playbook they load."""
    settings = _settings("postgresql+asyncpg://unused@127.0.0.1:9/unused", "127.0.0.1:9")
    sch = scheduler.bootstrap(settings)
    documents = {
        "ingest": ingest.bootstrap(settings).app.openapi(),
        "scheduler": sch.app.openapi(),
        "dispatcher": dispatcher.bootstrap(settings).app.openapi(),
    }
    return documents, sch.playbooks[0].name


DOCUMENTS, PLAYBOOK = _documents()
# Schema-valid requests that the API may still refuse with 422, because the rule is not
# one JSON Schema can state: an event time in the future, a phone number that does not exist,
# an unknown IANA zone (POST /v1/events); a cursor this API did not issue or a window no
# playbook has (GET /v1/cases); "to" before "from" (reports); a migration to the version the
# cases are on. Everywhere else a schema-valid request must not get a 4xx other than these.
SEMANTIC_422 = [
    ("POST", "/v1/events"),
    ("GET", "/v1/cases"),
    ("GET", "/v1/reports/winback"),
    ("GET", "/v1/reports/messages"),
    ("POST", "/v1/playbooks/{name}/migrations"),
    ("POST", "/v1/simulate"),  # customer_id or profile; an IANA zone that exists; from <= until
]
# Operations that read their input leniently on purpose, so a request outside the schema can
# be accepted: provider webhooks (a field of an unexpected type is ignored, never a reason to
# lose the provider's event), the RFC 8058 one-click POST (200 whatever the body), and the
# event payloads (pydantic's lax mode: "5" for 5, a Unix time for a date-time).
LENIENT = [
    "POST /v1/events",
    "POST /v1/webhooks/sendgrid",
    "POST /v1/webhooks/postmark",
    "POST /v1/webhooks/twilio",
    "POST /u/{token}",
]
CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            "mode": "all",
            # the services ignore query parameters and headers they do not know (Twilio signs
            # its callback URL's own query; clients send tracing headers)
            "allow-extra-parameters": False,
        },
        "checks": {
            # 413 (a batch over the limit, a body too large) rejects invalid data too
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428]
            }
        },
        "operations": [
            *(
                {"include-name": name, "checks": {"negative_data_rejection": {"enabled": False}}}
                for name in LENIENT
            ),
            {
                "include-name": "POST /v1/events",
                # its coverage phase alone is some 9,000 requests (every boundary of every
                # attribute of ten event types in three content types): fuzz it instead
                "phases": {"coverage": {"enabled": False}},
                "generation": {"max-examples": 5 * MAX_EXAMPLES},
            },
            *(
                {
                    # by name: include-method and include-path together match either
                    "include-name": f"{method} {path}",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", 401, 403, 404, 409, 422]
                        }
                    },
                }
                for method, path in SEMANTIC_422
            ),
        ],
        "request-timeout": 30,
    }
)
ingest_api = schemathesis.openapi.from_dict(DOCUMENTS["ingest"], config=CONFIG)
# a real unsubscribe link (the dispatcher's development key) as the token's example, so the
# page and the unsubscribe itself are exercised, not only the refusal of a forged token
TOKEN = UnsubscribeTokens([DEV_UNSUBSCRIBE_KEY.encode()], SystemClock()).issue(CUSTOMER, "email")


# path parameters that name something real, as examples: the seeded customer, its case
# (the id is known once the scheduler opened it: the test puts it in place of SEEDED_CASE),
# a loaded playbook, a valid unsubscribe link
EXAMPLES = {"customer_id": CUSTOMER, "case_id": SEEDED_CASE, "name": PLAYBOOK, "token": TOKEN}


def _with_examples(document: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(document)
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in EXAMPLES:
                    parameter["example"] = EXAMPLES[parameter["name"]]
    return document


scheduler_api = schemathesis.openapi.from_dict(
    _with_examples(DOCUMENTS["scheduler"]), config=CONFIG
)
dispatcher_api = schemathesis.openapi.from_dict(
    _with_examples(DOCUMENTS["dispatcher"]), config=CONFIG
)


def _seed(running: Stack) -> str:
    """A churned customer, posted to ingest; returns the case the scheduler opened for it."""
    event = cloudevent(
        "subscription.cancelled",
        {
            "customer_id": CUSTOMER,
            "reason": "too_expensive",
            "customer": {"email": "seed@example.com", "timezone": "Europe/Helsinki"},
        },
    )
    with httpx.Client(headers=BEARER, timeout=30) as http:
        posted = http.post(f"{running.urls['ingest']}/v1/events", json=event)
        assert posted.status_code == 202, posted.text
        status = f"{running.urls['scheduler']}/v1/customers/{CUSTOMER}/winback"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until the scheduler has consumed it
            answer = http.get(status)
            if answer.status_code == 200 and answer.json()["open_case"]:
                return str(answer.json()["open_case"]["id"])
            time.sleep(0.2)
    raise AssertionError(f"the scheduler opened no case for {CUSTOMER}: {answer.text}")


@pytest.fixture(scope="module")
def stack(migrated_url: str, kafka_bootstrap: str) -> Iterator[Stack]:
    with Stack(_settings(migrated_url, kafka_bootstrap)) as running:
        for name, document in DOCUMENTS.items():
            served = httpx.get(f"{running.urls[name]}/openapi.json", timeout=30).json()
            assert served == document, f"{name} serves another OpenAPI document"
        # the seeded customer goes from ingest to the scheduler over Kafka, as in production
        for runtime in running.runtimes:
            running.call(runtime.start)
        try:
            running.case_id = _seed(running)
        finally:
            for runtime in running.runtimes:
                running.call(runtime.stop)
        yield running


@ingest_api.parametrize()
def test_ingest_conforms_to_its_openapi(case: schemathesis.Case[Any], stack: Stack) -> None:
    case.call_and_validate(base_url=stack.urls["ingest"], headers=BEARER)


@scheduler_api.parametrize()
def test_scheduler_conforms_to_its_openapi(case: schemathesis.Case[Any], stack: Stack) -> None:
    if case.path_parameters and case.path_parameters.get("case_id") == SEEDED_CASE:
        assert stack.case_id is not None
        case.path_parameters["case_id"] = stack.case_id
    case.call_and_validate(base_url=stack.urls["scheduler"], headers=BEARER)


def _signed(case: schemathesis.Case[Any]) -> dict[str, Any]:
    """Sign a webhook request as its provider would, so the payload parsing and the pipeline
    behind the signature check are what gets exercised (the refusals are tested elsewhere).
    Returns the extra keyword arguments for the call."""
    path = case.operation.path
    if path == "/v1/webhooks/postmark":
        basic = base64.b64encode(":".join(POSTMARK).encode()).decode()
        return {"headers": {"Authorization": f"Basic {basic}"}}
    if path == "/v1/webhooks/sendgrid":
        try:
            body = json.dumps(case.body, allow_nan=False).encode()
        except (TypeError, ValueError):
            return {}
        timestamp = str(int(time.time()))
        signature = SENDGRID_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "data": body,
            "headers": {
                SENDGRID_SIGNATURE_HEADER: base64.b64encode(signature).decode(),
                SENDGRID_TIMESTAMP_HEADER: timestamp,
            },
        }
    if path == "/v1/webhooks/twilio" and isinstance(case.body, dict):
        pairs = [(k, v) for k, v in case.body.items() if isinstance(v, str)]
        if len(pairs) == len(case.body):
            url = "http://127.0.0.1:8083" + path  # the dispatcher's public_base_url
            signed = twilio_signature(TWILIO_TOKEN, url, pairs)
            return {"headers": {TWILIO_SIGNATURE_HEADER: signed}}
    return {}


@dispatcher_api.parametrize()
def test_dispatcher_conforms_to_its_openapi(case: schemathesis.Case[Any], stack: Stack) -> None:
    case.call_and_validate(base_url=stack.urls["dispatcher"], **_signed(case))
