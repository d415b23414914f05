"""Data sets on disk: a save/load round trip gives back the same arrays, texts and geometry."""

import json

import numpy as np
import pytest

from napari_medplib.train.conversations import make_conversations
from napari_medplib.train.data import DatasetFormatError, load_dataset, save_dataset
from napari_medplib.train.synth import make_dataset


def items(n=6, seed=2):
    for s in make_dataset(n, seed=seed):
        yield s, make_conversations(s, np.random.default_rng(s.meta["seed"]), n_per_task=3)


def test_round_trip(tmp_path):
    original = list(items())
    save_dataset(tmp_path / "ds", iter(original), info={"seed": 2, "split": "train"})
    ds = load_dataset(tmp_path / "ds")
    assert len(ds) == len(original) and ds.info == {"seed": 2, "split": "train"}
    for (s, convs), (t, back) in zip(original, ds, strict=True):
        assert np.array_equal(s.image, t.image) and s.image.dtype == t.image.dtype
        assert np.array_equal(s.labels, t.labels)
        assert s.categories == t.categories and s.style == t.style and s.meta == t.meta
        assert len(convs) == len(back)
        for a, b in zip(convs, back, strict=True):
            assert (a.question, a.answer, a.task, a.kind, a.canonical, a.choices, a.meta) == (
                b.question, b.answer, b.task, b.kind, b.canonical, b.choices, b.meta)
            assert all(np.array_equal(m, n) for m, n in zip(a.target_masks, b.target_masks, strict=True))
            assert [r.kind for r in a.regions] == [r.kind for r in b.regions]
            for r, q in zip(a.regions, b.regions, strict=True):
                assert np.array_equal(r.to_mask(s.labels.shape), q.to_mask(s.labels.shape))
    pairs = list(ds.conversations())
    assert len(pairs) == sum(len(c) for _, c in original)
    lines = (tmp_path / "ds" / "conversations.jsonl").read_text().splitlines()
    assert len(lines) == len(pairs) and "<SEG>" in json.loads(lines[0])["answer"]


def test_refuses_to_overwrite_and_names_bad_folders(tmp_path):
    save_dataset(tmp_path / "ds", items(1))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_dataset(tmp_path / "ds", items(1))
    save_dataset(tmp_path / "ds", items(2), overwrite=True)
    assert len(load_dataset(tmp_path / "ds")) == 2
    with pytest.raises(DatasetFormatError, match=r"dataset\.json not found"):
        load_dataset(tmp_path / "nowhere")
    head = tmp_path / "ds" / "dataset.json"
    head.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetFormatError, match="something-else"):
        load_dataset(tmp_path / "ds")


def test_missing_sample_file_is_named(tmp_path):
    save_dataset(tmp_path / "ds", items(2))
    (tmp_path / "ds" / "samples" / "000001.npz").unlink()
    ds = load_dataset(tmp_path / "ds")
    ds[0]
    with pytest.raises(DatasetFormatError, match=r"000001\.npz is missing"):
        ds[1]


def test_train_data_modules_are_light():
    import subprocess
    import sys

    code = ("import sys, napari_medplib.train\n"
            "print([m for m in ('torch', 'transformers', 'napari', 'qtpy', 'PyQt6') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_synthetic_dataset_rebuilds_identically_and_resumes(tmp_path):
    from napari_medplib.train.data import synthetic_items, write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "a", 4, seed=3, split="heldout", size=(96, 128))
    ds = load_dataset(tmp_path / "a")
    assert ds.info["split"] == "heldout" and ds.info["size"] == [96, 128]
    again = list(synthetic_items(4, seed=3, split="heldout", size=(96, 128)))
    tail = list(synthetic_items(2, seed=3, split="heldout", size=(96, 128), start=2))
    for (s, convs), (t, back) in zip(again, ds, strict=True):
        assert np.array_equal(s.image, t.image)
        assert [(c.question, c.answer) for c in convs] == [(c.question, c.answer) for c in back]
    assert [(c.question, c.answer) for c in tail[0][1]] == [(c.question, c.answer) for c in again[2][1]]


def test_samples_without_conversations_are_the_same_samples():
    from napari_medplib.train.data import synthetic_items

    full = list(synthetic_items(3, seed=5, size=(64, 64)))
    bare = list(synthetic_items(3, seed=5, size=(64, 64), conversations=False))
    assert all(convs for _, convs in full) and not any(convs for _, convs in bare)
    for (a, _), (b, _) in zip(full, bare, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
