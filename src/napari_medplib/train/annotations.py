"""A user's annotations -> the same samples and conversations the synthetic data gives.

This is what lets users fine-tune on their own data: an image plus a label image plus class names,
as napari exports them (a Labels layer's int array, and the class of each label id from its
features table or a dict), become a `Sample` and MeCoVQA-style `Conversation`s.

Two label conventions are accepted:

* instance labels + ``{label_id: class_name}`` — every non-zero id must have a class;
* semantic labels + a class list ``[name_of_1, name_of_2, ...]`` (value k is class k, 0 is
  background) — instances are the 8-connected pieces of each class.

What differs from synthetic data, and why: size thresholds are the terciles of the image's own
instance areas per category (no generator distribution to take them from; at least 3 instances),
the image-level modality/description questions are asked only if the caller names them, and
"is there ...?" negatives come only from the caller's class names (never claim a synthetic
category is absent from a real image that might show it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

from .conversations import make_conversations
from .data import TASKS, Conversation, Sample


class AnnotationError(ValueError):
    """The annotations cannot be converted; the message names the problem and the fix."""


def _check_image(image: np.ndarray, labels: np.ndarray) -> None:
    if labels.ndim != 2:
        raise AnnotationError(f"labels must be one 2-D plane (H, W), got shape {labels.shape}; "
                              "pick the slice that matches the image plane")
    if image.ndim not in (2, 3):
        raise AnnotationError(f"image must be (H, W) or (H, W, C) channels-last, got shape {image.shape}")
    if image.shape[:2] != labels.shape:
        hint = ""
        if image.ndim == 3 and image.shape[1:] == labels.shape:
            hint = "; the channel axis looks first: use np.moveaxis(image, 0, -1)"
        raise AnnotationError(f"image shape {image.shape} does not match labels shape {labels.shape}{hint}")
    if image.size == 0:
        raise AnnotationError("image is empty")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    if labels.dtype == bool:
        labels = labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        raise AnnotationError(f"labels must be an integer array (a napari Labels layer), got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise AnnotationError("labels contain negative values; use 0 for background and positive ids")
    if labels.size and int(labels.max()) >= 2**31:
        raise AnnotationError("label ids must be below 2**31")
    if not labels.any():
        raise AnnotationError("labels contain no objects (all 0); annotate at least one object")
    return labels.astype(np.int32)


def _check_name(name: object, key: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise AnnotationError(f"class name for {key!r} must be a non-empty string, got {name!r}")
    if "<" in name or ">" in name:
        raise AnnotationError(f"class name {name!r} contains '<' or '>', which the model reserves "
                              "for special tokens; rename the class")
    return " ".join(name.split())


def _terciles(labels: np.ndarray, categories: dict[int, str]) -> dict[str, list[float]]:
    """Per category, the 1/3 and 2/3 quantiles of instance areas (>= 3 instances)."""
    area = np.bincount(labels.ravel())
    out: dict[str, list[float]] = {}
    for cat in sorted(set(categories.values())):
        a = [area[i] for i, c in categories.items() if c == cat]
        if len(a) >= 3:
            t1, t2 = np.percentile(a, [100 / 3, 200 / 3])
            if t2 > t1 > 0:
                out[cat] = [float(t1), float(t2)]
    return out


def sample_from_annotations(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Mapping[int, str] | Sequence[str],
    *,
    semantic: bool | None = None,
    modality: str | None = None,
    description: str | None = None,
    size_thresholds: Mapping[str, Sequence[float]] | None = None,
) -> Sample:
    """Validate and convert; `semantic=None` means "a list of names is semantic, a dict is instances"."""
    image, labels = np.asarray(image), np.asarray(labels)
    _check_image(image, labels)
    labels = _check_labels(labels)
    if isinstance(class_names, str) or not isinstance(class_names, Mapping | Sequence):
        raise AnnotationError("class_names must be a {label_id: name} dict or a list of names")
    if len(class_names) == 0:
        raise AnnotationError("class_names is empty; name the class of each label")
    if isinstance(class_names, Mapping):
        names = {int(k): _check_name(v, k) for k, v in class_names.items()}
    else:
        names = {k + 1: _check_name(v, k + 1) for k, v in enumerate(class_names)}
    semantic = not isinstance(class_names, Mapping) if semantic is None else semantic
    present = np.unique(labels)
    present = present[present > 0]
    unknown = [int(i) for i in present if int(i) not in names]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        what = "values" if semantic else "label ids"
        raise AnnotationError(f"{what} {shown} have no class name; add them to class_names "
                              "or set those pixels to 0")
    if semantic:
        inst = np.zeros_like(labels)
        categories: dict[int, str] = {}
        for value in present:
            pieces, n = ndi.label(labels == value, structure=np.ones((3, 3), bool))
            inst[pieces > 0] = pieces[pieces > 0] + len(categories)
            categories.update({len(categories) + k: names[int(value)] for k in range(1, n + 1)})
        labels = inst
    else:
        categories = {int(i): names[int(i)] for i in present}
    thresholds = _terciles(labels, categories)
    thresholds.update({k: [float(v) for v in t] for k, t in (size_thresholds or {}).items()})
    meta = {"source": "annotations", "size_thresholds": thresholds,
            "class_names": sorted(set(names.values()))}
    if modality:
        meta["modality"] = modality
    if description:
        meta["description"] = description
    return Sample(image, labels, categories, "user", meta)


def conversations_from_annotations(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Mapping[int, str] | Sequence[str],
    *,
    seed: int = 0,
    n_per_task: int | dict[str, int] = 3,
    tasks: Sequence[str] = TASKS,
    vocabulary: Sequence[str] | None = None,
    **sample_options: object,
) -> tuple[Sample, list[Conversation]]:
    """One annotated image -> (sample, conversations), reproducible for a given `seed`.

    `vocabulary` (default: the class names given) is what "is there a ...?" may ask about.
    `sample_options` go to `sample_from_annotations` (semantic, modality, description, size_thresholds).
    """
    sample = sample_from_annotations(image, labels, class_names, **sample_options)  # type: ignore[arg-type]
    vocab = sample.meta["class_names"] if vocabulary is None else list(vocabulary)
    convs = make_conversations(sample, np.random.default_rng(seed), n_per_task=n_per_task,
                               tasks=tasks, vocabulary=vocab)
    return sample, convs
