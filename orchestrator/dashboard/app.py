"""The dashboard's FastAPI application: JSON API, two pages and their two assets.

Security model: reads are open (the server binds 127.0.0.1 unless told otherwise); every mutating
request needs ``Authorization: Bearer <token>`` (checked before its body is read). A guard in front of
the whole app answers first: a request whose Host name is not one the server is known by (loopback,
its bound address or this node's, ``--dashboard-allow-host`` names) is a 400, so a page of another
site that rebinds its DNS name to this address cannot read the open API; a body over 64 KiB is a 413,
whether declared by Content-Length or found while a chunked body is read, token or not. Every answer
carries a strict Content-Security-Policy (scripts, styles and images from this origin only; no
framing, plugins or base URL), X-Frame-Options DENY, nosniff and no-referrer. No route takes a path
from the client: pages and assets are fixed routes, previews are found by stream id and chunk index
in memory, and stream ids are looked up in the run's registry, never joined into a path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Iterable
from importlib import resources

import structlog
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers

from orchestrator.dashboard.models import (
    ControlBody,
    ControlResult,
    Problem,
    RunSummary,
    StreamDetail,
    StreamSummary,
)

log = structlog.get_logger(__name__)

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_BODY_BYTES = 64 * 1024
CSP = (
    "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'; object-src 'none'"
)  # the pages load only /assets/*, and previews from /api/...; no inline script or style anywhere
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_NOT_FOUND = {404: {"model": Problem, "description": "unknown stream, or preview no longer held"}}
_CONTROL = {
    **_NOT_FOUND,
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    409: {"model": Problem, "description": "not allowed in the stream's state"},
    504: {"model": Problem, "description": "not carried out in time"},
}


def _asset(name: str) -> str:
    return resources.files("orchestrator.dashboard").joinpath("static", name).read_text()


def host_name(value: str) -> str:
    """The lower-cased name part of a Host header ("[::1]:8470" -> "::1"); "" when malformed, never served."""
    value = value.strip().lower()
    if value.startswith("["):
        name, closed, port = value[1:].partition("]")
        if not closed or (port and not port.startswith(":")):
            return ""
        port = port[1:]
    else:
        name, _, port = value.partition(":")
    return name if port.isdigit() or not port else ""


def normalise_hosts(names: Iterable[str]) -> frozenset[str]:
    """Names as :func:`host_name` gives them (lower case, IPv6 without brackets), the loopback ones added."""
    return LOOPBACK_HOSTS | {n.strip().lower().removeprefix("[").removesuffix("]") for n in names if n.strip()}


async def _problem(send, status: int, detail: str) -> None:
    """Answer ``{"detail": ...}`` with ``status`` straight through ASGI (the guard answers before FastAPI)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _with_security_headers(send):
    """``send`` adding the security headers to every response start (pages, JSON, errors, previews)."""
    names = {name for name, _ in SECURITY_HEADERS}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
            message = {**message, "headers": [*kept, *SECURITY_HEADERS]}
        await send(message)

    return wrapped


def _declared_length(headers: Headers) -> int:
    """The Content-Length a request declares (0 when none or unreadable: h11 refuses those anyway)."""
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


