"""MeCoVQA-style conversations built from instance masks by templates.

The paper builds MeCoVQA-G "by specifying question templates combined with mask category labels"; we do
the same for all three tasks, because templates give answers that are exactly right for the masks:

* ``grounding`` — "Please segment the nuclei." -> "It is <SEG>." (target = union of the category's
  instances, kind ``semantic``); "Please segment the nucleus in <region>." -> "It is <SEG>." (target =
  the one instance the box/point was drawn on, kind ``instance``); two categories in one question with
  two ``<SEG>`` (kind ``multi``). ``<SEG>`` is written as the reference's data files write it.
* ``region_vqa`` — about one ``<region>`` (box, point or instance mask): ``category`` (or
  "background"), ``count`` (objects inside a box), ``size``, ``shape``, ``position``, ``intensity``.
  A box stands for an instance only when it is unambiguous (see `_Ctx.region`); else a point/mask.
* ``vqa`` — image level: ``modality``, ``description``, ``count``, ``presence``.

Questions hold ``<region>`` placeholders (one per entry of ``regions``, in order); ``<image>`` is not
written, the engine adds it. VQA answers are the short canonical answer itself, so accuracy is
``normalise_answer(prediction) == normalise_answer(conversation.canonical)``.

Attribute definitions (what the answers mean; the thresholds leave a gap, and objects inside the gap
are never asked about, so no answer is a coin toss):

* count inside a box: instances with >= 50 % of their pixels in the box; boxes that cut an instance
  between 20 % and 80 % are redrawn (up to 30 times) so the count is unambiguous; counts (in a box
  or in the image) above ``max_count`` (default 25) are not asked: exact counts of 50 small H&E
  nuclei are beyond what 24x24 image tokens can resolve, and would only teach guessing;
* size: area vs the sample's ``meta["size_thresholds"][category]`` (small < t1 <= medium < t2 <= large),
  skipped within +-8 % of a threshold;
* shape: eccentricity of the pixel moments; round < 0.6, elongated > 0.8;
* position: the centroid's cell in a 3x3 grid ("top left", "top", ..., "centre", ..., "bottom right"),
  skipped within 3 % of the image size from a grid line;
* presence: "no" only for vocabulary categories absent from the labels and not implied by the
  style (``meta["implied"]``: an image of nuclei shows cells, unannotated);
* intensity: mean of the image scaled per channel to its 1-99.5 percentiles (channels averaged);
  "bright" >= 0.08 above the median of the same category's instances, "dim" <= 0.08 below; needs >= 3.

Answers of a kind are balanced: the answer class is drawn first, then an instance that has it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .datatypes import TASKS, Conversation, RegionSpec, Sample
from .synth import ALL_CATEGORIES, STYLES
from .wording import CANT_TELL, POOLS, perturb

SIZES = ("small", "medium", "large")
SHAPES = ("round", "elongated")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")
INTENSITIES = ("dim", "bright")
YES_NO = ("yes", "no")
BACKGROUND = "background"
#: Styles added after the bundled model's recipe stages were trained: their answers join the answer choices
#: of their own samples only, so data sets made before them stay identical.
LATE_STYLES = ("ihc",)
ROUND_BELOW, ELONGATED_ABOVE = 0.6, 0.8
INTENSITY_MARGIN = 0.08

# ----------------------------------------------------------------------------- nouns
_PLURALS = {"nucleus": "nuclei", "nucleolus": "nucleoli", "mitochondrion": "mitochondria", "bacterium": "bacteria",
            "cytoplasm": "cytoplasm", "stroma": "stroma", "background": "background"}
_MASS = {"cytoplasm", "stroma", "background", "tissue"}
_COUNT_NOUN = {"cytoplasm": "cells"}  # one cytoplasm instance per cell


def plural(name: str) -> str:
    """English plural of a category name (irregular biology words first)."""
    if name in _PLURALS:
        return _PLURALS[name]
    if re.search(r"(s|x|z|ch|sh)$", name):
        return name + "es"
    if re.search(r"[^aeiou]y$", name):
        return name[:-1] + "ies"
    return name + "s"


def _phrase(category: str, n: int) -> tuple[str, bool]:
    """Noun phrase for `n` instances and whether it takes a plural verb."""
    if category in _MASS or n == 1:
        return category, False
    return plural(category), True


def count_noun(category: str) -> str:
    return _COUNT_NOUN.get(category, plural(category))


def _article(category: str) -> str:
    if category in _MASS:
        return ""
    return "an " if category[0] in "aeiou" else "a "


# ----------------------------------------------------------------------------- per-instance facts
@dataclass(eq=False)
class InstanceStats:
    """Area, centroid, box, eccentricity and brightness of every instance (arrays indexed like ids)."""

    ids: np.ndarray
    categories: list[str]
    area: np.ndarray
    centroid: np.ndarray  # (N, 2) row, col
    bbox: np.ndarray  # (N, 4) y0, x0, y1, x1 inclusive
    eccentricity: np.ndarray
    brightness: np.ndarray  # mean of the percentile-scaled image, 0..1

    @classmethod
    def of(cls, sample: Sample) -> InstanceStats:
        labels = sample.labels
        ids = np.array(sorted(sample.categories), dtype=np.int64)
        n = int(labels.max()) + 1 if labels.size else 1
        flat = labels.ravel()
        rows, cols = np.indices(labels.shape, dtype=np.float64)
        area = np.bincount(flat, minlength=n).astype(np.float64)
        safe = np.maximum(area, 1)

        def mean(values: np.ndarray) -> np.ndarray:
            return np.bincount(flat, weights=values.ravel(), minlength=n) / safe

        cy, cx = mean(rows), mean(cols)
        vyy = mean(rows**2) - cy**2 + 1 / 12  # + pixel extent, so 1-px-wide lines are not degenerate
        vxx = mean(cols**2) - cx**2 + 1 / 12
        vxy = mean(rows * cols) - cy * cx
        half = np.sqrt(((vyy - vxx) / 2) ** 2 + vxy**2)
        big, small = (vyy + vxx) / 2 + half, (vyy + vxx) / 2 - half
        ecc = np.sqrt(np.clip(1 - small / np.maximum(big, 1e-9), 0, 1))
        bright = mean(_brightness_plane(sample.image))
        objs = ndi.find_objects(labels)
        bbox = np.array([[objs[i - 1][0].start, objs[i - 1][1].start,
                          objs[i - 1][0].stop - 1, objs[i - 1][1].stop - 1] for i in ids]).reshape(-1, 4)
        return cls(ids, [sample.categories[int(i)] for i in ids], area[ids],
                   np.stack([cy[ids], cx[ids]], axis=1), bbox, ecc[ids], bright[ids])


def _brightness_plane(image: np.ndarray) -> np.ndarray:
    """Each channel scaled to its 1-99.5 percentiles (what a viewer shows), channels averaged."""
    img = image.astype(np.float32)
    if img.ndim == 2:
        img = img[..., None]
    lo, hi = np.percentile(img.reshape(-1, img.shape[-1]), [1, 99.5], axis=0)
    return np.clip((img - lo) / np.maximum(hi - lo, 1e-6), 0, 1).mean(axis=-1)


def size_class(area: float, thresholds: Sequence[float]) -> str | None:
    t1, t2 = thresholds
    if min(abs(area - t1) / t1, abs(area - t2) / t2) < 0.08:
        return None
    return SIZES[int(area >= t1) + int(area >= t2)]


def shape_class(eccentricity: float) -> str | None:
    if eccentricity < ROUND_BELOW:
        return "round"
    return "elongated" if eccentricity > ELONGATED_ABOVE else None


def position_class(centroid: Sequence[float], shape: tuple[int, int]) -> str | None:
    parts = []
    for v, size in zip(centroid, shape, strict=True):
        f = v / size
        if min(abs(f - 1 / 3), abs(f - 2 / 3)) < 0.03:
            return None
        parts.append(int(f >= 1 / 3) + int(f >= 2 / 3))
    return POSITIONS[3 * parts[0] + parts[1]]


def intensity_classes(stats: InstanceStats) -> list[str | None]:
    """'bright'/'dim'/None per instance, relative to the median of its own category."""
    out: list[str | None] = [None] * len(stats.ids)
    for cat in set(stats.categories):
        idx = [i for i, c in enumerate(stats.categories) if c == cat]
        if len(idx) < 3:
            continue
        med = float(np.median(stats.brightness[idx]))
        for i in idx:
            d = stats.brightness[i] - med
            out[i] = "bright" if d >= INTENSITY_MARGIN else "dim" if d <= -INTENSITY_MARGIN else None
    return out


def box_count(labels: np.ndarray, ids: Sequence[int], box: Sequence[float]) -> tuple[int, bool]:
    """Instances with >= 50 % of their pixels inside the inclusive box, and whether no instance is cut
    ambiguously (between 20 % and 80 % inside)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    area = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
    inside = np.bincount(labels[y0 : y1 + 1, x0 : x1 + 1].ravel(), minlength=area.size)
    frac = inside[list(ids)] / np.maximum(area[list(ids)], 1)
    return int((frac >= 0.5).sum()), not bool(((frac > 0.2) & (frac < 0.8)).any())


