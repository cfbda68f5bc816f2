"""The embedded default provider: each message becomes a file in a folder, nothing is sent.

- email → ``{directory}/email/{key}.eml``: a complete RFC 5322 message built with the stdlib
  ``email`` package (From, To, Subject, Date, Message-ID, ``List-Unsubscribe`` and
  ``List-Unsubscribe-Post``, our ``X-Winback-*`` tags; text and HTML as
  ``multipart/alternative``), readable by any mail client;
- sms → ``{directory}/sms/{key}.json``; crm → ``{directory}/crm/{key}.json`` (the task as it
  would go to a CRM); webhook → ``{directory}/webhook/{key}.json``.

Idempotent by construction: the file name comes from the idempotency key, a file that exists
is never written again, and the provider message id is the file's stem, so a resend after a
crash has no second effect. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Final

from services.dispatcher.errors import PermanentSendError
from services.dispatcher.providers.base import (
    OutboundMessage,
    SendResult,
    check_e164,
    check_email_address,
)
from services.dispatcher.rendering import Channel
from shared.clock import Clock, SystemClock

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
# CRLF line ends; long headers (an unsubscribe URL with its token) stay on one line rather
# than being folded before their first word (RFC 5322 allows lines up to 998 characters).
_POLICY: Final = SMTP.clone(max_line_length=998)
DEFAULT_FROM: Final = "winback@example.com"


def file_stem(idempotency_key: str) -> str:
    """A file name for a key: readable, safe on every file system, and collision-free."""
    readable = _UNSAFE.sub("_", idempotency_key)[:80].strip("._") or "message"
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


class FileProvider:
    """Writes messages of one channel into ``directory/{channel}/``."""

    def __init__(
        self,
        directory: Path,
        channel: Channel,
        *,
        from_address: str | None = None,
        from_name: str | None = None,
        name: str = "file",
        clock: Clock | None = None,
    ) -> None:
        self._dir = directory / channel.value
        self._channel = channel
        self._sender = from_address
        self._from = from_address or DEFAULT_FROM
        self._from_name = from_name
        self._name = name
        self._clock = clock or SystemClock()
        self._domain = self._from.rpartition("@")[2] or "winback.local"

    @property
    def name(self) -> str:
        return self._name

    @property
    def channel(self) -> Channel:
        return self._channel

    @property
    def folder(self) -> Path:
        return self._dir

    def path_for(self, idempotency_key: str) -> Path:
        suffix = ".eml" if self._channel is Channel.EMAIL else ".json"
        return self._dir / (file_stem(idempotency_key) + suffix)

    async def send(self, message: OutboundMessage) -> SendResult:
        """Write the message (unless a file for its key exists) and return the file's stem."""
        if self._channel is Channel.EMAIL:
            check_email_address(self._name, message.to)
        elif self._channel is Channel.SMS:
            check_e164(self._name, message.to)
        now = self._clock.now()
        return await asyncio.to_thread(self._write, message, now)

    def _write(self, message: OutboundMessage, now: datetime) -> SendResult:
        path = self.path_for(message.idempotency_key)
        result = SendResult(self._name, path.stem)
        if path.exists():
            return result
        data = self.render(message, now)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return result

    def render(self, message: OutboundMessage, now: datetime) -> bytes:
        """The file's bytes for ``message``."""
        if self._channel is Channel.EMAIL:
            return self.email(message, now).as_bytes()
        return json.dumps(self._document(message, now), ensure_ascii=False, indent=2).encode()

    def email(self, message: OutboundMessage, now: datetime) -> EmailMessage:
        """The message as an RFC 5322 email, with every header a provider would add."""
        content = message.content
        if content.subject is None:
            raise PermanentSendError(
                "email needs a subject", provider=self._name, error_code="no_subject"
            )
        mail = EmailMessage(policy=_POLICY)
        try:
            if self._from_name:
                mail["From"] = Address(self._from_name, addr_spec=self._from)
            else:
                mail["From"] = self._from
            mail["To"] = message.to
            mail["Subject"] = content.subject
        except (ValueError, IndexError) as exc:
            raise PermanentSendError(
                f"email headers cannot be built: {exc}",
                provider=self._name,
                error_code="invalid_header",
            ) from exc
        mail["Date"] = format_datetime(now)
        mail["Message-ID"] = f"<{file_stem(message.idempotency_key)}@{self._domain}>"
        for header, value in message.list_unsubscribe_headers().items():
            mail[header] = value
        mail["X-Winback-Idempotency-Key"] = message.idempotency_key
        for key, value in sorted(message.tags.items()):
            mail[f"X-Winback-{key.replace('_', '-').title()}"] = value
        mail["Content-Language"] = content.locale
        mail.set_content(content.text)
        if content.html is not None:
            mail.add_alternative(content.html, subtype="html")
        return mail

    def _document(self, message: OutboundMessage, now: datetime) -> dict[str, Any]:
        content = message.content
        document: dict[str, Any] = {
            "id": message.idempotency_key,
            "channel": self._channel.value,
            "written_at": now.isoformat(),
            "to": message.to,
            "template": content.template,
            "locale": content.locale,
            "tags": dict(message.tags),
        }
        if self._channel is Channel.SMS:
            document["from"] = self._sender
            document["body"] = content.text
        elif self._channel is Channel.CRM:
            task = message.crm_task
            if task is None:
                raise PermanentSendError(
                    "a CRM task needs owner and due date (crm_task)",
                    provider=self._name,
                    error_code="no_task_details",
                )
            document |= {
                "owner_id": task.owner_id,
                "due_at": task.due_at.isoformat(),
                "priority": task.priority,
                "type": task.task_type,
                "subject": content.subject,
                "body": content.text,
            }
        else:
            document |= {
                "subject": content.subject,
                "text": content.text,
                "html": content.html,
                "unsubscribe_url": message.unsubscribe_url,
            }
        return document
