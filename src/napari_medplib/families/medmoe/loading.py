"""Load a released Med-MoE folder: config, tokenizer, MoE-LLaVA/DeepSpeed weights, the CLIP tower folder.

What the reference's loader does, and so what this one does (no network, never ``trust_remote_code``):

* weights: ``model.safetensors`` (sharded with an index, or one file) or ``pytorch_model*.bin``
  (read with ``weights_only=True``); key mapping:

  ==========================================================================  ====================================
  released                                                                    ours
  ==========================================================================  ====================================
  ``model.embed_tokens`` / ``lm_head``                                        ``language_model.{embed_tokens,lm_head}``
  ``model.final_layernorm`` (Phi) / ``model.norm`` (StableLM)                 ``language_model.norm``
  ``model.layers.{i}.mlp.deepspeed_moe.gate.wg``                              ``language_model.layers.{i}.mlp.router``
  ``model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}``        ``language_model.layers.{i}.mlp.experts.{e}``
  ``model.layers.{i}.mlp.meta_moe``                                           ``language_model.layers.{i}.mlp.meta_expert``
  ``model.layers.{i}.*``                                                      ``language_model.layers.{i}.*``
  ``model.mm_projector.image_spatial_proj.*`` (or ``model.mm_projector.*``)   ``mm_projector.*``
  ``model.image_tower.image_tower.vision_model.*``                            ignored (the tower folder wins)
  ==========================================================================  ====================================

* the CLIP tower comes from the folder named by ``mm_image_tower`` (config, processor settings and
  weights), as the reference loads it; the checkpoint's own tower copies are used only when that
  folder has no weights;
* the embedding and ``lm_head`` are cut to ``len(tokenizer)`` rows (the reference always calls
  ``resize_token_embeddings(len(tokenizer))``; Phi-2's config says 51200 rows, its tokenizer 50295);
* routers stay float32 whatever ``dtype`` is (the reference gate casts to fp32).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ...model.checkpoint import _read_file, _report, empty_parameters, moe_llava_key, weight_files
from ...model.config import CLIP_VIT_L14_336, CheckpointError
from .config import MedMoECheckpointError, MedMoEConfig
from .modeling import MedMoEModel
from .preprocess import ClipProcessorSettings

__all__ = ["MedMoETokenizer", "load", "map_released_key", "resolve_image_tower"]

_TOWER_PREFIX = "model.image_tower.image_tower."
_CLIP_VISION_FIELDS = set(CLIP_VIT_L14_336) | {"attention_dropout"}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return value
    return dtype


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logger and warnings about config.json fields it does not know."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------- tokenizer
class MedMoETokenizer:
    """The checkpoint's fast tokenizer, decoding as the reference's slow one does.

    transformers >= 5 skips ``clean_up_tokenization_spaces`` for BPE tokenizers and joins added tokens
    without spaces; the reference (transformers 4.37, slow ``CodeGenTokenizer``) does both, so we do them here.
    """

    def __init__(self, backend, clean_up_spaces: bool) -> None:
        self.backend = backend
        self.clean_up_spaces = clean_up_spaces
        added = getattr(backend, "added_tokens_decoder", {}) or {}
        self.special_ids = set(backend.all_special_ids)
        self.plain_added = {i: t.content for i, t in added.items() if not getattr(t, "special", False)}
        self.eos_token_id: int | None = backend.eos_token_id
        self.bos_token_id: int | None = backend.bos_token_id
        self.eos_token: str | None = backend.eos_token

    @classmethod
    def from_folder(cls, folder: str | Path) -> MedMoETokenizer:
        folder = Path(folder)
        files = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
        if not any((folder / f).is_file() for f in files):
            raise MedMoECheckpointError(
                f"{folder} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json); "
                "copy them from the released checkpoint"
            )
        config_path = folder / "tokenizer_config.json"
        tok_config = {}
        if config_path.is_file():
            try:
                tok_config = json.loads(config_path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise MedMoECheckpointError(f"{config_path} is not valid JSON ({err})") from None
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            with _quiet_transformers():  # it reads config.json too and warns that moe_llava_* is not its type
                backend = AutoTokenizer.from_pretrained(
                    str(folder), local_files_only=True, trust_remote_code=False, clean_up_tokenization_spaces=False
                )
        except Exception as err:  # unknown class, remote code only, missing merges ...
            if (folder / "tokenizer.json").is_file():
                backend = PreTrainedTokenizerFast(
                    tokenizer_file=str(folder / "tokenizer.json"),
                    **{k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(tok_config.get(k), str)},
                )
            else:
                raise MedMoECheckpointError(
                    f"the tokenizer in {folder} could not be loaded without running code from the folder "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Provide a tokenizer.json "
                    "(or vocab.json + merges.txt) next to the weights."
                ) from None
        return cls(backend, bool(tok_config.get("clean_up_tokenization_spaces", True)))

    def __len__(self) -> int:
        return len(self.backend)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with the tokenizer's own special-token rule (Phi-2: no BOS)."""
        return list(self.backend(text).input_ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special_ids)]
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.plain_added:  # the slow tokenizer decodes added tokens as separate, space-joined pieces
                if run:
                    pieces.append(self.backend.decode(run, clean_up_tokenization_spaces=False))
                    run = []
                pieces.append(self.plain_added[i])
            else:
                run.append(i)
        if run:
            pieces.append(self.backend.decode(run, clean_up_tokenization_spaces=False))
        text = " ".join(pieces)
        if self.clean_up_spaces:
            for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(old, new)
        return text


