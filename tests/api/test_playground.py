"""The playground page in a real browser (Debian's chromium driven by Playwright) against a live server:
beam search streamed side by side, Stop freeing the slots (seen on /metrics), an invalid field's message
next to it, markup in a prompt shown as text, and wide and narrow screenshots.

No browser is downloaded: Playwright launches the system's `chromium` (`apt-get install chromium`; .ci/run
installs it). Set PLAYGROUND_SCREENSHOTS=DIR to keep the screenshots there too (docs/ holds the README's).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import ThreadServer, make_settings, wait_for

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install .[test])"
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); none is downloaded"
)
WIDE, NARROW = {"width": 1360, "height": 900}, {"width": 390, "height": 844}
TIMEOUT_MS = 15_000
WAIT_S = 10.0


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, long_server: ThreadServer) -> Iterator[object]:
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(long_server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("parameters")
    yield page
    context.close()
    assert not [p for p in problems if "400" not in p], problems  # a refused request logs its 400


def engine_gauges(url: str) -> dict[str, float]:
    """The engine's gauges and request outcomes, read from GET /metrics."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            key = sample.name + "".join(f"[{v}]" for v in sample.labels.values())
            values[key] = sample.value
    return values


def fill(page, **fields: object) -> None:
    for name, value in fields.items():
        if name == "mode":
            page.select_option("#f-mode", str(value))
        else:
            page.fill(f"#f-{name}", str(value))


def generate_and_wait(page, count: int) -> None:
    page.click("#generate")
    sync_api.expect(page.locator("#sequences .sequence.finished")).to_have_count(count)
    sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s")


def screenshot(page, tmp_path: Path, name: str, viewport: dict[str, int]) -> Path:
    page.set_viewport_size(viewport)
    path = tmp_path / f"playground-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("PLAYGROUND_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / path.name)
    return path


def stop_frees_the_slots(page, url: str) -> None:
    """Stop during a long generation (16 x ~1000 tokens): the server frees the slots (seen on /metrics)."""
    before = engine_gauges(url)
    fill(page, mode="sample", num_return_sequences=16, max_new_tokens=1000, seed=3)
    page.press("#f-input", "Control+Enter")
    sync_api.expect(page.locator("#sequences .sequence .generated").first).not_to_have_text("")
    assert engine_gauges(url)["gpt2serve_engine_slots_in_use"] > 0
    page.click("#stop")
    sync_api.expect(page.locator("#stats")).to_contain_text("stopped")

    def freed() -> bool:
        now = engine_gauges(url)
        return now["gpt2serve_engine_slots_in_use"] == 0 and now["gpt2serve_engine_running_requests"] == 0

    wait_for(freed, timeout=WAIT_S, what="the slots to be freed")
    after = engine_gauges(url)
    cancelled, finished = (f"gpt2serve_engine_requests_total[{k}]" for k in ("cancelled", "finished"))
    assert after[cancelled] == before[cancelled] + 1
    assert after[finished] == before[finished]  # nothing ran to its end