# ----------------------------------------------------------------------------- templates
_G_SEMANTIC = ("Please segment the {noun}.", "Please segment the {noun} in this image.",
               "Could you segment out the {noun} in this image?",
               "Please generate a mask that segments the {noun} in this image.",
               "Can you segment the {noun}?", "Where {be} the {noun}? Please output the mask.",
               "Segment the {noun}.", "Show me the {noun} in this image.")
_G_ANSWERS = ("It is <SEG>.", "Sure, it is <SEG>.", "Sure, <SEG>.", "<SEG>",
              "Here is the segmentation: <SEG>.", "The {noun} {be} <SEG>.")
_G_INSTANCE = ("Please segment the {noun} in <region>.", "Segment the {noun} at <region>.",
               "Can you outline the {noun} in <region>?", "Please generate a mask of the {noun} in <region>.")
_G_MULTI = ("Please segment the {noun} and the {noun2}.",
            "Can you segment the {noun} and the {noun2} in this image?")
_G_MULTI_ANSWERS = ("The {noun} {be} <SEG> and the {noun2} {be2} <SEG>.", "Sure, <SEG> and <SEG>.")
_R_CATEGORY = ("What is in <region>?", "What is shown at <region>?", "What kind of object is <region>?",
               "Can you identify the structure in <region>?", "What is the object in <region>?")
