"""Synthetic users playing against a running server: feed requests, ground-truth clicks, events back.

The world that wrote the offline log also answers for the users online: who opens the feed and
when is drawn the way the log generator draws it (activity-weighted users, diurnal hours, mostly
the user's own device), and whether a shown item is clicked is drawn from the very click model
behind the log, at the slot the server put it in. Because the truth is known, every day also gets
its expected clicks (the sum of the click probabilities of what was shown), a CTR without the
noise of the clicks themselves.

Only HTTP connects this module to the server, so what is measured is what a client would see:
the wire format, the A/B assignments and the canary routing of the real process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from recforge.synthetic.logs import PREFERRED_DEVICE_SHARE, draw_weighted
from recforge.synthetic.world import DEVICES, SECONDS_PER_DAY, World, period_start

# Seconds between two slots as the user scrolls, and from seeing an item to clicking it.
SCROLL_S = 2
CLICK_DELAY_S = 1
# A request starts early enough in its hour for its last click to land in the same hour.
_LATEST_SECOND = 3600 - 120
# The server's limit on events per POST /v1/events body (schemas.EventsRequest).
MAX_EVENTS_PER_POST = 1000


class ServerError(RuntimeError):
    """The server answered a simulated request with an error status."""


@dataclass(frozen=True)
class Requests:
    """One simulated day's feed requests, as arrays (one row per request)."""

    day: int
    users: np.ndarray  # int64 user ids
    hours: np.ndarray  # int64 UTC hour
    devices: np.ndarray  # int64 index into DEVICES
    timestamps: np.ndarray  # int64 unix seconds inside `day`

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def slice(self, start: int, stop: int) -> Requests:
        return Requests(self.day, self.users[start:stop], self.hours[start:stop], self.devices[start:stop],
                        self.timestamps[start:stop])

    def bodies(self, k: int, exclude_seen: bool) -> list[dict[str, Any]]:
        """The POST /v1/recommend bodies: the context carries the log's context columns (hour, device)."""
        names = np.asarray(DEVICES, dtype=object)[self.devices]
        return [{"user_id": int(u), "context": {"hour": int(h), "device": str(d)}, "k": k,
                 "exclude_seen": exclude_seen} for u, h, d in zip(self.users, self.hours, names, strict=True)]


def draw_requests(world: World, n: int, day: int, rng: np.random.Generator) -> Requests:
    """`n` feed requests on world day `day`, from the same traffic distribution as the offline log."""
    if n < 1:
        raise ValueError(f"requests per day must be >= 1, got {n}")
    users = draw_weighted(rng, world.user_activity, n)
    hours = draw_weighted(rng, world.hour_traffic, n)
    own = rng.random(n) < PREFERRED_DEVICE_SHARE
    devices = np.where(own, world.user_device[users], rng.integers(0, len(DEVICES), n)).astype(np.int64)
    second = rng.integers(0, _LATEST_SECOND, n)
    timestamps = period_start(world.config) + day * SECONDS_PER_DAY + hours * 3600 + second
    order = np.argsort(timestamps, kind="stable")
    return Requests(day, users[order], hours[order], devices[order], timestamps[order].astype(np.int64))


def shown_items(responses: Sequence[dict[str, Any]], k: int) -> np.ndarray:
    """The items each response showed, as a [requests, k] int64 matrix padded with -1 (short feeds)."""
    items = np.full((len(responses), k), -1, dtype=np.int64)
    for row, response in enumerate(responses):
        ids = [item["item_id"] for item in response["items"][:k]]
        if any(not isinstance(i, int) for i in ids):
            raise ServerError(f"response {response.get('request_id')} has non-integer item ids {ids[:3]}; the "
                              "synthetic world's items are integers 0..items-1")
        items[row, : len(ids)] = ids
    return items


def click_probabilities(world: World, requests: Requests, items: np.ndarray) -> np.ndarray:
    """Ground-truth click probability of every shown item at its slot (0 for padding), in one call."""
    shown = items >= 0
    if (items >= world.n_items).any():
        raise ValueError(f"the server showed item ids >= {world.n_items}, which the world does not have: the "
                         "registry's models were trained on another world")
    positions = np.broadcast_to(np.arange(items.shape[1], dtype=np.int64), items.shape)
    prob = world.click_probability(requests.users[:, None], np.where(shown, items, 0), requests.hours[:, None],
                                   requests.devices[:, None], positions, np.float64(requests.day))
    return np.where(shown, prob, 0.0)


