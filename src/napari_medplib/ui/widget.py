"""The MedPLIB dock widget: layer pickers, chat, direct segmentation, model settings.

Wiring only: geometry lives in `layers`, label writing in `output`, threads in `workers`, the chat
view in `chat`. The Qt thread gathers inputs (cheap), hands them to a thread worker, and applies
the results when they come back; a session is loaded on first use.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QSize
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .batch_panel import BatchPanel
from .chat import SEG_TOKEN, ChatPane
from .examples import ExampleQuestions
from .layers import (
    ImagePlane,
    KeepActive,
    RegionSet,
    collect_regions,
    fit_to_question,
    image_plane,
)
from .model_panel import ModelPanel
from .output import (
    MaskPixels,
    default_export_path,
    export_provenance,
    new_output_layer,
    output_index,
    provenance_entry,
    record_provenance,
    redraw_target,
    stack_output_problem,
    write_masks,
)
from .pickers import LayerPickers
from .segment import SegmentPanel
from .sessions import forget
from .settings import load_settings, save_settings
from .workers import (
    Answer,
    StackResult,
    ask_job,
    describe_error,
    load_job,
    report_error,
    report_info,
    report_warning,
    stack_job,
    start,
)

#: The width napari opens the dock at (px): a 1280-px window keeps most of its width for the canvas.
DOCK_WIDTH = 370


@dataclass
class _Question:
    """Everything one question needs, captured on the Qt thread when it is asked."""

    text: str
    plane: ImagePlane
    regions: RegionSet
    image_layer: Any
    output: Any | None
    replace: bool
    started: float
    note: str = ""
    stack_axis: int | None = None  # ask on every plane along this axis (None: the shown plane)


def expert_note(reply: Any) -> str:
    """'experts 62/38%' from reply.expert_share_mean, '' when the model has no MoE."""
    share = getattr(reply, "expert_share_mean", None)
    if not share:
        return ""
    return "experts " + "/".join(f"{100 * float(s):.0f}" for s in share) + "%"


def answer_footer(reply: Any) -> str:
    parts = [str(getattr(reply, "model", "") or "")]
    total = (getattr(reply, "timings", None) or {}).get("total")
    if total is not None:
        parts.append(f"{float(total):.1f} s")
    parts.append(expert_note(reply))
    reason = getattr(reply, "finish_reason", "")
    if reason in ("cancelled", "max_new_tokens"):
        parts.append("stopped" if reason == "cancelled" else "cut at max tokens")
    return " · ".join(p for p in parts if p)


def seg_count(text: str) -> int:
    """How many mask tokens an answer's text holds."""
    return len(SEG_TOKEN.findall(html.escape(text or "")))


def no_region_message(layers: list, found: RegionSet) -> str:
    """Why a question that names <region> has no region on this plane, and what to do."""
    start = "the question names <region>, but "
    if not layers:
        return (start + "no region layer is ticked: tick a Points/Shapes layer under Regions or "
                "click '+ Box / Shapes' and draw one")
    problems = found.result.problems
    if problems:
        told = "; ".join(p.message for p in problems[:3]) + ("; ..." if len(problems) > 3 else "")
        return start + told + ": draw the region on the image"
    if found.result.skipped:
        return start + "the ticked regions lie on other planes: draw one on this plane"
    return start + "the ticked layers hold no region (negative points do not count): draw one"


