"""Helpers of the serve tests: a `medplib serve` subprocess, and waiting for an idle server.

(A module of its own, not conftest.py: test modules import these names, and every test folder has a
conftest.py of its own.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

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
