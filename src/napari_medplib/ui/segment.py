"""Direct segmentation: point / box prompts -> a preview mask via `Session.segment`, then Commit.

"Segment" (Shift-S) turns the prompts of the ticked Points/Shapes layers on the shown plane into
masks in a preview Labels layer named after the image; "Live" re-segments (debounced) whenever a
prompt layer's data change; "Inside box" and "Clicked piece" switch `Session.segment`'s mask cuts
(remembered); "Commit" (Shift-C) writes the preview masks into the output Labels layer with the next
free ids, as one undo step, and removes the prompts it used from the prompt layers the widget made
(as micro-sam does: the next click starts a new object).

Clicks are positive or negative (T switches, as in micro-sam; negative points are drawn in another
colour). Prompts combine only where they overlap (`workers.plan_prompts`): a click outside every box
is its own object, and the user is told. The prompt layer stays active, in its mode, when the
preview or output layer is made. Committing a mask that mostly covers an existing label does not
write a ring around it: the user is told, and with "replace existing labels" the label is redrawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QGridLayout, QPushButton, QWidget

from .layers import (
    POINT_COLOURS,
    PROMPT_LAYER,
    KeepActive,
    collect_regions,
    image_plane,
    layer_kind,
)
from .output import (
    provenance_entry,
    record_provenance,
    redraw,
    redraw_target,
    write_planes,
)
from .workers import mask_summary, plan_prompts, report_error, report_warning, segment_job, start

if TYPE_CHECKING:
    from .widget import MedplibWidget

SEGMENT_KEY = "Shift-S"
COMMIT_KEY = "Shift-C"
POLARITY_KEY = "T"


def key_hint(key: str) -> str:
    """A key for a button's text, short: 'Shift-S' -> '(⇧S)'."""
    return "(" + key.replace("Shift-", "\u21e7") + ")"


def _segment_all(session: Any, plane: Any, prompts: list[dict[str, Any]], clip_to_box: bool,
                 clicked_pieces: bool) -> list[np.ndarray]:
    return [np.asarray(segment_job(session, plane, p, clip_to_box, clicked_pieces).mask, dtype=bool)
            for p in prompts]


def _unbind(viewer: Any, bound: dict[str, Any]) -> None:
    """Remove our key bindings if they are still ours."""
    current = {str(k): f for k, f in viewer.keymap.items()}
    for key, func in bound.items():
        if current.get(key.replace("-", "+")) is func:
            viewer.bind_key(key, None)


