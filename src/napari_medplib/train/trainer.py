"""``medplib train RECIPE``: run a recipe's stages in order, resumable, with a loss log and progress bars.

Run folder (never inside the package)::

    run/
      recipe.toml              the recipe as run (a resumed run must use the same one)
      log.jsonl                one line per step: stage, step, lr, losses, seconds
      stages/<name>/final/     the stage's model in our safetensors layout (+ tokenizer, config);
                               DONE marks it complete, so a resumed run skips the stage
      stages/<name>/resume.pt  the latest step checkpoint (model, optimizer, step), written every
                               ``checkpoint_every`` steps and on interruption
      final.json               {"model": <the final stage's folder, relative to the run folder>}
      LOCK                     the pid of the trainer using the folder, while it runs (run_lock.py)

Every step's data and random numbers are fixed by (seed, stage, step) alone, and the learning rate by
the step, so an interrupted run resumed from its step checkpoint ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..model.convert import save_pretrained
from ..model.medplib import MedPLIBModel
from .build import add_lora, build_model, init_model, merge_lora, set_trainable, stage_state
from .density import DensityHead, density_categories, density_maps
from .recipe import Recipe, RecipeError, StageSpec, find_recipe, load_recipe
from .run_lock import run_lock
from .steps import counter_losses, llm_losses, make_batch, sam_losses, vision_losses
from .stream import Prefetcher, StageStream


class Interrupted(Exception):
    """Raised by ``Trainer.run`` after ``stop_after_steps``; the step checkpoint is written."""


def learning_rate(stage: StageSpec, step: int) -> float:
    """Linear warm-up then linear decay to 0 (the reference's WarmupDecayLR)."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    span = max(stage.steps - stage.warmup_steps, 1)
    return stage.lr * max(0.0, 1.0 - (step - stage.warmup_steps) / span)


def _atomic_save(obj, path: Path) -> None:
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    def __init__(self, recipe: Recipe | str | Path, run_dir: str | Path, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(find_recipe(recipe))
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.say = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if recipe.path is not None and not (self.run_dir / "recipe.toml").exists():
            shutil.copyfile(recipe.path, self.run_dir / "recipe.toml")
        self.tokenizer_folder = recipe.resolve(recipe.model.tokenizer)
        self.density_head: DensityHead | None = None  # the running stage's (loss.density), training only

    # ------------------------------------------------------------------ paths
    def stage_dir(self, stage: StageSpec) -> Path:
        return self.run_dir / "stages" / stage.name

    def final_dir(self, stage: StageSpec) -> Path:
        return self.stage_dir(stage) / "final"

    def is_done(self, stage: StageSpec) -> bool:
        return (self.final_dir(stage) / "DONE").is_file()

    # ------------------------------------------------------------------ model of a stage
    def initial_model(self, stage: StageSpec) -> MedPLIBModel:
        recipe = self.recipe
        model = build_model(recipe.stage_model(stage), self.tokenizer_folder, moe=stage.moe,
                            seed=recipe.model.seed, point_region_mask=stage.point_region_mask)
        states: dict[str, dict] = {}

        def state(name: str) -> dict:
            if name not in states:
                src = recipe.stage(name)
                if not self.is_done(src):
                    raise RecipeError(f"stage {stage.name!r} needs stage {name!r}, which has not finished")
                states[name] = stage_state(self.final_dir(src))
            return states[name]

        init = state(stage.init) if stage.init != "scratch" else None
        experts = [state(name) for name in stage.experts]
        copies = [(state(name), patterns) for name, patterns in stage.copy.items()]
        if init is not None or experts or copies:
            init_model(model, init, experts, copies, reinit=stage.reinit)
        if stage.lora is not None:
            model = add_lora(model, stage.lora)
        return model

    # ------------------------------------------------------------------ running
    def run(self, stop_after_steps: int | None = None, only: list[str] | None = None) -> Path:
        """Train every unfinished stage; returns the final model folder.

        ``only``: train just these stages (the stages they start from must be finished, e.g. copied in
        from a run on another machine); the others are left as they are.
        ``stop_after_steps``: simulate an interruption after that many steps of this call (tests)."""
        for name in only or []:
            self.recipe.stage(name)  # RecipeError naming the recipe's stages
        caller_threads = torch.get_num_threads()
        budget = [stop_after_steps]
        try:
            with run_lock(self.run_dir):  # one trainer per run folder
                for index, stage in enumerate(self.recipe.stages):
                    if only and stage.name not in only:
                        continue
                    if self.is_done(stage):
                        self.say(f"stage {stage.name}: done already ({self.final_dir(stage)})")
                        continue
                    torch.set_num_threads(stage.threads or self.recipe.threads or caller_threads)
                    self._run_stage(index, stage, budget)
                    if stage is self.recipe.final_stage:  # usable (medplib eval RUN) before comparisons end
                        self._write_final()
                if only and not self.is_done(self.recipe.final_stage):
                    return self.final_dir(self.recipe.stage(only[-1]))
                return self._write_final()
        finally:
            torch.set_num_threads(caller_threads)

    def _write_final(self) -> Path:
        final = self.final_dir(self.recipe.final_stage)
        # relative to the run folder, so the run can be moved or read from another directory
        model = final.relative_to(self.run_dir).as_posix()
        from ..atomic import atomic_write_text

        atomic_write_text(self.run_dir / "final.json", json.dumps({"model": model}, indent=2))
        return final

    def _run_stage(self, index: int, stage: StageSpec, budget: list[int | None]) -> None:
        model = self.initial_model(stage).to(self.recipe.stage_device(stage))
        trainable = set_trainable(model, stage.train)
        params = [p for p in model.parameters() if p.requires_grad]
        self.density_head = self._density_head(model, stage)
        if self.density_head is not None:
            params += list(self.density_head.parameters())
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay)
        start = 0
        resume = self.stage_dir(stage) / "resume.pt"
        if resume.is_file():
            saved = torch.load(resume, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            if self.density_head is not None:
                self.density_head.load_state_dict(saved["density_head"])
            optimizer.load_state_dict(saved["optimizer"])
            start = int(saved["step"])
            self.say(f"stage {stage.name}: resuming at step {start}/{stage.steps}")
        else:
            n = sum(p.numel() for p in params)
            self.say(f"stage {stage.name}: {stage.steps} steps, {len(trainable)} trainable tensors ({n:,} values)")
        workers = self.recipe.data_workers if stage.data_workers is None else stage.data_workers
        batches = Prefetcher(StageStream(self.recipe, stage, index), start, workers=workers, stop=stage.steps)
        model.train()
        bar = self._bar(stage, start)
        log = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")
        try:
            for step in range(start, stage.steps):
                if budget[0] is not None and budget[0] <= 0:
                    self._save_resume(model, optimizer, step, resume)
                    raise Interrupted(f"stopped at stage {stage.name!r} step {step}")
                t0 = time.perf_counter()
                record = self._step(model, optimizer, batches.next(), stage, index, step)
                record.update(stage=stage.name, step=step + 1, seconds=round(time.perf_counter() - t0, 3))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if budget[0] is not None:
                    budget[0] -= 1
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    bar.update(1)
                if (step + 1) % stage.checkpoint_every == 0 and step + 1 < stage.steps:
                    self._save_resume(model, optimizer, step + 1, resume)
        finally:
            batches.close()
            log.close()
            if bar is not None:
                bar.close()
        self._finish(model, stage)
        resume.unlink(missing_ok=True)

    def _step(self, model, optimizer, items: list, stage: StageSpec, index: int, step: int) -> dict:
        seed = int(np.random.default_rng([self.recipe.seed, index, step]).integers(2**62))
        torch.manual_seed(seed)  # MoE random token selection, region subsets, LoRA dropout
        lr = learning_rate(stage, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if stage.kind == "sam":
            losses = sam_losses(model, items, stage, np.random.default_rng(seed))
        elif stage.kind == "counter":
            losses = counter_losses(model, items)
        elif stage.kind == "vision":
            head = self.density_head
            losses = vision_losses(model, items, head, density_maps([item.sample for item in items], head.categories))
        else:
            targets = self.recipe.router_targets(stage) if stage.loss.router else None
            head = self.density_head
            density = density_maps([item.sample for item in items], head.categories) if head is not None else None
            losses = llm_losses(model, make_batch(model, items, stage.image_tokens), stage.loss, targets,
                                density_head=head, density_targets=density)
            if stage.loss.prompt_bce or stage.loss.prompt_dice:
                prompt = sam_losses(model, items, stage, np.random.default_rng(seed))
                losses["prompt_bce"], losses["prompt_dice"] = prompt["bce"], prompt["dice"]
        weights = stage.loss
        total = sum(getattr(weights, name) * value for name, value in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if stage.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], stage.grad_clip)
        optimizer.step()
        record = {"lr": lr, "loss": float(total.detach())}
        record.update({name: round(float(value.detach()), 5) for name, value in losses.items()})
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"stage {stage.name!r} step {step + 1}: the loss is {record['loss']}; "
                                     "lower the learning rate in the recipe")
        return record

    def _density_head(self, model, stage: StageSpec) -> DensityHead | None:
        """The stage's training-only density head (``loss.density``; starts at zero, so no seed)."""
        if not stage.loss.density:
            return None
        return DensityHead(model.config.mm_hidden_size, density_categories()).to(self.recipe.stage_device(stage))

    def _save_resume(self, model, optimizer, step: int, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        if self.density_head is not None:
            state["density_head"] = self.density_head.state_dict()
        _atomic_save(state, path)

    def _finish(self, model, stage: StageSpec) -> None:
        model.eval().cpu()
        if stage.lora is not None:
            merge_lora(model)
        final = self.final_dir(stage)
        if final.exists():
            shutil.rmtree(final)
        tmp = final.with_name("final.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_pretrained(model, tmp, tokenizer_folder=self.tokenizer_folder)
        (tmp / "DONE").write_text(json.dumps({"stage": stage.name, "steps": stage.steps}))
        tmp.rename(final)
        self.say(f"stage {stage.name}: saved {final}")

    def _bar(self, stage: StageSpec, start: int):
        if not self.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=stage.steps, initial=start, desc=f"stage {stage.name}", file=sys.stderr,
                    dynamic_ncols=True, mininterval=2.0)


def train(recipe: str | Path | Recipe, run_dir: str | Path, progress: bool = True) -> Path:
    """Run (or resume) a recipe in ``run_dir``; returns the final model folder."""
    return Trainer(recipe, run_dir, progress=progress).run()
