"""The committed AsyncAPI document (``docs/asyncapi.yaml``): current with the contracts, every
topic, event type and payload documented, every ``$ref`` resolving, and every example a valid
CloudEvent whose ``data`` round-trips through its model. (The AsyncAPI CLI validates it in
``tests/integration/test_asyncapi_validate.py``.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.cloudevents import from_json_dict
from shared.contracts import registry
from shared.contracts.asyncapi import DEAD_LETTER, document, to_yaml
from shared.settings import IngestSettings, TopicSettings

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
PREFIX = IngestSettings().event_type_prefix


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMMITTED.read_text())
    return loaded


def test_the_committed_document_is_what_winback_asyncapi_prints() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")}
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "asyncapi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == to_yaml(document())
    assert out.stdout == COMMITTED.read_text(), (
        "docs/asyncapi.yaml is stale: regenerate it with `winback asyncapi > docs/asyncapi.yaml`"
    )


def test_the_topic_settings_name_the_channels() -> None:
    topics = TopicSettings(inbound=["crm.events"], outcomes="acme.outcomes", partitions=12)
    channels = document(topics, "org.acme")["channels"]
    assert channels["inbound.crm.events"]["address"] == "crm.events"
    assert "org.acme.trial.expired" in channels["inbound.crm.events"]["messages"]
    assert channels["outcomes"]["address"] == "acme.outcomes"
    assert channels["outcomes"]["bindings"]["kafka"]["partitions"] == 12


def test_every_topic_is_a_channel(doc: dict[str, Any]) -> None:
    t = TopicSettings()
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {*t.inbound, t.domain, t.dispatch, t.outcomes, t.erasure, t.dead_letter}


def test_every_event_type_is_a_message_on_its_topics_channel(doc: dict[str, Any]) -> None:
    messages = doc["components"]["messages"]
    t = TopicSettings()
    for contract in registry.CONTRACTS:
        event_type = contract.event_type(PREFIX)
        assert messages[event_type]["name"] == event_type
        addresses = t.inbound if contract.inbound else [getattr(t, contract.topic)]
        for address in addresses:
            (channel,) = [c for c in doc["channels"].values() if c["address"] == address]
            assert event_type in channel["messages"], (event_type, address)
        data = messages[event_type]["payload"]["allOf"][1]["properties"]["data"]
        assert data == {"$ref": f"#/components/schemas/{contract.model.__name__}"}
    assert set(messages) == {c.event_type(PREFIX) for c in registry.CONTRACTS} | {DEAD_LETTER}


def test_each_service_sends_and_receives_what_the_registry_says(doc: dict[str, Any]) -> None:
    seen: dict[tuple[str, str], set[str]] = {}
    for op_id, op in doc["operations"].items():
        service = op_id.split(".")[0]
        for ref in op["messages"]:
            name = ref["$ref"].rsplit("/", 1)[-1]
            seen.setdefault((service, op["action"]), set()).add(name)
    for service in registry.SERVICES:
        expected_send = {c.event_type(PREFIX) for c in registry.CONTRACTS if service in c.producers}
        expected_receive = {
            c.event_type(PREFIX) for c in registry.CONTRACTS if service in c.consumers
        }
        assert seen[(service, "send")] == expected_send | {DEAD_LETTER}
        assert seen[(service, "receive")] == expected_receive


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_ref_resolves_and_no_defs_are_left(doc: dict[str, Any]) -> None:
    found = list(refs(doc))
    assert len(found) > 100
    for ref in found:
        assert resolve(doc, ref) is not None, ref
    assert "$defs" not in COMMITTED.read_text()


def test_every_model_schema_is_in_the_components(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for contract in registry.CONTRACTS:
        schema = contract.model.model_json_schema(ref_template="#/components/schemas/{model}")
        schema.pop("$defs", None)
        assert schemas[contract.model.__name__] == schema


def examples(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, message in doc["components"]["messages"].items():
        assert message["examples"], f"{name} has no example"
        for example in message["examples"]:
            yield name, example


def test_every_example_is_a_cloudevent_whose_data_round_trips(doc: dict[str, Any]) -> None:
    checked = 0
    for name, example in examples(doc):
        if name == DEAD_LETTER:
            continue
        envelope = example["payload"]
        event = from_json_dict(envelope)
        assert event.type == name
        contract = registry.contract_for(event.type, PREFIX)
        assert contract is not None, name
        assert contract.decode(event.data, tolerant=False).to_data() == event.data, name
        checked += 1
    assert checked == len(registry.CONTRACTS)


def test_the_dead_letter_example_carries_every_dlq_header(doc: dict[str, Any]) -> None:
    schema = doc["components"]["schemas"]["DeadLetterHeaders"]
    ((_, example),) = [(n, e) for n, e in examples(doc) if n == DEAD_LETTER]
    assert set(schema["required"]) <= set(example["headers"])
