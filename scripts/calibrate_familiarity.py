"""Fit a model's familiarity check (``familiarity.safetensors``): is an image like the microscopy it learnt?

Microscopy: every image of the real training set (``benchmarks/real_data/training_set.py``), whole and as
random augmented windows (as ``train_real_vqa.py`` draws them), and synthetic frames of every style.
Unlike it: the training photographs of ``train/unknown.py`` (whole and cropped) and noise of its five
kinds, drawn with training seeds. Neither the benchmark's catalog images nor its photographs and noise
seeds are used. The descriptors come from the model itself, through the same image preparation as
`Session.ask` (``families/medplib/familiarity.py``).

It prints, at the chosen threshold, how often microscopy is called unfamiliar, and a leave-one-kind-out
estimate of how often a *new* kind of photograph or noise is caught (each kind scored by a check fitted
without it); with ``--catalog tune`` also the probability of every tune image of the benchmark (a check
on microscopy sources training never saw). Then it writes the file into ``--out`` (default: the model
folder; the temporary file is renamed into place).

    python scripts/calibrate_familiarity.py --model MODEL [--out MODEL] [--cache CACHE] [--mirrors DIR]
        [--threshold 0.8] [--l2 0.01] [--catalog tune]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks" / "real_data"))


def describe_all(family, images) -> np.ndarray:
    """Descriptors [N, F] of images, each prepared and encoded as `Session.ask` would."""
    from napari_medplib.families.medplib.familiarity import descriptors

    out = []
    for image in images:
        view = family.prepare_image(image, None, None)
        out.append(descriptors(family.clip_features(view))[0].numpy())
    return np.stack(out)


def microscopy_images(cache: str, mirrors: str | None, windows: int, synthetic: int, rng) -> list[np.ndarray]:
    import train_real_vqa as recipe

    images = []
    for prefix, items in recipe.real_pool(cache, mirrors).items():
        for image, labels in items:
            images.append(image)
            images.extend(recipe.real_sample(prefix, image, labels, rng).image for _ in range(windows))
    images.extend(recipe.synthetic_sample(rng).image for _ in range(synthetic))
    return images


def unknown_images(rng, crops: int, noise_per_kind: int) -> tuple[list[np.ndarray], list[str]]:
    """Training photographs (whole and cropped) and noise, with their kind (for leave-one-kind-out)."""
    from napari_medplib.train import unknown

    images, kinds = [], []
    for name in unknown.TRAINING_PHOTOS:
        photo = unknown.photo(name)
        images.append(photo)
        images.extend(unknown.crop(photo, rng, int(rng.integers(128, 400))) for _ in range(crops))
        kinds.extend([name] * (crops + 1))
    for kind in unknown.NOISE_KINDS:
        for _ in range(noise_per_kind):
            size = tuple(int(v) for v in rng.integers(64, 700, 2))
            images.append(unknown.noise(kind, rng, size))
            kinds.append(kind)
    return images, kinds


def leave_one_kind_out(micro: np.ndarray, unknown: np.ndarray, kinds: list[str], l2: float, threshold: float) -> float:
    """Share of unknown images caught by checks fitted without their kind."""
    from napari_medplib.families.medplib.familiarity import fit

    kinds_arr = np.array(kinds)
    caught = []
    for kind in sorted(set(kinds)):
        check = fit(micro, unknown[kinds_arr != kind], l2, threshold)
        import torch

        caught.extend((check.probability(torch.as_tensor(unknown[kinds_arr == kind])) > threshold).tolist())
    return float(np.mean(caught))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", default=None, help="folder to write familiarity.safetensors into (default: --model)")
    parser.add_argument("--cache", default=str(Path("~/.cache/napari-medplib/real-images").expanduser()))
    parser.add_argument("--mirrors", default=None)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--l2", type=float, default=0.01)
    parser.add_argument("--windows", type=int, default=2, help="augmented windows per real training image")
    parser.add_argument("--synthetic", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--catalog", choices=["tune", "none"], default="none",
                        help="also print the probability of the benchmark's tune images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from napari_medplib.engine.session import Session
    from napari_medplib.families.medplib.adapter import familiarity_width
    from napari_medplib.families.medplib.familiarity import fit

    torch.set_num_threads(args.threads)
    from napari_medplib.paths import bundled_model_dir

    model_dir = Path(args.model) if args.model else bundled_model_dir()
    session = Session.load(model_dir, device="cpu")
    family = session.adapter
    family.familiarity = None  # descriptors only; the check is being made
    rng = np.random.default_rng(args.seed)
    with torch.inference_mode():
        micro = describe_all(family, microscopy_images(args.cache, args.mirrors, args.windows, args.synthetic, rng))
        unknown_list, kinds = unknown_images(rng, crops=3, noise_per_kind=8)
        unknown = describe_all(family, unknown_list)
    if micro.shape[1] != familiarity_width(session.model):
        raise SystemExit(f"descriptor width {micro.shape[1]} != {familiarity_width(session.model)}")
    check = fit(micro, unknown, args.l2, args.threshold)
    p_micro = check.probability(torch.as_tensor(micro)).numpy()
    print(f"{len(micro)} microscopy and {len(unknown)} other images, descriptor width {micro.shape[1]}")
    print(f"microscopy called unfamiliar at {args.threshold}: {np.mean(p_micro > args.threshold):.3f}")
    print(f"a new kind of photograph / noise caught (leave one kind out): "
          f"{leave_one_kind_out(micro, unknown, kinds, args.l2, args.threshold):.3f}")
    if args.catalog == "tune":
        import catalog

        for entry in catalog.CATALOG:
            if entry.split == "tune":
                image, _ = catalog.load(entry, args.cache, args.mirrors)
                with torch.inference_mode():
                    p = float(check.probability(torch.as_tensor(describe_all(family, [image])))[0])
                print(f"  tune {entry.name:36s} P(unfamiliar) {p:.2f}")
    path = check.save(Path(args.out) if args.out else model_dir)
    print(f"wrote {path}")
    session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
