"""Bearer API keys with scopes.

A key has one or more scopes: ``ingest`` (submit events), ``read`` (status, cases, reports,
message log), ``operate`` (pause/resume/cancel cases, playbook migrations, dead-letter redrive)
and ``erase`` (GDPR erasure). Each route declares the scope it needs with
``dependencies=[require_scope("read")]``; the keys are the app's (``create_app(api_keys=...)``
puts a ``KeyRing`` in ``app.state``). No key, or a key the ring does not know: 401. A known key
without the scope: 403 naming the scope. The OpenAPI document shows each operation's scope as
the role of its ``HTTPBearer`` security requirement."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Annotated, Any, Final

from fastapi import Depends, FastAPI, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from pydantic import SecretStr

from shared.http.problems import Problem
from shared.settings import API_SCOPES, ApiKey

SCOPES: Final = API_SCOPES
SCOPE_DESCRIPTIONS: Final = {
    "ingest": "submit events (POST /v1/events)",
    "read": "read status, cases, reports and message logs",
    "operate": "pause, resume and cancel cases; migrate playbooks; redrive dead letters",
    "erase": "erase a customer's personal data (GDPR)",
}
SCHEME: Final = "HTTPBearer"

_bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <API key>`. Each operation names the scope its key "
    "needs (ingest, read, operate, erase).",
)


class KeyRing:
    """The known keys and their scopes; a lookup compares against every key in constant
    time (no early exit that would tell a near miss from a far one)."""

    def __init__(self, keys: Iterable[ApiKey | SecretStr | str]) -> None:
        self._keys: list[tuple[bytes, frozenset[str]]] = []
        for key in keys:
            entry = key if isinstance(key, ApiKey) else ApiKey.model_validate(key)
            self._keys.append((entry.key.get_secret_value().encode(), frozenset(entry.scopes)))

    def scopes_of(self, given: str) -> frozenset[str] | None:
        """The scopes of ``given``; ``None`` for a key the ring does not know."""
        token = given.encode()
        found: frozenset[str] | None = None
        for secret, scopes in self._keys:
            if hmac.compare_digest(token, secret):
                found = scopes
        return found


def install_keys(app: FastAPI, keys: Iterable[ApiKey | SecretStr | str]) -> None:
    app.state.key_ring = KeyRing(keys)


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        "Unauthorized",
        detail,
        type="/problems/unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _authorize(
    request: Request,
    security: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("a bearer token is required")
    ring: KeyRing | None = getattr(request.app.state, "key_ring", None)
    scopes = ring.scopes_of(credentials.credentials) if ring is not None else None
    if scopes is None:
        raise _unauthorized("the bearer token is not a known API key")
    missing = [scope for scope in security.scopes if scope not in scopes]
    if missing:
        raise Problem(
            403,
            "Forbidden",
            f"the API key lacks the scope {missing[0]!r}",
            type="/problems/missing-scope",
            errors=[{"field": "scope", "reason": f"needs {missing[0]}", "code": "missing_scope"}],
        )


def require_scope(scope: str) -> Any:
    """A route dependency: a bearer key with ``scope``. Use as
    ``dependencies=[require_scope("read")]``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: one of {', '.join(SCOPES)}")
    return Security(_authorize, scopes=[scope])


def scope_sentence(scope: str) -> str:
    """The sentence each operation's description carries about its scope."""
    return f"Needs an API key with the `{scope}` scope ({SCOPE_DESCRIPTIONS[scope]})."
