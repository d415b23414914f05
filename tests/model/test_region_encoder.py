"""Region tokens: reference sampling geometry, empty regions, the >512-cell random subset."""

from __future__ import annotations

import warnings

import pytest
import torch

from napari_medplib.model.config import MedPLIBConfig
from napari_medplib.model.region_encoder import EmptyRegionWarning, RegionEncoder


@pytest.fixture()
def encoder() -> RegionEncoder:
    torch.manual_seed(0)
    cfg = MedPLIBConfig(hidden_size=8, num_attention_heads=2, mm_hidden_size=4, max_sample_point=512)
    enc = RegionEncoder(cfg)
    with torch.no_grad():  # identity-like adapter: the output row = the patch feature
        enc.adapter.weight.zero_()
        enc.adapter.weight[:4, :4] = torch.eye(4)
        enc.adapter.bias.zero_()
    return enc


def _features() -> torch.Tensor:
    """Patch (r, c) has features (r, c, 1, r*c): bilinear sampling is easy to predict."""
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    return torch.stack([rows, cols, torch.ones_like(rows), rows * cols], dim=-1).reshape(576, 4)


def test_cell_is_sampled_up_left_as_in_the_reference(encoder):
    mask = torch.zeros(1, 24, 24, dtype=torch.uint8)
    mask[0, 10, 23] = 1
    tokens, empty = encoder(_features(), mask)
    assert not empty.any()
    # grid_sample(align_corners=True) at 2*(i/24)-1 reads grid coordinate i*23/24.
    torch.testing.assert_close(tokens[0, :3], torch.tensor([10 * 23 / 24, 23 * 23 / 24, 1.0]))
    assert tokens.shape == (1, 8)


def test_mean_over_cells_and_several_regions(encoder):
    masks = torch.zeros(2, 24, 24, dtype=torch.uint8)
    masks[0, 0, 0] = masks[0, 0, 12] = 1
    masks[1, 12:14, 0] = 1
    tokens, empty = encoder(_features(), masks)
    torch.testing.assert_close(tokens[0, :2], torch.tensor([0.0, 6 * 23 / 24]))
    torch.testing.assert_close(tokens[1, :2], torch.tensor([12.5 * 23 / 24, 0.0]))
    assert empty.tolist() == [False, False]


def test_empty_region_warns_and_is_flagged(encoder):
    masks = torch.zeros(2, 24, 24, dtype=torch.uint8)
    masks[1, 5, 5] = 1
    with pytest.warns(EmptyRegionWarning, match="region 1 covers no cell"):
        tokens, empty = encoder(_features(), masks)
    assert empty.tolist() == [True, False]
    assert (tokens[0] == 0).all()
    encoder.on_empty = "error"
    with pytest.raises(ValueError, match="covers no cell"):
        encoder(_features(), masks)
    encoder.on_empty = "zero"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(_features(), masks)


