"""Turn the command line's INPUTS (files, folders, globs, stacks, OME-Zarr) into work items.

An item is one 2-D plane of one input: a single image, or one plane of a stack. Only headers are
read here (TIFF tags, PNG size, Zarr metadata); pixels are read by the worker that runs the item.
Each item's key hashes the input's content (and its region file's), the plane, the run's options and
the name its outputs carry, so a re-run skips exactly the items whose outputs exist for the same
data and options: a file edited in place runs again, an unchanged one is skipped wherever it lies.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .options import MAX_PLANES_PER_FILE, BatchOptions, ItemError

_TIFF = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".btf", ".tf8")
_PIL = (".png", ".jpg", ".jpeg", ".bmp")
_ZARR = (".ome.zarr", ".zarr")
_REGION_SUFFIXES = (".geojson", ".roi", ".zip", ".json", ".csv")
_CHUNK = 8 * 2**20
#: Stack axes (besides Y, X and channels) a file may have to be read plane by plane (a TZCYX file: 2).
MAX_STACK_AXES = 2


@dataclass(frozen=True)
class Item:
    """One plane of one input, with what the worker needs to find and name it."""

    path: str  # absolute path of the input file or OME-Zarr folder
    plane: tuple[tuple[str, int], ...]  # (("Z", 3),) for a stack's plane; () for a single image
    name: str  # output name: the input's stem, plus the plane ("cells", "stack_Z003")
    shape: tuple[int, int]  # plane height, width
    regions: str | None = None  # region file for --segment
    key: str = ""
    problem: str | None = None  # found while listing (unreadable header, no region file): recorded as failed

    @property
    def plane_text(self) -> str:
        return ",".join(f"{a}={i}" for a, i in self.plane)


@dataclass
class Listing:
    """The items of a run and what was found while listing the inputs."""

    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _ZARR + _TIFF + _PIL:
        if name.endswith(suffix):
            return suffix
    return ""


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _is_input(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    suffix = _suffix(path)
    if suffix in _ZARR:
        return path.is_dir()
    return bool(suffix) and path.is_file()


def expand(inputs: Sequence[str], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """Files and OME-Zarr folders named by ``inputs`` (files, folders, glob patterns), in a stable order.

    Returns the paths and the problems (an input that matches nothing), each one line.
    """
    found: list[Path] = []
    problems: list[str] = []
    for text in inputs:
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            hits = [m for m in matches if _is_input(m)]
            if not hits:
                problems.append(f"{text}: matches no image file (TIFF, OME-TIFF, PNG, JPEG or OME-Zarr)")
            found.extend(hits)
        elif path.is_dir() and _suffix(path) not in _ZARR:
            pattern = "**/*" if recursive else "*"
            hits = sorted(p for p in path.glob(pattern) if _is_input(p) and not _inside_zarr(p, path))
            if not hits:
                problems.append(f"{text}: the folder holds no image file (TIFF, OME-TIFF, PNG, JPEG or OME-Zarr)")
            found.extend(hits)
        elif path.exists():
            if not _is_input(path):
                problems.append(f"{text}: not an image file we read (TIFF, OME-TIFF, PNG, JPEG or OME-Zarr)")
            else:
                found.append(path)
        else:
            problems.append(f"{text}: no such file or folder")
    unique: dict[Path, None] = {}
    for path in found:
        unique.setdefault(path.resolve(), None)
    return list(unique), problems


def _inside_zarr(path: Path, root: Path) -> bool:
    return any(_suffix(parent) in _ZARR for parent in path.relative_to(root).parents if parent != Path("."))


# ------------------------------------------------------------------------------------- planes
def plane_axes(path: Path) -> tuple[list[tuple[str, int]], tuple[int, int]]:
    """The non-plane, non-channel axes of an input ([("Z", 40)], ...) and its plane's (H, W), from headers."""
    suffix = _suffix(path)
    try:
        if suffix in _ZARR:
            from .planes import zarr_layout

            layout = zarr_layout(path)
            return layout.free_axes, layout.plane_shape
        if suffix in _TIFF:
            return _tiff_axes(path)
        return [], _pil_shape(path)
    except ItemError:
        raise
    except Exception as exc:  # damaged headers surface as many types
        raise ItemError(f"{path.name}: not a readable image ({type(exc).__name__}: {str(exc)[:160]})") from None