_R_COUNT = ("How many {cnoun} are in <region>?", "Count the {cnoun} inside <region>.",
            "How many {cnoun} does <region> contain?")
_R_SIZE = ("Is the {noun} in <region> small, medium or large?", "How big is the object in <region>?",
           "What is the size of the {noun} in <region>?")
_R_SHAPE = ("Is the object in <region> round or elongated?", "What is the shape of the {noun} in <region>?",
            "Describe the shape of the object in <region>.")
_R_POSITION = ("Where in the image is <region>?", "Where is the {noun} in <region> located?",
               "In which part of the image is the object in <region>?")
_R_INTENSITY = ("Is the {noun} in <region> dim or bright?", "How bright is the object in <region>?",
                "Is the object in <region> brighter or dimmer than the others like it?")
_V_MODALITY = ("Which imaging modality is this?", "What modality was used to acquire this image?",
               "What type of imaging is this?")
_V_DESCRIPTION = ("What kind of image is this?", "What does this image show?",
                  "Describe the image in a few words.")
_V_COUNT = ("How many {cnoun} are there?", "How many {cnoun} are in this image?",
            "Count the {cnoun} in this image.")
_V_PRESENT = ("Is there {art}{noun} in this image?", "Are there any {pnoun} in this image?",
              "Does this image contain any {pnoun}?")
_V_PRESENT_MASS = ("Is there {noun} in this image?", "Does this image contain {noun}?")

#: The original templates of the image questions answered from ``Sample.meta`` (stain: the widget's wording).
_IMAGE_TEMPLATES = {"modality": _V_MODALITY, "description": _V_DESCRIPTION, "stain": POOLS["stain"][:1]}

