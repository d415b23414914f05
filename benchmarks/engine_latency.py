"""Cold vs warm latency of `Session.ask()` and `Session.segment()`, measured in one run.

* cold: a new image (empty caches): CLIP + prefix prefill (+ SAM for segment) + the rest;
* warm: a new question / a new click on the same image: both vision encoders and the prefix prefill
  are skipped (cache hits), so only the question tokens, decoding and the mask decoder run.

The default is a tiny random model on the CPU (what CI can run, seconds); ``--model PATH`` times a real
model folder and ``--device cuda`` a GPU. Prints medians and the warm/cold ratios.

    python benchmarks/engine_latency.py                       # tiny model, CPU, 1 thread
    python benchmarks/engine_latency.py --model ~/models/MedPLIB-7b-2e --device cuda --size 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _median(values):
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a tiny random model in memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (uint16, square)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_medplib.engine import Session
    from napari_medplib.regions import Region

    torch.set_num_threads(args.threads)
    if args.model is None:
        from napari_medplib.testing import tiny_model

        model = tiny_model()
        if args.device != "cpu":
            model = model.to(args.device)
        if args.dtype:
            model.cast(args.dtype)
        session = Session.from_model(model, name="tiny-random")
    else:
        session = Session.load(args.model, device=args.device, dtype=args.dtype)

    def sync():
        if session.device.startswith("cuda"):
            torch.cuda.synchronize()

    rng = np.random.default_rng(0)
    n = args.size
    images = [(rng.random((n, n)) * 4000 + 1000 * i).astype(np.uint16) for i in range(args.repeats + 1)]
    region = [Region.box(n // 8, n // 8, n // 2, n // 2)]
    opts = {"max_new_tokens": args.max_new_tokens}

    # warm-up on an image that is not measured (torch's lazy initialisation, allocator)
    session.ask(images[-1], "What is in the image?", **opts)
    session.segment(images[-1], points=[(n // 2, n // 2)])

    rows = {"ask cold": [], "ask warm": [], "segment cold": [], "segment warm": []}
    stages = {name: [] for name in rows}
    for image in images[:-1]:
        session.clear_cache()
        sync()
        t = time.perf_counter()
        reply = session.ask(image, "What is in the image?", **opts)
        sync()
        rows["ask cold"].append(time.perf_counter() - t)
        stages["ask cold"].append(reply.timings)
        t = time.perf_counter()
        reply = session.ask(image, "Describe <region>.", region, **opts)  # new question, same image
        sync()
        rows["ask warm"].append(time.perf_counter() - t)
        stages["ask warm"].append(reply.timings)

        session.clear_cache()
        sync()
        t = time.perf_counter()
        result = session.segment(image, points=[(n // 3, n // 3)])
        sync()
        rows["segment cold"].append(time.perf_counter() - t)
        stages["segment cold"].append(result.timings)
        t = time.perf_counter()
        # a new click near the first: on planes larger than SAM's input the engine segments in a crop
        # around the prompt (engine/window.py), and nearby clicks share that crop's cached embedding
        result = session.segment(image, points=[(n // 3 + 6, n // 3 - 4)], point_labels=[1])
        sync()
        rows["segment warm"].append(time.perf_counter() - t)
        stages["segment warm"].append(result.timings)

    device = session.device + (f" ({torch.cuda.get_device_name()})" if session.device.startswith("cuda") else "")
    print(f"model {session.model_name}, device {device}, dtype {session.dtype}, image {n}x{n} uint16, "
          f"{args.max_new_tokens} new tokens, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"{'call':<14} {'median ms':>10}   stage medians (ms)")
    for name, values in rows.items():
        keys = ("preprocess", "vision", "prefill", "generate", "masks") if name.startswith("ask") else (
            "preprocess", "vision", "decode", "masks")
        detail = "  ".join(f"{k} {1e3 * _median([s[k] for s in stages[name]]):.1f}" for k in keys)
        print(f"{name:<14} {1e3 * _median(values):>10.1f}   {detail}")
    ask_ratio = _median(rows["ask warm"]) / _median(rows["ask cold"])
    seg_ratio = _median(rows["segment warm"]) / _median(rows["segment cold"])
    print(f"warm/cold ask():     {ask_ratio:.2f}  ({1 / ask_ratio:.1f}x faster warm)")
    print(f"warm/cold segment(): {seg_ratio:.2f}  ({1 / seg_ratio:.1f}x faster warm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
