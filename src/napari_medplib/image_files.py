"""Read one 2-D plane from an image file, for the command line and batch jobs.

TIFF files are read with tifffile page by page, so a plane of a large stack is read without loading
the stack. The plane is chosen by axis letters as tifffile reports them (`Z`, `T`, `C`, `Q`, ...):
``plane={"Z": 3, "T": 0}``; a single int picks along the only non-plane axis. `channel` picks one
channel of a multi-channel image; without it all channels are kept (the session composites them).
PNG/JPEG/BMP are read with Pillow. numpy, tifffile and Pillow only.

Compressed TIFFs (LZW, deflate, zstd, JPEG, ... as microscopes and Fiji write them) are decoded by
``imagecodecs``, which tifffile uses when it is installed; without it the error says
``pip install imagecodecs``. Limits, checked before a plane is decoded: a plane may decode to at
most :data:`MAX_EXPANSION` times its stored bytes plus :data:`SMALL_PLANE_BYTES`, and no more
than its codec can expand to (:data:`CODEC_MAX_RATIO`: a tiny file declaring a huge plane is damaged), its strips or tiles must lie
within the file, an uncompressed plane must be stored in full, and no plane may exceed :data:`MAX_PLANE_BYTES`; a PNG may not declare more
pixels than deflate can expand its bytes to (:data:`DEFLATE_MAX_RATIO`). Every failure is an
:class:`ImageFileError` naming the file.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Axis letters that tifffile uses for the pixel plane and for colour samples.
_PLANE_AXES = {"Y", "X"}
_SAMPLE_AXIS = "S"
_TIFF_SUFFIXES = {".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8"}
_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
#: Decoded bytes a plane may have per stored (compressed) byte ...
MAX_EXPANSION = 2000
#: ... beyond this many bytes, which any plane may have.
SMALL_PLANE_BYTES = 64 * 2**20
#: Largest plane read at all (16 GiB, e.g. a 65,536 x 65,536 RGB 16-bit plane is 24 GiB).
MAX_PLANE_BYTES = 16 * 2**30
#: deflate (PNG, zip) never expands more than this (its maximum ratio is 1032:1).
DEFLATE_MAX_RATIO = 1032
#: The most some TIFF codecs can expand, by TIFF compression tag: LZW (12-bit codes of at most
#: 4,096 bytes), deflate (Adobe and old), PackBits (2 bytes for a run of 128).
CODEC_MAX_RATIO = {5: 4096, 8: DEFLATE_MAX_RATIO, 32946: DEFLATE_MAX_RATIO, 32773: 64}
#: Pillow's own limit on decoded pixels (decompression bombs) is kept as it is.
IMAGECODECS_HINT = "install the decoders with `pip install imagecodecs`"


class ImageFileError(ValueError):
    """The file cannot be read as one image plane; the message names the file and the fix."""


@dataclass(frozen=True)
class PlaneInfo:
    """What was read: the file's axes and shape, and which plane/channel was taken."""

    path: Path
    axes: str
    shape: tuple[int, ...]
    plane: dict[str, int] = field(default_factory=dict)
    channel: int | None = None


def _parse_plane(plane: int | Mapping[str, int] | None, free_axes: list[tuple[str, int]], path: Path) -> dict[str, int]:
    """Turn the user's plane choice into an index for every non-plane axis."""
    names = [a for a, _ in free_axes]
    if plane is None:
        chosen: dict[str, int] = {}
    elif isinstance(plane, int):
        if not free_axes:
            raise ImageFileError(f"{path.name}: is a single plane (no Z/T/... axis); drop --plane")
        if len(free_axes) != 1:
            raise ImageFileError(
                f"{path.name}: has axes {''.join(names) or 'none'} besides the plane; "
                f"choose with named indices, e.g. --plane {','.join(f'{a}=0' for a in names) or 'none'}"
            )
        chosen = {names[0]: plane}
    else:
        chosen = {k.upper(): int(v) for k, v in plane.items()}
        unknown = set(chosen) - set(names)
        if unknown:
            raise ImageFileError(
                f"{path.name}: no axis {', '.join(sorted(unknown))}; its non-plane axes are {''.join(names) or 'none'}"
            )
    missing = [(a, n) for a, n in free_axes if a not in chosen and n > 1]
    if missing:
        raise ImageFileError(
            f"{path.name}: is a stack with axes {''.join(names)} (sizes {', '.join(f'{a}={n}' for a, n in free_axes)}); "
            f"choose the plane, e.g. --plane {','.join(f'{a}=0' for a, _ in missing)}"
        )
    for a, n in free_axes:
        i = chosen.setdefault(a, 0)
        if not 0 <= i < n:
            raise ImageFileError(f"{path.name}: {a}={i} is out of range; {a} has {n} entries (0..{n - 1})")
    return chosen


