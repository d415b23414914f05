"""Grounding with instances: time and quality of ``Session.ask(..., "Please segment the nuclei.")`` with
one label per object, on synthetic fluorescence nuclei (``train.synth.make_sample``), bundled model, CPU.

For each plane size: one warm-up answer, then ``--repeats`` answers on new images of that size with the
caches cleared before each (so the figure includes both encoders, the LLM and the instance split),
reporting the median total and instance-split seconds, the tiles used, and against the images' true
instances the F1 at IoU 0.5 and the count error. The target is <= 3 s total for 1024 x 1024 on a
2-core CPU; wall times on a shared machine vary with its load, so the process's CPU time is printed
too (with ``--threads 1`` it is what the wall time would be on an idle core).

    python benchmarks/instances_speed.py                      # 256, 512, 1024
    python benchmarks/instances_speed.py --sizes 1024 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def f1_at(predicted: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> tuple[float, int, int]:
    """(F1 of objects matched at IoU > ``threshold``, predicted count, true count); matches are one to one
    above 0.5."""
    n_p, n_t = int(predicted.max()) + 1, int(truth.max()) + 1
    inter = np.bincount(predicted.ravel().astype(np.int64) * n_t + truth.ravel(), minlength=n_p * n_t).reshape(n_p, n_t)
    area_p, area_t = inter.sum(axis=1), inter.sum(axis=0)
    iou = inter / np.maximum(area_p[:, None] + area_t[None, :] - inter, 1)
    predicted_ids = int((area_p[1:] > 0).sum())
    true_ids = int((area_t[1:] > 0).sum())
    hits = int((iou[1:, 1:] > threshold).sum())
    total = predicted_ids + true_ids
    return (2 * hits / total if total else 1.0), predicted_ids, true_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    args = parser.parse_args()

    import torch

    from napari_medplib import Session
    from napari_medplib.train.synth import make_sample

    if args.threads:
        torch.set_num_threads(args.threads)
    session = Session.load(args.model, device="cpu")
    question = "Please segment the nuclei."
    print(f"model {session.model_name}, torch threads {torch.get_num_threads()}")
    for size in args.sizes:
        session.ask(make_sample("nuclei", 0, size=(size, size)).image, question)  # warm-up
        totals, cpu, splits, f1s, errors = [], [], [], [], []
        for seed in range(1, args.repeats + 1):
            sample = make_sample("nuclei", 7000 + seed, size=(size, size))
            session.clear_cache()
            start, start_cpu = time.perf_counter(), time.process_time()
            reply = session.ask(sample.image, question)
            totals.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            splits.append(reply.timings.get("instances", float("nan")))
            if reply.instances:
                f1, n_pred, n_true = f1_at(reply.instances[0], sample.labels)
                f1s.append(f1)
                errors.append(abs(n_pred - n_true) / max(n_true, 1))
        print(f"{size:>5} px: total {np.median(totals):.2f} s (median of {len(totals)}; min {min(totals):.2f}), "
              f"CPU time {np.median(cpu):.2f} s, instance split {np.nanmedian(splits):.2f} s, F1@0.5 {np.mean(f1s) if f1s else float('nan'):.3f}, "
              f"count error {np.mean(errors) if errors else float('nan'):.1%}")


if __name__ == "__main__":
    main()
