"""Questions about real microscopy images, in the wordings training used and in wordings it never saw.

Every question has an answer that is certain for the image (no judgement calls):

* ``modality`` — fluorescence / phase contrast / electron microscopy (SEM, TEM) / H&E / IHC;
* ``stain`` — where one applies: fluorescence, H&E, Ki67 IHC (DAB + hematoxylin);
* ``region_class`` — the object class inside a box drawn around one reference object (``<region>``);
* ``presence`` — the image's object class ("yes") and a noun from another modality ("no");
* ``count`` — the number of objects in the reference labels, correct within 20 % (mean relative error too);
* ``describe`` — the answer names both the modality and the object class.

Each task is asked in the TRAINING wordings (``TRAINING_PHRASINGS``: the templates of
``napari_medplib.train.conversations`` the bundled model was trained on) and in HELD-OUT wordings
(``HELD_OUT_PHRASINGS``: natural ways microscopists ask, written here and kept out of training; training code
can exclude them with ``held_out_templates()``). Answers are scored by normalised keyword matching with
synonyms (``MODALITY_SYNONYMS``, ``STAIN_SYNONYMS``, ``OBJECT_SYNONYMS``): an answer is right when it names the
true class and no conflicting one. Beside the model stands a MAJORITY-ANSWER baseline computed in the same
run: per task, the most frequent correct answer over the images of the split, always given (for counts, the
median count), scored by the same rules.

Images come from ``benchmarks/real_data/catalog.py`` with its ``tune`` / ``report`` split, fixed before any
model was run on them. Use ``--split report`` for published figures.

    python benchmarks/real_vqa.py --split tune --json docs/real-vqa-tune.json
    python benchmarks/real_vqa.py --split report --json docs/real-vqa-report.json
    python benchmarks/real_vqa.py --split tune --only cpm15_he_02 --cache CACHE --mirrors MIRRORS
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_images import DEFAULT_CACHE, load_catalog  # noqa: E402  (one catalog loader for both benchmarks)

from napari_medplib.train.wording import POOLS  # noqa: E402

TASKS = ("modality", "stain", "region_class", "presence", "count", "describe")
WORDINGS = ("training", "held_out")
COUNT_TOLERANCE = 0.20
REGIONS_PER_IMAGE = 3

# ------------------------------------------------------------------------------------ phrasings
# Placeholders: {noun} singular object noun, {art} its article ("a " / "an "), {pnoun} / {cnoun} plural.
#: Wordings training uses (``napari_medplib/train/wording.py``'s pools, the first few of each; the first ones
#: are the original templates of ``train/conversations.py``). The widget's example questions are among them.
TRAINING_PHRASINGS: dict[str, tuple[str, ...]] = {
    "modality": POOLS["modality"][:4],
    "stain": POOLS["stain"][:4],
    "region_class": POOLS["region_category"][:5],
    "presence": POOLS["presence"][:4],
    "count": POOLS["count"][:4],
    "describe": POOLS["description"][:4],
}

#: Wordings training must never see (held out): the benchmark's test of whether answers survive rewording.
HELD_OUT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "modality": ("What kind of microscopy is this?", "Which microscopy technique was used to take this picture?",
                 "How was this image acquired?", "What imaging method produced this picture?",
                 "What sort of microscope image am I looking at?", "Which type of microscope was used here?"),
    "stain": ("Which stain was used here?", "What staining is this?", "How was this sample stained?",
              "What stain or dye do you see in this picture?", "Which staining method was applied to this sample?"),
    "region_class": ("What is in the box <region>?", "What is inside <region>?",
                     "Which structure is marked by <region>?", "Identify the object in <region>.",
                     "What am I looking at in <region>?"),
    "presence": ("Are there {pnoun} in this image?", "Can you see any {pnoun} here?",
                 "Do you see {pnoun} in this picture?", "Does this picture show {pnoun}?",
                 "Are any {pnoun} visible?"),
    "count": ("Roughly how many {cnoun} can you see?", "How many {cnoun} do you count here?",
              "What is the number of {cnoun} in this picture?", "Can you count the {cnoun} for me?",
              "How many {cnoun} are visible?"),
    "describe": ("Describe this image.", "What am I looking at?", "What does this picture show?",
                 "Give a short description of this image.", "Tell me what is in this image."),
}


def _template_key(template: str) -> str:
    """Lower case, placeholders unified, punctuation and spacing dropped: equal keys = the same wording."""
    text = re.sub(r"\{[a-z0-9_]*\}", "{}", template.lower())
    text = text.translate(str.maketrans("", "", string.punctuation.replace("{", "").replace("}", "")))
    return " ".join(text.split())


def held_out_templates() -> set[str]:
    """Normalised keys of every held-out wording (compare with ``_template_key`` of a training template)."""
    return {_template_key(t) for ts in HELD_OUT_PHRASINGS.values() for t in ts}


def training_templates() -> set[str]:
    """Normalised keys of every question template training can draw: the constants of
    ``napari_medplib.train.conversations`` named ``_G_*``, ``_R_*``, ``_V_*`` (answer lists excepted) and
    every paraphrase pool of ``napari_medplib.train.wording``."""
    from napari_medplib.train import conversations, wording

    keys = set()
    for name, value in vars(conversations).items():
        if re.match(r"_[GRV]_", name) and "ANSWERS" not in name and isinstance(value, tuple):
            keys |= {_template_key(t) for t in value if isinstance(t, str)}
    for templates in wording.POOLS.values():
        keys |= {_template_key(t) for t in templates}
    return keys


# ------------------------------------------------------------------------------------ matching
#: Modality classes; catalog modalities map onto them with ``MODALITY_CLASS``.
MODALITY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "fluorescence": ("fluorescence", "fluorescent", "immunofluorescence", "epifluorescence", "confocal"),
    "phase": ("phase contrast", "phase microscopy", "phase image", "quantitative phase"),
    "em": ("electron microscopy", "electron micrograph", "electron microscope", "em", "sem", "tem",
           "scanning electron", "transmission electron"),
    "he": ("h&e", "hematoxylin and eosin", "hematoxylin eosin", "eosin"),
    "ihc": ("ihc", "immunohistochemistry", "immunohistochemical", "ki67", "dab", "immunostaining",
            "immunostained", "immunoperoxidase"),
    "brightfield": ("brightfield", "bright field", "transmitted light"),
}
MODALITY_CLASS = {"fluorescence": "fluorescence", "widefield_fluorescence": "fluorescence",
                  "confocal_fluorescence": "fluorescence", "phase": "phase", "sem": "em", "tem": "em",
                  "he": "he", "ihc": "ihc", "brightfield": "brightfield"}
#: Classes an answer may also name without being wrong (stained histology is brightfield).
MODALITY_COMPATIBLE = {"he": {"brightfield"}, "ihc": {"brightfield"}}
#: EM subtype words: naming the other subtype is wrong.
EM_SUBTYPES = {"sem": ("sem", "scanning electron"), "tem": ("tem", "transmission electron")}
MODALITY_ANSWER = {"fluorescence": "fluorescence microscopy", "phase": "phase-contrast microscopy",
                   "em": "electron microscopy", "he": "H&E histology", "ihc": "Ki67 immunohistochemistry",
                   "brightfield": "brightfield microscopy"}

STAIN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "fluorescence": ("fluorescence", "fluorescent", "fluorophore", "immunofluorescence", "dapi", "hoechst", "gfp",
                     "fluorescent dye"),
    "he": MODALITY_SYNONYMS["he"],
    "ihc": MODALITY_SYNONYMS["ihc"],
}
#: Catalog modality -> stain class; modalities without a stain are not asked.
STAIN_CLASS = {"fluorescence": "fluorescence", "widefield_fluorescence": "fluorescence",
               "confocal_fluorescence": "fluorescence", "he": "he", "ihc": "ihc"}
STAIN_ANSWER = {"fluorescence": "fluorescence", "he": "H&E", "ihc": "Ki67 immunohistochemistry (DAB)"}

OBJECT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "nucleus": ("nucleus", "nuclei", "nuclear"),
    "bacterium": ("bacterium", "bacteria", "bacterial", "e coli", "bacillus", "bacilli"),
    "axon": ("axon", "axons", "myelinated fibre", "myelinated fiber", "nerve fibre", "nerve fiber", "myelin"),
    "neurite": ("neurite", "neurites", "neuronal process", "neuronal processes", "neural process"),
    "cell": ("cell", "cells"),
    "mitochondrion": ("mitochondrion", "mitochondria"),
    "cytoplasm": ("cytoplasm",),
    "lumen": ("lumen", "lumens", "lumina"),
    "background": ("background",),
}
OBJECT_COMPATIBLE = {"nucleus": {"cell", "cytoplasm"}, "bacterium": {"cell"}, "neurite": {"mitochondrion"},
                     "axon": set()}
#: Catalog plural noun -> (object class, singular noun).
NOUNS = {"nuclei": ("nucleus", "nucleus"), "bacteria": ("bacterium", "bacterium"), "axons": ("axon", "axon"),
         "neurites": ("neurite", "neurite"), "cells": ("cell", "cell")}
#: A noun of another modality that is certainly absent (asked for the "no" answer).
ABSENT_NOUN = {"nuclei": "axons", "bacteria": "nuclei", "axons": "bacteria", "neurites": "bacteria",
               "cells": "axons"}

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def normalise(text: str | None) -> str:
    """Lower case; hyphens, underscores and punctuation to spaces; H&E / haematoxylin spellings unified."""
    t = (text or "").lower().replace("haematoxylin", "hematoxylin").replace("-", " ").replace("_", " ")
    t = re.sub(r"\bh\s*(?:&|and)\s*e\b", "h&e", t)
    t = re.sub(r"[^a-z0-9&\s]", " ", t)
    return " ".join(t.split())


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![a-z0-9&]){re.escape(normalise(phrase))}(?![a-z0-9&])", text) is not None


def classes_named(text: str | None, synonyms: dict[str, tuple[str, ...]]) -> set[str]:
    """The classes whose synonyms occur in ``text`` as whole words (after ``normalise``)."""
    t = normalise(text)
    return {cls for cls, words in synonyms.items() if any(_has(t, w) for w in words)}


def _names_only(text, truth, synonyms, compatible) -> bool:
    named = classes_named(text, synonyms)
    return truth in named and not (named - {truth} - compatible.get(truth, set()))


def modality_correct(text: str | None, catalog_modality: str) -> bool:
    """Names the image's modality class and no conflicting one (SEM vs TEM told apart when named)."""
    truth = MODALITY_CLASS[catalog_modality]
    if not _names_only(text, truth, MODALITY_SYNONYMS, MODALITY_COMPATIBLE):
        return False
    if catalog_modality in EM_SUBTYPES:
        other = "tem" if catalog_modality == "sem" else "sem"
        t = normalise(text)
        return not any(_has(t, w) for w in EM_SUBTYPES[other])
    return True


