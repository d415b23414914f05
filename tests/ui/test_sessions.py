"""Sessions shared between the dock and the function widget, and serialised across threads."""

import threading
import time

from ui_fakes import FakeSession

from napari_medplib.ui import sessions
from napari_medplib.ui.workers import load_job


def _run(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_load_reuses_the_shared_session():
    fake = FakeSession()
    sessions.remember((None, "auto"), fake)
    try:
        assert _run(load_job(None, "auto")) is fake  # no engine import needed
        assert sessions.shared((None, "cpu")) is None
        fake.close()
        assert sessions.shared((None, "auto")) is None  # closed sessions are dropped
    finally:
        sessions.forget(fake)


def test_lock_serialises_two_threads():
    fake = FakeSession()
    inside, overlap = [], []

    def use():
        with sessions.lock_for(fake):
            inside.append(1)
            overlap.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [1, 1, 1]
    assert sessions.lock_for(fake) is sessions.lock_for(fake)
    sessions.forget(fake)


def test_progress_lines_from_a_helper_thread():
    from napari_medplib.ui.workers import _with_progress

    def load(on_progress):
        for i in range(3):
            on_progress("weights", i + 1, 3)
        return "session"

    gen = _with_progress(load)
    assert list(_collect(gen)) == [
        "weights 1/3",
        "weights 2/3",
        "weights 3/3",
        ("return", "session"),
    ]

    def broken(on_progress):
        raise FileNotFoundError("no model here; pick a folder")

    import pytest

    with pytest.raises(FileNotFoundError, match="pick a folder"):
        list(_collect(_with_progress(broken)))


def _collect(gen):
    try:
        while True:
            yield next(gen)
    except StopIteration as stop:
        yield ("return", stop.value)


def test_int8_weights_are_loaded_and_shared_apart_from_full_ones(monkeypatch):
    """The LLM-weights setting reaches `Session.load` and is part of the key a session is shared under
    (a full-precision session is never handed out for int8, nor the other way round)."""
    from napari_medplib.engine import Session
    from napari_medplib.engine.loading import LLM_WEIGHTS as ENGINE_WEIGHTS
    from napari_medplib.ui.settings import LLM_WEIGHTS, session_key

    assert LLM_WEIGHTS == ENGINE_WEIGHTS
    calls = []

    def fake_load(source, device="auto", on_progress=None, **options):
        calls.append((source, device, options))
        return FakeSession()

    monkeypatch.setattr(Session, "load", staticmethod(fake_load))
    full, int8 = FakeSession(), None
    sessions.remember(session_key("/m", "cpu"), full)
    try:
        assert _run(load_job("/m", "cpu")) is full and calls == []
        int8 = _run(load_job("/m", "cpu", llm_weights="int8"))
        assert int8 is not full and calls == [("/m", "cpu", {"llm_weights": "int8"})]
        assert sessions.shared(session_key("/m", "cpu", "int8")) is int8
        assert _run(load_job("/m", "cpu", llm_weights="int8")) is int8 and len(calls) == 1
    finally:
        sessions.forget(full)
        if int8 is not None:
            sessions.forget(int8)
