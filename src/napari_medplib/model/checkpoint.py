"""Read a MedPLIB checkpoint folder (released layout or ours) and map its keys onto our modules.

Released layout (``save_pretrained`` of transformers 4.31): sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json``
(read only with ``torch.load(weights_only=True)``), or a single file. Key mapping:

=====================================================================  ==========================================
released                                                               ours
=====================================================================  ==========================================
``model.embed_tokens`` / ``model.norm`` / ``lm_head``                  ``language_model.{embed_tokens,norm,lm_head}``
``model.layers.{i}.mlp.deepspeed_moe.gate.wg``                         ``language_model.layers.{i}.mlp.router``
``model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}``   ``language_model.layers.{i}.mlp.experts.{e}``
``model.layers.{i}.mlp.meta_moe`` (Med-MoE)                            ``language_model.layers.{i}.mlp.shared_expert``
``model.layers.{i}.*``                                                 ``language_model.layers.{i}.*``
``model.vision_tower.vision_tower.vision_model.*``                     ``vision_tower.clip.*``
``model.mm_projector.*``                                               ``mm_projector.*``
``model.region_fea_adapter.*``                                         ``region_encoder.adapter.*``
``model.text_hidden_fcs.0.*``                                          ``text_hidden_fcs.*``
``model.visual_model.*``                                               SAM-Med2D (``load_sam_med2d``, prefix removed)
``model.layers.{i}.self_attn.rotary_emb.inv_freq``                     checked against rope_theta, then dropped
=====================================================================  ==========================================

No network access, ever; never ``trust_remote_code``.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import CheckpointError, MedPLIBConfig

__all__ = ["CheckpointError", "empty_parameters", "load_checkpoint_state", "load_into", "map_released_key"]

SAM_PREFIX = "sam."
OUR_PREFIXES = ("language_model.", "vision_tower.", "mm_projector.", "region_encoder.", "text_hidden_fcs.", "counter.", SAM_PREFIX)
_MOE = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.(gate\.wg|experts\.deepspeed_experts\.(\d+))\.(.+)$")
_META = re.compile(r"^model\.layers\.(\d+)\.mlp\.meta_moe\.(.+)$")
_INV_FREQ = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------- files
def weight_files(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a folder and, if there is an index, its key -> file map."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist; give the path of a downloaded MedPLIB checkpoint")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
                raise CheckpointError(f"{index_path} is not a valid shard index ({type(err).__name__}: {err})") from None
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{index_path} is not a valid shard index: 'weight_map' must map names to file names")
            files = [_shard_path(folder, index_name, name) for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{folder} is incomplete: {index_name} lists shard(s) {', '.join(missing)} that are not in the "
                    "folder. Download the missing file(s) again."
                )
            return files, weight_map
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single], None
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )


def _shard_path(folder: Path, index_name: str, name: str) -> Path:
    """A shard named by the index: a file of the model folder, never a path outside it.

    Checked on the names, not on resolved paths: the Hugging Face cache keeps each file of a model
    folder as a link to a blob outside it, which is fine; an index naming ``../x`` or ``/x`` is not.
    """
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or Path(name).drive or ".." in parts or "\\" in name or "\x00" in name:
        raise CheckpointError(
            f"{folder / index_name} names the shard {name!r}, which is outside the model folder; "
            "shards must be files of the folder (re-download the model)"
        )
    return folder / name


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); download it again") from None
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle errors, refused globals, truncated files
        raise CheckpointError(
            f"{path} could not be read as plain tensors with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). It is corrupt or holds code objects; convert it to "
            "safetensors with a trusted tool."
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    yield from state.items()


# ---------------------------------------------------------------------------- keys
def moe_llava_key(key: str, meta_name: str) -> str | None:
    """A DeepSpeed MoE key of the MoE-LLaVA layout (MedPLIB, Med-MoE) -> ours; None for any other key.

    ``...mlp.deepspeed_moe.gate.wg.*`` -> ``...mlp.router.*``, ``...deepspeed_experts.K.*`` ->
    ``...mlp.experts.K.*``, and ``...mlp.meta_moe.*`` -> ``...mlp.<meta_name>.*``.
    """
    match = _MOE.match(key)
    if match:
        layer, what, expert, rest = match.groups()
        target = "router" if what == "gate.wg" else f"experts.{expert}"
        return f"language_model.layers.{layer}.mlp.{target}.{rest}"
    match = _META.match(key)
    if match:
        return f"language_model.layers.{match.group(1)}.mlp.{meta_name}.{match.group(2)}"
    return None


def map_released_key(key: str) -> str | None:
    """Released (or our) key -> our key; SAM keys get the ``sam.`` prefix; ``None`` = ignore."""
    if key.startswith(OUR_PREFIXES):
        return key
    if _INV_FREQ.match(key):
        return None
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    moe = moe_llava_key(key, "shared_expert")
    if moe is not None:
        return moe
    for old, new in (
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower.clip."),
        ("model.vision_tower.vision_tower.", "vision_tower.clip."),
        ("model.visual_model.", SAM_PREFIX),
        ("model.mm_projector.", "mm_projector."),
        ("model.region_fea_adapter.", "region_encoder.adapter."),
        ("model.region_geometry.", "region_encoder.geometry."),
        ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
        ("model.embed_tokens.", "language_model.embed_tokens."),
        ("model.norm.", "language_model.norm."),
        ("model.layers.", "language_model.layers."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # unknown: reported as unexpected


def load_checkpoint_state(
    folder: str | Path, config: MedPLIBConfig, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], dict[str, str] | None]:
    """Read every weight file: (our state dict, SAM state dict without prefix, our key -> file name,
    index weight map). Tensors are cast to ``dtype`` (routers stay float32) and moved to ``device``
    one by one, so a 7B model never sits in host memory twice."""
    files, weight_map = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    sam_state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    expected_inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    for path in files:
        for key, tensor in _read_file(path):
            if _INV_FREQ.match(key):
                if tensor.shape != expected_inv_freq.shape or not torch.allclose(tensor.float(), expected_inv_freq, rtol=1e-3):
                    warnings.warn(f"{path.name}: {key} does not match rope_theta={config.rope_theta}", stacklevel=2)
                continue
            new_key = map_released_key(key)
            if new_key is None:
                continue
            if dtype is not None and tensor.is_floating_point():
                keep_fp32 = ".mlp.router." in new_key
                tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
            if device is not None:
                tensor = tensor.to(device)
            if new_key.startswith(SAM_PREFIX):
                sam_state[new_key[len(SAM_PREFIX) :]] = tensor
            else:
                state[new_key] = tensor
            origin[new_key] = path.name
    if not any(k.startswith("language_model.layers.") for k in state):
        raise CheckpointError(
            f"{folder} is not a MedPLIB checkpoint: its weights have no LLaMA decoder layers (model.layers.*)"
        )
    return state, sam_state, origin, weight_map


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    origin: dict[str, str] | None = None,
    weight_map: dict[str, str] | None = None,
) -> None:
    """Strictly load ``state`` into ``model`` (assigning tensors, so meta parameters get real ones).

    Raises one ``CheckpointError`` listing missing, unexpected and mis-shaped keys with their files
    (for a missing key, the shard that the index says should hold it).
    """
    origin = origin or {}
    indexed = {}
    for key, file_name in (weight_map or {}).items():
        mapped = map_released_key(key)
        if mapped is not None:
            indexed[mapped] = file_name
            indexed[mapped.replace("vision_tower.clip.vision_model.", "vision_tower.clip.", 1)] = file_name
    expected = model.state_dict(keep_vars=True)
    # transformers 4 CLIP keys carry ``vision_model.``; transformers 5's CLIPVisionModel has none.
    for key in list(state):
        if key.startswith("vision_tower.clip.") and key not in expected:
            alt = key.replace("vision_tower.clip.vision_model.", "vision_tower.clip.", 1)
            alt = alt if alt in expected else key.replace("vision_tower.clip.", "vision_tower.clip.vision_model.", 1)
            if alt in expected:
                state[alt] = state.pop(key)
                if key in origin:
                    origin[alt] = origin.pop(key)
    non_persistent = {n for n, _ in model.named_buffers() if n not in expected}
    missing = [
        f"{k} (the index puts it in {indexed[k]}, which lacks it)" if k in indexed else k
        for k in expected
        if k not in state and k not in non_persistent
    ]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {origin.get(k, '?')} has {tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        raise CheckpointError(_report(missing, unexpected, misshaped, origin))
    model.load_state_dict(state, strict=False, assign=True)


def _report(missing: list[str], unexpected: list[str], misshaped: list[str], origin: dict[str, str], limit: int = 12) -> str:
    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {i}" for i in items[:limit]) + more

    parts = ["the checkpoint does not fit the model built from its config.json:"]
    if misshaped:
        parts.append(block("wrong shape", misshaped))
    if missing:
        parts.append(block("missing", missing))
    if unexpected:
        parts.append(block("unexpected", [f"{k} (in {origin.get(k, '?')})" for k in unexpected]))
    files = sorted(
        {origin[k] for k in unexpected if k in origin}
        | {m.split(": file ")[1].split(" ")[0] for m in misshaped}
        | {m.split("the index puts it in ")[1].split(",")[0] for m in missing if "the index puts it in " in m}
    )
    if files:
        parts.append(f"  files involved: {', '.join(files)}")
    parts.append("  Fix: config.json and the weight files must come from the same model; re-download the folder.")
    return "\n".join(parts)


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init cost); buffers
    stay real. The parameters are replaced by ``load_into`` (``assign=True``). Only modules built by
    the calling thread are affected (napari builds widgets on other threads meanwhile)."""
    original = nn.Module.register_parameter
    owner = threading.get_ident()

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and threading.get_ident() == owner:
            meta = module._parameters[name].to("meta")
            module._parameters[name] = nn.Parameter(meta, requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
