from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.domain.variants import assign_variant, in_holdout, stable_unit

WEIGHTS = [("a", 1.0), ("b", 1.0), ("c", 2.0)]


@pytest.mark.parametrize(
    ("customer_id", "variant"),
    [("cust-1", "c"), ("cust-2", "a"), ("cust-3", "c"), ("cust-4", "a")],
)
def test_assignment_is_pinned_across_processes_and_releases(customer_id: str, variant: str) -> None:
    # SHA-256 based: these values must never change, or running experiments get reshuffled
    assert assign_variant(customer_id, "d7_special_offer", WEIGHTS) == variant


def test_a_step_without_variants_gets_the_default_variant() -> None:
    assert assign_variant("cust-1", "d0", []) == "default"


@pytest.mark.parametrize("weights", [[("a", 0.0)], [("a", 1.0), ("b", -1.0)]])
def test_non_positive_weights_are_refused(weights: list[tuple[str, float]]) -> None:
    with pytest.raises(ValueError, match="positive"):
        assign_variant("cust-1", "d0", weights)


def test_hash_input_parts_are_not_ambiguous() -> None:
    assert stable_unit("ab", "c") != stable_unit("a", "bc")


@settings(max_examples=50, deadline=None)
@given(customer_id=st.text(max_size=40), step_key=st.text(max_size=20))
def test_assignment_is_deterministic(customer_id: str, step_key: str) -> None:
    first = assign_variant(customer_id, step_key, WEIGHTS)
    assert first == assign_variant(customer_id, step_key, list(WEIGHTS))
    assert first in {"a", "b", "c"}
    assert 0.0 <= stable_unit(customer_id, step_key) < 1.0


SAMPLE = [f"customer-{n}" for n in range(3000)]


@settings(max_examples=20, deadline=None)
@given(
    weights=st.lists(st.integers(1, 10), min_size=1, max_size=4),
    step_key=st.sampled_from(["d7_offer", "d21_offer", "feature_built"]),
)
def test_variant_distribution_follows_the_weights(weights: list[int], step_key: str) -> None:
    named = [(f"v{i}", float(w)) for i, w in enumerate(weights)]
    counts = Counter(assign_variant(c, step_key, named) for c in SAMPLE)
    total = sum(weights)
    for name, weight in named:
        assert abs(counts[name] / len(SAMPLE) - weight / total) < 0.05, (name, counts)


@settings(max_examples=20, deadline=None)
@given(share=st.floats(0.0, 0.9), playbook=st.sampled_from(["price_discount", "saas_series"]))
def test_holdout_share_is_respected_and_nested(share: float, playbook: str) -> None:
    held = {c for c in SAMPLE if in_holdout(c, playbook, share)}
    assert abs(len(held) / len(SAMPLE) - share) < 0.04
    bigger = {c for c in SAMPLE if in_holdout(c, playbook, min(share + 0.05, 0.99))}
    assert held <= bigger, "raising the share only adds customers to the holdout"


def test_assignments_of_different_steps_are_independent() -> None:
    halves = [("x", 1.0), ("y", 1.0)]
    same = sum(
        assign_variant(c, "d7_offer", halves) == assign_variant(c, "d21_offer", halves)
        for c in SAMPLE
    )
    assert abs(same / len(SAMPLE) - 0.5) < 0.05


def test_holdout_differs_per_playbook() -> None:
    first = {c for c in SAMPLE if in_holdout(c, "price_discount", 0.5)}
    second = {c for c in SAMPLE if in_holdout(c, "saas_series", 0.5)}
    assert abs(len(first & second) / len(SAMPLE) - 0.25) < 0.05


def test_no_holdout_at_share_zero() -> None:
    assert not any(in_holdout(c, "pb", 0.0) for c in SAMPLE)
