"""One item through every action of a run, with a loaded `Session`: the function each worker runs.

Outputs of an item are written atomically (temporary name, then rename), its record last: the
record ``items/<key>.json`` is the item's completion mark, so an item killed half-way has no record
and runs again, and an item with one is skipped. Input problems (an unreadable file, regions outside
the image) raise `ItemError`, which the driver records as a failed item; anything else propagates so
the scheduler can retry it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_text
from .inputs import Item
from .options import BatchOptions, ItemError
from .planes import PlaneReader, read_small_plane
from .tiles import ground_tiled, segment_windowed

ITEMS = "items"
LABELS = "labels"


def record_path(out: Path, key: str) -> Path:
    return out / ITEMS / f"{key}.json"


def _write_labels(out: Path, name: str, labels: np.ndarray) -> str:
    from ..cli_io import write_label_tiff

    relative = f"{LABELS}/{name}.tif"
    write_label_tiff(out / relative, labels, compression="zlib")
    return relative


def _object_block(table: dict[str, np.ndarray] | None, **fields: Any) -> dict[str, Any]:
    """One action's objects, stored by column (a tiled plane may hold 100,000 objects: rows as dicts
    would take several times the memory); `objects_rows` turns blocks back into table rows."""
    from ..engine.measure import empty_table

    table = table if table is not None else empty_table()
    columns = {}
    for name, values in table.items():
        values = np.asarray(values)
        if np.issubdtype(values.dtype, np.integer):
            columns[name] = values.astype(np.int64).tolist()
        else:
            columns[name] = [None if v != v else v for v in values.astype(np.float64).tolist()]
    return dict(fields, columns=columns)


def objects_rows(record: dict[str, Any]):
    """The table rows of a record's object blocks (image, plane, model ... repeated on every row)."""
    common = {"image": record.get("input"), "plane": record.get("plane"), "model": record.get("model"),
              "model_fingerprint": record.get("model_fingerprint")}
    for block in record.get("objects", []):
        fields = {k: v for k, v in block.items() if k != "columns"}
        columns = block["columns"]
        names = list(columns)
        for i in range(len(columns[names[0]]) if names else 0):
            yield dict(common, **fields, **{name: columns[name][i] for name in names})


def _labels_of(reply: Any, shape: tuple[int, int]) -> np.ndarray:
    from ..cli_io import instance_labels, labels_from_masks

    if getattr(reply, "instances", None):
        labels, _ = instance_labels(reply, shape)
        return labels
    return labels_from_masks(reply.masks, shape)


def _intensity(image: np.ndarray) -> np.ndarray | None:
    return image if image.ndim == 2 or image.shape[-1] <= 4 else None


def _check_plane(image: np.ndarray, item: Item) -> np.ndarray:
    if image.ndim not in (2, 3) or image.size == 0:
        raise ItemError(f"{Path(item.path).name}: plane {item.plane_text or '0'} has shape {image.shape}; "
                        "expected a 2-D plane (with channels last)")
    return image


def _segment_regions(item: Item) -> list[Any]:
    from ..cli_io import read_regions

    try:
        return read_regions(item.regions, item.shape)
    except (ValueError, OSError) as exc:  # our readers' errors name the file and the problem
        raise ItemError(str(exc).splitlines()[0]) from None


def load_session(model: str | None, device: str, dtype: str | None, threads: int, llm_weights: str = "full") -> Any:
    """A `Session` for batch work; ``threads`` > 0 sets torch's CPU threads (1 per worker process)."""
    import torch

    from ..engine import Session

    if threads:
        torch.set_num_threads(threads)
    extra = {} if llm_weights == "full" else {"llm_weights": llm_weights}
    return Session.load(model, device=device, dtype=dtype, **extra)


