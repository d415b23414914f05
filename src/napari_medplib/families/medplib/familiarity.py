"""Does this image look like the microscopy the model learnt? A calibrated check that decides "I can't tell".

Why: a learnt "I can't tell" (training shows noise and photographs with that answer) fires on unfamiliar
*microscopy* about as often as on noise, and stays silent on many photographs: the decision is made by a
tiny language model from one question's wording. A decline should depend on the image only. So the
model folder may hold a small linear classifier on the vision tower's own features
(``familiarity.safetensors``, fitted by ``scripts/calibrate_familiarity.py``):

* the **descriptor** of an image is the mean and standard deviation over patches of the CLIP patch
  features and of the projected image tokens, ``[2 * (clip width + LLM width)]``, and ten statistics of
  the CLIP input itself (intensity skewness and kurtosis, autocorrelation at 1-16 px, colour spread,
  clipped shares): the tiny vision tower alone places noise close to blurred fluorescence, and these
  separate structure from noise at no cost;
* a logistic regression gives P(unlike the training microscopy); above ``threshold`` the image is
  **unfamiliar**.

How the MedPLIB family uses it (`gate`), in three zones of that probability:

* above ``threshold`` (confidently unlike): every question is answered "I can't tell from this image."
  without decoding (no masks);
* below ``answer_below`` (confidently familiar): a question without regions may not start with that
  answer's first token, so the image always gets an answer (a question about a region may still be
  declined, e.g. a box on empty background);
* in between: the model's own answer, its learnt "I can't tell" included.

Without the file nothing changes. Both thresholds are chosen on held-out groups of the calibration data
(``scripts/calibrate_familiarity.py``, ``docs/real-vqa.md``): a decline must be rare on microscopy from a
source the check never saw, since a whole image goes unanswered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...engine.errors import InvalidModelError

FILE = "familiarity.safetensors"
DESCRIPTOR = "clip-patch+image-tokens/mean+std+pixel-stats/v2"
N_PIXEL_STATS = 10
DEFAULT_THRESHOLD = 0.8
MAX_WIDTH = 1 << 16  # refuse a file whose declared descriptor width is over this (a malformed file)


def pixel_statistics(pixel_values) -> Any:
    """CLIP input [B, 3, H, W] -> [B, 10]: skewness and kurtosis of the standardised grey image, its
    autocorrelation at 1, 2, 4, 8, 16 px, the colour spread, and the shares of pixels within 2 % of the
    darkest and the brightest value."""
    import torch

    x = pixel_values.detach().double()
    grey = x.mean(1)  # [B, H, W]
    flat = grey.flatten(1)
    z = (grey - flat.mean(1)[:, None, None]) / (flat.std(1)[:, None, None] + 1e-6)
    columns = [(z ** 3).flatten(1).mean(1), (z ** 4).flatten(1).mean(1)]
    for lag in (1, 2, 4, 8, 16):
        across = (z[:, :, lag:] * z[:, :, :-lag]).flatten(1).mean(1)
        down = (z[:, lag:] * z[:, :-lag]).flatten(1).mean(1)
        columns.append((across + down) / 2)
    columns.append((x - x.mean(1, keepdim=True)).abs().flatten(1).mean(1) / (x.flatten(1).std(1) + 1e-6))
    low, high = z.flatten(1).min(1).values, z.flatten(1).max(1).values
    span = (high - low)[:, None, None]
    columns.append((z <= low[:, None, None] + 0.02 * span).flatten(1).double().mean(1))
    columns.append((z >= high[:, None, None] - 0.02 * span).flatten(1).double().mean(1))
    return torch.stack(columns, dim=1)


def descriptors(features, pixel_stats) -> Any:
    """`ImageFeatures` [B, ...] and their CLIP input's `pixel_statistics` [B, 10] -> float64 descriptors
    [B, width]."""
    import torch

    patch = features.patch_features.detach().double()  # [B, P, C]
    tokens = features.image_tokens.detach().double()  # [B, T, D]
    return torch.cat([patch.mean(1), patch.std(1), tokens.mean(1), tokens.std(1),
                      pixel_stats.to(patch.device)], dim=-1)


def of_views(family, views, features) -> Any:
    """Descriptors [B, width] of model views whose (batched) CLIP features are ``features``; each view's
    pixel statistics are cached with its features (the CLIP input is not prepared again per question)."""
    import torch

    from ...model.preprocess import prepare_clip_image

    def stats_of(view):
        clip = prepare_clip_image(view.rgb, family.clip.size, family.clip.mean, family.clip.std)
        return pixel_statistics(clip.pixel_values)

    cache = family.caches.features
    stats = [cache.get_or_compute(("pixel-stats", v.key), lambda v=v: stats_of(v)) for v in views]
    return descriptors(features, torch.cat(stats))


@dataclass
class Familiarity:
    """A fitted check: standardisation, logistic weights, the decision threshold."""

    mean: Any  # [F] float64
    scale: Any  # [F]
    weight: Any  # [F]
    bias: float
    threshold: float = DEFAULT_THRESHOLD  # above: decline without decoding
    answer_below: float | None = None  # below: always answer (None: the threshold, two zones)

    @property
    def familiar_below(self) -> float:
        return self.threshold if self.answer_below is None else min(self.answer_below, self.threshold)

    @property
    def width(self) -> int:
        return int(self.mean.shape[0])

    def probability(self, descriptor) -> Any:
        """descriptors [B, F] -> P(unlike the training microscopy) [B]."""
        import torch

        z = (descriptor.double() - self.mean) / self.scale
        return torch.sigmoid(z @ self.weight + self.bias)

    def unfamiliar(self, descriptor) -> list[bool]:
        """descriptors [B, F] -> per image: is it unlike the training microscopy?"""
        return [bool(p > self.threshold) for p in self.probability(descriptor)]

    def save(self, folder: str | Path) -> Path:
        """Write ``familiarity.safetensors`` into a model folder (temporary file, then rename)."""
        import torch
        from safetensors.torch import save_file

        from ...atomic import atomic_path

        path = Path(folder) / FILE
        tensors = {"mean": self.mean.double().contiguous(), "scale": self.scale.double().contiguous(),
                   "weight": self.weight.double().contiguous(),
                   "bias": torch.tensor([float(self.bias)], dtype=torch.float64)}
        meta = {"descriptor": DESCRIPTOR, "threshold": json.dumps(float(self.threshold)),
                "answer_below": json.dumps(float(self.familiar_below))}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


class FamiliarityError(InvalidModelError):
    """``familiarity.safetensors`` is malformed or made for another model (a model folder error: the
    session does not load, with the fix in the message)."""


def load(folder: str | Path | None, width: int | None = None) -> Familiarity | None:
    """The check stored in a model folder; None when the folder has none. ``width``: the descriptor width
    the model makes; a file for another width raises `FamiliarityError` naming the fix."""
    if not folder:
        return None
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if names != {"mean", "scale", "weight", "bias"}:
                raise FamiliarityError(f"{path} holds {sorted(names)}, not mean / scale / weight / bias")
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
            declared = shapes["mean"][0] if len(shapes["mean"]) == 1 else -1
            if not 0 < declared <= MAX_WIDTH or any(shapes[n] != (declared,) for n in ("scale", "weight")) \
                    or shapes["bias"] != (1,):
                raise FamiliarityError(f"{path} has tensors of shapes {shapes}; expected three [F] and one [1]")
            tensors = {n: f.get_tensor(n).double() for n in names}
    except FamiliarityError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise FamiliarityError(f"{path} could not be read ({err}); delete it or run "
                               "scripts/calibrate_familiarity.py for this model") from None
    if meta.get("descriptor") != DESCRIPTOR:
        raise FamiliarityError(f"{path} was made for descriptor {meta.get('descriptor')!r}, this version reads "
                               f"{DESCRIPTOR!r}; run scripts/calibrate_familiarity.py for this model again")
    if width is not None and declared != width:
        raise FamiliarityError(f"{path} expects {declared}-wide image descriptors but this model makes {width}; "
                               "it belongs to another model: delete it or calibrate this model")
    if bool((tensors["scale"] <= 0).any()):
        raise FamiliarityError(f"{path} has a non-positive scale; calibrate this model again")
    threshold = float(json.loads(meta.get("threshold", str(DEFAULT_THRESHOLD))))
    answer_below = float(json.loads(meta.get("answer_below", str(threshold))))
    if not 0 < answer_below <= threshold < 1:
        raise FamiliarityError(f"{path} has thresholds {answer_below} / {threshold}; they must satisfy "
                               "0 < answer_below <= threshold < 1")
    return Familiarity(tensors["mean"], tensors["scale"], tensors["weight"], float(tensors["bias"][0]), threshold,
                       answer_below)


def fit(microscopy, unknown, l2: float = 0.01, threshold: float = DEFAULT_THRESHOLD,
        answer_below: float | None = None) -> Familiarity:
    """Logistic regression of unknown (1) vs microscopy (0) descriptors ([N, F] / [M, F]), classes weighted
    equally, L2 on the standardised weights; full-batch L-BFGS (deterministic)."""
    import torch

    x_pos = torch.as_tensor(unknown, dtype=torch.float64)
    x_neg = torch.as_tensor(microscopy, dtype=torch.float64)
    if len(x_pos) == 0 or len(x_neg) == 0:
        raise ValueError("fit needs descriptors of both microscopy and images unlike it")
    x = torch.cat([x_neg, x_pos])
    y = torch.cat([torch.zeros(len(x_neg)), torch.ones(len(x_pos))]).double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    sample_weight = torch.where(y > 0, 0.5 / len(x_pos), 0.5 / len(x_neg))
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y, weight=sample_weight,
                                                                     reduction="sum")
        loss = loss + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return Familiarity(mean, scale, weight.detach(), float(bias.detach()), threshold, answer_below)


# ---- how the MedPLIB family uses it ------------------------------------------------------------------

def decline_text() -> str:
    from ...train.wording import CANT_TELL

    return CANT_TELL


def _decline_ids(tokenizer) -> list[int]:
    """The decline's token ids as an answer has them (without what encoding adds, e.g. ``<s>``)."""
    added = set(tokenizer.encode(""))
    return [i for i in tokenizer.encode(decline_text()) if i not in added]


def decline_first_token(tokenizer) -> tuple[int, ...]:
    """The id of the decline's first token (what a familiar image's answer may not start with)."""
    return tuple(_decline_ids(tokenizer)[:1])


def gate(family, views, features, has_regions: bool) -> tuple[list[bool], list[tuple[int, ...]]]:
    """Per view: (decline without decoding, the token ids its answer may not start with);
    ``features``: the views' batched whole-plane `ImageFeatures`."""
    check = getattr(family, "familiarity", None)
    if check is None:
        return [False] * len(views), [()] * len(views)
    p = check.probability(of_views(family, views, features)).tolist()
    first = () if has_regions else decline_first_token(family.model.tokenizer)
    return [v > check.threshold for v in p], [first if v < check.familiar_below else () for v in p]


def declined_result(family, hidden):
    """A `GenerationResult` that declines, as decoding it would look (no ``<SEG>``, no experts)."""
    from ...model.generation import GenerationResult

    ids = _decline_ids(family.model.tokenizer)
    return GenerationResult(ids=ids, text=decline_text(), finish_reason="eos",
                            step_hidden=hidden.new_zeros((0, hidden.shape[-1])), expert_counts=None, all_ids=list(ids))
