"""Where a model comes from and what it runs on: source -> folder, device, dtype, fingerprint.

No network, ever: a hub id is only accepted when the model is already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..paths import MODEL_PATH_ENV, bundled_model_dir, model_search_paths
from .errors import DeviceError, InvalidModelError, ModelLoadError, ModelNotFoundError

Progress = Callable[[str, int, int], None]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _how_to_point() -> str:
    return (
        "give a model folder (Session.load('path/to/MedPLIB-7b-2e') or `medplib ... --model PATH`), "
        f"or set {MODEL_PATH_ENV} to that folder"
    )


def resolve_source(source: str | os.PathLike | None) -> tuple[Path, str]:
    """(model folder, display name) for ``source``: None (default), a folder, a name or a hub id."""
    if source is None:
        for path in [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]:
            if is_model_folder(path):
                return path, path.name
        bundled = bundled_model_dir()
        if is_model_folder(bundled):
            return bundled, "bundled"
        raise ModelNotFoundError(
            f"no model given and the bundled default model is not installed ({bundled}); " + _how_to_point()
        )
    path = Path(os.fspath(source)).expanduser()
    if path.exists():
        return _check_folder(path), path.resolve().name
    text = os.fspath(source)
    if len(path.parts) == 1:  # a bare name: look in the model search paths
        for base in model_search_paths():
            if is_model_folder(base / text):
                return base / text, text
    if _HUB_ID.fullmatch(text):
        folder = _from_hf_cache(text)
        if folder is not None:
            return _check_folder(folder), text
        raise ModelNotFoundError(
            f"{text}: no such folder, and not in the local Hugging Face cache (nothing is downloaded); "
            f"download it first (`huggingface-cli download {text}`) or " + _how_to_point()
        )
    raise ModelNotFoundError(f"{text}: no such model folder; " + _how_to_point())


def _check_folder(path: Path) -> Path:
    if not path.is_dir():
        raise InvalidModelError(f"{path} is a file, not a model folder; give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise InvalidModelError(
            f"{path} is not a MedPLIB model folder (no config.json); give the folder that holds config.json, "
            "the tokenizer files and the weights"
        )
    return path


def _from_hf_cache(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id``, or None; never touches the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, offline mode errors, bad ids ...
        return None


# ---------------------------------------------------------------------------------------- device
def pick_device(device: str | None = "auto") -> str:
    """"auto" -> cuda, then mps, then cpu; an explicit device is checked to exist."""
    import torch

    name = (device or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for but CUDA is not available here; use device='cpu' or 'auto'")
    if name == "mps" and not has_mps:
        raise DeviceError("device 'mps' was asked for but Apple MPS is not available here; use device='cpu' or 'auto'")
    if not (name == "cpu" or name == "mps" or re.fullmatch(r"cuda(:\d+)?", name)):
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return name


def pick_dtype(device: str, dtype=None):
    """bfloat16 on a GPU (float16 where bf16 is unsupported), float32 on the CPU, unless asked."""
    import torch

    from ..model.medplib import resolve_dtype

    if dtype is not None:
        try:
            return resolve_dtype(dtype)
        except ValueError as err:
            raise DeviceError(str(err)) from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------- fingerprint
def folder_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: config.json content + weight file names and sizes."""
    digest = hashlib.blake2b(digest_size=12)
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(folder.iterdir()):
        if path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """Identity of an in-memory model: config + parameter names, shapes and a few values each."""
    import torch

    digest = hashlib.blake2b(digest_size=12)
    config = getattr(model, "config", None)
    described = config.to_dict() if hasattr(config, "to_dict") else repr(config)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.state_dict().items():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu().numpy().tobytes()
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample)
    return digest.hexdigest()


def load_model(folder: Path, device: str, dtype, on_progress: Progress | None = None):
    """``MedPLIBModel.from_pretrained`` with load progress and our error types."""
    from ..model.config import CheckpointError
    from ..model.medplib import MedPLIBModel

    if on_progress:
        on_progress("loading", 0, 2)
    try:
        model = MedPLIBModel.from_pretrained(folder, device=device, dtype=dtype)
    except CheckpointError as err:
        raise InvalidModelError(str(err).splitlines()[0]) from None
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidModelError(f"{folder}: cannot read the model ({err})") from None
    if model.sam is None:
        raise InvalidModelError(
            f"{folder} has no SAM-Med2D (visual_model) weights; grounding and segmentation need them"
        )
    if on_progress:
        on_progress("loading", 1, 2)
    if dtype is not None and model.dtype != dtype:
        model.cast(dtype)
    if on_progress:
        on_progress("loading", 2, 2)
    return model


#: What ``Session.load(llm_weights=...)`` accepts: the checkpoint's own precision, or int8 weight-only.
LLM_WEIGHTS = ("full", "int8")


def load_weights(family, folder: Path, device: str, dtype, llm_weights: str = "full",
                 on_progress: Progress | None = None):
    """The family's model on ``device``; with ``llm_weights="int8"`` (MedPLIB models) its language model is
    quantised on the CPU first (``model.quantize.quantize_llm``), so the GPU never holds the full-precision
    LLM: what lets MedPLIB-7b-2e (about 21 GB of bf16 LLM weights) fit a 24 GB card with SAM and CLIP."""
    if llm_weights not in LLM_WEIGHTS:
        raise ModelLoadError(f"llm_weights={llm_weights!r} is not one of {', '.join(LLM_WEIGHTS)}")
    if llm_weights == "full":
        return family.load(folder, device, dtype, on_progress)
    if family.key != "medplib":
        raise ModelLoadError(f"int8 LLM weights are available for MedPLIB models; load this {family.name} "
                             "model with llm_weights='full'")
    from ..model.quantize import quantize_llm

    model = family.load(folder, "cpu", dtype, on_progress)
    quantize_llm(model, "int8")
    return model.to(device) if device != "cpu" else model

