"""GET /info: the served model and the current request's fields, defaults and per-mode fields; the page's
static files; and MODE_FIELDS checked against what each mode really reads."""

from __future__ import annotations

import httpx
import pytest

from gpt2serve.api.protocol import MODE_FIELDS, Mode, SeedRequest
from tests.api.conftest import ThreadServer, make_settings, wait_for

# A value other than the default for each field a mode may read.
OTHER_VALUES = {"temperature": 1.3, "top_k": 7, "top_p": 0.5, "num_beams": 4}


def test_info_describes_the_model_and_the_request(client: httpx.Client, api_server: ThreadServer) -> None:
    r = client.get("/info")
    assert r.status_code == 200
    info = r.json()
    engine = api_server.state.engine
    shape = engine.model_config
    assert info["ready"] is True and info["status"] is None
    assert info["model"] == {
        "name": engine.model_name, "parameters": shape.n_params, "dtype": "float32", "device": "cpu",
        "context_length": 128, "random_weights": False, "layers": 2, "heads": 4, "width": 64,
    }  # fmt: skip
    fields = info["request"]["fields"]
    for name, field in SeedRequest.model_fields.items():
        if not field.is_required():
            assert fields[name]["default"] == field.default, name
        if field.description:
            assert fields[name]["description"] == field.description
    assert info["request"]["required"] == ["input"]
    assert info["request"]["modes"] == {mode: list(names) for mode, names in MODE_FIELDS.items()}
    assert info["request"]["default_mode"] == "sample-top-p"


@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_mode_fields_are_the_fields_the_mode_reads(mode: str) -> None:
    base = SeedRequest(input="x", mode=mode).to_params()
    for name, value in OTHER_VALUES.items():
        changed = SeedRequest(input="x", mode=mode, **{name: value}).to_params() != base
        assert changed == (name in MODE_FIELDS[mode]), name
    assert ("seed" in MODE_FIELDS[mode]) == base.do_sample  # a seed matters only where the mode samples
    assert set(MODE_FIELDS) == {m.value for m in Mode}


def test_info_while_the_model_is_not_there(tmp_path) -> None:
    server = ThreadServer(make_settings(str(tmp_path / "no-such-model"))).start()
    try:
        info: dict = {}

        def failed() -> bool:
            info.update(httpx.get(f"{server.url}/info", timeout=10).json())
            return "could not be loaded" in (info.get("status") or "")

        wait_for(failed, timeout=30, what="the load to fail")
        assert info["ready"] is False and info["model"] is None
        assert info["request"]["fields"]["num_return_sequences"]["default"] == 3
    finally:
        server.stop()


def test_the_page_and_its_files(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/playground.js">' in page.text
    for name, kind in [("playground.js", "text/javascript"), ("playground.css", "text/css"),
                       ("sse.js", "text/javascript"), ("favicon.svg", "image/svg+xml")]:  # fmt: skip
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    for path in ["/static/nothing.js", "/static/..%2fapi%2fapp.py", "/static/%2e%2e%2f__init__.py"]:
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", path
