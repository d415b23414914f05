"""What `medplib serve` + `RemoteSession` add over a local `Session` on the same machine (loopback).

One run, the bundled model on the CPU in both places (the server is a subprocess, the local session
lives in this process; they take turns, so they do not compete for the cores):

* warm ``segment``: one click on the sample plane (embeddings cached), median of N, remote - local;
* time to first token (TTFT) of a warm ``ask`` (image features and prompt prefix cached), remote - local;
* cold image: a new 2048² uint16 plane each time: upload alone (hash + HEAD + PUT + the server's
  hash check), and a cold ``segment`` remote - local (the same SAM work on both sides);
* 8 clients streaming answers at once on one server (+ one more killed mid-answer): every answer
  equal to the local one, none lost, p50 / p95 TTFT.

    python benchmarks/serve_latency.py [--n 20] [--doc docs/serve.md]

``--doc`` rewrites the figures block of that file (between the ``serve-latency`` markers).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

FLOORS_MS = {"warm_segment": 20.0, "ttft": 30.0, "cold_upload": 150.0}
QUESTION = "Please segment the nuclei."


def start_server(token_file: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "napari_medplib", "serve", "--device", "cpu", "--port", "0",
           "--token-file", str(token_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, match.group(1)
    raise RuntimeError("the server did not start")


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def timed(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def ttft(session, image, question: str, max_new_tokens: int) -> tuple[float, str]:
    start = time.perf_counter()
    first: list[float] = []

    def on_text(_piece: str) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    reply = session.ask(image, question, max_new_tokens=max_new_tokens, on_text=on_text, instances=False)
    return first[0], reply.text


def concurrent(url: str, token: str, image, questions: list[str], max_new_tokens: int):
    from napari_medplib.engine import Session

    firsts: dict[int, float] = {}
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(questions) + 1)

    def client(i: int) -> None:
        try:
            with Session.connect(url, token=token) as session:
                session.upload(image)
                barrier.wait()
                start = time.perf_counter()
                pieces = []
                for piece in session.ask_stream(image, questions[i], max_new_tokens=max_new_tokens, instances=False):
                    if not pieces:
                        firsts[i] = time.perf_counter() - start
                    pieces.append(piece)
                answers[i] = "".join(pieces)
        except BaseException as exc:  # reported
            errors.append(exc)
            barrier.abort()

    def killed() -> None:
        with Session.connect(url, token=token) as session:
            barrier.wait()
            for _ in session.ask_stream(image, "Describe the image.", max_new_tokens=200):
                break

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    threads.append(threading.Thread(target=killed))
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return firsts, answers, errors, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="repetitions of each warm measurement")
    parser.add_argument("--doc", default=None, help="write the figures into this Markdown file")
    args = parser.parse_args()

    import tifffile

    from napari_medplib._sample_data import SAMPLE_DIR
    from napari_medplib.engine import Session

    sample = tifffile.imread(SAMPLE_DIR / "nuclei.tif")
    point = [(sample.shape[0] // 2, sample.shape[1] // 2)]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "token")
        try:
            token = (Path(tmp) / "token").read_text().strip()
            local = Session.load(None, device="cpu")
            remote = Session.connect(url, token=token)
            results = measure(local, remote, url, token, sample, point, args.n)
        finally:
            proc.terminate()
            proc.wait(15)
    text = report(results, sample.shape, str(sample.dtype))
    print(text)
    if args.doc:
        doc = Path(args.doc)
        body = doc.read_text()
        begin, end = "<!-- serve-latency:begin -->", "<!-- serve-latency:end -->"
        if begin in body and end in body:
            body = body[: body.index(begin) + len(begin)] + "\n" + text + "\n" + body[body.index(end):]
            doc.write_text(body)
            print(f"figures written to {doc}")
    return 0


def measure(local, remote, url: str, token: str, sample, point, n: int) -> dict:
    out: dict = {}
    # warm segment: same plane, embeddings cached on both sides
    for session in (local, remote):
        session.segment(sample, points=point, point_labels=[1])
    same = np.array_equal(local.segment(sample, points=point, point_labels=[1]).mask,
                          remote.segment(sample, points=point, point_labels=[1]).mask)
    loc, rem = [], []
    for _ in range(n):  # interleaved, so drifts in machine load hit both
        loc += timed(lambda: local.segment(sample, points=point, point_labels=[1]), 1)
        rem += timed(lambda: remote.segment(sample, points=point, point_labels=[1]), 1)
    out["warm_segment"] = (median_ms(loc), median_ms(rem), same)

    # time to first token, warm (features and prompt prefix cached)
    for session in (local, remote):
        session.ask(sample, QUESTION, max_new_tokens=4, instances=False)
    loc, rem, equal = [], [], True
    for _ in range(n):
        t_local, text_local = ttft(local, sample, QUESTION, 8)
        t_remote, text_remote = ttft(remote, sample, QUESTION, 8)
        loc.append(t_local)
        rem.append(t_remote)
        equal &= text_local == text_remote
    out["ttft"] = (median_ms(loc), median_ms(rem), equal)

    # cold 2048² uint16 plane: upload alone, and a cold segment on both sides
    rng = np.random.default_rng(0)
    uploads, cold_local, cold_remote = [], [], []
    for _ in range(max(3, n // 4)):
        plane = rng.integers(0, 4096, (2048, 2048), dtype=np.uint16)
        uploads += timed(lambda: remote.upload(plane), 1)
        other = rng.integers(0, 4096, (2048, 2048), dtype=np.uint16)
        cold_local += timed(lambda: local.segment(other, points=[(1024, 1024)], point_labels=[1]), 1)
        cold_remote += timed(lambda: remote.segment(other, points=[(1024, 1024)], point_labels=[1]), 1)
    out["cold_upload"] = (0.0, median_ms(uploads), True)
    out["cold_segment"] = (median_ms(cold_local), median_ms(cold_remote), True)

    # 8 clients at once (+ one killed mid-answer)
    questions = [QUESTION, "What is in the image?", "How many nuclei are there?", "Describe the image.",
                 "Is there a nucleus?", "Where are the cells?", "What stain is this?", "Segment the cells."]
    want = [local.ask(sample, q, max_new_tokens=32, instances=False).text for q in questions]
    firsts, answers, errors, wall = concurrent(url, token, sample, questions, 32)
    ttfts = sorted(firsts.values())
    out["concurrent"] = {
        "clients": len(questions), "answered": len(answers), "errors": [repr(e) for e in errors],
        "identical": all(answers.get(i) == want[i] for i in range(len(questions))),
        "p50_ms": 1000 * ttfts[len(ttfts) // 2] if ttfts else float("nan"),
        "p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(np.ceil(0.95 * len(ttfts))) - 1)] if ttfts else float("nan"),
        "wall_s": wall, "single_ttft_ms": out["ttft"][1],
    }
    return out


def report(results: dict, shape, dtype: str) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Machine: {os.cpu_count()}-core CPU ({cpu}), no GPU; Python {platform.python_version()}, "
        f"the bundled model on the CPU (fp32), torch on 1 thread; server and client on one machine (loopback). "
        f"Sample plane {shape[0]}×{shape[1]} {dtype}.",
        "",
        "| measurement | local | remote | overhead | floor |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"warm_segment": "warm `segment` (1 click, median)", "ttft": "time to first token, warm `ask` (median)",
             "cold_upload": "cold 2048² uint16 plane: upload (hash + HEAD + PUT)",
             "cold_segment": "cold 2048² uint16 plane: first `segment` (median)"}
    for key, name in names.items():
        local_ms, remote_ms, same = results[key]
        floor = FLOORS_MS.get(key)
        overhead = remote_ms - local_ms
        verdict = "" if floor is None else f"≤ +{floor:.0f} ms ({'met' if overhead <= floor else 'NOT met'})"
        local_cell = "—" if key == "cold_upload" else f"{local_ms:.1f} ms"
        lines.append(f"| {name}{'' if same else ' (results differ!)'} | {local_cell} | {remote_ms:.1f} ms | "
                     f"{overhead:+.1f} ms | {verdict} |")
    c = results["concurrent"]
    lines += [
        "",
        f"8 clients streaming 32-token answers at once on one server (+1 client killed after its first token): "
        f"{c['answered']}/{c['clients']} answered, {'all identical to the local answers' if c['identical'] else 'ANSWERS DIFFER'}"
        f", errors: {len(c['errors'])}; TTFT p50 {c['p50_ms']:.0f} ms, p95 {c['p95_ms']:.0f} ms "
        f"(one client alone: {c['single_ttft_ms']:.0f} ms; requests queue on the one model, so the last waits for "
        f"the answers before it); all done in {c['wall_s']:.2f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
