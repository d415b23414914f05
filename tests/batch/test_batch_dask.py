"""`medplib batch` on real Dask clusters: a LocalCluster of processes, an external scheduler and workers
started here (one killed mid-run), and the whole command killed and run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from batch_helpers import blobs

from napari_medplib.batch import Actions, BatchError, BatchOptions, batch

QUESTION = "What is in this image?"


def _images(folder, n, regions=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        centres = [tuple(int(v) for v in rng.integers(12, 52, 2)) for _ in range(3)]
        tifffile.imwrite(folder / f"im{i:02d}.tif", blobs((64, 64), centres))
        if regions:
            (folder / f"im{i:02d}.geojson").write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
                "type": "Polygon", "coordinates": [[[5, 5], [40, 5], [40, 40], [5, 40], [5, 5]]]}}))
    return folder


def _records(out):
    return {p.name: p.read_bytes() for p in (out / "items").glob("*.json")}


REAL = Path(__file__).resolve().parents[1] / "data" / "real"


def test_local_cluster_of_processes_runs_every_action(tmp_path, tiny_model_folder):
    folder = _images(tmp_path / "in", 4, regions=True)
    for name in ("dsb2018_nuclei_image", "axondeepseg_sem_rat_spinal_cord_image"):  # real fluorescence and SEM
        shutil.copy(REAL / f"{name}.tif", folder / f"{name}.tif")
        shutil.copy(folder / "im00.geojson", folder / f"{name}.geojson")
    options = BatchOptions(Actions(ask=(QUESTION,), ground=("Please segment the nuclei.",), segment=True),
                           model=str(tiny_model_folder), max_new_tokens=4)
    result = batch([str(folder)], tmp_path / "out", options, workers=2)
    assert (result.done, result.failed) == (6, 0), result.failures
    records = [json.loads(v) for v in _records(tmp_path / "out").values()]
    workers = {r["worker"].rsplit(":", 1)[1] for r in records}
    assert str(os.getpid()) not in workers  # the work ran in worker processes
    for name in ("ground", "segment"):
        assert len(list((tmp_path / "out" / "labels").glob(f"*__{name}.tif"))) == 6
    answers = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
    assert len([a for a in answers if a["action"] == "ask"]) == 6
    from napari_medplib.batch.task import objects_rows

    segment_rows = [row for r in records for row in objects_rows(r) if row["action"] == "segment"]
    assert segment_rows, "the tiny model's SAM gives some mask for a box"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def external_cluster(tmp_path):
    """A `dask scheduler` and two `dask worker` processes on loopback, stopped after the test."""
    scheduler_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)], **quiet)
    processes = [scheduler]
    try:
        deadline = time.time() + 60
        while not scheduler_file.is_file() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "60"], **quiet))
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=90)
        yield address, processes[1:]
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)


def test_external_scheduler_survives_a_killed_worker(tmp_path, tiny_model_folder, external_cluster):
    address, workers = external_cluster
    folder = _images(tmp_path / "in", 24)
    out = tmp_path / "out"
    options = BatchOptions(Actions(ask=(QUESTION,)), model=str(tiny_model_folder), max_new_tokens=48)
    killed = threading.Event()

    def kill_one_worker():  # the worker that has finished the most items so far, mid-run
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "items").glob("*.json"))) < 4:
            time.sleep(0.05)
        pids = [int(json.loads(v)["worker"].rsplit(":", 1)[1]) for v in _records(out).values()]
        victim = max(workers, key=lambda w: pids.count(w.pid))
        os.kill(victim.pid, signal.SIGKILL)
        killed.set()

    threading.Thread(target=kill_one_worker, daemon=True).start()
    result = batch([str(folder)], out, options, scheduler=address, retries=0)
    assert killed.is_set()
    assert result.failed == 0, result.failures
    assert result.done + result.skipped == 24
    records = _records(out)
    assert len(records) == 24  # every item once
    assert len({json.loads(v)["worker"] for v in records.values()}) == 2  # both workers worked
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_scheduler_that_does_not_answer_is_named(tmp_path, monkeypatch, tiny_model_folder):
    from napari_medplib.batch import run

    monkeypatch.setattr(run, "CONNECT_TIMEOUT_S", 2)
    folder = _images(tmp_path / "in", 1)
    address = f"tcp://127.0.0.1:{_free_port()}"
    options = BatchOptions(Actions(ask=(QUESTION,)), model=str(tiny_model_folder))
    with pytest.raises(BatchError, match=f"--scheduler {address}: does not answer.*dask scheduler"):
        batch([str(folder)], tmp_path / "out", options, scheduler=address)


def test_killed_command_resumes_without_recomputing(tmp_path, tiny_model_folder):
    folder = _images(tmp_path / "in", 12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "napari_medplib", "batch", str(folder), "--out", str(out), "--ask", QUESTION,
               "--ground", "Please segment the nuclei.", "--model", str(tiny_model_folder), "--workers", "0",
               "--max-new-tokens", "48"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((out / "items").glob("*.json"))) < 3:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    finished = _records(out)
    assert 3 <= len(finished) < 12
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{12 - len(finished)} done, {len(finished)} already done, 0 failed of 12" in second.stdout
    after = _records(out)
    assert len(after) == 12 and all(after[name] == data for name, data in finished.items())
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert len(list((out / "labels").glob("*__ground.tif"))) == 12
    assert json.loads((out / "run.json").read_text())["runs"] == 2


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from napari_medplib.cli import main

    folder = _images(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["batch", str(folder), "--out", str(tmp_path / "out"), "--ask", QUESTION]) == 2
    assert "not empty and is not a batch run" in capsys.readouterr().err
    assert main(["batch", str(folder), "--out", str(tmp_path / "o2")]) == 2
    assert "nothing to do" in capsys.readouterr().err
