"""The embedded default provider: each message becomes a file in a folder, nothing is sent.

- email → ``{directory}/email/{key}.eml``: a complete RFC 5322 message (From, To, Subject,
  Date, Message-ID, ``List-Unsubscribe`` and ``List-Unsubscribe-Post``, our ``X-Winback-*``
  tags, Content-Language; text and HTML as ``multipart/alternative``), readable by any mail
  client;
- sms → ``{directory}/sms/{key}.json``; crm → ``{directory}/crm/{key}.json`` (the task as it
  would go to a CRM); webhook → ``{directory}/webhook/{key}.json``.

Idempotent by construction: the file name comes from the idempotency key, a file that exists
is never written again, and the provider message id is the file's stem, so a resend after a
crash has no second effect. Atomic: each file is written under a temporary name in the same
folder and renamed into place, so a reader never sees half a file.

Cheap per message (it is the embedded default, and the end-to-end benchmark writes with it):

- the ``.eml`` is put together directly (``_Eml``) when every header is plain or a subject /
  display name that RFC 2047 encoded-words carry (UTF-8, base64, at most 75 characters
  each), and every body line fits 998 bytes: the bytes the stdlib ``email`` package would
  write, less its header parsing and folding machinery, which cost more than everything else
  here. Anything else — an address that is not a plain dot-atom, a control character, a line
  too long — goes through ``email.message.EmailMessage`` as before, which raises what it
  cannot encode. The From header is built once, by the stdlib;
- a folder is created on the first write into it (again if it disappears meanwhile), not per
  message;
- the files are written by one worker thread in batches: sends made in the same event-loop
  pass share one thread hand-off (measured in ``bench/dispatcher_bench.py --provider file``:
  a hand-off per message cost more CPU than writing the file; writing in the event loop
  would stall it on a slow disk).

A file that cannot be written is a ``TransientSendError`` (a full disk may clear), or a
``ProviderConfigurationError`` when the folder is not ours to write (permissions, read-only).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Final

import orjson

from services.dispatcher.errors import (
    PermanentSendError,
    ProviderConfigurationError,
    SendError,
    TransientSendError,
)
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
MAX_LINE: Final = 998
"""RFC 5322: a line is at most 998 octets, CRLF excluded."""


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
        self._suffix = ".eml" if channel is Channel.EMAIL else ".json"
        self._folder = Folder(self._dir)
        self._writer = BatchWriter()
        from_line = self._from_header() if channel is Channel.EMAIL else None
        self._eml = (
            _Eml(from_line, self._domain)
            if from_line is not None and _PLAIN_VALUE.fullmatch(self._domain)
            else None
        )

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
        return self._dir / (file_stem(idempotency_key) + self._suffix)

    async def send(self, message: OutboundMessage) -> SendResult:
        """Write the message (unless a file for its key exists) and return the file's stem."""
        if self._channel is Channel.EMAIL:
            check_email_address(self._name, message.to)
        elif self._channel is Channel.SMS:
            check_e164(self._name, message.to)
        stem = file_stem(message.idempotency_key)
        data = self.render(message, self._clock.now())
        try:
            await self._writer.write(self._folder, stem + self._suffix, data)
        except OSError as exc:
            raise self._write_error(exc) from exc
        return SendResult(self._name, stem)

    def render(self, message: OutboundMessage, now: datetime) -> bytes:
        """The file's bytes for ``message``."""
        if self._channel is Channel.EMAIL:
            if message.content.subject is None:
                raise PermanentSendError(
                    "email needs a subject", provider=self._name, error_code="no_subject"
                )
            fast = self._eml.render(message, now) if self._eml is not None else None
            return fast if fast is not None else self.email(message, now).as_bytes()
        return orjson.dumps(self._document(message, now), option=orjson.OPT_INDENT_2)

    def email(self, message: OutboundMessage, now: datetime) -> EmailMessage:
        """The message as an RFC 5322 email built with the stdlib ``email`` package, with every
        header a provider would add (the general path; ``render`` takes a direct one when it
        can)."""
        content = message.content
        if content.subject is None:
            raise PermanentSendError(
                "email needs a subject", provider=self._name, error_code="no_subject"
            )
        mail = EmailMessage(policy=_POLICY)
        try:
            mail["From"] = self._from_value()
            mail["To"] = message.to
            mail["Subject"] = content.subject
        except (ValueError, IndexError) as exc:
            raise self._header_error(exc) from exc
        mail["Date"] = format_datetime(now)
        mail["Message-ID"] = f"<{file_stem(message.idempotency_key)}@{self._domain}>"
        for header, value in message.list_unsubscribe_headers().items():
            mail[header] = value
        mail["X-Winback-Idempotency-Key"] = message.idempotency_key
        for key, value in sorted(message.tags.items()):
            mail[_tag_header(key)] = value
        mail.set_content(content.text)
        if content.html is not None:
            mail.add_alternative(content.html, subtype="html")
        # after the body: set_content clears the Content-* headers set before it
        mail["Content-Language"] = content.locale
        return mail

    def _from_value(self) -> Address | str:
        if self._from_name:
            return Address(self._from_name, addr_spec=self._from)
        return self._from

    def _from_header(self) -> bytes | None:
        """The From header line as the stdlib writes it (built once), or ``None`` when it
        cannot be built (each send then fails as the stdlib path does)."""
        mail = EmailMessage(policy=_POLICY)
        try:
            mail["From"] = self._from_value()
            return _POLICY.fold_binary("From", mail["From"])
        except (ValueError, IndexError):
            return None

    def _header_error(self, exc: Exception) -> PermanentSendError:
        return PermanentSendError(
            f"email headers cannot be built: {exc}",
            provider=self._name,
            error_code="invalid_header",
        )

    def _write_error(self, exc: OSError) -> SendError:
        reason = f"cannot write the message file: {exc.strerror or exc}"
        if isinstance(exc, PermissionError) or exc.errno in (
            errno.EROFS,
            errno.ENOTDIR,
            errno.EISDIR,
            errno.EEXIST,  # a file where the folder should be
        ):
            return ProviderConfigurationError(reason, provider=self._name)
        return TransientSendError(reason, provider=self._name)

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


