"""The on-disk embedding cache checks its tensors against the hash and shapes in its signature."""

import pytest
import torch

from napari_medplib.engine import EmbeddingCacheMismatchError
from napari_medplib.engine.disk_cache import DiskEmbeddingCache, Signature, tensor_hash

SIGNATURE = Signature("tiny", "abc123", "float32")


@pytest.fixture
def cache(tmp_path):
    return DiskEmbeddingCache(tmp_path / "embeddings", SIGNATURE)


def _stored(cache):
    cache.write("k", {"sam": torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)}, {"h": "4"})
    return cache.path("k")


def test_round_trip_records_hash_and_shapes(cache):
    path = _stored(cache)
    tensors = cache.read("k")
    assert tensors["meta"]["content_hash"] == tensor_hash({"sam": tensors["sam"]})
    assert tensors["meta"]["shapes"] == '{"sam": [1, 2, 3, 4]}' and tensors["meta"]["h"] == "4"
    assert cache.read("k", expected_shapes={"sam": (1, 2, None, None)})["sam"].shape == (1, 2, 3, 4)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_flipped_tensor_byte_is_refused(cache):
    path = _stored(cache)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # a bit of the last float
    path.write_bytes(bytes(data))
    with pytest.raises(EmbeddingCacheMismatchError, match="do not match the hash"):
        cache.read("k")


def test_tensor_of_another_shape_under_the_same_signature_is_refused(cache):
    from safetensors.torch import save_file

    path = _stored(cache)
    meta = dict(cache.read("k")["meta"])
    save_file({"sam": torch.zeros(1, 2, 4, 3)}, str(path), metadata=meta)  # same bytes count, other shape
    with pytest.raises(EmbeddingCacheMismatchError, match="shapes"):
        cache.read("k")


def test_unexpected_shape_or_rank_is_refused(cache):
    _stored(cache)
    with pytest.raises(EmbeddingCacheMismatchError, match=r"sam has shape \(1, 2, 3, 4\), expected \(1, 256"):
        cache.read("k", expected_shapes={"sam": (1, 256, 16, 16)})
    cache.write("flat", {"sam": torch.zeros(6)}, {})
    with pytest.raises(EmbeddingCacheMismatchError, match="4 axes"):
        cache.read("flat")


def test_file_of_the_old_format_is_refused_not_used(cache):
    from safetensors.torch import save_file

    path = cache.path("k")
    old = {**SIGNATURE.metadata("k"), "format": "napari-medplib-embeddings/1"}
    save_file({"sam": torch.zeros(1, 2, 3, 4)}, str(path), metadata=old)
    with pytest.raises(EmbeddingCacheMismatchError, match="format"):
        cache.read("k")
