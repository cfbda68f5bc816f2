"""Deterministic A/B variant and holdout assignment.

Both hash with SHA-256 (never Python's salted ``hash()``), so every process, restart and
replica assigns a customer the same variant and the same holdout membership.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from services.scheduler.domain.model import DEFAULT_VARIANT


def stable_unit(*parts: str) -> float:
    """A number in ``[0, 1)`` fixed by ``parts``, uniform over different inputs.

    Parts are length-prefixed before hashing, so ``("ab", "c")`` and ``("a", "bc")`` differ.
    """
    payload = "".join(f"{len(part)}:{part}" for part in parts).encode()
    digest = hashlib.sha256(payload).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_variant(customer_id: str, step_key: str, weights: Sequence[tuple[str, float]]) -> str:
    """Pick a variant for ``customer_id`` at ``step_key`` with probability proportional to
    its weight. No variants means :data:`DEFAULT_VARIANT`.

    Raises:
        ValueError: a weight is not positive.
    """
    if not weights:
        return DEFAULT_VARIANT
    if any(weight <= 0 for _, weight in weights):
        raise ValueError("variant weights must be positive")
    total = sum(weight for _, weight in weights)
    point = stable_unit("variant", customer_id, step_key) * total
    cumulative = 0.0
    for name, weight in weights:
        cumulative += weight
        if point < cumulative:
            return name
    return weights[-1][0]  # float rounding at the very top of the range


def in_holdout(customer_id: str, playbook: str, share: float) -> bool:
    """Whether ``customer_id`` is in ``playbook``'s holdout group of size ``share`` (0..1).

    Keyed on the playbook name, not its version: a customer stays in or out of the holdout
    when the playbook is revised.
    """
    return stable_unit("holdout", playbook, customer_id) < share
