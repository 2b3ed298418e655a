"""Right-size a runtime: the model's base resources scaled by the load it should absorb.

load_factor = 1 + 0.5 x log2(expected_load) for a load above 1, else 1: each doubling of the
concurrent requests adds half the base (KV cache and batch threads grow, the weights do not).
cpu and gpu are rounded up to 0.1, memory up to a multiple of 64 MB; each is then held down to
the host's capacity (settings.host_cpu_cores, host_memory_mb, host_gpu_count). A model whose base
alone does not fit is refused. External models run elsewhere, so the host bounds them in nothing.
threads = whole cpus (at least 1); parallel_slots = the load rounded up, from 1 to MAX_PARALLEL_SLOTS.
"""
from __future__ import annotations

import math

from services.common.config import Settings
from services.common.errors import Unprocessable

MEMORY_STEP_MB = 64
MAX_PARALLEL_SLOTS = 16


def load_factor(expected_load: float) -> float:
    """How much of the base a runtime needs for this many concurrent requests."""
    return 1.0 + 0.5 * math.log2(expected_load) if expected_load > 1 else 1.0


def right_size(model: dict, expected_load: float, settings: Settings) -> dict:
    """The cpu, memory_mb, gpu, threads and parallel slots a runtime of `model` should get."""
    base = {"cpu": float(model["base_cpu_requirement"]),
            "memory_mb": int(model["base_memory_requirement"]),
            "gpu": float(model["base_gpu_requirement"])}
    host = {"cpu": settings.host_cpu_cores, "memory_mb": settings.host_memory_mb,
            "gpu": settings.host_gpu_count}
    bounded = model["runtime_driver"] != "external"
    too_big = {name: {"needs": base[name], "host": host[name]}
               for name in base if bounded and base[name] > host[name]}
    if too_big:
        raise Unprocessable(
            f"Model {model['name']}:{model['version']} does not fit on this host even at its base "
            f"requirements ({', '.join(sorted(too_big))}).", model_id=str(model["id"]),
            exceeds=too_big)

    factor = load_factor(expected_load)
    wanted = {"cpu": _round_up(base["cpu"] * factor, 0.1),
              "memory_mb": math.ceil(base["memory_mb"] * factor / MEMORY_STEP_MB) * MEMORY_STEP_MB,
              "gpu": _round_up(base["gpu"] * factor, 0.1)}
    capped = sorted(name for name in wanted if bounded and wanted[name] > host[name])
    sized = {name: min(wanted[name], host[name]) if name in capped else wanted[name]
             for name in wanted}
    return {**sized, "memory_mb": int(sized["memory_mb"]), "load_factor": factor,
            "threads": max(1, int(sized["cpu"])),
            "parallel_slots": min(max(1, math.ceil(expected_load)), MAX_PARALLEL_SLOTS),
            "capped": capped}


def _round_up(value: float, step: float) -> float:
    # round() first: 1.2 * 1.5 is 1.7999999999999998, which must not round up to 1.9.
    return round(math.ceil(round(value / step, 6)) * step, 6)
