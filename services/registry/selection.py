"""Which models can take a request, ranked by a score that explains itself.

Eligibility, checked in this order (a model is reported under the first rule it breaks): it
serves the task type, is active, its runtime driver is enabled (`settings.runtime_drivers`), its
complexity_score is at least the requested complexity (it is capable enough), its base memory fits
`max_memory_mb`, it carries the required tags, it is not excluded, and its expected latency
fits `max_latency_ms`.

Speed. The catalogue's request-independent facts (below) are held in memory as arrays, keyed by
the catalogue version (bumped by a trigger on every write to model_registry) and the refresh time
of the performance view; each selection reads that key and the warm runtimes in one small query,
filters and scores with array arithmetic, then reads the full rows of the top candidates only
(once per catalogue: they are cached with it). A ranking is a pure function of that state, the
request and the enabled drivers, so the last RANKINGS_KEPT rankings are kept for requests that
repeat (a workflow sends the same kind of request again and again).

Evidence. Each figure blends what was measured in the last 24 hours (the materialized view
`model_performance_summary`, n samples) with the catalogue's prior (`performance_metrics`) by
Bayesian shrinkage with PRIOR_WEIGHT pseudo-samples: value = (n * measured + k * prior) / (n + k).
Missing priors fall back to DEFAULT_* constants (p95 from avg_latency_ms x P95_PER_MEAN; the
validation and feedback priors from `accuracy`). The feedback score's n is its ratings in the window.

Cold start. A model is warm when one of its runtimes is 'running' and not 'unhealthy' (the shared
`container_lifecycle` table); external endpoints are always warm. A cold model's expected latency
is p95 + load time: measured (the view's avg_load_time, from the load_time_ms the orchestrator
logs on the attempt that loaded the model), else the prior load_time_ms, else
DEFAULT_LOAD_TIME_MS for its driver.

Score = sum over objectives of weight x objective (weights normalised to sum 1), each in (0, 1]:
  speed    = 1 / (1 + expected_latency_ms / LATENCY_SCALE_MS)
  accuracy = success_rate x (2/3 validation_pass_rate + 1/3 feedback_score)
  memory   = 1 / (1 + base_memory_requirement / MEMORY_SCALE_MB)
  cost     = 1 / (1 + (complexity_score - requested complexity) / COST_SCALE): the smallest
             capable model costs least
plus an exploration bonus (UCB1): EXPLORATION_C x sqrt(ln(1 + N) / (1 + n)), where n is the
model's sample count and N the sum over all eligible models, so a new model gets a fair chance
and the bonus shrinks as it is measured; plus WARM_BONUS for a warm model when `prefer_warm`.
Ties are broken by name, version and id: the same data always gives the same ranking.
"""
from __future__ import annotations

import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import psycopg

from services.common.config import Settings
from services.common.validation import NAME_VERSION
from services.common.errors import Unprocessable
from services.registry import queries

COMPLEXITY_LEVELS = {"low": 3, "medium": 6, "high": 9}
OBJECTIVES = ("speed", "accuracy", "memory", "cost")
DEFAULT_WEIGHTS = {"speed": 0.3, "accuracy": 0.4, "memory": 0.15, "cost": 0.15}

PRIOR_WEIGHT = 20
DEFAULT_SUCCESS_RATE = 0.9
DEFAULT_ACCURACY = 0.5
DEFAULT_P95_MS = 2000.0
P95_PER_MEAN = 1.5
DEFAULT_LOAD_TIME_MS = {"process": 2000.0, "docker": 10000.0, "external": 0.0}
LATENCY_SCALE_MS = 1000.0
MEMORY_SCALE_MB = 4096.0
COST_SCALE = 3.0
EXPLORATION_C = 0.1
WARM_BONUS = 0.1
EXAMPLES_PER_REASON = 5

REASONS = {
    "task_type": "task type {task_type} not served",
    "active": "inactive",
    "runtime_driver": "driver {driver} not enabled",
    "complexity": "complexity_score below {complexity}",
    "max_memory_mb": "base_memory_requirement above max_memory_mb {max_memory_mb}",
    "required_tags": "missing one of the required tags",
    "exclude": "excluded by the request",
    "max_latency_ms": "expected latency above max_latency_ms {max_latency_ms}",
}


