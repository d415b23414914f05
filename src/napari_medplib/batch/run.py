"""`batch(...)`: every item of a run through a Dask cluster (or this process), resumable, per-item failures.

Where the work runs:

* default: a ``distributed.LocalCluster`` sized to the machine: worker processes with one thread
  each (one torch thread for CPU inference), or one worker per GPU;
* ``scheduler="tcp://host:8786"``: an existing cluster (``dask scheduler`` + ``dask worker`` started by
  hand, or a facility's dask-jobqueue SLURM cluster). Inputs and the output folder must be on a file
  system every worker sees; tasks carry paths and options, never pixels;
* ``workers=0`` or ``session=...``: this process, one item after another (the widget passes its
  loaded session; tests and small folders need no cluster).

Each worker loads the model once, on its first item, and keeps it (`SessionPlugin`). The output
folder, not Dask, remembers what is done (see `outputs`), so a run killed at any point resumes by
running the same command again, and a worker that dies mid-item has its item rerun elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import outputs
from .inputs import Item, list_items
from .options import BatchError, BatchOptions, ItemError
from .task import load_session, record_path, run_item

#: How long to wait for a scheduler given by address before saying it does not answer.
CONNECT_TIMEOUT_S = 15


@dataclass
class Progress:
    """Where a run stands; passed to ``on_progress`` after every item."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    started: float = field(default_factory=time.time)

    @property
    def finished(self) -> int:
        return self.done + self.skipped + self.failed

    @property
    def rate(self) -> float:
        """Items computed per second (skipped items are free and not counted)."""
        elapsed = time.time() - self.started
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.finished
        return left / self.rate if self.rate > 0 else None


@dataclass
class BatchResult:
    out: Path
    total: int
    done: int
    skipped: int
    failed: int
    failures: list[dict[str, Any]]
    seconds: float
    dashboard: str | None = None
    notes: list[str] = field(default_factory=list)
    cancelled: bool = False

    def summary(self) -> str:
        text = (f"{self.done} done, {self.skipped} already done, {self.failed} failed of {self.total} "
                f"in {self.seconds:.1f} s; results in {self.out}")
        return text + (" (stopped)" if self.cancelled else "")


# ---------------------------------------------------------------------------------- driver
def _model_fingerprint(model: str | None) -> str:
    from ..engine.loading import folder_fingerprint, resolve_source

    folder, _ = resolve_source(model)
    return folder_fingerprint(folder)