def _tag_header(key: str) -> str:
    return f"X-Winback-{key.replace('_', '-').title()}"


# --- the .eml, put together directly --------------------------------------------------------

# A plain addr-spec: dot-atoms of printable ASCII on both sides (RFC 5322 3.4.1, no quoting,
# no domain literal): written as given, as the stdlib writes it.
_PLAIN_ADDRESS: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)
# A header value written as it is: printable ASCII, single spaces, no leading or trailing
# space, nothing that reads as an encoded-word.
_PLAIN_VALUE: Final = re.compile(r"(?!.*=\?)[!-~]+(?: [!-~]+)*")
# Characters no header may carry: C0 and C1 controls, DEL, and the Unicode line separators.
_NOT_IN_HEADER: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_WORD_BYTES: Final = 45
"""UTF-8 bytes per encoded-word: base64 of 45 bytes is 60 characters, and with
``=?utf-8?b?`` and ``?=`` the word is 72, under RFC 2047's 75."""


def _plain(value: str) -> bytes | None:
    return value.encode("ascii") if _PLAIN_VALUE.fullmatch(value) else None


def _encoded_words(value: str) -> bytes:
    """``value`` as RFC 2047 encoded-words (UTF-8, base64), folded one word per line."""
    words: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for char in value:
        encoded = char.encode("utf-8")
        if size + len(encoded) > _WORD_BYTES:
            words.append(b"=?utf-8?b?" + base64.b64encode(b"".join(chunk)) + b"?=")
            chunk, size = [], 0
        chunk.append(encoded)
        size += len(encoded)
    words.append(b"=?utf-8?b?" + base64.b64encode(b"".join(chunk)) + b"?=")
    return b"\r\n ".join(words)


def _unstructured(value: str) -> bytes | None:
    """An unstructured header value (the subject): as it is when plain ASCII, else as
    encoded-words; ``None`` for what only the stdlib path should handle."""
    if not value or _NOT_IN_HEADER.search(value) or value != value.strip():
        # leading or trailing (Unicode) space, e.g. a lone no-break space: header parsers
        # fold it differently; leave it to the stdlib
        return None
    plain = _plain(value)
    if plain is not None:
        return plain
    if value.isascii():  # spacing or an encoded-word look-alike: leave it to the stdlib
        return None
    try:
        return _encoded_words(value)
    except UnicodeEncodeError:  # a lone surrogate
        return None