def stain_correct(text: str | None, stain: str) -> bool:
    return _names_only(text, stain, STAIN_SYNONYMS, {})


def object_correct(text: str | None, object_class: str) -> bool:
    return _names_only(text, object_class, OBJECT_SYNONYMS, OBJECT_COMPATIBLE)


def parse_yes_no(text: str | None) -> str | None:
    """'yes' / 'no' from the first word (yes, yeah, no, none, not ...), else None."""
    words = normalise(text).split()
    if not words:
        return None
    if words[0] in ("yes", "yeah", "yep", "correct", "true"):
        return "yes"
    if words[0] in ("no", "nope", "none", "not", "false"):
        return "no"
    return None


def is_bare_yes_no(text: str | None) -> bool:
    return normalise(text) in ("yes", "no")


_CANT_TELL = re.compile(r"\b(?:can ?not|can t|unable to|impossible to)\s+(?:tell|say|determine)\b|\bnot sure\b|"
                        r"\bdon t know\b")


def says_cant_tell(text: str | None) -> bool:
    """The answer declines ("I can't tell from this image.", "I cannot say", "not sure")."""
    return _CANT_TELL.search(normalise(text)) is not None


def parse_count(text: str | None) -> int | None:
    """The first number in the answer, digits or a word up to twenty."""
    t = normalise(text)
    for word in t.split():
        if word.isdigit():
            return int(word)
        if word in _NUMBER_WORDS:
            return _NUMBER_WORDS[word]
    return None


