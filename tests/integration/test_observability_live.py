"""The dashboard and the alert rules, evaluated for real: a Prometheus (Debian package) scrapes
the three running services; every panel query and every alert expression runs through its
HTTP API; any error, or any metric name no service exports, fails the test."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from services.dispatcher.bootstrap import bootstrap as dispatcher_bootstrap
from services.ingest.bootstrap import bootstrap as ingest_bootstrap
from services.scheduler.bootstrap import bootstrap as scheduler_bootstrap
from shared.clock import FrozenClock
from shared.settings import DEV_SECRET, Settings
from tests.integration.test_deploy_static import DASHBOARD_VARIABLES
from tests.integration.test_scheduler_flow import T0, cancellation, not_in_holdout
from tests.support.http import free_port, serve
from tests.support.kafka import produce
from tests.support.services import eventually

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
NAME = re.compile(r"\bwinback_[a-zA-Z0-9_:]+")
MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
# the dashboard's variables (job, namespace, instance), each "All"
VARIABLES = {f"${name}": ".*" for name in DASHBOARD_VARIABLES}


def panel_queries() -> Iterator[tuple[str, str]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                for macro, value in {**MACROS, **VARIABLES}.items():
                    expr = expr.replace(macro, value)
                yield panel.get("title", "?"), expr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_names(metrics_text: str) -> set[str]:
    """Sample names a service exposes, including families with no samples yet."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"),
            }.get(kind, ())
            names.update(name + s for s in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@asynccontextmanager
async def prometheus(targets: list[str], tmp: Path) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run scripts/ci-tools"
    port = free_port()
    (tmp / "alerts.yml").write_text(ALERTS.read_text())
    (tmp / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp / "alerts.yml")],
                "scrape_configs": [
                    {"job_name": "winback", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    log = (tmp / "prometheus.log").open("wb")
    process = subprocess.Popen(  # noqa: ASYNC220 - starting it is quick; it runs on its own
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(300):
                if process.poll() is not None:
                    break
                try:
                    if (await http.get("/-/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        assert process.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


async def test_every_panel_query_and_alert_expression_evaluates_on_the_running_services(
    settings: Settings, engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the file provider writes under ./.winback/messages
    clock = FrozenClock(T0)
    services: list[Any] = [
        ingest_bootstrap(settings, engine=engine, clock=clock),
        scheduler_bootstrap(settings, engine=engine, clock=clock),
        dispatcher_bootstrap(settings, engine=engine, clock=clock),
    ]
    cid = not_in_holdout("cus_obs", "price_discount")
    async with AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve(s.app)) for s in services]
        # some traffic, so counters and histograms have samples: a churn that fires a step,
        # and a poison record that is dead-lettered
        await produce(
            settings.kafka.bootstrap_servers,
            settings.topics.inbound[0],
            [
                (
                    cid.encode(),
                    json.dumps(cancellation(cid, T0)).encode(),
                    [("content-type", b"application/cloudevents+json")],
                ),
                (b"poison", b"{not json", [("content-type", b"application/cloudevents+json")]),
            ],
        )
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {DEV_SECRET}"}) as http:

            async def dispatched() -> str:
                return (await http.get(f"{urls[2]}/metrics")).text

            await eventually(
                dispatched, lambda t: "winback_dispatcher_messages_total{" in t, timeout=60
            )
            exported: set[str] = set()
            for url in urls:
                exported |= exported_names((await http.get(f"{url}/metrics")).text)
            targets = [u.removeprefix("http://") for u in urls]
            async with prometheus(targets, tmp_path) as prom:

                async def scraped() -> list[dict[str, Any]]:
                    body = (await http.get(f"{prom}/api/v1/targets")).json()
                    return list(body["data"]["activeTargets"])

                active = await eventually(
                    scraped,
                    lambda ts: len(ts) == 3 and all(t["health"] == "up" for t in ts),
                    timeout=30,
                )
                assert [t["health"] for t in active] == ["up"] * 3

                async def fewest_samples() -> float:
                    """The fewest scrapes Prometheus holds of any target (rate() needs two)."""
                    query = {"query": 'min(count_over_time(up{job="winback"}[5m]))'}
                    result = (await http.get(f"{prom}/api/v1/query", params=query)).json()
                    samples = result["data"]["result"]
                    return float(samples[0]["value"][1]) if samples else 0.0

                assert await eventually(fewest_samples, lambda n: n >= 2, timeout=30) >= 2

                failures: list[str] = []
                checked = 0
                queries = list(panel_queries()) + [
                    (f"alert {r['alert']}", r["expr"]) for r in alert_rules()
                ]
                for title, expr in queries:
                    unknown = set(NAME.findall(expr)) - exported
                    if unknown:
                        failures.append(f"{title}: no service exports {sorted(unknown)}")
                    answer = (await http.get(f"{prom}/api/v1/query", params={"query": expr})).json()
                    if answer.get("status") != "success":
                        failures.append(f"{title}: {answer.get('error')} in {expr}")
                    checked += 1

                async def rules() -> list[dict[str, Any]]:
                    body = (await http.get(f"{prom}/api/v1/rules")).json()
                    return [r for g in body["data"]["groups"] for r in g["rules"]]

                evaluated = await eventually(
                    rules,
                    lambda rs: (
                        bool(rs)
                        and all(
                            r.get("lastEvaluation", "").startswith("20")
                            and not r["lastEvaluation"].startswith("0001")
                            for r in rs
                        )
                    ),
                    timeout=20,
                )
    assert failures == []
    assert checked == len(queries) > 30
    assert len(evaluated) == len(alert_rules())
    assert [r["name"] for r in evaluated if r["health"] != "ok"] == []
