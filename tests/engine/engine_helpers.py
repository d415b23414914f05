"""Helpers shared by the engine tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations


def force_seg(model, token: str = "<SEG>"):
    """Make greedy decoding pick ``token`` every step (a forward hook on lm_head); returns the handle."""
    import torch

    token_id = model.tokenizer.token_to_id(token)
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = 1e4
    return model.language_model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)


def spy_region_masks(model) -> list:
    """Record the (R, 336, 336) region masks the model's region encoder receives, one array per call
    (``model.encode_regions`` is wrapped on the instance)."""
    import numpy as np

    seen = []
    original = model.encode_regions

    def spy(patch_features, region_masks, *args, **kwargs):
        seen.append(np.asarray(region_masks).copy())
        return original(patch_features, region_masks, *args, **kwargs)

    model.encode_regions = spy
    return seen