@dataclass(frozen=True)
class SelectionRequest:
    """What a request needs from a model; `weights` None means DEFAULT_WEIGHTS."""

    task_type: str
    complexity: int = 1
    max_memory_mb: int | None = None
    max_latency_ms: int | None = None
    weights: Mapping[str, float] | None = None
    required_tags: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    prefer_warm: bool = False
    limit: int = 5


@dataclass(frozen=True)
class Candidate:
    model: dict
    score: float
    breakdown: dict[str, float]
    data: dict


@dataclass(frozen=True)
class FilterGroup:
    """Models dropped for one reason: how many, and the first few of them (name:version)."""

    constraint: str
    reason: str
    count: int
    models: list[str]


@dataclass(frozen=True)
class Selection:
    task_type: str
    complexity: int
    weights: dict[str, float]
    eligible_count: int
    candidates: list[Candidate] = field(default_factory=list)
    filtered: list[FilterGroup] = field(default_factory=list)
    # The prompt templates' version read with the selection state; None: not known (build reads).
    templates_version: str | None = None


class NoCandidate(Unprocessable):
    """No model is left; the problem body says which constraints eliminated them."""

    def __init__(self, request: SelectionRequest, filtered: list[FilterGroup]) -> None:
        summary = "; ".join(f"{g.count} {g.reason}" for g in filtered) or "no model registered"
        super().__init__(f"No model can take this {request.task_type} request: {summary}.",
                         task_type=request.task_type, complexity=request.complexity,
                         filtered=[vars(g) for g in filtered])


class Catalogue:
    """Every model's request-independent facts as arrays, in (name, version, id) order.

    Built once per catalogue version and performance refresh (see `_CatalogueCache`), so a
    selection does array arithmetic instead of reading and scoring thousands of rows.
    """

    def __init__(self, rows: list[dict]) -> None:
        self.ids = [row["id"] for row in rows]
        self.refs = np.array([f"{row['name']}:{row['version']}" for row in rows], dtype=object)
        # Newest first (created_at, then version, both descending), as a name alone means the newest.
        self.versions_of: dict[str, list[int]] = {}
        for i in sorted(range(len(rows)), key=lambda i: (rows[i]["created_at"], rows[i]["version"]), reverse=True):
            self.versions_of.setdefault(rows[i]["name"], []).append(i)
        self.position = {ref: i for i, ref in enumerate(self.refs)}
        self.position.update((str(model_id), i) for i, model_id in enumerate(self.ids))
        self.serves = _membership(rows, "task_types")
        self.tagged = _membership(rows, "tags")
        self.active = np.array([row["active"] for row in rows], dtype=bool)
        self.complexity = np.array([row["complexity_score"] for row in rows], dtype=np.int64)
        self.memory_mb = np.array([row["base_memory_requirement"] for row in rows], dtype=np.int64)
        self.drivers = _membership(rows, "runtime_driver")
        self.external = self.drivers.get("external", np.zeros(len(rows), dtype=bool))
        evidence = np.array([_blended(row) for row in rows], dtype=np.float64).reshape(-1, 7)
        (self.success_rate, self.p95_latency_ms, self.tokens_per_second, self.validation_pass_rate,
         self.feedback_score, self.sample_size, self.load_time_ms) = evidence.T
        self.accuracy = self.success_rate * (2 * self.validation_pass_rate + self.feedback_score) / 3
        self.memory = 1.0 / (1.0 + self.memory_mb / MEMORY_SCALE_MB)
        self._rows: dict[uuid.UUID, dict] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def serving(self, task_type: str) -> np.ndarray:
        return self.serves.get(task_type, np.zeros(len(self), dtype=bool)).copy()

    def with_tags(self, tags: Iterable[str]) -> np.ndarray:
        mask = np.ones(len(self), dtype=bool)
        for tag in tags:
            mask &= self.tagged.get(tag, np.zeros(len(self), dtype=bool))
        return mask

    def rows(self, conn: psycopg.Connection, ids: list[uuid.UUID]) -> dict[uuid.UUID, dict]:
        """Full model_registry rows by id, read once per catalogue (any write makes a new one)."""
        missing = [model_id for model_id in ids if model_id not in self._rows]
        if missing:
            self._rows.update((row["id"], row) for row in queries.get_models(conn, missing))
        return {model_id: self._rows[model_id] for model_id in ids if model_id in self._rows}

    def named(self, name: str, version: str | None) -> uuid.UUID | None:
        """The active model name:version, or without a version the newest active one of the name."""
        for i in self.versions_of.get(name, ()):
            if self.active[i] and (version is None or self.refs[i] == f"{name}:{version}"):
                return self.ids[i]
        return None

    def marked(self, refs: Iterable[str]) -> np.ndarray:
        """The models named by id (lower-case text) or name:version."""
        mask = np.zeros(len(self), dtype=bool)
        mask[[self.position[ref] for ref in refs if ref in self.position]] = True
        return mask


