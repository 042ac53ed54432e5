"""The test page at `/` and the browser SDK under `/sdk/` (ES modules, no build step), served from static/.

`setup_test_page(app)` is a plain route group. Files are read from the installed package, so a wheel
serves the same page as a checkout. The SDK is served with a short cache lifetime and CORS open, so pages
on other origins can `import` it straight from a Speech Pipe server.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"
SDK_FILES = ("speechpipe.js", "speechpipe-worklets.js")
_TYPES = {".js": "text/javascript", ".html": "text/html", ".css": "text/css"}


def _file(name: str, *, cors: bool = False) -> web.FileResponse:
    path = STATIC_DIR / name
    headers = {"Content-Type": f"{_TYPES[path.suffix]}; charset=utf-8", "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}
    if cors:
        headers["Access-Control-Allow-Origin"] = "*"
    return web.FileResponse(path, headers=headers)


async def index(request: web.Request) -> web.FileResponse:
    return _file("index.html")


async def page_asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in ("page.js", "page.css"):
        raise web.HTTPNotFound(text=f"no asset {name[:80]!r}")
    return _file(name)


async def sdk(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in SDK_FILES:
        raise web.HTTPNotFound(text=f"no SDK file {name[:80]!r}")
    return _file(name, cors=True)


def setup_test_page(app: web.Application) -> None:
    """Adds `GET /` (the test page), `/static/{page.js,page.css}` and `/sdk/{speechpipe.js,...}`."""
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", page_asset)
    app.router.add_get("/sdk/{name}", sdk)
