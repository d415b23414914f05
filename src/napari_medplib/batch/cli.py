"""``medplib batch INPUTS... --out DIR``: argparse only at import (the parser must stay light)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from .options import TILE_ABOVE, TILE_OVERLAP, TILE_SIZE


class TerminalProgress:
    """Items done / failed, rate and ETA on one stderr line (a plain line per 5 % when not a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last = -1

    def __call__(self, progress: Any) -> None:
        eta = progress.eta_s
        eta_text = "--" if eta is None else (f"{eta / 60:.1f} min" if eta >= 90 else f"{eta:.0f} s")
        text = (f"{progress.finished}/{progress.total} items  done {progress.done}  skipped {progress.skipped}  "
                f"failed {progress.failed}  {progress.rate:.2f} items/s  ETA {eta_text}")
        if self.tty:
            end = "\n" if progress.finished >= progress.total else ""
            sys.stderr.write(f"\r{text:<100}{end}")
            sys.stderr.flush()
        else:
            step = max(1, progress.total // 20)
            if progress.finished // step != self._last or progress.finished >= progress.total:
                self._last = progress.finished // step
                print(text, file=sys.stderr)


def _cmd_batch(args: argparse.Namespace) -> int:
    from ..image_files import parse_plane_arg
    from .options import Actions, BatchError, BatchOptions

    actions = Actions(ask=tuple(args.ask or ()), ground=tuple(args.ground or ()), segment=args.segment,
                      regions_pattern=args.regions_pattern)
    plane = None if args.all_planes else parse_plane_arg(args.plane)
    if args.server and args.llm_weights != "full":
        raise BatchError("--llm-weights applies to a model loaded here; a server chose its own "
                         "(start it with medplib serve --llm-weights int8)")
    options = BatchOptions(actions, model=args.model, device=args.device, dtype=args.dtype,
                           llm_weights=args.llm_weights, channel=args.channel,
                           plane=plane, max_new_tokens=args.max_new_tokens, tile_above=args.tile_above,
                           tile_size=args.tile, tile_overlap=args.tile_overlap)

    def dashboard(link: str) -> None:
        if link:
            print(f"Dask dashboard: {link}", file=sys.stderr)
        else:
            print("Dask dashboard: pip install bokeh to see it", file=sys.stderr)

    def log(message: str) -> None:
        if args.verbose or message.startswith("FAILED"):
            print(message, file=sys.stderr)

    session = None
    if args.server:  # the server's model answers; items go to it one by one from this process
        if args.scheduler:
            raise BatchError("give --server or --scheduler, not both (with --server the model runs on the server)")
        from ..serve.cli import connect

        session = connect(args)
    try:
        result = _run(args, options, session, dashboard, log)
    finally:
        if session is not None:
            session.close()
    print(result.summary())
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.failed:
        print(f"{result.failed} item(s) failed; reasons in {result.out / 'failed.csv'}; "
              f"re-run `{shlex.join(['medplib', 'batch', *sys.argv[2:]])}` to retry them", file=sys.stderr)
    return 1 if result.failed and not (result.done or result.skipped) else 0


def _run(args: argparse.Namespace, options: Any, session: Any, dashboard: Any, log: Any) -> Any:
    from .run import batch

    return batch(args.inputs, args.out, options, scheduler=args.scheduler, workers=args.workers,
                 retries=args.retries, recursive=args.recursive, session=session,
                 command=["medplib", *map(str, sys.argv[1:])], on_progress=TerminalProgress(),
                 on_log=log, on_dashboard=dashboard)


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_batch_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "batch", help="the same questions / prompts over many images, stacks or a cluster (resumable)",
        description="Run questions and prompts over files, folders, globs, stacks and OME-Zarr on a Dask "
                    "cluster (this machine by default). Writes labels, objects.csv/.parquet, answers.jsonl and "
                    "run.json into --out. Running the same command again resumes: finished items are skipped.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders, quoted globs ('data/*.tif'), stacks or OME-Zarr folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder (new, or this run's to resume)")
    parser.add_argument("--ask", action="append", metavar="QUESTION", help="a question; answers in answers.jsonl")
    parser.add_argument("--ground", action="append", metavar="QUESTION",
                        help='e.g. "Please segment the nuclei.": one label per object, rows in objects.csv')
    parser.add_argument("--segment", action="store_true",
                        help="segment the regions of the region file beside each image (see --regions-pattern)")
    parser.add_argument("--regions-pattern", default="{stem}.geojson", metavar="PATTERN",
                        help="region file per image, in its folder: {stem} = name without extension "
                             "(QuPath .geojson, ImageJ .roi/.zip, COCO .json, napari .csv; default {stem}.geojson)")
    planes = parser.add_mutually_exclusive_group()
    planes.add_argument("--plane", default=None, help="one plane of every stack: an index, or axes like Z=3,T=0")
    planes.add_argument("--all-planes", action="store_true", help="every plane of every stack (the default)")
    parser.add_argument("--channel", type=int, default=None, help="one channel of multi-channel images")
    parser.add_argument("--recursive", action="store_true", help="look into sub-folders of folder inputs")
    parser.add_argument("--model", default=None, help="model folder, name, or cached hub id (default: bundled)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--llm-weights", choices=("full", "int8"), default="full",
                        help="int8: the language model with int8 weights, about half the GPU memory (MedPLIB models)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="an existing Dask scheduler (tcp://host:8786); default: a local cluster")
    parser.add_argument("--workers", type=_nonnegative, default=None,
                        help="local worker processes (default: one per core that memory allows, or per GPU; "
                             "0 = run in this process)")
    from ..serve.cli import add_server_options  # light: argparse only

    add_server_options(parser)
    parser.add_argument("--retries", type=_nonnegative, default=1, help="retries of an item that raised (default 1)")
    parser.add_argument("--tile-above", type=int, default=TILE_ABOVE, metavar="PX",
                        help=f"planes larger than this are read and processed in tiles (default {TILE_ABOVE})")
    parser.add_argument("--tile", type=int, default=TILE_SIZE, metavar="PX", help=f"tile side (default {TILE_SIZE})")
    parser.add_argument("--tile-overlap", type=int, default=TILE_OVERLAP, metavar="PX",
                        help=f"tile overlap, above the objects' size (default {TILE_OVERLAP})")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every item as it finishes")
    parser.set_defaults(func=_cmd_batch)