def count_relative_error(said: int | None, truth: int) -> float:
    return float("nan") if said is None or truth <= 0 else abs(said - truth) / truth


def count_correct(said: int | None, truth: int, tolerance: float = COUNT_TOLERANCE) -> bool:
    return said is not None and abs(said - truth) <= tolerance * truth + 1e-9


# ------------------------------------------------------------------------------------ facts
@dataclass
class Fact:
    """One certain fact about an image: the task, the right answer, and what the questions need."""

    task: str
    truth: str  # modality / stain / object class, "yes"/"no", a count as digits, "modality|object" for describe
    words: dict = field(default_factory=dict)  # placeholder values
    box: tuple[int, int, int, int] | None = None  # (y0, x0, y1, x1) inclusive, for region questions


def correct(fact: Fact, text: str | None) -> bool:
    if fact.task in ("modality",):
        return modality_correct(text, fact.truth)
    if fact.task == "stain":
        return stain_correct(text, fact.truth)
    if fact.task == "region_class":
        return object_correct(text, fact.truth)
    if fact.task == "presence":
        return parse_yes_no(text) == fact.truth
    if fact.task == "count":
        return count_correct(parse_count(text), int(fact.truth))
    if fact.task == "describe":
        modality, obj = fact.truth.split("|")
        return modality_correct(text, modality) and object_correct(text, obj)
    raise ValueError(f"unknown task {fact.task!r}")