#: Default cycle of kinds per task (a kind listed twice is asked twice as often).
DEFAULT_KINDS: dict[str, tuple[str, ...]] = {
    "grounding": ("semantic", "instance", "semantic", "multi"),
    "region_vqa": ("category", "count", "size", "shape", "position", "intensity"),
    "vqa": ("modality", "description", "count", "presence"),
}


@dataclass
class _Ctx:
    sample: Sample
    stats: InstanceStats
    rng: np.random.Generator
    vocabulary: tuple[str, ...]
    max_count: int
    wording: str = "templates"

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def question(self, templates: Sequence[str], pool: str) -> str:
        """A question template: from the original few, or with ``wording="paraphrases"`` from the pool
        (``"noisy"``: a paraphrase as people also type it, `wording.perturb`)."""
        if self.wording == "templates":
            return self.pick(templates)
        question = self.pick(POOLS[pool])
        return perturb(question, self.rng) if self.wording == "noisy" else question

    @property
    def unknown(self) -> bool:
        """An image unlike any microscopy (noise, a photograph): every question gets ``CANT_TELL``."""
        return bool(self.sample.meta.get("unknown"))

    def mask(self, idx: int) -> np.ndarray:
        return self.sample.labels == self.stats.ids[idx]

    def categories(self) -> list[str]:
        return sorted(set(self.stats.categories))

    def region(self, idx: int, kinds: Sequence[str] = ("box", "point", "mask"),
               clean_box: bool = True) -> RegionSpec:
        """A box (tight, 0-2 px margin), an interior point, or the mask of instance `idx`.

        With `clean_box`, a box is used only when it says unambiguously which object is meant:
        the instance holds >= 60 % of the box's labelled pixels and no other instance lies wholly
        inside it (a cytoplasm's box also holds its nucleus: a point or mask is drawn instead).
        """
        kind = self.pick(kinds)
        y0, x0, y1, x1 = (int(v) for v in self.stats.bbox[idx])
        if kind == "box":
            h, w = self.sample.labels.shape
            m = int(self.rng.integers(0, 3))
            box = (max(y0 - m, 0), max(x0 - m, 0), min(y1 + m, h - 1), min(x1 + m, w - 1))
            if not clean_box or self._box_is_clean(idx, box):
                return RegionSpec("box", box=box)
            kind = self.pick([k for k in kinds if k != "box"] or ["point"])
        if kind == "mask":
            return RegionSpec("mask", mask=self.mask(idx))
        patch = np.pad(self.sample.labels[y0 : y1 + 1, x0 : x1 + 1] == self.stats.ids[idx], 1)
        depth = ndi.distance_transform_edt(patch)[1:-1, 1:-1]
        rows, cols = np.nonzero(depth >= 0.7 * depth.max())
        k = int(self.rng.integers(len(rows)))
        return RegionSpec("point", point=(y0 + int(rows[k]), x0 + int(cols[k])))

    def _box_is_clean(self, idx: int, box: tuple[int, int, int, int]) -> bool:
        y0, x0, y1, x1 = box
        inside = self.sample.labels[y0 : y1 + 1, x0 : x1 + 1]
        labelled = np.count_nonzero(inside)
        if np.count_nonzero(inside == self.stats.ids[idx]) < 0.6 * labelled:
            return False
        b = self.stats.bbox
        wholly = (b[:, 0] >= y0) & (b[:, 1] >= x0) & (b[:, 2] <= y1) & (b[:, 3] <= x1)
        wholly[idx] = False
        return not wholly.any()

    def by_class(self, classes: Sequence[str | None]) -> tuple[str, int] | None:
        """Draw an answer class uniformly among those present, then an instance having it."""
        present = sorted({c for c in classes if c is not None})
        if not present:
            return None
        answer = self.pick(present)
        return answer, self.pick([i for i, c in enumerate(classes) if c == answer])


def _noun(category: str, n: int) -> dict[str, str]:
    phrase, many = _phrase(category, n)
    return {"noun": phrase, "be": "are" if many else "is"}


