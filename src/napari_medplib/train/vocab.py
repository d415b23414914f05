"""Our own small SentencePiece tokenizer for models trained from scratch on the template vocabulary.

A general-English 640-piece tokenizer spends 7 pieces on "fluorescence"; a tokenizer trained on the
very texts the model answers with keeps sequences short (faster training, fewer tokens to get right).
Byte fallback keeps any text encodable. The special ids follow LLaMA (unk 0, bos 1, eos 2) and
MedPLIB's added tokens follow in the reference order, so the folder loads with
``MedPLIBTokenizer.from_pretrained`` like a released checkpoint's tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..model.tokenizer import MEDPLIB_ADDED_TOKENS, TEMPLATES


def template_corpus(n_samples: int = 300, seed: int = 12345) -> list[str]:
    """Every system prompt, role name and many synthetic questions/answers (placeholders removed)."""
    from .data import synthetic_items

    # the prompt frame is in every sequence: weight it like the answers so it gets whole-word pieces
    lines = ([t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT:"]) * (n_samples * 4)
    for _, convs in synthetic_items(n_samples, seed=seed, n_per_task=6):
        for conv in convs:
            for text in (conv.question, conv.answer):
                lines.append(text.replace("<region>", " ").replace("<SEG>", " "))
    return lines


def train_tokenizer(folder: str | Path, texts: Iterable[str], vocab_size: int = 640) -> Path:
    """Train a BPE SentencePiece model with byte fallback on ``texts`` and write a tokenizer folder."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=True,
            hard_vocab_limit=False, num_threads=1, minloglevel=2,
        )
    finally:
        corpus.unlink(missing_ok=True)
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    base = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).GetPieceSize()
    added = {token: base + i for i, token in enumerate(MEDPLIB_ADDED_TOKENS)}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048, "padding_side": "right",
         "legacy": True, "add_bos_token": True, "add_eos_token": False}, indent=2))
    return folder