class _TooLarge(HTTPException):
    """Raised to whoever reads a body past the limit; FastAPI passes HTTPExceptions on untouched."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class _BodyLimit:
    """One request's body counted while the app reads it; past the limit the app's answer becomes a 413.

    Whatever a reader does with the exception (FastAPI's 413, a 400 or 500 elsewhere, or letting it
    out), the response the client gets is this 413, unless the app had already started another.
    """

    def __init__(self, receive, send, limit: int):
        self._receive, self._send, self.limit = receive, send, limit
        self.total, self.exceeded, self.started, self.answered = 0, False, False, False

    async def receive(self):
        if self.exceeded:
            raise _TooLarge(self.limit)
        message = await self._receive()
        if message["type"] == "http.request":
            self.total += len(message.get("body", b""))
            if self.total > self.limit:
                self.exceeded = True
                log.warning("dashboard.body_too_large", limit=self.limit, read=self.total)
                raise _TooLarge(self.limit)
        return message

    async def send(self, message) -> None:
        if self.answered:
            return
        if message["type"] == "http.response.start" and self.exceeded:
            await self.answer()
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

    async def answer(self) -> bool:
        """Send the 413 if no other response has started; whether the client has (or gets) it."""
        if not self.answered and not self.started:
            self.answered = True
            await _problem(self._send, 413, f"request body over {self.limit} bytes")
        return self.answered


class Guard:
    """Pure ASGI in front of the whole app: Host names, body size, security headers.

    Pure ASGI because ``@app.middleware("http")`` cannot stop a streaming body early; outermost so
    that even the 500 answers of FastAPI's error middleware carry the headers.
    """

    def __init__(self, app, allowed_hosts: frozenset[str], max_body: int = MAX_BODY_BYTES):
        self.app, self.allowed_hosts, self.max_body = app, allowed_hosts, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        headers = Headers(scope=scope)
        name = host_name(headers.get("host", ""))
        if name not in self.allowed_hosts:
            log.warning("dashboard.bad_host", host=headers.get("host", "")[:200])
            await _problem(send, 400, f"Host {name!r} is not served here (a name to serve: --dashboard-allow-host)")
            return
        declared = _declared_length(headers)
        if declared > self.max_body:  # refused on its headers: not a byte of the body is read
            log.warning("dashboard.body_too_large", limit=self.max_body, declared=declared)
            await _problem(send, 413, f"request body over {self.max_body} bytes")
            return
        body = _BodyLimit(receive, send, self.max_body)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not (body.exceeded and await body.answer()):
                raise
        else:
            if body.exceeded:
                await body.answer()


class _GuardedApp(FastAPI):
    """FastAPI with :class:`Guard` outside its whole middleware stack."""

    def __init__(self, *, allowed_hosts: frozenset[str], **kwargs):
        self.allowed_hosts = allowed_hosts
        super().__init__(**kwargs)

    def build_middleware_stack(self):
        return Guard(super().build_middleware_stack(), self.allowed_hosts)


def create_app(view, token: str, *, allowed_hosts: Iterable[str] | None = None) -> FastAPI:
    """The app over ``view`` (an :class:`~orchestrator.dashboard.views.OrchestratorView` or alike).

    ``allowed_hosts``: Host names served besides the loopback ones (None: the loopback ones only).
    """
    app = _GuardedApp(
        allowed_hosts=normalise_hosts(allowed_hosts or ()),
        title="longroll dashboard",
        version="1",
        description="Streams of one longroll run: state, progress, previews; pause, resume, stop.",
        docs_url=None,  # the interactive docs pages load scripts from the internet; the schema is at /openapi.json
        redoc_url=None,
    )
    pages = {name: _asset(name) for name in ("index.html", "stream.html", "dashboard.js", "dashboard.css")}

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.method in MUTATING:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return JSONResponse(
                    {"detail": "a valid bearer token is required (printed at start; DIR/dashboard.token)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    def known(sid: str) -> str:
        if not view.has(sid):
            raise HTTPException(404, f"unknown stream {sid!r}")
        return sid

    # ---- pages ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return pages["index.html"]

    @app.get("/streams/{stream_id}", response_class=HTMLResponse, include_in_schema=False)
    def stream_page(stream_id: str):
        if not view.has(stream_id):
            return HTMLResponse("<!doctype html><title>not found</title><p>unknown stream</p>", status_code=404)
        return pages["stream.html"]

    @app.get("/assets/dashboard.js", include_in_schema=False)
    def script():
        return Response(pages["dashboard.js"], media_type="text/javascript")

    @app.get("/assets/dashboard.css", include_in_schema=False)
    def style():
        return Response(pages["dashboard.css"], media_type="text/css")

    # ---- API -----------------------------------------------------------------------------------
    @app.get("/api/run", response_model=RunSummary, summary="the run: state, workers, totals")
    def run_summary():
        return view.run()

    @app.get("/api/streams", response_model=list[StreamSummary], summary="every stream of the run")
    def streams():
        return view.streams()

    @app.get("/api/streams/{stream_id}", response_model=StreamDetail, responses=_NOT_FOUND, summary="one stream")
    def stream(stream_id: str):
        detail = view.stream(stream_id)
        if detail is None:
            raise HTTPException(404, f"unknown stream {stream_id!r}")
        return detail

    def png(stream_id: str, chunk: int | None) -> Response:
        found = view.preview(known(stream_id), chunk)
        if found is None:
            raise HTTPException(404, f"no preview of stream {stream_id!r} chunk {chunk} is held")
        idx, data = found
        return Response(data, media_type="image/png", headers={"X-Chunk-Index": str(idx), "Cache-Control": "no-store"})

    @app.get(
        "/api/streams/{stream_id}/preview",
        responses={**_NOT_FOUND, 200: {"content": {"image/png": {}}}},
        response_class=Response,
        summary="PNG of the stream's newest frame (header X-Chunk-Index)",
    )
    def preview_latest(stream_id: str):
        return png(stream_id, None)

    @app.get(
        "/api/streams/{stream_id}/preview/{chunk_index}",
        responses={**_NOT_FOUND, 200: {"content": {"image/png": {}}}},
        response_class=Response,
        summary="PNG of the last frame of one chunk (the newest few chunks are held)",
    )
    def preview_chunk(stream_id: str, chunk_index: int):
        return png(stream_id, chunk_index)

    async def control(stream_id: str, action: str, body: ControlBody | None) -> dict:
        known(stream_id)
        from orchestrator.actor import ControlError

        try:
            state = await asyncio.to_thread(view.control, stream_id, action, body.reason if body else None)
        except ControlError as e:
            raise HTTPException(409, str(e)) from None
        except TimeoutError as e:
            raise HTTPException(504, str(e)) from None
        return {"id": stream_id, "action": action, "state": state}

    def control_route(action: str, doc: str) -> None:
        async def endpoint(stream_id: str, body: ControlBody | None = Body(default=None)):  # noqa: B008
            return await control(stream_id, action, body)

        app.post(
            f"/api/streams/{{stream_id}}/{action}",
            response_model=ControlResult,
            responses=_CONTROL,
            summary=doc,
            name=action,
        )(endpoint)

    control_route("pause", "checkpoint the stream and release it from its worker; it stays paused until resumed")
    control_route("resume", "put a paused (or stopped, or failed) stream back to run from its newest checkpoint")
    control_route("stop", "checkpoint the stream and stop it for good in this run")

    return app
