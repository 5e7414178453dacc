"""The plan: which attribute combination each item asks for, and its id and seed."""

from __future__ import annotations

import hashlib
import random

from .models import AttributeBank, BankEntry, PlanItem


def item_id(fingerprint: str, index: int) -> str:
    """Deterministic id of the item at ``index`` of the run with ``fingerprint``."""
    return hashlib.sha256(f"{fingerprint}:{index}".encode()).hexdigest()[:16]


def item_seed(seed: int, index: int) -> int:
    """The generation seed of an item: the run seed plus its index, as WebUI batches."""
    return (seed + index) % (2**32)


def plan_item(
    bank: AttributeBank, index: int, fingerprint: str, seed: int, mode: str = "marginal"
) -> PlanItem:
    """Sample an attribute combination so attribute frequencies follow the references.

    ``marginal`` picks each attribute's value from a reference drawn at random for
    that attribute (each attribute's distribution follows the references, and
    combinations vary); ``joint`` takes every value from one reference drawn at random.
    """
    rng = random.Random(f"{seed}:{index}:{fingerprint}")
    entries: list[BankEntry] = []
    if mode == "joint":
        refs = sorted({e.reference for e in bank.entries})
        if refs:
            chosen = rng.choice(refs)
            entries = [e for e in bank.entries if e.reference == chosen]
    else:
        for attribute in bank.attributes:
            values = bank.values(attribute)
            if values:
                entries.append(rng.choice(values))
    return PlanItem(
        index=index,
        item_id=item_id(fingerprint, index),
        seed=item_seed(seed, index),
        entries=entries,
    )