def _words(plural_noun: str) -> dict:
    singular = NOUNS.get(plural_noun, (plural_noun, plural_noun.rstrip("s")))[1]
    return {"noun": singular, "art": "an " if singular[0] in "aeiou" else "a ", "pnoun": plural_noun,
            "cnoun": plural_noun}


def region_boxes(labels: np.ndarray, n: int = REGIONS_PER_IMAGE, seed: int = 0, margin: int = 2
                 ) -> list[tuple[int, int, int, int]]:
    """Boxes around ``n`` reference objects that say unambiguously which object is meant: mid-sized
    (between the 25th and 90th area percentile), off the border, the object >= 60 % of the box's labelled
    pixels and no other object wholly inside."""
    from scipy import ndimage as ndi

    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size == 0:
        return []
    h, w = labels.shape
    areas = np.bincount(labels.ravel())
    lo, hi = np.percentile(areas[ids], [25, 90])
    slices = ndi.find_objects(labels)
    boxes = {}
    for i in ids:
        s = slices[i - 1]
        y0, x0, y1, x1 = s[0].start, s[1].start, s[0].stop - 1, s[1].stop - 1
        if not lo <= areas[i] <= hi or y0 == 0 or x0 == 0 or y1 == h - 1 or x1 == w - 1:
            continue
        box = (max(y0 - margin, 0), max(x0 - margin, 0), min(y1 + margin, h - 1), min(x1 + margin, w - 1))
        inside = labels[box[0]:box[2] + 1, box[1]:box[3] + 1]
        if np.count_nonzero(inside == i) < 0.6 * np.count_nonzero(inside):
            continue
        others = set(np.unique(inside)) - {0, int(i)}
        if any(slices[o - 1][0].start >= box[0] and slices[o - 1][1].start >= box[1]
               and slices[o - 1][0].stop - 1 <= box[2] and slices[o - 1][1].stop - 1 <= box[3] for o in others):
            continue
        boxes[int(i)] = box
    keys = sorted(boxes)
    rng = np.random.default_rng(seed)
    return [boxes[keys[k]] for k in sorted(rng.permutation(len(keys))[:n])]


def image_facts(modality: str, noun: str, labels: np.ndarray, seed: int = 0) -> list[Fact]:
    """The certain facts of one catalog image."""
    object_class = NOUNS.get(noun, (noun,))[0]
    words = _words(noun)
    facts = [Fact("modality", modality, words)]
    if modality in STAIN_CLASS:
        facts.append(Fact("stain", STAIN_CLASS[modality], words))
    facts += [Fact("region_class", object_class, words, box) for box in region_boxes(labels, seed=seed)]
    facts.append(Fact("presence", "yes", words))
    facts.append(Fact("presence", "no", _words(ABSENT_NOUN.get(noun, "axons"))))
    n = int(np.count_nonzero(np.unique(labels)))
    if n:
        facts.append(Fact("count", str(n), words))
    facts.append(Fact("describe", f"{modality}|{object_class}", words))
    return facts


# ------------------------------------------------------------------------------------ images unlike microscopy
#: What is asked of an image that is no microscopy (noise, a photograph): the right answer declines.
UNKNOWN_TASKS = ("modality", "describe")


