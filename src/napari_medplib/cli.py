"""The `medplib` command line. Runs without napari; heavy imports happen inside subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medplib", description="MedPLIB: ask about biomedical images, ground and segment."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices and model search paths")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_BAD_INPUT
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