def draw_clicks(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Independent Bernoulli clicks, one per shown slot (padding has probability 0, so never clicks)."""
    return rng.random(probabilities.shape) < probabilities


def build_events(requests: Requests, responses: Sequence[dict[str, Any]], items: np.ndarray,
                 clicks: np.ndarray) -> list[dict[str, Any]]:
    """POST /v1/events items: an impression per shown slot, a click per clicked one, echoing the response's
    request id, assignments and model version, with timestamps inside the simulated day."""
    events: list[dict[str, Any]] = []
    names = np.asarray(DEVICES, dtype=object)[requests.devices]
    for row, response in enumerate(responses):
        user = int(requests.users[row])
        context = {"hour": int(requests.hours[row]), "device": str(names[row])}
        common = {"request_id": response["request_id"], "user_id": user, "context": context,
                  "assignments": response["assignments"], "model_version": response["model_version"]}
        start = int(requests.timestamps[row])
        for position in np.flatnonzero(items[row] >= 0):
            seen_at = start + SCROLL_S * int(position)
            item = int(items[row, position])
            events.append({"type": "impression", "item_id": item, "position": int(position),
                           "timestamp": seen_at, **common})
            if clicks[row, position]:
                events.append({"type": "click", "item_id": item, "position": int(position),
                               "timestamp": seen_at + CLICK_DELAY_S, **common})
    return events


@dataclass
class DayTraffic:
    """What one simulated day served and what the users did: arrays per request x slot, plus counts."""

    requests: Requests
    items: np.ndarray
    probabilities: np.ndarray
    clicks: np.ndarray
    assignments: list[dict[str, str]]
    model_versions: list[str]
    canary: np.ndarray  # bool per request
    impressions_accepted: int = 0
    clicks_accepted: int = 0
    event_posts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def impressions(self) -> int:
        return int((self.items >= 0).sum())

    @property
    def expected_ctr(self) -> float:
        """Mean ground-truth click probability of what was shown: the day's CTR without click noise."""
        return float(self.probabilities.sum() / max(self.impressions, 1))

    @property
    def measured_ctr(self) -> float:
        return float(self.clicks.sum() / max(self.impressions, 1))

    def variant_mask(self, experiment: str, variant: str) -> np.ndarray:
        return np.array([a.get(experiment) == variant for a in self.assignments], dtype=bool)


class FeedClient:
    """A pool of simulated clients over one keep-alive HTTP connection pool (httpx.Client is thread-safe)."""

    def __init__(self, base_url: str, concurrency: int = 12, token: str | None = None, timeout_s: float = 120.0
                 ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.token = token
        limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="recforge-sim")

    def __enter__(self) -> FeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def _check(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code != 200:
            detail = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
            raise ServerError(f"{what} at {self.base_url} answered {response.status_code}: {detail}")
        return response.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:  # connection refused, timeout: the server died or hangs
            raise ServerError(f"{method} {path} at {self.base_url} failed: {type(exc).__name__}: {exc}") from exc
        return self._check(response, f"{method} {path}")

    def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", "/v1/recommend", json=body)

    def recommend_many(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """All requests, `concurrency` in flight at a time; answers in request order."""
        return list(self._pool.map(self.recommend, bodies))

    def post_events(self, events: Sequence[dict[str, Any]], chunk: int = MAX_EVENTS_PER_POST) -> int:
        """Send events in bodies of at most `chunk` (the server's per-body limit); returns how many it accepted."""
        accepted = 0
        for start in range(0, len(events), chunk):
            body = {"events": list(events[start:start + chunk])}
            accepted += int(self._send("POST", "/v1/events", json=body)["accepted"])
        return accepted

    def _admin(self) -> dict[str, str]:
        if not self.token:
            raise ServerError("admin calls need the server's admin token (RECFORGE_ADMIN_TOKEN)")
        return {"Authorization": f"Bearer {self.token}"}

    def set_experiments(self, experiments: list[dict[str, Any]]) -> dict[str, Any]:
        """PUT /admin/experiments: the server resolves every ref before it swaps the running experiments."""
        return self._send("PUT", "/admin/experiments", json={"experiments": experiments}, headers=self._admin())

    def reload(self) -> dict[str, Any]:
        """POST /admin/reload: follow the registry's aliases now instead of at the next poll."""
        return self._send("POST", "/admin/reload", headers=self._admin())

    def ready(self) -> dict[str, Any]:
        """The server's readiness; the loaded versions come only with the admin token (docs/security.md)."""
        return self._send("GET", "/readyz", headers=self._admin() if self.token else None)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def play_day(client: FeedClient, world: World, requests: Requests, rng: np.random.Generator, *, k: int = 10,
             exclude_seen: bool = False, batch_requests: int = 50, send_events: bool = True) -> DayTraffic:
    """Serve `requests` through the server, draw the users' clicks from the ground truth and (unless
    `send_events` is off, as when only predicting) send the events back, one POST per `batch_requests`.

    Requests go out in blocks of `batch_requests` so a block's events are stored before the next block
    is asked for, as a user's earlier taps reach the server before their next feed request.
    """
    if batch_requests < 1:
        raise ValueError(f"batch_requests must be >= 1, got {batch_requests}")
    n = len(requests)
    items = np.full((n, k), -1, dtype=np.int64)
    probabilities = np.zeros((n, k))
    clicks = np.zeros((n, k), dtype=bool)
    assignments: list[dict[str, str]] = []
    versions: list[str] = []
    canary = np.zeros(n, dtype=bool)
    traffic = DayTraffic(requests, items, probabilities, clicks, assignments, versions, canary)
    for start, stop in _chunks(n, batch_requests):
        block = requests.slice(start, stop)
        responses = client.recommend_many(block.bodies(k, exclude_seen))
        shown = shown_items(responses, k)
        prob = click_probabilities(world, block, shown)
        clicked = draw_clicks(prob, rng)
        items[start:stop], probabilities[start:stop], clicks[start:stop] = shown, prob, clicked
        assignments.extend(r["assignments"] for r in responses)
        versions.extend(r["model_version"] for r in responses)
        canary[start:stop] = [bool(r["canary"]) for r in responses]
        if send_events:
            events = build_events(block, responses, shown, clicked)
            accepted = client.post_events(events)
            if accepted != len(events):
                raise ServerError(f"the server accepted {accepted} of {len(events)} events")
            traffic.impressions_accepted += int((shown >= 0).sum())
            traffic.clicks_accepted += int(clicked.sum())
            traffic.event_posts += -(-len(events) // MAX_EVENTS_PER_POST)
    return traffic
