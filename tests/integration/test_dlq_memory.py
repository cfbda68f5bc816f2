"""Dead letters on the in-process bus that ``./scripts/run`` uses without a broker: ingest
dead-letters a poison record into the bus file; its HTTP API lists it while it runs; the
``winback dlq`` command refuses the file while it is held (one line, exit 69, pointing at the
API) and, once the bus is closed, lists it and redrives it into the file."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.bootstrap import bootstrap
from shared.messaging import dlq
from shared.messaging.memory import MemoryBus
from shared.messaging.transport import OutgoingRecord
from shared.settings import DEV_SECRET, Settings
from tests.support.http import serve
from tests.support.services import eventually, running

pytestmark = pytest.mark.integration


async def winback_dlq(settings: Settings, data_dir: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")}
    env |= {
        "WINBACK_KAFKA__BOOTSTRAP_SERVERS": "",
        "WINBACK_KAFKA__DATA_DIR": str(data_dir / "kafka"),
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


async def test_dead_letters_on_the_in_process_bus(
    settings: Settings, engine: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "bus.sqlite"  # where `winback run` keeps it: beside kafka.data_dir
    topic = settings.topics.inbound[0]
    poison = OutgoingRecord(topic, b"cus_1", b"{not json", (("content-type", b"text/plain"),))
    bus = MemoryBus(path)
    try:
        service = bootstrap(settings, engine=engine, transport=bus)
        async with (
            running(service.core.runtime),
            serve(service.app, lifespan="off") as url,
            httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {DEV_SECRET}"}
            ) as http,
        ):
            publisher = bus.publisher()
            await publisher.start()
            await publisher.publish([poison])
            await publisher.stop()
            reader = dlq.reader_for(bus)
            found = await eventually(
                lambda: dlq.scan(reader, settings.topics.dead_letter), lambda v: len(v) == 1
            )
            assert len(found) == 1
            listed = (await http.get("/v1/dead-letters")).json()
            assert [d["error_code"] for d in listed["dead_letters"]] == ["malformed_json"]
            letter_id = listed["dead_letters"][0]["id"]

            code, out, err = await winback_dlq(settings, tmp_path, "list")
            assert code == 69
            assert out == ""
            assert "held by a running `winback run`" in err
            assert "/v1/dead-letters" in err
            assert len(err.strip().splitlines()) == 1
    finally:
        bus.close()

    code, out, err = await winback_dlq(settings, tmp_path, "list", "--json")
    assert code == 0, err
    assert [d["id"] for d in orjson.loads(out)] == [letter_id]
    code, out, err = await winback_dlq(settings, tmp_path, "redrive", "--code", "malformed_json")
    assert code == 0, err
    assert out.splitlines()[-1] == "redriven 1, not redrivable 0, superseded 0, failed 0"

    bus = MemoryBus(path)
    try:
        records = await dlq.reader_for(bus).read(topic)
    finally:
        bus.close()
    assert len(records) == 2
    redriven = max(records, key=lambda r: r.offset)  # same key: same partition, after it
    assert (redriven.key, redriven.value) == (poison.key, poison.value)
    assert dict(redriven.headers) == {
        "content-type": b"text/plain",
        dlq.REDRIVE_OF: letter_id.encode(),
    }
