"""Med-MoE and Llama3-Med through the engine: `Session.load` gives a text-only session with the same
methods, the same answers as the family model itself, and a reason for each missing feature."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_medplib.engine import Session
from napari_medplib.engine.errors import SessionInputError
from napari_medplib.families.registry import LLAMA3MED, MEDMOE, MEDPLIB, family_of

SHARED = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


def _fixture(env: str, name: str) -> Path:
    return Path(os.environ[env]) if os.environ.get(env) else SHARED / name


FOLDERS = {
    "Med-MoE": _fixture("MEDMOE_TINY_REF", "medmoe-tiny-ref"),
    "Llama3-Med": _fixture("LLAMA3MED_TINY_REF", "llama3med-tiny-ref"),
}


@pytest.fixture
def image():
    rng = np.random.default_rng(4)
    plane = (rng.random((70, 90)) * 3000 + 100).astype(np.uint16)
    plane[20:40, 30:60] += 20000
    return plane


def test_families_are_told_apart_by_their_config(tmp_path):
    from napari_medplib.testing import make_tiny_model_folder

    assert family_of(FOLDERS["Med-MoE"]) is MEDMOE
    assert family_of(FOLDERS["Llama3-Med"]) is LLAMA3MED
    assert family_of(make_tiny_model_folder(tmp_path / "tiny")) is MEDPLIB
    assert MEDPLIB.lacks("masks") is None and "no mask decoder" in MEDMOE.lacks("masks")


@pytest.mark.parametrize("family", list(FOLDERS))
def test_session_answers_as_the_family_model_does(family, image):
    from napari_medplib.imaging import to_model_rgb

    session = Session.load(FOLDERS[family], device="cpu")
    assert session.family.name == family and session.capabilities["masks"] is False
    reply = session.ask(image, "What is the modality of this image?", max_new_tokens=8)
    direct = session._model.generate(to_model_rgb(image), "What is the modality of this image?", max_new_tokens=8)
    assert reply.text == direct[0] and reply.token_ids == list(direct[1]) and reply.masks == []
    assert reply.model == session.model_name == FOLDERS[family].name
    streamed = session.ask_stream(image, "What is the modality of this image?", max_new_tokens=8)
    assert "".join(streamed) == reply.text and streamed.reply.text == reply.text
    if family == "Med-MoE":  # expert choices are reported like MedPLIB's
        assert reply.expert_share_mean is not None and sum(reply.expert_share_mean) == pytest.approx(1.0)
    assert [r.text for r in session.ask_planes([image, image], "What is shown?", max_new_tokens=3)] == \
        [session.ask(image, "What is shown?", max_new_tokens=3).text] * 2
    session.close()


@pytest.mark.parametrize("family", list(FOLDERS))
def test_missing_features_say_why(family, image):
    from napari_medplib.regions import Region

    session = Session.load(FOLDERS[family], device="cpu")
    with pytest.raises(SessionInputError, match=f"{family} answers in text: it has no mask decoder"):
        session.segment(image, box=(5, 5, 30, 30))
    with pytest.raises(SessionInputError, match="does not read marked regions"):
        session.ask(image, "What is in <region>?", [Region.box(5, 5, 30, 30)])
    reply = session.ask(image, "Please segment the nuclei.", max_new_tokens=2)
    assert reply.masks == [] and any("no mask decoder" in w for w in reply.warnings)


def test_cli_and_batch_use_a_family_folder(tmp_path, image, capsys):
    import json

    import tifffile

    from napari_medplib.cli import main

    tifffile.imwrite(tmp_path / "img.tif", image)
    folder = str(FOLDERS["Med-MoE"])
    assert main(["ask", str(tmp_path / "img.tif"), "What is the modality?", "--model", folder, "--json",
                 "--max-new-tokens", "4"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == "medmoe-tiny-ref" and answer["masks"] == []
    assert main(["segment", str(tmp_path / "img.tif"), "--box", "5", "5", "30", "30", "--model", folder]) == 2
    assert "no mask decoder" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "img.tif"), "--ask", "What is the modality?", "--model", folder,
                 "--workers", "0", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "answers.jsonl")]
    assert rows[0]["answer"] == answer["text"] and rows[0]["model"] == "medmoe-tiny-ref"
