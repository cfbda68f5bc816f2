"""The API's state changes, each one unit of work over the case aggregate
(``domain/case.py``): pause, resume or cancel a case, erase a customer. They return plain data
or raise a refusal; the routes map both to HTTP."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler import store
from services.scheduler.domain.case import Refused
from services.scheduler.queries.cases import CaseRows, case_detail
from shared import domain_events as de
from shared.clock import Clock
from shared.contracts.customer import CustomerErased
from shared.messaging.uow import UnitOfWork
from shared.retry import REQUEST

log = logging.getLogger(__name__)

Action = Literal["pause", "resume", "cancel"]


@dataclass(frozen=True)
class Work:
    """What a unit of work of the API needs (``max_record_bytes``: kafka.max_record_bytes)."""

    engine: AsyncEngine
    clock: Clock
    source: str
    max_record_bytes: int
    outcomes_topic: str
    erasure_topic: str

    def unit(self, name: str) -> UnitOfWork:
        return UnitOfWork(
            self.engine, self.clock, self.source, self.max_record_bytes, name=f"scheduler.{name}"
        )


class NoSuchCase(LookupError):
    pass


class NoSuchCustomer(LookupError):
    pass


class CaseClosed(Exception):
    pass


async def control_case(work: Work, case_id: str, action: Action) -> tuple[CaseRows, datetime]:
    """Pause, resume or cancel a case; the case afterwards and the time it was done. Pausing a
    paused case or resuming an open one changes nothing. Raises ``NoSuchCase``,
    ``CaseClosed``."""
    once = functools.partial(_control_once, work, case_id, action)
    return await REQUEST.call(once, f"case {action}", log)


async def _control_once(work: Work, case_id: str, action: Action) -> tuple[CaseRows, datetime]:
    async with work.unit(f"{action}_case") as tx:
        conn, now = tx.conn, tx.now
        case = await store.load_case(conn, case_id, lock=True)
        if case is None:
            raise NoSuchCase(case_id)
        commands = {"pause": case.pause, "resume": case.resume, "cancel": case.cancel}
        result = commands[action](now)
        if isinstance(result, Refused):
            if result.code == "closed":
                raise CaseClosed(result.detail)
            # pausing a paused case or resuming an open one: already so, nothing to do
        else:
            await store.save_cases(tx, work.outcomes_topic, [result])
        detail = await case_detail(conn, case_id)
    assert detail is not None
    return detail, now


async def erase_customer(work: Work, customer_id: str) -> None:
    """GDPR erasure: close the open case, erase the customer, publish ``customer.erased``
    with the address hashes for the other services. Raises ``NoSuchCustomer``."""
    await REQUEST.call(functools.partial(_erase_once, work, customer_id), "erasure", log)


async def _erase_once(work: Work, customer_id: str) -> None:
    async with work.unit("erase_customer") as tx:
        conn, now = tx.conn, tx.now
        person = await store.customer(conn, customer_id)
        if person is None:
            raise NoSuchCustomer(customer_id)
        hashes = {}
        if person.email:
            hashes["email"] = store.address_hash("email", person.email)
        if person.phone:
            hashes["sms"] = store.address_hash("sms", person.phone)
        case = await store.load_open_case(conn, customer_id)
        if case is not None:
            closed = case.erase(now)
            assert not isinstance(closed, Refused)  # an open case can always be erased
            await store.save_cases(tx, work.outcomes_topic, [closed])
        await store.erase_customer(conn, customer_id, now)
        tx.emit(
            work.erasure_topic,
            customer_id,
            de.CUSTOMER_ERASED,
            CustomerErased(customer_id=customer_id, address_hashes=hashes, erased_at=now).to_data(),
            subject=customer_id,
        )
