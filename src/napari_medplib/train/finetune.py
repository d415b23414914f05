"""Fine-tune a model on a user's annotated objects: box and click prompts, on the crops the engine cuts.

Why this shape: the engine never shows SAM a whole microscopy plane for a prompt; it cuts a crop around
the prompt so that the object spans a set part of SAM's 256-pixel input (``engine/window.py``), keeping
the plane's contrast. Training here cuts exactly those crops around the user's training objects (the
box's crop, the click's crop from the blob-size estimate at the click), with the crop size, the click
position and the box corners jittered and the crop flipped, rotated and photometrically varied, so what
the model learns is what the engine later asks of it. SAM's prompt encoder and mask decoder learn
(``FinetuneOptions.train``); the image encoder's features stay those it learned on many modalities, which
keeps a few-shot fit from forgetting them (training it too was worse on the tune images). Every third step
also trains "segment the <class>" (``finetune_grounding``: the ``<SEG>`` projection and LoRA factors on
the language model, merged before saving). The adapted model keeps its training objects' size range
(``config.object_extent_range``) so the engine's click crops hold the clicked object.

Every step's examples are fixed by (seed, step), and the step checkpoint holds the trainable weights, the
optimizer and the step: a run interrupted (Cancel, a crash, napari closed) and started again with the same
inputs and options resumes and ends with the same weights as one never interrupted.

The run folder (``out``) becomes a model folder in our layout::

    out/
      config.json, model.safetensors, tokenizer files   the adapted model (written last, then DONE)
      README.md                                         model card: base model, data, figures
      finetune.json                                     the recipe: options, inputs, split, figures
      finetune/state.pt                                 step checkpoint while training (removed at the end)
      finetune/log.jsonl                                one line per step: loss, lr, seconds
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .finetune_data import (  # noqa: F401 - the options and results are this module's API too
    DEFAULT_TRAIN,
    AnnotatedPlane,
    FinetuneCancelled,
    FinetuneInputError,
    FinetuneOptions,
    FinetuneResult,
    ObjectRef,
    ObjectSplit,
    split_objects,
)

Progress = Callable[[str, int, int], None]

#: Spread (log-normal sigma) of the training crop's object extent around the engine's choice.
CROP_JITTER = 0.2
#: Box corners move by up to this share of the object's size (users draw boxes loosely).
BOX_JITTER = 0.06
STATE_DIR = "finetune"


# ----------------------------------------------------------------------------------- examples
@dataclass
class _PreparedPlane:
    """What the engine would see of one plane: the model RGB (plane contrast) and its grey for blob sizes."""

    rgb: np.ndarray  # (H, W, 3) uint8
    grey: np.ndarray | None
    labels: np.ndarray
    boxes: dict[int, tuple[int, int, int, int]]  # label -> tight (y0, x0, y1, x1) inclusive
    click_extent: dict[int, float | None]  # label -> the engine's crop extent for a click on it
    extent_range: list[float] = field(default_factory=list)  # the adapted model's ``object_extent_range``


def _prepare(plane: AnnotatedPlane, labels: Sequence[int]) -> _PreparedPlane:
    from scipy import ndimage as ndi

    from ..engine.image import make_view

    view = make_view(plane.image, plane.contrast_limits)
    if view.factor != 1:
        raise FinetuneInputError(f"{plane.name}: planes above {max(view.image_hw)} pixels a side are not used for "
                                 "fine-tuning; crop the annotated area")
    boxes = {}
    slices = ndi.find_objects(plane.labels)
    for label in labels:
        s = slices[label - 1]
        boxes[label] = (s[0].start, s[1].start, s[0].stop - 1, s[1].stop - 1)
    return _PreparedPlane(view.rgb, None, plane.labels, boxes, {})


def object_extent_range(prepared: Sequence[_PreparedPlane]) -> list[float]:
    """[10th, 90th] percentile of the training objects' extents (longest box side, pixels): what the
    adapted model's clicks are cropped for (``config.object_extent_range``)."""
    extents = [max(y1 - y0 + 1, x1 - x0 + 1) for plane in prepared for y0, x0, y1, x1 in plane.boxes.values()]
    low, high = np.percentile(extents, (10, 90))
    return [round(float(low), 2), round(float(high), 2)]


