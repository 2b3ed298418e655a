"""Which models can take a request, ranked by a score that explains itself.

Eligibility (checked in SQL, first broken rule wins): the model is active, serves the task type,
its runtime driver is enabled (`settings.runtime_drivers`), its complexity_score is at least the
requested complexity (it is capable enough), its base memory fits `max_memory_mb`, it carries the
required tags and it is not excluded. Then, in Python: its expected latency fits `max_latency_ms`.

Evidence. Each figure blends what was measured in the last 24 hours (the materialized view
`model_performance_summary`, n samples) with the catalogue's prior (`performance_metrics`) by
Bayesian shrinkage with PRIOR_WEIGHT pseudo-samples: value = (n * measured + k * prior) / (n + k).
Missing priors fall back to DEFAULT_* constants (p95 from avg_latency_ms x P95_PER_MEAN; the
validation and feedback priors from `accuracy`). Feedback is weighted as the window's requests.

Cold start. A model is warm when one of its runtimes is 'running' and not 'unhealthy' (the shared
`container_lifecycle` table); external endpoints are always warm. A cold model's expected latency
is p95 + load time (measured: the view's avg_load_time, else its runtimes' load_time_ms; else
the prior load_time_ms; else DEFAULT_LOAD_TIME_MS for its driver).

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

import heapq
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import psycopg

from services.common.config import Settings
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


class NoCandidate(Unprocessable):
    """No model is left; the problem body says which constraints eliminated them."""

    def __init__(self, request: SelectionRequest, filtered: list[FilterGroup]) -> None:
        summary = "; ".join(f"{g.count} {g.reason}" for g in filtered) or "no model registered"
        super().__init__(f"No model can take this {request.task_type} request: {summary}.",
                         task_type=request.task_type, complexity=request.complexity,
                         filtered=[vars(g) for g in filtered])


class Evidence(NamedTuple):
    """One eligible model's blended figures."""

    row: tuple
    success_rate: float
    p95_latency_ms: float
    tokens_per_second: float | None
    validation_pass_rate: float
    feedback_score: float
    sample_size: int
    warm: bool
    load_time_ms: float
    expected_latency_ms: float


def select_models(conn: psycopg.Connection, request: SelectionRequest,
                  settings: Settings) -> Selection:
    """Rank the models that can take `request`; raise NoCandidate when none can."""
    params = _query_params(request, settings)
    evidence = [_evidence(row) for row in queries.eligible_evidence(conn, params)]
    filtered = _filtered_in_sql(conn, params, request)
    if request.max_latency_ms is not None:
        too_slow = [e for e in evidence if e.expected_latency_ms > request.max_latency_ms]
        evidence = [e for e in evidence if e.expected_latency_ms <= request.max_latency_ms]
        if too_slow:
            filtered.append(_group("max_latency_ms", [_ref(e.row) for e in too_slow], request))
    if not evidence:
        raise NoCandidate(request, filtered or _nothing_serves(conn, request))

    weights = _normalised(request.weights or DEFAULT_WEIGHTS)
    total_samples = sum(e.sample_size for e in evidence)
    scored = ((_score(e, request, weights, total_samples), e) for e in evidence)
    top = heapq.nsmallest(request.limit, scored, key=lambda s: (-s[0], s[1].row[1], s[1].row[2],
                                                                 str(s[1].row[0])))
    models = {m["id"]: m for m in queries.get_models(conn, [e.row[0] for _, e in top])}
    candidates = [_candidate(models[e.row[0]], e, request, weights, total_samples) for _, e in top]
    return Selection(task_type=request.task_type, complexity=request.complexity, weights=weights,
                     eligible_count=len(evidence), candidates=candidates, filtered=filtered)


def _query_params(request: SelectionRequest, settings: Settings) -> dict:
    ids, refs = [], []
    for entry in request.exclude:
        try:
            ids.append(uuid.UUID(entry))
        except ValueError:
            refs.append(entry)
    return {"task_type": request.task_type, "complexity": request.complexity,
            "drivers": list(settings.runtime_drivers), "max_memory_mb": request.max_memory_mb,
            "required_tags": list(request.required_tags), "exclude_ids": ids,
            "exclude_refs": refs, "examples": EXAMPLES_PER_REASON}


def _blend(measured: float | None, n: int, prior: float) -> float:
    if measured is None or not n:
        return prior
    return (n * measured + PRIOR_WEIGHT * prior) / (n + PRIOR_WEIGHT)


