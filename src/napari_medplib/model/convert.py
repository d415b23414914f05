"""Write a MedPLIB model to a folder: our clean safetensors layout, or the released key layout.

``python -m napari_medplib.model.convert SRC DST`` turns a released checkpoint (e.g. bf16 ``.bin``
shards) into our layout: one config.json (with the CLIP ``vision_config`` inlined, so no CLIP
folder is needed), the tokenizer files, and safetensors shards keyed by our module names
(SAM-Med2D under ``sam.`` with its reference names).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")
_OUR_MOE = re.compile(r"^language_model\.layers\.(\d+)\.mlp\.(router|experts\.(\d+)|shared_expert)\.(.+)$")


def to_released_key(key: str) -> str:
    """Our key -> the released checkpoint's key (inverse of ``checkpoint.map_released_key``)."""
    match = _OUR_MOE.match(key)
    if match:
        layer, what, expert, rest = match.groups()
        if what == "router":
            return f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.{rest}"
        if what == "shared_expert":
            return f"model.layers.{layer}.mlp.meta_moe.{rest}"
        return f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{expert}.{rest}"
    for ours, released in (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.", "model."),
        ("vision_tower.clip.vision_model.", "model.vision_tower.vision_tower.vision_model."),
        ("vision_tower.clip.", "model.vision_tower.vision_tower.vision_model."),
        ("mm_projector.", "model.mm_projector."),
        ("region_encoder.adapter.", "model.region_fea_adapter."),
        ("region_encoder.geometry.", "model.region_geometry."),
        ("text_hidden_fcs.", "model.text_hidden_fcs.0."),
        ("sam.", "model.visual_model."),
    ):
        if key.startswith(ours):
            return released + key[len(ours) :]
    raise KeyError(f"no released name for {key!r}")


def model_state(model, layout: str = "ours") -> dict[str, torch.Tensor]:
    """All weights (SAM included, under its reference names) in ``layout`` "ours" or "released"."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("sam.")}
    if model.sam is not None:
        from .sam import our_key_to_reference

        for key, value in model.sam.state_dict().items():
            state["sam." + our_key_to_reference(key, model.sam.config)] = value
    if layout == "released":
        state = {to_released_key(k): v for k, v in state.items()}
    elif layout != "ours":
        raise ValueError(f"layout must be 'ours' or 'released', got {layout!r}")
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_pretrained(
    model, folder: str | Path, layout: str = "ours", max_shard_bytes: int = 5 * 2**30, safe_serialization: bool = True,
    tokenizer_folder: str | Path | None = None,
) -> Path:
    """Write config.json, tokenizer files and (sharded) weights; returns the folder. Each file is written to a
    temporary name in the folder and renamed, so a failed save leaves earlier files whole."""
    from ..atomic import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True))
    source = Path(tokenizer_folder or model.config.folder or "")
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and source.resolve() != folder.resolve():
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(source / name, tmp)
    state = model_state(model, layout)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        if safe_serialization:
            from safetensors.torch import save_file

            with atomic_path(folder / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            with atomic_path(folder / name) as tmp:
                torch.save(shard, tmp)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard},
        }
        atomic_write_text(folder / f"{stem}.{ext}.index.json", json.dumps(index, indent=2, sort_keys=True))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a MedPLIB checkpoint folder to napari-medplib's layout")
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default bfloat16)")
    parser.add_argument("--layout", default="ours", choices=("ours", "released"))
    args = parser.parse_args(argv)
    from .medplib import MedPLIBModel

    model = MedPLIBModel.from_pretrained(args.source, dtype=args.dtype)
    save_pretrained(model, args.destination, layout=args.layout, tokenizer_folder=args.source)
    print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
