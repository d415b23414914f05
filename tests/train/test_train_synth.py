"""Synthetic images: reproducible, valid masks in every style, disjoint splits, fast enough to stream."""


import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medplib.train.synth import (
    ALL_CATEGORIES,
    DEFAULT_STYLES,
    MIN_AREA,
    STYLES,
    make_dataset,
    make_sample,
    sample_seed,
    vocabulary_for,
)


def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different instances sharing a 4-connected border."""
    pairs = set()
    for a, b in ((labels[1:], labels[:-1]), (labels[:, 1:], labels[:, :-1])):
        hit = (a > 0) & (b > 0) & (a != b)
        pairs |= {(min(x, y), max(x, y)) for x, y in zip(a[hit].tolist(), b[hit].tolist(), strict=True)}
    return pairs


@pytest.mark.parametrize("style", list(STYLES))
def test_same_seed_same_sample_different_seed_different(style):
    a, b, c = make_sample(style, 3), make_sample(style, 3), make_sample(style, 4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.categories == b.categories
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_every_style_gives_valid_instance_masks(style, bit_depth):
    for seed in range(4):
        s = make_sample(style, seed, size=(192, 224), bit_depth=bit_depth)
        assert s.image.shape[:2] == s.labels.shape == (192, 224)
        assert s.image.dtype == (np.uint8 if bit_depth == 8 else np.uint16)
        assert s.labels.dtype == np.int32
        ids = set(np.unique(s.labels).tolist()) - {0}
        assert ids == set(s.categories) == set(range(1, len(ids) + 1)), "ids are 1..N and all named"
        assert len(ids) >= 2
        assert set(s.categories.values()) <= set(STYLES[style].categories)
        for i, sl in enumerate(ndi.find_objects(s.labels), start=1):
            piece = s.labels[sl] == i
            assert piece.sum() >= MIN_AREA
            assert ndi.label(piece, structure=np.ones((3, 3)))[1] == 1, f"instance {i} is in pieces"
        assert s.image.std() > 0
        assert s.meta["bit_depth"] == bit_depth and s.meta["description"] == STYLES[style].description


def test_sixteen_bit_uses_more_than_eight_bits_and_keeps_an_offset():
    s = make_sample("nuclei", 1, bit_depth=16)
    assert s.image.max() > 255
    assert s.image.min() > 0  # camera offset: the contrast pipeline must not assume 0 is black
    assert s.image.max() < 65535


def test_nuclei_touch_and_objects_differ_in_size_and_shape():
    for seed in range(5):
        s = make_sample("nuclei", seed)
        assert touching_pairs(s.labels), f"seed {seed}: no touching nuclei"
        areas = np.bincount(s.labels.ravel())[1:]
        assert areas.max() > 1.5 * areas.min()


def test_objects_are_brighter_than_background_in_fluorescence_and_darker_in_he():
    s = make_sample("nuclei", 2)
    assert s.image[s.labels > 0].mean() > 2 * s.image[s.labels == 0].mean()
    h = make_sample("he", 2)
    nuclei = np.isin(h.labels, h.instances_of("nucleus"))
    assert h.image.shape[-1] == 3
    assert h.image[nuclei].mean() < h.image[h.labels == 0].mean()
    # purple nuclei: red and blue above green; pink stroma: red above green
    r, g, b = (h.image[nuclei][:, k].mean() for k in range(3))
    assert r > g and b > g


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_cells_channels_option(channels):
    s = make_sample("cells", 0, channels=channels)
    assert s.image.shape == ((256, 256) if channels == 1 else (256, 256, channels))
    assert set(s.categories.values()) == {"cytoplasm", "nucleus"}
    if channels >= 2:  # channel 0 is the nuclear stain, channel 1 the cytoplasm stain
        nuc = s.category_mask("nucleus")
        cyto = s.category_mask("cytoplasm")
        assert s.image[..., 0][nuc].mean() > s.image[..., 0][cyto].mean()
        assert s.image[..., 1][cyto].mean() > s.image[..., 1][nuc].mean()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown style 'confocal'"):
        make_sample("confocal", 0)
    with pytest.raises(ValueError, match="bit_depth"):
        make_sample("nuclei", 0, bit_depth=12)
    with pytest.raises(ValueError, match="channel"):
        make_sample("nuclei", 0, channels=2)
    with pytest.raises(ValueError, match="split"):
        sample_seed(0, 0, "test")


def test_heldout_seeds_and_images_are_disjoint_from_train():
    for seed in (0, 1, 12345):
        train = {sample_seed(seed, i, "train") for i in range(500)}
        held = {sample_seed(seed, i, "heldout") for i in range(500)}
        assert len(train) == len(held) == 500 and not train & held
    # and across data set seeds too: train of seed 1 never meets held-out of seed 0
    assert not {sample_seed(1, i) for i in range(300)} & {sample_seed(0, i, "heldout") for i in range(300)}
    digests = {}
    for split in ("train", "heldout"):
        digests[split] = {s.image.tobytes() for s in make_dataset(10, seed=0, split=split)}
    assert not digests["train"] & digests["heldout"]


def test_dataset_is_reproducible_balanced_and_resumable():
    a = list(make_dataset(10, seed=5))
    b = list(make_dataset(10, seed=5))
    assert [s.style for s in a] == [s.style for s in b] == [*DEFAULT_STYLES, *DEFAULT_STYLES]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    resumed = list(make_dataset(3, seed=5, start=7))
    assert all(np.array_equal(x.labels, y.labels) for x, y in zip(a[7:], resumed, strict=True))
    # sample i is reproducible on its own from its seed
    one = make_sample(a[4].style, sample_seed(5, 4), bit_depth=a[4].meta["bit_depth"],
                      channels=a[4].meta["channels"])
    assert np.array_equal(one.image, a[4].image)
    assert {s.meta["bit_depth"] for s in make_dataset(20, seed=0, styles=["nuclei"])} == {8, 16}


def test_bacteria_are_dark_touching_rods_with_a_bright_halo():
    rods, ratios = [], []
    for seed in range(6):
        s = make_sample("bacteria", seed)
        image, labels = s.image.astype(float), s.labels
        assert set(s.categories.values()) == {"bacterium"}
        assert touching_pairs(labels), "micro-colonies: some rods touch"
        inside = labels > 0
        halo = ndi.binary_dilation(inside, iterations=3) & ~inside
        far = ~ndi.binary_dilation(inside, iterations=25)
        background = np.median(image[far])
        assert np.median(image[inside]) < 0.8 * background < background < np.median(image[halo])
        for i, sl in enumerate(ndi.find_objects(labels), start=1):
            ys, xs = np.nonzero(labels[sl] == i)
            if len(ys) > 80 and sl[0].start > 0 and sl[1].start > 0 and sl[0].stop < 256 and sl[1].stop < 256:
                evals = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
                ratios.append(np.sqrt(evals[1] / evals[0]))
        rods.append(len(np.unique(labels)) - 1)
    assert np.median(ratios) > 2.0, "rods, not blobs"
    assert min(rods) >= 2


def test_bacteria_are_opt_in_so_default_data_sets_do_not_change():
    assert "bacteria" in STYLES and "bacteria" not in DEFAULT_STYLES
    assert {s.style for s in make_dataset(12, seed=0)} == set(DEFAULT_STYLES)
    assert "bacterium" not in ALL_CATEGORIES
    assert vocabulary_for(DEFAULT_STYLES) == vocabulary_for(["nuclei"]) == ALL_CATEGORIES
    assert set(vocabulary_for([*DEFAULT_STYLES, "bacteria"])) == {*ALL_CATEGORIES, "bacterium"}
    six = [s.style for s in make_dataset(12, seed=0, styles=[*DEFAULT_STYLES, "bacteria"])]
    assert six == [*DEFAULT_STYLES, "bacteria"] * 2


# ------------------------------------------------------------------------------------ electron microscopy
EM_STYLES = ("em_neurites", "em_axons")


@pytest.mark.parametrize("style", EM_STYLES)
def test_em_styles_are_many_objects_in_one_grey_channel(style):
    for seed in range(4):
        for bit_depth in (8, 16):
            s = make_sample(style, seed, bit_depth=bit_depth)
            assert s.image.shape == s.labels.shape == (256, 256)  # one channel
            assert s.image.dtype == (np.uint8 if bit_depth == 8 else np.uint16)
            if bit_depth == 16:
                assert s.image.max() > 255
            n = int(s.labels.max())
            assert n > 10 and set(np.unique(s.labels).tolist()) == set(range(n + 1))  # 1..N, contiguous
            assert np.bincount(s.labels.ravel())[1:].min() >= MIN_AREA
            assert set(s.categories.values()) == set(STYLES[style].categories)
            assert s.meta["description"] == STYLES[style].description


def test_em_neurites_are_pale_profiles_between_dark_membranes():
    for seed in range(5):
        s = make_sample("em_neurites", seed)
        image, labels = s.image.astype(float), s.labels
        assert set(s.categories.values()) == {"neurite"}
        membrane = labels == 0
        assert np.median(image[membrane]) < 0.7 * np.median(image[~membrane])
        assert 0.05 < membrane.mean() < 0.5, "thin walls, not a background"
        assert len(touching_pairs(ndi.grey_dilation(labels, size=3) * (labels == 0) + labels)) > 10  # a tessellation


def test_em_axons_are_discs_ringed_by_myelin_of_either_contrast():
    darker_rings = []
    for seed in range(20):
        s = make_sample("em_axons", seed)
        image, labels = s.image.astype(float), s.labels
        assert set(s.categories.values()) == {"axon"}
        axons = labels > 0
        ring = ndi.binary_dilation(axons, iterations=2) & ~axons
        axoplasm, myelin = np.median(image[axons]), np.median(image[ring])
        assert abs(axoplasm - myelin) > 40  # a sheath of clear contrast around every profile
        darker_rings.append(myelin < axoplasm)
    assert 12 <= sum(darker_rings) < 20, "mostly dark myelin, sometimes inverted"


def test_em_styles_are_opt_in():
    assert not set(EM_STYLES) & set(DEFAULT_STYLES)
    assert {s.style for s in make_dataset(12, seed=0)} == set(DEFAULT_STYLES)
    assert {"neurite", "axon"}.isdisjoint(ALL_CATEGORIES)
    assert set(vocabulary_for([*DEFAULT_STYLES, *EM_STYLES])) == {*ALL_CATEGORIES, "neurite", "axon"}
    assert {STYLES[s].modality for s in EM_STYLES} == {"electron microscopy"}
    mixed = [s.style for s in make_dataset(8, seed=0, styles=["nuclei", *EM_STYLES, "bacteria"])]
    assert mixed == ["nuclei", *EM_STYLES, "bacteria"] * 2


# ------------------------------------------------------------------------------------ immunohistochemistry
def test_ihc_is_opt_in_rgb_with_brown_and_blue_nuclei():
    assert "ihc" in STYLES and "ihc" not in DEFAULT_STYLES
    brown = blue = 0
    for seed in range(4):
        s = make_sample("ihc", seed)
        assert s.image.shape[-1] == 3 and s.labels.max() >= 20
        rgb = s.image.astype(np.float32)
        for label in np.unique(s.labels[s.labels > 0]):
            r, g, b = rgb[s.labels == label].mean(axis=0)
            brown += r > b  # DAB: red above blue
            blue += b > r  # haematoxylin: blue above red
    assert brown >= 4 and blue >= 4 * 10
