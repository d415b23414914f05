"""Training recipes: one TOML file says what to build, what data to use, and how each stage trains.

A recipe mirrors MedPLIB's training strategy (reference section 6) at any scale:

* ``[model]`` — the architecture of a model trained from scratch (LLaMA, CLIP and SAM-Med2D sizes) and
  the tokenizer folder;
* ``[data]`` — synthetic data (an endless seeded stream, so no sample is seen twice) or a folder written
  by ``train.save_dataset`` (e.g. converted user annotations), plus the held-out split for evaluation;
* ``[[stages]]`` — in order. ``kind = "sam"`` warms up SAM-Med2D on box/point prompts (our stand-in
  for the pretrained SAM-Med2D the paper starts from); ``kind = "vision"`` trains the vision tower
  alone on the object-density target (``train.density``; our stand-in for a pretrained CLIP that can
  count); ``kind = "counter"`` trains the model's object counter alone on instance centres
  (``model.counter``, ``train.centres``); ``kind = "llm"`` trains on conversations: stage
  II (VQA, dense FFN), stage III (grounding: FFN, mask decoder, T-projector), stage IV (MoE with both
  experts initialised from II and III, router trained). Each stage names what it starts from
  (``init``), which parameters train (``train``, glob patterns on parameter names), optional LoRA
  (``lora``), loss weights, learning rate, steps and batch size. A stage may change the architecture
  (``model``, e.g. a larger vision tower; later stages that start from it inherit it) and leave parts of
  its ``init`` stage out (``reinit``), to be trained anew or copied from another stage.

Parsing is strict: an unknown key is an error naming the key, so a typo never silently trains the
wrong thing. No torch here.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import POINT_REGION_MASKS

#: Where the recipes shipped with the package live (``medplib train tiny-cpu`` finds them by name).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
STAGE_KINDS = ("sam", "llm", "vision", "counter")
TASKS = ("grounding", "region_vqa", "vqa")


class RecipeError(ValueError):
    """A recipe file is missing, malformed or inconsistent; the message names the key and the fix."""


@dataclass
class ModelSpec:
    """Architecture of a model trained from scratch (see ``model.config.MedPLIBConfig``)."""

    tokenizer: str = "tokenizer"  # folder with tokenizer.model (+ added_tokens.json); relative to the recipe
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_experts: int = 2
    capacity_factor: float = 1.5
    clip_hidden_size: int = 64
    clip_intermediate_size: int = 128
    clip_layers: int = 2
    clip_heads: int = 2
    sam_embed_dim: int = 64
    sam_depth: int = 2
    sam_heads: int = 2
    sam_adapter_hidden: int = 16
    sam_prompt_dim: int = 64  # = out_dim of the T-projector; a multiple of 8 (the decoder has 8 heads)
    sam_decoder_mlp_dim: int = 256
    sam_iou_hidden: int = 64
    region_geometry: bool = False  # our region-token geometry extension (model.region_encoder)
    geometry_init_std: float = 0.1  # its MLP's output weights at init (config.region_geometry_init_std)
    geometry_version: int = 1  # its features (config.region_geometry_version: 2 adds log area, eccentricity)
    seg_region_prompts: bool = False  # our extension: a <SEG> about a region also gets its box/point (model.seg_prompts)
    #: our extension: "object" makes a point <region> SAM's mask of the clicked object (config.point_region_mask)
    point_region_mask: str = "square"
    #: our extension: the model counts these nouns' objects; its image and region tokens carry the counts (config.count_nouns)
    count_nouns: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class DataSpec:
    """Training and held-out data."""

    source: str = "synthetic"  # "synthetic" or a folder written by save_dataset (relative to the recipe)
    seed: int = 0
    n_per_task: int = 4  # conversations per task and sample (synthetic)
    size: int = 256  # synthetic image side
    styles: list[str] = field(default_factory=list)  # synthetic styles; [] = synth.DEFAULT_STYLES
    turns_per_sequence: int = 6  # conversations of one image packed as one multi-turn sequence
    heldout_source: str = "synthetic"  # "synthetic" (held-out split) or a folder
    heldout_n: int = 100


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on ``nn.Linear`` layers whose name ends with one of ``targets``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])


@dataclass
class LossWeights:
    ce: float = 1.0
    bce: float = 1.0
    dice: float = 1.0
    iou: float = 0.0  # MSE between SAM's IoU head and the real IoU
    aux: float = 0.0  # MoE load-balancing
    #: MoE stages (our extension; the paper's router is unsupervised, 0): CE of every layer's router
    #: logits against the expert whose source stage trained on the token's task (``router_targets``).
    router: float = 0.0
    #: llm stages: SAM box/point-prompt BCE and Dice on the batch's images, so that training the shared
    #: mask decoder on text prompts (<SEG>) does not make it forget box and point prompts.
    prompt_bce: float = 0.0
    prompt_dice: float = 0.0
    #: llm stages on synthetic data (our extension): a training-only head on the vision tower's patch
    #: features regresses each category's object-centroid density (``train.density``), so that the
    #: image tokens carry counts; needs the vision tower in ``train``.
    density: float = 0.0
    #: counter stages: the object counter's focal loss on instance centres (``train.centres``)
    centre: float = 0.0


@dataclass
class StageSpec:
    """One training stage."""

    name: str
    kind: str = "llm"
    steps: int = 100
    batch_size: int = 2
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    train: list[str] = field(default_factory=list)  # glob patterns on parameter names
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    moe: bool = False  # MoE FFN (stage IV) instead of the dense FFN (stages II, III)
    init: str = "scratch"  # "scratch" or the name of an earlier stage whose result this one starts from
    experts: list[str] = field(default_factory=list)  # moe: the stage each expert's FFN comes from
    copy: dict[str, list[str]] = field(default_factory=dict)  # stage name -> parameter patterns to take from it
    lora: LoraSpec | None = None
    loss: LossWeights = field(default_factory=LossWeights)
    checkpoint_every: int = 50  # steps between resumable step checkpoints
    prompt: str = "box+point"  # sam stages: "box", "point" or "box+point"
    instances_per_image: int = 8  # sam stages
    #: sam stages: "" (images as drawn) or "realistic" (`augment.realistic`: rescaled, cut at the
    #: engine's object scale around one object, photometrically changed like real microscopy)
    augment: str = ""
    #: sam stages with augment: the extent (SAM pixels) an object is cut to, before jitter; 0 = the
    #: synthetic frames' own (``scale.MODEL_OBJECT_EXTENT``)
    augment_extent: float = 0.0
    #: llm stages on grounding: the share of frames whose objects are painted over (`augment.empty_frame`),
    #: their grounding answers' masks empty, so the model learns to mark nothing where nothing is
    empty_frames: float = 0.0
    #: llm stages: false leaves the 576 image tokens out of the sequence (region tokens are still made
    #: from the image). A from-scratch LLM facing ~800 tokens never learns to attend to the one region
    #: token; without the image tokens it has ~30 to choose from.
    image_tokens: bool = True
    #: llm stages: conversations per packed sequence; 0 = the data's ``turns_per_sequence``.
    turns: int = 0
    #: This stage's torch threads and batch-making worker processes, when not the recipe's: a stage
    #: whose data costs more than its model (many synthetic images per step) trains faster with one
    #: thread and one worker on two cores; the others with both threads (benchmarks/train_data_workers.py).
    threads: int = 0
    data_workers: int | None = None
    #: llm stages: what a point <region> is in this stage and in the model it saves, when not [model]'s
    #: ``point_region_mask`` ("square" or "object"; "" = the model's)
    point_region_mask: str = ""
    #: where this stage trains, when not the recipe's ``device`` ("" = the recipe's): a recipe can
    #: continue on a GPU from stages that were trained on a CPU, and still say how each was made
    device: str = ""
    #: synthetic styles this stage trains on, when not the data's ``styles`` ([] = the data's): a
    #: stage can add a style (e.g. ``bacteria``) without changing what the stages before it saw
    styles: list[str] = field(default_factory=list)
    #: llm stages on synthetic data: the cycle of question kinds per task, when not the default
    #: (`conversations.DEFAULT_KINDS`; a kind listed twice is asked twice as often), e.g.
    #: ``{ vqa = ["count", "count", "modality", "description", "presence"] }``
    kinds: dict[str, list[str]] = field(default_factory=dict)
    #: llm stages on synthetic data: conversations per task and image, when not the data's ``n_per_task``
    #: (a task left out keeps the data's number)
    n_per_task: dict[str, int] = field(default_factory=dict)
    #: this stage's architecture changes to ``[model]`` (keys of it, e.g. ``clip_layers``); a stage
    #: without its own starts from its ``init`` stage's (or ``[model]``'s, from scratch)
    model: dict[str, Any] = field(default_factory=dict)
    #: parameters (glob patterns) not taken from ``init``: left at their new random values unless
    #: ``copy`` fills them; what a changed architecture (``model``) needs for the parts it resized
    reinit: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    stages: list[StageSpec]
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    #: processes that make the training batches ahead of the step that needs them (`stream.Prefetcher`);
    #: 0 = made in the training process. Same data either way, only faster.
    data_workers: int = 0
    device: str = "cpu"
    folder: Path | None = None  # where the recipe file is (relative paths resolve against it)
    path: Path | None = None  # the recipe file
    #: The stage whose result is the run's model (default: the last); later stages are comparisons
    #: such as a dense model trained on the same budget (the paper's Table 3).
    final: str = ""

    def router_targets(self, stage: StageSpec) -> dict[str, int]:
        """Task -> the index of the expert whose source stage trained on it (``loss.router``).

        A stage without experts that continues a MoE stage (``init`` is one) routes as that stage did.
        Raises RecipeError when a task of ``stage`` has no such expert or more than one."""
        source = stage
        while not source.experts and source.moe and source.init != "scratch" and self.stage(source.init).moe:
            source = self.stage(source.init)
        targets: dict[str, list[int]] = {}
        for index, name in enumerate(source.experts):
            for task in self.stage(name).tasks:
                targets.setdefault(task, []).append(index)
        bad = {t: targets.get(t, []) for t in stage.tasks if len(targets.get(t, [])) != 1}
        if bad:
            raise RecipeError(f"stage {stage.name!r}: loss.router needs exactly one expert per task; experts "
                              f"{source.experts} were trained on {targets}, "
                              f"ambiguous or missing: {sorted(bad)}")
        return {task: indices[0] for task, indices in targets.items() if task in stage.tasks}

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"recipe {self.name!r} has no stage {name!r} (stages: {[s.name for s in self.stages]})")

    def resolve(self, path: str) -> Path:
        """A path from the recipe, relative to the recipe file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.folder is None else self.folder / p

    def stage_styles(self, stage: StageSpec) -> tuple[str, ...]:
        """The synthetic styles ``stage`` trains on (() = the generator's defaults)."""
        return tuple(stage.styles or self.data.styles)

    def stage_n_per_task(self, stage: StageSpec) -> int | dict[str, int]:
        """Conversations per task and image for ``stage`` (the data's, overridden per task)."""
        if not stage.n_per_task:
            return self.data.n_per_task
        return {task: stage.n_per_task.get(task, self.data.n_per_task) for task in TASKS}

    def stage_model(self, stage: StageSpec) -> ModelSpec:
        """The architecture ``stage`` builds: its own ``model`` changes on top of its ``init`` stage's
        architecture (``[model]`` for a stage trained from scratch)."""
        base = self.model if stage.init == "scratch" else self.stage_model(self.stage(stage.init))
        return dataclasses.replace(base, **stage.model) if stage.model else base

    def stage_device(self, stage: StageSpec) -> str:
        return stage.device or self.device

    @property
    def final_stage(self) -> StageSpec:
        return self.stage(self.final) if self.final else self.stages[-1]


