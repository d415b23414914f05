"""Streaming, cancellation from another thread, progress callbacks, thread safety, close()."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_medplib import Region
from napari_medplib.engine import AskStream, Session, SessionClosedError, SessionInputError
from napari_medplib.testing import tiny_model


def _slow_steps(model, seconds: float = 0.005):
    """Every LM forward sleeps a little, so a test can act mid-generation."""
    return model.language_model.lm_head.register_forward_hook(lambda *a: time.sleep(seconds))


def test_ask_stream_pieces_join_to_the_reply(tiny_session, image16):
    stream = tiny_session.ask_stream(image16, "Describe <region>.", [Region.box(10, 10, 40, 40)], max_new_tokens=12)
    assert isinstance(stream, AskStream)
    pieces = list(stream)
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == stream.reply.text
    assert stream.reply.finish_reason in ("eos", "stop_string", "max_new_tokens")
    same = tiny_session.ask(image16, "Describe <region>.", [Region.box(10, 10, 40, 40)], max_new_tokens=12)
    assert same.text == stream.reply.text


def test_ask_on_text_gets_the_pieces_in_the_calling_thread(tiny_session, image16):
    pieces, threads = [], set()

    def on_text(piece):
        pieces.append(piece)
        threads.add(threading.get_ident())

    reply = tiny_session.ask(image16, "What is it?", max_new_tokens=10, on_text=on_text)
    assert "".join(pieces) == reply.text and threads == {threading.get_ident()}


def test_stream_input_errors_are_raised_before_iterating(tiny_session, image16):
    with pytest.raises(SessionInputError, match="empty"):
        tiny_session.ask_stream(image16, "   ")
    stream = tiny_session.ask_stream(image16, "What is <region>?", [Region.box(500, 500, 600, 600)])
    with pytest.raises(SessionInputError, match="outside"):
        list(stream)


def test_cancel_event_from_another_thread_stops_at_the_next_token(tiny_session, image16):
    model = tiny_session.model
    handle = _slow_steps(model)
    cancel, started = threading.Event(), threading.Event()
    generated = []

    def mark(*args):
        generated.append(1)
        started.set()

    hook = model.language_model.lm_head.register_forward_hook(mark)

    def canceller():
        started.wait(5)
        time.sleep(0.02)
        cancel.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    try:
        reply = tiny_session.ask(image16, "What is it?", max_new_tokens=500, cancel=cancel)
    finally:
        thread.join()
        handle.remove()
        hook.remove()
    assert reply.finish_reason == "cancelled"
    assert 1 <= len(reply.token_ids) < 100 and reply.masks == []


def test_session_cancel_stops_a_running_stream(tiny_session, image16):
    handle = _slow_steps(tiny_session.model)
    try:
        stream = tiny_session.ask_stream(image16, "What is it?", max_new_tokens=500)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 2:
                tiny_session.cancel()
        # the next ask is not affected by the earlier cancel
        after = tiny_session.ask(image16, "What is it?", max_new_tokens=3)
    finally:
        handle.remove()
    assert stream.reply.finish_reason == "cancelled" and len(stream.reply.token_ids) < 100
    assert after.finish_reason != "cancelled"


def test_leaving_a_stream_early_cancels_its_generation(tiny_session, image16):
    handle = _slow_steps(tiny_session.model)
    try:
        stream = tiny_session.ask_stream(image16, "What is it?", max_new_tokens=500)
        for _ in stream:
            break
        stream_iter_closed = time.perf_counter()
        tiny_session.ask(image16, "What is it?", max_new_tokens=1)  # the lock is free again quickly
    finally:
        handle.remove()
    assert time.perf_counter() - stream_iter_closed < 2.0
    assert stream.reply is not None and stream.reply.finish_reason == "cancelled"


def test_two_threads_asking_at_once_get_consistent_replies(image16):
    session = Session.from_model(tiny_model(), name="tiny")
    other = np.ascontiguousarray(image16[::-1, ::-1])
    jobs = [(image16, "What is it?"), (other, "Describe <region>."), (image16, "Where is the cell?"), (other, "What is it?")]
    expected = [session.ask(img, q, [Region.box(5, 5, 40, 40)] if "<region>" in q else [], max_new_tokens=8).text
                for img, q in jobs]
    session.clear_cache()
    results: dict[int, str] = {}
    errors = []

    def worker(i):
        try:
            img, q = jobs[i]
            for _ in range(2):
                reply = session.ask(img, q, [Region.box(5, 5, 40, 40)] if "<region>" in q else [], max_new_tokens=8)
                results.setdefault(i, reply.text)
                assert reply.text == results[i]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(jobs))] == expected


def test_progress_reports_embedding_and_generation(tiny_session, image16):
    events = []
    tiny_session.ask(image16, "What is it?", max_new_tokens=2, on_progress=lambda *e: events.append(e))
    stages = [e[0] for e in events]
    assert ("embedding image (CLIP)", 0, 1) in events and ("embedding image (CLIP)", 1, 1) in events
    assert "generating" in stages
    events.clear()
    tiny_session.segment(image16, points=[(5, 5)], on_progress=lambda *e: events.append(e))
    assert events == [("embedding image (SAM)", 0, 1), ("embedding image (SAM)", 1, 1)]
    events.clear()
    tiny_session.segment(image16, points=[(6, 6)], on_progress=lambda *e: events.append(e))
    assert events == []  # cached: nothing to wait for


def test_close_frees_the_model_and_later_calls_fail_clearly(image16):
    session = Session.from_model(tiny_model(), name="tiny")
    session.ask(image16, "What?", max_new_tokens=1)
    session.close()
    assert session.closed and session.cache_info()["features"]["entries"] == 0
    with pytest.raises(SessionClosedError, match="closed"):
        session.ask(image16, "What?")
    with pytest.raises(SessionClosedError):
        session.segment(image16, points=[(1, 1)])
    with pytest.raises(SessionClosedError):
        session.ask_stream(image16, "What?")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "needs a prompt"),
        ({"points": [(5, 500)]}, "outside the image"),
        ({"points": [(5, 5), (6, 6)], "point_labels": [1]}, "one label"),
        ({"points": [(5, 5)], "point_labels": [2]}, "1 \\(foreground\\) or 0"),
        ({"box": (1, 2, 3)}, "4 numbers"),
        ({"box": (200, 300, 400, 500)}, "outside the image"),
        ({"mask": np.ones((5, 5), bool)}, "must match the image"),
        ({"mask": np.zeros((90, 130), bool)}, "empty"),
        ({"points": []}, "empty list of points"),
    ],
)
def test_segment_bad_prompts(tiny_session, image16, kwargs, match):
    with pytest.raises(SessionInputError, match=match):
        tiny_session.segment(image16, **kwargs)


def test_segment_prompts_change_the_result(tiny_session, image16):
    a = tiny_session.segment(image16, points=[(20, 20)], multimask=True)
    b = tiny_session.segment(image16, points=[(70, 110)], multimask=True)
    c = tiny_session.segment(image16, points=[(20, 20)], box=(5, 5, 60, 60), mask=image16 > 10000)
    assert a.scores != b.scores and c.scores != a.scores[:1]


def test_session_cancel_reaches_an_ask_waiting_for_the_lock(tiny_session, image16):
    entered = threading.Event()
    original = tiny_session._cancelled_since

    def spy():
        since = original()
        entered.set()  # the queued ask has taken its cancel snapshot
        return since

    tiny_session._cancelled_since = spy
    replies = []
    tiny_session._lock.acquire()  # another call is "running"
    try:
        thread = threading.Thread(target=lambda: replies.append(
            tiny_session.ask(image16, "What is it?", max_new_tokens=50)))
        thread.start()
        assert entered.wait(10)
        tiny_session.cancel()
    finally:
        tiny_session._lock.release()
    thread.join(30)
    assert replies and replies[0].finish_reason == "cancelled"
    after = tiny_session.ask(image16, "What is it?", max_new_tokens=3)  # later calls are not affected
    assert after.finish_reason != "cancelled"


def test_session_cancel_right_after_ask_stream_counts(tiny_session, image16):
    stream = tiny_session.ask_stream(image16, "What is it?", max_new_tokens=200)
    tiny_session.cancel()
    assert "".join(stream) is not None
    assert stream.reply.finish_reason == "cancelled"
