"""``winback simulate`` as an operator runs it: a child process configured by environment,
reading a known customer from the real database; the same answer as ``POST /v1/simulate``."""

from __future__ import annotations

import asyncio
import os
import sys

import httpx
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.settings import DEV_SECRET, Settings
from tests.integration.test_scheduler_flow import T0, cancellation, not_in_holdout, system
from tests.support.http import serve

pytestmark = pytest.mark.integration
AUTH = {"authorization": f"Bearer {DEV_SECRET}"}


async def winback_simulate(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_") and k != "NO_COLOR"}
    env |= {"WINBACK_DATABASE__URL": database_url, "WINBACK_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "simulate",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_winback_simulate_reads_a_known_customer_and_answers_as_the_api(
    settings: Settings, engine: AsyncEngine
) -> None:
    cid = not_in_holdout("cus_simc", "price_discount")
    window = ("--now", T0.isoformat(), "--until", "2026-03-20")
    async with system(settings, engine) as s:
        await s.send(cancellation(cid, T0))
        await s.case(cid)
        async with (
            serve(s.scheduler.app, lifespan="off") as url,
            httpx.AsyncClient(base_url=url, headers=AUTH) as http,
        ):
            body = {"customer_id": cid, "now": T0.isoformat(), "until": "2026-03-20"}
            api = (await http.post("/v1/simulate", json=body)).json()
        url_db = settings.database.url
        table = await winback_simulate(url_db, "--customer", cid, *window)
        as_json = await winback_simulate(url_db, "--customer", cid, *window, "--json")
        unknown = await winback_simulate(url_db, "--customer", "nobody")
        bad = await winback_simulate(url_db, "--customer", cid, "--from", "someday")
    down = await winback_simulate("postgresql+asyncpg://nobody@127.0.0.1:1/none", "--customer", cid)
    code, out, err = table
    assert code == 0, err
    assert f"customer   {cid} (known), timezone Europe/Helsinki" in out
    assert "playbook   price_discount v1" in out
    rows = [line.split()[0] for line in out.split("\n\n")[1].splitlines()[1:]]
    assert rows[:4] == [
        "d0_we_miss_you",
        "d3_what_you_missed",
        "d7_special_offer",
        "d14_last_chance",
    ]
    code, out, err = as_json
    assert code == 0, err
    assert orjson.loads(out) == api
    assert unknown[0] == 4
    assert "no customer nobody" in unknown[2]
    assert bad[0] == 2
    assert bad[2].startswith("winback simulate: from:")
    assert down[0] == 69
    assert "does not answer" in down[2]
