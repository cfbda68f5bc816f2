"""``winback_build_info{version,python,implementation} 1`` on every service's /metrics."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from importlib import metadata

import httpx
import pytest

from shared.http.app import create_app
from tests.support.http import serve

BUILD_INFO = (
    f'winback_build_info{{implementation="{platform.python_implementation()}",'
    f'python="{platform.python_version()}",version="{metadata.version("winback")}"}} 1.0'
)


async def test_metrics_answer_with_the_build_info() -> None:
    import services.relay  # noqa: F401  (a service: it registers the shared metrics)

    app = create_app("build-info", checks=[])
    async with serve(app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as http:
        answer = await http.get("/metrics")
    assert answer.status_code == 200
    assert BUILD_INFO in answer.text.splitlines()


@pytest.mark.parametrize(
    "module",
    [
        "services.ingest.bootstrap",
        "services.scheduler.bootstrap",
        "services.dispatcher.bootstrap",
        "services.relay",
    ],
)
def test_every_service_registers_the_build_info(module: str) -> None:
    # a fresh process: what the service's own imports put in the registry /metrics serves
    code = (
        f"import {module}\n"
        "from prometheus_client import generate_latest\n"
        "print(generate_latest().decode())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = [line for line in proc.stdout.splitlines() if re.match(r"winback_build_info\b", line)]
    assert lines == [BUILD_INFO]