def unknown_images(split: str) -> list[tuple[str, np.ndarray]]:
    """(name, image) of noise and photographs that training never saw: the report split gets scikit-image's
    report photographs and one noise image of each kind, the tune split noise of other seeds."""
    from napari_medplib.train import unknown as u

    out = []
    if split in ("report", "all"):
        out += [(f"photo:{name}", u.photo(name)) for name in u.REPORT_PHOTOS]
        out += [(f"noise:{kind}", u.noise(kind, np.random.default_rng(u.REPORT_SEED_BASE + i), (384, 384)))
                for i, kind in enumerate(u.NOISE_KINDS)]
    if split in ("tune", "all"):
        out += [(f"noise:{kind}:tune", u.noise(kind, np.random.default_rng(u.REPORT_SEED_BASE + 100 + i), (384, 384)))
                for i, kind in enumerate(u.NOISE_KINDS)]
    return out


def ask_unknown(session, images: Sequence[tuple[str, np.ndarray]], *, max_new_tokens: int = 48) -> dict:
    """Every image asked the ``UNKNOWN_TASKS`` in both wording sets; right = the answer declines."""
    records = []
    for name, image in images:
        for task in UNKNOWN_TASKS:
            for wording, phrasings in (("training", TRAINING_PHRASINGS), ("held_out", HELD_OUT_PHRASINGS)):
                for template in phrasings[task]:
                    reply = session.ask(image, template, max_new_tokens=max_new_tokens)
                    records.append({"image": name, "task": task, "wording": wording, "question": template,
                                    "answer": reply.text, "correct": says_cant_tell(reply.text)})
        clear = getattr(session, "clear_cache", None)
        if clear is not None:
            clear()
    return {**{w: _mean([r["correct"] for r in records if r["wording"] == w]) for w in WORDINGS},
            "n_images": len(images), "images": [name for name, _ in images], "records": records}


