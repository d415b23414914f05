"""The output folder of a run: its identity (run.json), per-item records, and the run's tables.

Layout::

    OUT/run.json          the command, options, versions, counts and timing (rewritten at the end)
    OUT/items/<key>.json  one record per finished item: its objects and answers (the completion mark)
    OUT/labels/...        <name>__<action>.tif, or .zarr (OME-Zarr) for tiled planes
    OUT/objects.csv       one row per object of every item of the run (+ objects.parquet with pyarrow)
    OUT/answers.jsonl     one line per answer
    OUT/failed.csv        the items that failed, with the reason
    OUT/batch.log         what happened, in order

A folder holding another run's results (a different options fingerprint) is refused, never mixed
or overwritten. Temporary files of killed runs (``.<name>.tmp*``) are swept at the start.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes, atomic_write_text
from .options import BatchError, BatchOptions
from .task import ITEMS, LABELS, objects_rows

RUN_FILE = "run.json"
OBJECT_COLUMNS = (
    "image", "plane", "action", "question", "label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0",
    "bbox_y1", "bbox_x1", "mean_intensity", "eccentricity", "answer", "model", "model_fingerprint",
)
FAILED_COLUMNS = ("image", "plane", "key", "error")


def prepare(out: Path, options: BatchOptions, command: Sequence[str]) -> dict[str, Any]:
    """Create or reopen ``out`` for this run; refuse a folder with another run's results."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {out}: is a file; give a folder")
    if not out.parent.is_dir():
        raise BatchError(f"--out {out}: its folder {out.parent} does not exist")
    run_file = out / RUN_FILE
    previous: dict[str, Any] | None = None
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise BatchError(f"--out {out}: its {RUN_FILE} cannot be read ({exc}); use a new folder") from None
        if previous.get("fingerprint") != options.fingerprint():
            raise BatchError(
                f"--out {out}: holds the results of another run with other options "
                f"({_difference(previous.get('options', {}), options.describe())}); "
                "nothing was changed: give a new --out folder, or repeat that run's options to resume it")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise BatchError(f"--out {out}: the folder is not empty and is not a batch run's folder; "
                         "give a new or empty folder")
    for sub in (out, out / ITEMS, out / LABELS):
        sub.mkdir(exist_ok=True)
    sweep_temporaries(out)
    run = {
        "fingerprint": options.fingerprint(), "options": options.describe(), "command": list(command),
        "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running",
        "runs": (previous or {}).get("runs", 0) + 1,
    }
    atomic_write_text(run_file, json.dumps(run, indent=1))
    return run


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if k not in ("device", "threads", "model") and old.get(k) != new.get(k)]
    if not changed:
        return "a different model"
    first = changed[0]
    return f"{first} was {old.get(first)!r}, now {new.get(first)!r}" + (f"; and {len(changed) - 1} more" if len(changed) > 1 else "")


def sweep_temporaries(out: Path) -> int:
    """Remove what killed workers left half-written (temporary files and OME-Zarr folders)."""
    removed = 0
    for folder in (out, out / ITEMS, out / LABELS):
        for path in folder.glob(".*"):
            if ".tmp" in path.name:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
    return removed


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("napari-medplib", "torch", "transformers", "dask", "distributed", "numpy", "tifffile", "zarr"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def read_records(out: Path, keys: Iterable[str]) -> list[dict[str, Any]]:
    records = []
    for key in keys:
        path = out / ITEMS / f"{key}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
    return records


def _csv_bytes(rows: list[dict[str, Any]], columns: Sequence[str]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def write_tables(out: Path, records: list[dict[str, Any]], failures: list[dict[str, Any]]) -> list[str]:
    """objects.csv (+ .parquet), answers.jsonl and failed.csv for the run's items; returns notes."""
    objects = [row for record in records for row in objects_rows(record)]
    answers = [row for record in records for row in record.get("answers", [])]
    atomic_write_bytes(out / "objects.csv", _csv_bytes(objects, OBJECT_COLUMNS))
    atomic_write_text(out / "answers.jsonl", "".join(json.dumps(a) + "\n" for a in answers))
    atomic_write_bytes(out / "failed.csv", _csv_bytes(failures, FAILED_COLUMNS))
    notes = []
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (out / "objects.parquet").unlink(missing_ok=True)
        notes.append("objects.parquet not written: pip install pyarrow (objects.csv has the same rows)")
    else:
        columns = {name: [row.get(name) for row in objects] for name in OBJECT_COLUMNS}
        table = pa.table(columns) if objects else pa.table({n: pa.array([], pa.string()) for n in OBJECT_COLUMNS})
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        atomic_write_bytes(out / "objects.parquet", buffer.getvalue().to_pybytes())
    return notes


def finish(out: Path, run: dict[str, Any], summary: dict[str, Any]) -> None:
    run = dict(run, **summary, status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_text(out / RUN_FILE, json.dumps(run, indent=1))


class Log:
    """batch.log: one line per event, appended (a crash keeps what was written)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "batch.log"

    def __call__(self, message: str) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
