"""``winback billing backfill stripe`` as an operator runs it: a child process configured by
environment, against stripe-mock and the real broker; its summary, progress, checkpoint and
exit codes."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from shared.cloudevents import from_kafka
from shared.messaging.kafka import KafkaTransport
from shared.settings import Settings
from tests.support.kafka import read_all

pytestmark = pytest.mark.integration


async def winback_backfill(env: dict[str, str], *args: str, cache: Path) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")}
    base |= {"WINBACK_LOG_LEVEL": "WARNING", "WINBACK_CACHE_DIR": str(cache), **env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "billing",
        "backfill",
        *args,
        env=base,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def configured(settings: Settings, topic: str) -> dict[str, str]:
    return {
        "WINBACK_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "WINBACK_TOPICS__INBOUND": topic,
        "WINBACK_BILLING__STRIPE__API_KEY": "sk_test_123",
    }


async def test_the_command_publishes_shows_progress_and_remembers_a_finished_run(
    settings: Settings, stripe_mock: str, tmp_path: Path
) -> None:
    topic = settings.topics.inbound[0]
    await KafkaTransport(settings.kafka.bootstrap_servers).ensure_topics([topic], 1)
    env = configured(settings, topic)
    args = ("stripe", "--since", "2009-01-01", "--api-base", stripe_mock)
    code, out, err = await winback_backfill(env, *args, cache=tmp_path)
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"stripe: 1 canceled subscriptions read, 1 events published to {topic}; left alone: "
        "0 ended before 2009-01-01T00:00:00+00:00, 0 published by an earlier run, 0 customers "
        "active again, 0 not readable (logged)"
    )
    # not a terminal: a count line per page on stderr (with the total, a bar and the ETA)
    assert "backfill stripe [" in err
    assert "1/1 1 published, 0 skipped" in err
    [checkpoint] = (tmp_path / "backfill").iterdir()
    assert checkpoint.name.startswith("stripe-")
    assert "sk_test_123" not in checkpoint.name
    assert "sk_test_123" not in checkpoint.read_text()
    records = await read_all(settings.kafka.bootstrap_servers, topic, 1)
    [event] = [from_kafka(r.value, r.headers) for r in records]
    assert event.id == "backfill:stripe:sub_1Pgc6rB7WZ01zgkWNy0Cn5nw:cancelled"

    # the finished run is remembered: the next publishes only what it did not
    code, out, err = await winback_backfill(env, *args, cache=tmp_path)
    assert code == 0, err
    assert "0 events published" in out
    assert "1 published by an earlier run" in out
    assert "--restart publishes those again" in out
    code, out, err = await winback_backfill(env, *args, "--restart", cache=tmp_path)
    assert code == 0, err
    assert "1 events published" in out
    records = await read_all(settings.kafka.bootstrap_servers, topic, 2)
    assert {from_kafka(r.value, r.headers).id for r in records} == {event.id}


async def test_what_can_never_work_is_exit_2_and_an_absent_broker_69(
    settings: Settings, stripe_mock: str, tmp_path: Path
) -> None:
    topic = settings.topics.inbound[0]
    env = configured(settings, topic)
    args = ("--since", "2025-11-01", "--api-base", stripe_mock)

    no_key = {**env, "WINBACK_BILLING__STRIPE__API_KEY": ""}
    code, _, err = await winback_backfill(no_key, "stripe", *args, cache=tmp_path)
    assert code == 2
    assert err.strip() == (
        "winback: billing.stripe.api_key (WINBACK_BILLING__STRIPE__API_KEY) is not set"
    )

    bad_key = {**env, "WINBACK_BILLING__STRIPE__API_KEY": "sk_not_a_key_4242"}
    code, _, err = await winback_backfill(bad_key, "stripe", *args, cache=tmp_path)
    assert code == 2
    assert err.startswith("winback: billing backfill stripe: Stripe refused the API key: ")
    assert "sk_not_a_key_4242" not in err  # stripe-mock echoes the key; we do not
    assert len(err.strip().splitlines()) == 1

    code, _, err = await winback_backfill(env, "chargebee", *args, cache=tmp_path)
    assert code == 2
    assert "billing backfill chargebee: not available yet" in err

    code, _, err = await winback_backfill(env, "stripe", "--since", "soon", cache=tmp_path)
    assert code == 2
    assert "--since" in err

    nobody = {**env, "WINBACK_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    code, _, err = await winback_backfill(nobody, "stripe", *args, cache=tmp_path)
    assert code == 69, err
    assert err.strip().startswith("winback: billing backfill stripe: did not finish:")
    assert "Traceback" not in err
