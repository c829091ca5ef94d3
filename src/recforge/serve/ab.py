"""A/B assignment as a pure function of (user id, experiment salt).

No state, no clock, no randomness: the same user lands in the same variant on every request, on
every replica and after every restart, so an experiment's analysis can recompute any assignment
from the event log alone. Each experiment has its own salt, so bucket positions in two experiments
are independent hashes and one experiment's split does not leak into another's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_SCALE = float(2**64)


@dataclass(frozen=True)
class Variant:
    """One arm: its share of traffic and the model refs (registry version or alias) it serves."""

    name: str
    weight: float
    ranker: str | None = None
    retrieval: str | None = None


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    variants: tuple[Variant, ...]

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError(f"experiment {self.name!r} has no variants")
        if any(v.weight < 0 for v in self.variants) or sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"experiment {self.name!r}: variant weights must be >= 0 with a positive sum")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r} repeats a variant name: {names}")


def unit_hash(user_id: str | int, salt: str) -> float:
    """A uniform number in [0, 1) determined by the user id and the salt (blake2b, 64 bits)."""
    digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _SCALE


def pick(u: float, weights: Sequence[float]) -> int:
    """The index of the weight bucket that `u` in [0, 1) falls into (buckets proportional to weights)."""
    total = float(sum(weights))
    edge = 0.0
    for i, weight in enumerate(weights):
        edge += weight / total
        if u < edge:
            return i
    # Rounding can leave the last edge a hair below 1.0: the tail belongs to the last positive bucket.
    return max(i for i, w in enumerate(weights) if w > 0)


def assign(user_id: str | int, experiment: Experiment) -> Variant:
    """The variant `user_id` sees in `experiment`: sticky, uniform over users, weight-proportional."""
    u = unit_hash(user_id, experiment.salt)
    return experiment.variants[pick(u, [v.weight for v in experiment.variants])]


def assign_all(user_id: str | int, experiments: Iterable[Experiment]) -> dict[str, Variant]:
    """Every running experiment's variant for this user, by experiment name."""
    return {e.name: assign(user_id, e) for e in experiments}


def in_canary(user_id: str | int, model: str, share: float) -> bool:
    """Whether this user's traffic for `model` goes to its canary (a fixed share of users, by hash)."""
    return share > 0 and unit_hash(user_id, f"canary:{model}") < share
