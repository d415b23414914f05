"""Input checks the session runs before any work, and the size limits of a model's config.json."""

import json

import numpy as np
import pytest

from napari_medplib.engine.errors import SessionInputError
from napari_medplib.engine.validation import (
    CONFIG_LIMITS,
    check_contrast_limits,
    check_image,
    check_model_config,
    check_temperature,
)
from napari_medplib.model.config import CheckpointError


@pytest.mark.parametrize(
    "limits",
    [(np.nan, 100), (0, np.inf), (100, 10), [(0, 10), (20, 3)], "ab", (1, 2, 3), [[[0, 1]]]],
)
def test_bad_contrast_limits_are_refused(limits):
    with pytest.raises(SessionInputError, match="contrast_limits"):
        check_contrast_limits(limits)


@pytest.mark.parametrize("limits", [None, (0, 255), (5, 5), (-1.5, 3e9), [(0, 10), (5, 6)], np.array([0.0, 1.0])])
def test_good_contrast_limits_pass(limits):
    check_contrast_limits(limits)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.1, "hot", None])
def test_bad_temperature_is_refused(value):
    with pytest.raises(SessionInputError, match="temperature"):
        check_temperature(value)


def test_good_temperature_is_a_float():
    assert check_temperature(0) == 0.0 and check_temperature("0.7") == 0.7


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0, 0, 3), (4, 4, 0)])
def test_image_without_pixels_is_refused(shape):
    with pytest.raises(SessionInputError, match="holds no pixels"):
        check_image(np.zeros(shape))


def test_image_with_pixels_passes():
    check_image(np.zeros((1, 1)))
    check_image(np.zeros((3, 4, 3), np.uint8))


def test_config_with_100000_layers_is_refused_before_building():
    text = json.dumps({"hidden_size": 32, "num_hidden_layers": 100_000, "vocab_size": 907})
    assert len(text) < 2048
    with pytest.raises(CheckpointError, match=r"num_hidden_layers = 100000 is outside 0..256"):
        check_model_config(json.loads(text))


@pytest.mark.parametrize(
    "config",
    [
        {"hidden_size": float("nan")},
        {"vocab_size": "many"},
        {"vision_config": {"image_size": 10**9}},
        {"moe": {"moe_layers_idx": list(range(5000))}},
        {"moe": {"num_experts": [2, -1]}},
        ["not", "an", "object"],
    ],
)
def test_config_declaring_impossible_sizes_is_refused(config):
    with pytest.raises(CheckpointError):
        check_model_config(config)


def test_tiny_and_released_configs_pass():
    from napari_medplib.model.config import tiny_config

    check_model_config(tiny_config().to_dict())
    check_model_config({"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 32267, "moe": {
        "moe_layers_idx": list(range(32)), "num_experts": [2] * 32}})
    assert all(v > 0 for v in CONFIG_LIMITS.values())


# ---- the session runs the checks ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def session():
    from napari_medplib.engine import Session
    from napari_medplib.testing import tiny_model

    return Session.from_model(tiny_model(), name="tiny")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"contrast_limits": (np.nan, 10)},
        {"contrast_limits": (200, 10)},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"image": np.zeros((0, 16), np.uint8)},
    ],
)
def test_session_refuses_bad_inputs(session, kwargs):
    image = kwargs.pop("image", np.zeros((16, 16), np.uint8))
    with pytest.raises(SessionInputError):
        session.ask(image, "What is it?", max_new_tokens=1, **kwargs)