# ----------------------------------------------------------------------------- grounding
def _grounding(ctx: _Ctx, kind: str) -> Conversation | None:
    cats = ctx.categories()
    if not cats:
        return None
    if kind == "semantic":
        cat = ctx.pick(cats)
        ids = ctx.sample.instances_of(cat)
        words = _noun(cat, len(ids))
        return Conversation(ctx.pick(_G_SEMANTIC).format(**words), ctx.pick(_G_ANSWERS).format(**words),
                            "grounding", kind, [], [ctx.sample.category_mask(cat)],
                            meta={"categories": [cat], "label_ids": [ids]})
    if kind == "instance":
        cat = ctx.pick(cats)
        idx = ctx.pick([i for i, c in enumerate(ctx.stats.categories) if c == cat])
        question = ctx.pick(_G_INSTANCE).format(noun=cat)
        return Conversation(question, ctx.pick(_G_ANSWERS[:5]), "grounding", kind,
                            [ctx.region(idx, ("box", "point"), clean_box=False)], [ctx.mask(idx)],
                            meta={"categories": [cat], "label_ids": [[int(ctx.stats.ids[idx])]]})
    if kind == "multi" and len(cats) >= 2:
        pair = [cats[i] for i in ctx.rng.permutation(len(cats))[:2]]
        ids = [ctx.sample.instances_of(c) for c in pair]
        w1, w2 = _noun(pair[0], len(ids[0])), _noun(pair[1], len(ids[1]))
        words = {**w1, "noun2": w2["noun"], "be2": w2["be"]}
        return Conversation(ctx.pick(_G_MULTI).format(**words), ctx.pick(_G_MULTI_ANSWERS).format(**words),
                            "grounding", kind, [], [ctx.sample.category_mask(c) for c in pair],
                            meta={"categories": pair, "label_ids": ids})
    return None


# ----------------------------------------------------------------------------- region VQA
def _count_box(ctx: _Ctx, cat: str) -> tuple[tuple[int, int, int, int], int] | None:
    """A box whose count of `cat` instances is unambiguous: a random window or a few objects' union."""
    h, w = ctx.sample.labels.shape
    ids = ctx.sample.instances_of(cat)
    idx = [i for i, c in enumerate(ctx.stats.categories) if c == cat]
    for _ in range(30):
        if ctx.rng.random() < 0.5:
            bh, bw = (int(ctx.rng.uniform(0.2, 0.6) * s) for s in (h, w))
            y0, x0 = int(ctx.rng.integers(0, h - bh)), int(ctx.rng.integers(0, w - bw))
            box = (y0, x0, y0 + bh - 1, x0 + bw - 1)
        else:
            seed = ctx.stats.centroid[ctx.pick(idx)]
            near = np.argsort(np.hypot(*(ctx.stats.centroid[idx] - seed).T))[: int(ctx.rng.integers(1, 5))]
            b = ctx.stats.bbox[[idx[i] for i in near]]
            box = (max(int(b[:, 0].min()) - 2, 0), max(int(b[:, 1].min()) - 2, 0),
                   min(int(b[:, 2].max()) + 2, h - 1), min(int(b[:, 3].max()) + 2, w - 1))
        count, clean = box_count(ctx.sample.labels, ids, box)
        if clean and count <= ctx.max_count:
            return box, count
    return None


def _random_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    bh, bw = (max(int(rng.uniform(0.1, 0.4) * s), 4) for s in (h, w))
    y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
    return y0, x0, y0 + bh - 1, x0 + bw - 1


