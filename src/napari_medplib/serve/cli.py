"""``medplib serve`` and the ``--server`` options of ``ask``/``segment``: argparse only at import.

The web stack, torch and the model are imported when the command runs, so building the `medplib`
parser stays light.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_PORT = 8765


def _mib(text: str) -> int:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive size in MiB, got {text!r}")
    return int(value * 2**20)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_serve_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "serve", help="serve one model over HTTP for napari, the CLI and scripts on other machines",
        description="Keep one MedPLIB model resident on this machine's device and answer remote sessions "
                    "(Session.connect, 'Server' in the widget's Model settings, medplib ask --server). Binds "
                    "127.0.0.1 unless --host says otherwise; a token is required (made and printed at the first "
                    "start, kept in a user-only file). Use TLS through a reverse proxy or an ssh tunnel.",
    )
    parser.add_argument("--model", default=None, help="model folder, name, or cached hub id (default: bundled)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU)")
    parser.add_argument("--llm-weights", choices=("full", "int8"), default="full",
                        help="int8: the language model with int8 weights (MedPLIB models; a 7B fits a 24 GB GPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="the access token's file (created 0600 with a new token if missing; default: "
                             "serve-token in the user config folder)")
    parser.add_argument("--no-auth", action="store_true", help="no token (refused unless --host is loopback)")
    parser.add_argument("--max-upload-mb", type=_mib, default=None, metavar="MB",
                        help="largest image upload (default 512)")
    parser.add_argument("--max-queue", type=_count, default=None, help="requests waiting for the model (default 64)")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests per second per client address (default 50; 0: no limit)")
    parser.add_argument("--embedding-cache", default=None, metavar="DIR",
                        help="keep image embeddings in this folder (reused after restarts)")
    parser.set_defaults(func=cmd_serve)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--server URL`` / ``--token-file`` for commands that run a model (ask, segment)."""
    parser.add_argument("--server", default=None, metavar="URL",
                        help="use the model of a `medplib serve` server (e.g. http://gpu-box:8765) instead of "
                             "loading one here")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="file holding the server's token (else $MEDPLIB_SERVER_TOKEN)")


def connect(args: argparse.Namespace) -> Any:
    """The remote session of ``--server`` (``--model``/``--embedding-cache`` belong to the server)."""
    from ..engine.errors import SessionInputError

    if getattr(args, "model", None):
        raise SessionInputError("give --model or --server, not both (the server chose its model at start-up)")
    if getattr(args, "embedding_cache", None):
        raise SessionInputError("--embedding-cache is a server option with --server (medplib serve --embedding-cache)")
    from ..engine import Session

    return Session.connect(args.server, token_file=args.token_file)


def cmd_serve(args: argparse.Namespace) -> int:
    from .limits import ServeLimits
    from .tokens import server_token

    def announce(line: str) -> None:
        print(line, flush=True)

    token = server_token(args.host, args.token_file, args.no_auth, announce)
    limits = ServeLimits()
    if args.max_upload_mb is not None:
        limits.max_upload_bytes = args.max_upload_mb
    if args.max_queue is not None:
        limits.max_queue = args.max_queue
    if args.rate is not None:
        limits.rate = max(0.0, args.rate)
    from ..engine import Session

    announce(f"medplib serve: loading {args.model or 'the bundled model'} …")
    session = Session.load(args.model, device=args.device, dtype=args.dtype,
                           embedding_cache_dir=args.embedding_cache, llm_weights=args.llm_weights)
    from .server import serve

    try:
        serve(session, args.host, args.port, token, limits, announce)
    finally:
        session.close()
    print("medplib serve: stopped", file=sys.stderr)
    return 0
