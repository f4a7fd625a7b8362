"""``simexplain explain A B --correspondence``: which part of a pair matches which."""

import os

import pytest
import torch
from PIL import Image

from command_line import assert_one_line_error, run
from image_files import sized, write_image
from simexplain import explain_correspondence
from simexplain.apps.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pair(tmp_path):
    return [write_image(tmp_path / f"img{i}.png", i) for i in range(2)]


def test_writes_the_figure_and_prints_the_strongest_match(tmp_path, pair, capsys):
    out = tmp_path / "figs" / "matches.png"
    code, stdout, err = run(capsys, "explain", *pair, "--labels", 0, 0, "--model",
                            "timm:resnet10t", "--size", 64, "--correspondence",
                            "--matches", 5, "--out", out, "--dpi", 40)
    assert code == 0, err
    with Image.open(out) as figure:
        assert figure.format == "PNG"
    assert os.listdir(out.parent) == ["matches.png"]
    torch.manual_seed(0)  # the CLI's model: the same seed, preprocessing and call
    model = load_model("timm:resnet10t")
    pre = sized(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    expected = explain_correspondence(model, pair[0], pair[1], transform=pre.transform)
    (first,), (second,), _ = (part[:1].tolist() for part in expected.matches(1))
    assert stdout.splitlines()[0] == (
        f"correspondence at layer 'layer4' (exact): similarity {expected.score:.3g}; the "
        f"strongest match joins pixel {tuple(first)} of the first image to {tuple(second)} "
        f"of the second ({float(expected.matrix.max()):.3g})")


@pytest.mark.parametrize("extra, message", [
    (["--method", "sam"], "leave out --method"),
    (["--matches", "0"], "--matches must be at least 1"),
])
def test_options_it_cannot_use_are_refused(tmp_path, pair, capsys, extra, message):
    out = tmp_path / "matches.png"
    code, _, err = run(capsys, "explain", *pair, "--model", "timm:resnet10t", "--size", 64,
                       "--correspondence", *extra, "--out", out)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_a_pair_only(tmp_path, pair, capsys):
    third = write_image(tmp_path / "img2.png", 2)
    code, _, err = run(capsys, "explain", *pair, third, "--model", "timm:resnet10t",
                       "--correspondence", "--out", tmp_path / "m.png")
    assert_one_line_error(code, err, "--correspondence explains a pair; got 3 images")


def test_onnx_models_are_refused_before_loading(tmp_path, pair, capsys):
    code, _, err = run(capsys, "explain", *pair, "--model", str(tmp_path / "reid.onnx"),
                       "--correspondence", "--out", tmp_path / "m.png")
    assert_one_line_error(code, err, "an ONNX model does not expose")
