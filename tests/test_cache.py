import numpy as np

from napari_medplib.cache import LRUCache, approx_nbytes, content_key


def test_content_key_depends_on_content_shape_dtype_and_extra():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_key(a) == content_key(a.copy())
    assert content_key(a) != content_key(a.reshape(4, 3))
    assert content_key(a) != content_key(a.astype(np.uint16))
    b = a.copy()
    b[0, 0] = 99
    assert content_key(a) != content_key(b)
    assert content_key(a, "clip") != content_key(a, "sam")
    assert content_key(a[:, ::2]) == content_key(np.ascontiguousarray(a[:, ::2]))


def test_lru_evicts_least_recently_used_by_bytes():
    cache = LRUCache(max_bytes=300)
    for name in "abc":
        cache.put(name, np.zeros(100, np.uint8))
    assert cache.get("a") is not None  # a is now most recent
    cache.put("d", np.zeros(100, np.uint8))
    assert "b" not in cache and {"a", "c", "d"} <= set(cache.keys())
    assert cache.nbytes == 300 and cache.stats.evictions == 1


def test_oversized_value_is_not_cached_and_does_not_flush():
    cache = LRUCache(max_bytes=100)
    cache.put("small", np.zeros(10, np.uint8))
    cache.put("huge", np.zeros(1000, np.uint8))
    assert "huge" not in cache and "small" in cache


def test_get_or_compute_counts_calls():
    cache = LRUCache(max_bytes=10_000)
    calls = []

    def compute():
        calls.append(1)
        return np.ones(3)

    cache.get_or_compute("k", compute)
    cache.get_or_compute("k", compute)
    assert len(calls) == 1 and cache.stats.hits == 1 and cache.stats.misses == 1
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_max_items_and_nested_sizes():
    cache = LRUCache(max_bytes=10**9, max_items=2)
    for k in range(3):
        cache.put(k, (np.zeros(4), {"x": np.zeros(2)}))
    assert list(cache.keys()) == [1, 2]
    assert approx_nbytes((np.zeros(4), {"x": np.zeros(2)})) == 48
