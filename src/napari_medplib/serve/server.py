"""The `medplib serve` ASGI app (Starlette + sse-starlette) and its uvicorn runner.

Routes (all under ``/v1`` need ``Authorization: Bearer <token>`` when the server has a token):

* ``GET /health`` (open): status, queue length, busy, counters - for probes and for users.
* ``GET /v1/info``: model name, fingerprint, device, dtype, template, capabilities, limits.
* ``HEAD|PUT /v1/images/{sha256}``: probe / upload one plane as raw bytes (dtype and shape in
  ``X-Medplib-Dtype`` / ``X-Medplib-Shape``); the server recomputes the hash.
* ``POST /v1/ask``: JSON -> Server-Sent Events ``queued``, ``progress``, ``token`` (text delta),
  then ``done`` (the Reply with its masks) or ``error``.
* ``POST /v1/segment``, ``POST /v1/embed``: JSON -> JSON.
* ``POST /v1/cancel``, ``POST /v1/clear_cache``, ``GET /v1/cache_info``.

Security: the token and size checks run in a pure-ASGI guard before any route reads a body; bodies
are read in chunks and counted, and an upload never grows past the size its header declared; no
request names a path on this machine (images are bytes, models are chosen at start-up); errors are
one line of text, never a traceback; there is no pickle anywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._version import __version__
from ..cache import LRUCache
from ..engine.errors import SessionInputError
from .gpu import Job, ModelQueue, QueueFull
from .limits import RateLimiter, ServeLimits
from .tokens import digest, token_matches
from .wire import (
    WireError,
    image_id,
    jsonable,
    pack_reply,
    pack_segment,
    parse_image_header,
    unpack_array,
    unpack_region,
)

log = logging.getLogger("napari_medplib.serve")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CLIENT_HEADER = "x-medplib-client"
ASK_OPTIONS = {
    "max_new_tokens", "temperature", "top_p", "contrast_limits", "rgb", "mask_mode", "history", "seed",
    "template", "instances",
}
SEGMENT_OPTIONS = {
    "points", "point_labels", "box", "mask", "multimask", "contrast_limits", "rgb", "mask_mode", "window",
    "clip_to_box", "clicked_pieces", "flips",
}


class HTTPError(Exception):
    """A refusal with a status and one line for the client."""

    def __init__(self, status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "code": self.code or str(self.status)}, self.status,
                            headers=self.headers)


def _error(status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    return HTTPError(status, message, code, headers).response()


class Guard:
    """Pure-ASGI gate in front of every route: token, rate limit, declared body size.

    It answers before the route runs, so a refused request's body is never read."""

    def __init__(self, app, token: str | None, limits: ServeLimits) -> None:
        self.app = app
        self.digest = None if token is None else digest(token)
        self.limits = limits
        self.rate = RateLimiter(limits.rate, limits.burst)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._check(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope) -> Response | None:
        path, method = scope["path"], scope["method"]
        if path == "/health":
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.digest is not None:
            auth = headers.get("authorization", "")
            presented = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if not token_matches(presented, self.digest):
                return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>' with the "
                                   "token the server printed", "unauthorized", {"WWW-Authenticate": "Bearer"})
        who = (scope.get("client") or ("?", 0))[0]
        wait = self.rate.allow(who)
        if wait:
            return _error(429, "too many requests; slow down", "rate_limited",
                          {"Retry-After": str(max(1, round(wait)))})
        limit = self.limits.max_upload_bytes if method == "PUT" else self.limits.max_json_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error(400, "Content-Length is not a number", "bad_request")
            if int(declared) > limit:
                return _error(413, f"request body of {int(declared):,} bytes is over this server's limit of "
                                   f"{limit:,} bytes", "too_large")
        return None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted chunk by chunk: refused as soon as it passes ``limit``."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over this server's limit of {limit:,} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "the request body is not valid JSON", "bad_json") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the request body must be a JSON object", "bad_json")
    return data