def _read_tiff(path: Path, plane: int | Mapping[str, int] | None, channel: int | None) -> tuple[np.ndarray, PlaneInfo]:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for damaged files
        raise ImageFileError(f"{path.name}: not a readable TIFF file ({str(exc)[:200]})") from exc
    try:
        with tif:
            return _read_series(path, tif, plane, channel)
    except ImageFileError:
        raise
    except Exception as exc:  # damaged tags and pages surface late, when the series is built
        raise ImageFileError(
            f"{path.name}: not a readable TIFF file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _read_series(path: Path, tif, plane, channel) -> tuple[np.ndarray, PlaneInfo]:
    # Count the pages first: it walks the page chain once and stops at a page that points back to
    # an earlier one (a damaged file); building the series before that can walk such a loop forever.
    len(tif.pages)
    if not tif.series or not tif.series[0].pages:
        raise ImageFileError(f"{path.name}: not a readable TIFF file (it holds no image)")
    series = tif.series[0]
    axes, shape = series.axes.upper(), tuple(series.shape)
    page_axes = series.pages[0].axes.upper() if series.pages and series.pages[0] is not None else axes[-2:]
    lead = axes[: len(axes) - len(page_axes)]
    if not _PLANE_AXES <= set(page_axes):
        raise ImageFileError(f"{path.name}: unsupported TIFF layout (axes {axes}); save it as a plain (Z/T/C)YX stack")
    channel_axis = "C" if "C" in lead else None
    free = [(a, n) for a, n in zip(lead, shape[: len(lead)], strict=True) if a != channel_axis]
    chosen = _parse_plane(plane, free, path)
    samples = _SAMPLE_AXIS in page_axes
    n_channels = shape[lead.index("C")] if channel_axis else 1
    n_samples = shape[axes.index(_SAMPLE_AXIS)] if samples else 1
    # Without a C axis, the samples of a page (RGB, or planar "SYX" stacks) are the channels.
    n_pickable = n_channels if channel_axis else n_samples
    if channel is not None and not 0 <= channel < n_pickable:
        raise ImageFileError(f"{path.name}: channel {channel} is out of range; it has {n_pickable} channel(s)")
    if samples and n_channels > 1 and channel is None:
        raise ImageFileError(f"{path.name}: has both colour samples and channels; choose one with --channel")
    lead_shape = shape[: len(lead)]
    channels = [channel] if channel is not None and channel_axis else list(range(n_channels))
    planes = []
    for c in channels:
        index = tuple(c if a == channel_axis else chosen[a] for a in lead)
        page = int(np.ravel_multi_index(index, lead_shape)) if lead else 0
        data = _read_page(path, series.pages[page])  # reads this page only
        if samples:
            data = np.moveaxis(data, page_axes.index(_SAMPLE_AXIS), -1)  # samples last
            if channel is not None and not channel_axis:
                data = data[..., channel]
        planes.append(data)
    data = planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)
    if data.ndim not in (2, 3) or data.size == 0:
        raise ImageFileError(f"{path.name}: not a readable TIFF file (its first image has shape {data.shape})")
    return data, PlaneInfo(path, axes, shape, chosen, channel)


