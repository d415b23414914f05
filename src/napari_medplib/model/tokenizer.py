"""MedPLIB's tokenizer and conversation templates, reproducing the reference's slow LLaMA tokenizer.

The reference loads ``LlamaTokenizer(use_fast=False, legacy=True)`` from transformers 4.31. Its
behaviour (checked against the fixture) is, for our purposes:

* the text is split on added tokens (``<SEG>``, ``<region>`` ... from ``added_tokens.json``) and on
  ``<s>``/``</s>``/``<unk>``;
* around an *added* token, whitespace on both sides is stripped (not around ``<s>``/``</s>``/``<unk>``);
* every remaining text piece is encoded by SentencePiece on its own, so it gets the dummy-prefix ``▁``;
* one BOS in front; no EOS;
* decoding with ``skip_special_tokens`` drops bos/eos/unk only; added tokens stay in the text, and
  the text pieces between added tokens are joined with single spaces.

transformers 5 no longer ships that slow tokenizer, so this is written on ``sentencepiece`` directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX, CheckpointError

# The reference's added tokens, in its order: ids = base vocab + position.
MEDPLIB_ADDED_TOKENS = (
    ["<SEG>", "<ref>", "</ref>", "<region>", "</region>", "<sr>", "</sr>", "<mask>", "</mask>"]
    + [f"<gen_{i}>" for i in range(1, 257)]
    + ["<im_start>", "<im_end>"]
)
IMAGE_PLACEHOLDER = "<image>"


class MedPLIBTokenizer:
    """SentencePiece LLaMA tokenizer with MedPLIB's added tokens (reference-exact ids and text)."""

    def __init__(self, sp_model_file: str | Path, added_tokens: dict[str, int] | None = None) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            loaded = self.sp.Load(str(sp_model_file))
        except (RuntimeError, OSError) as err:  # a corrupt file raises instead of returning False
            raise CheckpointError(f"{sp_model_file} is not a SentencePiece model ({err}); re-download the "
                                  "model folder") from None
        if not loaded:
            raise CheckpointError(f"{sp_model_file} is not a SentencePiece model")
        self.base_vocab_size = self.sp.GetPieceSize()
        self.bos_token, self.eos_token, self.unk_token = "<s>", "</s>", "<unk>"
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = self.unk_token_id  # the reference sets pad = unk
        self.added_tokens_encoder: dict[str, int] = {}
        for token, idx in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
            expected = self.base_vocab_size + len(self.added_tokens_encoder)
            if idx != expected:
                raise CheckpointError(f"added token {token!r} has id {idx}, expected {expected} (ids must be contiguous)")
            self.added_tokens_encoder[token] = idx
        self.added_tokens_decoder = {v: k for k, v in self.added_tokens_encoder.items()}
        self._special = {self.bos_token: self.bos_token_id, self.eos_token: self.eos_token_id, self.unk_token: self.unk_token_id}
        splitters = sorted([*self.added_tokens_encoder, *self._special], key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in splitters) + ")")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MedPLIBTokenizer:
        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise CheckpointError(
                f"{model_file} is missing: the checkpoint folder must hold the SentencePiece tokenizer "
                "(tokenizer.model and added_tokens.json, as tokenizer.save_pretrained writes them)"
            )
        added_file = folder / "added_tokens.json"
        if added_file.is_file():
            added = json.loads(added_file.read_text())
        else:  # rebuild the reference's additions from the base vocabulary size
            import sentencepiece as spm

            try:
                base = spm.SentencePieceProcessor(model_file=str(model_file)).GetPieceSize()
            except (RuntimeError, OSError) as err:
                raise CheckpointError(f"{model_file} is not a SentencePiece model ({err}); re-download the "
                                      "model folder") from None
            added = {t: base + i for i, t in enumerate(MEDPLIB_ADDED_TOKENS)}
        return cls(model_file, added)

    def __len__(self) -> int:
        return self.base_vocab_size + len(self.added_tokens_encoder)

    # ------------------------------------------------------------------ ids <-> tokens
    def token_to_id(self, token: str) -> int:
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        idx = self.sp.PieceToId(token)
        if idx == self.unk_token_id and token != self.unk_token:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return idx

    def id_to_token(self, idx: int) -> str:
        if idx in self.added_tokens_decoder:
            return self.added_tokens_decoder[idx]
        if not 0 <= idx < self.base_vocab_size:
            raise KeyError(f"token id {idx} is outside the vocabulary (size {len(self)})")
        return self.sp.IdToPiece(idx)

    @property
    def seg_token_id(self) -> int:
        return self.token_to_id("<SEG>")

    # ------------------------------------------------------------------ encode
    def tokenize(self, text: str) -> list[str]:
        """Pieces as the 4.31 slow tokenizer gives them (no BOS)."""
        parts = list(self._split_re.split(text))
        # Strip whitespace next to added tokens (not next to <s>, </s>, <unk>).
        for i, part in enumerate(parts):
            if part in self.added_tokens_encoder:
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        pieces: list[str] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 1:  # a splitter token
                pieces.append(part)
            else:
                pieces.extend(self.sp.EncodeAsPieces(part))
        return pieces

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.token_to_id(p) if p in self.added_tokens_encoder or p in self._special else self.sp.PieceToId(p)
               for p in self.tokenize(text)]
        return [self.bos_token_id, *ids] if add_bos else ids

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text as ``batch_decode(ids, skip_special_tokens)`` of the reference (without ``strip()``)."""
        special_ids = {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id}
        sub_texts: list[str] = []
        current: list[str] = []
        for idx in ids:
            idx = int(idx)
            if idx < 0:
                continue  # placeholders (-200, -300) carry no text
            if skip_special_tokens and idx in special_ids:
                continue
            if idx in self.added_tokens_decoder:
                if current:
                    sub_texts.append(self._pieces_to_string(current))
                    current = []
                sub_texts.append(self.added_tokens_decoder[idx])
            else:
                current.append(self.id_to_token(idx))
        if current:
            sub_texts.append(self._pieces_to_string(current))
        return " ".join(sub_texts)

    def _pieces_to_string(self, pieces: list[str]) -> str:
        # <s>, </s>, <unk> (only present without skip_special_tokens) are not given to SentencePiece.
        out, chunk, prev_special = "", [], False
        for i, piece in enumerate(pieces):
            if piece in self._special:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp.DecodePieces(chunk) + piece
                chunk, prev_special = [], True
            else:
                chunk.append(piece)
                prev_special = False
        return out + self.sp.DecodePieces(chunk)


# ---------------------------------------------------------------------- prompt ids
def tokenize_prompt(prompt: str, tokenizer: MedPLIBTokenizer) -> list[int]:
    """Ids of a full prompt with placeholders: ``<image>`` -> -200, and -300 between every
    adjacent ``<region>``/``</region>`` pair (the reference's ``tokenizer_image_token`` + region loop).

    Each ``<image>``-separated chunk is encoded with BOS; only the first BOS is kept.
    """
    chunks = [tokenizer.encode(chunk) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    ids: list[int] = [tokenizer.bos_token_id]
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:])  # drop each chunk's own BOS
    region_open = tokenizer.token_to_id("<region>")
    region_close = tokenizer.token_to_id("</region>")
    out: list[int] = []
    for i, idx in enumerate(ids):
        out.append(idx)
        if idx == region_open and i + 1 < len(ids) and ids[i + 1] == region_close:
            out.append(REGION_TOKEN_INDEX)
    return out


# ---------------------------------------------------------------------- templates
@dataclass(frozen=True)
class ConversationTemplate:
    """A ``SeparatorStyle.TWO`` template: ``{system} USER: {q} ASSISTANT: {a}</s>USER: ...``."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.sep2,)

    def build_prompt(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """``turns``: (question, answer) pairs; the last answer may be ``None`` (prompt ends at ``ASSISTANT:``)."""
        text = self.system + self.sep
        for i, (question, answer) in enumerate(turns):
            text += f"{self.roles[0]}: {question}{self.sep}"
            if answer is None:
                if i != len(turns) - 1:
                    raise ValueError("only the last turn may have no answer")
                text += f"{self.roles[1]}:"
            else:
                text += f"{self.roles[1]}: {answer}{self.sep2}"
        return text


_SYSTEM = (
    "A chat between a curious {who} and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the {who}'s questions."
)
TEMPLATES = {
    "v1": ConversationTemplate("v1", _SYSTEM.format(who="user")),  # vqa_infer (eval)
    "medplib_v1": ConversationTemplate("medplib_v1", _SYSTEM.format(who="human")),  # demo worker
    "llava_v1": ConversationTemplate("llava_v1", _SYSTEM.format(who="human")),  # training
}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


_REGION_TAG = re.compile(r"<region(\d*)>(?:\s*</region>)?")


def format_question(
    question: str, num_regions: int = 0, with_image: bool = True, append_missing: bool = True,
    mentioned: Sequence[int] = (),
) -> tuple[str, list[int]]:
    """Turn a user question into the reference's first-turn text, and say which region goes where.

    ``<region>`` takes the next region in order; ``<regionK>`` (1-based) names region K. Each tag
    becomes ``<region></region>`` (one -300 slot). With ``append_missing``, regions neither in the
    question nor in ``mentioned`` (earlier turns) are appended at its end, as the demo does.
    Returns (text, region index per slot, in order).
    """
    order: list[int] = []
    next_bare = 0

    def repl(match: re.Match) -> str:
        nonlocal next_bare
        if match.group(1):
            k = int(match.group(1)) - 1
            if not 0 <= k < num_regions:
                raise ValueError(f"the question names <region{k + 1}> but {num_regions} region(s) were given")
        else:
            while next_bare in order:
                next_bare += 1
            k = next_bare
            if k >= num_regions:
                raise ValueError(f"the question has more <region> tags than the {num_regions} region(s) given")
            next_bare += 1
        order.append(k)
        return "<region></region>"

    text = _REGION_TAG.sub(repl, question.strip())
    missing = [k for k in range(num_regions) if k not in order and k not in mentioned] if append_missing else []
    if missing:
        text += "".join(" <region></region>" for _ in missing)
        order.extend(missing)
    if with_image:
        text = "<im_start><image><im_end>\n" + text
    return text, order


def encode_question(
    tokenizer: MedPLIBTokenizer,
    question: str,
    num_regions: int = 0,
    template: str = "medplib_v1",
    history: Sequence[tuple[str, str]] = (),
) -> tuple[list[int], list[int]]:
    """Prompt ids (with -200 / -300) for a question on one image, after earlier (question, answer)
    turns, and the region index of every -300 slot in order (earlier turns' slots included; pass
    ``region_tokens[order]`` to the model). The image goes in the first turn."""
    turns: list[tuple[str, str | None]] = []
    order: list[int] = []
    for i, (past_question, past_answer) in enumerate(history):
        text, slots = format_question(past_question, num_regions, with_image=i == 0, append_missing=False)
        turns.append((text, past_answer))
        order.extend(slots)
    text, slots = format_question(question, num_regions, with_image=not history, mentioned=order)
    turns.append((text, None))
    order.extend(slots)
    return tokenize_prompt(get_template(template).build_prompt(turns), tokenizer), order