# ------------------------------------------------------------------------------------ baseline
def majority_answers(facts: Sequence[Fact]) -> dict[str, str]:
    """Per task, the answer text a constant guesser would give: the most frequent correct answer over
    ``facts`` (ties broken by the answer's name); for counts the median count."""
    out = {}
    for task in TASKS:
        truths = [f.truth for f in facts if f.task == task]
        if not truths:
            continue
        if task == "count":
            out[task] = str(int(round(float(np.median([int(t) for t in truths])))))
            continue
        if task == "modality":
            truths = [MODALITY_CLASS[t] for t in truths]
        elif task == "describe":
            truths = [f"{MODALITY_CLASS[t.split('|')[0]]}|{t.split('|')[1]}" for t in truths]
        best = sorted(Counter(truths).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        out[task] = _answer_text(task, best)
    return out


def _answer_text(task: str, key: str) -> str:
    if task == "modality":
        return MODALITY_ANSWER[key]
    if task == "stain":
        return STAIN_ANSWER[key]
    if task == "region_class":
        return key
    if task == "describe":
        modality, obj = key.split("|")
        plural = next((p for p, (c, _) in NOUNS.items() if c == obj), obj)
        return f"{MODALITY_ANSWER[modality]} of {plural}"
    return key


# ------------------------------------------------------------------------------------ asking
def ask_image(session, image: np.ndarray, facts: Sequence[Fact], *, max_new_tokens: int = 48) -> list[dict]:
    """Every fact asked in every wording; one record per question."""
    from napari_medplib.regions import Region

    records = []
    for fi, fact in enumerate(facts):
        regions = []
        if fact.box is not None:
            regions = [Region.box(*fact.box, image_shape=image.shape[:2])]
        for wording, phrasings in (("training", TRAINING_PHRASINGS), ("held_out", HELD_OUT_PHRASINGS)):
            for template in phrasings[fact.task]:
                question = template.format(**fact.words)
                reply = session.ask(image, question, regions=regions, max_new_tokens=max_new_tokens)
                text = reply.text
                rec = {"task": fact.task, "fact": fi, "truth": fact.truth, "wording": wording, "question": question,
                       "answer": text, "correct": bool(correct(fact, text))}
                if fact.box is not None:
                    rec["box"] = list(fact.box)
                if fact.task == "count":
                    said = parse_count(text)
                    rec["said"], rec["relative_error"] = said, count_relative_error(said, int(fact.truth))
                records.append(rec)
    return records


def _mean(values) -> float:
    values = [float(v) for v in values if not np.isnan(float(v))]
    return float(np.mean(values)) if values else float("nan")


def per_task(records: Sequence[dict], facts: Sequence[Fact], majority: dict[str, str]) -> dict:
    """Accuracy per task in each wording set and of the majority answer, over the given records/facts."""
    out = {}
    for task in TASKS:
        task_facts = [f for f in facts if f.task == task]
        if not task_facts:
            continue
        row = {w: _mean([r["correct"] for r in records if r["task"] == task and r["wording"] == w])
               for w in WORDINGS}
        row["majority"] = _mean([correct(f, majority[task]) for f in task_facts])
        row["n_facts"] = len(task_facts)
        row["n_questions"] = {w: sum(r["task"] == task and r["wording"] == w for r in records) for w in WORDINGS}
        if task == "count":
            for w in WORDINGS:
                row[f"mean_relative_error_{w}"] = _mean(
                    [r["relative_error"] for r in records if r["task"] == task and r["wording"] == w])
            row["mean_relative_error_majority"] = _mean(
                [count_relative_error(int(majority[task]), int(f.truth)) for f in task_facts])
        if task == "describe":
            row["bare_yes_no"] = sum(is_bare_yes_no(r["answer"]) for r in records if r["task"] == task)
        out[task] = row
    return out


def overall(rows: Sequence[dict], majority: dict[str, str]) -> dict:
    """Per task over all images (every question weighs the same), the mean over tasks, and the
    modality + stain pool the floors name."""
    records = [r for row in rows for r in row["records"]]
    facts = [f for row in rows for f in row["_facts"]]
    tasks = per_task(records, facts, majority)
    out = {"tasks": tasks}
    out["mean_of_tasks"] = {k: _mean([t[k] for t in tasks.values()]) for k in (*WORDINGS, "majority")}
    pool = [r for r in records if r["task"] in ("modality", "stain")]
    pool_facts = [f for f in facts if f.task in ("modality", "stain")]
    out["modality_and_stain"] = {w: _mean([r["correct"] for r in pool if r["wording"] == w]) for w in WORDINGS}
    out["modality_and_stain"]["majority"] = _mean([correct(f, majority[f.task]) for f in pool_facts])
    out["modalities"] = sorted({row["modality"] for row in rows})
    out["n_images"], out["n_questions"] = len(rows), len(records)
    return out


def run(session, images: Sequence[tuple[str, str, str, str, np.ndarray, np.ndarray]], *, seed: int = 0,
        max_new_tokens: int = 48, log=None, unknown: Sequence[tuple[str, np.ndarray]] = ()) -> dict:
    """``images``: (name, catalog modality, plural noun, split, image, labels); ``unknown``: (name, image) of
    images unlike microscopy (`unknown_images`). Returns the JSON-able result."""
    rows = []
    for name, modality, noun, split, image, labels in images:
        mark = time.perf_counter()
        facts = image_facts(modality, noun, labels, seed=seed)
        records = ask_image(session, image, facts, max_new_tokens=max_new_tokens)
        rows.append({"name": name, "modality": modality, "noun": noun, "split": split,
                     "n_objects": int(np.count_nonzero(np.unique(labels))), "records": records, "_facts": facts,
                     "seconds": time.perf_counter() - mark})
        clear = getattr(session, "clear_cache", None)
        if clear is not None:
            clear()
        if log is not None:
            log(f"{name}: {len(records)} questions, {rows[-1]['seconds']:.0f} s")
    majority = majority_answers([f for row in rows for f in row["_facts"]])
    summary = overall(rows, majority)
    real = [r for row in rows for r in row["records"]]
    # declining on real microscopy is wrong: a model that always declines would pass the unknown images
    summary["cant_tell_on_microscopy"] = {w: _mean([says_cant_tell(r["answer"]) for r in real if r["wording"] == w])
                                          for w in WORDINGS}
    if unknown:
        summary["unknown"] = ask_unknown(session, unknown, max_new_tokens=max_new_tokens)
        if log is not None:
            log(f"{len(unknown)} images unlike microscopy: {len(summary['unknown']['records'])} questions")
    for row in rows:
        row["tasks"] = per_task(row["records"], row["_facts"], majority)
        row["facts"] = [{"task": f.task, "truth": f.truth, **({"box": list(f.box)} if f.box else {})}
                        for f in row.pop("_facts")]
    return {"majority_answers": majority, "overall": summary, "images": rows,
            "phrasings": {"training": TRAINING_PHRASINGS, "held_out": HELD_OUT_PHRASINGS},
            "count_tolerance": COUNT_TOLERANCE}


# ------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    return "  -  " if v is None or np.isnan(v) else f"{v:.3f}"


def table(result: dict) -> str:
    head = f"{'task':<13} {'train':>6} {'held':>6} {'major':>6}  {'facts':>5}  majority answer"
    lines = [head, "-" * len(head)]
    tasks = result["overall"]["tasks"]
    for task, row in tasks.items():
        lines.append(f"{task:<13} {_fmt(row['training']):>6} {_fmt(row['held_out']):>6} {_fmt(row['majority']):>6}  "
                     f"{row['n_facts']:>5}  {result['majority_answers'][task]}")
    m = result["overall"]["mean_of_tasks"]
    lines.append(f"{'mean of tasks':<13} {_fmt(m['training']):>6} {_fmt(m['held_out']):>6} {_fmt(m['majority']):>6}")
    ms = result["overall"]["modality_and_stain"]
    lines.append(f"{'modal.+stain':<13} {_fmt(ms['training']):>6} {_fmt(ms['held_out']):>6} {_fmt(ms['majority']):>6}")
    if "count" in tasks:
        c = tasks["count"]
        lines.append(f"count mean relative error: training {_fmt(c['mean_relative_error_training'])}, held-out "
                     f"{_fmt(c['mean_relative_error_held_out'])}, majority {_fmt(c['mean_relative_error_majority'])}")
    if "describe" in tasks:
        lines.append(f"describe answers that are a bare yes/no: {tasks['describe']['bare_yes_no']}")
    ct = result["overall"].get("cant_tell_on_microscopy")
    if ct:
        lines.append(f"'I can't tell' on microscopy (should be ~0): training {_fmt(ct['training'])}, "
                     f"held-out {_fmt(ct['held_out'])}")
    unknown = result["overall"].get("unknown")
    if unknown:
        lines.append(f"'I can't tell' on {unknown['n_images']} images unlike microscopy: training "
                     f"{_fmt(unknown['training'])}, held-out {_fmt(unknown['held_out'])}")
    lines.append("")
    lines.append(f"{'image':<32} {'modality':<12} " + " ".join(f"{t[:8]:>17}" for t in TASKS))
    for row in result["images"]:
        cells = []
        for t in TASKS:
            r = row["tasks"].get(t)
            cells.append(f"{'':>17}" if r is None else f"{_fmt(r['training'])}/{_fmt(r['held_out'])}".rjust(17))
        lines.append(f"{row['name'][:32]:<32} {row['modality'][:12]:<12} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", choices=("tune", "report", "all"), default="tune")
    parser.add_argument("--only", nargs="*", default=None, help="catalog names to run")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"data cache (default {DEFAULT_CACHE})")
    parser.add_argument("--mirrors", type=Path, default=None,
                        help="folder of bare git mirrors named owner+name (default: $MEDPLIB_GIT_MIRRORS)")
    parser.add_argument("--seed", type=int, default=0, help="which reference objects get a region box")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--no-unknown", action="store_true", help="skip the noise and photographs")
    args = parser.parse_args(argv)

    import torch

    from napari_medplib import Session

    torch.set_num_threads(max(1, args.threads))
    catalog = load_catalog()
    entries = catalog.select(args.split, args.only)
    if not entries:
        parser.error("no catalog image matches --split/--only")
    images = []
    for entry in entries:  # data first: a failed download should not wait for a model load
        try:
            image, labels = catalog.load(entry, args.cache.expanduser(), args.mirrors)
        except Exception as err:  # noqa: BLE001 - one line per source, then stop
            print(f"error: {entry.name}: {err}", file=sys.stderr)
            return 2
        images.append((entry.name, entry.modality, entry.objects, entry.split, image, labels))
    session = Session.load(args.model, device=args.device)
    print(f"model: {session.model_name}; {len(entries)} images ({args.split})", file=sys.stderr)
    unknown = [] if args.only or args.no_unknown else unknown_images(args.split)
    result = run(session, images, seed=args.seed, max_new_tokens=args.max_new_tokens,
                 log=lambda line: print(line, file=sys.stderr), unknown=unknown)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        folder = session.folder
        model_name = folder.parent.name if folder is not None and folder.name == "final" else session.model_name
        args.json.write_text(json.dumps({"model": model_name, "split": args.split, "seed": args.seed, **result},
                                        indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
