"""``--method``: every registered method, decompositions included; ``--point`` for
point-specific maps; methods that need an input the command line cannot give are refused
in one line, before the model loads."""

import csv
import os

import pytest
import torch
from PIL import Image

from command_line import assert_one_line_error, run
from image_files import sized, write_image
from simexplain import explain
from simexplain.apps.models import load_model
from simexplain.cli.parser import UsageError, build_parser
from simexplain.methods import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ["--model", "torchvision:resnet18", "--size", "128"]  # layer4: a 4x4 grid


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / f"pic{i}.png", 10 + i) for i in range(3)]


def python_explanation(images, labels, size=128, **options):
    """The same model (same seed), preprocessing and call in Python."""
    torch.manual_seed(0)
    model = load_model("torchvision:resnet18")
    return explain(model, images, labels, transform=sized(size=size).transform, **options)


def score_line(exp):
    scores = ", ".join(f"{r} {float(s):.3g}" for r, s in zip(exp.roles, exp.scores[0]))
    return f"{exp.kind.replace('_', ' ')} explained at layer 'layer4': scores {scores}"


def test_every_registered_method_is_a_choice():
    parser = build_parser()
    for name in METHODS:
        assert parser.parse_args(["explain", "a", "b", "--model", "m", "--method", name]).method \
            == name
    with pytest.raises(UsageError, match="invalid choice: 'gradcam'.*'stylianou'"):
        parser.parse_args(["explain", "a", "b", "--model", "m", "--method", "gradcam"])


def test_a_decomposition_writes_its_figure(tmp_path, images, capsys):
    out = tmp_path / "stylianou.png"
    code, stdout, err = run(
        capsys, "explain", *images, "--method", "stylianou", *MODEL, "--out", out, "--dpi", 40
    )
    assert code == 0, err
    with Image.open(out) as figure:
        assert figure.format == "PNG"
    exp = python_explanation(images, None, method="stylianou")
    assert stdout.splitlines() == [score_line(exp), f"wrote {out}"]
    # the anchor's score is its share of the margin, cos(a, p) - cos(a, n)
    unit = exp.embeddings[0]
    margin = unit[0] @ unit[1] - unit[0] @ unit[2]
    assert float(exp.scores[0, 0]) == pytest.approx(float(margin), abs=1e-5)


def test_point_specific_takes_a_point(tmp_path, images, capsys):
    out = tmp_path / "point.png"
    code, stdout, err = run(
        capsys, "explain", *images[:2], "--labels", 1, 1, "--method", "point_specific",
        "--point", 100, 20, *MODEL, "--out", out, "--dpi", 40,
    )  # fmt: skip
    assert code == 0, err
    exp = python_explanation(images[:2], [1, 1], method="point_specific", point=(100, 20))
    assert stdout.splitlines()[0] == score_line(exp)
    first = exp.raw_maps[0, 0]  # only the cell of (100, 20) on the 4x4 grid: row 3, col 0
    assert torch.count_nonzero(first) == 1 and float(first[3, 0]) != 0


@pytest.mark.parametrize("command", ["explain", "explain-dir", "report"])
def test_a_method_that_needs_a_trained_head_is_refused_before_loading(tmp_path, images,
                                                                     capsys, command):
    where = [images[0], images[1], "--labels", 0, 0] if command == "explain" else [
        tmp_path, "--gallery", tmp_path, "--out", tmp_path / "out"]
    # an unknown model would fail the load: the method is refused first
    code, _, err = run(capsys, command, *where, "--method", "bce_gradcam",
                       "--model", "timm:resnet5O")
    assert_one_line_error(
        code, err, "method 'bce_gradcam' needs head=, a trained", "train_pair_head",
        "the command line cannot give it", "choose another --method",
    )


def test_point_is_refused_for_other_methods(images, capsys):
    code, _, err = run(capsys, "explain", *images[:2], "--labels", 0, 0, "--point", 3, 4,
                       "--model", "timm:resnet5O")
    assert_one_line_error(code, err, "--point is for --method point_specific")


def test_explain_dir_with_a_decomposition(tmp_path, retrieval_folders, capsys):
    queries, gallery = retrieval_folders
    out = tmp_path / "results"
    code, stdout, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 2, "--out", out,
        "--method", "stylianou", "--model", "torchvision:resnet18", "--size", 64, "--dpi", 30,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["matches.csv", "q0.png", "q1.png"]
    rows = list(csv.DictReader((out / "matches.csv").open()))
    assert [r["gallery"] for r in rows if r["query"] == "q1.png"][0] == "copy_of_q1.png"


@pytest.mark.parametrize("name, flags, grid", [("rise", ["--n-masks", 6], (48, 48)),
                                               ("sbsm", ["--window", 24, "--stride", 24],
                                                (2, 2))])
def test_a_black_box_method_writes_its_figure(tmp_path, images, capsys, name, flags, grid):
    out = tmp_path / f"{name}.png"
    code, stdout, err = run(capsys, "explain", *images[:2], "--labels", 4, 4, "--method", name,
                            *flags, "--model", "torchvision:resnet18", "--size", 48,
                            "--out", out, "--dpi", 30)
    assert code == 0, err
    with Image.open(out) as figure:
        assert figure.format == "PNG"
    options = dict(zip(["n_masks"] if name == "rise" else ["window", "stride"], flags[1::2]))
    exp = python_explanation(images[:2], [4, 4], size=48, method=name, **options)
    assert exp.layer == "" and tuple(exp.raw_maps.shape[-2:]) == grid
    scores = ", ".join(f"{r} {float(s):.3g}" for r, s in zip(exp.roles, exp.scores[0]))
    assert stdout.splitlines() == [
        f"same pair explained by black-box method {name!r}: scores {scores}", f"wrote {out}"]


@pytest.mark.parametrize("argv, message", [
    (["explain", "a.png", "b.png", "--labels", 0, 0, "--n-masks", 5],
     "--n-masks is for --method rise; --method contribution takes no n masks"),
    (["explain", "a.png", "b.png", "--labels", 0, 0, "--method", "rise", "--window", 5],
     "--window is for --method sbsm; --method rise takes no window"),
])
def test_black_box_flags_are_refused_before_loading(capsys, argv, message):
    # an unknown model would fail the load: the refusal comes first
    code, _, err = run(capsys, *argv, "--model", "timm:resnet5O")
    assert_one_line_error(code, err, message)