class SegmentPanel(QWidget):
    """Segment / Live / Commit controls bound to a `MedplibWidget`."""

    def __init__(self, dock: MedplibWidget) -> None:
        super().__init__(dock)
        self.dock = dock
        self.preview: Any | None = None  # the preview Labels layer we own
        self.masks: list[np.ndarray] = []
        self._plane = None
        self._image = None  # the image layer the preview belongs to
        self._worker = None
        self._dirty = False
        self._watched: list[Any] = []
        self._used: list[tuple[Any, list[int]]] = []  # our prompt layers' items behind the preview

        self.segment_button = QPushButton(f"Segment {key_hint(SEGMENT_KEY)}")
        self.segment_button.setToolTip(
            f"Mask from the points/boxes on this plane, no question [{SEGMENT_KEY}]"
        )
        self.segment_button.clicked.connect(self.segment)
        self.negative = QPushButton()
        self.negative.setCheckable(True)
        self.negative.setToolTip(
            f"New clicks are positive (on the object) or negative (not the object, e.g. a touching "
            f"neighbour); [{POLARITY_KEY}] switches. Negative clicks only remove pixels."
        )
        self.negative.toggled.connect(self._on_polarity)
        self.live = QCheckBox("Live")
        self.live.setToolTip("Segment again whenever points or shapes change")
        self.live.setChecked(dock.settings.live)
        self.live.toggled.connect(self._on_live)
        self.inside_box = self._mask_option(
            "Inside box", "clip_to_box",
            "Keep a box's mask inside the box (SAM's mask can spill onto touching neighbours); "
            "untick for the decoder's mask as it is",
        )
        self.clicked_only = self._mask_option(
            "Clicked piece", "clicked_pieces",
            "Keep only the parts of a click's mask that touch a positive click (the decoder can add "
            "pieces elsewhere); untick for the decoder's mask as it is",
        )
        self.commit_button = QPushButton(f"Commit {key_hint(COMMIT_KEY)}")
        self.commit_button.setToolTip(
            "Write the preview mask to the output layer with a new id and clear the clicks it used; "
            f"an object already labelled is redrawn with 'replace existing labels' [{COMMIT_KEY}]"
        )
        self.commit_button.clicked.connect(self.commit)
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.segment_button, 0, 0)
        grid.addWidget(self.commit_button, 0, 1)
        grid.addWidget(self.negative, 0, 2)
        grid.addWidget(self.live, 1, 0)
        grid.addWidget(self.inside_box, 1, 1)
        grid.addWidget(self.clicked_only, 1, 2)
        self._told: set[str] = set()  # notes already shown (live mode would repeat them)
        self._show_polarity()

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(200)
        self._debounce.timeout.connect(lambda: self.segment(quiet=True))
        dock.pickers.changed.connect(self._rewatch)
        viewer = dock.viewer
        bound = {
            SEGMENT_KEY: lambda _v: self.segment(),
            COMMIT_KEY: lambda _v: self.commit(),
            POLARITY_KEY: lambda _v: self.negative.toggle(),
        }
        for key, func in bound.items():
            viewer.bind_key(key, func, overwrite=True)
        # a closed dock must not leave keys that call into deleted widgets
        self.destroyed.connect(lambda *_: _unbind(viewer, bound))
        self._rewatch()

    # ---- positive / negative clicks ------------------------------------------------------------
    @property
    def positive(self) -> bool:
        """Whether new clicks are positive."""
        return not self.negative.isChecked()

    def _show_polarity(self) -> None:
        positive = self.positive
        colour = POINT_COLOURS[positive]
        self.negative.setText(("+ positive" if positive else "\u2212 negative") + f" {key_hint(POLARITY_KEY)}")
        self.negative.setStyleSheet(f"color: {colour}; font-weight: bold")

    def _on_polarity(self, *_: Any) -> None:
        self._show_polarity()
        self.dock.pickers.point_positive = self.positive
        for layer in self._prompt_layers():
            set_point_polarity(layer, self.positive)

    # ---- live mode -----------------------------------------------------------------------------
    def _prompt_layers(self) -> list[Any]:
        return [
            ly for ly in self.dock.pickers.region_layers if layer_kind(ly) in ("points", "shapes")
        ]

    def _rewatch(self) -> None:
        for layer in self._watched:
            layer.events.data.disconnect(self._on_data)
        self._watched = self._prompt_layers() if self.live.isChecked() else []
        for layer in self._watched:
            layer.events.data.connect(self._on_data)

    def _on_live(self, on: bool) -> None:
        self.dock.settings.live = bool(on)
        self.dock.save_settings()
        self._rewatch()

    def _mask_option(self, text: str, setting: str, tip: str) -> QCheckBox:
        """A remembered `Session.segment` mask option (a `WidgetSettings` bool); the preview follows it."""
        box = QCheckBox(text)
        box.setToolTip(tip)
        box.setChecked(getattr(self.dock.settings, setting))
        box.toggled.connect(lambda on: self._option_changed(setting, on))
        return box

    def _option_changed(self, setting: str, on: bool) -> None:
        setattr(self.dock.settings, setting, bool(on))
        self.dock.save_settings()
        if self.masks:
            self.segment(quiet=True)

    def _on_data(self, *_: Any) -> None:
        self._debounce.start()

    # ---- segment -------------------------------------------------------------------------------
    def segment(self, quiet: bool = False) -> None:
        """Segment the prompts on the shown plane; ``quiet`` (live mode) skips "no prompt" warnings
        and clears the preview instead."""
        if self._worker is not None:
            self._dirty = True
            return
        dock = self.dock
        if dock._worker is not None:
            report_warning("MedPLIB is answering a question; segment when it is done")
            return
        try:
            plane = image_plane(dock.pickers.image_layer, dock.viewer.dims)
            # every prompt on the plane: napari selects each new point, and a click refines the others
            found = collect_regions(
                self._prompt_layers(), plane, dock.viewer.dims, only_selected=False
            ).result
            regions = found.regions
        except ValueError as exc:
            report_error(exc)
            return
        plan = plan_prompts(regions)
        prompts = plan.prompts
        if not prompts and quiet:
            self.masks = []
            if self.preview is not None and self.preview in dock.viewer.layers:
                self.preview.data = np.zeros_like(self.preview.data)
            return
        if plan.negatives_only:
            report_warning(
                f"only negative clicks on this plane: they say what is not the object; press "
                f"{POLARITY_KEY} (or the '\u2212 negative' button) for positive clicks and click the object"
            )
            return
        if not prompts:
            problems = "; ".join(p.message for p in found.problems[:3])
            report_warning(
                f"no prompt on this plane: {problems}" if problems else
                "no prompt on this plane: click '+ Points' or '+ Box / Shapes' and add one"
            )
            return
        for note in plan.notes:
            if note not in self._told:
                self._told.add(note)
                report_warning(note)
        image = dock.pickers.image_layer
        used = prompts_used(self._prompt_layers(), regions)
        dock.with_session(lambda: self._run(plane, image, prompts, used))

    def _run(self, plane: Any, image: Any, prompts: list[dict[str, Any]],
             used: list[tuple[Any, list[int]]] = ()) -> None:
        self._plane, self._image, self._used = plane, image, list(used)
        self._worker = start(
            _segment_all,
            self.dock.session,
            plane,
            prompts,
            self.inside_box.isChecked(),
            self.clicked_only.isChecked(),
            desc="MedPLIB: segmenting",
            on_return=self._show,
            on_finish=self._done,
        )

    def _done(self) -> None:
        self._worker = None
        if self._dirty:
            self._dirty = False
            self.segment(quiet=True)

    def _preview_layer(self, plane: Any) -> Any:
        layer = self.preview
        if (
            layer is None
            or layer not in self.dock.viewer.layers
            or layer.data.shape != plane.spatial_shape
        ):
            image = self._image
            viewer = self.dock.viewer
            with KeepActive(viewer):  # the next click still adds a point
                layer = viewer.add_labels(
                    np.zeros(plane.spatial_shape, dtype=np.int32),
                    name=f"{plane.name} prompt mask",
                    scale=plane.scale or image.scale,
                    translate=image.translate,
                    rotate=image.rotate,
                    shear=image.shear,
                    affine=image.affine,
                    opacity=0.5,
                )
                if image in viewer.layers:  # under the prompts, so the points stay visible
                    viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(image) + 1)
            self.preview = layer
            self.dock.pickers.refresh()
        return layer

    def _show(self, masks: list[np.ndarray]) -> None:
        self.masks = masks
        layer = self._preview_layer(self._plane)
        view = np.zeros(self._plane.plane_shape, dtype=layer.data.dtype)
        for k, mask in enumerate(masks):
            view[mask & (view == 0)] = k + 1
        layer.data[self._plane.index] = view  # our own preview: no undo history needed
        layer.refresh()

    # ---- commit --------------------------------------------------------------------------------
    def commit(self) -> None:
        """Write the preview masks with new ids; a mask that is mostly an existing label is not written
        as a ring around it: the user is told, and with "replace existing labels" that label is redrawn."""
        if not self.masks or not any(m.any() for m in self.masks):
            report_warning("nothing to commit: press Segment first")
            return
        dock = self.dock
        replace = dock.pickers.replace.isChecked()
        index = self._plane.index
        try:
            layer = dock.output_for(self._plane, image_layer=self._image)
            targets = [redraw_target(layer, index, m) if m.any() else None for m in self.masks]
            fresh = [m for m, t in zip(self.masks, targets, strict=True) if t is None]
            again = [(m, t) for m, t in zip(self.masks, targets, strict=True) if t is not None]
            if again and not replace:
                label, share = again[0][1]
                report_warning(
                    f"this object is already label {label} in '{layer.name}' ({share:.0%} of the mask): "
                    "committing would add only a ring around it. Tick 'replace existing labels' and "
                    f"Commit again to redraw label {label} with this mask"
                )
                dock.chat.add_note(
                    f"Not committed: label {label} already covers {share:.0%} of the mask; tick "
                    "'replace existing labels' to redraw it"
                )
                if not fresh:
                    return
            ids, written = write_planes(layer, [(index, fresh)], replace=replace) if fresh else ([], 0)
            redrawn = []
            if replace:
                for mask, (label, _share) in again:
                    written += redraw(layer, index, mask, label)
                    redrawn.append(label)
        except ValueError as exc:
            report_error(exc)
            return
        record_provenance(
            layer,
            provenance_entry(
                question="(direct segmentation)",
                answer=mask_summary(self.masks),
                model=getattr(dock.session, "model_name", "?"),
                image=self._plane.name,
                label_ids=[*ids, *redrawn],
                plane=index,
                mode="segment",
                redrawn=redrawn,
            ),
        )
        parts = []
        if ids:
            parts.append(f"as label{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}")
        if redrawn:
            parts.append(f"redrawing label{'s' if len(redrawn) > 1 else ''} {', '.join(map(str, redrawn))}")
        if not parts:
            report_warning(f"the mask lies on pixels '{layer.name}' already labels; nothing was written")
            return
        dock.chat.add_note(
            f"Committed {mask_summary(self.masks)} {' and '.join(parts)} in '{layer.name}' ({written:,} px)"
        )
        self.masks = []
        if self.preview is not None and self.preview in dock.viewer.layers:
            self.preview.data = np.zeros_like(self.preview.data)
        self._clear_used()

    def _clear_used(self) -> None:
        """Remove the committed object's prompts from the prompt layers the widget made (as micro-sam
        does), so the next click starts a new object instead of refining the committed one."""
        used, self._used = self._used, []
        for layer, indices in used:
            if layer not in self.dock.viewer.layers or not indices:
                continue
            indices = [i for i in indices if i < len(layer.data)]
            mode = layer.mode
            layer.selected_data = set(indices)
            layer.remove_selected()
            if layer.mode != mode:
                layer.mode = mode


def prompts_used(layers: list[Any], regions: Any) -> list[tuple[Any, list[int]]]:
    """(layer, item indices) of the prompts in ``regions`` that lie in prompt layers the widget made
    (`layers.PROMPT_LAYER`); other layers are the user's own and are never changed."""
    out = []
    for layer in layers:
        if not layer.metadata.get(PROMPT_LAYER):
            continue
        indices = sorted({int(r.index) for r in regions if r.source == layer.name and r.index is not None})
        if indices:
            out.append((layer, indices))
    return out


def set_point_polarity(layer: Any, positive: bool) -> None:
    """New points of a prompt Points layer are positive / negative (its ``positive`` feature default).

    Only layers that carry a ``positive`` feature are changed (ours, and files read with one)."""
    if layer_kind(layer) != "points" or "positive" not in getattr(layer, "features", {}):
        return
    defaults = layer.feature_defaults.copy()
    defaults["positive"] = bool(positive)
    layer.feature_defaults = defaults
