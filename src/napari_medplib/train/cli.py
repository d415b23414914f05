"""``medplib train RECIPE`` and ``medplib eval MODEL``: sub-commands for the main CLI.

``napari_medplib.cli.build_parser`` hooks them in with ``add_train_parser(sub)`` and
``add_eval_parser(sub)``; each sets ``func`` to a handler returning the exit code. Heavy imports
(torch) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .trainer import Trainer

    recipe = load_recipe(args.recipe)
    if args.threads:
        recipe.threads = args.threads
    run_dir = Path(args.run or Path.cwd() / "medplib-runs" / recipe.name)
    final = Trainer(recipe, run_dir, progress=not args.no_progress).run(only=args.stage)
    print(f"model: {final}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = [args.model, *(args.compare or [])]
    styles = [s.strip() for s in args.styles.split(",") if s.strip()] if args.styles else None
    evaluate(models, n=args.n, seed=args.seed, n_per_task=args.n_per_task, data=args.data,
             json_path=args.json, progress=not args.no_progress, styles=styles)
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """``medplib train RECIPE [--run DIR]``: run or resume a training recipe."""
    parser = subparsers.add_parser(
        "train", help="train a MedPLIB-architecture model from a recipe (resumable)",
        description="Run a training recipe (a TOML file, or a shipped one: tiny-gpu, tiny-cpu, gpu). Run it again "
                    "with the same --run folder to resume after an interruption.",
    )
    parser.add_argument("recipe", help="recipe file, or the name of a shipped recipe (tiny-gpu, tiny-cpu, gpu)")
    parser.add_argument("--run", help="run folder for checkpoints and the loss log "
                                      "(default: ./medplib-runs/<recipe name>)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MEDPLIB_TRAIN_THREADS", 0)),
                        help="torch CPU threads (default: the recipe's)")
    parser.add_argument("--stage", action="append",
                        help="train only this stage (repeatable); the stages it starts from must be finished "
                             "in the run folder, e.g. copied from a run on another machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_cmd_train)
    return parser


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """``medplib eval MODEL [--compare MODEL2 ...]``: held-out metrics, table + JSON."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a model on the held-out synthetic split (or a data set folder)",
        description="Grounding mDice, box/point-prompt mDice, region-VQA and image-VQA accuracy and "
                    "expert-routing shares. MODEL is a model folder or a training run folder.",
    )
    parser.add_argument("model", help="model folder (config.json) or training run folder (final.json)")
    parser.add_argument("--compare", nargs="*", help="more models evaluated on the same items (e.g. a dense run)")
    parser.add_argument("--n", type=int, default=100, help="held-out images (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the held-out split (default 0)")
    parser.add_argument("--n-per-task", type=int, default=4, help="questions per task and image (default 4)")
    parser.add_argument("--data", help="a data set folder (save_dataset) instead of the synthetic split")
    parser.add_argument("--styles", help="synthetic styles, comma-separated, e.g. 'bacteria' (default: the "
                                         "five default styles)")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m napari_medplib.train.cli train|eval ...`` (the same commands without the main CLI)."""
    parser = argparse.ArgumentParser(prog="python -m napari_medplib.train.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
