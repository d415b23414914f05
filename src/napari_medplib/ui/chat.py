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

from qtpy.QtCore import QPoint, QRect, QSize, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..suggested_questions import DESCRIBE, MODALITY, REGION

GROUND_PREFIX = "Please segment the "
ASK_REGION = REGION

#: The most example questions shown under the chat (`ChatPane.set_examples`).
MAX_EXAMPLES = 3
#: The input's placeholder before an image is picked: a trained wording, like every example.
DEFAULT_EXAMPLE = MODALITY


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


class FlowLayout(QLayout):
    """Lays its widgets out left to right and wraps them onto the next line (the example chips: three
    questions do not fit side by side in a narrow dock). Hidden widgets take no room."""

    def __init__(self, parent: QWidget | None = None, spacing: int = 4) -> None:
        super().__init__(parent)
        self._items: list = []
        self.setSpacing(spacing)
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int):
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int):
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._arrange(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._arrange(rect, move=True)

    def sizeHint(self) -> QSize:
        return self.minimumSize()

    def minimumSize(self) -> QSize:
        size = QSize()
        for item in self._items:
            if not item.isEmpty():
                size = size.expandedTo(item.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _arrange(self, rect: QRect, move: bool) -> int:
        """Place the items in ``rect`` (when ``move``); return the height they need."""
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        x, y, line, gap = area.x(), area.y(), 0, self.spacing()
        for item in self._items:
            if item.isEmpty():
                continue
            hint = item.sizeHint()
            if x > area.x() and x + hint.width() > area.right() + 1:  # wrap onto the next line
                x, y, line = area.x(), y + line + gap, 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + gap
            line = max(line, hint.height())
        return y + line - rect.y() + m.bottom()


class ChatPane(QWidget):
    """Transcript + input line + Send / Stop / Clear + quick actions + example questions.

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
        self.input.setToolTip("Type a question about the image and press Enter")
        self.input.setPlaceholderText(f"e.g. {DEFAULT_EXAMPLE}")
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
        self.describe_button.setToolTip(f"Ask \"{DESCRIBE}\" about the shown image plane")
        self.describe_button.clicked.connect(lambda: self.ask(DESCRIBE))
        self.ground_button = QPushButton("Ground…")
        self.ground_button.setToolTip("Start a question that asks for a mask: name the structure")
        self.ground_button.clicked.connect(self.start_grounding)
        self.region_button = QPushButton("Ask about region")
        self.region_button.setToolTip("Ask \"What is in <region>?\" about the selected (or all) shapes/points")
        self.region_button.clicked.connect(lambda: self.ask(ASK_REGION))

        # example questions for the current image, in the wordings the model was trained on
        self.examples = QWidget()
        self.examples.setToolTip("Questions the model answers well for this kind of image")
        flow = FlowLayout(self.examples)
        self.examples_label = QLabel("<span style='color:gray'>Try:</span>")
        flow.addWidget(self.examples_label)
        self.example_buttons: list[QPushButton] = []
        for _ in range(MAX_EXAMPLES):
            button = QPushButton()
            button.setToolTip("Put this question in the box above (Enter sends it)")
            button.clicked.connect(lambda _=False, b=button: self.use_example(b.text()))
            button.setVisible(False)
            flow.addWidget(button)
            self.example_buttons.append(button)
        self.examples.setVisible(False)

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
        layout.addWidget(self.examples)

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

    def set_examples(self, questions: Sequence[str]) -> None:
        """Show ``questions`` (at most `MAX_EXAMPLES`) as clickable chips under the input, and use the
        shortest that is not a description (the first of equals) as the input's placeholder, so that it fits
        the narrow input; none: no chips."""
        questions = list(questions)[:MAX_EXAMPLES]
        for button, question in itertools.zip_longest(self.example_buttons, questions):
            if button is None:
                break
            button.setText(question or "")
            button.setVisible(question is not None)
        self.examples.setVisible(bool(questions))
        shown = [q for q in questions if q != DESCRIBE] or questions or [DEFAULT_EXAMPLE]
        self.input.setPlaceholderText(f"e.g. {min(shown, key=len)}")

    @property
    def example_questions(self) -> list[str]:
        """The example questions shown now."""
        return [b.text() for b in self.example_buttons if not b.isHidden()] if not self.examples.isHidden() else []

    def use_example(self, question: str) -> None:
        """Put ``question`` in the input, ready to be edited or sent with Enter."""
        self.input.setText(question)
        self.input.setFocus(Qt.FocusReason.OtherFocusReason)
        self.input.end(False)

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
