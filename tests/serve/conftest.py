"""A real `medplib serve` process on a free loopback port, with a tiny random model.

The server runs as ``python -m napari_medplib serve`` in a subprocess (no transport mocks); the
fixture reads the address from the line it prints and stops it in the finalizer. The tiny model's
end-of-answer token is one it never picks, so answers run to ``max_new_tokens``: a test decides how
long an answer takes, and a cancelled one cannot finish by itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """One ``medplib serve`` subprocess; ``url`` once it listens."""

    def __init__(self, folder: Path, token_file: Path, *extra: str) -> None:
        self.folder, self.token_file, self.extra = folder, token_file, extra
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.lines: list[str] = []

    def start(self, port: int = 0, timeout: float = 90.0) -> ServerProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "napari_medplib", "serve", "--model", str(self.folder), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--token-file", str(self.token_file), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        found = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                match = LISTENING.search(line)
                if match:
                    self.url = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("medplib serve did not start:\n" + "\n".join(self.lines))
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def rss(self) -> int:
        """Resident memory of the server process (bytes)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("serve") / "tiny", eos_token_id=906)


@pytest.fixture(scope="session")
def server(tiny_folder, tmp_path_factory):
    """The shared server: 16 MiB uploads at most, so the size tests need no big buffers."""
    token_file = tmp_path_factory.mktemp("serve-token") / "token"
    proc = ServerProcess(tiny_folder, token_file, "--max-upload-mb", "16").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def local(tiny_folder):
    """The same model in this process, for remote == local comparisons."""
    from napari_medplib.engine import Session

    session = Session.load(tiny_folder, device="cpu")
    yield session
    session.close()


@pytest.fixture
def remote(server):
    from napari_medplib.engine import Session

    session = Session.connect(server.url, token=server.token, timeout=60)
    yield session
    session.close()


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    img = (rng.random((64, 80)) * 500).astype(np.uint16)
    img[10:20, 10:22] += 3000
    return img


def wait_idle(url: str, within: float) -> dict:
    """/health once the model is idle with an empty queue; fails after ``within`` seconds."""
    import httpx

    deadline = time.monotonic() + within
    while True:
        health = httpx.get(url + "/health", timeout=5).json()
        if not health["busy"] and health["queue"] == 0:
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {within} s: {health}")
        time.sleep(0.02)
