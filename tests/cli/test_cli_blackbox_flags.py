"""``--n-masks``, ``--window`` and ``--stride`` reach the black-box method of
``explain-dir``, ``report`` and ``retrieve`` as they reach ``explain``'s, and a flag the
chosen method does not take is refused in one line, before the model loads. The model is
a linear ONNX graph (skipped without the onnx extra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from command_line import assert_one_line_error, run
from onnx_linear import save_linear
from simexplain import GalleryIndex
from simexplain.apps.onnx_model import OnnxModel
from simexplain.cli.parser import UsageError, build_parser

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # fixed in the graph: the command line reads it
FLAGS = {"n_masks", "window", "stride"}
COMMANDS = ["explain-dir", "report", "retrieve"]


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    weights = np.random.default_rng(0).standard_normal((3 * SIZE * SIZE, 6))
    return save_linear(tmp_path_factory.mktemp("onnx") / "linear.onnx", weights, size=SIZE)


@pytest.fixture
def explained(monkeypatch):
    """Per ``GalleryIndex.explain`` call: the black-box options it got, its maps' grid,
    the rows the model embedded meanwhile, and its pool of perturbed images (the queries
    and the gallery images they matched)."""
    rows = [0]
    run_model, explain = OnnxModel._run, GalleryIndex.explain

    def counted(self, array):
        rows[0] += len(array)
        return run_model(self, array)

    def spy(self, queries, top_k=5, method=None, labels=None, **options):
        before = rows[0]
        result = explain(self, queries, top_k, method, labels, **options)
        calls.append({"options": {k: v for k, v in options.items() if k in FLAGS},
                      "grid": tuple(result.gallery_maps.shape[-2:]), "rows": rows[0] - before,
                      "pool": len(result) + len(torch.unique(result.indices))})
        return result

    calls: list[dict] = []
    monkeypatch.setattr(OnnxModel, "_run", counted)
    monkeypatch.setattr(GalleryIndex, "explain", spy)
    return calls


def run_command(capsys, command, model, folders, out, *flags):
    """``command`` over the query and gallery folders (``retrieve``: after ``index``)."""
    queries, gallery = folders
    common = ["--top-k", 2, "--model", model, "--no-progress", *flags]
    if command == "retrieve":
        code, _, err = run(capsys, "index", gallery, "--model", model, "--out", out / "index",
                           "--no-progress")
        assert code == 0, err
        where = ["--index", out / "index", "--no-report"]
    else:
        where = ["--gallery", gallery] + (["--dpi", 30] if command == "explain-dir" else
                                          ["--no-point-maps"])
    code, _, err = run(capsys, command, queries, *where, "--out", out / "out", *common)
    assert code == 0, err


@pytest.mark.parametrize("command", COMMANDS)
def test_window_and_stride_reach_sbsm(linear, retrieval_folders, tmp_path, capsys, explained,
                                      command):
    run_command(capsys, command, linear, retrieval_folders, tmp_path, "--method", "sbsm",
                "--window", 16, "--stride", 16)
    assert [(c["options"], c["grid"]) for c in explained] == [
        ({"window": 16, "stride": 16}, (2, 2))]  # the default windows give an 8 x 8 grid


@pytest.mark.parametrize("command", COMMANDS)
def test_n_masks_reaches_rise(linear, retrieval_folders, tmp_path, capsys, explained, command):
    for n_masks in (2, 5):
        run_command(capsys, command, linear, retrieval_folders, tmp_path / str(n_masks),
                    "--method", "rise", "--n-masks", n_masks)
    few, many = explained
    assert few["options"] == {"n_masks": 2} and many["options"] == {"n_masks": 5}
    assert few["pool"] == many["pool"] > 2
    # each image of the pool is embedded once per mask: 3 more masks, 3 more rows each
    assert many["rows"] - few["rows"] == 3 * few["pool"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flags, message", [
    (["--window", 5], "--window is for --method sbsm; --method contribution takes no window"),
    (["--method", "rise", "--stride", 3],
     "--stride is for --method sbsm; --method rise takes no stride"),
    (["--method", "sbsm", "--n-masks", 4],
     "--n-masks is for --method rise; --method sbsm takes no n masks"),
])
def test_a_flag_the_method_does_not_take_is_refused_before_loading(tmp_path, capsys, command,
                                                                   flags, message):
    where = ["--index", tmp_path] if command == "retrieve" else ["--gallery", tmp_path]
    # an unknown model would fail the load: the refusal comes first
    code, _, err = run(capsys, command, tmp_path, *where, "--out", tmp_path / "out", *flags,
                       "--model", "timm:resnet5O")
    assert_one_line_error(code, err, message)


def test_index_runs_no_method_and_takes_no_method_flags():
    parser = build_parser()
    wheres = {"explain": ["a", "b"], "explain-dir": ["q", "--gallery", "g", "--out", "o"],
              "report": ["q", "--gallery", "g", "--out", "o"],
              "retrieve": ["q", "--index", "i", "--out", "o"]}
    for command, where in wheres.items():
        args = parser.parse_args([command, *where, "--model", "m", "--n-masks", "3",
                                  "--window", "4", "--stride", "2"])
        assert (args.n_masks, args.window, args.stride) == (3, 4, 2)
    with pytest.raises(UsageError, match="unrecognized arguments: --window 4"):
        parser.parse_args(["index", "g", "--model", "m", "--out", "o", "--window", "4"])