def _region_vqa(ctx: _Ctx, kind: str) -> Conversation | None:
    st = ctx.stats
    if kind == "category" and ctx.unknown:
        return _region_category(ctx)
    if not len(st.ids):
        return None
    if kind == "category":
        return _region_category(ctx)
    if kind == "count":
        cat = ctx.pick(ctx.categories())
        got = _count_box(ctx, cat)
        if got is None:
            return None
        box, count = got
        return Conversation(ctx.pick(_R_COUNT).format(cnoun=count_noun(cat)), str(count), "region_vqa",
                            kind, [RegionSpec("box", box=box)], canonical=str(count),
                            meta={"category": cat})
    thresholds = ctx.sample.meta.get("size_thresholds", {})
    if kind == "size":
        classes = [size_class(a, thresholds[c]) if c in thresholds else None
                   for a, c in zip(st.area, st.categories, strict=True)]
        templates, choices = _R_SIZE, SIZES
    elif kind == "shape":
        classes, templates, choices = [shape_class(e) for e in st.eccentricity], _R_SHAPE, SHAPES
    elif kind == "position":
        shape = ctx.sample.labels.shape
        classes, templates, choices = [position_class(c, shape) for c in st.centroid], _R_POSITION, POSITIONS
    elif kind == "intensity":
        classes, templates, choices = intensity_classes(st), _R_INTENSITY, INTENSITIES
    else:
        return None
    got = ctx.by_class(classes)
    if got is None:
        return None
    answer, idx = got
    return Conversation(ctx.pick(templates).format(noun=st.categories[idx]), answer, "region_vqa", kind,
                        [ctx.region(idx)], canonical=answer, choices=choices,
                        meta={"category": st.categories[idx], "label_ids": [int(st.ids[idx])]})


def _region_category(ctx: _Ctx) -> Conversation | None:
    if ctx.unknown:
        h, w = ctx.sample.labels.shape
        box = RegionSpec("box", box=_random_box(ctx.rng, h, w))
        return Conversation(ctx.question(_R_CATEGORY, "region_category"), CANT_TELL, "region_vqa", "category", [box],
                            canonical=CANT_TELL, meta={"label_ids": []})
    choices = tuple(sorted({*ctx.vocabulary, *ctx.categories(), BACKGROUND}))
    depth = ndi.distance_transform_edt(ctx.sample.labels == 0)
    # background in ~1 question of 5 (when there is clear background), else a category uniformly
    answer = BACKGROUND if depth.max() >= 6 and ctx.rng.random() < 0.2 else ctx.pick(ctx.categories())
    if answer == BACKGROUND:
        rows, cols = np.nonzero(depth >= 6)
        k = int(ctx.rng.integers(len(rows)))
        region, label_ids = RegionSpec("point", point=(int(rows[k]), int(cols[k]))), []
    else:
        idx = ctx.pick([i for i, c in enumerate(ctx.stats.categories) if c == answer])
        region, label_ids = ctx.region(idx), [int(ctx.stats.ids[idx])]
    return Conversation(ctx.question(_R_CATEGORY, "region_category"), answer, "region_vqa", "category", [region],
                        canonical=answer, choices=choices, meta={"label_ids": label_ids})


# ----------------------------------------------------------------------------- image-level VQA
def _vqa(ctx: _Ctx, kind: str) -> Conversation | None:
    meta = ctx.sample.meta
    if ctx.unknown:
        return _vqa_unknown(ctx, kind)
    if kind in ("modality", "description", "stain"):
        answer = meta.get(kind)
        if not answer:
            return None
        known = ({getattr(s, kind) for name, s in STYLES.items() if name not in LATE_STYLES or name == ctx.sample.style}
                 if ctx.sample.style in STYLES and kind != "stain" else set())
        templates = _IMAGE_TEMPLATES[kind]
        return Conversation(ctx.question(templates, kind), answer, "vqa", kind, canonical=answer,
                            choices=tuple(sorted(known | {answer})))
    if kind == "count":
        countable = [c for c in ctx.categories() if len(ctx.sample.instances_of(c)) <= ctx.max_count]
        if not countable:
            return None
        cat = ctx.pick(countable)
        n = str(len(ctx.sample.instances_of(cat)))
        return Conversation(ctx.question(_V_COUNT, "count").format(cnoun=count_noun(cat)), n, "vqa", kind,
                            canonical=n, meta={"category": cat})
    if kind == "presence":
        present = ctx.categories()
        absent = sorted(set(ctx.vocabulary) - set(present) - set(meta.get("implied", ())))
        answer = "yes" if not absent or (present and ctx.rng.random() < 0.5) else "no"
        if answer == "no" and not absent:
            return None
        cat = ctx.pick(present if answer == "yes" else absent)
        if cat in _MASS:
            question = ctx.question(_V_PRESENT_MASS, "presence_mass").format(noun=cat)
        else:
            question = ctx.question(_V_PRESENT, "presence").format(art=_article(cat), noun=cat, pnoun=plural(cat))
        return Conversation(question, answer, "vqa", kind, canonical=answer, choices=YES_NO,
                            meta={"category": cat})
    return None