# ----------------------------------------------------------------------------- parsing
def _build(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise RecipeError(f"[{where}] must be a table, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in [{where}]; allowed: {sorted(names)}")
    return cls(**values)


def _stage(values: dict[str, Any], index: int) -> StageSpec:
    where = f"stages #{index + 1}"
    if "name" not in values:
        raise RecipeError(f"[{where}] needs a name")
    values = dict(values)
    lora = values.pop("lora", None)
    loss = values.pop("loss", {})
    stage = _build(StageSpec, values, f"{where} ({values['name']})")
    stage.lora = _build(LoraSpec, lora, f"{where}.lora") if lora else None
    stage.loss = _build(LossWeights, loss, f"{where}.loss")
    if stage.kind not in STAGE_KINDS:
        raise RecipeError(f"stage {stage.name!r}: kind must be one of {STAGE_KINDS}, got {stage.kind!r}")
    bad = sorted(set(stage.tasks) - set(TASKS))
    if bad:
        raise RecipeError(f"stage {stage.name!r}: unknown task(s) {bad}; choose from {TASKS}")
    if stage.steps < 0 or stage.batch_size < 1 or stage.lr <= 0:
        raise RecipeError(f"stage {stage.name!r}: need steps >= 0, batch_size >= 1 and lr > 0")
    if not stage.train:
        raise RecipeError(f"stage {stage.name!r}: 'train' lists no parameters; name the trainable ones "
                          "with glob patterns such as 'sam.mask_decoder.*'")
    if stage.threads < 0 or (stage.data_workers is not None and stage.data_workers < 0):
        raise RecipeError(f"stage {stage.name!r}: threads and data_workers must be 0 or more")
    if stage.prompt not in ("box", "point", "box+point"):
        raise RecipeError(f"stage {stage.name!r}: prompt must be 'box', 'point' or 'box+point'")
    if not 0.0 <= stage.empty_frames < 1.0:
        raise RecipeError(f"stage {stage.name!r}: empty_frames must be in [0, 1), got {stage.empty_frames!r}")
    if stage.empty_frames and (stage.kind != "llm" or "grounding" not in stage.tasks):
        raise RecipeError(f"stage {stage.name!r}: empty_frames applies to llm stages with the grounding task")
    if stage.augment not in ("", "realistic"):
        raise RecipeError(f"stage {stage.name!r}: augment must be '' or 'realistic', got {stage.augment!r}")
    if stage.augment and stage.kind != "sam":
        raise RecipeError(f"stage {stage.name!r}: augment applies to sam stages only")
    if stage.augment_extent < 0:
        raise RecipeError(f"stage {stage.name!r}: augment_extent must be 0 or more, got {stage.augment_extent!r}")
    if stage.augment_extent and not stage.augment:
        raise RecipeError(f"stage {stage.name!r}: augment_extent needs augment = 'realistic'")
    if stage.loss.router and not stage.moe:
        raise RecipeError(f"stage {stage.name!r}: loss.router supervises the MoE router; it needs moe = true")
    if stage.point_region_mask not in ("", *POINT_REGION_MASKS):
        raise RecipeError(f"stage {stage.name!r}: point_region_mask must be one of {POINT_REGION_MASKS}, "
                          f"got {stage.point_region_mask!r}")
    _check_kinds(stage)
    model_keys = {f.name for f in dataclasses.fields(ModelSpec)} - {"tokenizer", "seed"}
    bad = sorted(set(stage.model) - model_keys)
    if bad:
        raise RecipeError(f"stage {stage.name!r}: model changes unknown or fixed key(s) {bad}; "
                          f"allowed: {sorted(model_keys)}")
    if stage.reinit and stage.init == "scratch":
        raise RecipeError(f"stage {stage.name!r}: reinit leaves parameters of the init stage out, "
                          "but the stage starts from scratch")
    if stage.kind == "counter" and (stage.loss.centre <= 0 or not any(p.startswith("counter") for p in stage.train)):
        raise RecipeError(f"stage {stage.name!r}: a counter stage trains the object counter on instance "
                          "centres; it needs loss.centre > 0 and \"counter.*\" in train")
    if stage.kind == "vision" and (stage.loss.density <= 0 or stage.moe or stage.lora is not None):
        raise RecipeError(f"stage {stage.name!r}: a vision stage trains the vision tower on the density "
                          "target alone; it needs loss.density > 0, moe = false and no lora")
    return stage


def _check_kinds(stage: StageSpec) -> None:
    from .conversations import DEFAULT_KINDS

    for task, kinds in stage.kinds.items():
        if task not in DEFAULT_KINDS:
            raise RecipeError(f"stage {stage.name!r}: kinds names unknown task {task!r}; choose from {TASKS}")
        bad = sorted(set(kinds) - set(DEFAULT_KINDS[task]))
        if bad or not kinds:
            raise RecipeError(f"stage {stage.name!r}: kinds.{task} = {kinds} has unknown or no kinds {bad}; "
                              f"choose from {list(dict.fromkeys(DEFAULT_KINDS[task]))}")
    for task, n in stage.n_per_task.items():
        if task not in TASKS or not isinstance(n, int) or n < 0:
            raise RecipeError(f"stage {stage.name!r}: n_per_task.{task} = {n!r}; need a task of {TASKS} "
                              "and a whole number >= 0")


def _continues_moe(stage: StageSpec, stages: list[StageSpec]) -> bool:
    """Whether ``stage`` starts from a MoE stage that has experts, directly or through continuations."""
    by_name = {s.name: s for s in stages}
    source = stage
    while source.init in by_name and by_name[source.init].moe:
        source = by_name[source.init]
        if source.experts:
            return True
    return False


def parse_recipe(data: dict[str, Any], name: str = "recipe", folder: Path | None = None) -> Recipe:
    """A recipe from an already-parsed TOML dict (checked: stage references, kinds, tasks)."""
    data = dict(data)
    unknown = sorted(set(data) - {"name", "seed", "threads", "data_workers", "device", "final", "model", "data",
                                "stages"})
    if unknown:
        raise RecipeError(f"unknown top-level key(s) {unknown} in recipe {name!r}")
    stages_raw = data.get("stages")
    if not stages_raw:
        raise RecipeError(f"recipe {name!r} has no [[stages]]")
    stages = [_stage(s, i) for i, s in enumerate(stages_raw)]
    seen: list[str] = []
    for stage in stages:
        if stage.name in seen:
            raise RecipeError(f"two stages are called {stage.name!r}")
        refs = ([stage.init] if stage.init != "scratch" else []) + stage.experts + list(stage.copy)
        for ref in refs:
            if ref not in seen:
                raise RecipeError(f"stage {stage.name!r} refers to {ref!r}, which is not an earlier stage "
                                  f"(earlier: {seen or 'none'})")
        if stage.experts and not stage.moe:
            raise RecipeError(f"stage {stage.name!r} lists experts but has moe = false")
        if stage.loss.router and not stage.experts and not _continues_moe(stage, stages):
            raise RecipeError(f"stage {stage.name!r}: loss.router needs experts, or an init stage that is a MoE "
                              "with experts (a continued stage IV)")
        seen.append(stage.name)
    recipe = Recipe(
        name=str(data.get("name", name)),
        model=_build(ModelSpec, data.get("model", {}), "model"),
        data=_build(DataSpec, data.get("data", {}), "data"),
        stages=stages,
        seed=int(data.get("seed", 0)),
        threads=int(data.get("threads", 0)),
        data_workers=int(data.get("data_workers", 0)),
        device=str(data.get("device", "cpu")),
        folder=folder,
        final=str(data.get("final", "")),
    )
    from .synth import STYLES

    for where, styles in [("[data]", recipe.data.styles)] + [(f"stage {s.name!r}", s.styles) for s in stages]:
        bad = sorted(set(styles) - set(STYLES))
        if bad:
            raise RecipeError(f"{where}: unknown style(s) {bad}; choose from {list(STYLES)}")
    for stage in stages:
        if stage.loss.density and (recipe.data.source != "synthetic" or stage.kind == "sam"
                                   or not any(p.startswith("vision_tower") for p in stage.train)):
            raise RecipeError(f"stage {stage.name!r}: loss.density trains the vision tower on synthetic "
                              "counts; it needs kind = \"llm\" or \"vision\", [data] source = \"synthetic\" "
                              "and \"vision_tower.*\" in train")
        if (stage.kinds or stage.n_per_task) and recipe.data.source != "synthetic":
            raise RecipeError(f"stage {stage.name!r}: kinds and n_per_task shape synthetic conversations; "
                              f"[data] source is the folder {recipe.data.source!r}, whose conversations are fixed")
    if recipe.data_workers < 0:
        raise RecipeError(f"data_workers must be 0 (no worker processes) or more, got {recipe.data_workers}")
    if recipe.final:
        recipe.final_stage  # noqa: B018 - raises RecipeError naming the missing stage
    if recipe.model.point_region_mask not in POINT_REGION_MASKS:
        raise RecipeError(f"model.point_region_mask must be one of {POINT_REGION_MASKS}, "
                          f"got {recipe.model.point_region_mask!r}")
    if recipe.model.sam_prompt_dim % 8:
        raise RecipeError(f"model.sam_prompt_dim must be a multiple of 8 (8 decoder heads), got {recipe.model.sam_prompt_dim}")
    return recipe


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file by path, or by the name of a shipped recipe ("tiny-cpu", "gpu")."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    raise RecipeError(f"recipe {str(name_or_path)!r} not found: give a .toml file or one of {names}")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and check a recipe TOML file (by path or shipped name)."""
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path} is not valid TOML: {err}") from None
    recipe = parse_recipe(data, name=path.stem, folder=path.parent)
    recipe.path = path
    return recipe
