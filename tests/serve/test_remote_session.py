"""RemoteSession against a real server: same answers and masks as a local Session, images sent once,
cancel and disconnect free the model, many clients at once."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from serve_process import wait_idle

from napari_medplib.engine import Reply, Session
from napari_medplib.regions import Region
from napari_medplib.serve.client import RemoteSession


def _requests(session: RemoteSession) -> list[tuple[str, str]]:
    """(method, path) of every request the client sends from now on."""
    seen: list[tuple[str, str]] = []
    session.http.event_hooks["request"].append(lambda r: seen.append((r.method, r.url.path)))
    return seen


def test_info_and_health(server, remote, local):
    assert isinstance(remote, RemoteSession) and not remote.closed
    assert remote.model_name == local.model_name
    assert remote.fingerprint == local.fingerprint
    info = remote.info
    assert {"ask", "segment", "cancel"} <= set(info["capabilities"]) and info["template"] == local.template
    health = httpx.get(server.url + "/health").json()  # no token needed
    assert health["status"] == "ok" and health["model"] == local.model_name


def test_streamed_answer_equals_local(remote, local, image):
    regions = [Region.box(8, 8, 22, 24), Region.point(45, 60)]
    question = "What is in <region1> and <region2>?"
    stream = remote.ask_stream(image, question, regions, max_new_tokens=24)
    pieces = list(stream)
    want = local.ask(image, question, regions, max_new_tokens=24)
    assert isinstance(stream.reply, Reply)
    assert len(pieces) > 1 and "".join(pieces) == stream.reply.text == want.text
    assert stream.reply.token_ids == want.token_ids and stream.reply.finish_reason == want.finish_reason
    assert stream.reply.image_key == want.image_key and stream.reply.warnings == want.warnings
    assert [r.kind for r in stream.reply.regions] == ["box", "point"]
    assert stream.reply.regions[0].image_shape == image.shape
    np.testing.assert_array_equal(stream.reply.regions[0].coords, want.regions[0].coords)


def test_ask_with_on_text_and_history(remote, local, image):
    pieces: list[str] = []
    history = [("What is this?", "A cell.")]
    got = remote.ask(image, "Where is it?", max_new_tokens=10, on_text=pieces.append, history=history)
    want = local.ask(image, "Where is it?", max_new_tokens=10, history=history)
    assert "".join(pieces) == got.text == want.text


@pytest.mark.parametrize("prompt", [
    {"points": [(15, 15)], "point_labels": [1]},
    {"box": (8, 8, 22, 24), "multimask": True},
    {"points": [(15, 15), (45, 60)], "point_labels": [1, 0], "window": None},
])
def test_segment_equals_local(remote, local, image, prompt):
    got = remote.segment(image, **prompt)
    want = local.segment(image, **prompt)
    assert got.mask.dtype == bool and got.mask.shape == image.shape
    np.testing.assert_array_equal(got.mask, want.mask)
    assert len(got.masks) == len(want.masks)
    for a, b in zip(got.masks, want.masks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got.scores == want.scores and got.window == want.window and got.image_key == want.image_key
    assert set(got.table) == set(want.table)
    for name in want.table:
        np.testing.assert_array_equal(got.table[name], want.table[name])


def test_segment_with_mask_prior(remote, local, image):
    prior = np.zeros(image.shape, bool)
    prior[9:21, 9:23] = True
    got = remote.segment(image, box=(8, 8, 22, 24), mask=prior)
    np.testing.assert_array_equal(got.mask, local.segment(image, box=(8, 8, 22, 24), mask=prior).mask)


def test_image_is_uploaded_once(remote, image):
    sent = _requests(remote)
    fresh = image + np.uint16(1)  # an image this server has not seen
    remote.segment(fresh, points=[(15, 15)], point_labels=[1])
    remote.ask(fresh, "What is this?", max_new_tokens=4)
    remote.segment(fresh, box=(8, 8, 22, 24))
    puts = [p for m, p in sent if m == "PUT"]
    assert len(puts) == 1 and puts[0].startswith("/v1/images/")
    # a second client probes (HEAD) and finds it there: no upload either
    other = Session.connect(remote.url, token=remote.http.headers["Authorization"][7:])
    try:
        seen = _requests(other)
        other.segment(fresh, points=[(15, 15)], point_labels=[1])
        assert [m for m, _ in seen] == ["HEAD", "POST"]
    finally:
        other.close()


def test_cancel_frees_the_model(server, remote, image):
    stream = remote.ask_stream(image, "Describe everything in detail.", max_new_tokens=1500)
    for _piece in stream:
        break  # leaving the loop cancels the answer
    start = time.monotonic()
    wait_idle(server.url, within=1.0)
    assert time.monotonic() - start < 1.0
    assert remote.ask(image, "What is this?", max_new_tokens=3).finish_reason == "max_new_tokens"


def test_session_cancel_from_another_thread(server, remote, image):
    got: dict = {}

    def run() -> None:
        got["reply"] = remote.ask(image, "Describe the image.", max_new_tokens=1500, on_text=lambda p: None)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    remote.cancel()
    worker.join(5)
    assert not worker.is_alive() and got["reply"].finish_reason == "cancelled"
    wait_idle(server.url, within=1.0)


def test_client_disconnect_frees_the_model(server, remote, image):
    """A client that vanishes mid-stream (no cancel request) stops the model within a second."""
    remote.upload(image)
    from napari_medplib.serve.wire import image_id, wire_image

    payload = {"image": image_id(wire_image(image)), "question": "Describe.", "regions": [],
               "options": {"max_new_tokens": 1500}}
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=headers) as raw:
        with raw.stream("POST", "/v1/ask", json=payload) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("event: token"):
                    break
    start = time.monotonic()
    health = wait_idle(server.url, within=1.0)
    assert time.monotonic() - start < 1.0 and health["busy"] is False


def test_eight_concurrent_clients_match_local(server, local, image):
    questions = [f"What is in region {i}?" for i in range(8)]
    want = {q: local.ask(image, q, max_new_tokens=12).text for q in questions}
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    token = server.token

    def client(question: str) -> None:
        try:
            with Session.connect(server.url, token=token) as session:
                results[question] = "".join(session.ask_stream(image, question, max_new_tokens=12))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def killed() -> None:  # one more client that leaves mid-answer
        with Session.connect(server.url, token=token) as session:
            for _ in session.ask_stream(image, "Describe.", max_new_tokens=1500):
                break

    threads = [threading.Thread(target=client, args=(q,)) for q in questions] + [threading.Thread(target=killed)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == want
    wait_idle(server.url, within=2.0)


def test_ask_planes_matches_local(remote, local, image):
    stack = np.stack([image, image[::-1].copy()])
    got = remote.ask_planes(stack, "What is this?", max_new_tokens=6)
    want = local.ask_planes(stack, "What is this?", max_new_tokens=6)
    assert [r.text for r in got] == [r.text for r in want]


def test_embed_clear_cache_and_close(remote, local, image):
    assert remote.embed(image) == local.embed(image)
    remote.clear_cache()
    assert remote.cache_info()["features"]["entries"] == 0
    remote.close()
    assert remote.closed
    with pytest.raises(ValueError, match="closed"):
        remote.segment(image, points=[(1, 1)], point_labels=[1])


def test_input_errors_are_the_engines(remote, image):
    with pytest.raises(ValueError, match="question is empty"):
        remote.ask(image, "   ")
    with pytest.raises(ValueError) as err:
        remote.segment(image, points=[(500, 500)], point_labels=[1])
    assert "Traceback" not in str(err.value) and str(err.value)
