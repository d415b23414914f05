"""Fuzz every file reader with seeded, malformed inputs: no raw exception, memory bounded by the file.

Each reader gets real or generated seed files (tests/io/data/real, plus files written here) mutated
at random: bit flips, interesting integers over binary headers, inserted/deleted/duplicated ranges,
truncation, interesting tokens spliced into text (``NaN``, ``Infinity``, ``1e400``, deep nesting,
...), and for JSON a random node replaced by an odd value; RoiSet zips are rebuilt from mutated
members as well as mutated whole. A run counts, per reader:

* raw exceptions: anything but the reader's own error type (``RegionFileError`` for region files,
  ``ImageFileError`` for images, ``EmbeddingCacheMismatchError`` for embedding files);
* undrawable output: a returned shape or point napari cannot draw;
* the peak memory ratio: tracemalloc peak / (20 x file size + decoded payload + 1 MiB), where the
  decoded payload is the image plane (returned, or as the header declares it when decoding fails
  half-way; counted twice, since tifffile decodes a strip and then copies it into the plane; image
  readers) or the decompressed members (RoiSet zips). Above 1.0 is a failure.

    python benchmarks/fuzz_readers.py              # 5,000 inputs per reader, seed 0
    python benchmarks/fuzz_readers.py -n 200 --readers geojson coco

The test suite (tests/io/test_fuzz_readers.py) runs the same mutators under hypothesis, CI-sized.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
import tracemalloc
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "io" / "data" / "real"
#: Memory allowed per byte of input file.
PER_FILE_BYTE = 20
#: Fixed allowance: the reader's small dicts and arrays, warnings, module caches.
FIXED_BYTES = 2**20

INTERESTING_INTS = [0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
TOKENS = [
    b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1", b"0", b"99999999999", b"1e-400", b"null", b"true",
    b'"', b"[", b"]", b"{", b"}", b",", b":", b"[[[[[[[[", b"{}", b"[]", b'"\\ud800"', b"\xff\xfe", b"\x00",
    b"axis-99999999999", b"nan", b"inf", b"polygon", b"rectangle", b"\n", b"\r\n", b",,,,", b"-0",
]
ODD_VALUES = [
    None, True, 0, -1, 2**63, 1e308, float("nan"), float("inf"), -float("inf"), "", "x", [], {}, [[]], [None],
    [1], [1, 2], [float("nan"), 1.0], {"a": 1}, [[0, 0]], [[0, 0], [1, 1]], [[[0, 0]]], "Polygon",
    {"type": "Point"}, {"size": [30000, 30000], "counts": "0"}, {"size": [2, 2], "counts": [5]},
    [[float("inf"), 0], [1, 1], [2, 0]], [0] * 3, 10**30, "\ud800", [{"id": [1]}],
]


# ------------------------------------------------------------------------------------ mutators
def _flip(rng: random.Random, data: bytearray) -> None:
    if data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)


def _int(rng: random.Random, data: bytearray) -> None:
    if len(data) < 4:
        return
    size = rng.choice([1, 2, 4])
    head = min(len(data) - size, 128)  # binary headers hold the sizes
    i = rng.randrange(head + 1) if rng.random() < 0.7 else rng.randrange(len(data) - size + 1)
    value = rng.choice(INTERESTING_INTS) & ((1 << (8 * size)) - 1)
    data[i : i + size] = value.to_bytes(size, rng.choice(["big", "little"]))


def _insert(rng: random.Random, data: bytearray) -> None:
    i = rng.randrange(len(data) + 1)
    data[i:i] = rng.choice(TOKENS) if rng.random() < 0.7 else rng.randbytes(rng.randrange(1, 16))


def _delete(rng: random.Random, data: bytearray) -> None:
    if data:
        i = rng.randrange(len(data))
        del data[i : i + rng.randrange(1, 64)]


def _duplicate(rng: random.Random, data: bytearray) -> None:
    if data:
        i = rng.randrange(len(data))
        chunk = data[i : i + rng.randrange(1, 256)]
        j = rng.randrange(len(data) + 1)
        data[j:j] = chunk * rng.randrange(1, 8)


def _truncate(rng: random.Random, data: bytearray) -> None:
    if data:
        del data[rng.randrange(len(data)) :]


def _replace_token(rng: random.Random, data: bytearray) -> None:
    """Replace a number-looking run of bytes by an interesting token."""
    if not data:
        return
    i = rng.randrange(len(data))
    j = i
    while j < len(data) and j - i < 24 and chr(data[j]) in "0123456789.-eE":
        j += 1
    data[i : max(j, i + 1)] = rng.choice(TOKENS)


BYTE_MUTATORS: list[Callable[[random.Random, bytearray], None]] = [
    _flip, _int, _insert, _delete, _duplicate, _truncate, _replace_token,
]


def mutate_bytes(rng: random.Random, data: bytes, max_mutations: int = 6) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, max_mutations + 1)):
        rng.choice(BYTE_MUTATORS)(rng, out)
    return bytes(out)


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _nodes(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:50]):
            yield from _nodes(child, (*path, i))


def mutate_json(rng: random.Random, document, max_mutations: int = 4):
    """Replace random nodes of a parsed JSON document by odd values (a deep copy is changed)."""
    document = json.loads(json.dumps(document))
    for _ in range(rng.randrange(1, max_mutations + 1)):
        paths = list(_nodes(document))
        target = rng.choice(paths)
        value = copy.deepcopy(rng.choice(ODD_VALUES))  # never change the shared odd values
        if rng.random() < 0.05:  # deep nesting, spliced in as text by json_bytes
            value = f"__DEEP_{rng.choice([50, 500, 5000])}__"
        if not target:
            document = value
            continue
        parent = document
        for key in target[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:
            parent.pop(target[-1], None)
        else:
            parent[target[-1]] = value
    return document


def json_bytes(rng: random.Random, document) -> bytes:
    try:
        text = json.dumps(document, allow_nan=True)
    except (ValueError, RecursionError):
        text = "[]"
    for depth in (50, 500, 5000):
        text = text.replace(f'"__DEEP_{depth}__"', "[" * depth + "]" * depth)
    data = text.encode("utf-8", "surrogatepass")
    return mutate_bytes(rng, data, 2) if rng.random() < 0.3 else data


# ------------------------------------------------------------------------------------ seeds
def _csv_seeds() -> list[bytes]:
    return [
        b"index,shape-type,vertex-index,axis-0,axis-1\n0,rectangle,0,1,2\n0,rectangle,1,1,6\n"
        b"0,rectangle,2,5,6\n0,rectangle,3,5,2\n1,polygon,0,0,0\n1,polygon,1,0,4\n1,polygon,2,4,4\n"
        b"2,line,0,1,1\n2,line,1,3,3\n3,path,0,0,0\n3,path,1,1,1\n3,path,2,2,0\n",
        b"index,axis-0,axis-1,axis-2,label,name\n0.0,1.0,5.0,6.0,1,a\n1.0,2.0,7.5,8.25,0,b\n2.0,0,3,4,1,c\n",
        b"index,axis-0,axis-1\n0,1.5,2.5\n1,3,4\n",
    ]


def _tiff_seeds() -> list[bytes]:
    import io

    import tifffile

    image = (np.add.outer(np.arange(24), np.arange(20)) * 7).astype(np.uint16)
    out = []
    for kwargs in ({}, {"compression": "zlib"}, {"compression": "lzw"}, {"compression": "zstd"},
                   {"compression": "packbits"}):
        buffer = io.BytesIO()
        try:
            tifffile.imwrite(buffer, image, **kwargs)
        except Exception:  # a codec not installed: fewer seeds
            continue
        out.append(buffer.getvalue())
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.stack([image, image[::-1]]), metadata={"axes": "ZYX"})
    out.append(buffer.getvalue())
    return out


def _png_seeds() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for mode, array in (("L", np.arange(300, dtype=np.uint8).reshape(15, 20)),
                        ("RGB", np.zeros((10, 12, 3), np.uint8) + 40)):
        buffer = io.BytesIO()
        Image.fromarray(array, mode=mode).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _cache_seed(folder: Path) -> bytes:
    import torch

    from napari_medplib.engine.disk_cache import DiskEmbeddingCache, Signature

    cache = DiskEmbeddingCache(folder, Signature("tiny", "abc", "float32"))
    cache.write("k", {"sam": torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4),
                      "clip_patch": torch.ones(1, 3, 2)}, {"h": "4"})
    return cache.path("k").read_bytes()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ readers
@dataclass
class Reader:
    name: str
    suffix: str
    read: Callable[[Path], object]
    allowed: tuple[type[BaseException], ...]
    make: Callable[[random.Random], bytes]
    decoded: Callable[[Path, object], int] = lambda path, result: 0
    fixed: int = FIXED_BYTES


def _roi_members() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(REAL.glob("readroi_*.roi"))]


def _zip_payload(path: Path, result) -> int:
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(i.file_size for i in archive.infolist() if i.filename.lower().endswith(".roi"))
    except Exception:
        return 0


def _image_payload(path: Path, result) -> int:
    """The decoded plane: the one returned, else the plane the header declares (a decode that fails
    half-way has allocated it already)."""
    return 2 * _declared_plane(path, result)  # tifffile decodes a strip, then copies it into the plane


def _declared_plane(path: Path, result) -> int:
    if isinstance(result, tuple):
        return int(result[0].nbytes)
    try:
        if path.suffix == ".tif":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(np.prod(page.shape, dtype=np.float64) * np.dtype(page.dtype).itemsize)
        from PIL import Image

        with Image.open(path) as img:
            return img.size[0] * img.size[1] * len(img.getbands()) * 2
    except Exception:
        return 0


def make_readers(workdir: Path) -> dict[str, Reader]:
    from napari_medplib.engine.disk_cache import DiskEmbeddingCache, Signature
    from napari_medplib.engine.errors import EmbeddingCacheMismatchError
    from napari_medplib.image_files import ImageFileError, read_plane
    from napari_medplib.io import RegionFileError, read_coco, read_geojson, read_imagej
    from napari_medplib.io.napari_csv import read_napari_csv
    from napari_medplib.io.napari_io import get_coco_reader, get_geojson_reader, get_imagej_reader

    geojson_docs = [json.loads((REAL / "qupath_all_shapes.geojson").read_text())]
    coco_docs = [json.loads(p.read_text()) for p in sorted(REAL.glob("*.json"))
                 if not p.name.endswith(".expected.json")]
    roi_members = _roi_members()
    roi_blobs = [blob for _, blob in roi_members]
    roiset = (REAL / "bactunet_RoiSet_subset.zip").read_bytes()
    csvs, tiffs, pngs = _csv_seeds(), _tiff_seeds(), _png_seeds()
    cache_folder = workdir / "cache"
    cache_blob = _cache_seed(cache_folder)
    cache = DiskEmbeddingCache(cache_folder, Signature("tiny", "abc", "float32"))

    def json_maker(docs):
        def make(rng):
            if rng.random() < 0.5:
                return json_bytes(rng, mutate_json(rng, rng.choice(docs)))
            return mutate_bytes(rng, json.dumps(rng.choice(docs)).encode())
        return make

    def zip_maker(rng):
        if rng.random() < 0.4:
            return mutate_bytes(rng, roiset)
        chosen = rng.sample(roi_members, rng.randrange(1, len(roi_members) + 1))
        members = [(n, mutate_bytes(rng, b) if rng.random() < 0.6 else b) for n, b in chosen]
        return _zip(members)

    def via_get_reader(get_reader):
        def read(path):
            reader = get_reader(str(path))  # must never raise
            return reader(str(path)) if reader is not None else []
        return read

    def read_cache(path):
        target = cache.path("k")
        target.write_bytes(path.read_bytes())
        return cache.read("k")

    region = (RegionFileError,)
    return {
        "geojson": Reader("geojson", ".geojson", read_geojson, region, json_maker(geojson_docs)),
        "geojson_get_reader": Reader("geojson_get_reader", ".geojson", via_get_reader(get_geojson_reader),
                                     region, json_maker(geojson_docs)),
        "coco": Reader("coco", ".json", read_coco, region, json_maker(coco_docs)),
        "coco_get_reader": Reader("coco_get_reader", ".json", via_get_reader(get_coco_reader), region,
                                  json_maker(coco_docs)),
        "imagej_roi": Reader("imagej_roi", ".roi", read_imagej, region,
                             lambda rng: mutate_bytes(rng, rng.choice(roi_blobs))),
        "imagej_zip": Reader("imagej_zip", ".zip", via_get_reader(get_imagej_reader), region, zip_maker,
                             _zip_payload),
        "napari_csv": Reader("napari_csv", ".csv", read_napari_csv, region,
                             lambda rng: mutate_bytes(rng, rng.choice(csvs))),
        "tiff": Reader("tiff", ".tif", read_plane, (ImageFileError,),
                       lambda rng: mutate_bytes(rng, rng.choice(tiffs)), _image_payload),
        "png": Reader("png", ".png", read_plane, (ImageFileError,),
                      lambda rng: mutate_bytes(rng, rng.choice(pngs)), _image_payload),
        "embedding_cache": Reader("embedding_cache", ".safetensors", read_cache,
                                  (EmbeddingCacheMismatchError,),
                                  lambda rng: mutate_bytes(rng, cache_blob)),
    }


# ------------------------------------------------------------------------------------ one input
@dataclass
class Outcome:
    raw: BaseException | None = None
    undrawable: str | None = None
    peak: int = 0
    budget: int = 1

    @property
    def ratio(self) -> float:
        return self.peak / self.budget


def undrawable_output(result) -> str | None:
    """What in a reader's layer data napari could not draw, or None."""
    try:
        from napari_medplib.io._common import undrawable
    except ImportError:  # a version without the check
        return None
    if isinstance(result, tuple):  # an image plane
        plane = result[0]
        return None if plane.ndim in (2, 3) and plane.size else f"an image of shape {plane.shape}"
    if not isinstance(result, list):
        return None
    for data, meta, kind in result:
        if kind == "shapes":
            if not len(data):
                return "an empty shapes layer"
            for coords, shape_type in zip(data, meta["shape_type"], strict=True):
                reason = undrawable(np.asarray(coords, float), shape_type)
                if reason:
                    return reason
        elif kind == "points":
            points = np.asarray(data, float)
            if points.ndim != 2 or not len(points) or not np.isfinite(points).all():
                return "empty or non-finite points"
    return None


