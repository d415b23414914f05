"""Fit a model's familiarity check (``familiarity.safetensors``): is an image like the microscopy it learnt?

Microscopy: every image of the real training set (``benchmarks/real_data/training_set.py``), whole and as
random augmented windows (as ``train_real_vqa.py`` draws them, half of them with a stronger stain or
contrast change, `restain`), and synthetic frames of every style.
Unlike it: the training photographs of ``train/unknown.py`` (whole and cropped) and noise of its five
kinds, drawn with training seeds. Neither the benchmark's catalog images nor its photographs and noise
seeds are used. The descriptors come from the model itself, through the same image preparation as
`Session.ask` (``families/medplib/familiarity.py``).

Settings are chosen on held-out groups of the training data only: for each L2 weight and threshold of a
small grid, the share of a microscopy *source* declined by a check fitted without that source (a new
microscope), and the share of a *kind* of photograph or noise caught by a check fitted without that kind
(an image unlike anything seen). The setting that catches most while declining at most ``--max-false``
(default 5 %) of a new source wins; the check is then fitted on everything. With ``--catalog tune`` it
also prints the probability of the benchmark's tune images and tune noise (a look at sources training
never saw; its report images stay unseen). The file goes into ``--out`` (default: the model folder;
written to a temporary file and renamed).

    python scripts/calibrate_familiarity.py --model MODEL [--out MODEL] [--cache CACHE] [--mirrors DIR]
        [--max-false 0.05] [--catalog tune]      # the bundled model's check: docs/training.md
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
    from napari_medplib.families.medplib.familiarity import of_views

    out = []
    for image in images:
        view = family.prepare_image(image, None, None)
        out.append(of_views(family, [view], family.clip_features(view))[0].numpy())
    return np.stack(out)


def restain(image: np.ndarray, rng, strength: float = 0.25) -> np.ndarray:
    """Another lab's version of a microscopy window, for half of them: colour images get a stronger stain
    shift than training's (per-channel optical-density gain and offset, up to ``strength``), grey images
    another contrast curve, and either a little blur. The check must accept a new scanner or stain, and a
    few sources per modality cannot show that range."""
    from scipy import ndimage as ndi

    if rng.random() < 0.5:
        return image
    x = image.astype(np.float32) / 255.0
    if x.ndim == 3:
        density = -np.log(np.clip(x, 1 / 255, 1))
        gain = rng.uniform(1 - strength, 1 + strength, x.shape[-1])
        x = np.exp(-(density * gain + rng.uniform(-strength / 4, strength / 4, x.shape[-1])))
    else:
        x = np.clip(x, 0, 1) ** float(np.exp(rng.uniform(-0.5, 0.5)))
    if rng.random() < 0.3:
        x = ndi.gaussian_filter(x, (1.0, 1.0, 0)[: x.ndim])
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)


def microscopy_images(cache: str, mirrors: str | None, windows: int, synthetic: int, rng):
    """Real training images (whole and windows) and synthetic frames, with their source (for
    leave-one-source-out)."""
    import train_real_vqa as recipe

    images, sources = [], []
    for prefix, items in recipe.real_pool(cache, mirrors).items():
        for image, labels in items:
            images.append(image)
            images.extend(restain(recipe.real_sample(prefix, image, labels, rng).image, rng) for _ in range(windows))
            sources.extend([prefix.rstrip("_")] * (windows + 1))
    for _ in range(synthetic):
        sample = recipe.synthetic_sample(rng)
        images.append(sample.image)
        sources.append(f"synthetic {sample.meta.get('modality', '?')}")
    return images, sources


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
            side = int(np.exp(rng.uniform(np.log(128), np.log(768))))  # the sizes training draws
            images.append(unknown.noise(kind, rng, (side, int(side * rng.uniform(0.75, 1.33)))))
            kinds.append(kind)
    return images, kinds


def held_out_scores(micro, sources, unknown, kinds, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """P(unfamiliar) of every microscopy image from a check fitted without its source, and of every other
    image from a check fitted without its kind: what a new microscope and a new kind of image meet."""
    import torch

    from napari_medplib.families.medplib.familiarity import fit

    def scores(pos, groups, fit_args):
        groups = np.array(groups)
        out = np.empty(len(groups))
        for group in sorted(set(groups)):
            inside = groups == group
            check = fit(*fit_args(inside), l2, 0.5)
            out[inside] = check.probability(torch.as_tensor(pos[inside])).numpy()
        return out

    p_micro = scores(micro, sources, lambda inside: (micro[~inside], unknown))
    p_unknown = scores(unknown, kinds, lambda inside: (micro, unknown[~inside]))
    return p_micro, p_unknown


def per_group_mean(flags: np.ndarray, groups) -> float:
    """Mean over groups of the share flagged in each (every source or kind counts once, however many
    images it has)."""
    groups = np.array(groups)
    return float(np.mean([flags[groups == g].mean() for g in sorted(set(groups))]))


def held_out_rates(micro, sources, unknown, kinds, l2: float, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: microscopy of a left-out source declined, and images of a left-out kind caught,
    each averaged over sources / kinds."""
    p_micro, p_unknown = held_out_scores(micro, sources, unknown, kinds, l2)
    false = np.array([per_group_mean(p_micro > t, sources) for t in thresholds])
    caught = np.array([per_group_mean(p_unknown > t, kinds) for t in thresholds])
    return false, caught