def _body(text: str) -> tuple[bytes, bytes] | None:
    """A text part's bytes with CRLF line ends and its transfer encoding (``7bit`` for ASCII,
    else ``8bit``), as the stdlib picks them for lines that fit; ``None`` when a line does
    not fit (the stdlib path then chooses quoted-printable or base64)."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    lines = raw.splitlines()
    if any(len(line) > MAX_LINE for line in lines):
        return None
    return b"\r\n".join(lines) + b"\r\n", b"7bit" if raw.isascii() else b"8bit"


@dataclass(frozen=True, slots=True)
class _Eml:
    """Builds the ``.eml`` bytes directly when every header is plain ASCII, or a text the
    RFC 2047 encoded-words carry (the subject, our ``X-Winback-*`` values), the recipient a
    plain address and every body line at most 998 bytes."""

    from_line: bytes
    domain: str

    def render(self, message: OutboundMessage, now: datetime) -> bytes | None:
        """The ``.eml`` bytes, or ``None`` when the stdlib path must write this message."""
        content = message.content
        to = message.to
        if content.subject is None or len(to) > MAX_LINE - 4 or not _PLAIN_ADDRESS.fullmatch(to):
            return None
        subject = _unstructured(content.subject)
        text = _body(content.text)
        html = _body(content.html) if content.html is not None else None
        if subject is None or text is None or (content.html is not None and html is None):
            return None
        if len(subject) > MAX_LINE - 9:  # "Subject: "; encoded-words are folded
            return None
        stem = file_stem(message.idempotency_key)
        # (name, value, unstructured: a text that encoded-words may carry)
        fields: list[tuple[bytes, str, bool]] = [
            (b"Date", format_datetime(now), False),
            (b"Message-ID", f"<{stem}@{self.domain}>", False),
            *((n.encode(), v, False) for n, v in message.list_unsubscribe_headers().items()),
            (b"X-Winback-Idempotency-Key", message.idempotency_key, True),
            *((_tag_header(k).encode(), v, True) for k, v in sorted(message.tags.items())),
            (b"Content-Language", content.locale, False),
        ]
        head = [self.from_line, b"To: ", to.encode("ascii"), b"\r\nSubject: ", subject]
        for name, value, unstructured in fields:
            encoded = _unstructured(value) if unstructured else _plain(value)
            if encoded is None or len(name) + 2 + len(encoded.partition(b"\r\n")[0]) > MAX_LINE:
                return None
            head += (b"\r\n", name, b": ", encoded)
        head.append(b"\r\nMIME-Version: 1.0\r\n")
        if html is None:
            return b"".join([*head, *_part(text), text[0]])
        boundary = b"=_" + hashlib.sha256(message.idempotency_key.encode()).hexdigest().encode()
        if boundary in text[0] or boundary in html[0]:
            return None
        delimiter = b"\r\n--" + boundary
        return b"".join(
            [
                *head,
                b'Content-Type: multipart/alternative; boundary="',
                boundary,
                b'"\r\n\r\n--',
                boundary,
                b"\r\n",
                *_part(text),
                text[0],
                delimiter,
                b"\r\n",
                *_part(html, b"html"),
                html[0],
                delimiter,
                b"--\r\n",
            ]
        )


def _part(body: tuple[bytes, bytes], subtype: bytes = b"plain") -> list[bytes]:
    return [
        b"Content-Type: text/",
        subtype,
        b'; charset="utf-8"\r\nContent-Transfer-Encoding: ',
        body[1],
        b"\r\n\r\n",
    ]


# --- writing ---------------------------------------------------------------------------------


class Folder:
    """One folder of message files: created on the first write (again if it was removed),
    each file written under a temporary name and renamed into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._base = str(path)
        self._made = False
        self._temporary = f".tmp-{os.getpid()}-{id(self):x}-"
        self._counter = itertools.count()

    def write(self, name: str, data: bytes) -> bool:
        """Write ``name`` unless it exists; whether it was written. Raises ``OSError``.
        Not thread-safe: one writer at a time (``BatchWriter`` runs one batch at a time)."""
        final = os.path.join(self._base, name)
        if not self._made:
            os.makedirs(self._base, exist_ok=True)
            self._made = True
        if os.path.exists(final):
            return False
        temporary, fd = self._create()
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            os.close(fd)
            fd = -1
            os.replace(temporary, final)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return True

    def _create(self) -> tuple[str, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in range(100):
            temporary = os.path.join(self._base, f"{self._temporary}{next(self._counter)}")
            try:
                return temporary, os.open(temporary, flags, 0o600)
            except FileExistsError:  # left by a crashed process that had our pid
                continue
            except FileNotFoundError:  # the folder was removed while we ran
                if attempt:
                    raise
                os.makedirs(self._base, exist_ok=True)
        raise FileExistsError(errno.EEXIST, "no free temporary file name", self._base)


Job = tuple[Folder, str, bytes, "asyncio.Future[bool]"]


class BatchWriter:
    """Writes files in a worker thread, one batch at a time: every write requested while a
    batch is on disk joins the next one, so a burst costs one thread hand-off per batch,
    not per file. The event loop never waits on the disk."""

    def __init__(self) -> None:
        self._pending: list[Job] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop a batch is scheduled or running in; ``None`` when idle."""

    async def write(self, folder: Folder, name: str, data: bytes) -> bool:
        """Write ``name`` into ``folder`` unless it exists; whether it was written."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop and self._loop.is_closed():
            self._loop, self._pending = None, []  # a batch its closed loop never finished
        done: asyncio.Future[bool] = loop.create_future()
        self._pending.append((folder, name, data, done))
        if self._loop is None:
            self._loop = loop
            loop.call_soon(self._start, loop)  # the other sends of this pass join the batch
        return await done

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._pending = self._pending, []
        written = loop.run_in_executor(None, _write_all, [job[:3] for job in batch])
        written.add_done_callback(lambda outcome: self._finish(loop, batch, outcome))

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[Job],
        outcome: asyncio.Future[list[bool | OSError]],
    ) -> None:
        try:
            results: Sequence[bool | BaseException] = outcome.result()
        except BaseException as exc:  # the executor is gone (shutting down)
            results = [exc] * len(batch)
        for (_, _, _, done), result in zip(batch, results, strict=True):
            if done.done():  # the sender gave up waiting: the file is written all the same
                continue
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)
        if self._pending:
            self._start(loop)
        else:
            self._loop = None


def _write_all(jobs: list[tuple[Folder, str, bytes]]) -> list[bool | OSError]:
    results: list[bool | OSError] = []
    for folder, name, data in jobs:
        try:
            results.append(folder.write(name, data))
        except OSError as exc:
            results.append(exc)
    return results