def _click_extent(prepared: _PreparedPlane, label: int, point: tuple[float, float]) -> float | None:
    """The extent the engine would give a click on this object (``Session._clicked_extent``), cached."""
    from ..engine.scale import clamp_extent, gray_plane, local_object_diameter
    from ..engine.session import CLICK_EXTENT_FACTOR

    if label not in prepared.click_extent:
        if prepared.grey is None:
            prepared.grey = gray_plane(prepared.rgb)
        diameter = local_object_diameter(prepared.grey, point)
        extent = None if diameter is None else CLICK_EXTENT_FACTOR * diameter
        prepared.click_extent[label] = clamp_extent(extent, prepared.extent_range)
    return prepared.click_extent[label]


@dataclass
class Example:
    crop: np.ndarray  # (h, w, 3) uint8: what SAM is shown
    target: np.ndarray  # (h, w) bool: the object
    kind: str  # "box" or "point"
    box: np.ndarray | None  # (4,) y0, x0, y1, x1 in crop pixels
    point: np.ndarray | None  # (2,) y, x in crop pixels


def _deepest(mask: np.ndarray) -> tuple[float, float]:
    from scipy import ndimage as ndi

    distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return float(r), float(c)


def _photometric(rng: np.random.Generator, crop: np.ndarray) -> np.ndarray:
    """Mild changes a second image of the same kind shows: exposure, gamma, noise."""
    x = crop.astype(np.float32) / 255.0
    if rng.random() < 0.7:
        x = np.clip(x * rng.uniform(0.75, 1.3) + rng.uniform(-0.08, 0.08), 0.0, 1.0)
    if rng.random() < 0.5:
        x = x ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.4:
        x = x + rng.normal(0.0, rng.uniform(0.0, 0.04), x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _orient(rng: np.random.Generator, ex: Example) -> Example:
    """A random one of the 8 flips/rotations of the crop, its target and its prompt."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    crop, target = ex.crop, ex.target
    h, w = target.shape
    pts = []
    if ex.box is not None:
        pts = [(ex.box[0], ex.box[1]), (ex.box[2], ex.box[3])]
    if ex.point is not None:
        pts = [tuple(ex.point)]
    if flip:
        crop, target = crop[:, ::-1], target[:, ::-1]
        pts = [(y, w - 1 - x) for y, x in pts]
    for _ in range(k):  # rotate 90 degrees counter-clockwise: (y, x) -> (W - 1 - x, y)
        h, w = target.shape
        crop, target = np.rot90(crop), np.rot90(target)
        pts = [(w - 1 - x, y) for y, x in pts]
    box = point = None
    if ex.box is not None:
        (ya, xa), (yb, xb) = pts
        box = np.array([min(ya, yb), min(xa, xb), max(ya, yb), max(xa, xb)], float)
    if ex.point is not None:
        point = np.array(pts[0], float)
    return Example(np.ascontiguousarray(crop), np.ascontiguousarray(target), ex.kind, box, point)


def make_example(prepared: _PreparedPlane, label: int, kind: str, rng: np.random.Generator,
                 sam_size: int = 256) -> Example:
    """One training example: the crop the engine would cut for a ``kind`` prompt on the object, jittered."""
    from ..engine.scale import PROMPT_OBJECT_EXTENT
    from ..engine.window import choose_window

    hw = prepared.labels.shape
    y0, x0, y1, x1 = prepared.boxes[label]
    target_extent = PROMPT_OBJECT_EXTENT * math.exp(rng.normal(0.0, CROP_JITTER))
    if kind == "box":
        h, w = y1 - y0 + 1, x1 - x0 + 1
        jitter = rng.uniform(-BOX_JITTER, BOX_JITTER, 4) * np.array([h, w, h, w])
        box = np.array([y0, x0, y1, x1], float) + jitter
        box = np.clip(box, 0, [hw[0] - 1, hw[1] - 1, hw[0] - 1, hw[1] - 1])
        window = choose_window(hw, sam_size, None, box, None, "auto", target_extent=target_extent)
        point = None
    else:
        obj = prepared.labels[y0 : y1 + 1, x0 : x1 + 1] == label
        if rng.random() < 0.5:  # near the middle, as most users click, or anywhere inside
            r, c = _deepest(obj)
        else:
            rows, cols = np.nonzero(obj)
            k = int(rng.integers(len(rows)))
            r, c = float(rows[k]), float(cols[k])
        point = np.array([y0 + r, x0 + c], float)
        extent = _click_extent(prepared, label, (y0 + r, x0 + c))
        extent = None if extent is None else extent * math.exp(rng.normal(0.0, CROP_JITTER))
        window = choose_window(hw, sam_size, point[None], None, None, "auto", object_extent=extent)
        box = None
    wy0, wx0, wy1, wx1 = window if window is not None else (0, 0, *hw)
    crop = prepared.rgb[wy0:wy1, wx0:wx1]
    target = prepared.labels[wy0:wy1, wx0:wx1] == label
    offset = np.array([wy0, wx0], float)
    ex = Example(crop, target, kind, None if box is None else box - np.tile(offset, 2),
                 None if point is None else point - offset)
    ex = _orient(rng, ex)
    return Example(_photometric(rng, ex.crop), ex.target, ex.kind, ex.box, ex.point)


def step_examples(prepared: list[_PreparedPlane], objects: Sequence[ObjectRef], step: int, batch_size: int,
                  seed: int, click_share: float = 0.5) -> list[Example]:
    """The examples of one step, fixed by (seed, step): box prompts and clicks, alternating at the default
    ``click_share`` of one half, else the clicks' share of the batch last."""
    rng = np.random.default_rng([seed, 11, step])
    picks = rng.integers(len(objects), size=batch_size)
    if click_share == 0.5:
        kinds = ["box" if j % 2 == 0 else "point" for j in range(batch_size)]
    else:
        clicks = int(round(batch_size * click_share))
        kinds = ["box"] * (batch_size - clicks) + ["point"] * clicks
    return [make_example(prepared[objects[i].plane], objects[i].label, kind, rng)
            for kind, i in zip(kinds, picks, strict=True)]


# ----------------------------------------------------------------------------------- loss
def example_losses(model, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """BCE and Dice of SAM's masks for the examples' prompts, at the crops' resolution."""
    from ..model.postprocess import postprocess_masks
    from ..model.preprocess import image_to_sam_boxes, image_to_sam_coords, prepare_sam_image
    from .losses import mask_losses

    sam = model.sam
    size = sam.config.image_size
    inputs = [prepare_sam_image(ex.crop, size) for ex in examples]
    pixels = torch.cat([i.pixel_values for i in inputs]).to(sam.device)
    trains_encoder = any(p.requires_grad for p in sam.image_encoder.parameters())
    with torch.set_grad_enabled(trains_encoder):
        embeddings = sam.encode_image(pixels)  # [B, C, 16, 16]
    logits, targets = [], []
    for kind in ("box", "point"):
        rows = [b for b, ex in enumerate(examples) if ex.kind == kind]
        if not rows:
            continue
        frames = [(examples[b].target.shape, inputs[b].resize_hw, inputs[b].pad) for b in rows]
        if kind == "box":
            prompts = np.concatenate([image_to_sam_boxes(examples[b].box[None], hw, rhw, pad)
                                      for b, (hw, rhw, pad) in zip(rows, frames, strict=True)])
            low_res, _ = sam.decode_with_prompts(embeddings[rows], boxes=prompts)
        else:
            prompts = np.stack([image_to_sam_coords(examples[b].point[None], hw, rhw, pad)
                                for b, (hw, rhw, pad) in zip(rows, frames, strict=True)])  # [N, 1, 2]
            low_res, _ = sam.decode_with_prompts(embeddings[rows], points=prompts, point_labels=np.ones((len(rows), 1)))
        for i, (b, (hw, rhw, pad)) in enumerate(zip(rows, frames, strict=True)):
            logits.append(postprocess_masks(low_res[i : i + 1], rhw, hw, pad=pad))
            targets.append(torch.from_numpy(examples[b].target[None]).float().to(low_res.device))
    bce, dice = mask_losses(logits, targets)
    return {"bce": bce, "dice": dice}


# ----------------------------------------------------------------------------------- training
def _learning_rate(options: FinetuneOptions, step: int) -> float:
    """Linear warm-up, then linear decay to a tenth of the rate."""
    if options.warmup_steps and step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    span = max(options.steps - options.warmup_steps, 1)
    return options.lr * (1.0 - 0.9 * min(1.0, (step - options.warmup_steps) / span))


def _trainable(model, patterns: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    chosen = {}
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            chosen[name] = param
    if not chosen:
        raise FinetuneInputError(f"no parameter of the model matches {list(patterns)}; names look like "
                                 "'sam.mask_decoder.*'")
    return chosen


def inputs_fingerprint(planes: Sequence[AnnotatedPlane], options: FinetuneOptions, base: str) -> dict[str, str]:
    """Content hashes of what decides the weights (images and labels, class names, options, base model):
    a resumed run must match every one, and a mismatch names which."""
    def digest(*parts: bytes) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(part)
        return h.hexdigest()[:16]

    pixels = [part for plane in planes for array in (plane.image, plane.labels)
              for part in (str((array.shape, str(array.dtype))).encode(), np.ascontiguousarray(array).tobytes())]
    opts = asdict(options)
    for key in ("threads", "evaluate", "max_eval_objects", "checkpoint_every"):
        opts.pop(key)  # these do not change the weights
    return {
        "images and labels": digest(*pixels),
        "class names": digest(json.dumps([sorted(p.classes.items()) for p in planes]).encode()),
        "contrast and annotation settings": digest(json.dumps([[p.contrast_limits, p.fully_annotated]
                                                                for p in planes]).encode()),
        "options": digest(json.dumps(opts, sort_keys=True, default=list).encode()),
        "base model": base,
    }


def _atomic_torch_save(obj, path: Path) -> None:
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _atomic_text(path: Path, text: str) -> None:
    from ..atomic import atomic_write_text

    atomic_write_text(path, text)


def _check_out(out: Path, fingerprint: dict[str, str]) -> str:
    """"new", "resume" or "done" for ``out``; refuses a folder that holds anything else, naming what differs."""
    marker = out / STATE_DIR / "run.json"
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint", {})
        changed = [k for k in fingerprint if not isinstance(saved, dict) or saved.get(k) != fingerprint[k]]
        if changed:
            raise FinetuneInputError(f"{out} holds a fine-tuning run with other {', '.join(changed)}; use the same "
                                     "inputs to resume it, or choose another output folder (nothing there was changed)")
        return "done" if (out / "DONE").is_file() else "resume"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneInputError(f"{out} exists and is not empty; choose a new folder for the adapted model "
                                 "(nothing there was changed)")
    return "new"


def _base_identity(base_model) -> tuple[str, str, Path | None]:
    """(name, fingerprint, folder) of the base model without loading it (folders are hashed by their files)."""
    from ..engine.loading import folder_fingerprint, model_fingerprint, resolve_source

    if base_model is None or isinstance(base_model, (str, Path)):
        folder, name = resolve_source(None if base_model is None else str(base_model))
        return name, folder_fingerprint(folder), folder
    model = getattr(base_model, "model", base_model)
    return getattr(base_model, "name", "in-memory"), model_fingerprint(model), None


def _finished(out: Path) -> FinetuneResult:
    """The result a finished run folder recorded (running the same run again returns it, trains nothing)."""
    recipe = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
    figures = recipe.get("heldout_figures", {})
    split = recipe.get("split", {})
    return FinetuneResult(out, figures.get("before", {}), figures.get("after", {}), figures.get("baselines", {}),
                          len(split.get("train", [])), len(split.get("heldout", [])), float(recipe.get("seconds", 0.0)),
                          int(recipe.get("options", {}).get("steps", 0)))


def finetune(planes: Sequence[AnnotatedPlane], out: str | Path, base_model=None,
             options: FinetuneOptions | None = None, on_progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None, on_log: Callable[[dict], None] | None = None,
             device: str = "cpu",
             extra_loss: Callable[[Any, int], dict[str, torch.Tensor]] | None = None) -> FinetuneResult:
    """Adapt ``base_model`` (a model folder, a loaded model, or None for the bundled one) to the annotated
    objects of ``planes``; write the adapted model folder to ``out`` and return held-out figures.

    ``on_progress(message, done, total)`` reports each phase; ``on_log(record)`` each step's losses;
    ``extra_loss(model, step)``: more loss terms added at every step (a dict of scalar tensors), e.g. to keep
    what the model knew about inputs the planes do not show; not part of the run's fingerprint.
    ``should_stop()`` is polled between steps: when true the step checkpoint is written and
    `FinetuneCancelled` raised (calling again with the same arguments resumes).
    """
    import copy

    options = options or FinetuneOptions()
    options.check()
    planes = list(planes)
    out = Path(out).expanduser()
    started = time.perf_counter()
    say = on_progress or (lambda *_: None)
    stop = should_stop or (lambda: False)
    # everything that can refuse the inputs runs before the model loads and before anything is written
    if options.grounding:
        from .finetune_data import PEFT_HINT, peft_available

        if not peft_available():
            raise FinetuneInputError(f"learning the class names: {PEFT_HINT}; or train box and click prompts "
                                     "only (untick 'learn the class names', or --no-grounding)")
    split = split_objects(planes, options.holdout, options.min_heldout, options.seed)
    trained_on = sorted({o.plane for o in split.train})
    prepared = {p: _prepare(planes[p], [o.label for o in split.train if o.plane == p]) for p in trained_on}
    prepared_list = [prepared.get(p) for p in range(len(planes))]
    extent_range = object_extent_range(list(prepared.values())) if options.size_range else []
    for item in prepared.values():
        item.extent_range = extent_range
    base_name, base_fp, base_folder = _base_identity(base_model)
    fingerprint = inputs_fingerprint(planes, options, base_fp)
    state = _check_out(out, fingerprint)
    if state == "done":
        say("this run has finished already", 1, 1)
        return _finished(out)
    say("loading the model", 0, 1)
    if base_folder is not None:
        from ..engine.loading import load_model

        model = load_model(base_folder, device, torch.float32)
    else:
        model = copy.deepcopy(getattr(base_model, "model", base_model)).float().to(device)
    say("loading the model", 1, 1)
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    if state == "new":
        _atomic_text(state_dir / "run.json", json.dumps({"fingerprint": fingerprint, "base": base_name}, indent=2))
    caller_threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        objects = split.train
        before = baselines = {}
        saved_eval = state_dir / "before.json"
        if options.evaluate:
            if saved_eval.is_file():
                before, baselines = json.loads(saved_eval.read_text(encoding="utf-8"))
            else:
                before, baselines = evaluate_heldout(model, planes, split, options, say, "measuring the model before",
                                                     stop)
                _atomic_text(saved_eval, json.dumps([before, baselines]))
        model.config.object_extent_range = extent_range  # the engine's clicks on the adapted model use it
        patterns = tuple(options.train)
        grounding = []
        if options.grounding:
            from .build import add_lora
            from .finetune_grounding import LORA_TARGETS, grounding_planes
            from .recipe import LoraSpec

            grounding = grounding_planes(planes, {p: prepared[p].rgb for p in prepared}, split.train, split.heldout)
            torch.manual_seed(options.seed)
            model = add_lora(model, LoraSpec(r=options.lora_r, alpha=2 * options.lora_r, dropout=0.0,
                                             targets=list(LORA_TARGETS)))
            patterns += ("text_hidden_fcs.*", "*lora_*")
        params = _trainable(model, patterns)
        optimizer = torch.optim.AdamW(list(params.values()), lr=options.lr, betas=(0.9, 0.99),
                                      weight_decay=options.weight_decay)
        start = 0
        state_path = state_dir / "state.pt"
        if state_path.is_file():
            saved = torch.load(state_path, map_location=device, weights_only=True)
            model.load_state_dict(saved["trainable"], strict=False)
            optimizer.load_state_dict(saved["optimizer"])
            start = int(saved["step"])
        _trim_log(state_dir / "log.jsonl", start)
        model.train()
        log = open(state_dir / "log.jsonl", "a", encoding="utf-8")
        try:
            for step in range(start, options.steps):
                if stop():
                    _save_state(model, params, optimizer, step, state_path)
                    raise FinetuneCancelled(f"stopped at step {step} of {options.steps}; run again to resume")
                t0 = time.perf_counter()
                torch.manual_seed(int(np.random.default_rng([options.seed, 13, step]).integers(2**62)))
                lr = _learning_rate(options, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                examples = step_examples(prepared_list, objects, step, options.batch_size, options.seed,
                                         options.click_share)
                losses = example_losses(model, examples)
                if grounding and step % options.grounding_every == 0:
                    losses.update(_grounding_step(model, grounding, options, step))
                if extra_loss is not None:
                    losses.update(extra_loss(model, step))
                total = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
                record = {"step": step + 1, "lr": lr, "loss": round(float(total.detach()), 5)}
                record.update({k: round(float(v.detach()), 5) for k, v in losses.items()})
                record["seconds"] = round(time.perf_counter() - t0, 3)
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"step {step + 1}: the loss is {record['loss']}; lower the learning rate")
                log.write(json.dumps(record) + "\n")
                log.flush()
                if on_log is not None:
                    on_log(record)
                say(f"training (loss {record['loss']:.3f})", step + 1, options.steps)
                if (step + 1) % options.checkpoint_every == 0 and step + 1 < options.steps:
                    _save_state(model, params, optimizer, step + 1, state_path)
        finally:
            log.close()
        if grounding:
            from .build import merge_lora

            model = merge_lora(model)  # the saved layout has plain Linear layers
        model.eval()
        after = {}
        if options.evaluate:
            try:
                after, _ = evaluate_heldout(model, planes, split, options, say, "measuring the adapted model", stop)
            except FinetuneCancelled:
                _save_state(model, params, optimizer, options.steps, state_path)  # resuming measures, no training
                raise
        result = FinetuneResult(out, before, after, baselines, len(split.train), len(split.heldout),
                                time.perf_counter() - started, options.steps)
        say("saving the model", 0, 1)
        _write_model(model, out, planes, split, options, base_name, base_fp, result)
        state_path.unlink(missing_ok=True)
        say("saving the model", 1, 1)
        return result
    finally:
        torch.set_num_threads(caller_threads)


def _grounding_step(model, grounding: list, options: FinetuneOptions, step: int) -> dict[str, torch.Tensor]:
    """The grounding losses of one step's batch (frames fixed by (seed, step))."""
    from .finetune_grounding import grounding_item, grounding_losses

    rng = np.random.default_rng([options.seed, 17, step])
    pairs = [grounding_item(grounding[int(rng.integers(len(grounding)))], rng) for _ in range(options.grounding_batch)]
    return grounding_losses(model, [item for item, _ in pairs], [weight for _, weight in pairs])


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (a run killed after its last checkpoint repeats those steps)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    _atomic_text(path, "".join(line + "\n" for line in kept))


def _save_state(model, params: dict, optimizer, step: int, path: Path) -> None:
    trainable = {name: p.detach().clone() for name, p in params.items()}
    _atomic_torch_save({"trainable": trainable, "optimizer": optimizer.state_dict(), "step": step}, path)


# ----------------------------------------------------------------------------------- measuring
def evaluate_heldout(model, planes: Sequence[AnnotatedPlane], split: ObjectSplit, options: FinetuneOptions,
                     say: Progress, what: str, stop: Callable[[], bool] = lambda: False
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out figures through the engine, as a user gets them: box and click Dice (``Session.segment``,
    auto crop) and the instance F1 of "Please segment the <class>." (``Session.ask``) on the held-out
    objects; beside the model-free baselines on the same objects (ellipse in the box, Otsu component
    under the click, Otsu + watershed instances). Returns (model figures, baseline figures)."""
    from ..engine.session import Session
    from ..scoring import heldout_instance_match, otsu_split, otsu_watershed, prompt_scores

    session = Session.from_model(model, name="fine-tuning")
    objects = split.heldout[: options.max_eval_objects]
    grounding = _grounding_jobs(planes, split)
    total = len(objects) + len(grounding)
    rows: list[dict] = []
    splits: dict[int, np.ndarray] = {}

    def check(done: int) -> None:
        if stop():
            model.train()
            raise FinetuneCancelled(f"stopped while {what}; run again to resume")
        say(what, done, total)

    for i, obj in enumerate(objects):
        check(i)
        plane = planes[obj.plane]
        if obj.plane not in splits:
            splits[obj.plane] = otsu_split(plane.image)[0]
        rows.append(prompt_scores(session, plane.image, plane.labels, obj.label, contrast_limits=plane.contrast_limits,
                                  above=splits[obj.plane]))
    found = {"model": [0, 0, 0], "watershed": [0, 0, 0]}  # true positives, held-out objects, judged predictions
    for j, (p, noun, ids) in enumerate(grounding):
        check(len(objects) + j)
        plane = planes[p]
        reply = session.ask(plane.image, f"Please segment the {noun}.", contrast_limits=plane.contrast_limits,
                            max_new_tokens=32)
        predicted = _reply_instances(reply, plane.labels.shape)
        for key, labels in (("model", predicted), ("watershed", otsu_watershed(plane.image))):
            match = heldout_instance_match(plane.labels, ids, labels, fully_annotated=plane.fully_annotated)
            found[key] = [a + b for a, b in zip(found[key], (match.true_positives, match.n_reference,
                                                            match.n_predicted), strict=True)]
    say(what, total, total)
    model.train()

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    def f1(key: str) -> float:
        tp, n_ref, n_pred = found[key]
        return 2.0 * tp / (n_ref + n_pred) if n_ref + n_pred else float("nan")

    return ({"box_dice": mean("box_dice"), "point_dice": mean("point_dice"), "ground_f1": f1("model"), "n": len(rows)},
            {"ellipse_dice": mean("ellipse_dice"), "otsu_dice": mean("otsu_dice"), "watershed_f1": f1("watershed"),
             "n": len(rows)})


#: Planes asked "Please segment the <class>." when measuring (the ones with the most held-out objects).
MAX_GROUNDING_PLANES = 4


def _grounding_jobs(planes: Sequence[AnnotatedPlane], split: ObjectSplit) -> list[tuple[int, str, list[int]]]:
    """(plane, class name, held-out ids of that class) for the planes with the most held-out objects."""
    jobs: dict[tuple[int, str], list[int]] = {}
    for obj in split.heldout:
        jobs.setdefault((obj.plane, planes[obj.plane].classes[obj.label]), []).append(obj.label)
    ranked = sorted(jobs.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:MAX_GROUNDING_PLANES]
    return [(p, noun, ids) for (p, noun), ids in ranked]


def _reply_instances(reply, shape: tuple[int, ...]) -> np.ndarray:
    """The reply's instance labels of its first mask (connected pieces when it has no instances)."""
    from scipy import ndimage as ndi

    instances = getattr(reply, "instances", None)
    if instances:
        return np.asarray(instances[0])
    if reply.masks:
        return ndi.label(reply.masks[0])[0]
    return np.zeros(shape[:2], np.int32)


# ----------------------------------------------------------------------------------- saving
def _keep_familiarity(model, patterns: Sequence[str], folder: Path) -> None:
    """Copy the base model's familiarity check (``families/medplib/familiarity.py``) when adapting left the
    image features it reads unchanged (no trained pattern touches the vision tower or the projector)."""
    import shutil

    from ..families.medplib.familiarity import FILE

    source = Path(model.config.folder or "") / FILE
    image_side = ("vision_tower.", "mm_projector.")
    touched = any(name.startswith(image_side) and any(fnmatchcase(name, p) for p in patterns)
                  for name, _ in model.named_parameters())
    if source.is_file() and not touched and source.resolve() != (folder / FILE).resolve():
        shutil.copyfile(source, folder / FILE)


def _write_model(model, out: Path, planes: Sequence[AnnotatedPlane], split: ObjectSplit, options: FinetuneOptions,
                 base_name: str, base_fp: str, result: FinetuneResult) -> None:
    """The adapted model in our layout, its recipe and model card; each file atomically, DONE last."""
    from ..model.convert import save_pretrained

    tmp = out / STATE_DIR / "model.partial"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    _keep_familiarity(model, options.train, tmp)
    classes = sorted({name for p in planes for name in p.classes.values()})
    recipe = {
        "base_model": base_name, "base_fingerprint": base_fp, "options": asdict(options),
        "images": [{"name": p.name, "shape": list(p.image.shape), "objects": len(p.classes),
                    "fully_annotated": p.fully_annotated} for p in planes],
        "classes": classes,
        "split": {"train": [[o.plane, o.label] for o in split.train], "heldout": [[o.plane, o.label] for o in split.heldout]},
        "heldout_figures": {"before": result.before, "after": result.after, "baselines": result.baselines},
        "seconds": round(result.seconds, 1),
    }
    (tmp / "finetune.json").write_text(json.dumps(recipe, indent=2, default=list), encoding="utf-8")
    (tmp / "README.md").write_text(model_card(recipe, result), encoding="utf-8")
    for item in sorted(tmp.iterdir()):
        item.replace(out / item.name)
    tmp.rmdir()
    (out / "DONE").write_text("", encoding="utf-8")


def model_card(recipe: dict[str, Any], result: FinetuneResult) -> str:
    classes = ", ".join(recipe["classes"]) or "object"
    images = "\n".join(f"- {im['name']}: {' x '.join(map(str, im['shape']))}, {im['objects']} annotated objects"
                       f"{' (fully annotated)' if im['fully_annotated'] else ''}" for im in recipe["images"])
    return f"""# Adapted model ({classes})

## Model details
Fine-tuned from **{recipe['base_model']}** (fingerprint `{recipe['base_fingerprint']}`) with
`napari_medplib.train.finetune`. Trained parameters: {', '.join(recipe['options']['train'])};
{recipe['options']['steps']} steps, batch {recipe['options']['batch_size']}, learning rate {recipe['options']['lr']},
seed {recipe['options']['seed']}. The full recipe is in `finetune.json`.

## Intended use
Box and click segmentation (and the model's other tasks, unchanged in kind) on images like the ones below.
It was adapted on few objects: check its masks on new images, and adapt again when the images differ.

## Training data
{images}

Objects trained on: {result.n_train}; held out (never trained on): {result.n_heldout}.

## Evaluation (held-out objects)
{result.summary()}

Baselines are model-free: the ellipse inscribed in the object's box, and the Otsu component under the click.

## Limitations
Figures come from few held-out objects of the same images; they say whether adaptation helped here, not how
the model does on other microscopes, stains or magnifications.
"""
