"""Save screenshots of the docked MedPLIB widget after a grounded answer, for the README.

    xvfb-run -a python scripts/screenshot_widget.py [--demo] [--out docs/images]

Opens the sample (synthetic nuclei + regions), docks the widget, asks for a description (the Describe
button's question) and to segment the nuclei (grounding), and saves ``widget.png`` (the napari window) and
``widget_panel.png`` (the dock alone). It uses the bundled model when one loads; otherwise, or with
``--demo``, a stand-in session that thresholds inside the region, named "demo (no model)" in the
transcript so the picture never passes for a model's answer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


class DemoSession:
    """Stand-in with the Session contract: threshold inside the regions, canned words."""

    model_name = "demo (no model)"
    device = "cpu"

    def __init__(self) -> None:
        self.cancelled = False

    def _answer(self, image, question, regions):
        from napari_medplib.imaging import to_model_rgb

        grey = to_model_rgb(np.asarray(image)).mean(axis=-1)
        area = np.zeros(grey.shape, bool)
        for region in regions:
            area |= region.to_mask(grey.shape)
        if not regions:
            area[:] = True
        if "segment" in question.lower():
            mask = area & (grey > np.percentile(grey[area], 60))
            return "Sure, the nucleus is [SEG].", [mask]
        return (
            "A fluorescence microscopy image of round nuclei on a dark background; "
            "several nuclei touch each other."
        ), []

    def ask_stream(self, image, question, regions=(), **_):
        text, masks = self._answer(image, question, list(regions))
        outer = self

        class Stream:
            reply = None

            def __iter__(self):
                for word in text.split(" "):
                    time.sleep(0.01)
                    yield word + " "
                self.reply = type(
                    "Reply",
                    (),
                    {
                        "text": text,
                        "masks": masks,
                        "model": outer.model_name,
                        "finish_reason": "eos",
                        "timings": {"total": 0.4},
                        "expert_share_mean": [0.62, 0.38],
                        "regions": list(regions),
                    },
                )()

        return Stream()

    def ask(self, image, question, regions=(), **kw):
        stream = self.ask_stream(image, question, regions, **kw)
        for _ in stream:
            pass
        return stream.reply

    def cancel(self) -> None:
        self.cancelled = True


def _wait(app, done, timeout=120.0) -> None:
    end = time.monotonic() + timeout
    while not done() and time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="use the stand-in session")
    parser.add_argument("--out", default="docs/images", help="folder for the PNGs")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medplib.ui.chat import DESCRIBE

    viewer = napari.Viewer(title="napari-medplib")
    viewer.window.resize(1500, 900)
    viewer.open_sample("napari-medplib", "nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-medplib", "MedPLIB")
    app = QApplication.instance()
    if args.demo:
        widget.set_session(DemoSession())
    else:
        widget.with_session(lambda: None)
        _wait(app, lambda: widget._loader is None)
        if widget.session is None:
            print("no model could be loaded; using the demo session (see --demo)")
            widget.set_session(DemoSession())
    widget.chat.ask(DESCRIBE)  # what the Describe button asks
    _wait(app, lambda: widget._worker is None)
    widget.chat.ask("Please segment the nuclei.")
    _wait(app, lambda: widget._worker is None)
    viewer.layers.selection.active = viewer.layers["nuclei regions"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out / "widget.png"), canvas_only=False)
    widget.grab().save(str(out / "widget_panel.png"))
    print(f"saved {out / 'widget.png'} and {out / 'widget_panel.png'}")
    viewer.close()


if __name__ == "__main__":
    main()