def test_playground_streams_stops_and_names_the_bad_field(
    page, long_server: ThreadServer, tmp_path: Path
) -> None:
    url = long_server.url
    # beam: the sampling fields are disabled, num_beams is not; the sequences come out side by side.
    prompt = "The playground shows"
    page.fill("#f-input", prompt)
    fill(page, mode="beam", num_beams=3, num_return_sequences=2, max_new_tokens=8)
    assert page.is_disabled("#f-top_p") and page.is_disabled("#f-temperature") and page.is_disabled("#f-seed")
    assert page.is_enabled("#f-num_beams")
    generate_and_wait(page, 2)
    shown = page.locator("#sequences .sequence .text").all_text_contents()
    body = {"input": prompt, "mode": "beam", "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}
    assert shown == httpx.post(f"{url}/invocations", json=body, timeout=30).json()
    boxes = [page.locator(f'#sequences .sequence[data-index="{i}"]').bounding_box() for i in range(2)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"]  # side by side
    assert '"mode":"beam"' in page.text_content("#snippet")  # copy as curl: the same request

    stop_frees_the_slots(page, url)

    # An invalid top_p: the server's message shows next to the field, and no sequence is shown.
    fill(page, mode="sample-top-p", top_p="1.5", num_return_sequences=2, max_new_tokens=5)
    page.click("#generate")
    message = page.locator('.field[data-field="top_p"] .field-error')
    sync_api.expect(message).to_have_text("`top_p` must be in (0, 1], got 1.5")
    assert page.get_attribute("#f-top_p", "aria-invalid") == "true"
    assert page.locator("#sequences .sequence").count() == 0

    # A good request again, then the screenshots.
    fill(page, top_p="0.9", num_return_sequences=3, max_new_tokens=24, seed=1)
    generate_and_wait(page, 3)
    wide = screenshot(page, tmp_path, "wide", WIDE)
    narrow = screenshot(page, tmp_path, "narrow", NARROW)
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]  # nothing overflows
    assert wide.stat().st_size > 10_000 and narrow.stat().st_size > 10_000
    background = "getComputedStyle(document.body).backgroundColor"
    assert page.evaluate(background) == "rgb(247, 247, 245)"
    page.emulate_media(color_scheme="dark")  # the system's setting: dark
    assert page.evaluate(background) == "rgb(20, 20, 22)"


def test_markup_in_prompt_and_errors_is_shown_as_text(page) -> None:
    prompt = '<script>window.__ran = "script"</script><img src=x onerror="window.__ran = \'img\'"> and on'
    page.fill("#f-input", prompt)
    fill(page, mode="greedy", num_return_sequences=1, max_new_tokens=4)
    generate_and_wait(page, 1)
    card = page.locator("#sequences .sequence")
    assert card.locator(".prompt").text_content() == prompt
    assert card.locator(".text").text_content().startswith(prompt)
    # An error message quoting markup (the given seed) is text too.
    fill(page, mode="sample", seed="<img src=x onerror=\"window.__ran = 'error'\">")
    page.click("#generate")
    sync_api.expect(page.locator("#err-seed")).to_contain_text('<img src=x onerror="window.__ran')
    assert page.locator("main img, main script").count() == 0
    page.wait_for_timeout(200)  # an image error handler would have fired by now
    assert page.evaluate("window.__ran") is None


def test_the_page_asks_for_a_key_and_sends_it(browser, long_server: ThreadServer) -> None:
    """A server with API keys (issue 19's, played here by a route that answers 401 without the key) and
    random weights (its /info answer with `random_weights` set): the page asks for the key, keeps it in
    sessionStorage, sends it as a Bearer token, never writes it into the code panel, and shows the notice."""
    key, seen = "s3cret-key", []
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)

    def guard(route) -> None:
        auth = route.request.headers.get("authorization")
        seen.append((route.request.url.rsplit("/", 1)[-1], auth))
        if auth != f"Bearer {key}":
            error = {"error": {"message": "an API key is required", "type": "authentication_error"}}
            route.fulfill(status=401, json=error)
        elif route.request.url.endswith("/info"):
            info = route.fetch().json()
            info["model"]["random_weights"] = True
            route.fulfill(json=info)
        else:
            route.continue_()

    page.route("**/info", guard)
    page.route("**/invocations", guard)
    try:
        page.goto(long_server.url + "/")
        sync_api.expect(page.locator("#key-panel")).to_be_visible()
        sync_api.expect(page.locator("#key-message")).to_contain_text("needs an API key")
        page.fill("#api-key", key)
        page.click("#key-save")
        sync_api.expect(page.locator("#model")).to_contain_text("parameters")
        sync_api.expect(page.locator("#random-notice")).to_contain_text("random weights")
        fill(page, mode="greedy", num_return_sequences=1, max_new_tokens=3)
        generate_and_wait(page, 1)
        assert seen[0] == ("info", None) and ("invocations", f"Bearer {key}") in seen
        assert page.evaluate("sessionStorage.getItem('gpt2serve.apiKey')") == key
        assert page.evaluate("localStorage.length") == 0
        snippet = page.text_content("#snippet")
        assert "$GPT2SERVE_API_KEY" in snippet and key not in snippet
    finally:
        context.close()


def test_an_error_event_mid_stream_is_shown(browser, long_server: ThreadServer) -> None:
    """A generation that runs past the server's deadline ends its stream with `event: error` (a 504
    envelope): the page keeps the text so far and shows the message."""
    server = ThreadServer(make_settings(long_server.settings.model, request_timeout_s=1.0)).start()
    context = browser.new_context(viewport=WIDE)
    try:
        server.wait_ready()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text("parameters")
        fill(page, mode="sample", num_return_sequences=16, max_new_tokens=1000)
        page.click("#generate")
        sync_api.expect(page.locator("#err-general")).to_have_text("the request ran past its 1 s deadline")
        sync_api.expect(page.locator("#stats")).to_have_text("the generation failed")
        assert page.locator("#sequences .sequence").count() == 16
        assert page.locator("#sequences .generated").first.text_content() != ""
        assert page.is_enabled("#generate") and page.is_disabled("#stop")
    finally:
        context.close()
        server.stop()


def run_snippet(page, tab: str) -> str:
    """What the "copy as" panel's `tab` snippet prints when run (Python in this process, shell by bash)."""
    page.click(f'[data-tab="{tab}"]')
    code = page.text_content("#snippet")
    if tab == "curl":
        done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return done.stdout
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"<{tab} snippet>", "exec"), {})
    return out.getvalue()


def test_copy_as_snippets_make_the_same_text(page) -> None:
    """The curl, boto3 and OpenAI snippets, run as shown, give the text the page showed (a seeded request)."""
    prompt = "Copy me:"
    page.fill("#f-input", prompt)
    fill(page, mode="sample", temperature=0.9, top_k=40, top_p=0.95, seed=5, num_return_sequences=2)
    fill(page, max_new_tokens=6)
    generate_and_wait(page, 2)
    shown = page.locator("#sequences .sequence .text").all_text_contents()
    done = run_snippet(page, "curl").split("event: done\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(done)["outputs"] == shown
    assert ast.literal_eval(run_snippet(page, "boto3")) == shown
    continuations = ast.literal_eval(run_snippet(page, "openai"))
    assert [prompt + text for text in continuations] == shown
    page.click('[data-tab="invoke"]')
    assert page.text_content("#snippet").startswith("gpt2serve invoke 'Copy me:' --url http://127.0.0.1:")
