"""`medplib demo`: the main job on the bundled model and the sample image, in one command.

With a display it opens napari with the sample (synthetic nuclei and two regions), docks the MedPLIB
widget, asks it to segment the nuclei and saves the output Labels layer to a TIFF; the window stays
open for you to go on. Headless (``--headless``, no display, or napari not installed) it asks the same
question through :class:`napari_medplib.Session`, prints the answer and writes the same labels file
and a per-object table. Nothing is downloaded: the model and the image ship with the package.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The question the demo asks (the widget's grounding example).
QUESTION = "Please segment the nuclei."
#: The demo's own output folder (in the current folder unless ``--out`` says otherwise).
DEFAULT_OUT = Path("medplib-demo")
LABELS_FILE = "nuclei_labels.tif"
TABLE_FILE = "nuclei_objects.csv"


@dataclass
class DemoResult:
    """What the demo did: the answer, the objects written and where."""

    answer: str
    objects: int
    labels_path: Path
    table_path: Path | None
    model: str
    mode: str  # "headless" or "napari"
    measured_count: int | None = None


def has_display() -> bool:
    """Whether a window can open: a display on Linux/BSD; always on macOS and Windows."""
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def napari_missing() -> str | None:
    """Why the napari window cannot open (None: it can)."""
    from importlib.util import find_spec

    if find_spec("napari") is None:
        return "napari is not installed (pip install 'napari-medplib[all]')"
    if not any(find_spec(binding) for binding in ("PyQt6", "PyQt5", "PySide6", "PySide2")):
        return "no Qt binding is installed (pip install 'napari[all]')"
    return None


def sample_image():
    """The sample plane (16-bit synthetic nuclei) as the widget gets it."""
    import tifffile

    from ._sample_data import IMAGE_FILE, SAMPLE_DIR

    return tifffile.imread(SAMPLE_DIR / IMAGE_FILE)


def output_paths(out: str | Path | None) -> tuple[Path, Path]:
    """The labels file and table in the demo's folder (made if missing; its own files are replaced)."""
    folder = Path(out) if out is not None else DEFAULT_OUT
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder}: is a file; give a folder for the demo's output")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / LABELS_FILE, folder / TABLE_FILE


def run_headless(out: str | Path | None = None, model: str | None = None, device: str = "auto",
                 question: str = QUESTION, echo: Callable[[str], None] = print) -> DemoResult:
    """Ask the question about the sample with the engine; write one label id per object and the table."""
    from .cli_io import instance_labels, labels_from_masks, write_label_tiff, write_table
    from .engine import Session

    labels_path, table_path = output_paths(out)
    image = sample_image()
    echo(f"Loading the model ({model or 'bundled'}) …")
    session = Session.load(model, device=device)
    echo(f"Question about the sample image ({image.shape[1]} x {image.shape[0]} px): {question}")
    reply = session.ask(image, question)
    echo(f"Answer: {reply.text}")
    table = None
    if reply.instances:
        labels, table = instance_labels(reply, image.shape[:2])
    else:
        labels = labels_from_masks(reply.masks, image.shape[:2])
    write_label_tiff(labels_path, labels)
    write_table(table_path, table)
    objects = len(table["label"]) if table is not None else len(reply.masks)
    echo(f"Wrote {objects} object(s) to {labels_path} and their measurements to {table_path}")
    return DemoResult(reply.text, objects, labels_path, table_path, session.model_name, "headless",
                      getattr(reply, "measured_count", None))


def _wait(app: Any, done: Callable[[], bool], timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            return False
        app.processEvents()
        time.sleep(0.02)
    app.processEvents()
    return True


def run_napari(out: str | Path | None = None, model: str | None = None, device: str = "auto",
               question: str = QUESTION, block: bool = True, timeout: float = 600.0,
               echo: Callable[[str], None] = print) -> DemoResult:
    """Open napari with the sample and the widget, ask ``question``, save the output Labels layer.

    ``block=False`` returns with the viewer still open (``result`` has it as ``viewer``) instead of
    running napari's event loop until the window is closed.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from .cli_io import atomic_path, write_label_tiff
    from .engine import Session

    labels_path, table_path = output_paths(out)
    viewer = napari.Viewer(title="napari-medplib demo")
    viewer.open_sample("napari-medplib", "nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medplib", "MedPLIB")
    app = QApplication.instance()
    echo(f"Loading the model ({model or 'bundled'}) …")
    widget.set_session(Session.load(model, device=device))  # the demo's choice; saved settings are untouched
    widget.ask(question)
    if not _wait(app, lambda: not widget.busy, timeout):
        raise TimeoutError(f"the widget did not answer within {timeout:.0f} s")
    entry = widget.history[-1] if widget.history else {}
    answer = str(entry.get("answer", ""))
    layer = widget.pickers.output_layer
    if layer is None:
        raise RuntimeError("the widget wrote no output layer (see the chat in the napari window)")
    labels = layer.data
    write_label_tiff(labels_path, labels)
    features = getattr(layer, "features", None)
    objects = len(entry.get("label_ids", []))
    if features is not None and len(features):
        with atomic_path(table_path) as temporary:
            features.to_csv(temporary, index=False)
    else:
        table_path = None
    echo(f"Answer: {answer}")
    echo(f"Wrote {objects} object(s) from the layer '{layer.name}' to {labels_path}")
    result = DemoResult(answer, objects, labels_path, table_path, widget.session.model_name, "napari")
    result.viewer = viewer  # type: ignore[attr-defined]
    if block:
        echo("The napari window stays open: close it to end the demo.")
        napari.run()
    return result


def run_demo(headless: bool | None = None, **options: Any) -> DemoResult:
    """The napari demo where a window can open, else the headless one (``headless`` forces either)."""
    echo = options.get("echo", print)
    if headless is None:
        reason = None if has_display() else "no display"
        reason = reason or napari_missing()
        if reason:
            echo(f"Running headless: {reason}.")
        headless = reason is not None
    return run_headless(**options) if headless else run_napari(**options)
