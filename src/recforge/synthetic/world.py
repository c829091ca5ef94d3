"""The synthetic world: ground-truth users, items and the click model behind the default data set.

The generator keeps its truth instead of throwing it away after writing a log. That buys two
things: offline metrics on generated data can be read against the best achievable score (the
oracle that knows the real click probability), and an online simulator can serve recommendations
to these same users and draw their clicks from the very model that produced the training log.

Everything is a numpy array indexed by user id or item id, so the click model scores a million
(user, item, context) rows in one vectorized call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from recforge.config import GenerateConfig
from recforge.storage import atomic_open, read_json, write_json

SCHEMA_VERSION = 1
DEVICES: tuple[str, ...] = ("android", "ios", "web", "tablet")
FEED_SLOTS = 10
SECONDS_PER_DAY = 86_400

# Independent random streams: adding a draw to the log generator must not reshuffle the world.
WORLD_STREAM = 0
LOG_STREAM = 1

_DEVICE_SHARE = np.array([0.45, 0.35, 0.12, 0.08])
# Phones click a little more than desktop browsers; tablets sit in between.
_DEVICE_EFFECT = np.array([0.05, 0.10, -0.25, 0.0])
_ZIPF_EXPONENT = 1.1
# Rank offset of the Zipf law: keeps the single hottest item from taking a sixth of all exposure.
_ZIPF_OFFSET = 2.0
_NEW_ITEM_SHARE = 0.3
_TASTE_DRIFT_PER_DAY = 0.04


@dataclass(frozen=True, eq=False)
class World:
    """Ground truth of the synthetic feed. Ids are array indices: user 0..users-1, item 0..items-1.

    Days are counted from the config's start date (day 0); items with release_day <= 0 are in the
    catalogue from the start, the others arrive during the period.
    """

    config: GenerateConfig
    item_category: np.ndarray  # int64 [items]
    item_popularity: np.ndarray  # float64 [items], sums to 1: how often the feed wants to show it
    item_release_day: np.ndarray  # int64 [items]
    item_quality: np.ndarray  # float64 [items], logit offset
    item_latent: np.ndarray  # float64 [items, latent_dim]
    user_activity: np.ndarray  # float64 [users], sums to 1: share of feed requests
    user_taste: np.ndarray  # float64 [users, latent_dim] on day 0
    user_drift: np.ndarray  # float64 [users, latent_dim], taste change per day
    user_bias: np.ndarray  # float64 [users], logit offset
    user_device: np.ndarray  # int64 [users], index into DEVICES
    user_categories: np.ndarray  # int64 [users, 3] preferred categories, strongest first
    hour_traffic: np.ndarray  # float64 [24], sums to 1
    hour_category: np.ndarray  # float64 [24, categories], logit offset
    device_effect: np.ndarray  # float64 [devices], logit offset
    position_effect: np.ndarray  # float64 [FEED_SLOTS], logit offset (0 at the top slot)
    global_bias: float
    taste_scale: float
    age_penalty: float  # logit lost by a fully aged item
    age_scale_days: float  # how fast an item ages

    @property
    def n_users(self) -> int:
        return int(self.user_activity.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_category.shape[0])

    def taste(self, users: np.ndarray, days: np.ndarray | float) -> np.ndarray:
        """Users' taste vectors on the given (possibly fractional) days: tastes move linearly."""
        users = np.asarray(users, dtype=np.int64)
        days = np.asarray(days, dtype=np.float64)
        return self.user_taste[users] + days[..., None] * self.user_drift[users]

    def released(self, day: int) -> np.ndarray:
        """Boolean mask of the items that may be shown on `day`."""
        return self.item_release_day <= day

    def click_logit(
        self,
        users: np.ndarray,
        items: np.ndarray,
        hours: np.ndarray,
        devices: np.ndarray,
        positions: np.ndarray,
        days: np.ndarray,
    ) -> np.ndarray:
        """The ground-truth click model (log-odds). Arguments broadcast against each other, so a
        whole feed request (one user, hour and device; many items) scores in a single call.

        devices are indices into DEVICES; days count from the start date.
        """
        u, i, h, d, p, t = np.broadcast_arrays(
            np.asarray(users, dtype=np.int64),
            np.asarray(items, dtype=np.int64),
            np.asarray(hours, dtype=np.int64),
            np.asarray(devices, dtype=np.int64),
            np.asarray(positions, dtype=np.int64),
            np.asarray(days, dtype=np.float64),
        )
        shape = u.shape
        u, i, h, d, p, t = (a.reshape(-1) for a in (u, i, h, d, p, t))
        taste = self.user_taste[u] + t[:, None] * self.user_drift[u]
        affinity = np.einsum("nd,nd->n", taste, self.item_latent[i])
        age = np.maximum(t - self.item_release_day[i], 0.0)
        staleness = self.age_penalty * -np.expm1(-age / self.age_scale_days)
        logit = (
            self.global_bias
            + self.user_bias[u]
            + self.item_quality[i]
            + self.taste_scale * affinity
            + self.hour_category[h, self.item_category[i]]
            + self.device_effect[d]
            + self.position_effect[p]
            - staleness
        )
        return logit.reshape(shape)

    def click_probability(
        self,
        users: np.ndarray,
        items: np.ndarray,
        hours: np.ndarray,
        devices: np.ndarray,
        positions: np.ndarray,
        days: np.ndarray,
    ) -> np.ndarray:
        """Probability of a click under the ground-truth model (see click_logit)."""
        logit = self.click_logit(users, items, hours, devices, positions, days)
        return 1.0 / (1.0 + np.exp(-logit))

    def save(self, directory: Path) -> None:
        """Write world.npz (arrays) and world.json (config, scalars, schema version), atomically."""
        directory = Path(directory)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _ARRAY_FIELDS}
        with atomic_open(directory / "world.npz", "wb") as handle:
            np.savez(handle, **arrays)
        write_json(
            directory / "world.json",
            {
                "schema_version": SCHEMA_VERSION,
                "config": self.config.model_dump(mode="json"),
                "devices": list(DEVICES),
                "scalars": {name: float(getattr(self, name)) for name in _SCALAR_FIELDS},
                "arrays": sorted(arrays),
            },
        )

    @classmethod
    def load(cls, directory: Path) -> World:
        """Read a world written by `save`; refuses schema versions it does not know."""
        directory = Path(directory)
        meta_path, npz_path = directory / "world.json", directory / "world.npz"
        if not meta_path.is_file() or not npz_path.is_file():
            raise FileNotFoundError(
                f"no saved world in {directory}: expected world.json and world.npz "
                "(write one with `recforge data generate`)"
            )
        meta = read_json(meta_path)
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{meta_path} has world schema version {version!r}; this recforge reads version "
                f"{SCHEMA_VERSION}. Regenerate the world with `recforge data generate`."
            )
        if tuple(meta["devices"]) != DEVICES:
            raise ValueError(f"{meta_path} was written with devices {meta['devices']}, expected {DEVICES}")
        with np.load(npz_path, allow_pickle=False) as npz:
            missing = sorted(_ARRAY_FIELDS - set(npz.files))
            if missing:
                raise ValueError(f"{npz_path} lacks arrays {missing}")
            arrays = {name: npz[name] for name in _ARRAY_FIELDS}
        return cls(
            config=GenerateConfig.model_validate(meta["config"]),
            **arrays,
            **{name: float(meta["scalars"][name]) for name in _SCALAR_FIELDS},
        )