def run_one(reader: Reader, path: Path, data: bytes) -> Outcome:
    path.write_bytes(data)
    outcome = Outcome()
    result = None
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = reader.read(path)
    except reader.allowed:
        pass
    except BaseException as exc:  # what the fuzzing is looking for
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome.raw = exc
    finally:
        outcome.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    outcome.budget = PER_FILE_BYTE * len(data) + reader.decoded(path, result) + reader.fixed
    if outcome.raw is None:
        outcome.undrawable = undrawable_output(result)
    return outcome


@dataclass
class Tally:
    inputs: int = 0
    raw: Counter = field(default_factory=Counter)
    undrawable: Counter = field(default_factory=Counter)
    worst_ratio: float = 0.0
    over_budget: int = 0
    seconds: float = 0.0
    example: str = ""


def fuzz(reader: Reader, n: int, seed: int, workdir: Path) -> Tally:
    rng = random.Random(f"{seed}-{reader.name}")
    tally = Tally()
    path = workdir / f"input{reader.suffix}"
    start = time.perf_counter()
    for _ in range(n):
        data = reader.make(rng)
        outcome = run_one(reader, path, data)
        tally.inputs += 1
        if outcome.raw is not None:
            key = f"{type(outcome.raw).__name__}: {str(outcome.raw)[:80]}"
            tally.raw[key] += 1
            tally.example = tally.example or key
        if outcome.undrawable:
            tally.undrawable[outcome.undrawable] += 1
        tally.worst_ratio = max(tally.worst_ratio, outcome.ratio)
        tally.over_budget += outcome.ratio > 1.0
    tally.seconds = time.perf_counter() - start
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="inputs per reader (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readers", nargs="*", help="names of readers to fuzz (default: all)")
    args = parser.parse_args(argv)
    import logging

    import roifile  # noqa: F401 - imported before memory is measured
    import shapely  # noqa: F401

    for name in ("tifffile", "roifile", "PIL"):  # damaged files are the point; their log lines are noise
        logging.getLogger(name).setLevel(logging.CRITICAL)

    failed = False
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        readers = make_readers(workdir)
        names = args.readers or list(readers)
        for reader in readers.values():  # first calls import lazily; keep that out of the measurement
            run_one(reader, workdir / f"warm{reader.suffix}", reader.make(random.Random(0)))
        print(f"{'reader':20} {'inputs':>7} {'raw exc':>8} {'undrawable':>10} {'peak/budget':>12} {'over':>5} {'s':>6}")
        for name in names:
            tally = fuzz(readers[name], args.n, args.seed, workdir)
            raw, bad = sum(tally.raw.values()), sum(tally.undrawable.values())
            failed |= bool(raw or bad or tally.over_budget)
            print(f"{name:20} {tally.inputs:7d} {raw:8d} {bad:10d} {tally.worst_ratio:12.3f} "
                  f"{tally.over_budget:5d} {tally.seconds:6.1f}", flush=True)
            for key, count in tally.raw.most_common(5):
                print(f"    raw {count:5d} x {key}")
            for key, count in tally.undrawable.most_common(3):
                print(f"    undrawable {count:5d} x {key}")
    print(f"budget: {PER_FILE_BYTE} x file size + decoded payload + {FIXED_BYTES // 2**20} MiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
