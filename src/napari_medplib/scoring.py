"""Scores of a model against reference instance masks, each beside a model-free baseline.

Used by the real-image benchmark and by anyone checking a model on their own annotated images. The
baselines are what a microscopist gets without any model, so a model figure means something only
above them:

* a box prompt vs the ellipse inscribed in the box;
* a click vs the Otsu component under the click (the connected piece, of whichever Otsu class the
  click falls in, that holds the click: polarity-free, so dark objects on bright ground count too);
* instances ("segment the nuclei") vs Otsu + distance-transform watershed, the objects taken as the
  Otsu class that covers less of the plane (objects are the minority in microscopy fields).

Instance matching follows the StarDist / cellpose convention: a predicted and a reference object
match when their IoU exceeds 0.5 (such matches are unique); F1 = 2 TP / (n_ref + n_pred) and the
mean matched IoU is the mean IoU over the matches. numpy, scipy and scikit-image only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), inclusive pixel indices


# ------------------------------------------------------------------------------------------ basics
def dice(predicted: np.ndarray, target: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty."""
    predicted, target = np.asarray(predicted, bool), np.asarray(target, bool)
    total = int(predicted.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted, target).sum()) / total


def instance_boxes(labels: np.ndarray) -> dict[int, Box]:
    """Label id -> tight box (y0, x0, y1, x1), inclusive pixel indices."""
    from scipy import ndimage as ndi

    boxes = {}
    for index, found in enumerate(ndi.find_objects(np.asarray(labels)), start=1):
        if found is not None:
            rows, cols = found
            boxes[index] = (rows.start, cols.start, rows.stop - 1, cols.stop - 1)
    return boxes


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of the pixel farthest from the mask's boundary (max of the distance transform).

    Ties (the ridge of an elongated object) go to the tied pixel nearest their mean, so a rod gets its
    middle, not one end of its ridge.
    """
    from scipy import ndimage as ndi

    if not np.asarray(mask).any():
        raise ValueError("interior_point() got an empty mask")
    distance = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    ties = np.argwhere(distance >= distance.max() - 1e-6)
    nearest = ties[int(np.argmin(((ties - ties.mean(axis=0)) ** 2).sum(axis=1)))]
    return int(nearest[0]), int(nearest[1])


def select_instances(ids: Sequence[int], limit: int, seed: int = 0) -> list[int]:
    """All ids when there are at most ``limit`` (or limit <= 0), else a seeded random subset (sorted)."""
    ids = sorted(int(i) for i in ids)
    if limit <= 0 or len(ids) <= limit:
        return ids
    return sorted(int(i) for i in np.random.default_rng(seed).choice(ids, size=limit, replace=False))


def gray(image: np.ndarray) -> np.ndarray:
    """float (H, W) of a plane: channels averaged (RGB H&E becomes its luminance-like mean)."""
    array = np.asarray(image)
    if array.ndim == 3:
        return array[..., :3].astype(np.float64).mean(axis=-1)
    return array.astype(np.float64)


# --------------------------------------------------------------------------------------- baselines
def ellipse_in_box(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask of the ellipse inscribed in the inclusive box (pixel centres inside it)."""
    y0, x0, y1, x1 = box
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    ry, rx = (y1 - y0 + 1) / 2.0, (x1 - x0 + 1) / 2.0
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0


