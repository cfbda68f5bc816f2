"""The fake provider (``tests.fakes.provider_server``) as a process of its own, for the fault
suite: ``python -m tests.faults.provider [LATENCY]`` (seconds it waits before each answer,
default 0).

It prints ``{"port": N}`` on a line when it listens; each ``stats`` line on stdin is answered
with one JSON line: requests per idempotency key (every request, and the accepted first-time
sends), requests without a key and the answers by status. End of input stops it.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

import orjson

from tests.fakes.provider_server import PROVIDERS, FakeProviderServer


def stats(server: FakeProviderServer) -> dict[str, object]:
    requests = [r for r in server.requests if r.provider is not None]
    return {
        "requests": Counter(r.idempotency_key for r in requests if r.idempotency_key),
        "accepted": Counter(r.idempotency_key for r in server.accepted() if r.idempotency_key),
        "without_key": sum(1 for r in requests if not r.idempotency_key),
        "statuses": Counter(str(r.status) for r in server.requests),
    }


async def serve(latency: float) -> None:
    async with FakeProviderServer(keep_bodies=False) as server:
        for provider in PROVIDERS:
            server.set_latency(provider, latency)
        print(orjson.dumps({"port": server.port}).decode(), flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)) != "":
            if line.strip() == "stats":
                print(orjson.dumps(stats(server)).decode(), flush=True)


if __name__ == "__main__":
    asyncio.run(serve(float(sys.argv[1]) if len(sys.argv) > 1 else 0.0))
