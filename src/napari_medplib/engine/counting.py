"""What a question asks to count or segment: the noun, and the model's grounding question for it.

Why: MedPLIB answers "How many nuclei are in this image?" in words; the engine also grounds the noun
("Please segment the nuclei.", the question the model was trained to ground with), splits the mask into
instances and counts them, so a user sees the model's number beside a measured one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_STOP = {"are", "is", "do", "does", "can", "could", "there", "in", "inside", "within", "on", "of", "you", "we",
         "i", "appear", "visible", "present", "seen", "this", "the", "image", "shown", "here", "at"}
_HOW_MANY = re.compile(r"\bhow\s+many\s+((?:[a-z][a-z\-]*\s*){1,4})", re.I)
_SEGMENT = re.compile(
    r"\b(?:segment|ground|outline|delineate|mark|find|detect|show)\s+(?:all\s+|each\s+|every\s+)?(?:of\s+)?(?:the\s+)?"
    r"((?:[a-z][a-z\-]*\s*){1,4})", re.I)
#: Irregular plurals the biomedical nouns use (singular -> plural).
_PLURALS = {"nucleus": "nuclei", "bacterium": "bacteria", "mitochondrion": "mitochondria", "cell": "cells",
            "lumen": "lumens", "nucleolus": "nucleoli", "vesicle": "vesicles", "gland": "glands"}


def _noun_phrase(words: str) -> str | None:
    kept = []
    for word in words.lower().split():
        if word in _STOP or word.startswith("<region"):
            break
        kept.append(word)
    return " ".join(kept) or None


def how_many_noun(question: str) -> str | None:
    """The noun a "how many ..." question counts ("How many nuclei are there?" -> "nuclei"), else None."""
    match = _HOW_MANY.search(question or "")
    return _noun_phrase(match.group(1)) if match else None


def segment_noun(question: str) -> str | None:
    """The noun a grounding question names ("Please segment the nuclei." -> "nuclei"), else None."""
    match = _SEGMENT.search(question or "")
    return _noun_phrase(match.group(1)) if match else None


def plural(noun: str) -> str:
    """The plural of a (last) noun: "nucleus" -> "nuclei", "cell" -> "cells"; plurals stay."""
    words = noun.split()
    last = words[-1]
    if last in _PLURALS:
        last = _PLURALS[last]
    elif last not in _PLURALS.values() and not last.endswith("s") and not last.endswith("a") and not last.endswith("i"):
        last += "s"
    return " ".join([*words[:-1], last])


def singular(noun: str) -> str:
    """The singular of a (last) noun: "nuclei" -> "nucleus", "cells" -> "cell"; singulars stay."""
    words = noun.split()
    last = words[-1]
    irregular = {p: s for s, p in _PLURALS.items()}
    if last in irregular:
        last = irregular[last]
    elif last.endswith("s") and not last.endswith("ss") and last not in _PLURALS:
        last = last[:-1]
    return " ".join([*words[:-1], last])


def grounding_question(noun: str) -> str:
    """The model's grounding question for ``noun``: "Please segment the nuclei."."""
    return f"Please segment the {plural(noun)}."


def noun_index(noun: str | None, nouns: Sequence[str]) -> int | None:
    """Index of ``noun`` (singular or plural, last word) in a model's count nouns, else None."""
    if not noun:
        return None
    wanted = plural(noun.split()[-1])
    for i, candidate in enumerate(nouns):
        if plural(candidate) == wanted:
            return i
    return None


_NUMBER = re.compile(r"\b\d+\b")


def counted_answer(model_text: str, noun: str, count: int) -> str:
    """The answer to a how-many question with the measured count in it.

    Why: the model's own number is a guess from 24x24 image tokens (rarely within 20 % on real planes);
    the engine has just grounded the noun and counted its objects. The answer says the measured count and,
    when the model's number differs, keeps that as its estimate, so the chat never shows two numbers
    that disagree without saying which is which.
    """
    text = f"{count} {plural(noun) if count != 1 else singular(noun)}."
    guessed = [int(n) for n in _NUMBER.findall(model_text or "")]
    if guessed and guessed[0] != count:
        text += f" (counted from the segmented objects; the model's own estimate was {guessed[0]})"
    else:
        text += " (counted from the segmented objects)"
    return text