def auto_workers(model: str | None, device: str) -> int:
    """Workers for a LocalCluster: one per GPU, else one per core that memory allows (each holds a model)."""
    if device.startswith("cuda") or device == "auto":
        try:
            import torch

            if torch.cuda.is_available() and device in ("auto", "cuda"):
                return torch.cuda.device_count()
        except ImportError:
            pass
    import psutil

    from ..engine.loading import resolve_source

    folder, _ = resolve_source(model)
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    per_worker = 3 * weights + 2**30  # weights, a loading copy, and working memory
    by_memory = max(1, int(psutil.virtual_memory().available // per_worker))
    return max(1, min(os.cpu_count() or 1, by_memory))


def _dashboard_available() -> bool:
    from importlib.util import find_spec

    return find_spec("bokeh") is not None


def connect(scheduler: str | None, workers: int) -> tuple[Any, Any]:
    """A distributed Client (and the LocalCluster it owns, or None) with clear errors."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as exc:
            raise BatchError(f"--scheduler {scheduler}: does not answer within {CONNECT_TIMEOUT_S} s "
                             f"({type(exc).__name__}); start it with `dask scheduler` (and `dask worker "
                             f"{scheduler} --nthreads 1`), or drop --scheduler to use this machine") from None
        return client, None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    return Client(cluster), cluster


def batch(
    inputs: Sequence[str],
    out: str | os.PathLike,
    options: BatchOptions,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    recursive: bool = False,
    session: Any = None,
    command: Sequence[str] = (),
    on_progress: Callable[[Progress], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    on_dashboard: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BatchResult:
    """Run ``options``' actions on every plane of ``inputs`` into ``out``; see the module docstring."""
    started = time.time()
    out = Path(out).expanduser().resolve()
    if not options.model_fingerprint:
        fingerprint = getattr(session, "fingerprint", "") if session is not None else _model_fingerprint(options.model)
        options = _with_fingerprint(options, fingerprint)
    listing = list_items(inputs, options, recursive)
    if not listing.items:
        raise BatchError("; ".join(listing.notes) or "no inputs given")
    run = outputs.prepare(out, options, command)
    log = outputs.Log(out)

    def say(message: str) -> None:
        log(message)
        if on_log:
            on_log(message)

    for note in listing.notes:
        say(f"skipped input: {note}")
    items = listing.items
    progress = Progress(total=len(items))
    failures: list[dict[str, Any]] = []
    say(f"run {run['runs']}: {len(items)} item(s) from {len(inputs)} input(s) into {out}")

    def record(item: Item, result: dict[str, Any] | None, error: str | None) -> None:
        if error is None and result is not None and result.get("status") == "failed":
            error = result.get("error", "failed")
        if error is not None:
            progress.failed += 1
            failures.append({"image": item.path, "plane": item.plane_text, "key": item.key, "error": error})
            say(f"FAILED {item.name}: {error}")
        elif result is not None and result.get("status") == "skipped":
            progress.skipped += 1
        else:
            progress.done += 1
            say(f"done {item.name} ({(result or {}).get('seconds', 0):.2f} s)")
        if on_progress:
            on_progress(progress)

    todo = []
    for item in items:  # finished and unreadable items need no worker
        if record_path(out, item.key).is_file():
            record(item, {"key": item.key, "status": "skipped"}, None)
        elif item.problem:
            record(item, None, item.problem)
        else:
            todo.append(item)
    dashboard, cancelled = None, False
    here = session is not None or workers == 0
    if todo and here:
        cancelled = _run_here(todo, options, out, session, retries, record, should_stop)
    elif todo:
        dashboard, cancelled = _run_dask(todo, options, out, scheduler, workers, retries, record, should_stop,
                                         on_dashboard, say)
    records = outputs.read_records(out, [item.key for item in items])
    notes = outputs.write_tables(out, records, failures)
    for note in notes:
        say(note)
    seconds = time.time() - started
    result = BatchResult(out, len(items), progress.done, progress.skipped, progress.failed, failures, seconds,
                         dashboard, notes + listing.notes, cancelled)
    outputs.finish(out, run, {"total": len(items), "done": progress.done, "skipped": progress.skipped,
                              "failed": progress.failed, "seconds": round(seconds, 2),
                              "cancelled": cancelled,
                              "engine": "this process" if here else (scheduler or "LocalCluster")})
    say(result.summary())
    return result


def describe_failure(exc: BaseException, out: Path) -> str:
    """One line for failed.csv and the log: a full disk says so and how to go on."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk holding {out} is full ({exc.strerror}): free space and run the same command "
                "again (finished items are kept)")
    if type(exc).__name__ == "KilledWorker":
        return f"the worker running it died repeatedly (out of memory?): {exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _with_fingerprint(options: BatchOptions, fingerprint: str) -> BatchOptions:
    from dataclasses import replace

    return replace(options, model_fingerprint=fingerprint)


def _run_here(items, options, out, session, retries, record, should_stop) -> bool:
    """This process, item by item (the widget's session, or ``workers=0``)."""
    own = session is None
    if own:
        session = load_session(options.model, options.device, options.dtype, 0, options.llm_weights)
    try:
        for item in items:
            if should_stop and should_stop():
                return True
            for attempt in range(retries + 1):
                try:
                    record(item, run_item(item, options, session, out), None)
                    break
                except ItemError as exc:
                    record(item, None, str(exc))
                    break
                except Exception as exc:  # noqa: BLE001 - one item's failure must not stop the run
                    if attempt == retries:
                        record(item, None, describe_failure(exc, out))
    finally:
        if own:
            session.close()
    return False


def _run_dask(items, options, out, scheduler, workers, retries, record, should_stop, on_dashboard, say):
    from distributed import as_completed

    from .worker import PLUGIN_NAME, SessionPlugin, dask_task

    if workers is None and scheduler is None:
        workers = auto_workers(options.model, options.device)
    client, cluster = connect(scheduler, workers or 1)
    dashboard = client.dashboard_link if (cluster is None or _dashboard_available()) else None
    try:
        if dashboard:
            say(f"Dask dashboard: {dashboard}")
            if on_dashboard:
                on_dashboard(dashboard)
        elif on_dashboard:
            on_dashboard("")
        client.register_plugin(SessionPlugin(options.model, options.device, options.dtype, options.threads,
                                             options.llm_weights), name=PLUGIN_NAME)
        by_key = {f"medplib-{item.key}": item for item in items}
        futures = client.map(dask_task, items, options=options, out=str(out), key=list(by_key),
                             retries=retries, pure=False)
        cancelled = False
        for future in as_completed(futures):
            item = by_key[future.key]
            if future.status == "finished":
                record(item, future.result(), None)
            else:
                record(item, None, describe_failure(future.exception(), out))
            if should_stop and should_stop():
                client.cancel(futures)
                cancelled = True
                break
        return dashboard, cancelled
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
