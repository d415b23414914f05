"""The chat pane: transcript (questions, streamed answers, region swatches, notes) and input.

The transcript is a list of `ChatEntry` rendered to HTML in a QTextBrowser. Streamed pieces are
appended to the last answer and the view is re-rendered at most every 50 ms, so a fast token stream
costs the Qt thread almost nothing.
"""

from __future__ import annotations

import html
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

DESCRIBE = "Describe this image in a few words."
GROUND_PREFIX = "Please segment the "
ASK_REGION = "What is in <region>?"


@dataclass
class ChatEntry:
    """One transcript item: role "user" | "assistant" | "note"."""

    role: str
    text: str
    swatches: list[tuple[str, str]] = field(default_factory=list)  # (label, "#rrggbb")
    footer: str = ""
    done: bool = True
    #: what each ``<SEG>`` of an answer became, in order ("label 3 in 'cells MedPLIB'", "empty mask")
    marks: list[str] = field(default_factory=list)


#: The model's mask token as it appears in answer text (the tokenizer's ``<SEG>``; ``[SEG]`` in some
#: checkpoints' detokenized text); escaped, as `render_entry` sees it.
SEG_TOKEN = re.compile(r"&lt;SEG&gt;|\[SEG\]")


def mask_marker(text: str) -> str:
    """HTML for one mask marker (what a ``<SEG>`` became); never the raw token."""
    colour = "#999999" if "empty" in text else "#33aa66"
    return f"<b style='color:{colour}'>[&#9635; {html.escape(text)}]</b>"


def with_markers(body: str, marks: Sequence[str]) -> str:
    """Escaped answer text with the k-th mask token replaced by ``marks[k]`` ("mask" when unknown)."""
    count = itertools.count()

    def one(_: re.Match) -> str:
        k = next(count)
        return mask_marker(marks[k] if k < len(marks) else f"mask {k + 1}")

    return SEG_TOKEN.sub(one, body)


def _swatch(label: str, colour: str) -> str:
    return (
        f'<span style="color:{colour}; font-size:large">&#9632;</span>'
        f'<span style="color:gray">{html.escape(label)}</span>'
    )


def render_entry(entry: ChatEntry) -> str:
    """HTML for one entry (plain text escaped; newlines kept)."""
    body = html.escape(entry.text).replace("\n", "<br>")
    if entry.role == "user":
        head = "<b>You</b>"
        if entry.swatches:
            head += " &nbsp;" + " ".join(_swatch(label, c) for label, c in entry.swatches)
        return f"<p>{head}<br>{body}</p>"
    if entry.role == "assistant":
        body = with_markers(body, entry.marks)
        cursor = "" if entry.done else " <span style='color:gray'>&#9646;</span>"
        foot = (
            f"<br><span style='color:gray; font-size:small'>{html.escape(entry.footer)}</span>"
            if entry.footer
            else ""
        )
        return f"<p><b>MedPLIB</b><br>{body}{cursor}{foot}</p>"
    return f"<p style='color:gray'><i>{body}</i></p>"


