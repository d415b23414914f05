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


# ---- medplib ask / segment ------------------------------------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tifffile  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from napari_medplib.testing import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("cli") / "tiny-medplib")


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    image = (rng.random((60, 80)) * 3000).astype(np.uint16)
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, image)
    return path, image


def _geojson(path, polygons=(), points=()):
    features = [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}
                for ring in polygons]
    features += [{"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": xy}}
                 for xy in points]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _box_ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_ask_json(model_dir, image_file, capsys):
    path, _ = image_file
    rc = main(["ask", str(path), "What is in the image?", "--model", str(model_dir), "--json", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert isinstance(result["text"], str) and result["masks"] == [] and result["model"] == "tiny-medplib"
    assert {"vision", "generate", "total"} <= set(result["timings"])
    assert result["finish_reason"] in ("eos", "stop_string", "max_new_tokens")


def test_ask_with_int8_llm_weights(model_dir, image_file, capsys):
    path, _ = image_file
    rc = main(["ask", str(path), "What is in the image?", "--model", str(model_dir), "--json", "--max-new-tokens", "3",
               "--device", "cpu", "--llm-weights", "int8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert isinstance(json.loads(out)["text"], str)
    with pytest.raises(SystemExit):
        main(["ask", str(path), "What?", "--model", str(model_dir), "--llm-weights", "int4"])


def test_ask_streams_text_and_uses_regions(model_dir, image_file, tmp_path, capsys):
    path, _ = image_file
    regions = _geojson(tmp_path / "r.geojson", [_box_ring(5, 5, 40, 30)], [[60, 50]])
    rc = main(["ask", str(path), "Compare <region1> and <region2>.", "--regions", str(regions),
               "--model", str(model_dir), "--max-new-tokens", "4", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["regions"] == 2
    rc = main(["ask", str(path), "What is it?", "--model", str(model_dir), "--max-new-tokens", "4"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.endswith("\n")


def test_ask_writes_one_label_per_seg(model_dir, image_file, tmp_path, capsys, monkeypatch):
    from napari_medplib.engine import Session

    load = Session.load.__func__

    def load_forcing_seg(cls, *args, **kwargs):
        session = load(cls, *args, **kwargs)
        model = session.model
        bias = np.zeros(model.config.vocab_size, np.float32)
        bias[model.tokenizer.seg_token_id] = 1e4
        import torch

        model.language_model.lm_head.register_forward_hook(lambda m, i, o: o + torch.from_numpy(bias))
        return session

    monkeypatch.setattr(Session, "load", classmethod(load_forcing_seg))
    path, image = image_file
    out_path = tmp_path / "labels.tif"
    rc = main(["ask", str(path), "Segment the cells.", "--model", str(model_dir), "--max-new-tokens", "2",
               "--labels-out", str(out_path), "--json", "--no-instances"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["masks"] == [1, 2] and result["labels_out"] == str(out_path)
    assert result["instances"] == [] and result["objects"] == []
    labels = tifffile.imread(out_path)
    assert labels.shape == image.shape and labels.dtype == np.uint16
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert (labels == 2).sum() == result["mask_areas"][1]  # the later mask wins where they overlap
    assert (labels > 0).sum() >= max(result["mask_areas"])


def test_segment_point_writes_the_same_mask_as_the_session(model_dir, image_file, tmp_path, capsys):
    from napari_medplib.engine import Session

    path, image = image_file
    out_path = tmp_path / "seg.tif"
    rc = main(["segment", str(path), "--point", "20", "30", "--negative", "50", "70", "--model", str(model_dir),
               "--labels-out", str(out_path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["masks"] == [1] and len(result["scores"]) == 1
    (y0, x0, y1, x1), = result["windows"]  # the crop around the positive click (negatives only cut)
    assert y0 <= 20 < y1 and x0 <= 30 < x1
    labels = tifffile.imread(out_path)
    expected = Session.load(model_dir, device="cpu").segment(image, points=[(20, 30), (50, 70)], point_labels=[1, 0])
    np.testing.assert_array_equal(labels == 1, expected.mask)
    assert labels.dtype == np.uint16 and labels.max() <= 1


def test_segment_json_reports_the_crop_sam_saw_on_a_large_image(model_dir, tmp_path, capsys):
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, (np.random.default_rng(1).random((700, 900)) * 3000).astype(np.uint16))
    assert main(["segment", str(path), "--point", "100", "120", "--model", str(model_dir), "--json"]) == 0
    (y0, x0, y1, x1), = json.loads(capsys.readouterr().out)["windows"]
    assert y0 <= 100 < y1 and x0 <= 120 < x1 and (y1 - y0, x1 - x0) != (700, 900)
    assert main(["segment", str(path), "--point", "100", "120", "--model", str(model_dir), "--json",
                 "--window", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == [[0, 0, 700, 900]]


def test_segment_box_and_regions(model_dir, image_file, tmp_path, capsys):
    path, _ = image_file
    assert main(["segment", str(path), "--box", "5", "5", "40", "50", "--model", str(model_dir)]) == 0
    assert "1 mask(s)" in capsys.readouterr().out
    regions = _geojson(tmp_path / "r.geojson", [_box_ring(5, 5, 30, 20), _box_ring(40, 30, 70, 55)])
    out_path = tmp_path / "two.tif"
    rc = main(["segment", str(path), "--regions", str(regions), "--model", str(model_dir), "--multimask",
               "--labels-out", str(out_path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["masks"] == [1, 2]
    assert tifffile.imread(out_path).max() <= 2


def test_labels_use_uint32_beyond_65535_masks():
    from napari_medplib.cli import labels_from_masks

    few = labels_from_masks([np.eye(3, dtype=bool)], (3, 3))
    assert few.dtype == np.uint16 and few.max() == 1
    masks = [np.zeros((2, 2), bool)] * 65535 + [np.ones((2, 2), bool)]
    many = labels_from_masks(masks, (2, 2))
    assert many.dtype == np.uint32 and many.max() == 65536


def _bad_cases(model_dir, image_file, tmp_path):
    path, _ = image_file
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 20, 30), np.uint16), photometric="minisblack", metadata={"axes": "ZYX"})
    outside = _geojson(tmp_path / "outside.geojson", [_box_ring(500, 500, 600, 600)])
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "image.xyz").write_text("x")
    m = ["--model", str(model_dir)]
    return {
        "missing image": ["ask", str(tmp_path / "missing.tif"), "q", *m],
        "unsupported file": ["ask", str(tmp_path / "image.xyz"), "q", *m],
        "stack without plane": ["ask", str(stack), "q", *m],
        "plane out of range": ["segment", str(stack), "--plane", "Z=7", "--point", "1", "1", *m],
        "bad plane syntax": ["segment", str(stack), "--plane", "Z:1", "--point", "1", "1", *m],
        "region outside": ["ask", str(path), "What is <region>?", "--regions", str(outside), *m],
        "missing regions file": ["segment", str(path), "--regions", str(tmp_path / "none.geojson"), *m],
        "invalid model folder": ["ask", str(path), "q", "--model", str(tmp_path / "not_a_model")],
        "missing model folder": ["segment", str(path), "--point", "1", "1", "--model", str(tmp_path / "nope")],
        "point outside": ["segment", str(path), "--point", "100", "5", *m],
        "no prompt": ["segment", str(path), *m],
        "labels not tif": ["segment", str(path), "--point", "1", "1", "--labels-out", str(tmp_path / "x.png"), *m],
        "unknown option": ["segment", str(path), "--bogus", *m],
        "too many region tags": ["ask", str(path), "<region1> <region2>?", *m],
        "bad device": ["ask", str(path), "q", "--device", "tpu", *m],
    }


@pytest.mark.parametrize("case", [
    "missing image", "unsupported file", "stack without plane", "plane out of range", "bad plane syntax",
    "region outside", "missing regions file", "invalid model folder", "missing model folder", "point outside",
    "no prompt", "labels not tif", "unknown option", "too many region tags", "bad device",
])
def test_bad_input_exits_2_with_one_line(case, model_dir, image_file, tmp_path, capsys):
    argv = _bad_cases(model_dir, image_file, tmp_path)[case]
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse errors
        rc = exit_.code
    _out, err = capsys.readouterr()
    assert rc == EXIT_BAD_INPUT, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medplib"), (case, err)
    assert "Traceback" not in err


def test_bad_input_message_names_the_problem(model_dir, image_file, tmp_path, capsys):
    cases = _bad_cases(model_dir, image_file, tmp_path)
    expectations = {
        "missing image": "no such file", "stack without plane": "--plane", "region outside": "outside",
        "invalid model folder": "config.json", "point outside": "outside the image",
    }
    for case, words in expectations.items():
        assert main(cases[case]) == EXIT_BAD_INPUT
        assert words in capsys.readouterr().err, case


def test_cli_subprocess_bad_input_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "napari_medplib", "ask", str(tmp_path / "none.tif"), "q"],
                         capture_output=True, text=True)
    assert out.returncode == EXIT_BAD_INPUT
    assert out.stderr.strip().count("\n") == 0 and "no such file" in out.stderr


def test_plane_of_a_stack_and_png_input(model_dir, tmp_path, capsys):
    from PIL import Image

    stack = np.zeros((3, 30, 40), np.uint16)
    stack[1, 5:20, 5:30] = 1000
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    out_path = tmp_path / "z1.tif"
    assert main(["segment", str(path), "--plane", "Z=1", "--box", "5", "5", "19", "29", "--model", str(model_dir),
                 "--labels-out", str(out_path)]) == 0
    assert tifffile.imread(out_path).shape == (30, 40)
    png = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(png)
    assert main(["ask", str(png), "What is it?", "--model", str(model_dir), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "tiny-medplib"


def test_progress_line_only_on_a_terminal(capsys):
    from napari_medplib.cli import _Progress

    progress = _Progress()
    progress.enabled = False
    progress("loading", 1, 2)
    assert capsys.readouterr().err == ""
    progress.enabled = True
    progress("loading", 1, 2)
    progress("loading", 2, 2)
    err = capsys.readouterr().err
    assert "loading" in err and "2/2" in err and err.endswith("\n")


def test_train_and_eval_are_subcommands(capsys):
    import pytest

    for command in ("train", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"medplib {command}" in capsys.readouterr().out


def test_segment_box_masks_stay_in_the_box_unless_asked(model_dir, tmp_path, capsys):
    """The tiny random model's box mask spills past the box; the CLI cuts it unless --no-clip-to-box."""
    from napari_medplib.engine import Session

    path = tmp_path / "img.tif"
    image = (np.random.default_rng(3).random((80, 100)) * 3000).astype(np.uint16)
    tifffile.imwrite(path, image)
    box = (20, 30, 45, 60)
    session = Session.load(model_dir, device="cpu")
    raw = session.segment(image, box=box, clip_to_box=False).mask
    inside = np.zeros(image.shape, bool)
    inside[20:46, 30:61] = True
    assert (raw & ~inside).any()  # else this test could not tell the two apart
    for flags, expected in (([], raw & inside), (["--no-clip-to-box"], raw)):
        out_path = tmp_path / f"seg{len(flags)}.tif"
        assert main(["segment", str(path), "--box", *map(str, box), "--model", str(model_dir),
                     "--labels-out", str(out_path), *flags]) == 0
        np.testing.assert_array_equal(tifffile.imread(out_path) == 1, expected)


def test_segment_point_masks_keep_the_clicked_piece_unless_asked(model_dir, tmp_path, monkeypatch):
    """``--all-pieces`` reaches ``Session.segment(clicked_pieces=False)``; the default keeps the cut."""
    from napari_medplib.engine import Session

    path = tmp_path / "img.tif"
    tifffile.imwrite(path, (np.random.default_rng(3).random((40, 50)) * 3000).astype(np.uint16))
    seen = []
    real = Session.segment

    def segment(self, image, **kwargs):
        seen.append(kwargs["clicked_pieces"])
        return real(self, image, **kwargs)

    monkeypatch.setattr(Session, "segment", segment)
    for flags in ([], ["--all-pieces"]):
        assert main(["segment", str(path), "--point", "10", "12", "--model", str(model_dir),
                     "--labels-out", str(tmp_path / f"s{len(flags)}.tif"), *flags]) == 0
    assert seen == [True, False]
