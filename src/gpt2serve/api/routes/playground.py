"""The playground page: `GET /` answers `static/index.html`, `GET /static/<name>` its scripts and styles.

Plain HTML, CSS and JavaScript modules shipped as package data (no build step, nothing fetched from
elsewhere, so it works offline). The page reads `GET /info` for the model and the request's fields and
defaults, and streams from `POST /invocations` with `"stream": true`. Its Content-Security-Policy allows
only this server's own scripts, styles and connections.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from gpt2serve.api.errors import APIError

router = APIRouter()

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server's page is never stale
}


@lru_cache(maxsize=1)
def static_files() -> dict[str, Path]:
    """The files shipped under `gpt2serve/static`, by name: the only names `/static/` serves."""
    folder = Path(str(resources.files("gpt2serve") / "static"))
    return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


def _file(name: str) -> FileResponse:
    path = static_files().get(name)
    if path is None:
        raise APIError(404, f"no static file {name!r}; the playground is at /", "not_found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return _file(name)