class ChatPane(QWidget):
    """Transcript + input line + Send / Stop / Clear + quick actions.

    Signals: ``asked(str)`` when the user sends a question; ``stopped`` and ``cleared``.
    """

    asked = Signal(str)
    stopped = Signal()
    cleared = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.entries: list[ChatEntry] = []
        self._keep = False
        self.transcript = QTextBrowser()
        self.transcript.setOpenExternalLinks(False)
        self.transcript.setMinimumHeight(160)
        self.transcript.setPlaceholderText(
            "Ask about the image. Draw a box or points and refer to it as <region>."
        )
        self.input = QLineEdit()
        self.input.setPlaceholderText("Question (Enter to send), e.g. What is in <region>?")
        self.input.setClearButtonEnabled(True)
        self.input.returnPressed.connect(self.send)
        self.send_button = QPushButton("Send")
        self.send_button.setToolTip("Ask the question (Enter)")
        self.send_button.clicked.connect(self.send)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the answer being written")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stopped.emit)
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Clear the transcript (labels and their log stay)")
        self.clear_button.clicked.connect(self.clear)

        self.describe_button = QPushButton("Describe")
        self.describe_button.setToolTip("Ask for a description of the shown image plane")
        self.describe_button.clicked.connect(lambda: self.ask(DESCRIBE))
        self.ground_button = QPushButton("Ground…")
        self.ground_button.setToolTip("Start a question that asks for a mask: name the structure")
        self.ground_button.clicked.connect(self.start_grounding)
        self.region_button = QPushButton("Ask about region")
        self.region_button.setToolTip("Ask \"What is in <region>?\" about the selected (or all) shapes/points")
        self.region_button.clicked.connect(lambda: self.ask(ASK_REGION))

        quick = QHBoxLayout()
        for b in (self.describe_button, self.ground_button, self.region_button):
            quick.addWidget(b)
        row = QHBoxLayout()
        row.addWidget(self.input, 1)
        for b in (self.send_button, self.stop_button, self.clear_button):
            row.addWidget(b)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.transcript, 1)
        layout.addLayout(quick)
        layout.addLayout(row)

        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(50)
        self._render_timer.timeout.connect(self.render)

    # ---- input ---------------------------------------------------------------------------------
    def send(self) -> None:
        """Emit the typed question; the input is cleared unless a receiver calls `keep_input` (a question
        that cannot be asked stays there to be fixed)."""
        text = self.input.text().strip()
        if text and self.send_button.isEnabled():
            self._keep = False
            self.asked.emit(text)
            if not self._keep:
                self.input.clear()

    def keep_input(self) -> None:
        """Called by a receiver of ``asked`` that refused the question: the typed text stays."""
        self._keep = True

    def ask(self, question: str) -> None:
        """Send ``question`` as if typed (quick actions)."""
        if self.send_button.isEnabled():
            self.asked.emit(question)

    def start_grounding(self) -> None:
        self.input.setText(GROUND_PREFIX)
        self.input.setFocus(Qt.FocusReason.OtherFocusReason)
        self.input.end(False)

    def set_busy(self, busy: bool) -> None:
        """While busy, sending is off and Stop is on."""
        for b in (self.send_button, self.describe_button, self.ground_button, self.region_button):
            b.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    # ---- transcript ----------------------------------------------------------------------------
    def add_question(self, text: str, swatches: Sequence[tuple[str, str]] = ()) -> ChatEntry:
        return self._add(ChatEntry("user", text, list(swatches)))

    def start_answer(self) -> ChatEntry:
        return self._add(ChatEntry("assistant", "", done=False))

    def append_text(self, piece: str) -> None:
        """Add a streamed piece to the answer being written (re-rendered at most every 50 ms)."""
        entry = self._open_answer() or self.start_answer()
        entry.text += piece
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _open_answer(self) -> ChatEntry | None:
        return next(
            (e for e in reversed(self.entries) if e.role == "assistant" and not e.done), None
        )

    def finish_answer(self, text: str | None = None, footer: str = "", marks: Sequence[str] = ()) -> None:
        """Complete the answer being written (or add one, for answers that were not streamed); ``marks``
        name what each mask token became."""
        entry = self._open_answer() or self.start_answer()
        if text is not None:
            entry.text = text
        entry.footer, entry.done, entry.marks = footer, True, list(marks)
        self.render()

    def abort_answer(self, footer: str) -> None:
        """Close the answer being written, if any, with ``footer`` (errors)."""
        entry = self._open_answer()
        if entry is not None:
            entry.footer, entry.done = footer, True
            self.render()

    def add_note(self, text: str) -> ChatEntry:
        return self._add(ChatEntry("note", text))

    def clear(self) -> None:
        self.entries.clear()
        self.render()
        self.cleared.emit()

    def _add(self, entry: ChatEntry) -> ChatEntry:
        self.entries.append(entry)
        self.render()
        return entry

    def render(self) -> None:
        self._render_timer.stop()
        self.transcript.setHtml("".join(render_entry(e) for e in self.entries))
        bar = self.transcript.verticalScrollBar()
        bar.setValue(bar.maximum())

    def plain_text(self) -> str:
        return self.transcript.toPlainText()
