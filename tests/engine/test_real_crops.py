"""The CI's reduced real-image evaluation: the bundled model on the committed real crops (``tests/data/real/``)
through the benchmark's own prompt loop (``benchmarks/real_images.evaluate_prompts``), beside its baselines.

Bounds are loose sanity floors, not the published figures (``benchmarks/real_images.py --split report``
makes those): box Dice above 0.5 and within 0.25 of the ellipse inscribed in the box, click Dice above 0.3.
A broken crop rule, prompt mapping or contrast pipeline falls far below them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "real"
CROPS = sorted(p.name[: -len("_image.tif")] for p in DATA.glob("*_image.tif"))
#: Prompted objects per crop (a seeded subset of the objects wholly inside the crop).
MAX_OBJECTS = 10


@pytest.fixture(scope="module")
def real_images():
    """``benchmarks/real_images.py`` as a private module (benchmarks/ is not a package)."""
    name = "real_images_ci"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "real_images.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def bundled():
    from napari_medplib.engine import Session

    session = Session.load(device="cpu")
    yield session
    session.close()


def load_crop(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image, int32 labels) of a committed crop; objects cut by the crop's edge are dropped (their
    reference is partial)."""
    import tifffile

    image_path, labels_path = DATA / f"{name}_image.tif", DATA / f"{name}_labels.tif"
    if not (image_path.is_file() and labels_path.is_file()):
        pytest.skip(f"{name}: the real test crops are missing from tests/data/real")
    image, labels = tifffile.imread(image_path), tifffile.imread(labels_path).astype(np.int32)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    labels[np.isin(labels, edge[edge > 0])] = 0
    return image, labels


def test_the_crops_are_there():
    if not CROPS:
        pytest.skip("no real test crops in tests/data/real")
    assert {"dsb2018_nuclei", "axondeepseg_sem_rat_spinal_cord"} <= set(CROPS)


@pytest.mark.parametrize("name", CROPS or ["dsb2018_nuclei"])
def test_bundled_model_on_a_real_crop(real_images, bundled, name):
    image, labels = load_crop(name)
    assert image.shape[:2] == labels.shape and len(np.unique(labels)) - 1 >= MAX_OBJECTS
    result = real_images.evaluate_prompts(bundled, image, labels, max_instances=MAX_OBJECTS, seed=0)
    assert result["n"] == MAX_OBJECTS
    summary = {k: round(v, 3) for k, v in result.items() if k not in ("instances", "n")}
    assert result["box_dice"] > 0.5, summary
    assert result["box_dice"] > result["ellipse_dice"] - 0.25, summary
    assert result["point_dice"] > 0.3, summary
