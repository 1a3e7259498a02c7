"""GET /metrics: Prometheus text with the HTTP request metrics and the engine's counters, per app."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gpt2serve.api.app import create_app
from gpt2serve.settings import Settings


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_after_a_generation(client: httpx.Client) -> None:
    before = scrape(client)
    body = {"input": "Hello", "mode": "greedy", "num_return_sequences": 2, "max_new_tokens": 4}
    assert client.post("/endpoints/my-endpoint/invocations", json=body).status_code == 200
    assert client.post("/invocations", json={"input": "a", "top_p": 2.0}).status_code == 400
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    route = "/endpoints/{endpoint_name}/invocations"  # the template, not the endpoint's name
    assert grew("gpt2serve_http_requests_total", method="POST", route=route, status="200") == 1
    assert grew("gpt2serve_http_requests_total", method="POST", route="/invocations", status="400") == 1
    assert grew("gpt2serve_http_request_duration_seconds_count", method="POST", route=route) == 1
    assert after[("gpt2serve_http_request_duration_seconds_sum", (("method", "POST"), ("route", route)))] > 0
    assert grew("gpt2serve_engine_decode_steps_total") >= 3  # greedy: one sequence, 1 prefill + 3 steps
    assert grew("gpt2serve_engine_decoded_tokens_total") >= 3
    assert grew("gpt2serve_engine_prefill_tokens_total") >= 1
    assert grew("gpt2serve_engine_requests_total", outcome="finished") >= 1
    assert after[("gpt2serve_engine_max_step_batch", ())] >= 1
    assert after[("gpt2serve_ready", ())] == 1
    assert after[("gpt2serve_engine_slots", ())] == 32
    for name in ("slots_in_use", "queue_depth", "running_requests"):
        assert after[(f"gpt2serve_engine_{name}", ())] == 0
    assert ("gpt2serve_engine_requests_total", (("outcome", "cancelled"),)) in after


def test_each_app_has_its_own_registry() -> None:
    settings = Settings(model="random:gpt2", device="cpu")
    first, second = create_app(settings), create_app(settings)  # no "Duplicated timeseries" error
    assert first.state.metrics.registry is not second.state.metrics.registry
    first.state.metrics.observe("GET", "/ping", 200, 0.01)
    sample = ("gpt2serve_http_requests_total", {"method": "GET", "route": "/ping", "status": "200"})
    assert first.state.metrics.registry.get_sample_value(*sample) == 1
    assert second.state.metrics.registry.get_sample_value(*sample) is None