def run_item(item: Item, options: BatchOptions, session: Any, out: Path,
             on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every action of the run on one item; returns (and writes) the item's record.

    Raises `ItemError` for problems of the input (the file, its regions, the plane), which a retry
    cannot fix; other errors propagate.
    """
    from ..engine.errors import SessionInputError
    from ..image_files import ImageFileError
    from ..regions import RegionError

    try:
        return _run_item(item, options, session, out, on_step)
    except (ImageFileError, SessionInputError, RegionError) as exc:
        raise ItemError(str(exc)) from None


def _run_item(item: Item, options: BatchOptions, session: Any, out: Path,
              on_step: Callable[[str], None] | None) -> dict[str, Any]:
    target = record_path(out, item.key)
    if target.is_file():
        return {"key": item.key, "status": "skipped"}
    if item.problem:
        raise ItemError(item.problem)
    started = time.time()
    common = {"image": item.path, "plane": item.plane_text, "model": session.model_name,
              "model_fingerprint": getattr(session, "fingerprint", "")}
    plane = dict(item.plane)
    tiled = max(item.shape) > options.tile_above
    reader = PlaneReader(item.path, plane, options.channel) if tiled else None
    image = None if tiled else _check_plane(read_small_plane(item.path, plane, options.channel), item)
    names = iter(options.actions.names())
    generation = {"max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
                  "mask_mode": options.mask_mode}
    objects: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    outputs: dict[str, str] = {}
    notes: list[str] = []

    for question in options.actions.ask:
        if on_step:
            on_step(f"ask: {question}")
        if tiled:  # the model sees the whole plane downscaled anyway: read it at a stride
            step = -(-max(item.shape) // options.tile_above)
            seen = reader.read(step=step)
            notes.append(f"asked on the plane read at 1/{step} resolution")
        else:
            seen = image
        reply = session.ask(seen, question, instances=False, **generation)
        answers.append(dict(common, action="ask", question=question, answer=reply.text,
                            measured_count=getattr(reply, "measured_count", None)))

    for question in options.actions.ground:
        action = next(names)
        if on_step:
            on_step(f"{action}: {question}")
        if tiled:
            result = ground_tiled(session, reader, question, out / LABELS / f"{item.name}__{action}.zarr",
                                  options, generation)
            outputs[action] = f"{LABELS}/{item.name}__{action}.zarr"
            table, answer, count = result.table, result.answer, result.count
        else:
            reply = session.ask(image, question, instances=True, **generation)
            labels = _labels_of(reply, item.shape)
            from ..engine.measure import measure

            table = measure(labels.astype(np.int64), _intensity(image))
            outputs[action] = _write_labels(out, f"{item.name}__{action}", labels)
            answer, count = reply.text, len(table["label"])
        objects.append(_object_block(table, action=action, question=question, answer=answer))
        answers.append(dict(common, action=action, question=question, answer=answer, measured_count=count))

    if options.actions.segment:
        action = next(names)
        if on_step:
            on_step("segment")
        regions = _segment_regions(item)
        if tiled:  # a polygon's mask prior would be a plane-sized array: prompt with its box
            from ..regions import Region

            regions = [r if r.kind in ("point", "box") else Region.box(*r.bbox) for r in regions]
        from ..ui.workers import plan_prompts

        plan = plan_prompts(regions)
        notes += plan.notes
        if tiled:
            labels_path = out / LABELS / f"{item.name}__{action}.zarr"
            table = segment_windowed(session, reader, plan.prompts, labels_path, options)
            outputs[action] = f"{LABELS}/{item.name}__{action}.zarr"
        else:
            from ..cli_io import labels_from_masks
            from ..engine.measure import measure

            masks = [session.segment(image, **prompt, mask_mode=options.mask_mode).mask for prompt in plan.prompts]
            labels = labels_from_masks(masks, item.shape)
            table = measure(labels.astype(np.int64), _intensity(image))
            outputs[action] = _write_labels(out, f"{item.name}__{action}", labels)
        objects.append(_object_block(table, action=action, question="", answer=""))

    record = {
        "key": item.key, "status": "done", "input": item.path, "plane": item.plane_text, "name": item.name,
        "outputs": outputs, "objects": objects, "answers": answers, "notes": notes,
        "model": session.model_name, "model_fingerprint": getattr(session, "fingerprint", ""),
        "seconds": round(time.time() - started, 3), "worker": f"{socket.gethostname()}:{os.getpid()}",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(target, json.dumps(record, default=_json_default))
    return {"key": item.key, "status": "done", "seconds": record["seconds"]}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a record")