def _tiff_axes(path: Path) -> tuple[list[tuple[str, int]], tuple[int, int]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        len(tif.pages)  # walks the page chain once; stops at a damaged loop (see image_files)
        if not tif.series or not tif.series[0].pages:
            raise ItemError(f"{path.name}: the TIFF holds no image")
        series = tif.series[0]
        axes, shape = series.axes.upper(), tuple(series.shape)
        page_axes = series.pages[0].axes.upper() if series.pages[0] is not None else axes[-2:]
    if "Y" not in page_axes or "X" not in page_axes:
        raise ItemError(f"{path.name}: unsupported TIFF layout (axes {axes}); save it as a (T/Z/C)YX stack")
    plane = (shape[axes.index("Y")], shape[axes.index("X")])
    lead = axes[: len(axes) - len(page_axes)]  # as image_files reads it: a page's own axes are one plane
    free = [(a, n) for a, n in zip(lead, shape[: len(lead)], strict=True) if a not in ("C", "S") and n > 1]
    return free, plane


def _pil_shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
    return height, width


def _planes(free: list[tuple[str, int]], chosen: dict[str, int] | int | None, path: Path) -> list[tuple[tuple[str, int], ...]]:
    """Every plane of a stack (``chosen`` None) or the chosen one, as ((axis, index), ...)."""
    if not free:
        return [()]
    if chosen is None:
        if len(free) > MAX_STACK_AXES:
            raise ItemError(f"{path.name}: has {len(free)} stack axes ({''.join(a for a, _ in free)}) besides Y, X "
                            f"and channels; batch reads up to {MAX_STACK_AXES} (T and Z): pick the planes with "
                            "--plane, e.g. --plane " + ",".join(f"{a}=0" for a, _ in free[:-MAX_STACK_AXES]))
        total = 1
        for _, n in free:
            total *= n
        if total > MAX_PLANES_PER_FILE:
            raise ItemError(f"{path.name}: has {total} planes (over {MAX_PLANES_PER_FILE}); "
                            "pick planes with --plane or split the file")
        axes = [a for a, _ in free]
        return [tuple(zip(axes, index, strict=True)) for index in itertools.product(*(range(n) for _, n in free))]
    if isinstance(chosen, int):
        if len(free) != 1:
            raise ItemError(f"{path.name}: has axes {''.join(a for a, _ in free)}; name them, e.g. --plane "
                            + ",".join(f"{a}=0" for a, _ in free))
        chosen = {free[0][0]: chosen}
    plane = []
    for axis, n in free:
        index = int(chosen.get(axis, 0))
        if not 0 <= index < n:
            raise ItemError(f"{path.name}: {axis}={index} is out of range (0..{n - 1})")
        plane.append((axis, index))
    return [tuple(plane)]


# --------------------------------------------------------------------------------- hashing
def content_hash(path: Path) -> str:
    """blake2b of a file's bytes, or of an OME-Zarr folder's file names and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def item_key(content: str, regions_content: str, plane: Iterable[tuple[str, int]], options: BatchOptions,
             name: str = "") -> str:
    """What identifies an item's outputs: the pixels (and regions), the plane, the options, and the
    name its outputs carry (two identical files each get their own labels)."""
    text = json.dumps([content, regions_content, list(plane), options.fingerprint(), name])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _regions_file(path: Path, pattern: str) -> Path:
    return path.parent / pattern.format(stem=_stem(path), name=path.name)


def _plane_name(stem: str, plane: tuple[tuple[str, int], ...], sizes: dict[str, int]) -> str:
    parts = [f"{a}{i:0{len(str(max(sizes[a] - 1, 1)))}d}" for a, i in plane]
    return "_".join([stem, *parts]) if parts else stem


def list_items(inputs: Sequence[str], options: BatchOptions, recursive: bool = False) -> Listing:
    """All items of a run, keyed; inputs that cannot be listed become failed items with the reason."""
    paths, problems = expand(inputs, recursive)
    listing = Listing(notes=problems)
    stems: dict[str, int] = {}
    for path in paths:
        stems[_stem(path)] = stems.get(_stem(path), 0) + 1
    for path in paths:
        stem = _stem(path)
        content = content_hash(path)
        if stems[stem] > 1:  # two inputs called cells.tif in different folders: keep both outputs
            stem = f"{stem}-{content[:6]}"
        regions, regions_content, problem = None, "", None
        if options.actions.segment:
            regions_path = _regions_file(path, options.actions.regions_pattern)
            if regions_path.is_file():
                regions, regions_content = str(regions_path), content_hash(regions_path)
            else:
                problem = (f"{path.name}: no region file {regions_path.name} beside it for --segment "
                           f"(--regions-pattern {options.actions.regions_pattern!r})")
        try:
            free, shape = plane_axes(path)
            planes = _planes(free, options.plane, path)
        except ItemError as exc:
            listing.items.append(Item(str(path), (), stem, (0, 0), regions,
                                      item_key(content, regions_content, (), options, stem), str(exc)))
            continue
        sizes = dict(free)
        for plane in planes:
            name = _plane_name(stem, plane, sizes)
            key = item_key(content, regions_content, plane, options, name)
            listing.items.append(Item(str(path), plane, name, shape, regions, key, problem))
    return listing
