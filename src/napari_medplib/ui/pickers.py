"""Layer pickers: the image, the region layers (any Points/Shapes/Labels), the output Labels layer.

Lists follow the viewer's layer list (added, removed, renamed layers). Nothing relies on fixed
layer names: new prompt layers are named after the image and picked automatically.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QWidget,
)

# PROMPT_LAYER and POINT_COLOURS live in `layers` (`segment` reads them too); importable from here.
from .layers import POINT_COLOURS, PROMPT_LAYER, REGION_LAYER_TYPES, layer_key, layer_kind

NEW_LAYER = "New layer"


class LayerPickers(QWidget):
    """Image combo, checkable region-layer list, output combo + replace option."""

    changed = Signal()

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._images: list[Any] = []
        self._outputs: list[Any] = []
        self._regions: list[Any] = []
        self._checked: set = set()  # layer_key() of checked region layers
        self.point_positive = True  # new clicks in prompt layers made here are positive

        self.image = QComboBox()
        self.image.setToolTip("The image the questions are about (the shown plane of nD data)")
        self.region_list = QListWidget()
        self.region_list.setToolTip(
            "Tick the Points / Shapes / Labels layers whose items are the <region>s of a question"
        )
        self.region_list.setMaximumHeight(90)
        self.region_list.itemChanged.connect(self._on_item_changed)
        self.add_points_button = QPushButton("+ Points")
        self.add_points_button.setToolTip("New Points layer in add mode, for point prompts")
        self.add_points_button.clicked.connect(self.add_points_layer)
        self.add_shapes_button = QPushButton("+ Box / Shapes")
        self.add_shapes_button.setToolTip("New Shapes layer in rectangle mode, for boxes/polygons")
        self.add_shapes_button.clicked.connect(self.add_shapes_layer)
        self.output = QComboBox()
        self.output.setToolTip("Labels layer that receives the masks; 'New layer' makes one")
        self.replace = QCheckBox("replace existing labels")
        self.replace.setToolTip("Off: masks only fill unlabelled pixels. On: masks overwrite")

        buttons = QHBoxLayout()
        buttons.addWidget(self.add_points_button)
        buttons.addWidget(self.add_shapes_button)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Image", self.image)
        form.addRow("Regions", self.region_list)
        form.addRow("", buttons)
        form.addRow("Output", self.output)
        form.addRow("", self.replace)

        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.moved.connect(self.refresh)
        for layer in viewer.layers:
            self._watch(layer)
            if layer_kind(layer) in ("points", "shapes"):
                self._checked.add(layer_key(layer))
        self.refresh()
        self.image.currentIndexChanged.connect(lambda *_: self.changed.emit())

    # ---- current choice ------------------------------------------------------------------------
    @property
    def image_layer(self) -> Any | None:
        i = self.image.currentIndex()
        return self._images[i] if 0 <= i < len(self._images) else None

    @property
    def region_layers(self) -> list[Any]:
        return [layer for layer in self._regions if layer_key(layer) in self._checked]

    @property
    def output_layer(self) -> Any | None:
        """The chosen Labels layer, or None for "New layer"."""
        i = self.output.currentIndex() - 1
        return self._outputs[i] if 0 <= i < len(self._outputs) else None

    def set_output(self, layer: Any | None) -> None:
        self.refresh()
        idx = (
            0
            if layer is None
            else 1 + next((i for i, o in enumerate(self._outputs) if o == layer), -1)
        )
        self.output.setCurrentIndex(max(idx, 0))

    def set_region_layers(self, layers: list[Any]) -> None:
        self._checked = {layer_key(layer) for layer in layers}
        self.refresh()

    # ---- sync with the viewer ------------------------------------------------------------------
    def _watch(self, layer: Any) -> None:
        layer.events.name.connect(self.refresh)

    def _on_inserted(self, event: Any) -> None:
        layer = event.value
        self._watch(layer)
        if layer_kind(layer) in ("points", "shapes"):
            self._checked.add(layer_key(layer))
        self.refresh()
        if layer_kind(layer) == "image" and self.image_layer is not layer:
            self.image.setCurrentIndex(self._images.index(layer))

    def refresh(self, *_: Any) -> None:
        image, output = self.image_layer, self.output_layer
        layers = list(self.viewer.layers)
        self._images = [ly for ly in layers if layer_kind(ly) == "image"]
        self._outputs = [ly for ly in layers if layer_kind(ly) == "labels"]
        self._regions = [ly for ly in layers if layer_kind(ly) in REGION_LAYER_TYPES]
        self._checked &= {layer_key(ly) for ly in self._regions}

        self.image.blockSignals(True)
        self.image.clear()
        self.image.addItems([ly.name for ly in self._images])
        if image in self._images:
            self.image.setCurrentIndex(self._images.index(image))
        elif self._images:
            self.image.setCurrentIndex(len(self._images) - 1)
        self.image.blockSignals(False)

        self.output.blockSignals(True)
        self.output.clear()
        self.output.addItem(NEW_LAYER)
        self.output.addItems([ly.name for ly in self._outputs])
        if output in self._outputs:
            self.output.setCurrentIndex(1 + self._outputs.index(output))
        self.output.blockSignals(False)

        self.region_list.blockSignals(True)
        self.region_list.clear()
        for layer in self._regions:
            item = QListWidgetItem(f"{layer.name}  ({layer_kind(layer)})")
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            checked = layer_key(layer) in self._checked
            item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
            self.region_list.addItem(item)
        self.region_list.blockSignals(False)
        self.changed.emit()

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        layer = self._regions[self.region_list.row(item)]
        if item.checkState() == Qt.CheckState.Checked:
            self._checked.add(layer_key(layer))
        else:
            self._checked.discard(layer_key(layer))
        self.changed.emit()

    # ---- new prompt layers ---------------------------------------------------------------------
    def _new_layer_kwargs(self) -> dict[str, Any]:
        image = self.image_layer
        if image is None:
            return {"ndim": 2}
        ndim = image.ndim - (1 if image.rgb else 0)
        return {
            "ndim": ndim,
            "scale": np.asarray(image.scale)[:ndim],
            "translate": np.asarray(image.translate)[:ndim],
        }

    def _base_name(self) -> str:
        image = self.image_layer
        return image.name if image is not None else "MedPLIB"

    def add_points_layer(self) -> Any:
        """A Points layer for prompts, in add mode: feature 'positive' (default `point_positive`),
        positive and negative points in two colours (`layers.POINT_COLOURS`)."""
        kwargs = self._new_layer_kwargs()
        layer = self.viewer.add_points(
            name=f"{self._base_name()} points",
            features={"positive": np.zeros(0, dtype=bool)},
            feature_defaults={"positive": bool(self.point_positive)},
            face_color="positive",
            face_color_cycle=dict(POINT_COLOURS),
            size=8,  # data pixels: the layer carries the image's scale
            metadata={PROMPT_LAYER: True},
            **kwargs,
        )
        layer.mode = "add"
        self.viewer.layers.selection.active = layer
        return layer

    def add_shapes_layer(self) -> Any:
        """A Shapes layer for boxes and polygons, in rectangle mode."""
        kwargs = self._new_layer_kwargs()
        layer = self.viewer.add_shapes(
            name=f"{self._base_name()} regions",
            edge_color="#ffcc00",
            face_color="transparent",
            edge_width=2,
            metadata={PROMPT_LAYER: True},
            **kwargs,
        )
        layer.mode = "add_rectangle"
        self.viewer.layers.selection.active = layer
        return layer
