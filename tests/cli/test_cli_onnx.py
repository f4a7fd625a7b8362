"""``--model reid.onnx``: the default black-box method with a one-line note, the export's
image size, one-line refusals of gradient methods and PyTorch-only flags, and ``index`` /
``retrieve`` with an ONNX model. The model is exported here (skipped without the onnx
extra)."""

from __future__ import annotations

import csv
import json

import pytest

from command_line import assert_one_line_error, run
from image_files import sized, write_image, write_labelled_folders
from onnx_export import exported_resnet
from simexplain import explain, load_maps

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # fixed in the export: the command line reads it from the graph


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return exported_resnet(tmp_path_factory.mktemp("onnx"), SIZE)


def test_explain_defaults_to_sbsm_with_a_note(resnet, tmp_path, capsys):
    module, path = resnet
    images = [write_image(tmp_path / f"{i}.png", i) for i in range(2)]
    out = tmp_path / "pair.png"
    code, stdout, err = run(capsys, "explain", *images, "--labels", 3, 3, "--model", path,
                            "--out", out, "--dpi", 30)
    assert code == 0, err
    assert err.splitlines() == [
        f"simexplain: note: {path} is an ONNX model, which has no gradients: its maps come "
        "from the black-box method 'sbsm', which hides parts of each image (64 forward "
        "passes per image by default; --method rise for random masks)"]
    exp = explain(module, images, [3, 3], method="sbsm", transform=sized(size=SIZE).transform)
    scores = ", ".join(f"{r} {float(s):.3g}" for r, s in zip(exp.roles, exp.scores[0]))
    assert stdout.splitlines() == [
        f"same pair explained by black-box method 'sbsm': scores {scores}", f"wrote {out}"]
    assert out.is_file()


@pytest.mark.parametrize("flags, fragments", [
    (["--method", "contribution"],
     ["method 'contribution' needs gradients, and an ONNX model has none: use a black-box "
      "method, --method rise or --method sbsm"]),
    (["--layer", "layer4", "--keep-head"],
     ["--keep-head and --layer are for PyTorch models", "drop them"]),
    (["--size", 64], ["--size 64, but", "takes images of 32 x 32 pixels"]),
])
def test_gradient_methods_and_pytorch_flags_are_refused_in_one_line(resnet, tmp_path, capsys,
                                                                    flags, fragments):
    images = [write_image(tmp_path / f"{i}.png", i) for i in range(2)]
    code, _, err = run(capsys, "explain", *images, "--labels", 0, 0, "--model", resnet[1],
                       *flags, "--out", tmp_path / "x.png")
    assert code == 1
    assert_one_line_error(code, err, *fragments)


def test_index_and_retrieve_with_an_onnx_model(resnet, tmp_path, capsys):
    _, path = resnet
    write_labelled_folders(tmp_path, {"gallery": 3, "queries": 1})
    code, out, err = run(capsys, "index", tmp_path / "gallery", "--model", path,
                         "--out", tmp_path / "index")
    assert code == 0 and err == "", err
    assert "indexed 6 images by their embeddings" in out and "black-box methods" in out
    code, out, err = run(capsys, "retrieve", tmp_path / "queries", "--model", path, "--index",
                         tmp_path / "index", "--top-k", 2, "--out", tmp_path / "out",
                         "--no-report")
    assert code == 0, err
    assert len(err.splitlines()) == 1 and "black-box method 'sbsm'" in err
    assert "explained 2 queries x top 2 with sbsm as a black box" in out
    assert load_maps(tmp_path / "out" / "maps")["maps"].shape == (4, 2, 8, 8)
    with open(tmp_path / "out" / "matches.csv", newline="") as handle:
        assert {row["method"] for row in csv.DictReader(handle)} == {"sbsm"}
    summary = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert summary["method"] == "sbsm" and summary["layer"] == ""


@pytest.mark.parametrize("command", ["explain-dir", "report"])
def test_explain_dir_and_report_with_an_onnx_model(resnet, retrieval_folders, tmp_path, capsys,
                                                   command):
    queries, gallery = retrieval_folders
    out = tmp_path / "out"
    code, stdout, err = run(capsys, command, queries, "--gallery", gallery, "--top-k", 2,
                            "--model", resnet[1], "--out", out, "--no-progress")
    assert code == 0, err
    assert "black-box method 'sbsm'" in err.splitlines()[0]
    if command == "report":
        assert err.splitlines()[1:] == ["note: no point maps: the model is not a PyTorch "
                                        "module (an ONNX model?): point maps need its layers"]
        assert (out / "index.html").is_file()
    else:
        with open(out / "matches.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 4 and {row["method"] for row in rows} == {"sbsm"}
        assert [r["gallery"] for r in rows if r["query"] == "q1.png"][0] == "copy_of_q1.png"
