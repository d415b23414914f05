"""Security of the server: tokens, sizes read before bodies, malformed input -> 4xx with one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from napari_medplib.serve.wire import image_id, pack_region, wire_image

ROUTES = [("GET", "/v1/info"), ("HEAD", "/v1/images/" + "0" * 64), ("PUT", "/v1/images/" + "0" * 64),
          ("POST", "/v1/ask"), ("POST", "/v1/segment"), ("POST", "/v1/embed"), ("POST", "/v1/cancel"),
          ("POST", "/v1/clear_cache"), ("GET", "/v1/cache_info")]


def _raw(url: str, request: bytes, wait: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes (headers only: the declared body is never sent) and read the status line."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ")[1]), body


def _no_traceback(body: bytes | str) -> None:
    text = body.decode() if isinstance(body, bytes) else body
    for marker in ("Traceback", 'File "', "site-packages", "line "):
        assert marker not in text, text


@pytest.fixture
def authed(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30) as c:
        yield c


@pytest.mark.parametrize("token", [None, "wrong", "x" * 43])
def test_wrong_or_missing_token_is_401_on_every_route(server, token):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    for method, path in ROUTES:
        response = httpx.request(method, server.url + path, headers=headers, json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":
            assert "token" in response.json()["error"]
            _no_traceback(response.content)
    assert httpx.get(server.url + "/health").status_code == 200


def test_401_comes_before_the_body_is_read(server):
    """1 GB declared, nothing sent: an answer proves the server did not wait for the body."""
    start = time.monotonic()
    status, _ = _raw(server.url, b"PUT /v1/images/" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
    assert status == 401 and time.monotonic() - start < 2


def test_oversized_upload_is_refused_with_memory_flat(server):
    before = server.rss()
    token = server.token.encode()
    status, body = _raw(server.url, b"PUT /v1/images/" + b"a" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Bearer " + token + b"\r\nX-Medplib-Dtype: <u2\r\n"
                        b"X-Medplib-Shape: 16384,32768\r\nContent-Length: 1073741824\r\n\r\n")
    assert status == 413 and b"limit" in body
    _no_traceback(body)
    # no Content-Length (chunked): a 1 GB shape is refused before any byte is read
    status, body = _raw(server.url, b"PUT /v1/images/" + b"a" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Bearer " + token + b"\r\nX-Medplib-Dtype: <u2\r\n"
                        b"X-Medplib-Shape: 16384,32768\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert status == 413
    assert server.rss() - before < 20 * 2**20


def test_streamed_body_longer_than_its_shape_is_cut_off(server, authed):
    """A chunked upload that claims a small image and keeps sending is refused at the claimed size."""
    before = server.rss()
    sent = {"bytes": 0}

    def body():
        for _ in range(64):  # up to 64 MiB, generated lazily
            sent["bytes"] += 2**20
            yield b"\0" * 2**20

    try:
        response = authed.put("/v1/images/" + "b" * 64, content=body(),
                              headers={"X-Medplib-Dtype": "|u1", "X-Medplib-Shape": "64,64"})
        assert response.status_code in (400, 413)
        _no_traceback(response.content)
    except httpx.HTTPError:
        pass  # the server may close the connection while the client is still sending: also a refusal
    assert server.rss() - before < 20 * 2**20
    assert authed.head("/v1/images/" + "b" * 64).status_code == 404


def test_upload_checks(authed, image):
    array = wire_image(image)
    sha = image_id(array)
    headers = {"X-Medplib-Dtype": array.dtype.str, "X-Medplib-Shape": "64,80"}
    bad = authed.put("/v1/images/" + "c" * 64, content=array.tobytes(), headers=headers)
    assert bad.status_code == 400 and "sha256" in bad.json()["error"]
    for shape in ("5120", "1,2,3,4", "64,0", "x,y"):
        response = authed.put(f"/v1/images/{sha}", content=array.tobytes(),
                              headers={**headers, "X-Medplib-Shape": shape})
        assert response.status_code == 400, shape
        _no_traceback(response.content)
    response = authed.put(f"/v1/images/{sha}", content=array.tobytes(), headers={**headers, "X-Medplib-Dtype": "|O"})
    assert response.status_code == 400 and "dtype" in response.json()["error"]
    short = authed.put(f"/v1/images/{sha}", content=array.tobytes()[:-2], headers=headers)
    assert short.status_code == 400
    assert authed.put("/v1/images/../../etc/passwd", content=b"x").status_code in (400, 404)
    ok = authed.put(f"/v1/images/{sha}", content=array.tobytes(), headers=headers)
    assert ok.status_code == 201 and authed.head(f"/v1/images/{sha}").status_code == 200


def _uploaded(authed, image) -> str:
    array = wire_image(image)
    sha = image_id(array)
    authed.put(f"/v1/images/{sha}", content=array.tobytes(),
               headers={"X-Medplib-Dtype": array.dtype.str, "X-Medplib-Shape": ",".join(map(str, array.shape))})
    return sha


def test_malformed_requests_are_4xx_with_a_message(authed, image):
    from napari_medplib.regions import Region

    sha = _uploaded(authed, image)
    point = pack_region(Region.point(10, 10))
    cases = [
        ("/v1/ask", b"{not json", 400, "JSON"),
        ("/v1/ask", b"[1, 2]", 400, "object"),
        ("/v1/ask", {"image": sha, "question": "What?", "regions": [point] * 10_000}, 422, "10,000 regions"),
        ("/v1/ask", {"image": sha, "question": 5}, 422, "question"),
        ("/v1/ask", {"image": sha, "question": "x" * 10_000}, 422, "characters"),
        ("/v1/ask", {"image": sha, "question": "What?", "options": {"max_new_tokens": 10**9}}, 422, "max_new_tokens"),
        ("/v1/ask", {"image": sha, "question": "What?", "options": {"path": "/etc/passwd"}}, 422, "unknown option"),
        ("/v1/ask", {"image": sha, "question": "What?", "regions": [{"kind": "blob"}]}, 400, "region"),
        ("/v1/ask", {"image": "f" * 64, "question": "What?"}, 404, "upload"),
        ("/v1/ask", {"image": "../../etc/passwd", "question": "What?"}, 400, "sha256"),
        ("/v1/segment", {"image": sha, "options": {"points": [[500, 500]], "point_labels": [1]}}, 422, "outside"),
        ("/v1/segment", {"image": sha, "options": {"mask": {"dtype": "|b1", "shape": [64, 80], "data": "!!"}}},
         400, "base64"),
        ("/v1/segment", {"image": sha, "options": {"box": "left"}}, 422, ""),
    ]
    for path, body, status, words in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = authed.post(path, content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == status, (path, body if isinstance(body, bytes) else list(body), response.text)
        message = response.json()["error"]
        assert message and words.lower() in message.lower(), message
        assert "\n" not in message
        _no_traceback(response.content)


def test_wrong_image_shape_for_the_model_is_4xx(authed):
    odd = np.zeros((4, 64, 64), np.uint8)  # 3-D with 64 "channels": not one plane
    sha = _uploaded(authed, odd)
    response = authed.post("/v1/segment", json={"image": sha, "options": {"points": [[1, 1]], "point_labels": [1]}})
    assert 400 <= response.status_code < 500
    assert response.json()["error"]
    _no_traceback(response.content)


def test_zip_bomb_mask_is_refused():
    import base64
    import zlib

    from napari_medplib.serve.wire import WireError, unpack_array

    bomb = base64.b64encode(zlib.compress(b"\0" * 50_000_000)).decode()
    with pytest.raises(WireError):
        unpack_array({"dtype": "|u1", "shape": [10, 10], "data": bomb})


def test_non_loopback_host_needs_a_token(tmp_path):
    from napari_medplib.serve.tokens import server_token

    with pytest.raises(ValueError, match="loopback"):
        server_token("0.0.0.0", None, no_auth=True)
    out = subprocess.run([sys.executable, "-m", "napari_medplib", "serve", "--host", "0.0.0.0", "--no-auth"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "loopback" in out.stderr and "Traceback" not in out.stderr
    assert server_token("127.0.0.1", None, no_auth=True) is None


def test_token_made_once_with_user_only_permissions(tmp_path):
    from napari_medplib.serve.tokens import digest, server_token, token_matches

    shown: list[str] = []
    path = tmp_path / "cfg" / "token"
    token = server_token("0.0.0.0", path, no_auth=False, announce=shown.append)
    assert len(token) >= 40 and (path.stat().st_mode & 0o777) == 0o600
    assert len(shown) == 1 and token in shown[0]
    assert server_token("0.0.0.0", path, no_auth=False, announce=shown.append) == token
    assert len(shown) == 1  # printed once, at creation
    assert token_matches(token, digest(token)) and not token_matches(token[:-1], digest(token))
    assert not token_matches(None, digest(token))


def test_rate_limiter():
    from napari_medplib.serve.limits import RateLimiter

    limiter = RateLimiter(rate=10, burst=3)
    assert [limiter.allow("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.allow("a", now=0.0)
    assert wait == pytest.approx(0.1)
    assert limiter.allow("b", now=0.0) == 0.0  # another client has its own bucket
    assert limiter.allow("a", now=0.2) == 0.0