def _evidence(row: tuple) -> Evidence:
    (_, _, _, _, _, driver, prior_avg, prior_p95, prior_accuracy, prior_success,
     prior_validation, prior_feedback, prior_tps, prior_load, n, success, p95, tps,
     validated, validation, feedback, avg_load, runtime_warm, runtime_load) = row
    n = n or 0
    accuracy = DEFAULT_ACCURACY if prior_accuracy is None else prior_accuracy
    if prior_p95 is None:
        prior_p95 = DEFAULT_P95_MS if prior_avg is None else prior_avg * P95_PER_MEAN
    p95_latency = _blend(p95, n, prior_p95)
    if prior_tps is not None:
        tps = _blend(tps, n, prior_tps)
    measured_load = avg_load if avg_load is not None else runtime_load
    load = measured_load if measured_load is not None else prior_load
    load = DEFAULT_LOAD_TIME_MS[driver] if load is None else load
    warm = bool(runtime_warm) or driver == "external"
    return Evidence(
        row=row,
        success_rate=_blend(success, n, DEFAULT_SUCCESS_RATE if prior_success is None
                            else prior_success),
        p95_latency_ms=p95_latency,
        tokens_per_second=tps,
        validation_pass_rate=_blend(validation, validated or 0,
                                    accuracy if prior_validation is None else prior_validation),
        feedback_score=_blend(feedback, n, accuracy if prior_feedback is None else prior_feedback),
        sample_size=n,
        warm=warm,
        load_time_ms=load,
        expected_latency_ms=p95_latency if warm else p95_latency + load,
    )


def _objectives(e: Evidence, complexity: int) -> tuple[float, float, float, float]:
    speed = 1.0 / (1.0 + e.expected_latency_ms / LATENCY_SCALE_MS)
    accuracy = e.success_rate * (2 * e.validation_pass_rate + e.feedback_score) / 3
    memory = 1.0 / (1.0 + e.row[4] / MEMORY_SCALE_MB)
    cost = 1.0 / (1.0 + (e.row[3] - complexity) / COST_SCALE)
    return speed, accuracy, memory, cost


def _exploration_bonus(sample_size: int, total_samples: int) -> float:
    return EXPLORATION_C * math.sqrt(math.log1p(total_samples) / (1 + sample_size))


def _score(e: Evidence, request: SelectionRequest, weights: dict[str, float],
           total_samples: int) -> float:
    speed, accuracy, memory, cost = _objectives(e, request.complexity)
    return (weights["speed"] * speed + weights["accuracy"] * accuracy
            + weights["memory"] * memory + weights["cost"] * cost
            + _exploration_bonus(e.sample_size, total_samples)
            + (WARM_BONUS if request.prefer_warm and e.warm else 0.0))


def _candidate(model: dict, e: Evidence, request: SelectionRequest, weights: dict[str, float],
               total_samples: int) -> Candidate:
    objectives = dict(zip(OBJECTIVES, _objectives(e, request.complexity)))
    bonus = _exploration_bonus(e.sample_size, total_samples)
    breakdown = {name: weights[name] * objectives[name] for name in OBJECTIVES}
    breakdown["exploration"] = bonus
    breakdown["warm"] = WARM_BONUS if request.prefer_warm and e.warm else 0.0
    data = e._asdict()
    del data["row"]
    data["exploration_bonus"] = bonus
    return Candidate(model=model, score=_score(e, request, weights, total_samples),
                     breakdown=breakdown, data=data)


def _normalised(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.get(name, 0.0) for name in OBJECTIVES)
    if total <= 0:
        raise Unprocessable("At least one weight must be above 0.")
    return {name: weights.get(name, 0.0) / total for name in OBJECTIVES}


def _ref(row: tuple) -> str:
    return f"{row[1]}:{row[2]}"


def _group(constraint: str, refs: list[str], request: SelectionRequest, driver: str = "",
           count: int | None = None) -> FilterGroup:
    reason = REASONS[constraint].format(driver=driver, **vars(request))
    return FilterGroup(constraint=constraint, reason=reason,
                       count=len(refs) if count is None else count,
                       models=sorted(refs)[:EXAMPLES_PER_REASON])


def _filtered_in_sql(conn: psycopg.Connection, params: dict,
                     request: SelectionRequest) -> list[FilterGroup]:
    return [_group(row["rule"], row["models"], request, row["driver"] or "", row["count"])
            for row in queries.ineligible_counts(conn, params)]


def _nothing_serves(conn: psycopg.Connection, request: SelectionRequest) -> list[FilterGroup]:
    total = queries.count_all_models(conn)
    return [_group("task_type", [], request, count=total)] if total else []