class _CatalogueCache:
    """The catalogue of the latest (catalogue version, performance refresh) this process saw."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, Catalogue] | None = None

    def get(self, conn: psycopg.Connection, key: tuple) -> Catalogue:
        entry = self._entry
        if entry is None or entry[0] != key:
            # Another thread may build it too; the last one wins and both are correct.
            entry = (key, Catalogue(queries.selection_facts(conn)))
            self._entry = entry
        return entry[1]


_catalogues = _CatalogueCache()


class _RankingCache:
    """The latest rankings, by (state, request, drivers); a Selection kept here is never changed."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[tuple, Selection] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Selection | None:
        with self._lock:
            selection = self._entries.get(key)
            if selection is not None:
                self._entries.move_to_end(key)
            return selection

    def put(self, key: tuple, selection: Selection) -> None:
        with self._lock:
            self._entries[key] = selection
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)


RANKINGS_KEPT = 256
_rankings = _RankingCache(RANKINGS_KEPT)


class StaleSelection(Exception):
    """The selection state changed since a selection was made on it: select again, on `state`."""

    def __init__(self, state: dict) -> None:
        super().__init__("the selection state has changed")
        self.state = state


_last_state: dict | None = None


def last_state() -> dict | None:
    """The selection state this process saw last (read, or returned by a lease that checked it).

    A dispatch selects on it without reading the state first when the statement leasing its
    runtime checks that it is still current (StaleSelection otherwise): a round trip less.
    """
    return _last_state


def _remember(state: dict) -> None:
    global _last_state
    _last_state = state


def checked_state(row: dict) -> dict:
    """Take the selection state's columns out of a row of a statement that checked it (and
    remember that state); StaleSelection if it was no longer the one checked."""
    state = {key: row.pop(key) for key in queries.SELECTION_STATE_COLUMNS}
    _remember(state)
    if not row.pop("state_unchanged"):
        raise StaleSelection(state)
    return state


def _read_state(conn: psycopg.Connection) -> dict:
    state = queries.selection_state(conn)
    _remember(state)
    return state


def select_models(conn: psycopg.Connection, request: SelectionRequest, settings: Settings,
                  state: dict | None = None) -> Selection:
    """Rank the models that can take `request`, on `state` (read now if not given); raise
    NoCandidate when none can."""
    state = state if state is not None else _read_state(conn)
    key = (state["catalogue_version"], state["refreshed_at"], tuple(state["warm_model_ids"]),
           state["templates_version"], _request_key(request), tuple(settings.runtime_drivers))
    selection = _rankings.get(key)
    if selection is None:
        selection = _rank(conn, request, settings, state)
        _rankings.put(key, selection)
    return selection


def find_model(conn: psycopg.Connection, ref: str, state: dict | None = None) -> tuple[dict | None, str]:
    """The active model `ref` names ("name:version", or "name": its newest active version), and the
    templates version: from the in-memory catalogue of `state` (read now if not given)."""
    state = state if state is not None else _read_state(conn)
    catalogue = _catalogues.get(conn, (state["catalogue_version"], state["refreshed_at"]))
    name, _, version = ref.partition(":")
    model_id = catalogue.named(name, version or None)
    model = catalogue.rows(conn, [model_id]).get(model_id) if model_id else None
    return model, state["templates_version"]


