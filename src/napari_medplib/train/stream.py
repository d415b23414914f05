"""What each training step sees, fixed by (seed, stage, step) alone, so a resumed run sees the same data.

Synthetic data is an endless stream: step s of stage k reads samples ``k * 10**7 + s * batch + j`` of
the train split, so no sample repeats and nothing has to be stored. A data set folder (e.g. converted
user annotations) is read in a seeded random order, epoch after epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .batches import pack_conversations
from .data import Conversation, Sample, load_dataset, synthetic_items
from .recipe import Recipe, StageSpec

STAGE_OFFSET = 10**7
MAX_SKIPS = 50  # samples without a conversation for the stage's tasks, in a row


@dataclass
class Item:
    sample: Sample
    conversations: list[Conversation]  # one packed sequence (llm stages); all of them (sam stages)


class StageStream:
    """``stream.batch(step)`` -> the step's items; deterministic, random-access."""

    def __init__(self, recipe: Recipe, stage: StageSpec, stage_index: int) -> None:
        self.recipe, self.stage, self.stage_index = recipe, stage, stage_index
        data = recipe.data
        self.dataset = None if data.source == "synthetic" else load_dataset(recipe.resolve(data.source))
        self.options = {"size": (data.size, data.size)}
        if data.styles:
            self.options["styles"] = tuple(data.styles)

    def _sample(self, index: int) -> tuple[Sample, list[Conversation]]:
        data = self.recipe.data
        if self.dataset is None:
            return next(synthetic_items(1, seed=data.seed, split="train", n_per_task=data.n_per_task,
                                        start=self.stage_index * STAGE_OFFSET + index, **self.options))
        n = len(self.dataset)
        epoch, position = divmod(index, n)
        order = np.random.default_rng([data.seed, self.stage_index, epoch]).permutation(n)
        return self.dataset[int(order[position])]

    def batch(self, step: int) -> list[Item]:
        stage = self.stage
        rng = np.random.default_rng([self.recipe.seed, self.stage_index, step, 99])
        items: list[Item] = []
        index = step * stage.batch_size * 4  # room for skipped samples
        skips = 0
        while len(items) < stage.batch_size:
            sample, convs = self._sample(index)
            index += 1
            if stage.kind == "sam":
                if sample.labels.max() > 0:
                    items.append(Item(sample, convs))
                    continue
            else:
                chunks = pack_conversations(convs, stage.tasks, stage.turns or self.recipe.data.turns_per_sequence, rng)
                if chunks:
                    items.append(Item(sample, chunks[int(rng.integers(len(chunks)))]))
                    continue
            skips += 1
            if skips > MAX_SKIPS:
                raise ValueError(f"stage {stage.name!r}: {MAX_SKIPS} samples in a row have nothing for tasks "
                                 f"{stage.tasks}; check the data set and the stage's tasks")
        return items


def heldout_items(recipe: Recipe, n: int | None = None) -> Iterator[tuple[Sample, list[Conversation]]]:
    """The held-out split named by the recipe (synthetic held-out seeds, or a folder)."""
    data = recipe.data
    n = data.heldout_n if n is None else n
    if data.heldout_source == "synthetic":
        options = {"size": (data.size, data.size)}
        if data.styles:
            options["styles"] = tuple(data.styles)
        yield from synthetic_items(n, seed=data.seed, split="heldout", n_per_task=data.n_per_task, **options)
        return
    dataset = load_dataset(recipe.resolve(data.heldout_source))
    for i in range(min(n, len(dataset))):
        yield dataset[i]
