"""The collapsible "Model" section: source (bundled / folder / server), device, LLM weights, generation
settings.

"Server" uses the model of a ``medplib serve`` server (URL + token): the URL is remembered with the
other settings, the token only in its own user-only file (`settings.save_server_token`).
"""

from __future__ import annotations

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)
from superqt import QCollapsible

from .settings import DEVICES, LLM_WEIGHTS, WidgetSettings, load_server_token, save_server_token


class ModelPanel(QCollapsible):
    """Model source, device, max tokens and temperature; ``changed`` fires on every edit.

    ``load_requested`` asks the dock to (re)load the model with the current choice.
    """

    changed = Signal()
    load_requested = Signal()

    def __init__(self, settings: WidgetSettings, parent: QWidget | None = None) -> None:
        super().__init__("Model settings", parent)
        body = QWidget()
        form = QFormLayout(body)
        self.source = QComboBox()
        self.source.addItem("Bundled model", "bundled")
        self.source.addItem("Model folder…", "folder")
        self.source.addItem("Server…", "server")
        self.source.setToolTip("Which MedPLIB model to use; a folder holds a released or own model, a server "
                               "(medplib serve) runs one on another machine's GPU")
        self.folder = QLineEdit(settings.folder)
        self.folder.setPlaceholderText("path/to/model folder")
        self.browse = QPushButton("Browse…")
        self.browse.clicked.connect(self._browse)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder, 1)
        folder_row.addWidget(self.browse)
        self.server_url = QLineEdit(settings.server_url)
        self.server_url.setPlaceholderText("http://gpu-machine:8765")
        self.server_url.setToolTip("Address of a `medplib serve` server (https:// behind a reverse proxy)")
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("token the server printed")
        self.token.setToolTip("Kept in a user-only file, never in the settings or layer metadata")
        self.device = QComboBox()
        self.device.addItems(list(DEVICES))
        self.device.setToolTip("auto: a GPU when there is one, else the CPU")
        self.llm_weights = QComboBox()
        for value, label in zip(LLM_WEIGHTS, ("full precision", "int8 (half the memory)")):
            self.llm_weights.addItem(label, value)
        self.llm_weights.setToolTip("int8: the language model's weights quantised to 8 bits as it loads (MedPLIB "
                                    "models), so a 7B model fits a 16-24 GB GPU; answers may differ slightly")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setToolTip("Longest answer, in tokens")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setToolTip("0 = always the most likely answer (reproducible)")
        for spin in (self.max_tokens, self.temperature):  # numbers, not a line of text: keep the dock narrow
            spin.setMaximumWidth(90)
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load now (otherwise it loads on the first question)")
        self.load_button.clicked.connect(self.load_requested.emit)
        self.status = QLabel("not loaded")
        self.status.setWordWrap(True)
        form.addRow("Source", self.source)
        form.addRow("Folder", folder_row)
        form.addRow("Server", self.server_url)
        form.addRow("Token", self.token)
        form.addRow("Device", self.device)
        form.addRow("LLM weights", self.llm_weights)
        form.addRow("Max tokens", self.max_tokens)
        form.addRow("Temperature", self.temperature)
        form.addRow(self.load_button, self.status)
        self.addWidget(body)
        self.set_settings(settings)
        for signal in (
            self.source.currentIndexChanged,
            self.folder.editingFinished,
            self.server_url.editingFinished,
            self.device.currentIndexChanged,
            self.llm_weights.currentIndexChanged,
            self.max_tokens.valueChanged,
            self.temperature.valueChanged,
        ):
            signal.connect(self._on_edit)
        self.token.editingFinished.connect(self._on_token)

    def set_settings(self, s: WidgetSettings) -> None:
        self.source.setCurrentIndex(max(self.source.findData(s.source), 0))
        self.folder.setText(s.folder)
        self.server_url.setText(s.server_url)
        self.token.setText(load_server_token() or "")
        self.device.setCurrentText(s.device)
        self.llm_weights.setCurrentIndex(max(self.llm_weights.findData(s.llm_weights), 0))
        self.max_tokens.setValue(int(s.max_new_tokens))
        self.temperature.setValue(float(s.temperature))
        self._sync()

    def show_saved(self, s: WidgetSettings, note: str = "") -> None:
        """Show settings another widget already saved, without emitting ``changed`` (a half-updated
        form would otherwise be saved over them); ``note`` replaces the status line."""
        blocked = self.blockSignals(True)
        try:
            self.set_settings(s)
        finally:
            self.blockSignals(blocked)
        if note:
            self.status.setText(note)

    def apply_to(self, s: WidgetSettings) -> WidgetSettings:
        s.source = self.source.currentData()
        s.folder = self.folder.text().strip()
        s.server_url = self.server_url.text().strip().rstrip("/")
        s.device = self.device.currentText()
        s.llm_weights = self.llm_weights.currentData()
        s.max_new_tokens = int(self.max_tokens.value())
        s.temperature = float(self.temperature.value())
        return s

    def _sync(self) -> None:
        use_folder = self.source.currentData() == "folder"
        self.folder.setEnabled(use_folder)
        self.browse.setEnabled(use_folder)
        use_server = self.source.currentData() == "server"
        self.server_url.setEnabled(use_server)
        self.token.setEnabled(use_server)
        self.device.setEnabled(not use_server)  # the server chose its device and weights
        self.llm_weights.setEnabled(not use_server)

    def _on_edit(self, *_: object) -> None:
        self._sync()
        self.changed.emit()

    def _on_token(self) -> None:
        """Store the token in its own 0600 file (not the settings), then reconnect like any edit."""
        if self.token.text().strip() != (load_server_token() or ""):
            save_server_token(self.token.text())
            self._on_edit()

    def _browse(self) -> None:  # a file dialog: only on a click, never in tested paths
        folder = QFileDialog.getExistingDirectory(self, "MedPLIB model folder", self.folder.text())
        if folder:
            self.folder.setText(folder)
            self._on_edit()
