"""Ingest's handler for the shared loop: validate (pure), then fold events into customers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.ingest import store
from services.ingest.customer import CustomerState, Episode, apply
from services.ingest.events import Inbound, decode
from shared import domain_events
from shared.clock import Clock
from shared.cloudevents import CloudEvent
from shared.messaging.pipeline import Incoming, Tx


class IngestHandler:
    def __init__(
        self, clock: Clock, type_prefix: str, max_future_skew_s: int, domain_topic: str
    ) -> None:
        self.clock = clock
        self.type_prefix = type_prefix
        self.max_future_skew_s = max_future_skew_s
        self.domain_topic = domain_topic

    def decode(self, event: CloudEvent) -> Inbound:
        return decode(event, self.type_prefix, self.clock.now(), self.max_future_skew_s)

    async def handle(self, tx: Tx, items: Sequence[Incoming[Any]]) -> None:
        ids = {
            cid
            for item in items
            if (cid := getattr(item.payload.payload, "customer_id", None)) is not None
        }
        loaded = await store.load(tx.conn, ids)
        states: dict[str, CustomerState] = dict(loaded)
        new_episodes: list[Episode] = []
        ended: list[tuple[str, Any, str]] = []
        for item in items:
            inbound: Inbound = item.payload
            cid = getattr(inbound.payload, "customer_id", None)
            effects = apply(
                states.get(cid) if cid else None, inbound, item.event.source, item.event.id
            )
            if cid is not None and effects.state is not None:
                states[cid] = effects.state
            if effects.new_episode is not None:
                new_episodes.append(effects.new_episode)
            ended.extend(effects.ended)
            for name, data in effects.emit:
                key = cid if cid is not None else str(data.get("feature", ""))
                tx.emit(
                    self.domain_topic,
                    key,
                    f"{domain_events.PREFIX}.{name}",
                    data,
                    cause=item.event,
                    subject=cid,
                )
        changed = [s for cid, s in states.items() if loaded.get(cid) != s]
        await store.save(tx.conn, changed, new_episodes, ended, tx.now)