class MedplibWidget(QWidget):
    """Dock widget. ``session`` / ``session_factory`` let scripts and tests bring a model."""

    def __init__(
        self,
        napari_viewer: Any,
        *,
        session: Any | None = None,
        session_factory: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.settings = load_settings()
        self.session: Any | None = None
        self._session_key: tuple | None = None
        self._factory = session_factory
        self._loader = None
        self._after_load: list[Callable[[], None]] = []
        self._worker = None
        self._cancel = threading.Event()
        self.history: list[dict] = []  # every answer, text-only ones too (exported without labels)

        self.pickers = LayerPickers(napari_viewer)
        self.pickers.replace.setChecked(self.settings.replace)
        self.pickers.replace.toggled.connect(self._on_replace)
        self.model_panel = ModelPanel(self.settings)
        self.model_panel.changed.connect(self._on_model_edit)
        self.model_panel.load_requested.connect(lambda: self.with_session(lambda: None, True))
        self.chat = ChatPane()
        self.chat.asked.connect(self.ask)
        self.chat.stopped.connect(self.stop)
        self.examples = ExampleQuestions(self.chat)
        self.stack = QCheckBox("Whole stack, axis")
        self.stack.setToolTip("Ask on every plane along the axis and write a 3-D labels volume")
        self.stack_axis = QSpinBox()
        self.stack_axis.setRange(0, 0)
        self.stack_axis.setMaximumWidth(60)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip(
            "Save the output layer's question/answer log as JSON + Markdown"
        )
        self.export_button.clicked.connect(self.export_log)
        self.segment_panel = SegmentPanel(self)
        self.batch_panel = BatchPanel(self)

        stack_row = QHBoxLayout()
        stack_row.addWidget(self.stack)
        stack_row.addWidget(self.stack_axis)
        stack_row.addStretch(1)
        stack_row.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.pickers)
        layout.addWidget(self.model_panel)
        layout.addWidget(QLabel("<b>Ask</b>"))
        layout.addWidget(self.chat, 1)
        layout.addLayout(stack_row)
        layout.addWidget(QLabel("<b>Segment from prompts</b>"))
        layout.addWidget(self.segment_panel)
        layout.addWidget(self.batch_panel)
        self.pickers.changed.connect(self._sync_stack)
        self._sync_stack()
        self.pickers.changed.connect(lambda: self.examples.update(self.pickers.image_layer))
        self.examples.update(self.pickers.image_layer)
        if session is not None:
            self.set_session(session)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        """At most `DOCK_WIDTH` wide: napari opens the dock at this width, and the canvas keeps the rest."""
        hint = super().sizeHint()
        return QSize(min(hint.width(), max(DOCK_WIDTH, self.minimumSizeHint().width())), hint.height())

    # ---- settings ------------------------------------------------------------------------------
    def save_settings(self) -> None:
        save_settings(self.settings)

    def _on_model_edit(self) -> None:
        self.model_panel.apply_to(self.settings)
        self.save_settings()

    def _on_replace(self, on: bool) -> None:
        self.settings.replace = bool(on)
        self.save_settings()

    def _sync_stack(self) -> None:
        image = self.pickers.image_layer
        lead = 0 if image is None else image.ndim - (1 if image.rgb else 0) - 2
        self.stack.setEnabled(lead > 0)
        self.stack_axis.setEnabled(lead > 0)
        self.stack_axis.setRange(0, max(lead - 1, 0))
        if lead == 0:
            self.stack.setChecked(False)

    # ---- session -------------------------------------------------------------------------------
    def _wanted_key(self) -> tuple:
        return (self.settings.model_source, self.settings.device, self.settings.llm_weights)

    def set_session(self, session: Any) -> None:
        """Use an already loaded session (scripts, tests); features its family lacks are disabled, with why."""
        self.session = session
        self._session_key = self._wanted_key()
        self.model_panel.status.setText(self._session_text(session))
        family = getattr(session, "family", None)
        no_masks = family.lacks("masks") if family is not None else None
        self.segment_panel.setEnabled(no_masks is None)
        self.segment_panel.setToolTip(no_masks or "")
        if no_masks:
            self.chat.add_note(no_masks)

    @staticmethod
    def _session_text(session: Any) -> str:
        family = getattr(session, "family", None)
        kind = f" ({family.name})" if family is not None else ""
        return f"{getattr(session, 'model_name', 'model')}{kind} on {getattr(session, 'device', '?')}"

    def with_session(self, then: Callable[[], None], reload: bool = False) -> None:
        """Run ``then`` with a loaded session, loading it in a worker first if needed."""
        if self.session is not None and self._session_key == self._wanted_key() and not reload:
            then()
            return
        self._after_load.append(then)
        if self._loader is not None:
            return
        source, device, llm_weights = self._wanted_key()
        self.model_panel.status.setText("loading…")
        self.chat.set_busy(True)
        self._load_note = self.chat.add_note("Loading the model…")
        self._loader = start(
            load_job,
            source,
            device,
            self._factory,
            llm_weights=llm_weights,
            desc="MedPLIB: loading model",
            on_yield=self._on_load_progress,
            on_return=self._on_loaded,
            on_error=self._on_load_error,
            on_finish=self._on_load_finished,
        )

    def _on_load_progress(self, line: str) -> None:
        self.model_panel.status.setText(line)
        self._load_note.text = f"Loading the model: {line}"
        self.chat.render()

    def _on_loaded(self, session: Any) -> None:
        old = self.session
        self.set_session(session)
        self._load_note.text = f"Model loaded: {self._session_text(session)}"
        self.chat.render()
        if old is not None and old is not session:
            forget(old)  # free the old model (the function widget then loads the new choice)
            if hasattr(old, "close"):
                old.close()

    def _on_load_error(self, exc: BaseException) -> None:
        self._after_load.clear()
        self._load_note.text = "The model did not load: " + describe_error(exc)
        self.chat.render()
        self.model_panel.status.setText("not loaded: " + describe_error(exc))
        self.model_panel.expand(animate=False)
        report_error(exc)

    def _on_load_finished(self) -> None:
        self._loader = None
        self.chat.set_busy(self._worker is not None)
        pending, self._after_load = self._after_load, []
        if self.session is not None:
            for then in pending:
                then()

    # ---- asking --------------------------------------------------------------------------------
    def _gather(self, text: str) -> _Question | None:
        """Read the layers on the Qt thread; problems become notifications and return None."""
        try:
            plane = image_plane(self.pickers.image_layer, self.viewer.dims)
            uses_regions = "<region" in text
            layers = self.pickers.region_layers if uses_regions else []
            found = collect_regions(layers, plane, self.viewer.dims, positive_only=True)
            regions, note = fit_to_question(found, text)
            output = self.pickers.output_layer
            if output is not None:
                output_index(output, plane.index, plane.plane_shape)
        except ValueError as exc:
            report_error(exc)
            return None
        if uses_regions and not regions.regions:
            report_warning(no_region_message(layers, found))
            return None
        if regions.result.problems:
            report_warning("regions: " + regions.result.summary())
        axis = int(self.stack_axis.value()) if self.stack.isChecked() and self.stack.isEnabled() else None
        if axis is not None and (problem := stack_output_problem(output, plane, axis)):
            report_warning(f"Whole stack: {problem}")
            return None
        return _Question(
            text,
            plane,
            regions,
            self.pickers.image_layer,
            output,
            self.pickers.replace.isChecked(),
            time.perf_counter(),
            note,
            axis,
        )

    @property
    def busy(self) -> bool:
        """A question or a direct segmentation is running."""
        return self._worker is not None or self.segment_panel._worker is not None

    def ask(self, text: str) -> None:
        """Ask ``text`` about the shown plane (or the whole stack) in a worker thread."""
        if self.busy:
            report_warning("MedPLIB is still working; wait for it or press Stop")
            return
        question = self._gather(text)
        if question is None:
            self.chat.keep_input()  # the typed question stays, to be fixed and sent again
            return
        swatches = [
            (f"{r.describe()}", c)
            for r, c in zip(question.regions.regions, question.regions.colours, strict=True)
        ]
        self.chat.add_question(text, swatches)
        if question.note:
            self.chat.add_note(question.note)
        self.with_session(lambda: self._run(question))

    def _run(self, q: _Question) -> None:
        self._cancel = threading.Event()
        self.chat.set_busy(True)
        options = {
            "max_new_tokens": self.settings.max_new_tokens,
            "temperature": self.settings.temperature,
        }
        common = {
            "on_error": self._on_ask_error,
            "on_finish": self._on_ask_finished,
        }
        if q.stack_axis is not None:
            axis = q.stack_axis
            self.chat.add_note(f"Asking on every plane along axis {axis}…")
            self._worker = start(
                stack_job,
                self.session,
                q.plane,
                axis,
                q.text,
                q.regions.regions,
                self._cancel,
                options,
                desc="MedPLIB: whole stack",
                total=q.plane.spatial_shape[axis],
                on_return=lambda result: self._on_stack(q, result),
                **common,
            )
        else:
            self.chat.start_answer()
            self._worker = start(
                ask_job,
                self.session,
                q.plane,
                q.text,
                q.regions.regions,
                self._cancel,
                options,
                desc="MedPLIB: answering",
                on_yield=self.chat.append_text,
                on_return=lambda answer: self._on_answer(q, answer),
                **common,
            )

    def stop(self) -> None:
        """Stop the answer being written; while the model loads, drop what waits for it."""
        self._cancel.set()
        if self._loader is not None and self._after_load:
            self._after_load.clear()
            self.chat.add_note(
                "Stopped: nothing will run when the model has loaded (it keeps loading, so the "
                "next question starts at once)"
            )
        if self.session is not None and hasattr(self.session, "cancel"):
            self.session.cancel()

    def _on_ask_error(self, exc: BaseException) -> None:
        self.chat.abort_answer("error")
        self.chat.add_note(describe_error(exc))
        report_error(exc)

    def _on_ask_finished(self) -> None:
        self._worker = None
        self.chat.set_busy(self._loader is not None)

    def output_for(
        self, plane: ImagePlane, chosen: Any | None = None, image_layer: Any | None = None
    ) -> Any:
        """The output Labels layer (made on first use and then kept as the choice).

        ``image_layer`` is the layer the masks came from (it may have left the viewer meanwhile).
        """
        layer = chosen if chosen is not None else self.pickers.output_layer
        if layer is None or layer not in self.viewer.layers:
            image = image_layer if image_layer is not None else self.pickers.image_layer
            with KeepActive(self.viewer):  # the prompt layer stays active, in its mode
                layer = new_output_layer(self.viewer, image, plane)
            self.pickers.set_output(layer)
        return layer

    def _write(self, q: _Question, planes: list, reply: Any, objects: Any = None) -> tuple[str, list[str]]:
        """Write masks + provenance; return (the transcript note, what each mask became).

        ``objects`` (`workers.Answer.objects`): one plane's objects, written one id each with their
        table in ``layer.features``."""
        masks = [m for _, ms in planes for m in ms if m.size]
        n_masks = max((len(ms) for _, ms in planes), default=0)
        entry = provenance_entry(
            question=q.text,
            answer=getattr(reply, "text", ""),
            model=getattr(reply, "model", "") or getattr(self.session, "model_name", ""),
            image=q.plane.name,
            regions=[r.describe() for r in q.regions.regions],
            plane=q.plane.index if len(planes) == 1 else (),
            planes=len(planes),
            finish_reason=getattr(reply, "finish_reason", ""),
            expert_share_mean=getattr(reply, "expert_share_mean", None),
        )
        self.history.append(entry)
        if objects is not None and not masks:  # a how-many answer: the objects it counted, no <SEG> of its own
            masks = [m for m in objects[0] if m.size]
        if not masks:
            if n_masks or seg_count(getattr(reply, "text", "")):
                return ("the mask is empty: the model outlined nothing here, so nothing was written",
                        ["empty mask"] * max(n_masks, 1))
            return "", []
        layer = self.output_for(q.plane, q.output, q.image_layer)
        if objects is not None:
            from .instances_output import append_features, table_rows_for

            pixels, tables = objects
            ids, written = write_masks(layer, [(q.plane.index, pixels)], replace=q.replace)
            append_features(layer, table_rows_for(ids, tables, q.plane.name, q.text))
            marks = [f"objects in '{layer.name}'"] * n_masks if ids else []
        else:
            again = {}  # mask k -> the label that already covers most of it (no ring around it)
            if not q.replace and len(planes) == 1:
                index, plane_masks = planes[0]
                again = {k: t[0] for k, m in enumerate(plane_masks) if m.size
                         and (t := redraw_target(layer, index, m)) is not None}
                planes = [(index, [m if k not in again else MaskPixels(m.shape, m.rows[:0], m.cols[:0])
                                   for k, m in enumerate(plane_masks)])]
            ids, written = write_masks(layer, planes, replace=q.replace)
            marks = [f"label {ids[k]} in '{layer.name}'" if k in ids else
                     f"already label {again[k]}" if k in again else "empty mask" for k in range(n_masks)]
            if again and not ids:
                entry["label_ids"], entry["labels_layer"] = [], layer.name
                record_provenance(layer, entry)
                found = ", ".join(str(v) for v in sorted(set(again.values())))
                return (f"already labelled: label {found} in '{layer.name}' covers the mask, so nothing "
                        "was written; tick 'replace existing labels' to overwrite it", marks)
        labels = [ids[k] for k in sorted(ids)]
        entry["label_ids"] = labels
        entry["labels_layer"] = layer.name
        record_provenance(layer, entry)
        if not labels:
            return (f"the masks lie on pixels '{layer.name}' already labels, so nothing was written; "
                    "tick 'replace existing labels' to overwrite them", ["already labelled"] * n_masks)
        if objects is not None and len(labels) > 1:
            note = f"wrote {len(labels)} objects (labels {labels[0]}-{labels[-1]}) to '{layer.name}' ({written:,} px)"
        else:
            note = (f"wrote label{'s' if len(labels) > 1 else ''} {', '.join(map(str, labels))} to "
                    f"'{layer.name}' ({written:,} px)")
        return note, marks

    def _on_answer(self, q: _Question, answer: Answer) -> None:
        reply = answer.reply
        objects = getattr(answer, "objects", None)
        marks: list[str] = []
        try:
            note, marks = self._write(q, [(q.plane.index, answer.pixels)], reply, objects)
        except ValueError as exc:
            report_error(exc)
            note = describe_error(exc)
        footer = " · ".join(p for p in (answer_footer(reply), note) if p)
        self.chat.finish_answer(reply.text, footer, marks)
        if note.startswith("the mask is empty"):
            report_info("MedPLIB: " + note)
        from .instances_output import declined_note, measured_note

        if measured := measured_note(reply):
            self.chat.add_note(measured)
        if declined := declined_note(reply):
            self.chat.add_note(declined)

    def _on_stack(self, q: _Question, result: StackResult) -> None:
        planes = [(index, answer.pixels) for index, answer in result.planes]
        if getattr(result, "objects", None) is not None:  # objects linked across planes: one id each
            planes = result.objects
        current = next((a.reply for i, a in result.planes if i == q.plane.index), None)
        shown = current or (result.planes[0][1].reply if result.planes else None)
        marks: list[str] = []
        try:
            note, marks = self._write(q, planes, shown)
        except ValueError as exc:
            report_error(exc)
            note = describe_error(exc)
        done = f"{len(result.planes)} planes along axis {result.axis}"
        done += " (stopped)" if result.cancelled else ""
        text = shown.text if shown is not None else ""
        count = sum(1 for _, ms in planes for m in ms if m.size)
        found = f"masks on {sum(1 for _, ms in planes if any(m.size for m in ms))} planes"
        if getattr(result, "labels", None) is not None and count:
            found += f", {int(result.labels.max())} objects linked across planes"
        self.chat.finish_answer(
            text, " · ".join(p for p in (done, found if count else "no mask", note) if p), marks
        )

    # ---- export --------------------------------------------------------------------------------
    def export_log(self, path: str | None = None) -> list:
        """Save the output layer's log (else this widget's answers) as JSON + Markdown."""
        layer = self.pickers.output_layer
        entries = layer.metadata.get("medplib") if layer is not None else None
        if not entries:
            entries, layer = self.history, None
        if not entries:
            report_warning("no MedPLIB answers to export yet")
            return []
        if path is None:
            from pathlib import Path

            from qtpy.QtWidgets import QFileDialog

            start = default_export_path(layer) if layer is not None else Path.cwd() / "medplib"
            path, _ = QFileDialog.getSaveFileName(
                self, "Export MedPLIB log", str(start), "JSON (*.json)"
            )
            if not path:
                return []
        try:
            paths = export_provenance(entries, path)
        except OSError as exc:
            report_error(exc)
            return []
        report_info("saved " + " and ".join(str(p) for p in paths))
        return paths