def test_large_regions_use_a_seeded_subset(encoder):
    mask = torch.ones(1, 24, 24, dtype=torch.uint8)  # 576 cells > 512
    a, _ = encoder(_features(), mask, torch.Generator().manual_seed(42))
    b, _ = encoder(_features(), mask, torch.Generator().manual_seed(42))
    c, _ = encoder(_features(), mask, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    encoder.max_sample_point = 1000
    full, _ = encoder(_features(), mask)
    torch.testing.assert_close(full[0, :2], torch.tensor([11.5 * 23 / 24, 11.5 * 23 / 24]))


def test_bad_grid_shape(encoder):
    with pytest.raises(ValueError, match="cell grids"):
        encoder(_features(), torch.ones(1, 16, 16))


# ---------------------------------------------------------------------------- geometry extension
def test_region_geometry_features_say_where_how_large_and_how_elongated():
    import torch

    from napari_medplib.model.region_encoder import GEOMETRY_FEATURES, region_geometry

    grid = torch.zeros(24, 24, dtype=torch.bool)
    point = grid.clone()
    point[2, 20] = True
    f = region_geometry(point)
    assert f.shape == (GEOMETRY_FEATURES,)
    assert torch.allclose(f[:2], torch.tensor([2.5 / 24, 20.5 / 24]))  # centroid: top right
    assert f[-1] == 1.0 and f[-2] == 1.0  # one cell, fills its box

    wide = grid.clone()
    wide[10:12, 2:22] = True  # a horizontal bar
    tall = grid.clone()
    tall[2:22, 10:12] = True
    fw, ft = region_geometry(wide), region_geometry(tall)
    assert fw[6] > 3 * fw[5] and ft[5] > 3 * ft[6]  # spread along the bar
    assert torch.isclose(fw[2], ft[2]) and fw[2] > f[2]  # same area, larger than the point

    diagonal = torch.eye(24, dtype=torch.bool)
    assert region_geometry(diagonal)[7] > 0.9  # rows and cols correlated
    assert torch.count_nonzero(region_geometry(grid)) == 0


def test_geometry_is_off_for_released_configs_and_zeroed_changes_nothing():
    import torch

    from napari_medplib.testing import tiny_model

    plain = tiny_model(0)
    assert plain.region_encoder.geometry is None
    model = tiny_model(0, region_geometry=True)
    assert model.region_encoder.geometry is not None
    with torch.no_grad():
        model.region_encoder.geometry[2].weight.zero_()
        model.region_encoder.geometry[2].bias.zero_()
    patch = torch.randn(576, model.config.mm_hidden_size)
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[0, 3:9, 4:6] = True
    masks[1, 20, 20] = True
    model.region_encoder.adapter.load_state_dict(plain.region_encoder.adapter.state_dict())
    base, _ = plain.region_encoder(patch, masks)
    zero_init, _ = model.region_encoder(patch, masks)
    torch.testing.assert_close(zero_init, base)
    with torch.no_grad():
        model.region_encoder.geometry[2].bias.fill_(0.5)
        model.region_encoder.geometry[2].weight.normal_()
    moved, _ = model.region_encoder(patch, masks)
    assert not torch.allclose(moved, base)


def test_geometry_weights_round_trip_through_both_layouts(tmp_path):
    import torch

    from napari_medplib.model.convert import model_state, save_pretrained
    from napari_medplib.model.medplib import MedPLIBModel
    from napari_medplib.testing import tiny_model

    model = tiny_model(1, region_geometry=True)
    with torch.no_grad():
        model.region_encoder.geometry[2].weight.normal_()
    released = model_state(model, layout="released")
    assert any(k.startswith("model.region_geometry.") for k in released)
    folder = save_pretrained(model, tmp_path / "m")
    again = MedPLIBModel.from_pretrained(folder)
    assert again.config.region_geometry
    torch.testing.assert_close(again.region_encoder.geometry[2].weight, model.region_encoder.geometry[2].weight)


def test_geometry_encoding_spreads_nearby_centroids_apart():
    import torch

    from napari_medplib.model.region_encoder import (
        GEOMETRY_ENCODING,
        geometry_encoding,
        region_geometry,
    )

    a = torch.zeros(24, 24, dtype=torch.bool)
    b = a.clone()
    a[10, 10] = True
    b[10, 11] = True  # one cell to the right
    ra, rb = region_geometry(a), region_geometry(b)
    ea, eb = geometry_encoding(ra), geometry_encoding(rb)
    assert ea.shape == (GEOMETRY_ENCODING,)
    torch.testing.assert_close(ea[:10], ra)  # the raw features come first
    assert (ea - eb).norm() > 3 * (ra - rb).norm()


# ---------------------------------------------------------------------------- frame-resolution masks
def _frame_mask(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(336, 336, dtype=torch.uint8)
    mask[rows, cols] = 1
    return mask


def test_frame_masks_give_the_reference_its_own_cell_grid(encoder):
    """Released configs (no geometry): a 336-px mask reads exactly the cells region_mask_to_grid keeps."""
    import numpy as np

    from napari_medplib.model.preprocess import region_mask_to_grid

    image_mask = np.zeros((300, 200), np.uint8)
    image_mask[40:130, 25:90] = 1
    grid = region_mask_to_grid(image_mask)
    from_frame, _ = encoder(_features(), torch.from_numpy(grid.mask_336)[None])
    from_cells, _ = encoder(_features(), torch.from_numpy(grid.mask_24)[None])
    torch.testing.assert_close(from_frame, from_cells)


def test_pixel_mean_weights_equal_the_mean_of_bilinear_samples_at_every_pixel():
    import torch.nn.functional as F

    from napari_medplib.model.region_encoder import _pixel_mean_weights

    torch.manual_seed(0)
    feature_map = torch.randn(1, 3, 24, 24)
    mask = torch.zeros(336, 336, dtype=torch.bool)
    mask[50:61, 200:230] = True
    mask[300, 5] = True
    weights = _pixel_mean_weights(mask, 24)
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    points = mask.nonzero().float() / 336  # the reference's convention: index / size, align_corners
    sampled = F.grid_sample(feature_map, (2 * points.flip(-1) - 1)[None, None], mode="bilinear", align_corners=True)
    torch.testing.assert_close((feature_map[0] * weights).sum(dim=(-2, -1)), sampled[0, :, 0].mean(-1), atol=1e-5, rtol=1e-5)


def _geometry_encoder() -> RegionEncoder:
    torch.manual_seed(0)
    return RegionEncoder(MedPLIBConfig(hidden_size=8, num_attention_heads=2, mm_hidden_size=4, region_geometry=True))


def test_geometry_reads_pixels_a_small_region_between_cells_is_seen():
    """A 5-px nucleus between the cells' top-left pixels: no cell on the grid, but a token from its pixels."""
    enc = _geometry_encoder()
    assert enc.reads_pixels
    small = _frame_mask(slice(16, 21), slice(16, 21))  # cells start at multiples of 14: none covered
    assert small[::14, ::14].sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyRegionWarning)
        tokens, empty = enc(_features(), small[None])
    assert not empty[0] and tokens[0].abs().sum() > 0


def test_geometry_from_pixels_tells_sizes_and_shapes_apart_that_the_cell_grid_cannot():
    """Two regions with the same cells on the grid (same top-left pixels) but different pixel areas/shapes."""
    from napari_medplib.model.region_encoder import region_geometry

    small = _frame_mask(slice(28, 34), slice(28, 34))  # 6x6 px round-ish blob on cell (2, 2)
    long = _frame_mask(slice(28, 32), slice(28, 41))  # 4x13 px bar, same single cell
    assert torch.equal(small[::14, ::14], long[::14, ::14])
    enc = _geometry_encoder()
    tokens, _ = enc(_features(), torch.stack([small, long]))
    assert not torch.allclose(tokens[0], tokens[1])
    gs, gl = region_geometry(small.bool()), region_geometry(long.bool())
    assert gl[6] > 2 * gl[5] and abs(gs[6] - gs[5]) < 1e-6  # the bar is spread along columns, the blob is not
    assert gl[2] > gs[2]  # and covers more pixels



def test_geometry_version_2_adds_log_area_and_the_eccentricity_the_questions_use():
    """The two extra features equal what region VQA's size/shape answers are computed from."""
    import numpy as np

    from napari_medplib.model.region_encoder import GEOMETRY_FEATURES_BY_VERSION, region_geometry
    from napari_medplib.train.conversations import InstanceStats
    from napari_medplib.train.data import Sample

    disk = torch.zeros(336, 336, dtype=torch.bool)
    rows, cols = torch.meshgrid(torch.arange(336), torch.arange(336), indexing="ij")
    disk |= (rows - 100) ** 2 + (cols - 200) ** 2 < 15**2
    bar = torch.zeros(336, 336, dtype=torch.bool)
    bar[50:60, 20:60] = True  # 10 x 40: eccentricity sqrt(1 - 1/16)
    diagonal = (rows - cols).abs() <= 3  # a thin diagonal band: elongated though its box is square
    diagonal &= (rows > 150) & (rows < 250)

    v1, v2 = region_geometry(bar), region_geometry(bar, 2)
    assert v1.shape == (GEOMETRY_FEATURES_BY_VERSION[1],) and v2.shape == (GEOMETRY_FEATURES_BY_VERSION[2],)
    assert torch.equal(v2[:10], v1)  # version 1's features unchanged, in the same order

    labels = (disk.int() + 2 * bar.int() + 3 * diagonal.int()).numpy().astype(np.int32)
    stats = InstanceStats.of(Sample(np.zeros((336, 336), np.uint8), labels, {1: "a", 2: "b", 3: "c"}, "nuclei", {}))
    for index, mask in enumerate((disk, bar, diagonal)):
        features = region_geometry(mask, 2)
        assert float(features[-1]) == pytest.approx(float(stats.eccentricity[index]), abs=1e-3)
        assert float(features[-2]) == pytest.approx((np.log(stats.area[index] / 336**2) + 6) / 3, abs=1e-5)
    assert float(region_geometry(disk, 2)[-1]) < 0.2 and float(region_geometry(diagonal, 2)[-1]) > 0.95
    # areas 1.5x apart (a small/medium-sized step) move the log feature by ln(1.5)/3, not ~0.01
    small, larger = _frame_mask(slice(0, 20), slice(0, 20)), _frame_mask(slice(0, 20), slice(0, 30))
    step = region_geometry(larger.bool(), 2)[-2] - region_geometry(small.bool(), 2)[-2]
    assert float(step) == pytest.approx(np.log(1.5) / 3, rel=1e-4)
    assert torch.count_nonzero(region_geometry(torch.zeros(24, 24, dtype=torch.bool), 2)) == 0


def test_geometry_version_sets_the_mlp_width_and_unknown_versions_are_refused():
    from napari_medplib.model.region_encoder import geometry_encoding_width

    def encoder(version: int) -> RegionEncoder:
        return RegionEncoder(MedPLIBConfig(hidden_size=8, num_attention_heads=2, mm_hidden_size=4,
                                           region_geometry=True, region_geometry_version=version))

    assert encoder(1).geometry[0].in_features == geometry_encoding_width(10)
    enc = encoder(2)
    assert enc.geometry[0].in_features == geometry_encoding_width(12)
    tokens, empty = enc(_features(), _frame_mask(slice(28, 34), slice(28, 60))[None])
    assert tokens.shape == (1, 8) and not empty.any()
    with pytest.raises(ValueError, match="region_geometry_version"):
        encoder(4)


# ----------------------------------------------------------------------------- version 3: object + brightness
def _v3_encoder(hidden: int = 8) -> RegionEncoder:
    torch.manual_seed(0)
    return RegionEncoder(MedPLIBConfig(hidden_size=hidden, num_attention_heads=2, mm_hidden_size=4,
                                       region_geometry=True, region_geometry_version=3))


def _frame(value: float = 0.1) -> torch.Tensor:
    return torch.full((336, 336), value)


def test_photometry_ranks_an_object_against_the_frame_and_ignores_the_padding():
    from napari_medplib.model.region_encoder import PHOTOMETRY_FEATURES, region_photometry

    frame = torch.linspace(0, 1, 336 * 336).reshape(336, 336)  # every grey level once
    dim, bright = _frame_mask(slice(10, 20), slice(0, 336)).bool(), _frame_mask(slice(300, 310), slice(0, 336)).bool()
    f_dim, f_bright = region_photometry(dim, frame), region_photometry(bright, frame)
    assert f_dim.shape == (PHOTOMETRY_FEATURES,)
    assert float(f_dim[0]) == pytest.approx(float(frame[dim].mean()), abs=1e-5)  # the object's mean
    assert float(f_dim[2]) == pytest.approx(15 / 336, abs=2e-3) and float(f_bright[2]) == pytest.approx(305 / 336, abs=2e-3)
    assert float(f_bright[3]) == pytest.approx(2 * (305 / 336 - 0.5), abs=5e-3)  # 2 x (mean - median)
    # padding (NaN) counts for nothing: the same image with a band of padding gives the same ranks
    padded = torch.cat([torch.full((40, 336), float("nan")), frame[40:]])
    f_pad = region_photometry(bright, padded)
    assert float(f_pad[2]) == pytest.approx(float((frame[40:] < frame[bright].mean()).float().mean()), abs=1e-5)
    assert torch.count_nonzero(region_photometry(torch.zeros(336, 336, dtype=torch.bool), frame)) == 0


def test_version_3_tokens_read_the_object_of_a_box_and_its_brightness():
    enc = _v3_encoder()
    box = _frame_mask(slice(100, 200), slice(100, 200))[None]
    small = _frame_mask(slice(140, 160), slice(140, 160))[None]
    large = _frame_mask(slice(105, 195), slice(110, 190))[None]
    frame = _frame(0.1)
    alone, _ = enc(_features(), box, brightness=frame)
    same, _ = enc(_features(), box, object_masks=torch.zeros_like(box), brightness=frame)  # no object: the box itself
    torch.testing.assert_close(alone, same)
    as_mask, _ = enc(_features(), box, object_masks=box, brightness=frame)
    torch.testing.assert_close(alone, as_mask)
    t_small, _ = enc(_features(), box, object_masks=small, brightness=frame)
    t_large, _ = enc(_features(), box, object_masks=large, brightness=frame)
    assert not torch.allclose(t_small, t_large)  # same box, different objects: different tokens
    lit = frame.clone()
    lit[140:160, 140:160] = 0.9
    t_lit, _ = enc(_features(), box, object_masks=small, brightness=lit)
    assert not torch.allclose(t_small, t_lit)  # same object, brighter: a different token
    with pytest.raises(ValueError, match="brightness"):
        enc(_features(), box)


def test_a_version_2_encoder_widened_to_version_3_gives_the_same_tokens():
    from napari_medplib.model.region_encoder import region_input_width, widen_geometry_weight

    torch.manual_seed(1)
    old = RegionEncoder(MedPLIBConfig(hidden_size=8, num_attention_heads=2, mm_hidden_size=4,
                                      region_geometry=True, region_geometry_version=2))
    new = _v3_encoder()
    state = old.state_dict()
    state["geometry.0.weight"] = widen_geometry_weight(state["geometry.0.weight"], region_input_width(3))
    new.load_state_dict(state)
    masks = torch.stack([_frame_mask(slice(28, 34), slice(28, 60)), _frame_mask(slice(200, 260), slice(10, 30))])
    before, _ = old(_features(), masks)
    after, _ = new(_features(), masks, object_masks=torch.flip(masks, dims=[0]), brightness=_frame(0.3))
    torch.testing.assert_close(before, after)  # the new inputs start silent
    with pytest.raises(ValueError, match="widen"):
        widen_geometry_weight(torch.zeros(8, 300), region_input_width(3))
