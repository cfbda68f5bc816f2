"""Ingest's handler for the shared loop: validate (pure), then fold events into customers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.ingest import store
from services.ingest.customer import (
    Draft,
    Episode,
    Refinement,
    announcement_key,
    apply,
    apply_to,
)
from services.ingest.events import PUBLISHES, Inbound, decode
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
        # each customer's state is changed in place while the batch is folded into it
        drafts: dict[str, Draft] = {}
        new_episodes: list[Episode] = []
        ended: list[tuple[str, Any, str]] = []
        refined: list[Refinement] = []
        for item in items:
            inbound: Inbound = item.payload
            event = item.event
            cid = getattr(inbound.payload, "customer_id", None)
            if cid is None:
                effects = apply(None, inbound, event.source, event.id)
            else:
                draft = drafts.get(cid)
                if draft is None:
                    state = loaded.get(cid)
                    draft = drafts[cid] = Draft(state) if state is not None else Draft.new(cid)
                effects = apply_to(draft, inbound, event.source, event.id)
            if effects.new_episode is not None:
                new_episodes.append(effects.new_episode)
            ended.extend(effects.ended)
            refined.extend(effects.refined)
            for model in effects.emit:
                key = cid if cid is not None else announcement_key(model)
                tx.emit(
                    self.domain_topic,
                    key,
                    PUBLISHES[type(model)].name,
                    model.to_data(),
                    cause=event,
                    subject=cid,
                )
        changed = [d for cid, d in drafts.items() if d.differs_from(loaded.get(cid))]
        await store.save(tx.conn, changed, new_episodes, ended, tx.now, refined)
