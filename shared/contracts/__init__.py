"""Typed event contracts: one pydantic model per event type winback publishes or consumes, and
the registry naming each type's topic, producer and consumers (``registry.CONTRACTS``).

- ``inbound``: billing and product lifecycle events (ingest's input);
- ``customer``: what ingest publishes about customers, ``customer.erased``,
  ``customer.unsubscribed``;
- ``cases``: ``case.*`` (the scheduler);
- ``dispatch``: the dispatch command, scheduler → dispatcher;
- ``messages``: ``message.*`` outcomes (the dispatcher);
- ``asyncapi``: the AsyncAPI 3.0 document generated from all of it (``winback asyncapi``).
"""

from shared.contracts.registry import CONTRACTS, INBOUND, PUBLISHED, Contract, contract_for, decode

__all__ = ["CONTRACTS", "INBOUND", "PUBLISHED", "Contract", "contract_for", "decode"]
