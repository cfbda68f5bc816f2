"""The dispatcher's handler for the shared consume → transact → emit loop.

- ``dispatch.requested`` (topic ``topics.dispatch``): one queued delivery row per idempotency
  key, inserted with ``ON CONFLICT DO NOTHING`` — a redelivered or re-emitted command has no
  second effect. Nothing is sent here: the sender loop claims queued rows.
- ``customer.erased`` (topic ``topics.erasure``): the erased addresses' hashes join the
  suppression list, queued deliveries end ``message.suppressed``, and rendered messages and
  contact points go from every delivery row of that customer.

Both are decoded with their contracts (``shared.contracts``): a malformed one dead-letters at
decode time naming the field; the outcome events are built with theirs (``model.outcome``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.dispatcher import store
from services.dispatcher.model import (
    MESSAGE_SUPPRESSED,
    Delivery,
    DispatchCommand,
    outcome,
    parse_command,
)
from shared import domain_events as de
from shared.cloudevents import CloudEvent
from shared.contracts.customer import CustomerErased
from shared.messaging.pipeline import Incoming, Tx


@dataclass(frozen=True, slots=True)
class Erasure:
    customer_id: str
    address_hashes: Mapping[str, str]


class DispatchHandler:
    def __init__(self, outcomes_topic: str) -> None:
        self.outcomes_topic = outcomes_topic

    def decode(self, event: CloudEvent) -> DispatchCommand | Erasure | None:
        if event.type == de.DISPATCH_REQUESTED:
            return parse_command(event.data)
        if event.type == de.CUSTOMER_ERASED:
            erased = CustomerErased.decode(event.data, tolerant=True)
            return Erasure(erased.customer_id, erased.address_hashes)
        return None  # other events on these topics are not ours

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        commands = [
            (i.payload, _reference(i.event))
            for i in items
            if isinstance(i.payload, DispatchCommand)
        ]
        await store.insert_deliveries(tx.conn, commands, tx.now)
        erasures = [i for i in items if isinstance(i.payload, Erasure)]
        if erasures:
            await self._erase(tx, erasures)

    async def _erase(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        rows = []
        for item in items:
            erasure: Erasure = item.payload
            rows += [
                store.Suppression(channel, digest, "erased", erasure.customer_id)
                for channel, digest in erasure.address_hashes.items()
            ]
        await store.add_suppressions(tx.conn, rows, tx.now)
        cancelled = await store.erase(tx.conn, [i.payload.customer_id for i in items], tx.now)
        causes = {i.payload.customer_id: i.event for i in items}
        for row in cancelled:
            delivery = Delivery.from_row(row)
            tx.emit(
                self.outcomes_topic,
                delivery.customer_id,
                MESSAGE_SUPPRESSED,
                outcome(
                    MESSAGE_SUPPRESSED,
                    delivery,
                    provider=None,
                    provider_message_id=None,
                    reason="customer erased",
                ).to_data(),
                cause=causes.get(delivery.customer_id),
                subject=delivery.customer_id,
            )


def _reference(event: CloudEvent) -> dict[str, str]:
    return {"id": event.id, "source": event.source, "correlation": event.correlation_id}
