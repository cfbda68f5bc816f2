"""Dead letters on the real broker: the hostile-record corpus and two events of a type the
ingest is not configured for are dead-lettered by the real consumer; then, over real HTTP
(ingest's ``/v1/dead-letters``) and through the ``winback dlq`` command (a child process),
they are listed with filters, shown, and redriven:

- before the fix, a redrive goes back to the dead-letter topic once (a new dead letter that
  supersedes the old; nothing loops);
- after the fix (the type prefix configured), a redrive sends only the newest copies and they
  are handled once; a second redrive is absorbed by the inbox;
- the record stored truncated (too large for a whole copy) is reported as not redrivable."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.db.tables import churn_episodes, customers, outbox
from shared.errors import TransientError
from shared.messaging import dlq
from shared.messaging.kafka import KafkaTransport
from shared.messaging.kafka_read import KafkaTopicReader
from shared.settings import DEV_SECRET, Settings
from tests.support.corpus import (
    DEFAULT_OVERSIZE_BYTES,
    ValidRecord,
    hostile_records,
    produce_records,
)
from tests.support.http import serve
from tests.support.kafka import group_behind
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration

KEY = {"Authorization": f"Bearer {DEV_SECRET}"}
FIXED_PREFIX = "org.acme"


def misconfigured(n: int, tag: str) -> list[ValidRecord]:
    """Cancellations typed ``org.acme.…``: unknown to an ingest whose prefix is the default."""
    out = []
    for i in range(n):
        customer, event_id = f"{tag}-{i}", f"{tag}-event-{i}"
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": event_id,
            "source": "/billing/acme",
            "type": f"{FIXED_PREFIX}.subscription.cancelled",
            "time": "2026-11-20T10:00:00Z",
            "datacontenttype": "application/json",
            "data": {"customer_id": customer, "reason": "too_expensive"},
        }
        out.append(
            ValidRecord(
                customer,
                customer.encode(),
                orjson.dumps(event),
                (("content-type", b"application/cloudevents+json"),),
                customer,
                event_id,
            )
        )
    return out


async def winback_dlq(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``winback dlq ARGS`` in a child process, configured by environment as an operator's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_") and k != "NO_COLOR"}
    env |= {
        "WINBACK_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "WINBACK_TOPICS__DEAD_LETTER": settings.topics.dead_letter,
        "WINBACK_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "dlq",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def settled(engine: AsyncEngine, settings: Settings, group: str) -> bool:
    """The group has committed to the end of both inbound topics and the outbox is drained:
    every effect of what was produced (episodes, dead letters) is written and published."""
    for topic in settings.topics.inbound:
        behind = await group_behind(
            settings.kafka.bootstrap_servers, group, topic, settings.topics.partitions
        )
        if behind:
            return False
    async with engine.connect() as conn:
        unpublished = await conn.scalar(
            select(func.count())
            .select_from(outbox)
            .where(outbox.c.published_at.is_(None), outbox.c.parked_at.is_(None))
        )
    return unpublished == 0


async def episodes_of(engine: AsyncEngine, ids: Sequence[str]) -> int:
    async with engine.connect() as conn:
        n = await conn.scalar(
            select(func.count())
            .select_from(churn_episodes)
            .where(churn_episodes.c.customer_id.in_(list(ids)))
        )
    return int(n or 0)


async def test_dead_letters_are_listed_shown_and_redriven_after_a_fix(
    settings: Settings, engine: AsyncEngine
) -> None:
    group = f"ingest-dlq-{uuid.uuid4().hex[:6]}"
    corpus_topic, other_topic = settings.topics.inbound
    dead_letter_topic = settings.topics.dead_letter
    hostile = hostile_records(
        max_event_bytes=settings.ingest.max_event_bytes, oversize_bytes=DEFAULT_OVERSIZE_BYTES
    )
    wrong_type = misconfigured(2, f"acme-{uuid.uuid4().hex[:6]}")
    wrong_ids = [r.customer_id for r in wrong_type]
    transport = KafkaTransport(settings.kafka.bootstrap_servers)
    reader = dlq.reader_for(transport)
    await transport.ensure_topics(
        [*settings.topics.inbound, dead_letter_topic], settings.topics.partitions
    )

    async def letters(**filters: Any) -> list[dlq.DeadLetter]:
        return await dlq.scan(reader, dead_letter_topic, dlq.filters_of(**filters))

    started = datetime.now(UTC)
    service = bootstrap(settings, engine=engine, group=group)
    async with (
        running(service.core.runtime),
        serve(service.app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url, headers=KEY, timeout=60) as http,
    ):
        await produce_records(settings.kafka.bootstrap_servers, corpus_topic, hostile)
        await produce_records(settings.kafka.bootstrap_servers, other_topic, wrong_type)
        total = len(hostile) + len(wrong_type)
        seen = await eventually(letters, lambda v: len(v) >= total, timeout=90)
        assert len(seen) == total

        # -- list, with filters -------------------------------------------------------------
        everything = (await http.get("/v1/dead-letters", params={"limit": 1000})).json()
        assert everything["matched"] == total
        listed = everything["dead_letters"]
        assert len(listed) == total
        times = [item["dead_lettered_at"] for item in listed]
        assert times == sorted(times, reverse=True)  # newest first
        codes = {h.code for h in hostile} | {"unknown_type"}
        assert {item["error_code"] for item in listed} == codes

        by_code = (await http.get("/v1/dead-letters", params={"code": "unknown_type"})).json()
        expected = sum(h.code == "unknown_type" for h in hostile) + len(wrong_type)
        assert by_code["matched"] == expected
        assert {i["error_code"] for i in by_code["dead_letters"]} == {"unknown_type"}

        two_codes = await http.get(
            "/v1/dead-letters", params=[("code", "unknown_type"), ("code", "malformed_json")]
        )
        assert two_codes.json()["matched"] == expected + sum(
            h.code == "malformed_json" for h in hostile
        )

        by_topic = (await http.get("/v1/dead-letters", params={"source_topic": other_topic})).json()
        assert by_topic["matched"] == len(wrong_type)
        originals = by_topic["dead_letters"]
        assert {i["source"]["topic"] for i in originals} == {other_topic}
        assert all(i["consumer"] == group and i["redrivable"] for i in originals)

        since = (started - timedelta(seconds=1)).isoformat()
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        in_range = await http.get("/v1/dead-letters", params={"since": since, "until": later})
        assert in_range.json()["matched"] == total
        before = await http.get("/v1/dead-letters", params={"until": since})
        assert before.json()["matched"] == 0
        after = await http.get("/v1/dead-letters", params={"since": later})
        assert after.json()["matched"] == 0
        assert (
            await http.get("/v1/dead-letters", params={"since": "yesterday"})
        ).status_code == 422

        # the same from a shell
        code, out, err = await winback_dlq(
            settings, "list", "--json", "--code", "unknown_type", "--source-topic", other_topic
        )
        assert code == 0, err
        assert sorted(i["id"] for i in orjson.loads(out)) == sorted(i["id"] for i in originals)
        code, out, err = await winback_dlq(settings, "list", "--source-topic", other_topic)
        assert code == 0, err
        table = out.splitlines()
        assert table[0].split()[:3] == ["ID", "DEAD-LETTERED", "(UTC)"]
        assert len(table) == 1 + len(wrong_type)
        assert f"{len(wrong_type)} dead letters on {dead_letter_topic}" in err

        # -- show ---------------------------------------------------------------------------
        one = originals[0]["id"]
        shown = await http.get(f"/v1/dead-letters/{one}")
        assert shown.status_code == 200
        detail = shown.json()
        produced = next(r for r in wrong_type if r.event_id in (detail["value"] or ""))
        assert detail["value"] == produced.value.decode()
        assert detail["key"] == produced.key.decode()
        assert detail["headers"] == [
            {
                "name": "content-type",
                "value": "application/cloudevents+json",
                "value_base64": "YXBwbGljYXRpb24vY2xvdWRldmVudHMranNvbg==",
            }
        ]
        assert detail["error_code"] == "unknown_type"
        assert detail["error_reason"]
        assert detail["dlq_headers"]["source-topic"] == other_topic
        code, out, err = await winback_dlq(settings, "show", one)
        assert code == 0, err
        assert "error:           unknown_type" in out
        assert produced.value.decode() in out

        missing = await http.get(f"/v1/dead-letters/{dead_letter_topic}:0:999999")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        other = await http.get(f"/v1/dead-letters/{corpus_topic}:0:0")  # not the DLQ: not shown
        assert other.status_code == 404
        malformed = await http.get("/v1/dead-letters/no-offsets-here")
        assert malformed.status_code == 422
        assert malformed.json()["errors"][0]["field"] == "path.letter_id"
        code, _, err = await winback_dlq(settings, "show", f"{dead_letter_topic}:0:999999")
        assert code == 4
        assert "no dead letter" in err

        # -- a dry run: the copy stored truncated cannot be redriven ------------------------
        dry = await http.post(
            "/v1/dead-letters/redrive", json={"filters": {"codes": ["oversize"]}, "dry_run": True}
        )
        assert dry.status_code == 200, dry.text
        report = dry.json()
        cut = [r for r in report["results"] if r["status"] == "not_redrivable"]
        assert len(cut) == 1
        assert "stored truncated" in cut[0]["detail"]
        assert str(DEFAULT_OVERSIZE_BYTES) in cut[0]["detail"]
        assert report["would_redrive"] == sum(h.code == "oversize" for h in hostile) - 1
        assert report["redriven"] == 0

        # -- redrive before the fix: back to the dead-letter topic once, no loop --------------
        first = await http.post(
            "/v1/dead-letters/redrive", json={"filters": {"source_topics": [other_topic]}}
        )
        assert first.json()["redriven"] == len(wrong_type)
        grown = await eventually(letters, lambda v: len(v) >= total + len(wrong_type))
        assert len(grown) == total + len(wrong_type)
        assert await eventually(lambda: settled(engine, settings, group), bool)
        assert len(await letters()) == total + len(wrong_type)  # and no more: nothing loops
        again = await letters(source_topics=[other_topic])
        newer = [x for x in again if x.redrive_of is not None]
        older = [x for x in again if x.redrive_of is None]
        assert {x.redrive_of for x in newer} == {x.id for x in older}
        assert {x.superseded_by for x in older} == {x.id for x in newer}
        assert await episodes_of(engine, wrong_ids) == 0

    # -- the fix: ingest configured for the org.acme types ---------------------------------
    fixed = settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"event_type_prefix": FIXED_PREFIX})}
    )
    service = bootstrap(fixed, engine=engine, group=group)
    async with running(service.core.runtime):
        code, out, err = await winback_dlq(settings, "redrive", "--source-topic", other_topic)
        assert code == 0, err
        summary = out.splitlines()[-1]
        assert summary == (
            f"redriven {len(wrong_type)}, not redrivable 0, superseded {len(wrong_type)}, failed 0"
        )
        assert "redriving: 2/2 published" in err  # not a terminal: counts, not a bar
        handled = await eventually(
            lambda: episodes_of(engine, wrong_ids), lambda n: n >= len(wrong_type)
        )
        assert handled == len(wrong_type)

        # a second redrive of the fixed records: duplicates the inbox absorbs
        code, out, err = await winback_dlq(settings, "redrive", "--source-topic", other_topic)
        assert code == 0, err
        assert out.splitlines()[-1].startswith(f"redriven {len(wrong_type)},")
        await eventually(
            lambda: group_behind(
                settings.kafka.bootstrap_servers, group, other_topic, settings.topics.partitions
            ),
            lambda behind: not behind,
        )
        assert await eventually(lambda: settled(engine, settings, group), bool)
    assert await episodes_of(engine, wrong_ids) == len(wrong_type)
    async with engine.connect() as conn:
        stored = set(
            (
                await conn.execute(select(customers.c.id).where(customers.c.id.in_(wrong_ids)))
            ).scalars()
        )
    assert stored == set(wrong_ids)
    assert len(await letters()) == total + len(wrong_type)  # nothing new dead-lettered


async def test_the_dead_letter_api_needs_the_api_key(
    settings: Settings, engine: AsyncEngine
) -> None:
    service = bootstrap(settings, engine=engine)
    async with (
        serve(service.app, lifespan="off") as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        listing = await http.get("/v1/dead-letters")
        redrive = await http.post("/v1/dead-letters/redrive", json={"dry_run": True})
        empty = await http.get("/v1/dead-letters", headers=KEY)
        unknown_field = await http.post(
            "/v1/dead-letters/redrive", headers=KEY, json={"filters": {"code": ["x"]}}
        )
        not_a_flag = await http.post("/v1/dead-letters/redrive", headers=KEY, json={"dry_run": 0})
        get_redrive = await http.get("/v1/dead-letters/redrive", headers=KEY)
    assert listing.status_code == 401
    assert redrive.status_code == 401
    assert listing.headers["content-type"] == "application/problem+json"
    assert empty.status_code == 200
    assert empty.json() == {"dead_letters": [], "matched": 0}  # no such topic yet: none
    assert unknown_field.status_code == 422
    assert unknown_field.json()["errors"][0]["field"] == "filters.code"
    assert not_a_flag.status_code == 422
    assert get_redrive.status_code == 405
    assert get_redrive.headers["allow"] == "POST"

    paths = service.app.openapi()["paths"]
    operations = {
        ("/v1/dead-letters", "get"): "listDeadLetters",
        ("/v1/dead-letters/{letter_id}", "get"): "getDeadLetter",
        ("/v1/dead-letters/redrive", "post"): "redriveDeadLetters",
    }
    for (path, method), operation_id in operations.items():
        operation = paths[path][method]
        assert operation["operationId"] == operation_id
        for status in ("401", "422", "503"):
            assert "application/problem+json" in operation["responses"][status]["content"]
    assert "get" not in paths["/v1/dead-letters/redrive"]


async def test_a_read_that_cannot_finish_is_a_transient_error(settings: Settings) -> None:
    """The HTTP routes answer it with a 503 and the command with exit code 69, not a crash."""
    transport = KafkaTransport(settings.kafka.bootstrap_servers)
    await transport.ensure_topics([settings.topics.dead_letter], 1)
    reader = KafkaTopicReader(settings.kafka.bootstrap_servers, timeout=0)
    with pytest.raises(TransientError, match="did not reach its end within 0 s"):
        await reader.read(settings.topics.dead_letter)
    with pytest.raises(TransientError, match="did not reach its end"):
        await reader.read_one(settings.topics.dead_letter, 0, 0)