_SCALAR_FIELDS = ("global_bias", "taste_scale", "age_penalty", "age_scale_days")
_ARRAY_FIELDS = frozenset(f.name for f in fields(World)) - {"config", *_SCALAR_FIELDS}


def period_start(cfg: GenerateConfig) -> int:
    """Unix seconds of the start date's midnight in UTC (the period is [start, start + days))."""
    try:
        start = datetime.strptime(cfg.start_date, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"generate.start_date must look like 2026-01-01, got {cfg.start_date!r}") from exc
    return int(start.timestamp())


def device_codes(names: np.ndarray) -> np.ndarray:
    """Map device names (the log's string column) to the indices the click model takes."""
    names = np.asarray(names).astype(str)
    order = np.argsort(DEVICES)
    known = np.asarray(DEVICES)[order]
    at = np.minimum(np.searchsorted(known, names), len(known) - 1)
    unknown = known[at] != names
    if unknown.any():
        raise ValueError(f"unknown device(s) {sorted(set(names[unknown]))[:5]}; expected one of {DEVICES}")
    return order[at].astype(np.int64)


def diurnal_traffic() -> np.ndarray:
    """Share of feed requests per UTC hour: quiet nights, a morning commute, lunch, an evening peak."""
    hours = np.arange(24, dtype=np.float64)

    def bump(center: float, width: float) -> np.ndarray:
        gap = np.minimum(np.abs(hours - center), 24 - np.abs(hours - center))
        return np.exp(-0.5 * (gap / width) ** 2)

    curve = 0.15 + 0.5 * bump(8, 1.5) + 0.45 * bump(12.5, 1.5) + 1.0 * bump(20.5, 2.2)
    return curve / curve.sum()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def build_world(cfg: GenerateConfig) -> World:
    """Draw a world from the config's seed. Same config, same world, bit for bit."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, WORLD_STREAM]))
    n_items, n_users, n_cat, dim = cfg.items, cfg.users, cfg.categories, cfg.latent_dim

    # Categories differ in size; each has a direction in taste space that its items lean towards.
    category_share = rng.dirichlet(np.full(n_cat, 2.0))
    centers = _unit_rows(rng.normal(size=(n_cat, dim)))

    item_category = rng.choice(n_cat, size=n_items, p=category_share).astype(np.int64)
    item_latent = 0.8 * centers[item_category] + 0.6 * _unit_rows(rng.normal(size=(n_items, dim)))
    ranks = rng.permutation(n_items)
    popularity = (ranks + _ZIPF_OFFSET) ** -_ZIPF_EXPONENT
    popularity /= popularity.sum()
    # Old items entered the catalogue up to two months before the start; new ones arrive daily.
    is_new = rng.random(n_items) < (_NEW_ITEM_SHARE if cfg.days > 1 else 0.0)
    is_new[np.argmax(popularity)] = False  # the catalogue is never empty on day 0
    release_day = np.where(
        is_new, rng.integers(1, max(cfg.days, 2), n_items), -rng.integers(0, 60, n_items)
    ).astype(np.int64)
    log_pop = np.log(popularity)
    # Popular items are slightly better on average, but exposure, not quality, makes them popular.
    quality = rng.normal(0.0, 0.3, n_items) + 0.3 * (log_pop - log_pop.mean()) / log_pop.std()

    activity = rng.lognormal(0.0, 1.2, n_users)
    activity /= activity.sum()
    user_categories = rng.choice(n_cat, size=(n_users, 3), p=category_share).astype(np.int64)
    # Taste leans towards the preferred categories' directions, plus a personal component.
    category_pull = np.einsum("k,ukd->ud", np.array([0.6, 0.3, 0.1]), centers[user_categories])
    taste = category_pull + 0.35 * _unit_rows(rng.normal(size=(n_users, dim)))
    drift = _TASTE_DRIFT_PER_DAY * _unit_rows(rng.normal(size=(n_users, dim)))
    user_bias = rng.normal(0.0, 0.4, n_users)
    user_device = rng.choice(len(DEVICES), size=n_users, p=_DEVICE_SHARE).astype(np.int64)

    # Each category peaks at a time of day (news in the morning, entertainment in the evening).
    peak_hour = rng.choice(np.array([8.0, 13.0, 18.0, 21.0]), size=n_cat)
    amplitude = rng.uniform(0.1, 0.5, n_cat)
    hours = np.arange(24, dtype=np.float64)[:, None]
    hour_category = amplitude * np.cos(2 * np.pi * (hours - peak_hour) / 24)

    return World(
        config=cfg,
        item_category=item_category,
        item_popularity=popularity,
        item_release_day=release_day,
        item_quality=quality,
        item_latent=item_latent,
        user_activity=activity,
        user_taste=taste,
        user_drift=drift,
        user_bias=user_bias,
        user_device=user_device,
        user_categories=user_categories,
        hour_traffic=diurnal_traffic(),
        hour_category=hour_category,
        device_effect=_DEVICE_EFFECT.copy(),
        position_effect=-0.5 * np.log1p(np.arange(FEED_SLOTS, dtype=np.float64)),
        global_bias=-1.8,
        taste_scale=2.5,
        age_penalty=0.8,
        age_scale_days=3.0,
    )
