"""A user's annotated images, checked and split, for fine-tuning (no torch).

Fine-tuning takes image planes with a label image each (napari's Labels layers, TIFF/PNG label files, or
region files rasterised to labels) and optional class names. This module turns them into
`AnnotatedPlane` objects after checking everything a user can get wrong, with a message that names the
fix, before anything is allocated or trained:

* labels of another shape than the image, an RGB (H, W, 3) label image, float or negative labels;
* no objects, or fewer than `MIN_OBJECTS` (some are held out to measure the result);
* more than `MAX_OBJECTS_PER_PLANE` ids on one plane (a grey-level image picked as labels, usually);
* stacks: a (Z, H, W) image with (Z, H, W) labels becomes Z planes (planes without objects left out).

Partial annotation is the normal case: only labelled objects are positives. Unlabelled pixels are
treated as background only when the user says the planes are fully annotated (``fully_annotated``).

`split_objects` holds out a share of the annotated objects (default 20 %, at least 3), fixed by a seed,
so before/after figures are measured on objects the model never trained on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Objects a fine-tuning run needs: at least one to train on and ``MIN_HELDOUT`` to measure on.
MIN_HELDOUT = 3
MIN_OBJECTS = MIN_HELDOUT + 1
#: The most label ids one plane may hold (a grey-level image picked as labels has thousands).
MAX_OBJECTS_PER_PLANE = 5000
#: The most annotated objects of one run (all planes).
MAX_OBJECTS = 20000
#: The largest plane side fine-tuning reads (the engine's own limit for whole planes is larger; a
#: training crop never needs more).
MAX_SIDE = 16384
#: Image planes per run.
MAX_PLANES = 1000


#: What trains by default: SAM's prompt encoder and mask decoder (names as in ``MedPLIBModel``).
DEFAULT_TRAIN = ("sam.prompt_encoder.*", "sam.mask_decoder.*")


class FinetuneInputError(ValueError):
    """The images or annotations cannot be used for fine-tuning; the message names the problem and the fix."""


class FinetuneCancelled(Exception):
    """Training stopped on request; the step checkpoint is written, so running again resumes."""


PEFT_HINT = ("LoRA needs the 'peft' package, which the plugin installs only with its training extra: "
             "pip install 'napari-medplib[train]'")


def peft_available() -> bool:
    """Whether LoRA (learning class names, LoRA recipe stages) can run here."""
    import importlib.util

    return importlib.util.find_spec("peft") is not None


@dataclass
class FinetuneOptions:
    """How to fine-tune; the defaults need no tuning (chosen on the tune images of the real-image set)."""

    steps: int = 600
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    holdout: float = 0.2  # share of the annotated objects held out to measure the result
    min_heldout: int = 3
    train: tuple[str, ...] = DEFAULT_TRAIN  # glob patterns on parameter names
    #: also train "segment the <class>": the <SEG> projection, LoRA on the language model, on grounding
    #: frames (``train.finetune_grounding``), one batch every ``grounding_every`` steps
    grounding: bool = True
    grounding_every: int = 3
    grounding_batch: int = 2
    lora_r: int = 8
    checkpoint_every: int = 25
    threads: int = 0  # torch threads while training; 0 = leave as is
    max_eval_objects: int = 60  # held-out objects measured before and after (all when fewer)
    evaluate: bool = True
    #: keep a click's estimated object size inside the annotated objects' size range, in training and in
    #: the adapted model (``config.object_extent_range``): right for one kind of object; a model for many
    #: kinds (the bundled one) trains and runs on the engine's own estimate instead (False)
    size_range: bool = True
    click_share: float = 0.5  # share of each batch's examples that are clicks (the rest are box prompts)

    def check(self) -> None:
        if (self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.checkpoint_every < 1
                or self.grounding_every < 1 or self.grounding_batch < 1 or self.lora_r < 1):
            raise FinetuneInputError("steps, batch sizes, intervals and the LoRA rank must be at least 1 and the "
                                     "learning rate positive")
        if not 0.0 <= self.click_share <= 1.0:
            raise FinetuneInputError(f"click_share is a share of the batch, 0 to 1; got {self.click_share}")
        if not self.train:
            raise FinetuneInputError("nothing to train: name parameters with glob patterns such as 'sam.mask_decoder.*'")


@dataclass
class FinetuneResult:
    model_dir: Path
    before: dict[str, float] = field(default_factory=dict)  # held-out figures of the starting model
    after: dict[str, float] = field(default_factory=dict)  # ... of the adapted model
    baselines: dict[str, float] = field(default_factory=dict)  # ellipse in the box, Otsu component under the click
    n_train: int = 0
    n_heldout: int = 0
    seconds: float = 0.0
    steps: int = 0

    def summary(self) -> str:
        """What a user reads: the held-out figures before and after, beside the model-free baselines."""
        def fig(d: dict, k: str) -> str:
            v = d.get(k)
            return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"

        lines = [f"held-out objects: {self.n_heldout} (trained on {self.n_train}, {self.steps} steps, "
                 f"{self.seconds / 60:.1f} min)"]
        if not self.before and not self.after:
            return lines[0] + " (not measured)"
        for key, name, base in (("box_dice", "box Dice", "ellipse_dice"), ("point_dice", "click Dice", "otsu_dice"),
                                ("ground_f1", "grounding F1", "watershed_f1")):
            lines.append(f"{name}: {fig(self.before, key)} -> {fig(self.after, key)} "
                         f"(model-free baseline {fig(self.baselines, base)})")
        return "\n".join(lines)


@dataclass
class AnnotatedPlane:
    """One image plane with its annotated objects."""

    image: np.ndarray  # (H, W) or (H, W, C), channels last
    labels: np.ndarray  # (H, W) int32, 0 = not annotated (or background when fully annotated)
    classes: dict[int, str]  # label id -> class name ("object" when none was given)
    name: str = ""  # where it came from (layer or file name, with the plane index of a stack)
    fully_annotated: bool = False
    contrast_limits: tuple[float, float] | None = None  # as the user sees it (napari layer); None = automatic

    @property
    def ids(self) -> list[int]:
        return sorted(self.classes)


@dataclass(frozen=True)
class ObjectRef:
    """One annotated object: the plane it is on and its label id there."""

    plane: int
    label: int


@dataclass
class ObjectSplit:
    train: list[ObjectRef] = field(default_factory=list)
    heldout: list[ObjectRef] = field(default_factory=list)


def _name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None and index < len(names) else f"image {index + 1}"


def _check_labels(labels: np.ndarray, image_shape: tuple[int, ...], where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.ndim == 3 and labels.shape[-1] in (3, 4) and labels.shape[:2] == tuple(image_shape[:2]):
        raise FinetuneInputError(f"{where}: the label image is RGB {labels.shape}; labels must be one integer id "
                                 "per pixel. Convert it (e.g. open it in napari as a Labels layer) or pick the "
                                 "right file")
    if not (np.issubdtype(labels.dtype, np.integer)):
        raise FinetuneInputError(f"{where}: labels must be whole numbers (a Labels layer or a label image), got "
                                 f"{labels.dtype}; did you pick the image instead of its labels?")
    if labels.shape != tuple(image_shape[: labels.ndim]) or labels.ndim != 2:
        raise FinetuneInputError(f"{where}: labels {labels.shape} do not match the image plane "
                                 f"{tuple(image_shape[:2])}; annotate on the same image, or pick the labels made "
                                 "for it")
    if labels.size and int(labels.min()) < 0:
        raise FinetuneInputError(f"{where}: labels contain negative values; use 0 for 'not annotated' and "
                                 "positive ids for objects")
    return labels


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] > 4):
        raise FinetuneInputError(f"{where}: expected one plane (H, W) or (H, W, channels) with channels last, "
                                 f"got shape {image.shape}; pick a plane or move the channel axis last")
    if min(image.shape[:2]) < 8 or max(image.shape[:2]) > MAX_SIDE:
        raise FinetuneInputError(f"{where}: plane {image.shape[:2]} is outside 8..{MAX_SIDE} pixels a side; "
                                 "crop or downscale it first")
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.number)):
        raise FinetuneInputError(f"{where}: image of type {image.dtype} is not a microscopy image")
    return image


def _classes(ids: np.ndarray, class_names, index: int, where: str) -> dict[int, str]:
    """Label id -> class name from None (one class "object"), a name, a name per image, or a mapping per id."""
    names: dict[int, str] = {}
    for label in ids.tolist():
        if class_names is None:
            name = "object"
        elif isinstance(class_names, str):
            name = class_names
        elif isinstance(class_names, Mapping):
            name = class_names.get(label, class_names.get(str(label)))
            if name is None:
                raise FinetuneInputError(f"{where}: label {label} has no class name; name every label id, or give "
                                         "one name for all objects")
        else:
            per_image = list(class_names)
            if index >= len(per_image):
                raise FinetuneInputError(f"{len(per_image)} class names for more images; give one per image or "
                                         "one for all")
            name = per_image[index]
            if isinstance(name, Mapping):
                name = name.get(label, name.get(str(label)))
                if name is None:
                    raise FinetuneInputError(f"{where}: label {label} has no class name; name every label id, "
                                             "or give one name for all objects")
        if not isinstance(name, str) or not name.strip():
            raise FinetuneInputError(f"{where}: class name {name!r} for label {label} must be a word such as "
                                     "'nucleus'")
        if "<" in name or ">" in name:
            raise FinetuneInputError(f"{where}: class name {name!r} contains '<' or '>', which the model reserves; "
                                     "rename the class")
        names[label] = " ".join(name.split()).lower()
    return names


def _unique_ids(labels: np.ndarray, where: str) -> np.ndarray:
    """The non-zero ids of a label plane, refusing planes with too many (checked before any per-id work)."""
    if labels.dtype.itemsize <= 2 or int(labels.max(initial=0)) < 2**20:
        counts = np.bincount(labels.ravel().astype(np.int64, copy=False)) if labels.size else np.zeros(1, int)
        ids = np.flatnonzero(counts)
    else:
        ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size > MAX_OBJECTS_PER_PLANE:
        raise FinetuneInputError(f"{where}: the labels hold {ids.size:,} different ids, more than the "
                                 f"{MAX_OBJECTS_PER_PLANE:,} objects one plane may have; is this a grey-level image "
                                 "rather than a label image? Pick the Labels layer (or label file) of the objects")
    return ids


def annotated_planes(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], class_names=None, *,
                     fully_annotated: bool = False, names: Sequence[str] | None = None,
                     contrast_limits: Sequence | None = None) -> list[AnnotatedPlane]:
    """Checked planes from images and their label images (one label image per image).

    ``class_names``: None (class "object"), one name for all, one per image, or per image a
    ``{label id: name}`` mapping (or one mapping for all). A stack (Z, H, W[, C]) with labels (Z, H, W)
    becomes its planes; planes without objects are left out (a partly annotated stack is normal).
    Raises `FinetuneInputError` with the fix.
    """
    images, labels = list(images), list(labels)
    if not images:
        raise FinetuneInputError("no images were given; pick at least one image with annotated objects")
    if len(images) != len(labels):
        raise FinetuneInputError(f"{len(images)} image(s) but {len(labels)} label image(s); give one label image "
                                 "per image, in the same order")
    planes: list[AnnotatedPlane] = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        where = _name(names, index)
        image, label = np.asarray(image), np.asarray(label)
        is_stack = label.ndim == 3 and label.shape[-1] not in (3, 4) and (
            (image.ndim == 3 and image.shape == label.shape) or (image.ndim == 4 and image.shape[:3] == label.shape))
        if is_stack:
            stack = [(image[z], label[z], f"{where} plane {z}") for z in range(label.shape[0])]
        else:
            stack = [(image, label, where)]
        if len(planes) + len(stack) > MAX_PLANES:
            raise FinetuneInputError(f"more than {MAX_PLANES} annotated planes; fine-tune on a subset")
        limits = None if contrast_limits is None else contrast_limits[index]
        for plane_image, plane_labels, plane_where in stack:
            plane_image = _check_image(plane_image, plane_where)
            plane_labels = _check_labels(plane_labels, plane_image.shape, plane_where)
            ids = _unique_ids(plane_labels, plane_where)
            if ids.size == 0:
                continue
            classes = _classes(ids, class_names, index, plane_where)
            planes.append(AnnotatedPlane(plane_image, plane_labels.astype(np.int32, copy=False), classes, plane_where,
                                         fully_annotated, None if limits is None else tuple(float(v) for v in limits)))
    total = sum(len(p.classes) for p in planes)
    if total == 0:
        raise FinetuneInputError("the labels contain no objects; paint a few objects (one id each) into a Labels "
                                 "layer on the image, then try again")
    if total < MIN_OBJECTS:
        raise FinetuneInputError(f"{total} annotated object(s); fine-tuning needs at least {MIN_OBJECTS}: "
                                 f"{MIN_HELDOUT} are held out to measure the result. Annotate about ten objects "
                                 "(one label id each)")
    if total > MAX_OBJECTS:
        raise FinetuneInputError(f"{total:,} annotated objects, more than the {MAX_OBJECTS:,} one run takes; "
                                 "fine-tune on a subset of the images")
    return planes


def split_objects(planes: Sequence[AnnotatedPlane], holdout: float = 0.2, min_heldout: int = MIN_HELDOUT,
                  seed: int = 0) -> ObjectSplit:
    """A seeded split of the annotated objects into those trained on and those held out for measuring
    (``holdout`` of them, at least ``min_heldout``, always leaving one to train on)."""
    if not 0.0 <= holdout < 1.0:
        raise FinetuneInputError(f"the held-out share must be in [0, 1), got {holdout}")
    objects = [ObjectRef(p, label) for p, plane in enumerate(planes) for label in plane.ids]
    if len(objects) <= min_heldout:
        raise FinetuneInputError(f"{len(objects)} annotated object(s) with {min_heldout} held out leaves none to "
                                 "train on; annotate more objects")
    n_heldout = min(len(objects) - 1, max(min_heldout, int(round(holdout * len(objects)))))
    order = np.random.default_rng([seed, 7]).permutation(len(objects))
    heldout = sorted((objects[i] for i in order[:n_heldout]), key=lambda o: (o.plane, o.label))
    train = sorted((objects[i] for i in order[n_heldout:]), key=lambda o: (o.plane, o.label))
    return ObjectSplit(train, heldout)
