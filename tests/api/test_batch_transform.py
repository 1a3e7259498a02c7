"""Batch transform as SageMaker drives it: MultiRecord bodies labelled application/json under
SAGEMAKER_BATCH=true, /execution-parameters from the job's environment, the production-variant header."""

from __future__ import annotations

import json

import httpx

from gpt2serve.settings import Settings

RECORDS = [{"input": f"Record {i}:", "max_new_tokens": 3, "seed": i, "num_return_sequences": 1}
           for i in range(3)]  # fmt: skip
BATCH_ENV = {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "8",
             "SAGEMAKER_BATCH_STRATEGY": "SINGLE_RECORD"}  # fmt: skip


def test_settings_read_the_batch_job_environment() -> None:
    settings = Settings.from_env(BATCH_ENV)
    assert (settings.batch_transform, settings.max_concurrent_transforms) == (True, 8)
    assert settings.batch_strategy == "SINGLE_RECORD"
    assert Settings.from_env({}).batch_transform is False


def test_multi_record_json_in_a_batch_job(process_server, tiny_checkpoint) -> None:
    server = process_server("--model", str(tiny_checkpoint), env=BATCH_ENV)
    server.wait_ready()
    params = httpx.get(f"{server.url}/execution-parameters").json()
    assert params["MaxConcurrentTransforms"] == 8 and params["BatchStrategy"] == "SINGLE_RECORD"
    body = "\n".join(json.dumps(r) for r in RECORDS) + "\n"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    for path in ("/invocations", "/endpoints/gpt-2/invocations"):
        r = httpx.post(server.url + path, content=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        answers = [json.loads(line) for line in r.text.splitlines()]
        assert [a[0][: len(f"Record {i}:")] for i, a in enumerate(answers)] == [r["input"] for r in RECORDS]
    one = httpx.post(server.url + "/invocations", content=json.dumps(RECORDS[0], indent=2), headers=headers)
    assert one.status_code == 200 and isinstance(one.json(), list)  # one object over several lines


def test_a_multi_record_body_outside_a_batch_job_is_refused(client: httpx.Client) -> None:
    body = "\n".join(json.dumps(r) for r in RECORDS)
    r = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "Extra data" in r.json()["error"]["message"]


def test_runtime_path_names_the_production_variant(client: httpx.Client) -> None:
    ok = client.post("/endpoints/gpt-2/invocations", json={**RECORDS[0]})
    bad = client.post("/endpoints/gpt-2/invocations", json={"input": "x", "top_p": 2})
    assert (ok.status_code, bad.status_code) == (200, 424)
    assert ok.headers["x-amzn-invoked-production-variant"] == "AllTraffic"
    assert bad.headers["x-amzn-invoked-production-variant"] == "AllTraffic"
