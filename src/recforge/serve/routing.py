"""Which versions serve one user: production, a hashed canary share, or an experiment's variant.

Pure: a function of the snapshot, the user id and the canary settings, with no state of its own,
so the same user gets the same versions on every worker and in every test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recforge.serve import ab
from recforge.serve.inference import RawId

if TYPE_CHECKING:
    from recforge.serve.loading import Snapshot

KINDS = ("retrieval", "ranker")


@dataclass(frozen=True)
class Route:
    """Which versions serve one user, and why (experiment assignments, canary)."""

    retrieval: int
    ranker: int
    assignments: dict[str, str]
    canary: frozenset[str]

    @property
    def model_version(self) -> str:
        return f"retrieval:{self.retrieval},ranker:{self.ranker}"

    @property
    def variant(self) -> str:
        """A low-cardinality label for metrics."""
        parts = [f"{e}:{v}" for e, v in sorted(self.assignments.items())]
        if self.canary:
            parts.append("canary")
        return ",".join(parts) or "default"


def route_user(snapshot: Snapshot, user_id: RawId, model_names: Mapping[str, str], canary_share: float,
               banned: Callable[[str, int], bool]) -> Route:
    """Versions for this user: production, or the canary for a hashed share of users, or an experiment's
    variant (a variant that names a model overrides the canary for that model)."""
    versions = dict(snapshot.production)
    on_canary = set()
    for kind in KINDS:
        version = snapshot.canary.get(kind)
        if version is not None and not banned(kind, version) and ab.in_canary(user_id, model_names[kind],
                                                                                canary_share):
            versions[kind] = version
            on_canary.add(kind)
    assignments = {}
    for experiment in snapshot.experiments:
        variant = ab.assign(user_id, experiment)
        assignments[experiment.name] = variant.name
        for kind, ref in (("retrieval", variant.retrieval), ("ranker", variant.ranker)):
            if ref is not None and (kind, ref) in snapshot.refs:
                versions[kind] = snapshot.refs[(kind, ref)]
                on_canary.discard(kind)
    return Route(versions["retrieval"], versions["ranker"], assignments, frozenset(on_canary))


def production_route(snapshot: Snapshot, route: Route) -> Route:
    """The same user's route with every model at production: where a failing canary falls back to."""
    return Route(snapshot.production["retrieval"], snapshot.production["ranker"], route.assignments, frozenset())