# ---------------------------------------------------------------------------- keys and files
def map_released_key(key: str) -> str | None:
    """Released key -> ours; ``None`` = not part of our model (RoPE buffers, video projector, tower copies)."""
    if key.startswith(_TOWER_PREFIX) or key.endswith("rotary_emb.inv_freq") or key.startswith("model.mm_projector.video_"):
        return None
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    moe = moe_llava_key(key, "meta_expert")
    if moe is not None:
        return moe
    for old, new in (
        ("model.mm_projector.image_spatial_proj.", "mm_projector."),
        ("model.mm_projector.", "mm_projector."),
        ("model.embed_tokens.", "language_model.embed_tokens."),
        ("model.final_layernorm.", "language_model.norm."),
        ("model.norm.", "language_model.norm."),
        ("model.layers.", "language_model.layers."),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key  # reported as unexpected


def _key_names(files: list[Path], weight_map: dict[str, str] | None) -> list[str]:
    """Every key of the checkpoint without reading tensors (index, safetensors headers, or mmap)."""
    if weight_map is not None:
        return list(weight_map)
    names: list[str] = []
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as handle:
                    names.extend(handle.keys())
            except SafetensorError as err:
                raise MedMoECheckpointError(f"{path} is not a readable safetensors file ({err}); download it again") from None
        else:
            names.extend(key for key, _ in _read_file(path))
    return names


def resolve_image_tower(name: str, folder: Path, override: str | Path | None = None) -> Path | None:
    """The CLIP folder: ``override``, else ``mm_image_tower`` relative to the model folder (the reference
    resolves it against its working directory, which is the model folder in its scripts), its last
    path component inside the model folder, or the path itself. ``None`` when none has a config.json."""
    candidates = [Path(override)] if override is not None else [folder / name, folder / Path(name).name, Path(name)]
    for cand in candidates:
        if (cand / "config.json").is_file():
            return cand
    if override is not None:
        raise MedMoECheckpointError(f"image tower folder {override} has no config.json (a CLIP folder is expected)")
    return None


def _vision_config(tower: Path) -> dict:
    path = tower / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MedMoECheckpointError(f"{path} is not valid JSON ({err})") from None
    if data.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise MedMoECheckpointError(f"{path} is a {data.get('model_type')!r} config; Med-MoE's image tower is CLIP")
    vision = data.get("vision_config", data)
    return {k: v for k, v in vision.items() if k in _CLIP_VISION_FIELDS}


def _tower_tensors(tower: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``vision_model.*`` tensors of the CLIP folder as ``image_tower.clip.*`` (text tower skipped)."""
    try:
        files, _ = weight_files(tower)
    except CheckpointError:
        return
    for path in files:
        for key, tensor in _read_file(path):
            if key.startswith("vision_model."):
                yield "image_tower.clip." + key[len("vision_model.") :], tensor


# ---------------------------------------------------------------------------- load
def load(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    *,
    image_tower: str | Path | None = None,
    attn_implementation: str = "sdpa",
) -> MedMoEModel:
    """A Med-MoE folder in its released layout -> ``MedMoEModel`` in eval mode on ``device``.

    ``image_tower`` overrides the CLIP folder named by ``mm_image_tower`` (e.g. a local copy of
    ``openai/clip-vit-large-patch14-336``). Raises ``MedMoECheckpointError`` with what to fix.
    """
    folder = Path(folder)
    dtype = _resolve_dtype(dtype)
    config = MedMoEConfig.from_pretrained(folder)
    try:
        files, weight_map = weight_files(folder)
    except MedMoECheckpointError:
        raise
    except CheckpointError as err:
        raise MedMoECheckpointError(str(err).replace("MedPLIB", "Med-MoE")) from None
    names = _key_names(files, weight_map)
    if not any(n.startswith("model.layers.") for n in names):
        raise MedMoECheckpointError(f"{folder}: the weights have no decoder layers (model.layers.*); not a Med-MoE checkpoint")
    if not any(".mlp.deepspeed_moe." in n for n in names):
        raise MedMoECheckpointError(
            f"{folder}: the weights have no MoE layers (model.layers.*.mlp.deepspeed_moe.*): a dense (stage-2) "
            "checkpoint, or config.json belongs to another model"
        )
    config.router_bias = any(n.endswith(".deepspeed_moe.gate.wg.bias") for n in names)
    config.meta_expert = any(".mlp.meta_moe." in n for n in names)
    if config.base == "stablelm":  # StableLM-2's remote-code config may omit use_qkv_bias (its default is False)
        config.use_qkv_bias = any(n.endswith(".self_attn.q_proj.bias") for n in names)

    tokenizer = MedMoETokenizer.from_folder(folder)
    config.vocab_size = len(tokenizer)

    tower = resolve_image_tower(config.mm_image_tower, folder, image_tower)
    tower_copies = any(n.startswith(_TOWER_PREFIX) for n in names)
    if tower is not None:
        config.vision_config = _vision_config(tower)
        processor_file = tower / "preprocessor_config.json"
        processor = ClipProcessorSettings.from_file(processor_file) if processor_file.is_file() else ClipProcessorSettings()
    elif tower_copies and "clip-vit-large-patch14-336" in config.mm_image_tower:
        warnings.warn(
            f"image tower folder {config.mm_image_tower!r} not found; using CLIP ViT-L/14-336's architecture and "
            "processor with the tower weights stored in the checkpoint",
            stacklevel=2,
        )
        config.vision_config, processor = dict(CLIP_VIT_L14_336), ClipProcessorSettings()
    else:
        raise MedMoECheckpointError(
            f"the CLIP image tower folder {config.mm_image_tower!r} named by config.json 'mm_image_tower' was not found "
            f"(looked in {folder / config.mm_image_tower} and {config.mm_image_tower}). Fix: put the CLIP folder "
            "(config.json, preprocessor_config.json, weights) there, or pass image_tower=<path>"
        )

    with empty_parameters():
        model = MedMoEModel(config, tokenizer, processor, attn_implementation)
    expected = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    def put(key: str, tensor: torch.Tensor, source: str) -> None:
        if key in ("language_model.embed_tokens.weight", "language_model.lm_head.weight"):
            if tensor.shape[0] < config.vocab_size:
                raise MedMoECheckpointError(
                    f"{source}: {key} has {tensor.shape[0]} rows but the tokenizer has {config.vocab_size} tokens; "
                    "tokenizer files and weights come from different models"
                )
            tensor = tensor[: config.vocab_size]  # resize_token_embeddings(len(tokenizer))
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if ".mlp.router." in key else dtype)
        state[key] = tensor.to(device)
        origin[key] = source

    for path in files:
        for key, tensor in _read_file(path):
            mapped = map_released_key(key)
            if mapped is not None:
                put(mapped, tensor, path.name)
    if tower is not None:
        for key, tensor in _tower_tensors(tower):
            put(key, tensor, f"{tower.name}/weights")
    if not any(k.startswith("image_tower.") for k in state) and tower_copies:
        for path in files:  # the tower folder has no weights: use the checkpoint's copies
            for key, tensor in _read_file(path):
                if key.startswith(_TOWER_PREFIX + "vision_model."):
                    put("image_tower.clip." + key[len(_TOWER_PREFIX + "vision_model.") :], tensor, path.name)

    non_persistent = {n for n, _ in model.named_buffers() if n not in expected}
    missing = [k for k in expected if k not in state and k not in non_persistent]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {origin.get(k, '?')} has {tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        hint = ""
        if any(k.startswith("image_tower.") for k in missing):
            hint = f"\n  The CLIP tower weights were not found (tower folder: {tower}); put them in that folder."
        raise MedMoECheckpointError(_report(missing, unexpected, misshaped, origin) + hint)
    model.load_state_dict(state, strict=False, assign=True)
    model.requires_grad_(False)
    return model.to(device).eval()
