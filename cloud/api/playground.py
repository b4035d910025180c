"""The browser playground at `/`: one HTML page, its script and stylesheet, shipped as package
data (`pice/cloud/static/`). Every asset is served from here (the machines are offline) and the
page may load nothing else: its Content-Security-Policy allows this origin only. It calls the
public API with the key the user typed (kept in the browser's localStorage)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from pice.shared.errors import NotFoundError

router = APIRouter(tags=["playground"], include_in_schema=False)

# file → media type; nothing outside this table is served
ASSETS = {"index.html": "text/html; charset=utf-8",
          "playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; "
            "style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


@cache
def _read(name: str) -> bytes:
    return resources.files("pice.cloud").joinpath("static", name).read_bytes()


def _asset(name: str) -> Response:
    return Response(_read(name), media_type=ASSETS[name], headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    return _asset("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in ASSETS:
        raise NotFoundError(f"no playground asset {name!r}")
    return _asset(name)
