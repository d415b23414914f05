"""A server restart, a server gone, a refused token; ``medplib ask/segment --server``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from serve_process import ServerProcess

from napari_medplib.cli import main
from napari_medplib.engine import Session
from napari_medplib.serve.errors import ServerAuthError, ServerUnavailableError


def test_restart_reconnects_and_reuploads(tiny_folder, tmp_path, local, image):
    first = ServerProcess(tiny_folder, tmp_path / "token").start()
    try:
        remote = Session.connect(first.url, token=first.token)
        sent: list[str] = []
        remote.http.event_hooks["request"].append(lambda r: sent.append(r.method))
        before = remote.ask(image, "What is this?", max_new_tokens=6)
        assert sent.count("PUT") == 1
    finally:
        first.stop()
    with pytest.raises(ServerUnavailableError) as gone:  # one clear line naming the server
        remote.segment(image, points=[(15, 15)], point_labels=[1])
    assert first.url in str(gone.value) and "medplib serve" in str(gone.value)
    second = ServerProcess(tiny_folder, tmp_path / "token").start(port=first.port)
    try:
        after = remote.ask(image, "What is this?", max_new_tokens=6)  # new server: the image is sent again
        assert after.text == before.text == local.ask(image, "What is this?", max_new_tokens=6).text
        assert sent.count("PUT") == 2
    finally:
        remote.close()
        second.stop()


def test_refused_token_and_no_server(server, tmp_path):
    with pytest.raises(ServerAuthError) as refused:
        Session.connect(server.url, token="not-the-token")
    assert server.url in str(refused.value) and "token" in str(refused.value)
    assert isinstance(refused.value, ValueError)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError) as gone:
        Session.connect(f"http://127.0.0.1:{port}", token="x", connect_timeout=2)
    assert f"127.0.0.1:{port}" in str(gone.value)
    with pytest.raises(ValueError, match="http://host"):
        Session.connect("ftp://somewhere")


@pytest.fixture
def cli_image(tmp_path, image):
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, image)
    return path


def test_cli_ask_and_segment_with_server(server, local, image, cli_image, tmp_path, capsys):
    token_file = tmp_path / "t"
    token_file.write_text(server.token)
    code = main(["ask", str(cli_image), "What is in the image?", "--server", server.url, "--token-file",
                 str(token_file), "--max-new-tokens", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["text"] == local.ask(image, "What is in the image?", max_new_tokens=8).text
    labels = tmp_path / "labels.tif"
    code = main(["segment", str(cli_image), "--point", "15", "15", "--server", server.url, "--token-file",
                 str(token_file), "--labels-out", str(labels), "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    want = local.segment(image, points=[(15, 15)], point_labels=[1])
    np.testing.assert_array_equal(tifffile.imread(labels) > 0, want.mask)
    assert got["model"] == local.model_name


def test_cli_server_errors_are_one_line(server, cli_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDPLIB_SERVER_TOKEN", "wrong")
    code = main(["ask", str(cli_image), "What?", "--server", server.url])
    err = capsys.readouterr().err
    assert code == 2 and "refused the token" in err and server.url in err and "Traceback" not in err
    code = main(["ask", str(cli_image), "What?", "--server", server.url, "--model", "x"])
    assert code == 2 and "not both" in capsys.readouterr().err


def test_a_server_with_int8_llm_weights_answers(tiny_folder, tmp_path, image):
    """``medplib serve --llm-weights int8``: the model a 24 GB card can hold, served as any other."""
    proc = ServerProcess(tiny_folder, tmp_path / "token", "--llm-weights", "int8").start()
    try:
        with Session.connect(proc.url, token=proc.token) as remote:
            reply = remote.ask(image, "What is this?", max_new_tokens=4)
            assert isinstance(reply.text, str) and reply.finish_reason
    finally:
        proc.stop()
