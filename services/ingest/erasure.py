"""GDPR erasure on ingest's side: when the scheduler publishes ``customer.erased``, contact
points, names and free-text comments go; anonymised rows (status, episodes, reasons) stay.

The customer is marked (``customers.erased_at``; a customer ingest never saw gets a row with
the mark alone), so their later events never write the removed fields back
(``services.ingest.customer.ERASED_FIELDS``). Erasure takes the same per-customer lock as the
event handler: an event batch that loaded the customer before the erasure commits first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.ingest.store import lock_customers
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts.customer import CustomerErased
from shared.db.tables import churn_episodes, customers
from shared.messaging.pipeline import Incoming, Tx

_MARK = text(
    "INSERT INTO customers (id, status, lifecycle, lifecycle_at, activity, activity_at, "
    "erased_at) SELECT i, 'unknown', 'unknown', 'epoch', 'unknown', 'epoch', now() "
    "FROM unnest(CAST(:ids AS text[])) AS t(i) "
    "ON CONFLICT (id) DO UPDATE SET erased_at = COALESCE(customers.erased_at, now())"
)


async def erase(conn: AsyncConnection, ids: Sequence[str]) -> None:
    if not ids:
        return
    await lock_customers(conn, set(ids))
    await conn.execute(_MARK, {"ids": sorted(set(ids))})
    await conn.execute(
        update(customers)
        .where(customers.c.id.in_(list(ids)))
        .values(email=None, phone=None, name=None)
    )
    await conn.execute(
        update(churn_episodes)
        .where(churn_episodes.c.customer_id.in_(list(ids)))
        .values(comment=None)
    )


class ErasureHandler:
    def decode(self, event: CloudEvent) -> str | None:
        """The id of the customer to erase, or ``None`` for another type on the topic. The data
        decodes through its contract (``CustomerErased``, tolerant of fields added later): a
        malformed one raises ``InvalidEvent`` naming the field and dead-letters here."""
        if event.type != de.CUSTOMER_ERASED:
            return None
        return CustomerErased.decode(event.data, tolerant=True).customer_id

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        await erase(tx.conn, [i.payload for i in items if i.payload is not None])