def _request_key(request: SelectionRequest) -> tuple:
    weights = tuple(sorted(request.weights.items())) if request.weights is not None else None
    return (request.task_type, request.complexity, request.max_memory_mb, request.max_latency_ms, weights,
            request.required_tags, request.exclude, request.prefer_warm, request.limit)


def _rank(conn: psycopg.Connection, request: SelectionRequest, settings: Settings, state: dict) -> Selection:
    catalogue = _catalogues.get(conn, (state["catalogue_version"], state["refreshed_at"]))
    warm = catalogue.marked(state["warm_model_ids"]) | catalogue.external
    expected_latency = catalogue.p95_latency_ms + np.where(warm, 0.0, catalogue.load_time_ms)
    eligible, filtered = _eligible(catalogue, request, settings, expected_latency)
    if not eligible.size:
        raise NoCandidate(request, filtered or _nothing_serves(catalogue, request))

    weights = _normalised(request.weights or DEFAULT_WEIGHTS)
    samples = catalogue.sample_size[eligible]
    parts = {
        "speed": weights["speed"] / (1.0 + expected_latency[eligible] / LATENCY_SCALE_MS),
        "accuracy": weights["accuracy"] * catalogue.accuracy[eligible],
        "memory": weights["memory"] * catalogue.memory[eligible],
        "cost": weights["cost"] / (1.0 + (catalogue.complexity[eligible] - request.complexity)
                                   / COST_SCALE),
        "exploration": EXPLORATION_C * np.sqrt(np.log1p(samples.sum()) / (1.0 + samples)),
        "warm": WARM_BONUS * warm[eligible] if request.prefer_warm else np.zeros(eligible.size),
    }
    scores = sum(parts.values())
    # Stable: equal scores keep the catalogue's (name, version, id) order.
    ranked = np.argsort(-scores, kind="stable")[:request.limit]
    models = catalogue.rows(conn, [catalogue.ids[eligible[r]] for r in ranked])
    candidates = [
        Candidate(model=models[catalogue.ids[i]], score=float(scores[r]),
                  breakdown={name: float(part[r]) for name, part in parts.items()},
                  data=_data(catalogue, i, bool(warm[i]), float(expected_latency[i]),
                             float(parts["exploration"][r])))
        for r, i in zip(ranked, eligible[ranked]) if catalogue.ids[i] in models]
    return Selection(task_type=request.task_type, complexity=request.complexity, weights=weights,
                     eligible_count=int(eligible.size), candidates=candidates, filtered=filtered,
                     templates_version=state["templates_version"])


def _rules(catalogue: Catalogue, request: SelectionRequest, settings: Settings,
           expected_latency: np.ndarray) -> Iterator[tuple[str, np.ndarray, str]]:
    """(constraint, the models that break it, driver) in the order they are checked."""
    yield "active", ~catalogue.active, ""
    for driver in sorted(catalogue.drivers.keys() - set(settings.runtime_drivers)):
        yield "runtime_driver", catalogue.drivers[driver], driver
    yield "complexity", catalogue.complexity < request.complexity, ""
    if request.max_memory_mb is not None:
        yield "max_memory_mb", catalogue.memory_mb > request.max_memory_mb, ""
    if request.required_tags:
        yield "required_tags", ~catalogue.with_tags(request.required_tags), ""
    if request.exclude:
        yield "exclude", catalogue.marked(map(_normal_ref, request.exclude)), ""
    if request.max_latency_ms is not None:
        yield "max_latency_ms", expected_latency > request.max_latency_ms, ""


def _eligible(catalogue: Catalogue, request: SelectionRequest, settings: Settings,
              expected_latency: np.ndarray) -> tuple[np.ndarray, list[FilterGroup]]:
    """Positions of the eligible models, and the others grouped by the first rule they break."""
    remaining = catalogue.serving(request.task_type)
    filtered = []
    for constraint, breaks, driver in _rules(catalogue, request, settings, expected_latency):
        dropped = np.flatnonzero(remaining & breaks)
        if dropped.size:
            filtered.append(_group(constraint, request, int(dropped.size),
                                   catalogue.refs[dropped[:EXAMPLES_PER_REASON]].tolist(), driver))
            remaining &= ~breaks
    return np.flatnonzero(remaining), filtered


