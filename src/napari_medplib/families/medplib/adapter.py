"""`MedPLIBFamily`: the `families.base.ModelFamily` of MedPLIB models (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...engine.errors import SessionInputError
from ...engine.image import ModelView
from ..base import AskRequest, Caches, Generated, SegmentRequest, Turn
from . import familiarity, features, generation, grounding, planes, regions, segment


def familiarity_width(model) -> int:
    """Width of the familiarity descriptor this model makes (mean + std of CLIP patches and image tokens,
    and the CLIP input's statistics)."""
    return 2 * (int(model.config.vision_config["hidden_size"]) + int(model.config.hidden_size)) \
        + familiarity.N_PIXEL_STATS


class MedPLIBFamily:
    """One MedPLIB model (CLIP + LLaMA-MoE + region encoder + SAM-Med2D) and the session's caches."""

    batches_planes = True

    def __init__(self, info, model, caches: Caches, template: str | None = None) -> None:
        from ...model.tokenizer import get_template

        if getattr(model, "sam", None) is None:
            raise SessionInputError("the model has no SAM-Med2D; build it with a sam= module")
        self.template = template or "medplib_v1"
        get_template(self.template)  # fail early on an unknown template name
        self.info = info
        self.capabilities = info.capabilities
        self.model = model.eval()
        if getattr(model, "region_encoder", None) is not None:
            model.region_encoder.on_empty = "zero"  # reported in Reply.warnings instead
        self.caches = caches
        self.clip = features.clip_settings(model)
        self.familiarity = familiarity.load(model.config.folder, familiarity_width(model))
        self.region_view = "auto"  # or "plane": regions of large planes read on the whole plane (region_view)

    def fingerprint(self) -> str:
        from ...engine.loading import model_fingerprint

        return model_fingerprint(self.model)

    def inference(self):
        import torch

        return torch.inference_mode()

    def close(self) -> None:
        self.model = None

    # ---- the image and its encoders ----------------------------------------------------------
    def prepare_image(self, image, contrast_limits, rgb) -> ModelView:
        return features.prepare_image(self, image, contrast_limits, rgb)

    def clip_features(self, view: ModelView, on_progress=None):
        return features.clip_features(self, view, on_progress)

    def sam_embedding(self, view: ModelView, on_progress=None):
        return features.sam_embedding(self, view, on_progress)

    def prefix(self, view: ModelView, template: str, ids: list[int], image_features):
        return features.prefix(self, view, template, ids, image_features)

    def embed(self, plane: ModelView, on_progress=None) -> None:
        self.clip_features(plane, on_progress)
        self.sam_embedding(plane, on_progress)

    # ---- an answer ---------------------------------------------------------------------------
    def check_request(self, request: AskRequest) -> AskRequest:
        return generation.check_request(self, request)

    def build_prompt(self, turn: Turn) -> generation.Prompt:
        request = turn.request
        return generation.build_prompt(self, request.question, len(turn.regions), request.template, request.history)

    def encode_regions(self, turn: Turn) -> regions.RegionInputs:
        return regions.encode_regions(self, turn.regions, turn.plane, turn.prompt.order, turn.on_progress)

    def generate(self, turn: Turn) -> Generated:
        return generation.generate(self, turn)

    def decode_masks(self, turn: Turn) -> dict[str, Any]:
        return grounding.decode_masks(self, turn)

    def ground(self, seg_hidden, view: ModelView, mask_mode: str, on_progress=None, seg_regions: Sequence = ()):
        return grounding.ground(self, seg_hidden, view, mask_mode, on_progress, seg_regions)

    def ask_batch(self, plane_list, region_list, request: AskRequest, stop: Callable[[], bool]):
        return planes.ask_batch(self, plane_list, region_list, request, stop)

    # ---- direct prompts ----------------------------------------------------------------------
    def segment(self, request: SegmentRequest):
        return segment.segment(self, request)

    def decode_view(self, view: ModelView, pts, labels, box_arr, prior, multimask: bool, mask_mode: str,
                    on_progress, timings: dict[str, float]):
        return segment.decode_view(self, view, pts, labels, box_arr, prior, multimask, mask_mode, on_progress, timings)

    def clicked_extent(self, plane: ModelView, points, labels) -> float | None:
        return segment.clicked_extent(self, plane, points, labels)
