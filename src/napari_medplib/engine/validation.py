"""Checks of what a caller hands the engine, and of what a model folder declares, before any work.

Session inputs (each raises :class:`SessionInputError` with a one-line message and the fix):

* :func:`check_image` - an image with no pixels (a 0-size plane or a 0-size crop);
* :func:`check_contrast_limits` - contrast limits must be finite and not reversed (``low <= high``),
  one pair or one pair per channel;
* :func:`check_temperature` - the sampling temperature must be a finite number >= 0;
* :func:`check_question` - a question with words in it, and a known mask mode;
* :func:`check_plane` - an image given, with pixels, and usable contrast limits.

Model folders: :func:`check_model_config` compares the sizes a ``config.json`` declares with
:data:`CONFIG_LIMITS` before a single module is built (defined in ``model.config`` and
``model.config_limits``, below the engine, and re-exported here).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..model.config import check_model_config
from ..model.config_limits import CONFIG_LIMITS, MAX_EXPERTS, config_problems
from .errors import SessionInputError

__all__ = [
    "CONFIG_LIMITS", "MASK_MODES", "MAX_EXPERTS", "check_contrast_limits", "check_image", "check_mask_mode",
    "check_model_config", "check_plane", "check_question", "check_temperature", "config_problems",
]

#: How masks are brought back from the decoder's low-resolution logits (``image.low_res_to_masks``).
MASK_MODES = ("corrected", "reference")


def check_image(image: Any) -> None:
    """Refuse an image without pixels (any axis of size 0)."""
    shape = np.shape(image)
    if len(shape) >= 2 and 0 in shape:
        raise SessionInputError(
            f"the image has shape {tuple(shape)}, which holds no pixels; pass a plane of at least 1 x 1 pixels"
        )


def check_contrast_limits(contrast_limits: Any) -> None:
    """Refuse NaN/infinite or reversed contrast limits (None = automatic contrast, accepted)."""
    if contrast_limits is None:
        return
    try:
        limits = np.asarray(contrast_limits, dtype=np.float64)
    except (TypeError, ValueError):
        raise SessionInputError(
            f"contrast_limits must be numbers (low, high), got {contrast_limits!r}"
        ) from None
    if limits.shape[-1:] != (2,) or limits.ndim not in (1, 2):
        raise SessionInputError(
            f"contrast_limits must be one (low, high) pair or one pair per channel, got shape {limits.shape}"
        )
    if not np.isfinite(limits).all():
        raise SessionInputError(
            f"contrast_limits must be finite numbers, got {limits.tolist()}; reset the layer's contrast"
        )
    pairs = limits.reshape(-1, 2)
    bad = np.flatnonzero(pairs[:, 0] > pairs[:, 1])  # equal: a threshold, allowed
    if bad.size:
        low, high = pairs[bad[0]]
        raise SessionInputError(
            f"contrast_limits must go from low to high, got ({low:g}, {high:g}); give (low, high) with low <= high"
        )


def check_temperature(temperature: Any) -> float:
    """The temperature as a float; refuses NaN, infinity, negatives and non-numbers."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise SessionInputError(f"temperature must be a number >= 0, got {temperature!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SessionInputError(
            f"temperature must be a finite number >= 0 (0 = always the most likely word), got {temperature!r}"
        )
    return value


def check_mask_mode(mask_mode: Any) -> None:
    """Refuse a mask mode other than :data:`MASK_MODES`."""
    if mask_mode not in MASK_MODES:
        raise SessionInputError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")


def check_question(question: Any, mask_mode: Any = "corrected") -> None:
    """Refuse an empty question (or not a string) and an unknown mask mode."""
    if not isinstance(question, str) or not question.strip():
        raise SessionInputError("the question is empty; type a question about the image")
    check_mask_mode(mask_mode)


def check_plane(image: Any, contrast_limits: Any = None) -> None:
    """Refuse a missing image, one without pixels, and unusable contrast limits."""
    if image is None:
        raise SessionInputError("no image given; pass one 2-D plane as a numpy array")
    check_image(np.asarray(image))
    check_contrast_limits(contrast_limits)
