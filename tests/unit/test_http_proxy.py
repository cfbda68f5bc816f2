"""Provider HTTP clients honour the proxy environment: with ``HTTPS_PROXY`` (or ``HTTP_PROXY``,
``ALL_PROXY``) set, the dispatcher gets httpx's own client, which sends through the proxy;
without, the pooled transport. Which one is logged once."""

from __future__ import annotations

import logging

import httpx
import pytest

from services.dispatcher import transport
from services.dispatcher.transport import PooledClient, provider_client

PROXY_VARIABLES = [
    *("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"),
    *("NO_PROXY", "no_proxy", "REQUEST_METHOD"),
]
TIMEOUT = httpx.Timeout(2.0)


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(transport, "_logged", set())
    return monkeypatch


async def test_without_a_proxy_the_pooled_transport_is_used(
    no_proxy_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=transport.__name__):
        first = provider_client(max_connections=2, timeout=TIMEOUT)
        second = provider_client(max_connections=2, timeout=TIMEOUT)
    assert isinstance(first, PooledClient)
    assert isinstance(second, PooledClient)
    chosen = [r for r in caplog.records if hasattr(r, "transport")]
    assert [r.transport for r in chosen] == ["pooled"]
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY"])
async def test_with_a_proxy_in_the_environment_httpx_transport_is_used(
    no_proxy_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str
) -> None:
    no_proxy_env.setenv(variable, "http://proxy.internal:3128")
    no_proxy_env.setenv("NO_PROXY", "localhost,.corp.internal")
    with caplog.at_level(logging.INFO, logger=transport.__name__):
        clients = [provider_client(max_connections=2, timeout=TIMEOUT) for _ in range(3)]
    assert not any(isinstance(c, PooledClient) for c in clients)
    chosen = [r for r in caplog.records if hasattr(r, "transport")]
    assert [r.transport for r in chosen] == ["httpx"]
    client = clients[0]
    # httpx routes a provider URL through the proxy and honours NO_PROXY
    proxied = client._transport_for_url(httpx.URL("https://api.sendgrid.com/v3/mail/send"))
    direct = client._transport_for_url(httpx.URL("https://smtp.corp.internal/send"))
    if variable.lower() == "http_proxy":  # an HTTP proxy only: https goes direct
        assert proxied is client._transport
    else:
        assert proxied is not client._transport
        assert isinstance(proxied, httpx.AsyncHTTPTransport)
    assert direct is client._transport
    for each in clients:
        await each.aclose()
