"""Take the README's playground screenshots (docs/playground-wide.png, docs/playground-narrow.png).

    PYTHONPATH=src python docs/screenshots.py [--model random:gpt2]

Serves the model on a free 127.0.0.1 port, opens the playground in Debian's chromium (Playwright, no
browser download), generates once and saves a wide and a narrow screenshot next to this file.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import uvicorn
from playwright.sync_api import expect, sync_playwright

from gpt2serve.api.app import create_app
from gpt2serve.settings import Settings

HERE = Path(__file__).resolve().parent
VIEWPORTS = {"wide": {"width": 1360, "height": 860}, "narrow": {"width": 390, "height": 844}}


def serve(model: str) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = replace(Settings(), model=model, device="cpu", host="127.0.0.1", port=port)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:gpt2")
    args = parser.parse_args()
    server, url = serve(args.model)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"))
            page = browser.new_page(viewport=VIEWPORTS["wide"])
            page.goto(url + "/")
            expect(page.locator("#model")).to_contain_text("parameters", timeout=30_000)
            page.fill("#f-input", "The meaning of life is")
            page.fill("#f-max_new_tokens", "40")
            page.fill("#f-seed", "1")
            page.click("#generate")
            expect(page.locator("#stats")).to_contain_text("tokens/s", timeout=120_000)
            for name, viewport in VIEWPORTS.items():
                page.set_viewport_size(viewport)
                page.screenshot(path=str(HERE / f"playground-{name}.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
