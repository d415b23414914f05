"""One trainer per run folder: a live holder refuses a second one, a stale lock is taken over."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from napari_medplib.train.run_lock import LOCK_NAME, RunFolderBusy, run_lock


def test_the_lock_is_held_while_training_and_released_after(tmp_path):
    with run_lock(tmp_path) as path:
        assert path.read_text() == str(os.getpid())
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}.*another --run folder"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_process_holding_the_lock_refuses_a_second_trainer(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_NAME).write_text(str(other.pid))
        with pytest.raises(RunFolderBusy, match=f"pid {other.pid}"):
            with run_lock(tmp_path):
                pass
        assert (tmp_path / LOCK_NAME).read_text() == str(other.pid)  # not taken from its owner
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(os.name != "posix", reason="liveness of another pid is checked on POSIX only")
def test_a_stale_lock_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(str(gone.pid))
    with run_lock(tmp_path) as path:
        assert path.read_text() == str(os.getpid())
    assert not path.exists()


def test_trainer_refuses_a_busy_run_folder_before_training(tmp_path):
    from train_micro import micro_recipe

    from napari_medplib.train.trainer import Trainer

    with run_lock(tmp_path):
        with pytest.raises(RunFolderBusy):
            Trainer(micro_recipe(1), tmp_path, progress=False, log=lambda _: None).run()
    assert not (tmp_path / "stages").exists() and not (tmp_path / "log.jsonl").exists()
