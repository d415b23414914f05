"""The "Adapt to my images" dock widget: fine-tune the model on objects annotated in napari.

The user pairs Image layers with the Labels layers holding annotated objects; the panel captures the
layers on the Qt thread (references and class names only), and a thread worker reads the arrays,
checks them (`train.finetune_data.annotated_planes`) and runs `train.finetune.finetune`. Bad input is
refused there before anything is loaded or written, and shown as a notification. Cancel sets a flag the
core polls between steps; it checkpoints, so pressing Train again with the same layers and output folder
resumes. A finished run becomes the MedPLIB widget's model through the saved settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
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
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..train.finetune_data import AnnotatedPlane, FinetuneInputError, annotated_planes
from .layers import layer_key, layer_kind
from .settings import WidgetSettings, load_settings, save_settings
from .workers import describe_error, report_error, report_info, report_warning, start

#: Feature columns (any case) of a Labels layer naming each label's class.
CLASS_COLUMNS = ("class", "class_name")
DEFAULT_CLASS = "object"


# ---- layers -> annotated planes (no Qt) ----------------------------------------------------------
def label_classes(features: Any) -> dict[int, str]:
    """Label id -> class name from a Labels layer's ``features`` ("class" column; rows matched to ids by
    the ``index`` column, napari's convention, else row i is label i). Empty cells are left out."""
    if features is None or len(features) == 0:
        return {}
    columns = {str(c).lower(): c for c in features.columns}
    column = next((columns[c] for c in CLASS_COLUMNS if c in columns), None)
    if column is None:
        return {}
    names = list(features[column])
    ids = list(features[columns["index"]]) if "index" in columns else list(range(len(names)))
    out = {}
    for label, name in zip(ids, names, strict=True):
        if name is None or (isinstance(name, float) and np.isnan(name)) or not str(name).strip():
            continue
        out[int(label)] = str(name).strip()
    return out


class ClassNames(Mapping):
    """Class names of one Labels layer: its named ids, and ``default`` for every other id (the core asks
    by id, so no pass over the labels is needed to list them)."""

    def __init__(self, known: Mapping[int, str], default: str) -> None:
        self.known, self.default = dict(known), default

    def __getitem__(self, key: Any) -> str:
        try:
            return self.known.get(int(key), self.default)
        except (TypeError, ValueError):
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[int]:
        return iter(self.known)

    def __len__(self) -> int:
        return len(self.known)


@dataclass(frozen=True)
class PairInput:
    """One Image layer and its Labels layer, captured on the Qt thread; arrays are read in the worker."""

    name: str
    image: Any  # level-0 data (numpy, dask, zarr ...)
    labels: Any
    rgb: bool
    classes: dict[int, str]  # from the Labels layer's features
    default_class: str  # for ids the features do not name
    contrast_limits: tuple[float, float] | None


