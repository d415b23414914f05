"""Optional on-disk image embeddings (CLIP features, SAM embeddings), one safetensors file per image.

Like micro-sam's embedding files, every file carries a data signature: the content key of the image
the model saw, the model's id and fingerprint, the dtype and a format version. A file whose signature
does not match what the session would compute is refused with `EmbeddingCacheMismatchError` (never
silently used or overwritten): point the session at another folder or delete the file.

The file's metadata also holds a hash of its tensors (dtype, shape and bytes of each, blake2b) and
their shapes; a file whose tensors do not match them (bit rot, a file edited or copied in part) is
refused the same way, as is a tensor whose rank or shape is not what the model makes
(:data:`RANKS`, and the ``expected_shapes`` a caller passes to :meth:`DiskEmbeddingCache.read`).
Files are written to a temporary file in the folder and renamed (:mod:`napari_medplib.atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path
from .errors import EmbeddingCacheMismatchError, SessionInputError

FORMAT = "napari-medplib-embeddings/2"
#: Rank of each tensor the session stores: CLIP patch features and image tokens (1, N, D), SAM
#: image embeddings (1, C, H, W).
RANKS = {"clip_patch": 3, "clip_tokens": 3, "sam": 4}


def tensor_hash(tensors: Mapping) -> str:
    """blake2b of the tensors' names, dtypes, shapes and bytes (in name order)."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _shapes(tensors: Mapping) -> str:
    return json.dumps({name: list(tensors[name].shape) for name in sorted(tensors)})


@dataclass(frozen=True)
class Signature:
    model_id: str
    model_hash: str
    dtype: str

    def metadata(self, image_key: str) -> dict[str, str]:
        return {"format": FORMAT, "image_key": image_key, "model_id": self.model_id,
                "model_hash": self.model_hash, "dtype": self.dtype}


class DiskEmbeddingCache:
    """``{folder}/{image_key}.safetensors`` holding any of: clip_patch, clip_tokens, sam (+ geometry)."""

    def __init__(self, folder: str | os.PathLike, signature: Signature) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SessionInputError(f"cannot use {self.folder} as embedding cache folder ({err}); give a writable folder") from None
        self.signature = signature

    def path(self, image_key: str) -> Path:
        return self.folder / f"{image_key}.safetensors"

    def read(self, image_key: str, expected_shapes: Mapping[str, Sequence[int | None]] | None = None) -> dict | None:
        """The stored tensors for ``image_key`` (with geometry in ``"meta"``), None if there is no file.

        ``expected_shapes``: {tensor name: shape}, ``None`` entries match any size; a stored tensor
        of another shape is refused."""
        from safetensors import safe_open

        path = self.path(image_key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as err:
            raise EmbeddingCacheMismatchError(f"{path} is not a readable embedding file ({err}); delete it") from None
        expected = self.signature.metadata(image_key)
        wrong = [k for k, v in expected.items() if meta.get(k) != v]
        if wrong:
            found = ", ".join(f"{k}={meta.get(k)!r} (expected {expected[k]!r})" for k in wrong)
            raise EmbeddingCacheMismatchError(
                f"{path} was computed for other data or another model ({found}); "
                "use another embedding cache folder for this model or delete the file"
            )
        self._check_content(path, tensors, meta, expected_shapes or {})
        tensors["meta"] = meta
        return tensors

    @staticmethod
    def _check_content(path: Path, tensors: dict, meta: dict, expected_shapes: Mapping) -> None:
        if meta.get("shapes") != _shapes(tensors):
            raise EmbeddingCacheMismatchError(
                f"{path} holds tensors of shapes {_shapes(tensors)} but its signature records "
                f"{meta.get('shapes')}; the file is damaged: delete it"
            )
        if meta.get("content_hash") != tensor_hash(tensors):
            raise EmbeddingCacheMismatchError(
                f"{path}: its tensors do not match the hash in its signature (the file is damaged); delete it"
            )
        for name, tensor in tensors.items():
            want = expected_shapes.get(name)
            rank = len(want) if want is not None else RANKS.get(name)
            shape = tuple(tensor.shape)
            wrong = (rank is not None and len(shape) != rank) or (
                want is not None and any(w is not None and w != s for w, s in zip(want, shape, strict=True))
            )
            if wrong:
                expected = tuple(want) if want is not None else f"{rank} axes"
                raise EmbeddingCacheMismatchError(
                    f"{path}: {name} has shape {shape}, expected {expected}; "
                    "it was computed by another model: delete the file"
                )

    def write(self, image_key: str, tensors: dict, geometry: dict[str, str]) -> Path:
        """Merge ``tensors`` into the file for ``image_key`` (atomically replaced)."""
        from safetensors.torch import save_file

        existing = self.read(image_key) or {}
        meta = dict(existing.pop("meta", {}))
        merged = {**existing, **{k: v.detach().contiguous().cpu() for k, v in tensors.items()}}
        meta.update(geometry)
        meta.update(self.signature.metadata(image_key))
        meta.update({"shapes": _shapes(merged), "content_hash": tensor_hash(merged)})
        path = self.path(image_key)
        with atomic_path(path) as tmp:
            save_file(merged, str(tmp), metadata=meta)
        return path