def _blend(measured: float | None, n: int, prior: float) -> float:
    if measured is None or not n:
        return prior
    return (n * measured + PRIOR_WEIGHT * prior) / (n + PRIOR_WEIGHT)


def _blended(row: dict) -> tuple[float, ...]:
    """success, p95, tokens/s (nan if unknown), validation, feedback, samples, load time."""
    n = row["total_requests"]
    accuracy = _first(row["prior_accuracy"], DEFAULT_ACCURACY)
    prior_p95 = _first(row["prior_p95_latency_ms"],
                       None if row["prior_avg_latency_ms"] is None
                       else row["prior_avg_latency_ms"] * P95_PER_MEAN, DEFAULT_P95_MS)
    prior_tps = row["prior_tokens_per_second"]
    tps = row["tokens_per_second"] if prior_tps is None else _blend(row["tokens_per_second"], n,
                                                                     prior_tps)
    return (
        _blend(row["success_rate"], n, _first(row["prior_success_rate"], DEFAULT_SUCCESS_RATE)),
        _blend(row["p95_latency_ms"], n, prior_p95),
        math.nan if tps is None else tps,
        _blend(row["validation_pass_rate"], row["validated_requests"],
               _first(row["prior_validation_pass_rate"], accuracy)),
        _blend(row["feedback_score"], row["feedback_count"], _first(row["prior_feedback_score"], accuracy)),
        n,
        _first(row["load_time_ms"], row["prior_load_time_ms"],
               DEFAULT_LOAD_TIME_MS[row["runtime_driver"]]),
    )


def _first(*values: float | None) -> float | None:
    return next((value for value in values if value is not None), None)


def _membership(rows: list[dict], key: str) -> dict[str, np.ndarray]:
    """For each value of a column (or of an array column), which models have it."""
    masks: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        for value in row[key] if isinstance(row[key], list) else [row[key]]:
            masks.setdefault(value, np.zeros(len(rows), dtype=bool))[i] = True
    return masks


def _normal_ref(ref: str) -> str:
    """A name:version as it is (`urn:0123…` is one, though uuid.UUID would read it as an id), an id
    in its canonical text."""
    if NAME_VERSION.fullmatch(ref):
        return ref
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        return ref


def _data(catalogue: Catalogue, i: int, warm: bool, expected_latency_ms: float,
          exploration_bonus: float) -> dict:
    tokens_per_second = float(catalogue.tokens_per_second[i])
    return {
        "success_rate": float(catalogue.success_rate[i]),
        "p95_latency_ms": float(catalogue.p95_latency_ms[i]),
        "tokens_per_second": None if math.isnan(tokens_per_second) else tokens_per_second,
        "validation_pass_rate": float(catalogue.validation_pass_rate[i]),
        "feedback_score": float(catalogue.feedback_score[i]),
        "sample_size": int(catalogue.sample_size[i]),
        "warm": warm,
        "load_time_ms": float(catalogue.load_time_ms[i]),
        "expected_latency_ms": expected_latency_ms,
        "exploration_bonus": exploration_bonus,
    }


def _normalised(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.get(name, 0.0) for name in OBJECTIVES)
    if total <= 0:
        raise Unprocessable("At least one weight must be above 0.")
    return {name: weights.get(name, 0.0) / total for name in OBJECTIVES}


def _group(constraint: str, request: SelectionRequest, count: int, models: list[str],
           driver: str = "") -> FilterGroup:
    reason = REASONS[constraint].format(driver=driver, **vars(request))
    return FilterGroup(constraint=constraint, reason=reason, count=count, models=models)


def _nothing_serves(catalogue: Catalogue, request: SelectionRequest) -> list[FilterGroup]:
    return [_group("task_type", request, len(catalogue), [])] if len(catalogue) else []