def _vqa_unknown(ctx: _Ctx, kind: str) -> Conversation | None:
    """Any image-level question about an image unlike microscopy: ``CANT_TELL``."""
    if kind in ("modality", "description", "stain"):
        templates = _IMAGE_TEMPLATES[kind]
        question = ctx.question(templates, kind)
    elif kind == "count":
        question = ctx.question(_V_COUNT, "count").format(cnoun=count_noun(ctx.pick(ctx.vocabulary)))
    elif kind == "presence":
        cat = ctx.pick([c for c in ctx.vocabulary if c not in _MASS] or ["nucleus"])
        question = ctx.question(_V_PRESENT, "presence").format(art=_article(cat), noun=cat, pnoun=plural(cat))
    else:
        return None
    return Conversation(question, CANT_TELL, "vqa", kind, canonical=CANT_TELL)


_BUILDERS = {"grounding": _grounding, "region_vqa": _region_vqa, "vqa": _vqa}


def make_conversations(sample: Sample, rng: np.random.Generator | int, n_per_task: int | dict[str, int] = 3,
                       tasks: Sequence[str] = TASKS, kinds: dict[str, Sequence[str]] | None = None,
                       vocabulary: Sequence[str] | None = None, max_count: int = 25,
                       wording: str = "templates") -> list[Conversation]:
    """`n_per_task` conversations for each task, cycling through its kinds in a shuffled order.

    A kind that cannot be asked about this sample (no unambiguous instance, one category for
    ``multi``, no modality for user data) is replaced by another kind of the same task, so every task
    gets its share while any is possible. `vocabulary` supplies the categories "is there ...?" may
    ask about as negatives (default: every synthetic category); counts above `max_count` are not asked.
    ``wording="paraphrases"`` draws image-level and region-category questions from `wording.POOLS` (the
    original templates are the default, so data sets made before stay the same); a sample with
    ``meta["unknown"]`` (noise, a photograph) gets ``wording.CANT_TELL`` for every question.
    """
    if wording not in ("templates", "paraphrases", "noisy"):
        raise ValueError(f"wording must be 'templates', 'paraphrases' or 'noisy', got {wording!r}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    kinds = {**DEFAULT_KINDS, **(kinds or {})}
    vocab = tuple(sorted(set(ALL_CATEGORIES if vocabulary is None else vocabulary)))
    ctx = _Ctx(sample, InstanceStats.of(sample), rng, vocab, max_count, wording)
    out: list[Conversation] = []
    seen: set[tuple[str, str]] = set()  # region-free turns asked already: never repeat one verbatim
    for task in tasks:
        if task not in _BUILDERS:
            raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
        want = n_per_task[task] if isinstance(n_per_task, dict) else n_per_task
        cycle = [kinds[task][i] for i in rng.permutation(len(kinds[task]))]
        made, slot = 0, 0
        while made < want and slot < 4 * want + len(cycle):
            first = cycle[slot % len(cycle)]
            slot += 1
            fallbacks = [k for k in dict.fromkeys(cycle) if k != first]
            for kind in [first, *(fallbacks[i] for i in rng.permutation(len(fallbacks)))]:
                conv = _BUILDERS[task](ctx, kind)
                if conv is not None and not (conv.regions or (conv.question, conv.answer) not in seen):
                    continue
                if conv is not None:
                    seen.add((conv.question, conv.answer))
                    out.append(conv)
                    made += 1
                    break
            else:
                break  # nothing of this task can be asked about this sample
    return out
