"""The training data model and its files: samples, regions, conversations, answer normalisation.

Everything the generator (`synth`), the templates (`conversations`) and the annotation converter
(`annotations`) produce is one of the types of `datatypes` (re-exported here), and `save_dataset`/`load_dataset` store them so that
training can stream a data set from disk:

    folder/
      dataset.json            {"format": "napari-medplib-train/1", "n_samples", "n_conversations", "info"}
      samples/000000.npz      image, labels, category ids/names, style, meta (JSON), and the boolean
                              masks the conversations refer to ("mask_0", "mask_1", ..., deduplicated)
      conversations.jsonl     one conversation a line: sample file, question, answer, task, kind,
                              canonical, choices, regions ({"kind": "box", "box": [y0, x0, y1, x1]} |
                              {"kind": "point", "point": [y, x]} | {"kind": "mask", "mask": "mask_3"}),
                              targets (mask keys, one per <SEG>), meta

Only numpy arrays and JSON are written (no pickles), so files are safe to load from anyone.
numpy only: no torch, no napari.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The shared types live in `datatypes` (the generator and the templates import them from there, so
# that this module may import those two); they stay importable from here under the same names.
from .datatypes import (  # noqa: F401 (re-exported)
    REGION_TOKEN,
    SEG_TOKEN,
    TASKS,
    Conversation,
    RegionSpec,
    Sample,
    SyntheticSample,
    Task,
)

FORMAT = "napari-medplib-train/1"


# ----------------------------------------------------------------------------- answer normalisation
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_SYNONYMS = {"center": "centre", "middle": "centre", "upper": "top", "lower": "bottom",
             "dark": "dim", "bg": "background", "y": "yes", "n": "no"}


def normalise_answer(text: str) -> str:
    """Canonical form for exact-match accuracy.

    Lower-case; '-', '_' and '/' become spaces; punctuation other than '&' is dropped; whitespace is
    collapsed; a leading "a"/"an"/"the" is dropped; number words up to twenty become digits; a few
    synonyms map to our words (center/middle -> centre, upper -> top, lower -> bottom, dark -> dim).
    """
    text = re.sub(r"[-_/]", " ", text.lower())
    text = re.sub(r"[^\w&\s]", " ", text)
    words = text.split()
    if words and words[0] in ("a", "an", "the") and len(words) > 1:
        words = words[1:]
    words = [_SYNONYMS.get(w, _NUMBER_WORDS.get(w, w)) for w in words]
    return " ".join(words)




# ----------------------------------------------------------------------------- files
class DatasetFormatError(ValueError):
    """A data set folder is missing, incomplete or not ours; the message names the file."""


def _region_to_json(region: RegionSpec, masks: _MaskStore) -> dict[str, Any]:
    if region.kind == "box":
        return {"kind": "box", "box": [float(v) for v in region.box]}
    if region.kind == "point":
        return {"kind": "point", "point": [float(v) for v in region.point]}
    return {"kind": "mask", "mask": masks.add(region.mask)}


class _MaskStore:
    """Boolean masks of one sample, deduplicated (a category union is often the target many times)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self._by_hash: dict[str, str] = {}

    def add(self, mask: np.ndarray) -> str:
        mask = np.ascontiguousarray(mask, dtype=bool)
        digest = hashlib.sha1(mask.tobytes() + str(mask.shape).encode()).hexdigest()
        if digest not in self._by_hash:
            key = f"mask_{len(self.arrays)}"
            self._by_hash[digest] = key
            self.arrays[key] = mask
        return self._by_hash[digest]


