"""Tiny random MedPLIB models for tests, demos and benchmarks: offline, fast, no downloads.

The weights are random, so answers are gibberish and masks do not follow anything; what these models
are for is exercising every code path (loading, caches, regions, grounding, direct prompts) in
milliseconds on a CPU. The tokenizer is a small SentencePiece model trained on the fly (640 pieces,
LLaMA's unk/bos/eos ids 0/1/2, byte fallback) plus MedPLIB's 267 added tokens, so the vocabulary is
907 as in ``model.config.tiny_config``.

    from napari_medplib.testing import make_tiny_model_folder, tiny_model, tiny_session
    folder = make_tiny_model_folder(tmp_path / "tiny")      # a loadable model folder (ours layout)
    session = Session.load(folder, device="cpu")
    model = tiny_model()                                     # the same network, in memory
    session = tiny_session()                                 # Session.from_model(tiny_model())

torch is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import random
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["TINY_SAM", "load_file_module", "make_tiny_model_folder", "tiny_model", "tiny_session",
           "tiny_tokenizer_folder"]

#: SAM-Med2D dimensions of the tiny models (256 px input, 16x16 embeddings, one block).
TINY_SAM = {
    "embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": (0,), "adapter_hidden": 8,
    "decoder_depth": 1, "decoder_mlp_dim": 64, "iou_head_hidden_dim": 32,
}

_WORDS = """the a an of in on at is are was be it this that there these what where which how many
cell cells nucleus nuclei membrane cytoplasm tissue image region regions segment segmentation mask
mitochondria tumour tumor lesion organ liver kidney lung heart brain bone muscle blood vessel gland
yes no left right top bottom upper lower small large round oval bright dark stained fluorescence
microscopy shows contains appears located near inside outside between compare describe sure answer
question please find outline boundary normal abnormal healthy disease Sure What Where Is The It
can you see , . ? ! : ; - ( ) 0 1 2 3 4 5 6 7 8 9""".split()

_lock = threading.Lock()
_tokenizer_folder: Path | None = None


def _train_tokenizer(vocab_size: int = 640) -> bytes:
    """A deterministic SentencePiece BPE model with LLaMA's special ids, trained on made-up sentences."""
    import sentencepiece as spm

    rng = random.Random(0)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(2000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2, hard_vocab_limit=True,
    )
    return proto.getvalue()


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write ``tokenizer.model`` and ``added_tokens.json`` (MedPLIB's 267 tokens) into ``folder``."""
    from .model.tokenizer import MEDPLIB_ADDED_TOKENS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = _train_tokenizer()
    (folder / "tokenizer.model").write_bytes(model_bytes)
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_proto=model_bytes).GetPieceSize()
    added = {token: base + i for i, token in enumerate(MEDPLIB_ADDED_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    return folder


def tiny_tokenizer_folder() -> Path:
    """A per-process temporary folder holding the tiny tokenizer (written once)."""
    global _tokenizer_folder
    with _lock:
        if _tokenizer_folder is None or not (_tokenizer_folder / "tokenizer.model").is_file():
            _tokenizer_folder = write_tiny_tokenizer(tempfile.mkdtemp(prefix="medplib-tiny-tokenizer-"))
            atexit.register(shutil.rmtree, _tokenizer_folder, True)
        return _tokenizer_folder


def tiny_model(seed: int = 0, *, with_sam: bool = True, **config_overrides: Any):
    """A tiny random ``MedPLIBModel`` (fp32, CPU, eval mode) with a tiny SAM-Med2D."""
    import torch

    from .model.config import tiny_config
    from .model.medplib import MedPLIBModel
    from .model.sam import SamMed2D
    from .model.sam_encoder import SamMed2DConfig
    from .model.tokenizer import MedPLIBTokenizer

    folder = tiny_tokenizer_folder()
    tokenizer = MedPLIBTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    sam = SamMed2D.from_config(SamMed2DConfig(**TINY_SAM)) if with_sam else None
    config = tiny_config(folder=str(folder), vocab_size=len(tokenizer), **config_overrides)
    return MedPLIBModel.from_config(config, tokenizer=tokenizer, sam=sam, seed=seed + 1)


def make_tiny_model_folder(path: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a tiny random model (config, tokenizer, safetensors incl. SAM) to ``path``; return it.

    The folder loads with ``Session.load(path)`` and ``MedPLIBModel.from_pretrained(path)``.
    """
    from .model.convert import save_pretrained

    model = tiny_model(seed, **config_overrides)
    folder = save_pretrained(model, path)
    (folder / "README.md").write_text("Tiny random MedPLIB model for tests (napari_medplib.testing).\n")
    return folder


def tiny_session(seed: int = 0, **session_kwargs: Any):
    """A `Session` around an in-memory tiny model (no files written except the tokenizer)."""
    from .engine import Session

    session_kwargs.setdefault("name", f"tiny-random-{seed}")
    return Session.from_model(tiny_model(seed), **session_kwargs)


#: Environment variable that points at the reference fixture folder (``medplib-tiny-ref``).
REFERENCE_FIXTURE_ENV = "MEDPLIB_TINY_REF"


def load_file_module(path: str | Path, name: str):
    """The Python file ``path`` (a script or benchmark: those folders are not packages) imported as module
    ``name``, registered in ``sys.modules`` (dataclasses look their module up there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def reference_fixture_dir() -> Path:
    """The tiny reference fixture: ``$MEDPLIB_TINY_REF``, else ``../shared/fixtures/medplib-tiny-ref``
    next to the repository checkout. Not checked for existence: parity tests fail, not skip, without it.
    """
    if os.environ.get(REFERENCE_FIXTURE_ENV):
        return Path(os.environ[REFERENCE_FIXTURE_ENV])
    repo = Path(__file__).resolve().parents[2]  # src/napari_medplib/testing.py -> repository root
    return repo.parent / "shared" / "fixtures" / "medplib-tiny-ref"