def otsu_split(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(bool plane above the Otsu threshold, threshold) of a plane's grey values."""
    from skimage.filters import threshold_otsu

    plane = gray(image)
    if float(plane.max()) == float(plane.min()):
        return np.zeros(plane.shape, bool), float(plane.max())
    threshold = float(threshold_otsu(plane))
    return plane > threshold, threshold


def otsu_component(image: np.ndarray, point: tuple[int, int], above: np.ndarray | None = None) -> np.ndarray:
    """The connected piece of the click's Otsu class that holds the click (``above``: a precomputed split)."""
    from scipy import ndimage as ndi

    if above is None:
        above, _ = otsu_split(image)
    y, x = point
    side = above if above[y, x] else ~above
    pieces, _ = ndi.label(side)
    return pieces == pieces[y, x]


def otsu_watershed(image: np.ndarray, min_distance: int | None = None) -> np.ndarray:
    """Model-free instances: Otsu foreground (the minority class), split by a distance-transform watershed.

    Seeds are the distance transform's local maxima at least ``min_distance`` apart (default: a third
    of the median foreground piece's equivalent radius, at least 3 px), as in the usual scikit-image recipe.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    above, _ = otsu_split(image)
    foreground = above if above.mean() <= 0.5 else ~above
    foreground = ndi.binary_opening(foreground, iterations=1)
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    distance = ndi.distance_transform_edt(foreground)
    if min_distance is None:
        pieces, n = ndi.label(foreground)
        areas = np.bincount(pieces.ravel())[1:]
        radius = float(np.sqrt(np.median(areas) / np.pi)) if n else 3.0
        min_distance = max(3, int(round(radius / 1.5)))
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndi.label(foreground)[0], exclude_border=False)
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=foreground).astype(np.int32)


# ------------------------------------------------------------------------------------ instances
@dataclass(frozen=True)
class InstanceMatch:
    """Matching of predicted to reference instances at one IoU threshold."""

    n_reference: int
    n_predicted: int
    true_positives: int
    mean_matched_iou: float  # NaN without matches

    @property
    def f1(self) -> float:
        total = self.n_reference + self.n_predicted
        return 1.0 if total == 0 else 2.0 * self.true_positives / total

    @property
    def count_error(self) -> float:
        """|n_pred - n_ref| / n_ref (inf when the reference is empty but something was predicted)."""
        if self.n_reference == 0:
            return 0.0 if self.n_predicted == 0 else float("inf")
        return abs(self.n_predicted - self.n_reference) / self.n_reference


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Ids made consecutive 1..n (0 stays background)."""
    values, inverse = np.unique(np.asarray(labels), return_inverse=True)
    inverse = inverse.reshape(np.shape(labels))
    return inverse if values[0] == 0 else inverse + 1


def match_instances(reference: np.ndarray, predicted: np.ndarray, threshold: float = 0.5) -> InstanceMatch:
    """Match two label images (same shape) at IoU > ``threshold`` (>= 0.5, so matches are unique)."""
    if threshold < 0.5:
        raise ValueError("match_instances() needs an IoU threshold of at least 0.5 (unique matches)")
    reference, predicted = _relabel(reference), _relabel(predicted)
    if reference.shape != predicted.shape:
        raise ValueError(f"label images differ in shape: {reference.shape} vs {predicted.shape}")
    n_ref, n_pred = int(reference.max()), int(predicted.max())
    if n_ref == 0 or n_pred == 0:
        return InstanceMatch(n_ref, n_pred, 0, float("nan"))
    overlap = np.bincount(reference.ravel() * (n_pred + 1) + predicted.ravel(),
                          minlength=(n_ref + 1) * (n_pred + 1)).reshape(n_ref + 1, n_pred + 1)
    ref_area, pred_area = overlap.sum(axis=1), overlap.sum(axis=0)
    inter = overlap[1:, 1:].astype(np.float64)
    union = ref_area[1:, None] + pred_area[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    matched = iou[iou > threshold]
    return InstanceMatch(n_ref, n_pred, int(matched.size), float(matched.mean()) if matched.size else float("nan"))


def heldout_instance_match(annotated: np.ndarray, heldout: Sequence[int], predicted: np.ndarray, *,
                           fully_annotated: bool = False, threshold: float = 0.5) -> InstanceMatch:
    """Predicted instances scored against the held-out objects of a partly annotated plane.

    Only what the annotation can judge counts: a predicted object matched to a held-out object at IoU >
    ``threshold`` is a true positive; one that overlaps held-out objects more than any trained
    (not held-out) object, without matching, is a false positive; predicted objects on unannotated pixels
    are false positives only when the plane is ``fully_annotated`` (otherwise they may be objects nobody
    labelled). ``n_reference`` is the number of held-out objects; ``n_predicted`` the predictions that count.
    """
    annotated, predicted = np.asarray(annotated), _relabel(np.asarray(predicted))
    if annotated.shape != predicted.shape:
        raise ValueError(f"label images differ in shape: {annotated.shape} vs {predicted.shape}")
    held = np.isin(annotated, list(heldout)) & (annotated > 0)
    reference = _relabel(np.where(held, annotated, 0))
    n_ref, n_pred = int(reference.max()), int(predicted.max())
    if n_pred == 0:
        return InstanceMatch(n_ref, 0, 0, float("nan"))
    on_held = np.bincount(predicted[held], minlength=n_pred + 1)
    on_trained = np.bincount(predicted[(annotated > 0) & ~held], minlength=n_pred + 1)
    area = np.bincount(predicted.ravel(), minlength=n_pred + 1)
    judged = on_held > on_trained
    if fully_annotated:
        judged |= (on_held == 0) & (on_trained == 0) & (area > 0)
    judged[0] = False
    kept = np.where(judged[predicted], predicted, 0)
    match = match_instances(reference, kept, threshold) if n_ref else InstanceMatch(0, int(judged.sum()), 0, float("nan"))
    return InstanceMatch(n_ref, int(judged.sum()), match.true_positives, match.mean_matched_iou)


# ------------------------------------------------------------------------------------- prompts
def _dice_with_spill(crop: np.ndarray, target: np.ndarray, outside: int) -> float:
    """Dice of a mask cut to the scoring crop, counting its pixels outside the crop as false positives."""
    total = int(crop.sum()) + outside + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(crop, target).sum()) / total


def prompt_scores(session, image: np.ndarray, labels: np.ndarray, label: int, *, window="auto", contrast_limits=None,
                  box: Box | None = None, above: np.ndarray | None = None) -> dict:
    """One object's box-prompt and click Dice through ``session.segment`` (as the widget sends them: the
    object's tight box; one click on its deepest interior pixel), beside the ellipse in the box and the
    Otsu component under the click. ``box``: the object's tight box when known; ``above``: the plane's
    Otsu split (``otsu_split``) when scoring many objects of one plane."""
    if box is None:
        box = instance_boxes((np.asarray(labels) == label).astype(np.uint8))[1]
    y0, x0, y1, x1 = box
    # score inside a margin around the object: the same Dice as on the whole plane, far less work
    m = max(y1 - y0, x1 - x0) + 16
    r0, c0 = max(0, y0 - m), max(0, x0 - m)
    r1, c1 = min(labels.shape[0], y1 + m + 1), min(labels.shape[1], x1 + m + 1)
    target = labels[r0:r1, c0:c1] == label
    point = tuple(int(v) for v in np.add(interior_point(target), (r0, c0)))
    by_box = session.segment(image, box=[y0, x0, y1, x1], window=window, contrast_limits=contrast_limits)
    by_click = session.segment(image, points=[list(point)], point_labels=[1], window=window,
                               contrast_limits=contrast_limits)
    if above is None:
        above, _ = otsu_split(image)
    ellipse = ellipse_in_box((y0 - r0, x0 - c0, y1 - r0, x1 - c0), target.shape)
    component = otsu_component(image, point, above)

    def spill(mask: np.ndarray) -> float:
        inside = mask[r0:r1, c0:c1]
        return _dice_with_spill(inside, target, int(mask.sum()) - int(inside.sum()))

    return {
        "label": int(label), "area": int(target.sum()), "extent": int(max(y1 - y0, x1 - x0) + 1),
        "box_dice": spill(by_box.mask), "ellipse_dice": dice(ellipse, target),
        "point_dice": spill(by_click.mask), "otsu_dice": spill(component),
        "window": list(by_click.window) if getattr(by_click, "window", None) is not None else None,
    }
