"""`medplib batch --server URL`: a folder answered by a `medplib serve` model, same results as local."""

from __future__ import annotations

import json

import numpy as np
import tifffile

from napari_medplib.cli import main


def _folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        tifffile.imwrite(folder / f"im{i}.tif", (rng.random((48, 56)) * 4000).astype(np.uint16))
    return folder


def _answers(out):
    return sorted((a["image"].rsplit("/", 1)[-1], a["answer"]) for a in map(json.loads, open(out / "answers.jsonl")))


def test_batch_through_a_server_matches_a_local_run(tmp_path, server, tiny_folder, capsys):
    folder = _folder(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(server.token)
    common = [str(folder), "--ask", "What is in this image?", "--max-new-tokens", "6"]
    assert main(["batch", *common, "--out", str(tmp_path / "remote"), "--server", server.url,
                 "--token-file", str(token_file)]) == 0
    assert "3 done" in capsys.readouterr().out
    assert main(["batch", *common, "--out", str(tmp_path / "local"), "--model", str(tiny_folder), "--workers", "0",
                 "--device", "cpu"]) == 0
    assert _answers(tmp_path / "remote") == _answers(tmp_path / "local")
    run = json.loads((tmp_path / "remote" / "run.json").read_text())
    assert run["engine"] == "this process" and run["options"]["model_fingerprint"]


def test_server_and_scheduler_together_are_refused(tmp_path, server, capsys):
    folder = _folder(tmp_path)
    code = main(["batch", str(folder), "--out", str(tmp_path / "o"), "--ask", "Q?", "--server", server.url,
                 "--scheduler", "tcp://127.0.0.1:1"])
    assert code == 2 and "--server or --scheduler, not both" in capsys.readouterr().err
