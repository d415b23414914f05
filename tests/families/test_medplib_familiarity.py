"""The familiarity check: fitting, the file, and how it decides "I can't tell" for the MedPLIB family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medplib.families.medplib import familiarity
from napari_medplib.families.medplib.adapter import familiarity_width
from napari_medplib.families.medplib.familiarity import Familiarity, FamiliarityError
from napari_medplib.model.generation import GenerationConfig, generate_tokens
from napari_medplib.regions import Region
from napari_medplib.testing import tiny_session
from napari_medplib.train.wording import CANT_TELL


def _clusters(width: int = 6, n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    micro = rng.normal(0.0, 1.0, (n, width))
    other = rng.normal(3.0, 1.0, (n // 2, width))
    return micro, other


def _always(width: int, unfamiliar: bool) -> Familiarity:
    zeros = torch.zeros(width, dtype=torch.float64)
    return Familiarity(zeros, torch.ones(width, dtype=torch.float64), zeros, 20.0 if unfamiliar else -20.0, 0.9)


def test_fit_separates_and_is_deterministic():
    micro, other = _clusters()
    check = familiarity.fit(micro, other, l2=0.01, threshold=0.8)
    p_micro = check.probability(torch.as_tensor(micro))
    p_other = check.probability(torch.as_tensor(other))
    assert float((p_micro > 0.8).float().mean()) < 0.05
    assert float((p_other > 0.8).float().mean()) > 0.9
    again = familiarity.fit(micro, other, l2=0.01, threshold=0.8)
    torch.testing.assert_close(again.weight, check.weight)
    with pytest.raises(ValueError, match="both"):
        familiarity.fit(micro, other[:0])


def test_file_round_trip_and_bad_files(tmp_path):
    assert familiarity.load(tmp_path, 6) is None  # no file: no check
    assert familiarity.load(None) is None
    micro, other = _clusters()
    check = familiarity.fit(micro, other, threshold=0.85, answer_below=0.3)
    check.save(tmp_path)
    loaded = familiarity.load(tmp_path, 6)
    assert loaded.threshold == pytest.approx(0.85) and loaded.answer_below == pytest.approx(0.3)
    torch.testing.assert_close(loaded.probability(torch.as_tensor(other)), check.probability(torch.as_tensor(other)))
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file
    with pytest.raises(FamiliarityError, match="another model"):
        familiarity.load(tmp_path, 8)
    (tmp_path / familiarity.FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(FamiliarityError, match="calibrate_familiarity"):
        familiarity.load(tmp_path, 6)


def test_file_of_another_descriptor_is_refused(tmp_path):
    from safetensors.torch import save_file

    def t(n=4):
        return torch.ones(n, dtype=torch.float64)

    save_file({"mean": t(), "scale": t(), "weight": t(), "bias": t(1)}, str(tmp_path / familiarity.FILE),
              metadata={"descriptor": "something-else", "threshold": "0.5"})
    with pytest.raises(FamiliarityError, match="descriptor"):
        familiarity.load(tmp_path, 4)


def test_suppress_first_changes_only_the_first_token():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])
    seen = []

    def step(token):
        seen.append(token)
        return torch.tensor([0.0, 5.0, 1.0, 1.0]), torch.zeros(2)

    config = GenerationConfig(max_new_tokens=3, eos_token_id=None, suppress_first=(1,))
    result = generate_tokens(step, logits, torch.zeros(2), lambda ids: " ".join(map(str, ids)), config)
    assert result.all_ids == [2, 1, 1]  # the best token is banned at the first step only
    plain = generate_tokens(step, logits, torch.zeros(2), lambda ids: "", GenerationConfig(max_new_tokens=1))
    assert plain.all_ids == [1]


@pytest.fixture(scope="module")
def session():
    with tiny_session(3) as s:
        yield s


def _image():
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, (48, 64)).astype(np.uint8)


def test_unfamiliar_image_declines_without_decoding(session):
    family = session.adapter
    width = familiarity_width(session.model)
    family.familiarity = _always(width, unfamiliar=True)
    try:
        streamed = []
        reply = session.ask(_image(), "Segment the nuclei.", on_text=streamed.append)
        assert reply.text == CANT_TELL and "".join(streamed) == CANT_TELL
        assert len(reply.masks) == 0
        boxed = session.ask(_image(), "What is in <region>?", [Region.box(2, 2, 20, 20)])
        assert boxed.text == CANT_TELL
        planes = session.ask_planes(np.stack([_image(), _image()[::-1].copy()]), "What is this?")
        assert [r.text for r in planes] == [CANT_TELL, CANT_TELL]
    finally:
        family.familiarity = None


def test_familiar_image_may_not_start_with_the_decline(session, monkeypatch):
    family = session.adapter
    family.familiarity = _always(familiarity_width(session.model), unfamiliar=False)
    seen = []
    original = family.model.generate

    def spy(*args, config=None, **kwargs):
        seen.append(tuple(config.suppress_first))
        return original(*args, config=config, **kwargs)

    monkeypatch.setattr(family.model, "generate", spy)
    try:
        reply = session.ask(_image(), "What is this?", max_new_tokens=4)
        assert reply.text != CANT_TELL
        session.ask(_image(), "What is in <region>?", [Region.box(2, 2, 20, 20)], max_new_tokens=4)
    finally:
        family.familiarity = None
    decline_first = familiarity.decline_first_token(family.model.tokenizer)
    assert len(decline_first) == 1
    assert seen == [decline_first, ()]  # a region question may still decline (a box on background)
    view = family.prepare_image(_image(), None, None)
    assert ("pixel-stats", view.key) in family.caches.features  # computed once per image, then cached


def test_without_a_check_nothing_changes(session):
    family = session.adapter
    assert family.familiarity is None  # the tiny model's folder has no file
    view = family.prepare_image(_image(), None, None)
    assert familiarity.gate(family, [view], family.clip_features(view), False) == ([False], [()])


def test_between_the_thresholds_the_model_decides(session, monkeypatch):
    """P = 0.5 between answer_below 0.2 and threshold 0.9: neither a decline nor a ban on declining."""
    family = session.adapter
    width = familiarity_width(session.model)
    zeros = torch.zeros(width, dtype=torch.float64)
    family.familiarity = Familiarity(zeros, torch.ones(width, dtype=torch.float64), zeros, 0.0, 0.9, 0.2)
    try:
        view = family.prepare_image(_image(), None, None)
        assert familiarity.gate(family, [view], family.clip_features(view), False) == ([False], [()])
        family.familiarity.answer_below = 0.6  # now P = 0.5 is confidently familiar
        first = familiarity.decline_first_token(family.model.tokenizer)
        assert familiarity.gate(family, [view], family.clip_features(view), False) == ([False], [first])
    finally:
        family.familiarity = None


def test_pixel_statistics_tell_noise_from_structure():
    """White noise has no autocorrelation; a smooth blob image has a lot; the width is fixed."""
    rng = np.random.default_rng(0)
    noise = torch.as_tensor(rng.normal(0, 1, (1, 3, 64, 64)))
    yy, xx = np.mgrid[:64, :64]
    blobs = np.exp(-((yy - 20) ** 2 + (xx - 30) ** 2) / 50.0) + np.exp(-((yy - 45) ** 2 + (xx - 12) ** 2) / 80.0)
    structured = torch.as_tensor(np.broadcast_to(blobs, (1, 3, 64, 64)).copy())
    stats = familiarity.pixel_statistics(torch.cat([noise, structured]))
    assert stats.shape == (2, familiarity.N_PIXEL_STATS)
    assert abs(float(stats[0, 2])) < 0.1 and float(stats[1, 2]) > 0.9  # autocorrelation at 1 px
    assert float(stats[1, 0]) > 1.0  # sparse bright objects: a right-skewed histogram
    assert float(stats[1, 7]) < 1e-9 < 0.1 < float(stats[0, 7])  # grey: no colour spread; channel noise: some


def test_a_broken_file_stops_the_session_with_a_model_folder_error(tmp_path):
    from napari_medplib.engine import InvalidModelError, Session
    from napari_medplib.testing import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "m")
    (folder / familiarity.FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(InvalidModelError, match="familiarity.safetensors"):
        Session.load(folder, device="cpu")
