"""Optional on-disk image embeddings (CLIP features, SAM embeddings), one safetensors file per image.

Like micro-sam's embedding files, every file carries a data signature: the content key of the image
the model saw, the model's id and fingerprint, the dtype and a format version. A file whose signature
does not match what the session would compute is refused with `EmbeddingCacheMismatchError` (never
silently used or overwritten): point the session at another folder or delete the file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EmbeddingCacheMismatchError, SessionInputError

FORMAT = "napari-medplib-embeddings/1"


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

    def read(self, image_key: str) -> dict | None:
        """The stored tensors for ``image_key`` (with geometry in ``"meta"``), None if there is no file."""
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
        tensors["meta"] = meta
        return tensors

    def write(self, image_key: str, tensors: dict, geometry: dict[str, str]) -> Path:
        """Merge ``tensors`` into the file for ``image_key`` (atomically replaced)."""
        from safetensors.torch import save_file

        existing = self.read(image_key) or {}
        meta = dict(existing.pop("meta", {}))
        merged = {**existing, **{k: v.detach().contiguous().cpu() for k, v in tensors.items()}}
        meta.update(geometry)
        meta.update(self.signature.metadata(image_key))
        path = self.path(image_key)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(merged, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
