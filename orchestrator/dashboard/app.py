"""The dashboard's FastAPI application: JSON API, two pages and their two assets.

Security model: reads are open (the server binds 127.0.0.1 unless told otherwise); every mutating
request needs ``Authorization: Bearer <token>`` (checked before its body is read). No route takes a
path from the client: pages and assets are fixed routes, previews are found by stream id and chunk
index in memory, and stream ids are looked up in the run's registry, never joined into a path.
"""

from __future__ import annotations

import asyncio
import hmac
from importlib import resources

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from orchestrator.dashboard.models import (
    ControlBody,
    ControlResult,
    Problem,
    RunSummary,
    StreamDetail,
    StreamSummary,
)

MUTATING = ("POST", "PUT", "PATCH", "DELETE")
_NOT_FOUND = {404: {"model": Problem, "description": "unknown stream, or preview no longer held"}}
_CONTROL = {
    **_NOT_FOUND,
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    409: {"model": Problem, "description": "not allowed in the stream's state"},
    504: {"model": Problem, "description": "not carried out in time"},
}


def _asset(name: str) -> str:
    return resources.files("orchestrator.dashboard").joinpath("static", name).read_text()


def create_app(view, token: str) -> FastAPI:
    """The app over ``view`` (an :class:`~orchestrator.dashboard.views.OrchestratorView` or alike)."""
    app = FastAPI(
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
