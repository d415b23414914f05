"""The `medplib` command line. Runs without napari; heavy imports happen inside subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__

# The regions reader and the output writers live in `cli_io` (batch runs and the demo use them too);
# they stay importable from here.
from .cli_io import (  # noqa: F401 (re-exported)
    BadInput,
    atomic_path,
    instance_labels,
    labels_from_masks,
    read_regions,
    write_label_tiff,
    write_table,
)

#: Exit code for bad input (missing file, unsupported data, invalid model folder).
EXIT_BAD_INPUT = 2


def _cmd_info(args: argparse.Namespace) -> int:
    """Print version, torch/CUDA availability and where models are looked for."""
    from .paths import MODEL_PATH_ENV, model_search_paths

    print(f"napari-medplib {__version__}")
    print(f"python {sys.version.split()[0]}")
    try:
        import torch
    except ImportError as exc:  # torch is a core dependency, but say so plainly if it is broken
        print(f"torch: not importable ({exc}); reinstall with `pip install torch`")
    else:
        print(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            print(f"CUDA: available ({torch.version.cuda}; {names})")
        else:
            print("CUDA: not available")
        mps = getattr(torch.backends, "mps", None)
        print(f"Apple MPS: {'available' if mps is not None and mps.is_available() else 'not available'}")
    print(f"models are looked for in (set {MODEL_PATH_ENV} to add folders):")
    for path in model_search_paths():
        print(f"  {path}{'' if path.exists() else '  (does not exist)'}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------- helpers
class _Progress:
    """A plain-text progress line on stderr, only when stderr is a terminal (pipes stay clean)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 20
        filled = int(width * done / total) if total else width
        end = "\n" if total and done >= total else ""
        sys.stderr.write(f"\r{stage:<24} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
        sys.stderr.flush()


def _read_image(args: argparse.Namespace):
    from .image_files import parse_plane_arg, read_plane

    image, _info = read_plane(args.image, parse_plane_arg(args.plane), args.channel)
    if image.ndim not in (2, 3):
        raise BadInput(f"{args.image}: unsupported image dimensions {image.shape}; choose a 2-D plane with --plane/--channel")
    return image


def _check_new_file(option: str, path: Path, overwrite: bool) -> None:
    """An output file may be written: its folder exists, and it is new unless ``--overwrite``."""
    if not path.parent.is_dir():
        raise BadInput(f"{option} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise BadInput(f"{option} {path}: the file exists; pass --overwrite to replace it")


def _check_labels_out(path: str | None, overwrite: bool = False) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise BadInput(f"--labels-out {path}: must be a .tif or .tiff file")
    _check_new_file("--labels-out", out, overwrite)
    return out


def _write_labels(path: Path | None, masks: Sequence[Any], shape: tuple[int, int]) -> list[int]:
    ids = list(range(1, len(masks) + 1))
    if path is not None:
        write_label_tiff(path, labels_from_masks(masks, shape))
    return ids


def _check_table_out(path: str | None, overwrite: bool = False) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() != ".csv":
        raise BadInput(f"--table {path}: must be a .csv file")
    _check_new_file("--table", out, overwrite)
    return out


def _load_session(args: argparse.Namespace, progress: _Progress):
    if getattr(args, "server", None):  # the model runs on a `medplib serve` server
        from .serve.cli import connect

        return connect(args)
    from .engine import Session

    with _model_folder_errors(args.model):
        return Session.load(
            args.model, device=args.device, dtype=args.dtype, on_progress=progress,
            embedding_cache_dir=args.embedding_cache, llm_weights=getattr(args, "llm_weights", "full"),
        )


@contextlib.contextmanager
def _model_folder_errors(model: str | None) -> Iterator[None]:
    """A model folder the user named that cannot be read (corrupt tokenizer, malformed config or
    weights) is bad input: exit 2 with one line. The bundled model failing is an internal error, and
    running out of memory is not the folder's fault."""
    try:
        yield
    except MemoryError:
        raise
    except (RuntimeError, OSError, TypeError, KeyError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        if model is None or "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
            raise
        raise BadInput(f"model {model}: cannot be loaded ({type(exc).__name__}: {_one_line(exc)}); "
                       "is it a complete MedPLIB model folder?") from exc


def _image_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"contrast_limits": tuple(args.contrast) if args.contrast else None}


# ---------------------------------------------------------------------------------- commands
def _cmd_ask(args: argparse.Namespace) -> int:
    """Answer a question about one image plane; write masks as a label TIFF."""
    labels_out = _check_labels_out(args.labels_out, args.overwrite)
    table_out = _check_table_out(args.table, args.overwrite)
    image = _read_image(args)
    regions = read_regions(args.regions, image.shape[:2]) if args.regions else []
    progress = _Progress()
    session = _load_session(args, progress)
    streamed = not args.json

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    reply = session.ask(
        image, args.question, regions, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        mask_mode=args.mask_mode, on_text=on_text if streamed else None, on_progress=progress,
        instances=not args.no_instances, **_image_kwargs(args),
    )
    table = None
    if reply.instances:  # one label id per object in the file, numbered across the answer's masks
        labels, table = instance_labels(reply, image.shape[:2])
        ids = sorted(int(i) for i in table["label"])
        if labels_out is not None:
            write_label_tiff(labels_out, labels)
    else:
        ids = _write_labels(labels_out, reply.masks, image.shape[:2])
    write_table(table_out, table)
    if args.json:
        from .engine.measure import table_rows

        print(json.dumps({
            "text": reply.text, "masks": ids, "labels_out": str(labels_out) if labels_out else None,
            "model": reply.model, "timings": reply.timings, "finish_reason": reply.finish_reason,
            "mask_areas": [int(m.sum()) for m in reply.masks], "mask_scores": reply.mask_scores,
            "regions": len(reply.regions), "expert_share_mean": reply.expert_share_mean,
            "warnings": reply.warnings,
            "instances": [int(labels.max()) for labels in reply.instances],
            "objects": table_rows(table) if table is not None else [],
            "measured_count": reply.measured_count, "count_noun": reply.count_noun,
            "table_out": str(table_out) if table_out else None,
        }))
    else:
        print()
        for warning in reply.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if reply.measured_count is not None:
            print(f"Measured: {reply.measured_count} {reply.count_noun} (grounded instances)", file=sys.stderr)
        if reply.masks:
            where = f"written to {labels_out}" if labels_out else "not saved (use --labels-out PATH.tif)"
            objects = f" ({len(ids)} objects)" if reply.instances else ""
            print(f"{len(reply.masks)} mask(s){objects} {where}", file=sys.stderr)
    return 0


def _segment_prompts(args: argparse.Namespace, image_hw: tuple[int, int]) -> list[dict[str, Any]]:
    """The prompt sets to run: one from --point/--negative/--box, or one per region of --regions."""
    points = [tuple(p) for p in args.point or []] + [tuple(p) for p in args.negative or []]
    labels = [1] * len(args.point or []) + [0] * len(args.negative or [])
    if args.regions:
        if points or args.box:
            raise BadInput("give either --regions or --point/--negative/--box, not both")
        regions = read_regions(args.regions, image_hw)
        common: dict[str, Any] = {}
        point_regions = [r for r in regions if r.kind == "point"]
        if point_regions:
            common = {"points": [tuple(float(v) for v in r.coords[0]) for r in point_regions],
                      "point_labels": [int(r.positive) for r in point_regions]}
        prompts = [dict(common, box=r.bbox) for r in regions if r.kind != "point" and r.bbox is not None]
        return prompts or [common]
    if not points and not args.box:
        raise BadInput("give a prompt: --point Y X, --box Y0 X0 Y1 X1 or --regions FILE")
    prompt: dict[str, Any] = {}
    if points:
        prompt.update(points=points, point_labels=labels)
    if args.box:
        prompt["box"] = tuple(args.box)
    return [prompt]


def _window_arg(text: str) -> str | int | None:
    """``--window``: auto (crop around the prompts on large images), none (whole image) or a side in px."""
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if value in ("none", "0"):
        return None
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected auto, none or a crop side in pixels, got {text!r}")


def _window_json(result) -> list[int] | None:
    """The image area SAM saw for one prompt set, [y0, x0, y1, x1] end-exclusive (None: not reported)."""
    window = getattr(result, "window", None)
    return None if window is None else [int(v) for v in window]


def _cmd_segment(args: argparse.Namespace) -> int:
    """Direct prompts through SAM-Med2D (no LLM); one label id per prompt set."""
    labels_out = _check_labels_out(args.labels_out, args.overwrite)
    table_out = _check_table_out(args.table, args.overwrite)
    image = _read_image(args)
    prompts = _segment_prompts(args, image.shape[:2])
    progress = _Progress()
    session = _load_session(args, progress)
    results = [
        session.segment(image, **prompt, multimask=args.multimask, mask_mode=args.mask_mode,
                        on_progress=progress, window=args.window, clip_to_box=not args.no_clip_to_box,
                        clicked_pieces=not args.all_pieces, **_image_kwargs(args))
        for prompt in prompts
    ]
    masks = [r.mask for r in results]
    ids = _write_labels(labels_out, masks, image.shape[:2])
    timings = {k: sum(r.timings.get(k, 0.0) for r in results) for k in results[0].timings}
    from .engine.measure import measure, table_rows

    table = measure(labels_from_masks(masks, image.shape[:2]).astype("int64"),
                    image if image.ndim == 2 or image.shape[-1] <= 4 else None)
    write_table(table_out, table)
    if args.json:
        print(json.dumps({
            "masks": ids, "labels_out": str(labels_out) if labels_out else None, "model": session.model_name,
            "scores": [max(r.scores) for r in results], "mask_areas": [int(m.sum()) for m in masks],
            "windows": [_window_json(r) for r in results], "timings": timings,
            "objects": table_rows(table), "table_out": str(table_out) if table_out else None,
        }))
    else:
        where = f"written to {labels_out}" if labels_out else "not saved (use --labels-out PATH.tif)"
        areas = ", ".join(f"{int(m.sum())} px" for m in masks)
        print(f"{len(masks)} mask(s) ({areas}) {where}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    """Adapt a model to annotated images; Ctrl-C saves a checkpoint that the same command resumes."""
    from .engine.loading import pick_device, resolve_source
    from .train.finetune_inputs import (
        ProgressPrinter,
        StopOnInterrupt,
        check_out_folder,
        load_annotated_planes,
    )

    out = check_out_folder(args.out)
    resolve_source(args.base_model)  # a missing model fails before any image is read
    if not args.no_grounding and not _has_module("peft"):
        raise BadInput("learning the class name ('segment the <class>') trains LoRA factors, which needs peft: "
                       "pip install 'napari-medplib[train]' (or pass --no-grounding)")
    device = pick_device(args.device)
    planes = load_annotated_planes(args.images, args.labels, args.class_name, fully_annotated=args.fully_annotated,
                                   note=lambda message: print(f"note: {message}", file=sys.stderr))
    from .train.finetune import FinetuneCancelled, FinetuneOptions, finetune

    options = FinetuneOptions(steps=args.steps, holdout=args.holdout, seed=args.seed, evaluate=not args.no_eval,
                              grounding=not args.no_grounding)
    printer = ProgressPrinter(options.steps)
    with StopOnInterrupt() as stop:
        try:
            result = finetune(planes, out, args.base_model, options, on_progress=printer.phase, should_stop=stop,
                              on_log=printer.log, device=device)
        except FinetuneCancelled:
            print("interrupted; run the same command again to resume", file=sys.stderr)
            return 130
    print(result.summary())
    print(f"model: {result.model_dir}")
    return 0


def _temperature(text: str) -> float:
    """``--temperature``: a finite number >= 0 (NaN and infinity would sample garbage or crash)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text!r}")
    return value


def _has_module(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None


def _cmd_demo(args: argparse.Namespace) -> int:
    """The bundled model on the sample image: napari with the widget, or headless."""
    from .demo import run_demo

    headless = True if args.headless else None
    options: dict[str, Any] = {"out": args.out, "model": args.model, "device": args.device}
    with _model_folder_errors(args.model):
        run_demo(headless, **options)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), such as 0.2, got {text!r}")
    return value


def _add_finetune_parser(sub) -> None:
    """``medplib finetune IMAGES... --labels LABELS... --out DIR``."""
    parser = sub.add_parser(
        "finetune", help="adapt a model to your annotated images (resumable)",
        description="Fine-tune a model's box and click segmentation on annotated objects. Give one labels file "
                    "per image, in the same order: a label image (TIFF/PNG, one id per object) or regions "
                    "(QuPath .geojson, COCO .json, ImageJ .roi / RoiSet .zip). A share of the objects is held "
                    "out to measure the model before and after. Ctrl-C stops after saving a checkpoint: run the "
                    "same command again to resume.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="TIFF (plane or stack), PNG or JPEG files")
    parser.add_argument("--labels", nargs="+", required=True, metavar="LABELS",
                        help="one label image or region file per image, in the same order")
    parser.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                        help="class name of every object (default: the region files' classes, else 'object')")
    parser.add_argument("--from", dest="base_model", default=None, metavar="MODEL",
                        help="model folder or name to start from (default: the bundled model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the adapted model")
    from .train.finetune_data import FinetuneOptions  # torch-free: the core's own defaults

    defaults = FinetuneOptions()
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps,
                        help=f"training steps (default {defaults.steps})")
    parser.add_argument("--holdout", type=_share, default=defaults.holdout,
                        help=f"share of the objects held out to measure the result (default {defaults.holdout}, "
                        "at least 3)")
    parser.add_argument("--fully-annotated", action="store_true",
                        help="every object in the images is labelled (unlabelled pixels are background)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the training examples")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-eval", action="store_true", help="skip measuring the model before and after")
    parser.add_argument("--no-grounding", action="store_true",
                        help="train box and click prompts only, not 'segment the <class>' (faster)")
    parser.set_defaults(func=_cmd_finetune)


# ---------------------------------------------------------------------------------- parser
def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="TIFF, PNG or JPEG file")
    parser.add_argument("--model", default=None, help="model folder, name, or cached hub id (default: bundled)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--llm-weights", choices=("full", "int8"), default="full",
                        help="int8: the language model with int8 weights (MedPLIB models; a 7B fits a 24 GB GPU)")
    parser.add_argument("--plane", default=None, help="plane of an nD TIFF: an index, or axes like Z=3,T=0")
    parser.add_argument("--channel", type=int, default=None, help="one channel of a multi-channel image")
    parser.add_argument("--contrast", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="contrast limits (default: robust percentiles for non-8-bit data)")
    parser.add_argument("--labels-out", default=None, metavar="PATH.tif", help="write the masks as a label TIFF")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --labels-out / --table files (by default they are kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--table", default=None, metavar="PATH.csv",
                        help="write the per-object table (label, area, centroid, bbox, mean intensity, eccentricity)")
    parser.add_argument("--mask-mode", default="corrected", choices=("corrected", "reference"))
    parser.add_argument("--embedding-cache", default=None, metavar="DIR",
                        help="keep image embeddings in this folder (reused by later runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medplib", description="MedPLIB: ask about biomedical images, ground and segment."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices and model search paths")
    info.set_defaults(func=_cmd_info)

    ask = sub.add_parser("ask", help="ask a question about an image (optionally about regions)")
    _add_common(ask)
    ask.add_argument("question", help='the question; name regions with <region> or <region1>, <region2> ...')
    ask.add_argument("--regions", default=None, metavar="FILE", help="GeoJSON, ImageJ .roi/.zip or COCO .json")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--no-instances", action="store_true",
                     help="one label per answer mask instead of one per object (no table, no measured count)")
    ask.set_defaults(func=_cmd_ask)

    seg = sub.add_parser("segment", help="segment from point/box prompts (no language model)")
    _add_common(seg)
    seg.add_argument("--point", type=float, nargs=2, action="append", metavar=("Y", "X"), help="positive point")
    seg.add_argument("--negative", type=float, nargs=2, action="append", metavar=("Y", "X"), help="negative point")
    seg.add_argument("--box", type=float, nargs=4, metavar=("Y0", "X0", "Y1", "X1"), help="inclusive box")
    seg.add_argument("--regions", default=None, metavar="FILE", help="one mask per shape in this file")
    seg.add_argument("--multimask", action="store_true", help="pick the best of SAM's 3 candidates")
    seg.add_argument("--window", type=_window_arg, default="auto", metavar="auto|none|N",
                     help="segment large images in an N-px native-resolution crop around the prompts "
                          "(auto, the default: when the image is over 1.5x SAM's input; none: whole image)")
    seg.add_argument("--no-clip-to-box", action="store_true",
                     help="keep mask pixels outside a --box (by default a box's mask stays inside it)")
    seg.add_argument("--all-pieces", action="store_true",
                     help="keep every piece of a --point's mask (by default only the pieces under a positive point)")
    seg.set_defaults(func=_cmd_segment)

    demo = sub.add_parser(
        "demo", help="the bundled model on the sample image: napari with the widget, or headless",
        description="Open napari with the sample image (synthetic nuclei), dock the MedPLIB widget, ask it to "
                    "segment the nuclei and save the labels. Without a display (or with --headless) the same "
                    "question is answered in the terminal and the labels file and object table are written.",
    )
    demo.add_argument("--headless", action="store_true", help="no window: print the answer, write the files")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="folder for nuclei_labels.tif and nuclei_objects.csv (default: ./medplib-demo; "
                           "the demo replaces its own files there)")
    demo.add_argument("--model", default=None, help="model folder or name (default: the bundled model)")
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    demo.set_defaults(func=_cmd_demo)

    from .serve.cli import add_serve_parser, add_server_options  # light: argparse only
    from .train.cli import (  # light: argparse only until a command runs
        add_eval_parser,
        add_train_parser,
    )

    add_server_options(ask)
    add_server_options(seg)
    add_serve_parser(sub)

    add_train_parser(sub)
    add_eval_parser(sub)
    _add_finetune_parser(sub)
    from .batch.cli import add_batch_parser  # light: argparse only until a run starts

    add_batch_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # our input errors are ValueErrors with one-line messages that say what to fix
        print(f"medplib: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("medplib: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MEDPLIB_DEBUG"):
            raise
        print(f"medplib: internal error ({type(exc).__name__}: {_one_line(exc)}); set MEDPLIB_DEBUG=1 for details",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
