"""``benchmarks/sam_prompt_batching.py``: its per-image baseline is the same computation as the
batched step it is timed against (else the ratio would compare different work), and it runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_loader import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("sam_prompt_batching") as module:
        yield module


def test_baseline_computes_the_batched_losses(bench):
    import torch

    from napari_medplib.train.build import build_model
    from napari_medplib.train.data import synthetic_items
    from napari_medplib.train.recipe import StageSpec, load_recipe
    from napari_medplib.train.steps import sam_losses
    from napari_medplib.train.stream import Item

    recipe = load_recipe("tiny-gpu")
    model = build_model(recipe.model, recipe.resolve(recipe.model.tokenizer), moe=False)
    items = [Item(sample, []) for sample, _ in synthetic_items(2, seed=4, size=(64, 64))]
    stage = StageSpec("b", kind="sam", train=["sam.*"], instances_per_image=3)
    with torch.no_grad():
        old = bench.per_image_losses(model, items, stage, np.random.default_rng(3))
        new = sam_losses(model, items, stage, np.random.default_rng(3))
    assert torch.allclose(old["dice"], new["dice"], atol=1e-5) and torch.allclose(old["bce"], new["bce"], atol=1e-5)


def test_prints_and_writes_the_ratio(bench, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--batch", "2", "--instances", "2", "--size", "64", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["batch"] == 2 and rows[0]["speedup"] == pytest.approx(rows[0]["per_image_s"] / rows[0]["batched_s"])
    assert "speed-up" in capsys.readouterr().out
