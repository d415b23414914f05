"""Fuzzed files, CI-sized: every reader raises only its own error, draws only drawable shapes, and
stays within 20x the file size (+ the decoded image, + a fixed allowance) in memory.

The mutators and readers are those of ``benchmarks/fuzz_readers.py`` (which runs >= 5,000 inputs
per reader); here hypothesis drives them, seeded (``derandomize``) and bounded (``max_examples``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from napari_medplib.testing import load_file_module  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_readers.py"
EXAMPLES = 150


def _load():
    return load_file_module(SCRIPT, "fuzz_readers_bench")


fuzz = _load()
READERS = ["geojson", "geojson_get_reader", "coco", "coco_get_reader", "imagej_roi", "imagej_zip",
           "napari_csv", "tiff", "png", "embedding_cache"]


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    import random

    import roifile  # noqa: F401 - imported before memory is measured
    import shapely  # noqa: F401

    for name in ("tifffile", "roifile", "PIL"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    workdir = tmp_path_factory.mktemp("fuzz")
    made = fuzz.make_readers(workdir)
    for reader in made.values():  # first calls import lazily; keep that out of the measurement
        fuzz.run_one(reader, workdir / f"warm{reader.suffix}", reader.make(random.Random(0)))
    assert sorted(made) == sorted(READERS)
    return made, workdir


@pytest.mark.parametrize("name", READERS)
def test_reader_survives_fuzzed_files(readers, name):
    made, workdir = readers
    reader = made[name]

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False))
    def check(rng):
        data = reader.make(rng)
        outcome = fuzz.run_one(reader, workdir / f"input{reader.suffix}", data)
        assert outcome.raw is None, f"{type(outcome.raw).__name__}: {outcome.raw} for {data[:300]!r}"
        assert outcome.undrawable is None, f"{outcome.undrawable} for {data[:300]!r}"
        assert outcome.ratio <= 1.0, f"peak {outcome.peak:,} B > budget {outcome.budget:,} B for {data[:300]!r}"

    check()
