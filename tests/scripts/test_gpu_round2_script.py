"""scripts/gpu_round2.sh: valid bash, and every file it runs exists (the run itself needs a GPU;
``SMOKE=1`` runs it anywhere on tiny shapes)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_round2.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses_and_names_existing_files():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    paths = set(re.findall(r"(?:benchmarks|tests)/[\w/]+(?:\.py)?", text))
    assert {"benchmarks/decode.py", "benchmarks/moe_layer.py", "benchmarks/profile_decode.py", "tests/kernels"} <= paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing
