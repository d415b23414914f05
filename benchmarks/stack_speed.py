"""Whole-stack grounding speed and quality: per-plane `Session.ask` (the old stack path) against
`Session.ask_planes`, on the bundled model.

    python benchmarks/stack_speed.py [--repeats 1] [--planes 31]

Stacks: 31 planes of 61 x 57 px (the size in the issue), and a synthetic 3-D nuclei stack of 31 planes
of 128 x 128 px (ellipsoids, blur, noise, 4 empty planes at each end). Printed per stack: planes/s of
(a) `ask` plane by plane with torch's default threads, (b) the same with one thread, (c) `ask_planes`
(batched, threads chosen by the session); then, for the nuclei stack, the share of mask pixels outside
every nucleus with each plane stretched on its own percentiles (the old default) and with the stack's
contrast, and the number of linked 3-D objects against the true number. The machine's load average
is printed too: timings on a shared CPU move with it (see `engine/planes.cpu_threads`).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def nuclei_stack(shape=(31, 128, 128), n=30, seed=0, empty_ends=4):
    """(uint16 image, int32 labels): non-touching ellipsoids, blurred, on noise."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(500):
        if k >= n:
            break
        r = rng.uniform(5, 9, 3) * [0.8, 1, 1]
        lo = [empty_ends + r[0], r[1], r[2]]
        hi = [shape[0] - empty_ends - r[0], shape[1] - r[1], shape[2] - r[2]]
        if any(a >= b for a, b in zip(lo, hi)):
            break
        c = rng.uniform(lo, hi)
        inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
        if (labels[ndimage.binary_dilation(inside)] > 0).any():
            continue
        k += 1
        labels[inside] = k
    bright = np.r_[0, rng.uniform(0.6, 1.0, k)]
    signal = ndimage.gaussian_filter(bright[labels].astype(np.float32), 1.0)
    image = signal * 3000 + 200 + rng.normal(0, 60, shape)
    return image.clip(0, 65535).astype(np.uint16), labels


def per_plane(session, stack, question, limits, threads=None):
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return [session.ask(p, question, contrast_limits=limits) for p in stack]
    finally:
        torch.set_num_threads(before)


def timed(func, repeats, session):
    best, out = float("inf"), None
    for _ in range(repeats):
        session.clear_cache()
        start = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - start)
    return best, out


def outside_share(replies, labels):
    masks = [np.any(r.masks, axis=0) if r.masks else np.zeros(labels.shape[1:], bool) for r in replies]
    masks = np.stack(masks)
    return float((masks & (labels == 0)).sum() / max(1, masks.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (best is printed)")
    parser.add_argument("--planes", type=int, default=31)
    args = parser.parse_args()

    import torch

    from napari_medplib import Session
    from napari_medplib.engine.stack import link_replies, stack_contrast_limits

    session = Session.load()
    question = "Please segment the nuclei."
    print(f"bundled model on {session.device}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    small, small_labels = nuclei_stack((args.planes, 61, 57), n=12, seed=1)
    big, big_labels = nuclei_stack((args.planes, 128, 128), n=30, seed=0)
    session.ask(small[args.planes // 2], question)  # warm-up
    for name, stack, labels in (("61x57", small, small_labels), ("nuclei 128x128", big, big_labels)):
        limits = stack_contrast_limits(stack)
        t_old, _ = timed(lambda s=stack, lim=limits: per_plane(session, s, question, lim), args.repeats, session)
        t_one, _ = timed(lambda s=stack, lim=limits: per_plane(session, s, question, lim, 1), args.repeats, session)
        t_new, replies = timed(lambda s=stack: session.ask_planes(s, question), args.repeats, session)
        n = len(stack)
        print(f"{name}: {n} planes; per-plane ask {n / t_old:.1f} planes/s, per-plane ask 1 thread "
              f"{n / t_one:.1f}, ask_planes {n / t_new:.1f} (load average now {os.getloadavg()[0]:.1f})")
        if name.startswith("nuclei"):
            own = per_plane(session, stack, question, None)
            linked = link_replies(replies, shape=stack.shape[1:])
            print(f"  mask pixels outside nuclei: each plane's own percentiles {outside_share(own, labels):.2f}, "
                  f"stack contrast {outside_share(replies, labels):.2f}; linked objects "
                  f"{int(linked.max())} (true {int(labels.max())})")


if __name__ == "__main__":
    main()