def _read_page(path: Path, page) -> np.ndarray:
    """Decode one TIFF page after checking its declared size against the stored bytes."""
    try:
        key = getattr(page, "keyframe", None) or page  # a TiffFrame shares its tags with a keyframe
        pixels = float(np.prod(key.shape, dtype=np.float64))
        declared = int(pixels * np.dtype(key.dtype).itemsize)
        packed = int(pixels * max(int(key.bitspersample), 1) / 8)  # as stored (1-bit images pack)
        stored = int(sum(page.databytecounts))
        compressed = int(key.compression) != 1
        file_size = path.stat().st_size
        beyond = any(
            int(o) + int(c) > file_size for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)
        )
    except Exception as exc:  # tifffile raises several types for damaged tags
        raise ImageFileError(f"{path.name}: not a readable TIFF file ({str(exc)[:200]})") from None
    if declared > MAX_PLANE_BYTES:
        raise ImageFileError(
            f"{path.name}: a plane of shape {page.shape} ({declared / 2**30:.1f} GiB) is larger "
            f"than {MAX_PLANE_BYTES // 2**30} GiB; crop or tile the image first"
        )
    if beyond:  # reading such a strip would first allocate its declared size
        raise ImageFileError(
            f"{path.name}: the image data of a plane lies beyond the end of the file; the file is "
            "damaged or truncated"
        )
    codec_ratio = CODEC_MAX_RATIO.get(int(key.compression))
    if codec_ratio is not None and declared > stored * codec_ratio + 2**16:
        raise ImageFileError(
            f"{path.name}: a plane of shape {key.shape} needs {declared:,} bytes, more than its "
            f"{stored:,} compressed bytes can hold; the file is damaged or truncated"
        )
    if (compressed and declared > stored * MAX_EXPANSION + SMALL_PLANE_BYTES) or (
        not compressed and packed > stored
    ):
        raise ImageFileError(
            f"{path.name}: a plane of shape {page.shape} needs {declared:,} bytes but the file "
            f"stores only {stored:,} for it; the file is damaged or truncated"
        )
    try:
        return page.asarray()
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "imagecodecs" in message:
            raise ImageFileError(
                f"{path.name}: its {_compression(key)} compression needs the 'imagecodecs' "
                f"package; {IMAGECODECS_HINT}"
            ) from None
        raise ImageFileError(f"{path.name}: not a readable TIFF file ({message[:200]})") from None


def _compression(page) -> str:
    try:
        return page.compression.name
    except AttributeError:
        return str(getattr(page, "compression", "this"))


def _check_png_size(path: Path, img) -> None:
    """A PNG cannot hold more than :data:`DEFLATE_MAX_RATIO` times its size (deflate's own limit)."""
    if img.format != "PNG":
        return
    width, height = img.size
    bands = len(img.getbands())
    declared = height * (1 + width * bands * (2 if img.mode.startswith("I;16") else 1))
    if declared > DEFLATE_MAX_RATIO * path.stat().st_size + 2**16:
        raise ImageFileError(
            f"{path.name}: declares {width} x {height} pixels, more than its {path.stat().st_size:,} "
            "bytes can hold; the file is damaged or truncated"
        )


def _read_pil(path: Path) -> tuple[np.ndarray, PlaneInfo]:
    from PIL import Image, UnidentifiedImageError

    try:
        # From memory: Pillow asks the file for as many bytes as a chunk declares, and a file object
        # allocates that much before it finds the file shorter; a BytesIO returns what there is.
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            _check_png_size(path, img)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            data = np.asarray(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageFileError(f"{path.name}: not a readable image ({exc})") from exc
    except Exception as exc:  # decompression bombs, damaged chunks, odd modes
        raise ImageFileError(f"{path.name}: not a readable image ({type(exc).__name__}: {str(exc)[:200]})") from None
    axes = "YX" if data.ndim == 2 else "YXS"
    return data, PlaneInfo(path, axes, tuple(data.shape))


def read_plane(
    path: str | Path,
    plane: int | Mapping[str, int] | None = None,
    channel: int | None = None,
) -> tuple[np.ndarray, PlaneInfo]:
    """Read one plane, (H, W) or (H, W, C), from a TIFF/PNG/JPEG file."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{path}: no such file")
    name = path.name.lower()
    if any(name.endswith(s) for s in _TIFF_SUFFIXES):
        return _read_tiff(path, plane, channel)
    if path.suffix.lower() in _PIL_SUFFIXES:
        if plane not in (None, 0, {}):
            raise ImageFileError(f"{path.name}: a {path.suffix} file has a single plane; drop --plane")
        data, info = _read_pil(path)
        if channel is not None:
            if data.ndim != 3 or not 0 <= channel < data.shape[-1]:
                raise ImageFileError(f"{path.name}: channel {channel} is out of range for shape {data.shape}")
            data = data[..., channel]
        return data, info
    raise ImageFileError(f"{path.name}: unsupported file type {path.suffix!r}; use TIFF, PNG or JPEG")


def parse_plane_arg(text: str | None) -> int | dict[str, int] | None:
    """Parse the CLI's `--plane` value: `3` or `Z=3,T=0`."""
    if text is None or text == "":
        return None
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    out: dict[str, int] = {}
    for part in text.split(","):
        axis, sep, value = part.partition("=")
        if not sep or not axis.strip().isalpha() or not value.strip().lstrip("-").isdigit():
            raise ImageFileError(f"--plane {text!r}: expected an index like 3 or axis indices like Z=3,T=0")
        out[axis.strip().upper()] = int(value)
    return out
