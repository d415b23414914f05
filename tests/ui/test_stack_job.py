"""`workers.stack_job` (no Qt): batched answers through `Session.ask_planes`, objects linked across planes."""

from __future__ import annotations

import threading

import numpy as np
from ui_fakes import FakeSession

from napari_medplib.ui.layers import ImagePlane
from napari_medplib.ui.workers import stack_job


def _run(job):
    done = []
    try:
        while True:
            done.append(next(job))
    except StopIteration as stop:
        return done, stop.value


def _volume():
    """Two separate spheres, bright on a flat background, on 12 planes."""
    zz, yy, xx = np.indices((12, 40, 48))
    volume = np.full((12, 40, 48), 200, np.uint16)
    volume[(zz - 4) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 16] = 3000
    volume[(zz - 7) ** 2 + (yy - 26) ** 2 + (xx - 32) ** 2 <= 25] = 3000
    return volume


def _plane(volume, limits=(0.0, 3000.0)):
    return ImagePlane("stack", volume, volume.shape, False, (0,), np.eye(4), limits)


def test_stack_job_links_objects_plane_by_plane_session():
    volume = _volume()
    done, result = _run(stack_job(FakeSession(), _plane(volume), 0, "Please segment the nuclei.", [],
                                  threading.Event()))
    assert done == list(range(1, 13)) and not result.cancelled
    assert result.labels.shape == volume.shape
    assert sorted(np.unique(result.labels).tolist()) == [0, 1, 2]  # one id per sphere across its planes
    assert len(result.objects) == 12 and all(len(pixels) == 2 for _, pixels in result.objects)
    index, pixels = result.objects[4]
    assert index == (4,) and pixels[0].size == int((result.labels[4] == 1).sum())


def test_stack_job_batches_through_ask_planes():
    from napari_medplib.engine import Session
    from napari_medplib.testing import tiny_model

    volume = _volume()
    session = Session.from_model(tiny_model(), name="tiny")
    calls = []
    original = session.ask_planes

    def spy(planes, *args, **kwargs):
        calls.append((len(planes), kwargs.get("contrast_limits")))
        return original(planes, *args, **kwargs)

    session.ask_planes = spy
    done, result = _run(stack_job(session, _plane(volume, None), 0, "Please segment the nuclei.", [],
                                  threading.Event(), {"max_new_tokens": 2}))
    session.close()
    assert [n for n, _ in calls] == [8, 4] and done == [8, 12]
    limits = calls[0][1]
    assert limits == calls[1][1] and limits[1] >= 2500  # one contrast for the whole stack
    assert len(result.planes) == 12 and result.labels.shape == volume.shape


def test_stack_job_cancel_before_start():
    cancel = threading.Event()
    cancel.set()
    _, result = _run(stack_job(FakeSession(), _plane(_volume()), 0, "Please segment the nuclei.", [], cancel))
    assert result.cancelled and result.planes == [] and result.labels is None
