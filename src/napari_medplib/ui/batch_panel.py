"""The collapsible "Run on folder" section: the current question over a folder of images, as a batch run.

It calls the same napari-free `napari_medplib.batch.batch` as ``medplib batch``, in this process with
the dock's loaded model (no cluster to start; the model is shared with the chat, one call at a time),
in a napari thread worker: the Qt thread only shows progress. Finished results open as layers on
request. For hundreds of images or a cluster, the command line is the tool (the panel says so).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QWidget,
)
from superqt import QCollapsible

#: Most label layers "Open results" adds at once (a folder of 500 images would bury the viewer).
MAX_OPENED = 24
DEFAULT_QUESTION = "Please segment the nuclei."


class LockedSession:
    """The dock's session for a batch: each call takes the session's lock, so chat and batch take turns."""

    def __init__(self, session: Any, lock: threading.Lock) -> None:
        self._session, self._lock = session, lock
        self.model_name = session.model_name
        self.fingerprint = getattr(session, "fingerprint", "")

    def ask(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._session.ask(*args, **kwargs)

    def segment(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._session.segment(*args, **kwargs)


def batch_job(inputs: list[str], out: str, options: Any, session: Any, cancel: threading.Event
              ) -> Generator[Any, None, Any]:
    """Run `batch` in a helper thread; yield its `Progress` reports; return its `BatchResult`."""
    from ..batch import batch

    reports: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = batch(inputs, out, options, session=session, on_progress=reports.put,
                                      should_stop=cancel.is_set)
        except BaseException as exc:  # noqa: BLE001 - handed to the Qt side as the job's error
            outcome["error"] = exc
        finally:
            reports.put(None)

    thread = threading.Thread(target=run, name="medplib-batch", daemon=True)
    thread.start()
    while (report := reports.get()) is not None:
        yield report
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _labels(path: Path) -> Any:
    """A label output as napari takes it: TIFFs (planes up to the tiling size) in memory, the OME-Zarr of
    a tiled plane as its lazy zarr array (napari reads the chunks it shows; a 20,000-px plane is never
    loaded whole on the Qt thread)."""
    if path.is_dir():
        import zarr

        return zarr.open_group(str(path), mode="r")["0"]
    from ..batch.tiles import read_labels

    return read_labels(path)


def result_layers(out: Path, limit: int = MAX_OPENED) -> tuple[list[tuple[str, Any]], int]:
    """(layer name, labels) of a run's label outputs, at most ``limit``; and how many there are."""
    folder = out / "labels"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".tif", ".zarr")) if folder.is_dir() else []
    return [(p.stem, _labels(p)) for p in files[:limit]], len(files)


class BatchPanel(QCollapsible):
    """Folder, output folder, question and mode; Run / Stop; progress; Open results."""

    def __init__(self, dock: Any, parent: QWidget | None = None) -> None:
        super().__init__("Run on folder", parent)
        self.dock = dock
        self._worker: Any = None
        self._cancel = threading.Event()
        self.last_out: Path | None = None
        body = QWidget()
        form = QFormLayout(body)
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("folder of TIFF / PNG / OME-Zarr images")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.out = QLineEdit()
        self.out.setPlaceholderText("results folder (default: <folder>/medplib-results)")
        self.question = QLineEdit()
        self.question.setPlaceholderText(f"default: the chat's question, else {DEFAULT_QUESTION!r}")
        self.mode = QComboBox()
        self.mode.addItem("Labels per object", "ground")
        self.mode.addItem("Answers only", "ask")
        self.segment = QCheckBox("Segment region files")
        self.segment.setToolTip("Also segment the regions of the file beside each image: <name>.geojson "
                                "(QuPath); `medplib batch --regions-pattern` reads other formats")
        self.run_button = QPushButton("Run on folder…")
        self.run_button.clicked.connect(self.run_or_stop)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status = QLabel("Hundreds of images or a cluster: medplib batch")
        self.status.setWordWrap(True)
        self.open_button = QPushButton("Open results")
        self.open_button.setEnabled(False)
        self.open_button.clicked.connect(self.open_results)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.open_button)
        form.addRow("Folder", row)
        form.addRow("Results", self.out)
        form.addRow("Question", self.question)
        form.addRow("Write", self.mode)
        form.addRow(self.segment)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)
        self.addWidget(body)

    # ---- run -------------------------------------------------------------------------------------
    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of images")
        if folder:
            self.folder.setText(folder)

    def _options(self) -> tuple[list[str], str, Any]:
        from ..batch import Actions, BatchOptions

        folder = self.folder.text().strip()
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"choose a folder of images first ({folder or 'none given'})")
        out = self.out.text().strip() or str(Path(folder) / "medplib-results")
        question = self.question.text().strip() or self.dock.chat.input.text().strip() or DEFAULT_QUESTION
        ground = self.mode.currentData() == "ground"
        actions = Actions(ground=(question,) if ground else (), ask=() if ground else (question,),
                          segment=self.segment.isChecked())
        settings = self.dock.settings
        return [folder], out, BatchOptions(actions, max_new_tokens=settings.max_new_tokens,
                                           temperature=settings.temperature)

    def run_or_stop(self) -> None:
        if self._worker is not None:
            self._cancel.set()
            self.status.setText("stopping after the current image…")
            return
        from .workers import report_error

        try:
            inputs, out, options = self._options()
        except ValueError as exc:
            report_error(exc)
            return
        self.dock.with_session(lambda: self._start(inputs, out, options))

    def _start(self, inputs: list[str], out: str, options: Any) -> None:
        from .sessions import lock_for
        from .workers import start

        session = LockedSession(self.dock.session, lock_for(self.dock.session))
        self._cancel = threading.Event()
        self.last_out = Path(out)
        self.run_button.setText("Stop")
        self.open_button.setEnabled(False)
        self.status.setText(f"listing {inputs[0]}…")
        self._worker = start(batch_job, inputs, out, options, session, self._cancel, desc="MedPLIB batch",
                             on_yield=self._on_progress, on_return=self._on_done, on_error=self._on_error,
                             on_finish=self._on_finish)

    def _on_progress(self, progress: Any) -> None:
        self.progress.setRange(0, max(1, progress.total))
        self.progress.setValue(progress.finished)
        eta = progress.eta_s
        self.status.setText(f"{progress.finished}/{progress.total}: {progress.done} done, {progress.skipped} "
                            f"already done, {progress.failed} failed"
                            + (f"; about {eta:.0f} s left" if eta is not None else ""))

    def _on_done(self, result: Any) -> None:
        self.status.setText(result.summary() + (f"; reasons in {result.out / 'failed.csv'}" if result.failed else ""))
        self.open_button.setEnabled(True)

    def _on_error(self, exc: BaseException) -> None:
        from .workers import report_error

        self.status.setText(f"not run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        report_error(exc)

    def _on_finish(self) -> None:
        self._worker = None
        self.run_button.setText("Run on folder…")

    @property
    def busy(self) -> bool:
        return self._worker is not None

    # ---- results -----------------------------------------------------------------------------------
    def open_results(self, on_layer: Callable[[str], None] | None = None) -> int:
        """Add the run's label outputs as Labels layers (at most `MAX_OPENED`); returns how many."""
        from .workers import report_warning

        if self.last_out is None:
            return 0
        layers, total = result_layers(self.last_out)
        for name, labels in layers:
            self.dock.viewer.add_labels(labels, name=f"{name} (batch)")
        if total > len(layers):
            report_warning(f"opened {len(layers)} of {total} label images; all are in {self.last_out / 'labels'}")
        return len(layers)
