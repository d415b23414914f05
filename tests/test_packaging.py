"""Package metadata, what the wheel and sdist carry, and the README's commands being what CI runs."""

import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import napari_medplib
from napari_medplib import paths

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _requirement(name: str, deps=None) -> str | None:
    for dep in deps if deps is not None else PROJECT["dependencies"]:
        if re.match(rf"{re.escape(name)}\b(?![-_])", dep):
            return dep
    return None


# ---- metadata -----------------------------------------------------------------------------------------
def test_licence_is_spdx_with_its_files():
    assert PROJECT["license"] == "BSD-3-Clause"
    for file in PROJECT["license-files"]:
        text = (ROOT / file).read_text()
        assert "BSD 3-Clause License" in text and "Redistribution and use" in text, file
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # superseded by the expression
    setuptools = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.search(r">=\s*(\d+)", setuptools).group(1)) >= 77  # PEP 639 support


def test_python_versions_and_classifiers_agree():
    assert PROJECT["requires-python"] == ">=3.11"
    minors = sorted(int(c.rsplit(".", 1)[1]) for c in PROJECT["classifiers"]
                    if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert minors and minors[0] == 11
    assert sys.version_info >= (3, 11)


def test_version_has_one_source():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "napari_medplib._version.__version__"}
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", napari_medplib.__version__)
    assert re.search(r"^## \[(Unreleased|\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)


def test_runtime_dependencies():
    deps = PROJECT["dependencies"]
    for needed in ("imagecodecs", "platformdirs", "torch", "safetensors", "sentencepiece", "tifffile"):
        assert _requirement(needed), needed
    for unused in ("protobuf", "npe2", "peft", "napari"):  # napari brings npe2; peft is the train extra's
        assert _requirement(unused) is None, unused
    transformers = _requirement("transformers")
    assert re.search(r">=\s*\d+\.\d+\.\d+", transformers) and "<" in transformers, transformers
    assert len(deps) == len(set(deps))


def test_extras():
    extras = PROJECT["optional-dependencies"]
    assert _requirement("peft", extras["train"])
    assert "napari-medplib[train,batch,serve]" in extras["all"] and _requirement("napari", extras["all"])
    for needed in ("hypothesis", "npe2", "pytest", "napari-medplib[train,batch,serve]"):
        assert any(dep.startswith(needed) for dep in extras["test"]), needed
    assert _requirement("pyarrow", extras["batch"])  # Parquet tables; CSV needs nothing
    for needed in ("fastapi", "uvicorn", "sse-starlette"):
        assert _requirement(needed, extras["serve"]), needed
    for client in ("distributed", "httpx", "httpx-sse"):  # batch and the remote client work from a plain install
        assert _requirement(client), client


def test_peft_is_imported_by_training_only():
    importers = sorted(str(p.relative_to(ROOT / "src")) for p in (ROOT / "src").rglob("*.py")
                       if re.search(r"^\s*(from|import) peft\b", p.read_text(), re.M))
    assert importers and all(p.startswith("napari_medplib/train/") for p in importers), importers


def test_model_cache_is_the_platform_user_cache(monkeypatch, tmp_path):
    from platformdirs import user_cache_path

    assert paths.user_model_dir() == user_cache_path("napari-medplib", appauthor=False) / "models"
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert paths.user_model_dir() == tmp_path / "napari-medplib" / "models"


def test_bundled_model_ships_its_licence_and_card():
    folder = paths.bundled_model_dir()
    assert "BSD 3-Clause License" in (folder / "LICENSE").read_text()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: bsd-3-clause\n")
    assert "synthetic" in card and "docs/model-card.md" in card
    assert (ROOT / "src/napari_medplib/py.typed").is_file()


# ---- docs: the README's commands are CI's, and no doc reads as a diary -------------------------------
def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Develop and test"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readme_commands_with_the_demo_headless():
    commands = _readme_commands()
    assert len(commands) == 2
    install, test = commands
    assert "scripts/setup.sh" in install and "demo" in install and "pytest" in test
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert install + " --headless" in ci
    assert test in ci
    assert ci.index(install + " --headless") < ci.index(test)


def test_readme_starts_with_the_user_and_uses_absolute_links():
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings[:2] == ["Install", "Use"], headings
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert images and all(url.startswith("https://") for url in images), images
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert all(url.startswith("https://") for url in links), [u for u in links if not u.startswith("https://")]
    for url in images + links:  # links into this repository point at files that exist
        match = re.match(r"https://(?:raw\.githubusercontent\.com/napari-medplib/napari-medplib/main|"
                         r"github\.com/napari-medplib/napari-medplib/blob/main)/(.+)", url)
        if match:
            assert (ROOT / match.group(1)).exists(), url


DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_carry_no_machine_paths_or_work_diary(doc):
    text = doc.read_text()
    for pattern in (r"/work/", r"/root/", r"/tmp/", r"/home/\w+", r"\brounds? of work\b", r"\bround \d+\b",
                    r"\bwork session\b", r"\bruns/[\w-]+/"):
        assert not re.search(pattern, text, re.I), (doc.name, pattern)


def test_model_card_structure():
    card = (ROOT / "docs/model-card.md").read_text()
    assert len(card.splitlines()) < 150
    headings = re.findall(r"^## (.+)$", card, re.M)
    for needed in ("Summary", "Intended use and limits", "Training data", "Evaluation", "How to reproduce"):
        assert needed in headings, headings
    assert "ellipse" in card and "Otsu" in card  # real-image figures beside their baselines
    assert (ROOT / "docs/training.md").is_file()


# ---- the built distributions ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """Wheel and sdist built from the tracked files (what a clean checkout builds), without network."""
    pytest.importorskip("build")
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    work = tmp_path_factory.mktemp("dist")
    source = work / "src"
    source.mkdir()
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src, dst = ROOT / name, source / name
        if src.is_symlink() or not src.is_file():
            if src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src.readlink())
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"), str(source)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    wheel = next((work / "dist").glob("*.whl"))
    sdist = next((work / "dist").glob("*.tar.gz"))
    return wheel, sdist


def test_wheel_carries_the_package_model_licences_and_types(dists):
    wheel, _ = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("napari_medplib/napari.yaml", "napari_medplib/py.typed", "napari_medplib/demo.py",
                   "napari_medplib/bundled_model/model.safetensors", "napari_medplib/bundled_model/LICENSE",
                   "napari_medplib/bundled_model/README.md", "napari_medplib/sample_data/nuclei.tif"):
        assert needed in names, needed
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: BSD-3-Clause" in metadata
    assert "Requires-Python: >=3.11" in metadata


def test_sdist_carries_no_tests(dists):
    _, sdist = dists
    names = tarfile.open(sdist).getnames()
    top = names[0].split("/")[0]
    relative = {n[len(top) + 1:] for n in names if "/" in n}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml"} <= relative
    assert "src/napari_medplib/bundled_model/LICENSE" in relative
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in relative)  # none, rather than a part