def choose(micro, sources, unknown, kinds, l2s, thresholds, max_false: float) -> tuple[float, float]:
    """The (l2, threshold) that catches most new kinds of non-microscopy while declining at most
    ``max_false`` of a new microscopy source (the most cautious setting if none qualifies)."""
    best, table = None, []
    for l2 in l2s:
        false, caught = held_out_rates(micro, sources, unknown, kinds, l2, thresholds)
        for t, f, c in zip(thresholds, false, caught, strict=True):
            table.append((l2, t, f, c))
            if f <= max_false and (best is None or c > best[3]):
                best = (l2, t, f, c)
    print("  l2      threshold  new-source microscopy declined  new kind caught   (means over sources / kinds)")
    for l2, t, f, c in table:
        print(f"  {l2:<7g} {t:<10.2f} {f:<31.3f} {c:.3f}")
    if best is None:
        best = min(table, key=lambda row: (row[2], -row[3]))
    print(f"chosen: l2 {best[0]:g}, threshold {best[1]:.2f} (new-source microscopy declined {best[2]:.3f}, "
          f"new kind of image caught {best[3]:.3f})")
    return best[0], best[1]


def choose_answer_below(p_unknown: np.ndarray, kinds, threshold: float, max_pass: float) -> float:
    """The highest probability below which at most ``max_pass`` of a new kind of non-microscopy falls
    (those would get an answer, never "I can't tell"), at most ``threshold``; ``p_unknown`` from
    `held_out_scores`."""
    candidates = [t for t in np.linspace(0.02, threshold, 50) if per_group_mean(p_unknown < t, kinds) <= max_pass]
    return float(max(candidates)) if candidates else 0.02


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--out", default=None, help="folder to write familiarity.safetensors into (default: --model)")
    parser.add_argument("--cache", default=str(Path("~/.cache/napari-medplib/real-images").expanduser()))
    parser.add_argument("--mirrors", default=None)
    parser.add_argument("--threshold", type=float, default=None, help="fixed threshold (default: chosen)")
    parser.add_argument("--l2", type=float, default=None, help="fixed L2 weight (default: chosen)")
    parser.add_argument("--max-false", type=float, default=0.02,
                        help="most microscopy of a source left out of the fit that may be declined")
    parser.add_argument("--max-pass", type=float, default=0.2,
                        help="most images of a kind left out of the fit that may be always answered")
    parser.add_argument("--windows", type=int, default=2, help="augmented windows per real training image")
    parser.add_argument("--synthetic", type=int, default=150)
    parser.add_argument("--crops", type=int, default=5, help="random crops per training photograph")
    parser.add_argument("--noise", type=int, default=30, help="noise images per kind")
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
        micro_list, sources = microscopy_images(args.cache, args.mirrors, args.windows, args.synthetic, rng)
        micro = describe_all(family, micro_list)
        unknown_list, kinds = unknown_images(rng, crops=args.crops, noise_per_kind=args.noise)
        unknown = describe_all(family, unknown_list)
    if micro.shape[1] != familiarity_width(session.model):
        raise SystemExit(f"descriptor width {micro.shape[1]} != {familiarity_width(session.model)}")
    print(f"{len(micro)} microscopy images ({len(set(sources))} sources) and {len(unknown)} others "
          f"({len(set(kinds))} kinds), descriptor width {micro.shape[1]}")
    l2, threshold = args.l2, args.threshold
    if l2 is None or threshold is None:
        chosen = choose(micro, sources, unknown, kinds, [args.l2] if args.l2 else [0.003, 0.01, 0.03, 0.1],
                        [args.threshold] if args.threshold else [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98], args.max_false)
        l2, threshold = chosen
    p_micro_held, p_unknown_held = held_out_scores(micro, sources, unknown, kinds, l2)
    answer_below = choose_answer_below(p_unknown_held, kinds, threshold, args.max_pass)
    print(f"always answered below {answer_below:.2f}: new-source microscopy "
          f"{per_group_mean(p_micro_held < answer_below, sources):.3f}, "
          f"a new kind of image {per_group_mean(p_unknown_held < answer_below, kinds):.3f}")
    check = fit(micro, unknown, l2, threshold, answer_below)
    p_micro = check.probability(torch.as_tensor(micro)).numpy()
    print(f"fitted on all: microscopy called unfamiliar {np.mean(p_micro > threshold):.3f}")
    if args.catalog == "tune":
        import catalog

        from napari_medplib.train import unknown as u

        for i, kind in enumerate(u.NOISE_KINDS):  # the benchmark's tune noise (its report seeds stay unseen)
            image = u.noise(kind, np.random.default_rng(u.REPORT_SEED_BASE + 100 + i), (384, 384))
            with torch.inference_mode():
                p = float(check.probability(torch.as_tensor(describe_all(family, [image])))[0])
            print(f"  tune noise {kind:31s} P(unfamiliar) {p:.2f}")

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
