"""Many wordings per question, answers that name what is there, and "I can't tell" for what is not.

Why: a model trained on three wordings per question learns the wordings, not the questions ("Which stain
was used here?" got "no"). ``make_conversations(..., wording="paraphrases")`` draws each image-level or
region question from the pools below (the original templates included), so the model learns the intent
from the words that carry it ("stain", "microscopy", "how many", "describe").

The real-question benchmark (``benchmarks/real_vqa.py``) keeps its own held-out wordings; none of them is
here (a test compares the normalised keys), and the benchmark reports accuracy on both sets.

Answers by modality (``MODALITY_FACTS``) name the modality, the stain and the objects the way a
microscopist would, so "Describe this image." is answered with words, never a bare "yes" / "no". Images
unlike any microscopy the model knows (noise, photographs: ``meta["unknown"]``) are answered with
``CANT_TELL`` for every question about them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CANT_TELL = "I can't tell from this image."

# ----------------------------------------------------------------------------- question pools
#: What kind of imaging (the first three are the original templates).
MODALITY_QUESTIONS = (
    "Which imaging modality is this?", "What modality was used to acquire this image?", "What type of imaging is this?",
    "What imaging technique was used?", "Which kind of microscopy was used for this image?",
    "What microscopy technique is this?", "What type of microscope image is this?",
    "Which microscope produced this image?", "How was this picture taken?", "What imaging method is this?",
    "What is the imaging modality?", "Name the microscopy method.", "Which type of microscopy is shown?",
    "Was this imaged by fluorescence, brightfield, phase contrast or electron microscopy?",
    "Which microscope type is this from?", "Tell me the imaging modality.", "Which modality is this picture?",
    "What technique acquired this picture?", "Identify the type of microscopy.", "How was this sample imaged?",
)
#: Which stain or contrast (training had none before; "Which stain does this image show?" is the widget's).
STAIN_QUESTIONS = (
    "Which stain does this image show?", "What stain is used in this image?", "What is the stain?",
    "Which dye was used?", "What staining was used for this sample?", "Name the stain.",
    "Which staining technique is this?", "What kind of stain is visible?", "Is this sample stained, and with what?",
    "What stain or label makes the structures visible?", "Which histological stain is this?",
    "What dye or stain can you see?", "Which staining was applied?", "Tell me the stain.",
    "What labelling was used in this image?",
)
#: Describe the whole image (the first three are the original templates).
DESCRIBE_QUESTIONS = (
    "What kind of image is this?", "What does this image show?", "Describe the image in a few words.",
    "Please describe this picture.", "Can you describe this image?",
    "What is shown in this image?", "What do you see in this image?", "What is this image?",
    "Briefly describe what you see.", "What is in this picture?", "Summarise this image.",
    "Give a description of the image.", "What is this a picture of?", "Explain what this image shows.",
    "What can you see here?", "Describe what this picture shows.", "What does this picture contain?",
    "Tell me about this image.", "What is going on in this image?",
)
#: How many objects ({cnoun}: plural); the first three are the original templates.
COUNT_QUESTIONS = (
    "How many {cnoun} are there?", "How many {cnoun} are in this image?", "Count the {cnoun} in this image.",
    "How many {cnoun} can be seen?", "How many {cnoun} does this image contain?", "Please count the {cnoun}.",
    "Number of {cnoun} in this image?", "How many {cnoun} are shown?", "How many {cnoun} do you see?",
    "Count all {cnoun}.", "How many {cnoun} are present in this picture?", "Tell me how many {cnoun} there are.",
)
#: Is there ...? ({art}{noun} singular, {pnoun} plural); the first three are the original templates.
PRESENCE_QUESTIONS = (
    "Is there {art}{noun} in this image?", "Are there any {pnoun} in this image?", "Does this image contain any {pnoun}?",
    "Does the image show {pnoun}?", "Can {pnoun} be seen in this image?", "Are {pnoun} present?",
    "Is there any {noun} here?", "Do you see any {noun}?", "Does this picture contain {pnoun}?",
    "Are there {pnoun} visible in this image?", "Is {art}{noun} visible?", "Can you find any {pnoun}?",
)
PRESENCE_MASS_QUESTIONS = ("Is there {noun} in this image?", "Does this image contain {noun}?",
                           "Is any {noun} visible?", "Can you see {noun} in this picture?")
#: What is in a region (the first five are the original templates).
REGION_CATEGORY_QUESTIONS = (
    "What is in <region>?", "What is shown at <region>?", "What kind of object is <region>?",
    "Can you identify the structure in <region>?", "What is the object in <region>?",
    "What structure is in <region>?", "What is <region>?", "Name the object in <region>.",
    "What does <region> contain?", "Which object is at <region>?", "What can be seen in <region>?",
    "Tell me what <region> shows.", "What type of structure is <region>?", "Classify the object in <region>.",
    "What is located at <region>?",
)

POOLS: dict[str, tuple[str, ...]] = {
    "modality": MODALITY_QUESTIONS, "stain": STAIN_QUESTIONS, "description": DESCRIBE_QUESTIONS,
    "count": COUNT_QUESTIONS, "presence": PRESENCE_QUESTIONS, "presence_mass": PRESENCE_MASS_QUESTIONS,
    "region_category": REGION_CATEGORY_QUESTIONS,
}


# ----------------------------------------------------------------------------- answers by modality
@dataclass(frozen=True)
class ModalityFacts:
    """How a modality is named in answers: the modality, its stain (or contrast), a description prefix."""

    modality: str
    stain: str
    describe: str  # "{objects}" is replaced by the plural object noun


MODALITY_FACTS: dict[str, ModalityFacts] = {
    "fluorescence": ModalityFacts("fluorescence microscopy", "fluorescent labels (fluorescence)",
                                  "fluorescence microscopy of {objects}"),
    "he": ModalityFacts("H&E histology", "H&E (haematoxylin and eosin)",
                        "H&E-stained tissue section with {objects}"),
    "ihc": ModalityFacts("immunohistochemistry (DAB, brightfield)", "DAB immunohistochemistry with a haematoxylin counterstain",
                         "immunohistochemistry (DAB) of tissue with {objects}"),
    "brightfield": ModalityFacts("brightfield microscopy", "unstained (brightfield)", "brightfield microscopy of {objects}"),
    "phase": ModalityFacts("phase-contrast microscopy", "unstained (phase contrast)", "phase-contrast microscopy of {objects}"),
    "sem": ModalityFacts("scanning electron microscopy (SEM)", "heavy-metal contrast for electron microscopy",
                         "scanning electron microscopy of {objects}"),
    "tem": ModalityFacts("transmission electron microscopy (TEM)", "heavy-metal contrast for electron microscopy",
                         "transmission electron microscopy of {objects}"),
    "em": ModalityFacts("electron microscopy", "heavy-metal contrast for electron microscopy",
                        "electron microscopy of {objects}"),
}

#: The synthetic styles' modality keys.
STYLE_MODALITY = {"nuclei": "fluorescence", "cells": "fluorescence", "organelles": "fluorescence",
                  "brightfield": "brightfield", "he": "he", "bacteria": "phase", "em_neurites": "em",
                  "em_axons": "em", "ihc": "ihc"}


def image_meta(modality: str, objects: str) -> dict[str, str]:
    """``Sample.meta`` entries that paraphrase training answers from: modality, stain, description."""
    facts = MODALITY_FACTS[modality]
    return {"modality": facts.modality, "stain": facts.stain,
            "description": facts.describe.format(objects=objects), "modality_key": modality}


def pool(kind: str) -> tuple[str, ...]:
    return POOLS[kind]


# ---- wording noise: what people add around a question --------------------------------------------------
#: Openers and closers people type around a question (none is a question by itself).
OPENERS = ("Hi, ", "Quick question: ", "Please tell me, ", "Can you tell me: ", "Hey - ", "I'd like to know: ",
           "Question: ", "OK, ", "So, ", "One thing: ")
CLOSERS = (" Thanks.", " Please.", " Thank you!", " Thanks!", " Any idea?", " Just curious.")
#: Words for "the image" (one occurrence may be swapped).
IMAGE_WORDS = ("image", "picture", "micrograph", "frame", "view", "photo")
_STOPWORDS = ("the ", "this ", "a ", "is ")


def perturb(question: str, rng) -> str:
    """``question`` as people also type it: an opener or closer, lower case, no final mark, another word
    for the image, one dropped stopword, one typo (two letters swapped). Each with a fixed chance, from
    ``rng``; ``<region>`` tokens and ``{noun}`` slots are never touched."""
    q = question
    if rng.random() < 0.25:
        found = re.search(r"\b(" + "|".join(IMAGE_WORDS) + r")\b", q)
        if found:
            q = q[: found.start()] + IMAGE_WORDS[int(rng.integers(len(IMAGE_WORDS)))] + q[found.end():]
    if rng.random() < 0.15:
        present = [w for w in _STOPWORDS if f" {w}" in q]
        if present:
            q = q.replace(f" {present[int(rng.integers(len(present)))]}", " ", 1)
    if rng.random() < 0.15:
        words = q.split(" ")
        candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
        if candidates:
            i = candidates[int(rng.integers(len(candidates)))]
            j = int(rng.integers(1, len(words[i]) - 2))
            w = words[i]
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            q = " ".join(words)
    if rng.random() < 0.3 and q[-1:] in "?.":
        q = q[:-1]
    if rng.random() < 0.25:
        q = OPENERS[int(rng.integers(len(OPENERS)))] + q[:1].lower() + q[1:]
    elif rng.random() < 0.2:
        q = q + CLOSERS[int(rng.integers(len(CLOSERS)))]
    if rng.random() < 0.3:
        q = q.lower()  # region tokens and slots are lower case already
    return q
