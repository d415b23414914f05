"""`RemoteSession`: the `Session` interface, answered by a `medplib serve` server.

The widget, the CLI and scripts call ``ask`` / ``ask_stream`` / ``segment`` / ``cancel`` ... exactly as
on a local session and get the same `Reply` and `WindowedSegmentResult` back. Each image travels once:
the client names it by its sha256, asks the server whether it has it (HEAD), and uploads it only if
not. When the server restarted (or dropped the image from its cache) the client notices - a new
server instance id, a 404 for the image, a dropped connection before any answer - and reconnects and
re-uploads on demand. Failures are one `RemoteError` line naming the server and the fix.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from ..engine.errors import SessionClosedError, SessionInputError
from ..engine.reply import AnyEvent, AskStream, CancelledSince, Reply
from .errors import (
    RemoteError,
    ServerAuthError,
    ServerBusyError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from .tokens import client_token
from .wire import (
    image_header,
    image_id,
    jsonable,
    pack_array,
    pack_region,
    unpack_reply,
    unpack_segment,
    wire_image,
)

CLIENT_HEADER = "X-Medplib-Client"
#: How often a waiting ask checks its cancel events (seconds).
CANCEL_POLL = 0.05


class _ImageMissing(Exception):
    """The server does not have the image (restarted, or evicted it): upload again."""


class _Reconnect(Exception):
    """The connection broke before the server answered anything: safe to send again."""


def _check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SessionInputError(f"server URL {url!r} must look like http://host:8765 or https://host/medplib")
    if parts.username or parts.password:
        raise SessionInputError("put the token in the token setting, not in the server URL")
    return url.strip().rstrip("/")


class RemoteSession:
    """A `Session` whose model runs on a `medplib serve` server (see `Session.connect`)."""

    def __init__(self, url: str, token: str | None = None, *, token_file: str | None = None,
                 timeout: float = 120.0, connect_timeout: float = 5.0) -> None:
        self.url = _check_url(url)
        self._timeout = float(timeout)
        token = client_token(self.url, token, token_file)
        headers = {CLIENT_HEADER: secrets.token_hex(8), "User-Agent": "napari-medplib"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http: httpx.Client | None = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(self._timeout, connect=connect_timeout),
            follow_redirects=False,
            transport=httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]),
        )
        self._uploaded: set[str] = set()
        self._guard = threading.Lock()
        self._cancels = 0
        self.folder = None
        self._info: dict[str, Any] = {}
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------------------- state
    def refresh(self) -> dict[str, Any]:
        """Ask the server who it is; a new server instance forgets what was uploaded to the old one."""
        info = self._json("GET", "/v1/info")
        if info.get("instance") != self._info.get("instance"):
            self._uploaded.clear()
        self._info = info
        self.model_name = str(info.get("model", "model"))
        self.fingerprint = str(info.get("fingerprint", ""))
        self.device = f"{info.get('device', '?')} at {urlsplit(self.url).netloc}"
        self.dtype = str(info.get("dtype", ""))
        self.template = str(info.get("template", ""))
        return info

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    @property
    def closed(self) -> bool:
        return self._http is None

    def __repr__(self) -> str:
        return f"RemoteSession({self.model_name!r}, {'closed' if self.closed else self.url})"

    def close(self) -> None:
        """Close the connection (the server and its model stay up for other clients)."""
        http, self._http = self._http, None
        if http is not None:
            http.close()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Stop this client's running and queued answers at their next token (any thread)."""
        with self._guard:
            self._cancels += 1
        if self._http is not None:
            try:
                self._json("POST", "/v1/cancel", json={})
            except RemoteError:
                pass  # nothing to stop on a server that is gone

    def clear_cache(self) -> None:
        """Drop the server's cached features, embeddings and prefix caches (uploaded images stay)."""
        self._json("POST", "/v1/clear_cache", json={})

    def cache_info(self) -> dict[str, Any]:
        return self._json("GET", "/v1/cache_info")

    # ---------------------------------------------------------------------------- transport
    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            raise SessionClosedError("this remote session is closed; connect again with Session.connect()")
        return self._http

    def _failure(self, exc: BaseException) -> RemoteError:
        if isinstance(exc, httpx.TimeoutException):
            return ServerTimeoutError(
                f"the MedPLIB server at {self.url} did not answer within {self._timeout:.0f} s; it may be busy "
                f"or gone: check it with `curl {self.url}/health`")
        if isinstance(exc, httpx.ConnectError):
            return ServerUnavailableError(
                f"cannot reach the MedPLIB server at {self.url}; start it there with `medplib serve` and check "
                "the URL (or the ssh tunnel)")
        return ServerUnavailableError(
            f"lost the connection to the MedPLIB server at {self.url} ({type(exc).__name__}); check that it "
            "is still running and ask again")

    def _refused(self, response: httpx.Response) -> BaseException:
        """A non-2xx response -> the matching error."""
        try:
            body = response.json()
            message, code = str(body.get("error", "")), str(body.get("code", ""))
        except (ValueError, AttributeError):
            message, code = response.text[:200].strip(), ""
        status = response.status_code
        if status == 401:
            return ServerAuthError(
                f"the MedPLIB server at {self.url} refused the token; use the token it printed at its first "
                "start (its token file): the Server token setting, --token-file or $MEDPLIB_SERVER_TOKEN")
        if status == 404 and code == "image_missing":
            return _ImageMissing()
        if status in (429, 503):
            return ServerBusyError(f"the MedPLIB server at {self.url} is busy: {message}")
        if 400 <= status < 500:
            return SessionInputError(message or f"the server refused the request (HTTP {status})")
        return RemoteError(f"the MedPLIB server at {self.url} failed: {message or f'HTTP {status}'}")

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise _Reconnect(self._failure(exc)) from exc
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None
        if response.status_code >= 400:
            raise self._refused(response)
        return response

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """``call()`` again after a broken connection (the server restarted) or a missing image."""
        for attempt in range(3):
            try:
                return call()
            except _ImageMissing:
                self._uploaded.clear()
            except _Reconnect as broken:
                if attempt == 2:
                    raise broken.args[0] from None
                try:
                    self._refresh_quietly()
                except _Reconnect as again:
                    raise again.args[0] from None
        raise RemoteError(f"the MedPLIB server at {self.url} keeps losing the image; is its image cache too small?")

    def _refresh_quietly(self) -> None:
        try:
            info = self._send("GET", "/v1/info").json()
        except _ImageMissing:  # pragma: no cover - info never answers that
            return
        if info.get("instance") != self._info.get("instance"):
            self._uploaded.clear()
            self._info = info

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return self._retrying(lambda: self._send(method, path, **kwargs).json())
        except _ImageMissing:  # pragma: no cover
            raise RemoteError(f"the MedPLIB server at {self.url} lost the image") from None

    # ---------------------------------------------------------------------------- images
    def _ensure(self, array: np.ndarray, sha: str) -> None:
        if sha in self._uploaded:
            return
        try:
            self._send("HEAD", f"/v1/images/{sha}")
        except SessionInputError:  # 404: not there yet
            dtype, shape = image_header(array)
            self._send("PUT", f"/v1/images/{sha}", content=array.tobytes(),
                       headers={"X-Medplib-Dtype": dtype, "X-Medplib-Shape": ",".join(map(str, shape)),
                                "Content-Type": "application/octet-stream"})
        self._uploaded.add(sha)

    def _image(self, image: Any) -> tuple[np.ndarray, str]:
        array = wire_image(image)
        return array, image_id(array)

    def upload(self, image: Any) -> str:
        """Send ``image`` to the server now (if it does not have it yet); returns its sha256."""
        array, sha = self._image(image)
        self._retrying(lambda: self._ensure(array, sha))
        return sha

    # ---------------------------------------------------------------------------- ask
    def ask(self, image, question: str, regions: Sequence[Any] = (), *,
            on_text: Callable[[str], None] | None = None, on_progress: Callable[[str, int, int], None] | None = None,
            cancel: threading.Event | None = None, **options: Any) -> Reply:
        """`Session.ask` on the server: same arguments, same `Reply` (text streamed to ``on_text``)."""
        session_cancel = CancelledSince(lambda: self._cancels)
        if not isinstance(question, str) or not question.strip():
            raise SessionInputError("the question is empty; type a question about the image")
        array, sha = self._image(image)
        job = secrets.token_hex(8)
        payload = {"image": sha, "question": question, "regions": [pack_region(r) for r in regions],
                   "options": jsonable(options), "job": job}
        stop = AnyEvent(cancel, session_cancel)

        def once() -> Reply:
            self._ensure(array, sha)
            return self._ask_once(payload, job, on_text, on_progress, stop)

        return self._retrying(once)

    def _ask_once(self, payload: dict[str, Any], job: str, on_text, on_progress, stop: AnyEvent) -> Reply:
        from httpx_sse import EventSource

        finished = threading.Event()
        watcher = threading.Thread(target=self._watch_cancel, args=(stop, job, finished), daemon=True,
                                   name="medplib-remote-cancel")
        started = False
        try:
            with self.http.stream("POST", "/v1/ask", json=payload) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._refused(response)
                watcher.start()
                for event in EventSource(response).iter_sse():
                    started = True
                    if event.event == "token":
                        if on_text is not None:
                            on_text(json.loads(event.data))
                    elif event.event == "progress":
                        if on_progress is not None:
                            on_progress(*json.loads(event.data))
                    elif event.event == "done":
                        return unpack_reply(json.loads(event.data))
                    elif event.event == "error":
                        error = json.loads(event.data)
                        fake = httpx.Response(int(error.get("status", 500)), json=error)
                        raise self._refused(fake)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            if not started:
                raise _Reconnect(self._failure(exc)) from exc
            raise self._failure(exc) from None
        except httpx.HTTPError as exc:
            raise self._failure(exc) from None
        finally:
            finished.set()
        raise ServerUnavailableError(f"the MedPLIB server at {self.url} ended the answer early; ask again")

    def _watch_cancel(self, stop: AnyEvent, job: str, finished: threading.Event) -> None:
        """Tell the server to stop ``job`` once a cancel event is set (the model stops at its next token)."""
        while not finished.wait(CANCEL_POLL):
            if stop.is_set():
                try:
                    self._send("POST", "/v1/cancel", json={"job": job})
                except (RemoteError, SessionInputError, _Reconnect, _ImageMissing):
                    pass
                return

    def ask_stream(self, image, question: str, regions: Sequence[Any] = (), **kwargs: Any) -> AskStream:
        """Like `ask`, as an iterator of text pieces; ``stream.reply`` holds the Reply afterwards."""
        if "on_text" in kwargs:
            raise SessionInputError("ask_stream() yields the text pieces itself; do not pass on_text")
        if not isinstance(question, str) or not question.strip():
            raise SessionInputError("the question is empty; type a question about the image")
        self.http  # noqa: B018 - raise SessionClosedError now
        user_cancel = kwargs.pop("cancel", None)
        session_cancel = CancelledSince(lambda: self._cancels)

        def run(emit: Callable[[str], None], stream_cancel: threading.Event) -> Reply:
            return self.ask(image, question, regions, on_text=emit,
                            cancel=AnyEvent(stream_cancel, user_cancel, session_cancel), **kwargs)

        return AskStream(run)

    def ask_planes(self, planes, question: str, regions: Sequence[Any] = (), *, contrast_limits=None,
                   rgb: bool | None = None, on_progress: Callable[[str, int, int], None] | None = None,
                   cancel: threading.Event | None = None, batch_size: int = 8, threads: int | None = None,
                   **options: Any) -> list[Reply]:
        """`Session.ask_planes` plane by plane on the server, with one contrast for the whole stack."""
        from ..engine.planes import as_planes
        from ..engine.stack import stack_contrast_limits

        session_cancel = CancelledSince(lambda: self._cancels)
        stack = as_planes(planes)
        if contrast_limits is None:
            contrast_limits = stack_contrast_limits(stack, rgb)
        replies: list[Reply] = []
        if on_progress:
            on_progress("grounding planes", 0, len(stack))
        for plane in _iterate(stack):
            if session_cancel.is_set() or (cancel is not None and cancel.is_set()):
                break
            reply = self.ask(plane, question, regions, contrast_limits=contrast_limits, rgb=rgb, cancel=cancel,
                             **options)
            if reply.finish_reason == "cancelled":
                break
            replies.append(reply)
            if on_progress:
                on_progress("grounding planes", len(replies), len(stack))
        return replies

    # ---------------------------------------------------------------------------- segment / embed
    def segment(self, image, points=None, point_labels=None, box=None, mask=None, multimask: bool = False,
                contrast_limits=None, rgb: bool | None = None, *, on_progress=None, **options: Any):
        """`Session.segment` on the server: same prompts and options, same result type."""
        array, sha = self._image(image)
        sent = dict(options, points=points, point_labels=point_labels, box=box, multimask=multimask,
                    contrast_limits=contrast_limits, rgb=rgb)
        sent = {k: v for k, v in jsonable(sent).items() if v is not None or k in ("window",)}
        if mask is not None:
            sent["mask"] = pack_array(np.asarray(mask, dtype=bool))
        payload = {"image": sha, "options": sent}

        def once():
            self._ensure(array, sha)
            return unpack_segment(self._send("POST", "/v1/segment", json=payload).json())

        return self._retrying(once)

    def embed(self, image, contrast_limits=None, rgb=None, on_progress=None) -> str:
        """Have the server compute both embeddings of a plane ahead of time; returns its content key."""
        array, sha = self._image(image)
        payload = {"image": sha, "options": jsonable({"contrast_limits": contrast_limits, "rgb": rgb})}

        def once() -> str:
            self._ensure(array, sha)
            return str(self._send("POST", "/v1/embed", json=payload).json()["key"])

        return self._retrying(once)


def _iterate(stack: Any) -> Iterator[Any]:
    for i in range(len(stack)):
        yield stack[i]