def save_dataset(folder: str | Path, items: Iterable[tuple[Sample, list[Conversation]]],
                 info: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write samples and their conversations to `folder`, streaming (items may be a generator)."""
    folder = Path(folder)
    if (folder / "dataset.json").exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a data set; pass overwrite=True or pick a new folder")
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    n_samples = n_conv = 0
    with open(folder / "conversations.jsonl", "w", encoding="utf-8") as lines:
        for sample, conversations in items:
            name = f"samples/{n_samples:06d}.npz"
            masks = _MaskStore()
            for conv in conversations:
                record = {
                    "sample": name, "question": conv.question, "answer": conv.answer,
                    "task": conv.task, "kind": conv.kind, "canonical": conv.canonical,
                    "choices": list(conv.choices),
                    "regions": [_region_to_json(r, masks) for r in conv.regions],
                    "targets": [masks.add(m) for m in conv.target_masks],
                    "meta": conv.meta,
                }
                lines.write(json.dumps(record) + "\n")
                n_conv += 1
            ids = np.array(sorted(sample.categories), dtype=np.int32)
            np.savez_compressed(
                folder / name, image=sample.image, labels=sample.labels.astype(np.int32),
                category_ids=ids,
                category_names=np.array([sample.categories[int(i)] for i in ids], dtype=str),
                style=np.array(sample.style), meta=np.array(json.dumps(sample.meta)), **masks.arrays,
            )
            n_samples += 1
    header = {"format": FORMAT, "n_samples": n_samples, "n_conversations": n_conv, "info": info or {}}
    (folder / "dataset.json").write_text(json.dumps(header, indent=2), encoding="utf-8")
    return folder


class TrainDataset:
    """A saved data set, read lazily: `ds[i]` loads sample i and its conversations from disk."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        head = self.folder / "dataset.json"
        if not head.is_file():
            raise DatasetFormatError(f"{head} not found: is {self.folder} a folder written by save_dataset?")
        self.header = json.loads(head.read_text(encoding="utf-8"))
        if self.header.get("format") != FORMAT:
            raise DatasetFormatError(f"{head} has format {self.header.get('format')!r}, expected {FORMAT!r}")
        self._records: dict[str, list[dict[str, Any]]] = {}
        with open(self.folder / "conversations.jsonl", encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    rec = json.loads(line)
                    self._records.setdefault(rec["sample"], []).append(rec)
        self.sample_files = [f"samples/{i:06d}.npz" for i in range(self.header["n_samples"])]

    @property
    def info(self) -> dict[str, Any]:
        return self.header.get("info", {})

    def __len__(self) -> int:
        return len(self.sample_files)

    def __getitem__(self, index: int) -> tuple[Sample, list[Conversation]]:
        name = self.sample_files[index]
        path = self.folder / name
        if not path.is_file():
            raise DatasetFormatError(f"{path} is missing: the data set was not copied whole")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        sample = Sample(
            arrays["image"], arrays["labels"],
            {int(i): str(n) for i, n in zip(arrays["category_ids"], arrays["category_names"], strict=True)},
            str(arrays["style"]), json.loads(str(arrays["meta"])),
        )
        convs = []
        for rec in self._records.get(name, []):
            regions = [
                RegionSpec("mask", mask=arrays[r["mask"]]) if r["kind"] == "mask"
                else RegionSpec(r["kind"], **{r["kind"]: tuple(r[r["kind"]])}) for r in rec["regions"]
            ]
            convs.append(Conversation(
                rec["question"], rec["answer"], rec["task"], rec["kind"], regions,
                [arrays[k] for k in rec["targets"]], rec["canonical"], tuple(rec["choices"]), rec["meta"],
            ))
        return sample, convs

    def __iter__(self) -> Iterator[tuple[Sample, list[Conversation]]]:
        for i in range(len(self)):
            yield self[i]

    def conversations(self) -> Iterator[tuple[Sample, Conversation]]:
        """Every (sample, conversation) pair in file order: what a training loop consumes."""
        for sample, convs in self:
            for conv in convs:
                yield sample, conv


def load_dataset(folder: str | Path) -> TrainDataset:
    """Open a folder written by `save_dataset` (samples are read on access)."""
    return TrainDataset(folder)


# ----------------------------------------------------------------------------- synthetic data sets
def synthetic_items(n: int, seed: int = 0, split: str = "train", n_per_task: int | dict[str, int] = 3,
                    start: int = 0, conversations: bool = True,
                    kinds: dict[str, Sequence[str]] | None = None,
                    **options: Any) -> Iterator[tuple[Sample, list[Conversation]]]:
    """(sample, conversations) pairs of a synthetic split, each fixed by (seed, index, split) alone.

    The conversations of sample i use the generator ``default_rng([sample_seed, 1])``, so a data set
    rebuilt from the same arguments (or resumed with `start`) is identical; ``conversations=False``
    gives the same samples with no conversations (SAM stages: a third of the data's CPU time saved).
    `kinds` replaces the default cycle of question kinds of a task (`conversations.make_conversations`).
    `options` go to `synth.make_dataset` (styles, size, bit_depths).
    """
    # imported here, not at the top: only the synthetic data needs the generator (and scipy)
    from .conversations import make_conversations
    from .synth import ALL_CATEGORIES, make_dataset, vocabulary_for

    vocabulary = vocabulary_for(options["styles"]) if options.get("styles") else ALL_CATEGORIES
    for sample in make_dataset(n, seed=seed, split=split, start=start, **options):
        if not conversations:
            yield sample, []
            continue
        rng = np.random.default_rng([sample.meta["seed"], 1])
        yield sample, make_conversations(sample, rng, n_per_task=n_per_task, vocabulary=vocabulary, kinds=kinds)


def write_synthetic_dataset(folder: str | Path, n: int, seed: int = 0, split: str = "train",
                            n_per_task: int | dict[str, int] = 3, overwrite: bool = False,
                            **options: Any) -> Path:
    """Generate and save a synthetic split; `dataset.json` records the arguments that rebuild it."""
    info = {"generator": "napari_medplib.train.synth", "n": n, "seed": seed, "split": split,
            "n_per_task": n_per_task, **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    return save_dataset(folder, synthetic_items(n, seed, split, n_per_task, **options), info, overwrite)
