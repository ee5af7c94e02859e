"""``deltatune board``: a web page over a runs folder (run list, live curves, compare, playground).

The page is three static files shipped in ``deltatune/board/static`` (no CDN, no build step); it polls a small
JSON API. Routes: ``/`` and ``/static/<file>`` (the page), ``/api/runs`` (the run list), ``/api/run?name=...``
(one run: recipe, metrics, log history thinned to ``&points=`` rows of each kind, report), ``/api/config`` (where
the playground sends requests), and, when a serve process is named, ``/api/serve/v1/...`` forwarded to it (so the
page needs no cross-origin calls and the API key stays on the server). Needs the ``serve`` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

try:
    from fastapi import Request as HttpRequest  # at module level: FastAPI reads the routes' annotations by name
except ImportError:  # without the serve extra: reading runs (board.runs, deltatune status) still imports
    HttpRequest = Any

from . import runs as runs_

STATIC = os.path.join(os.path.dirname(__file__), "static")
_ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
_REVALIDATE = {"Cache-Control": "no-cache"}
"""The page's files are asked again each load (a 304 while unchanged, by their ETag): with only Last-Modified a
browser keeps a file fresh for a tenth of its age (RFC 9111, 4.2.2), so after an upgrade of deltatune a reload ran
the old app.js against the new API for days."""


def create_app(runs_dir: str, serve_url: str | None = None, serve_key: str | None = None, serve_app: Any = None):
    """The board's FastAPI application over ``runs_dir``.

    Args:
        runs_dir: the folder holding run folders (``deltatune train`` output dirs).
        serve_url: a running ``deltatune serve`` (``http://127.0.0.1:8000``) for the playground.
        serve_key: its API key, sent by the board (never given to the page).
        serve_app: a serve application to mount in this process at ``/serve`` instead (the board "starts one").
    """
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse, Response

    from ..serve.guard import refusal

    app = FastAPI(title="deltatune board", docs_url=None, redoc_url=None)
    root = os.path.abspath(runs_dir)
    if serve_url:  # the openai client's base_url form (http://127.0.0.1:8000/v1) forwarded to /v1/v1/...: a 404
        serve_url = serve_url.rstrip("/").removesuffix("/v1")
    if serve_app is not None:
        app.mount("/serve", serve_app)
    app.add_middleware(_Head)
    playground = "/serve/v1" if serve_app is not None else "/api/serve/v1" if serve_url else None

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):  # the board has no key: local names only, same origin only
        refused = refusal(request.headers, None)
        if refused:
            return JSONResponse({"error": {"message": refused, "type": "permission_error"}}, status_code=403)
        return await call_next(request)

    def missing(what: str) -> JSONResponse:
        return JSONResponse({"error": {"message": what, "type": "not_found_error"}}, status_code=404)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def _bad_query(_: HttpRequest, exc: RequestValidationError):  # (FastAPI's 422 list of pydantic errors:
        return JSONResponse(  # the page said "Unprocessable Entity", naming neither the parameter nor its value)
            {"error": {"message": _bad_query_line(exc.errors()), "type": "invalid_request_error"}}, status_code=400
        )

    @app.exception_handler(HTTPException)
    async def _http_error(http: HttpRequest, exc: HTTPException):  # an unknown route, a wrong method: the board's
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{exc.detail}: {http.method} {http.url.path}"
        return JSONResponse({"error": {"message": message, "type": kind}}, exc.status_code, headers=exc.headers)

    def asset(name: str, http: HttpRequest) -> Response:
        path = os.path.join(STATIC, name)  # (stat_result: its ETag is set here, not when it is sent)
        info = os.stat(path)
        sent = FileResponse(path, media_type=_ASSETS[name], headers=_REVALIDATE, stat_result=info)
        tags = http.headers.getlist("if-none-match")  # (FileResponse sends 200 to either)
        if (
            _none_match(sent.headers["etag"], tags)
            if tags
            else _unmodified(info, http.headers.getlist("if-modified-since"))
        ):
            return Response(status_code=304, headers={k: sent.headers[k] for k in ("etag", "cache-control")})
        return sent

    @app.get("/")
    async def index(http: HttpRequest):
        return asset("index.html", http)

    @app.get("/static/{name}")
    async def static(name: str, http: HttpRequest):
        if name not in _ASSETS:  # a fixed list: nothing else of the package (or the disk) is served
            return missing(f"no asset {name!r}")
        return asset(name, http)

    @app.get("/api/config")
    async def config() -> dict:
        return {"runs_dir": root, "playground": playground}

    def validated(text: str, http: HttpRequest) -> Response:
        """JSON text sent with an ETag of it and ``no-cache``; a 304 on a matching If-None-Match: the page polls every
        second, and the whole thinned history of a run that had not changed (hundreds of KB) went again each time,
        through an SSH tunnel too (a browser's fetch revalidates on its own and reads its stored copy)."""
        tag = f'"{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}"'
        if _none_match(tag, http.headers.getlist("if-none-match")):
            return Response(status_code=304, headers={"ETag": tag, **_REVALIDATE})
        return Response(text, media_type="application/json", headers={"ETag": tag, **_REVALIDATE})

    @app.get("/api/runs")
    async def runs(http: HttpRequest):
        listed = await run_in_threadpool(runs_.list_runs, root)
        return validated(await run_in_threadpool(lambda: json.dumps({"runs": listed}, default=str)), http)

    @app.get("/api/run")
    async def run(http: HttpRequest, name: str, points: int = runs_.MAX_POINTS):
        """One run; ``points``: the most log rows of a kind (0: all)."""
        data = await run_in_threadpool(runs_.detail, root, name, points)
        if data is None:
            return missing(f"no run {name!r} in the runs folder")
        # A plain dict would go through FastAPI's jsonable_encoder, which walks every log line (15 s at 200k lines)
        text = await run_in_threadpool(lambda: json.dumps(data, default=str))  # (a YAML !!binary value: its repr)
        return validated(text, http)

    @app.get("/api/file")
    async def file(run: str, name: str):
        """A run's picture (``training_curve.png``); only a fixed set of names, only inside the runs folder."""
        if name not in ("training_curve.png",):
            return missing(f"no file {name!r} is served")
        path = runs_.inside(root, run, name)
        if path is None or runs_.summary(root, run) is None or not os.path.isfile(path):
            return missing(f"no {name} in run {run!r}")
        return FileResponse(path, media_type="image/png")

    if serve_url:

        @app.api_route("/api/serve/v1/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, http: HttpRequest):
            body = await http.body()
            status, content = await run_in_threadpool(_forward, serve_url, serve_key, http.method, path, body)
            return Response(content, status_code=status, media_type="application/json")

    return app


def _bad_query_line(errors: Any) -> str:
    """FastAPI's validation errors as one line naming each query parameter at fault and the value given."""
    parts = []
    for error in errors:
        where = error.get("loc") or ()
        name = where[-1] if where else "?"
        given = "" if error.get("type") == "missing" else f" (given {repr(error.get('input'))[:80]})"
        parts.append(f"query parameter {name!r}: {error.get('msg', 'invalid')}{given}")
    return "; ".join(parts) or "invalid query"


def _none_match(etag: str, fields: list[str]) -> bool:
    """Whether an If-None-Match header (each of its lines) names ``etag`` or is ``*`` (RFC 9110, 13.1.2: the weak
    comparison, ``W/`` ignored on either side; a list's commas with or without spaces; an ETag may hold a comma).
    Only ``", "`` was split, one line read, and a tag compared strongly: a browser's W/ tag or a proxy's list got
    the whole file again."""
    mine = etag.removeprefix("W/")
    for field in fields:
        for tag in re.findall(r'\*|(?:W/)?"[^"]*"', field):
            if tag == "*" or tag.removeprefix("W/") == mine:
                return True
    return False


def _unmodified(info: os.stat_result, fields: list[str]) -> bool:
    """Whether an If-Modified-Since header (read only without If-None-Match) dates the file's Last-Modified or later
    (RFC 9110, 13.1.3: an invalid date or a second value is ignored). ``curl -z``, a proxy revalidating on
    Last-Modified alone got the whole file again each time."""
    from email.utils import parsedate_to_datetime

    if len(fields) != 1:
        return False
    try:
        since = parsedate_to_datetime(fields[0])
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None:  # (an HTTP-date is GMT; the obsolete forms parse without a zone)
        since = since.replace(tzinfo=datetime.timezone.utc)
    return int(info.st_mtime) <= since.timestamp()


class _Head:
    """HEAD answered as GET without the body (curl -I, a monitor's check, a browser's probe got 405): the route's own
    status and headers, Content-Length included, as HTTP says (RFC 9110, 9.3.2)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the rest of the body follows: nothing is sent until the last part
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _forward(url: str, key: str | None, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"{url.rstrip('/')}/v1/{path}", data=body if method == "POST" else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError, http.client.HTTPException) as exc:  # (InvalidURL: a path urllib refuses)
        message = {"error": {"message": f"the serve process at {url} does not answer ({exc})", "type": "server_error"}}
        return 502, json.dumps(message).encode()


def check_board(
    runs_dir: str,
    host: str,
    port: int,
    serve_url: str | None = None,
    serve_key: str | None = None,
    model: bool | str = False,
) -> None:
    """The board's refusals, before anything loads: no runs folder, a host beyond this machine, a port it cannot
    listen on, a playground named twice or half (--serve with --model; --serve-key alone; --serve without http://,
    which every playground call answered with "unknown url type"). ``model``: the board starts an engine (the flag
    that asks for it, --model or --adapter, named in the refusal)."""
    from urllib.parse import urlsplit

    from ..config import ConfigError
    from ..serve import check_bind, check_port

    if not os.path.isdir(runs_dir):
        raise ConfigError(f"--runs {runs_dir!r} is not a folder")
    flag = model if isinstance(model, str) else "--model"
    if serve_url is not None and model:
        raise ConfigError(f"--serve names a running serve process and {flag} starts one in the board: give one")
    if serve_key is not None and serve_url is None and model:
        raise ConfigError(f"--serve-key is the key of a serve process named by --serve; the engine {flag} starts in "
                          "the board takes none: drop --serve-key")  # fmt: skip
    if serve_key is not None and serve_url is None:
        raise ConfigError("--serve-key is the key of the serve process named by --serve: give --serve URL too")
    if serve_url is not None and (
        urlsplit(serve_url).scheme not in ("http", "https") or not urlsplit(serve_url).netloc
    ):
        raise ConfigError(f"--serve {serve_url!r}: give the serve process's URL, e.g. http://127.0.0.1:8000")
    try:
        check_bind(host, None)
    except ConfigError:  # the board has no key of its own, and its playground forwards with the serve key
        raise ConfigError(
            f"--host {host}: the board has no authentication and listens on this machine only "
            "(reach it from elsewhere through an SSH tunnel)"
        ) from None
    if port == 0:  # (uvicorn took a free port, unnamed: the board said it was on http://127.0.0.1:0/)
        raise ConfigError("--port 0: the board is opened at the port it names; give one, e.g. --port 7860")
    check_port(host, port)


def board(
    runs_dir: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    serve_url: str | None = None,
    serve_key: str | None = None,
    serve_app: Any = None,
) -> None:
    """Run the board with uvicorn until interrupted."""
    import uvicorn

    check_board(runs_dir, host, port, serve_url, serve_key, serve_app is not None)
    app = create_app(runs_dir, serve_url, serve_key, serve_app)
    uvicorn.run(app, host=host, port=port, log_level="warning")