def _level0(layer: Any) -> Any:
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """A layer's data shape without the RGB axis (how labels must match the image)."""
    shape = tuple(int(s) for s in _level0(layer).shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def pair_input(image_layer: Any, labels_layer: Any, class_name: str = "") -> PairInput:
    """Capture a pair: the image's contrast limits as the user sees them (as the engine reads the plane),
    class names from the labels' features, else ``class_name``, else "object"."""
    if image_layer is None or labels_layer is None:
        raise FinetuneInputError("pick an Image layer and the Labels layer of its annotated objects in every "
                                 "row (add them to the viewer first)")
    if layer_kind(image_layer) != "image" or layer_kind(labels_layer) != "labels":
        raise FinetuneInputError(f"{image_layer.name!r} must be an Image layer and {labels_layer.name!r} a Labels "
                                 "layer")
    image = _level0(image_layer)
    rgb = bool(image_layer.rgb)
    limits = None
    if not (rgb and np.dtype(image.dtype) == np.uint8):
        limits = tuple(float(v) for v in image_layer.contrast_limits)
    return PairInput(f"{image_layer.name} with {labels_layer.name}", image, _level0(labels_layer), rgb,
                     label_classes(getattr(labels_layer, "features", None)),
                     class_name.strip() or DEFAULT_CLASS, limits)


def _as_stack(image: np.ndarray, labels: np.ndarray, rgb: bool) -> tuple[np.ndarray, np.ndarray]:
    """Labels with several leading axes (T, Z, H, W) matching the image become one (N, H, W) stack,
    the form the core takes; anything else is left for the core to check."""
    spatial = image.shape[:-1] if rgb else image.shape
    if labels.ndim <= 3 or tuple(spatial) != tuple(labels.shape):
        return image, labels
    n = int(np.prod(labels.shape[:-2]))
    return image.reshape(n, *image.shape[labels.ndim - 2 :]), labels.reshape(n, *labels.shape[-2:])


def planes_from_pairs(pairs: Sequence[PairInput], fully_annotated: bool = False) -> list[AnnotatedPlane]:
    """Read the pairs' arrays (slow for lazy data: call in a worker) into checked planes; raises
    `FinetuneInputError` naming the fix."""
    if not pairs:
        raise FinetuneInputError("no image was chosen; add an Image layer and a Labels layer with a few annotated "
                                 "objects")
    images, labels = [], []
    for pair in pairs:
        image, label = _as_stack(np.asarray(pair.image), np.asarray(pair.labels), pair.rgb)
        images.append(image)
        labels.append(label)
    classes = [ClassNames(p.classes, p.default_class) if p.classes else p.default_class for p in pairs]
    return annotated_planes(images, labels, classes, fully_annotated=fully_annotated,
                            names=[p.name for p in pairs], contrast_limits=[p.contrast_limits for p in pairs])


# ---- the run (no Qt) -----------------------------------------------------------------------------
def default_output_folder(now: datetime | None = None) -> Path:
    """A new folder for an adapted model in the user data dir (not the cache: an adapted model is the
    user's work and must survive a cache clean-up)."""
    from platformdirs import user_data_dir

    root = Path(user_data_dir("napari-medplib", appauthor=False)) / "models"
    stamp = f"adapted-{(now or datetime.now()):%Y%m%d-%H%M%S}"
    folder, n = root / stamp, 2
    while folder.exists():
        folder, n = root / f"{stamp}-{n}", n + 1
    return folder


def check_output(text: str) -> Path:
    """The output folder typed by the user; a folder holding a finished model is refused (training
    into it again would replace that model)."""
    if not text.strip():
        raise FinetuneInputError("choose an output folder for the adapted model")
    out = Path(text.strip()).expanduser().absolute()
    if (out / "DONE").exists():
        raise FinetuneInputError(f"{out} already holds a finished adapted model; choose a new output folder "
                                 "(nothing there was changed)")
    return out


def resolve_device(setting: str) -> str:
    """The widget's device setting as the core takes it ("auto": CUDA when there is one, else the CPU)."""
    if setting in ("cpu", "cuda", "mps"):
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class TrainRequest:
    """Everything one run needs, captured on the Qt thread when Train is pressed."""

    pairs: tuple[PairInput, ...]
    fully_annotated: bool
    steps: int
    holdout: float
    out: Path
    base: str | None  # model folder; None = the bundled model
    device: str
    grounding: bool = True  # also learn "segment the <class>" (the core's `FinetuneOptions.grounding`)


def train_job(request: TrainRequest, stop: threading.Event, on_progress: Callable[[str, int, int], None],
              on_log: Callable[[dict], None], train: Callable[..., Any] | None = None) -> Any:
    """Check the inputs, then fine-tune (``train``, default `train.finetune.finetune`); worker thread."""
    planes = planes_from_pairs(request.pairs, request.fully_annotated)
    from ..train.finetune import FinetuneOptions, finetune

    options = FinetuneOptions(steps=request.steps, holdout=request.holdout, grounding=request.grounding)
    return (train or finetune)(planes, request.out, request.base, options, on_progress=on_progress,
                               should_stop=stop.is_set, on_log=on_log, device=resolve_device(request.device))


def default_options() -> Any:
    """The core's default options (a torch-free module: building the panel loads no model code)."""
    from ..train.finetune_data import FinetuneOptions

    return FinetuneOptions()


def use_adapted_model(folder: Path, widgets: Sequence[Any]) -> WidgetSettings | None:
    """Make ``folder`` the model of the MedPLIB widgets: saved in the settings file (read by every widget
    and the function widget on their next load) and shown in the open dock widgets, whose next question
    loads it (their session no longer matches their settings). None when the settings were not saved."""
    settings = load_settings()
    settings.source, settings.folder = "folder", str(folder)
    saved = save_settings(settings)
    for widget in widgets:
        widget.settings.source, widget.settings.folder = "folder", str(folder)
        widget.model_panel.show_saved(widget.settings, "adapted model chosen: it loads on the next question")
    return settings if saved is not None else None


def open_medplib_widgets(viewer: Any, anchor: QWidget) -> list[Any]:
    """The MedPLIB dock widgets open in the viewer's window (napari's dock list, else Qt's children)."""
    from .widget import MedplibWidget

    found: list[Any] = []
    docks = getattr(getattr(viewer, "window", None), "dock_widgets", None)
    if docks is not None:
        found = [w for w in docks.values() if isinstance(w, MedplibWidget)]
    top = anchor.window()
    if top is not anchor:
        found += [w for w in top.findChildren(MedplibWidget) if all(w is not f for f in found)]
    return found


# ---- Qt: the pairs table -------------------------------------------------------------------------
def _index_of(layers: Sequence[Any], layer: Any) -> int:
    key = None if layer is None else layer_key(layer)
    return next((i for i, ly in enumerate(layers) if layer_key(ly) == key), -1)


def _fill(combo: QComboBox, layers: Sequence[Any], chosen: Any) -> None:
    combo.blockSignals(True)
    combo.clear()
    combo.addItems([ly.name for ly in layers])
    combo.setCurrentIndex(_index_of(layers, chosen))
    combo.blockSignals(False)


class PairRow(QWidget):
    """One row: an Image layer, the Labels layer of its objects, the class name for unnamed objects."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.images: list[Any] = []
        self.labels_layers: list[Any] = []
        self.image = QComboBox()
        self.image.setToolTip("The image the objects were annotated on")
        self.labels = QComboBox()
        self.labels.setToolTip("Labels layer with the annotated objects (one id per object)")
        self.class_name = QLineEdit()
        self.class_name.setPlaceholderText(DEFAULT_CLASS)
        self.class_name.setToolTip("Class of the objects (used where the Labels layer's features have no 'class')")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.image, 2)
        row.addWidget(self.labels, 2)
        row.addWidget(self.class_name, 1)

    @property
    def image_layer(self) -> Any | None:
        i = self.image.currentIndex()
        return self.images[i] if 0 <= i < len(self.images) else None

    @property
    def labels_layer(self) -> Any | None:
        i = self.labels.currentIndex()
        return self.labels_layers[i] if 0 <= i < len(self.labels_layers) else None

    def show_layers(self, images: list[Any], image: Any, labels_layers: list[Any], labels: Any) -> None:
        self.images, self.labels_layers = images, labels_layers
        _fill(self.image, images, image)
        _fill(self.labels, labels_layers, labels)


def _fits(labels: Any, image: Any) -> bool:
    return labels is not None and image is not None and spatial_shape(labels) == spatial_shape(image)


def _pick_labels(candidates: Sequence[Any], image: Any, used: set) -> Any | None:
    """A default Labels layer for ``image``: one of its shape not used by another row, else any."""
    fits = [ly for ly in candidates if _fits(ly, image)]
    for group in (fits, candidates):
        free = [ly for ly in group if layer_key(ly) not in used]
        if free or group:
            return (free or group)[0]
    return None


class PairTable(QWidget):
    """Rows of (image, labels, class name) pairs that follow the viewer's layer list; "+" / "-" rows."""

    changed = Signal()

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.rows: list[PairRow] = []
        self._rows_box = QVBoxLayout()
        self._rows_box.setContentsMargins(0, 0, 0, 0)
        header = QHBoxLayout()
        for text, stretch in (("Image", 2), ("Labels (objects)", 2), ("Class", 1)):
            header.addWidget(QLabel(text), stretch)
        self.add_button = QPushButton("+")
        self.add_button.setToolTip("Add an image with its labels")
        self.add_button.clicked.connect(lambda: self.add_row())
        self.remove_button = QPushButton("-")
        self.remove_button.setToolTip("Remove the last row")
        self.remove_button.clicked.connect(self.remove_row)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(header)
        layout.addLayout(self._rows_box)
        layout.addLayout(buttons)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.moved.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.add_row()

    def _layers(self, kind: str) -> list[Any]:
        return [ly for ly in self.viewer.layers if layer_kind(ly) == kind]

    def add_row(self) -> PairRow:
        row = PairRow()
        row.image.currentIndexChanged.connect(lambda *_: self._on_image_chosen(row))
        row.labels.currentIndexChanged.connect(lambda *_: self.changed.emit())
        self.rows.append(row)
        self._rows_box.addWidget(row)
        self.refresh()
        return row

    def remove_row(self) -> None:
        if len(self.rows) > 1:
            row = self.rows.pop()
            row.setParent(None)
            row.deleteLater()
            self.refresh()

    def _on_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh)
        self.refresh()

    def _on_image_chosen(self, row: PairRow) -> None:
        """A newly chosen image gets a Labels layer of its shape when the current one does not fit."""
        image, labels = row.image_layer, row.labels_layer
        if image is not None and not _fits(labels, image):
            used = {layer_key(r.labels_layer) for r in self.rows if r is not row and r.labels_layer is not None}
            row.show_layers(row.images, image, row.labels_layers, _pick_labels(row.labels_layers, image, used))
        self.changed.emit()

    def refresh(self, *_: Any) -> None:
        """Re-list the layers, keeping every row's choice; rows without one get a default."""
        images, labels = self._layers("image"), self._layers("labels")
        used_images: set = set()
        used_labels: set = set()
        for row in self.rows:
            image = row.image_layer if _index_of(images, row.image_layer) >= 0 else None
            if image is None:
                free = [ly for ly in images if layer_key(ly) not in used_images]
                image = (free or images or [None])[0]
            chosen = row.labels_layer if _index_of(labels, row.labels_layer) >= 0 else None
            if chosen is None or not _fits(chosen, image):  # a layer of the image's shape may have come
                better = _pick_labels(labels, image, used_labels)
                chosen = better if chosen is None or _fits(better, image) else chosen
            row.show_layers(images, image, labels, chosen)
            used_images |= {layer_key(image)} if image is not None else set()
            used_labels |= {layer_key(chosen)} if chosen is not None else set()
        self.remove_button.setEnabled(len(self.rows) > 1)
        self.changed.emit()

    def pairs(self) -> list[PairInput]:
        """The rows as captured inputs (`FinetuneInputError` when a row lacks a layer)."""
        return [pair_input(r.image_layer, r.labels_layer, r.class_name.text()) for r in self.rows]


