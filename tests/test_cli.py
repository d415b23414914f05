import subprocess
import sys

from napari_medplib.cli import EXIT_BAD_INPUT, main


def test_info_prints_versions_and_paths(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDPLIB_MODEL_PATH", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "napari-medplib 0." in out
    assert "torch 2." in out
    assert "CUDA:" in out
    assert str(tmp_path) in out


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "napari_medplib", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "models are looked for in" in out.stdout


def test_no_command_is_bad_input(capsys):
    assert main([]) == EXIT_BAD_INPUT
