from __future__ import annotations

import pytest

from services.optimizer.analysis import analyze

WINDOW = 3600


@pytest.fixture
def crafted(conn, models, log):
    ids = {name: m["id"] for name, m in models.items()}
    smol, gemma = ids["smollm2:135m-instruct-q4_1"], ids["gemma3:270m-q4_k_m"]
    # smollm2: half of its attempts fail; it alone serves classification. Its JSON passes validation.
    log(smol, n=10, task_type="classification", output_format="json", validation_passed=True)
    log(smol, n=10, task_type="classification", success=False, error_class="timeout")
    log(smol, n=9, output_format="json", validation_passed=True)
    log(smol, n=1, output_format="json", validation_passed=False)
    # gemma3: succeeds, but a quarter of its JSON passes; others serve its task types.
    log(gemma, n=5, output_format="json", validation_passed=True)
    log(gemma, n=15, output_format="json", validation_passed=False)
    log(gemma, n=10, success=False, error_class="bad_output")
    # codellama:7b: runs on 4 cores and 8 GB, uses a fifth of a core and 1 GB.
    code = ids["codellama:7b"]
    conn.execute("""INSERT INTO container_lifecycle (model_id, driver, status, allocated_cpu, allocated_memory)
                    VALUES (%s, 'docker', 'running', 4, 8192)""", (code,))
    log(code, n=20, task_type="code-generation", cpu_usage_percent=20, memory_used_mb=1000)
    # mistral: killed for memory twice.
    log(ids["mistral:7b"], n=2, success=False, error_class="OOM")
    # llama2:7b: in each of 5 buckets, more requests and a higher p95.
    for k in range(5):
        conn.execute("""INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, logged_at)
                        SELECT %s, 'text-generation', %s, true, now() - make_interval(secs => %s)
                        FROM generate_series(1, %s)""", (ids["llama2:7b"], 100 * (k + 1), k * 300 + 10, k + 1))
    # wizard-coder has a request assigned: it was chosen even without logs.
    conn.execute("""INSERT INTO request_queue (request_payload, task_type, assigned_model_id)
                    VALUES ('{}', 'code-generation', %s)""", (ids["wizard-coder:15b"],))
    return ids


def _of(found, kind):
    return [r for r in found if r["kind"] == kind]


def test_low_success_rate_demote_or_replace(conn, crafted):
    found = analyze(conn, WINDOW)
    assert _of(found, "low_success_rate") == [
        {"kind": "low_success_rate", "recommendation": "demote", "model_id": crafted["gemma3:270m-q4_k_m"],
         "model_name": "gemma3:270m-q4_k_m", "output_format": None, "window_seconds": WINDOW,
         "detail": "67% of 30 attempts succeeded (threshold 80%)",
         "evidence": {"success_rate": pytest.approx(2 / 3), "request_count": 30, "threshold": 0.8,
                      "has_alternative": True}},
        {"kind": "low_success_rate", "recommendation": "replace", "model_id": crafted["smollm2:135m-instruct-q4_1"],
         "model_name": "smollm2:135m-instruct-q4_1", "output_format": None, "window_seconds": WINDOW,
         "detail": "67% of 30 attempts succeeded (threshold 80%)",
         "evidence": {"success_rate": pytest.approx(2 / 3), "request_count": 30, "threshold": 0.8,
                      "has_alternative": False}},
    ]


def test_low_validation_rate_for_a_format_names_a_better_model(conn, crafted):
    assert _of(analyze(conn, WINDOW), "low_validation_pass_rate") == [{
        "kind": "low_validation_pass_rate", "recommendation": "prefer_other_model",
        "model_id": crafted["gemma3:270m-q4_k_m"], "model_name": "gemma3:270m-q4_k_m", "output_format": "json",
        "window_seconds": WINDOW,
        "detail": "25% of 20 json outputs passed validation; smollm2:135m-instruct-q4_1 passes 95%",
        "evidence": {"validation_pass_rate": 0.25, "validated": 20, "threshold": 0.8,
                     "better_model_id": str(crafted["smollm2:135m-instruct-q4_1"]), "better_model_pass_rate": 0.95},
    }]


def test_over_allocated(conn, crafted):
    code = crafted["codellama:7b"]
    assert _of(analyze(conn, WINDOW), "over_allocated") == [
        {"kind": "over_allocated", "recommendation": "reduce_cpu", "model_id": code, "model_name": "codellama:7b",
         "output_format": None, "window_seconds": WINDOW, "detail": "uses 0.20 of 4 allocated cores on average",
         "evidence": {"avg_cpu_percent": 20.0, "allocated_cpu": 4.0, "samples": 20, "threshold_share": 0.25}},
        {"kind": "over_allocated", "recommendation": "reduce_memory", "model_id": code, "model_name": "codellama:7b",
         "output_format": None, "window_seconds": WINDOW, "detail": "peaks at 1000 MB of 8192 MB allocated",
         "evidence": {"max_memory_mb": 1000.0, "avg_memory_mb": 1000.0, "allocated_memory_mb": 8192.0,
                      "samples": 20, "threshold_share": 0.5}},
    ]


def test_under_allocated(conn, crafted):
    found = _of(analyze(conn, WINDOW), "under_allocated")
    assert [(r["model_name"], r["recommendation"], r["detail"]) for r in found] == [
        ("llama2:7b", "increase_cpu", "p95 rises with load (r=1.00) from 100 to 500 ms"),
        ("mistral:7b", "increase_memory", "2 attempts were killed for resources"),
    ]
    assert found[0]["evidence"] == {"load_latency_correlation": pytest.approx(1.0), "buckets": 5,
                                    "min_bucket_p95_ms": 100.0, "max_bucket_p95_ms": 500.0, "allocated_cpu": None}
    assert found[1]["evidence"] == {"resource_errors": 2, "request_count": 2, "allocated_memory_mb": None,
                                    "error_classes": ["oom", "oom_killed", "killed", "out_of_memory"]}


def test_never_chosen_models_are_removal_candidates(conn, crafted):
    unused = _of(analyze(conn, WINDOW), "unused")
    assert sorted(r["model_name"] for r in unused) == ["codellama:13b", "llama2:13b", "neural-chat:7b", "orca-mini:3b"]
    assert unused[0]["evidence"] == {"request_count": 0, "assigned_requests": 0}


def test_analysis_endpoint(client, crafted):
    response = client.get("/analysis", query_string={"window_seconds": WINDOW})
    assert response.status_code == 200
    assert response.json["window_seconds"] == WINDOW
    assert len(response.json["recommendations"]) == 2 + 1 + 2 + 2 + 4
    bad = client.get("/analysis", query_string={"window_seconds": "week"})
    assert bad.status_code == 422 and bad.json["errors"] == {"query": {"window_seconds": ["Not a valid integer."]}}