# ---- Qt: the dock widget -------------------------------------------------------------------------
class _Relay(QObject):
    """Carries the core's callbacks from the worker thread to the Qt thread (queued signals)."""

    progress = Signal(str, int, int)
    logged = Signal(object)


class FinetunePanel(QWidget):
    """The "Adapt to my images" dock: layer pairs, options, Train / Cancel, progress, loss, before/after figures.

    ``train`` replaces `train.finetune.finetune` (scripts and tests wrap it); it is called with the same
    arguments.
    """

    def __init__(self, napari_viewer: Any, *, train: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._train = train
        self._worker: Any | None = None
        self._stop = threading.Event()
        self._relay = _Relay(self)
        self._relay.progress.connect(self._on_progress)
        self._relay.logged.connect(self._on_log)
        self.last_result: Any | None = None
        self.pairs = PairTable(napari_viewer)
        self._make_controls(default_options())
        self._build_layout()

    def _make_controls(self, defaults: Any) -> None:
        """Options (defaults from the core's `FinetuneOptions`), buttons and the result display."""
        self.fully = QCheckBox("fully annotated (unlabelled pixels are background)")
        self.fully.setToolTip("Off (normal): only the labelled objects count; other objects may be unlabelled")
        self.grounding = QCheckBox("learn the class names (\"segment the <class>\")")
        self.grounding.setChecked(bool(defaults.grounding))
        self.grounding.setToolTip("Also trains the language path so the class name finds the objects; "
                                  "off: box and click prompts only (faster)")
        from ..train.finetune_data import PEFT_HINT, peft_available

        if not peft_available():  # the plugin manager installs no extras
            self.grounding.setChecked(False)
            self.grounding.setEnabled(False)
            self.grounding.setToolTip(PEFT_HINT)
        self.holdout = QSpinBox()
        self.holdout.setRange(0, 90)
        self.holdout.setSuffix(" %")
        self.holdout.setValue(round(100 * defaults.holdout))
        self.holdout.setToolTip("Share of the objects kept aside to measure the result (at least 3)")
        self.steps = QSpinBox()
        self.steps.setRange(1, 100_000)
        self.steps.setValue(int(defaults.steps))
        self.output = QLineEdit(str(default_output_folder()))
        self.output.setToolTip("New folder for the adapted model; the same folder again resumes a stopped run")
        self.browse = QPushButton("Browse…")
        self.browse.clicked.connect(self._browse)
        self.base = QComboBox()
        self.base.addItem("", "current")
        self.base.addItem("Bundled default model", "bundled")
        self._show_base()
        self.base.setToolTip("The model to adapt: the one chosen in the MedPLIB widget's Model settings, or the "
                             "bundled one")
        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.start_training)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.loss = QLabel("")
        self.result = QLabel("")
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

    def _build_layout(self) -> None:
        out_row = QHBoxLayout()
        out_row.addWidget(self.output, 1)
        out_row.addWidget(self.browse)
        form = QFormLayout()
        form.addRow("", self.fully)
        form.addRow("", self.grounding)
        form.addRow("Held out", self.holdout)
        form.addRow("Steps", self.steps)
        form.addRow("Base model", self.base)
        form.addRow("Output", out_row)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("<b>Annotated images</b>"))
        layout.addWidget(self.pairs)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.loss)
        layout.addWidget(self.result)
        layout.addStretch(1)

    def _show_base(self) -> None:
        """Name the MedPLIB widget's current model in the base-model choice."""
        source = load_settings().model_source
        self.base.setItemText(0, f"The MedPLIB widget's model ({Path(source).name if source else 'bundled'})")

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self._show_base()  # the model may have been changed in the MedPLIB widget meanwhile
        super().showEvent(event)

    @property
    def running(self) -> bool:
        return self._worker is not None

    def _browse(self) -> None:  # a file dialog: only on a click, never in tested paths
        folder = QFileDialog.getExistingDirectory(self, "Folder for the adapted model", self.output.text())
        if folder:
            self.output.setText(folder)

    def _request(self) -> TrainRequest:
        """Capture the run on the Qt thread; `FinetuneInputError` for what can be told without reading data."""
        pairs = tuple(self.pairs.pairs())
        out = check_output(self.output.text())
        settings = load_settings()
        base = settings.model_source if self.base.currentData() == "current" else None
        return TrainRequest(pairs, self.fully.isChecked(), int(self.steps.value()), self.holdout.value() / 100.0,
                            out, base, settings.device, self.grounding.isChecked())

    def start_training(self) -> None:
        """Train (or resume) in a worker thread; input errors become a notification."""
        if self.running:
            report_warning("the model is still being adapted; wait for it or press Cancel")
            return
        try:
            request = self._request()
        except FinetuneInputError as exc:
            report_error(exc)
            return
        self._stop = threading.Event()
        self._set_running(True)
        self.status.setText("starting…")
        self.loss.setText("")
        self.result.setText("")
        self._worker = start(
            train_job, request, self._stop, self._relay.progress.emit, self._relay.logged.emit, self._train,
            desc="MedPLIB: adapting the model", on_return=self._on_done, on_error=self._on_error,
            on_finish=self._on_finished,
        )

    def cancel(self) -> None:
        """Ask the run to stop after the current step (it checkpoints; Train resumes)."""
        if self.running:
            self._stop.set()
            self.cancel_button.setEnabled(False)
            self.status.setText("stopping after this step…")

    def _set_running(self, on: bool) -> None:
        self.train_button.setEnabled(not on)
        self.cancel_button.setEnabled(on)
        for widget in (self.pairs, self.fully, self.grounding, self.holdout, self.steps, self.output, self.browse,
                       self.base):
            widget.setEnabled(not on)

    def _on_progress(self, message: str, done: int, total: int) -> None:
        if not self._stop.is_set():
            self.status.setText(message)
        self.progress.setRange(0, max(int(total), 0))
        self.progress.setValue(int(done))

    def _on_log(self, record: dict) -> None:
        self.loss.setText(f"loss {float(record['loss']):.3f} (step {record['step']} of {self.steps.value()})")

    def _on_done(self, result: Any) -> None:
        self.last_result = result
        self.result.setText(result.summary())
        folder = Path(result.model_dir)
        self.output.setText(str(default_output_folder()))  # the next run must not replace this model
        if use_adapted_model(folder, open_medplib_widgets(self.viewer, self)) is None:
            self.status.setText(f"saved the adapted model to {folder}")
            report_warning(f"the settings could not be saved; choose {folder} under Model settings")
            return
        self._show_base()
        self.status.setText(f"done: the MedPLIB widget now uses {folder}")
        report_info(f"The MedPLIB widget now uses {folder}")

    def _on_error(self, exc: BaseException) -> None:
        from ..train.finetune import FinetuneCancelled

        if isinstance(exc, FinetuneCancelled):
            self.status.setText("stopped; press Train to resume")
            return
        self.status.setText("not adapted: " + describe_error(exc))
        report_error(exc)

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        """A closed panel stops its run at the next step (checkpointed: it resumes later)."""
        self._stop.set()
        super().closeEvent(event)
