"""A fake `Session` that follows the `Session` contract (engine/session.py docstring) with tiny numpy logic (no model).

It normalises the plane with `imaging.to_model_rgb` as the engine does, answers in words, and
"grounds" by thresholding at the mean inside the regions (or the whole plane). ``delay`` sleeps per
streamed token, to test that the widget stays responsive while a slow model runs.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from napari_medplib.imaging import to_model_rgb


@dataclass
class FakeReply:
    text: str
    masks: list
    regions: list
    question: str
    model: str
    finish_reason: str = "eos"
    timings: dict = field(default_factory=dict)
    expert_share: list | None = None
    expert_share_mean: list | None = None


@dataclass
class FakeSegment:
    mask: np.ndarray
    masks: list
    scores: list


class FakeStream:
    def __init__(self, pieces):
        self._pieces = pieces
        self.reply = None

    def __iter__(self):
        self.reply = yield from self._pieces


class FakeSession:
    """Contract-shaped session. ``calls`` records (method, image shape, question, n regions)."""

    model_name = "fake-tiny"
    dtype = "float32"

    def __init__(self, delay: float = 0.0, tokens: int = 0, fail: Exception | None = None):
        self.delay, self.tokens, self.fail = delay, tokens, fail
        self.device = "cpu"
        self.calls: list = []
        self.closed = False
        self._cancel = threading.Event()

    @classmethod
    def load(cls, source=None, device="auto", **_):
        session = cls()
        session.device = "cpu" if device == "auto" else device
        return session

    # ---- contract -----------------------------------------------------------------------------
    def _answer(self, image, question, regions, contrast_limits, rgb):
        if self.closed:
            raise ValueError("session is closed; load it again")
        if self.fail is not None:
            raise self.fail
        grey = to_model_rgb(np.asarray(image), contrast_limits, rgb=rgb).mean(axis=-1)
        named = len(re.findall(r"<region\d*>", question))
        if named != len(regions):
            raise ValueError(f"the question names {named} regions but {len(regions)} were given")
        area = np.zeros(grey.shape, bool)
        for r in regions:
            area |= r.to_mask(grey.shape)
        if not regions:
            area[:] = True
        masks = []
        if re.search(r"segment|ground|outline", question, re.I):
            inside = grey[area]
            masks = [area & (grey > inside.mean())]
            words = "Sure , it is [SEG] ."
        elif regions:
            words = f"The region covers {int(area.sum())} pixels , mean {grey[area].mean():.0f} ."
        else:
            words = f"A {grey.shape[0]} x {grey.shape[1]} image , mean {grey.mean():.0f} ."
        pieces = [w + " " for w in words.split()] + ["."] * self.tokens
        return pieces, masks

    def ask_stream(
        self, image, question, regions=(), *, cancel=None, contrast_limits=None, rgb=None, **_
    ):
        self.calls.append(("ask", np.shape(image), question, len(regions)))
        self._cancel.clear()
        pieces, masks = self._answer(image, question, list(regions), contrast_limits, rgb)

        def gen():
            t0, text, reason = time.perf_counter(), "", "eos"
            for piece in pieces:
                if (cancel is not None and cancel.is_set()) or self._cancel.is_set():
                    reason = "cancelled"
                    break
                if self.delay:
                    time.sleep(self.delay)
                text += piece
                yield piece
            return FakeReply(
                text.strip(),
                masks if reason == "eos" else [],
                list(regions),
                question,
                self.model_name,
                reason,
                {"total": time.perf_counter() - t0},
                [[0.75, 0.25]],
                [0.75, 0.25],
            )

        return FakeStream(gen())

    def ask(self, image, question, regions=(), **kwargs):
        stream = self.ask_stream(image, question, regions, **kwargs)
        for _ in stream:
            pass
        return stream.reply

    def segment(
        self,
        image,
        points=None,
        point_labels=None,
        box=None,
        mask=None,
        multimask=False,
        contrast_limits=None,
        rgb=None,
        clip_to_box=True,
        clicked_pieces=True,
    ):
        self.calls.append(("segment", np.shape(image), box, points))
        self.clip_to_box = clip_to_box
        self.clicked_pieces = clicked_pieces
        grey = to_model_rgb(np.asarray(image), contrast_limits, rgb=rgb).mean(axis=-1)
        area = np.zeros(grey.shape, bool)
        if box is not None:
            y0, x0, y1, x1 = (round(v) for v in box)
            area[y0 : y1 + 1, x0 : x1 + 1] = True
        for (y, x), lab in zip(points or [], point_labels or [], strict=True):
            y, x = round(y), round(x)
            if lab:
                area[max(y - 5, 0) : y + 6, max(x - 5, 0) : x + 6] = True
        out = area & (grey >= grey[area].mean()) if area.any() else area
        return FakeSegment(out, [out], [1.0])

    def cancel(self):
        self._cancel.set()

    def clear_cache(self):
        pass

    def close(self):
        self.closed = True