class ServeState:
    """What the routes share: the session, the uploaded images, the model queue."""

    def __init__(self, session: Any, limits: ServeLimits) -> None:
        self.session = session
        self.limits = limits
        self.images = LRUCache(limits.image_cache_bytes)
        self.queue = ModelQueue(limits.max_queue)
        self.instance = secrets.token_hex(8)  # changes on every start: clients learn to re-upload
        self.started = time.time()

    # ---- shared request parts --------------------------------------------------------------------
    def image(self, data: dict[str, Any]) -> np.ndarray:
        sha = data.get("image")
        if not isinstance(sha, str) or not SHA256.match(sha):
            raise HTTPError(400, "'image' must be the sha256 of an uploaded image", "bad_request")
        array = self.images.get(sha)
        if array is None:
            raise HTTPError(404, "the server does not have this image (upload it first)", "image_missing")
        return array

    def options(self, data: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise HTTPError(422, "'options' must be an object", "bad_option")
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise HTTPError(422, f"unknown option(s) {', '.join(map(repr, unknown))}", "bad_option")
        if "max_new_tokens" in options:
            value = options["max_new_tokens"]
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.limits.max_new_tokens:
                raise HTTPError(422, f"max_new_tokens must be an integer from 1 to {self.limits.max_new_tokens}",
                                "bad_option")
        history = options.get("history")
        if history is not None:
            if (not isinstance(history, list) or len(history) > self.limits.max_history_turns
                    or not all(isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t)
                               for t in history)):
                raise HTTPError(422, f"history must be at most {self.limits.max_history_turns} "
                                     "[question, answer] pairs of text", "bad_option")
            if sum(len(q) + len(a) for q, a in history) > 16 * self.limits.max_question_chars:
                raise HTTPError(422, "history is too long", "bad_option")
            options["history"] = [tuple(t) for t in history]
        if "mask" in options and options["mask"] is not None:
            options["mask"] = unpack_array(options["mask"], (2,))
        return options

    def regions(self, data: dict[str, Any]) -> list:
        regions = data.get("regions", [])
        if not isinstance(regions, list):
            raise HTTPError(422, "'regions' must be a list", "bad_regions")
        if len(regions) > self.limits.max_regions:
            raise HTTPError(422, f"{len(regions):,} regions; this server takes at most {self.limits.max_regions} "
                                 "per request", "too_many_regions")
        return [unpack_region(r) for r in regions]

    def question(self, data: dict[str, Any]) -> str:
        question = data.get("question")
        if not isinstance(question, str):
            raise HTTPError(422, "'question' must be text", "bad_question")
        if len(question) > self.limits.max_question_chars:
            raise HTTPError(422, f"the question is over {self.limits.max_question_chars:,} characters",
                            "bad_question")
        return question

    def submit(self, job: Job) -> int:
        try:
            return self.queue.submit(job)
        except QueueFull:
            raise HTTPError(503, f"the server is busy ({self.queue.waiting} requests waiting); try again shortly",
                            "busy", {"Retry-After": "2"}) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _job_failure(exc: BaseException) -> HTTPError:
    """An exception from the model thread -> what the client may see (input errors verbatim, else a hint)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ValueError):  # the engine's input errors: one line that says what to fix
        return HTTPError(422, _one_line(exc), "bad_input")
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return HTTPError(503, "the server ran out of memory on this request; try a smaller image", "out_of_memory")
    log.exception("request failed", exc_info=exc)
    return HTTPError(500, f"the server failed on this request ({type(exc).__name__}); see the server log",
                     "internal")


def _client(request: Request) -> str:
    return request.headers.get(CLIENT_HEADER, "")[:64]


def build_app(session: Any, token: str | None, limits: ServeLimits | None = None) -> Any:
    """The ASGI app serving ``session`` (already loaded), wrapped in the `Guard`."""
    limits = limits or ServeLimits()
    state = ServeState(session, limits)

    async def health(request: Request) -> Response:
        q = state.queue
        return JSONResponse({"status": "ok", "model": session.model_name, "busy": q.current is not None,
                             "queue": q.waiting, "served": q.stats.served, "failed": q.stats.failed,
                             "cancelled": q.stats.cancelled, "skipped": q.stats.skipped,
                             "images": len(state.images), "instance": state.instance})

    async def info(request: Request) -> Response:
        return JSONResponse({
            "model": session.model_name, "fingerprint": session.fingerprint, "device": session.device,
            "dtype": session.dtype, "template": session.template, "version": __version__,
            "instance": state.instance, "mask_encoding": "bitpack+zlib+base64",
            "capabilities": ["ask", "ask_stream", "segment", "embed", "cancel", "clear_cache", "cache_info"],
            "limits": limits.describe(),
        })

    async def image_head(request: Request) -> Response:
        sha = request.path_params["sha"]
        return Response(status_code=200 if SHA256.match(sha) and sha in state.images else 404)

    async def image_put(request: Request) -> Response:
        sha = request.path_params["sha"]
        if not SHA256.match(sha):
            raise HTTPError(400, "the image name must be its sha256 (64 lowercase hex digits)", "bad_request")
        dtype, shape = parse_image_header(request.headers.get("x-medplib-dtype"),
                                          request.headers.get("x-medplib-shape"))
        expected = int(np.prod(shape)) * dtype.itemsize
        if expected > limits.max_upload_bytes:
            raise HTTPError(413, f"an image of {expected:,} bytes is over this server's limit of "
                                 f"{limits.max_upload_bytes:,} bytes", "too_large")
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) != expected:
            raise HTTPError(400, f"the body has {int(declared):,} bytes; dtype and shape need {expected:,}",
                            "bad_image")
        buffer, size = bytearray(expected), 0
        async for chunk in request.stream():
            if size + len(chunk) > expected:
                raise HTTPError(400 if declared is None and size + len(chunk) <= limits.max_upload_bytes else 413,
                                f"the body is longer than dtype and shape say ({expected:,} bytes)", "bad_image")
            buffer[size : size + len(chunk)] = chunk
            size += len(chunk)
        if size != expected:
            raise HTTPError(400, f"the body has {size:,} bytes; dtype and shape need {expected:,}", "bad_image")
        array = np.frombuffer(buffer, dtype).reshape(shape)
        got = await asyncio.to_thread(image_id, array)
        if got != sha:
            raise HTTPError(400, "the image does not match its sha256 (corrupted upload?)", "hash_mismatch")
        state.images.put(sha, array)
        return JSONResponse({"image": sha, "bytes": expected}, status_code=201)

    async def ask(request: Request) -> Response:
        data = await read_json(request, limits.max_json_bytes)
        image = state.image(data)
        question = state.question(data)
        regions = state.regions(data)
        options = state.options(data, ASK_OPTIONS)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def run(job: Job) -> Any:
            return session.ask(image, question, regions, cancel=job.cancel, on_text=lambda p: put(("token", p)),
                               on_progress=lambda s, d, t: put(("progress", [str(s), int(d), int(t)])), **options)

        job = Job(run, client=_client(request), name=str(data.get("job", ""))[:64])
        ahead = state.submit(job)
        return EventSourceResponse(_ask_events(job, events, ahead), ping=15, send_timeout=30)

    async def _ask_events(job: Job, events: asyncio.Queue, ahead: int) -> AsyncIterator[dict[str, str]]:
        assert job.future is not None
        waiter = asyncio.ensure_future(events.get())
        try:
            yield {"event": "queued", "data": json.dumps({"ahead": ahead})}
            while True:
                done, _ = await asyncio.wait({waiter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                if waiter in done:
                    kind, payload = waiter.result()
                    waiter = asyncio.ensure_future(events.get())
                    yield {"event": kind, "data": json.dumps(payload)}
                    continue
                while not events.empty():  # tokens the model thread queued before it returned
                    kind, payload = events.get_nowait()
                    yield {"event": kind, "data": json.dumps(payload)}
                try:
                    reply = job.future.result()
                except BaseException as exc:
                    failure = _job_failure(exc)
                    yield {"event": "error", "data": json.dumps({"error": failure.message, "code": failure.code,
                                                                 "status": failure.status})}
                    return
                data = await asyncio.to_thread(lambda: json.dumps(jsonable(pack_reply(reply))))
                yield {"event": "done", "data": data}
                return
        finally:  # the client left (or the answer is complete): stop the model at its next token
            waiter.cancel()
            job.abandoned = True
            if job.future is not None and not job.future.done():
                job.cancel.set()

    async def _run_job(request: Request, run) -> Any:
        job = Job(run, client=_client(request))
        state.submit(job)
        assert job.future is not None
        try:
            return await job.future
        except asyncio.CancelledError:
            job.abandoned = True
            job.cancel.set()
            raise
        except BaseException as exc:
            raise _job_failure(exc) from None

    async def segment(request: Request) -> Response:
        data = await read_json(request, limits.max_json_bytes)
        image = state.image(data)
        options = state.options(data, SEGMENT_OPTIONS)
        result = await _run_job(request, lambda job: session.segment(image, **options))
        body = await asyncio.to_thread(lambda: json.dumps(jsonable(pack_segment(result))))
        return Response(body, media_type="application/json")

    async def embed(request: Request) -> Response:
        data = await read_json(request, limits.max_json_bytes)
        image = state.image(data)
        options = state.options(data, {"contrast_limits", "rgb"})
        key = await _run_job(request, lambda job: session.embed(image, **options))
        return JSONResponse({"key": key})

    async def cancel(request: Request) -> Response:
        data = await read_json(request, limits.max_json_bytes)
        name = data.get("job")
        count = state.queue.cancel(_client(request), str(name)[:64] if name else None)
        return JSONResponse({"cancelled": count})

    async def clear_cache(request: Request) -> Response:
        await read_body(request, limits.max_json_bytes)
        session.clear_cache()
        return JSONResponse({"cleared": True})

    async def cache_info(request: Request) -> Response:
        return JSONResponse(jsonable({**session.cache_info(),
                                      "images": {"entries": len(state.images), "bytes": state.images.nbytes}}))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        return exc.response() if isinstance(exc, HTTPError) else _error(500, "internal error", "internal")

    async def on_input_error(request: Request, exc: Exception) -> Response:
        return _error(400 if isinstance(exc, WireError) else 422, _one_line(exc), "bad_input")

    async def on_disconnect(request: Request, exc: Exception) -> Response:
        return Response(status_code=400)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return _error(500, f"the server failed on this request ({type(exc).__name__}); see the server log",
                      "internal")

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/info", info, methods=["GET"]),
        Route("/v1/images/{sha}", image_head, methods=["HEAD"]),
        Route("/v1/images/{sha}", image_put, methods=["PUT"]),
        Route("/v1/ask", ask, methods=["POST"]),
        Route("/v1/segment", segment, methods=["POST"]),
        Route("/v1/embed", embed, methods=["POST"]),
        Route("/v1/cancel", cancel, methods=["POST"]),
        Route("/v1/clear_cache", clear_cache, methods=["POST"]),
        Route("/v1/cache_info", cache_info, methods=["GET"]),
    ]

    async def lifespan(app) -> AsyncIterator[None]:
        state.queue.start()
        yield
        await state.queue.stop()

    app = Starlette(
        routes=routes, lifespan=_as_context(lifespan),
        exception_handlers={HTTPError: on_http_error, SessionInputError: on_input_error,
                            ClientDisconnect: on_disconnect, Exception: on_unexpected},
    )
    app.state.serve = state
    return Guard(app, token, limits)


def _as_context(gen_func):
    import contextlib

    return contextlib.asynccontextmanager(gen_func)


def serve(session: Any, host: str, port: int, token: str | None, limits: ServeLimits | None = None,
          announce=print) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM). The socket is bound here, so port 0 picks a
    free port, and the line announcing the address names the real one."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
    # response written in two parts (headers, body) waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    bound = sock.getsockname()[1]
    app = build_app(session, token, limits)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            timeout_keep_alive=30, server_header=False)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    announce(f"medplib serve: {session.model_name} on {session.device}, listening on http://{shown}:{bound} "
             f"({'token required' if token else 'no token: loopback only'})")
    uvicorn.Server(config).run(sockets=[sock])
