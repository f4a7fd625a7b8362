"""The ``simexplain`` command: explain, explain-dir, report errors as one line, the demo.

Commands run in-process through ``simexplain.cli.main`` (fast); one test runs the
installed console script. Models have random weights; nothing touches the network:
downloads are simulated to fail.
"""

import csv
import os
import shutil
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from command_line import assert_one_line_error, run
from image_files import sized, write_image
from networks import conv_net
from simexplain import explain
from simexplain.apps.models import load_model
from simexplain.cli import main
from simexplain.engine import nchw_only
from simexplain.methods import DEFAULT_METHOD

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = ["--size", "64"]


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / f"img{i}.png", i) for i in range(4)]


# --------------------------------------------------------------------------- explain


def test_explain_triplet_writes_the_figure_and_prints_the_scores(tmp_path, images, capsys):
    out = tmp_path / "figs" / "triplet.png"
    code, stdout, err = run(
        capsys, "explain", *images[:3], "--model", "timm:resnet10t", *SIZE, "--out", out,
        "--dpi", 40,
    )  # fmt: skip
    assert code == 0, err
    assert err == ""
    with Image.open(out) as figure:
        assert figure.format == "PNG"
    assert os.listdir(out.parent) == ["triplet.png"]  # no temporary file left behind
    # The same model (same seed), preprocessing and call in Python give the same scores.
    torch.manual_seed(0)
    model = load_model("timm:resnet10t")
    pre = sized(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    exp = explain(model, images[:3], transform=pre.transform)
    expected = ", ".join(f"{r} {float(s):.3g}" for r, s in zip(exp.roles, exp.scores[0]))
    assert stdout.splitlines()[0] == f"triplet explained at layer 'layer4': scores {expected}"


@pytest.mark.parametrize("labels, kind", [([3, 3], "same pair"), ([3, 5], "different pair")])
def test_explain_pair_kind_follows_the_labels(tmp_path, images, capsys, labels, kind):
    out = tmp_path / "pair.pdf"
    code, stdout, err = run(
        capsys, "explain", *images[:2], "--labels", *labels, "--model", "torchvision:resnet18",
        *SIZE, "--layer", "layer3", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert stdout.startswith(f"{kind} explained at layer 'layer3'")
    assert out.read_bytes().startswith(b"%PDF")


def test_explain_quadruplet_from_a_state_dict_checkpoint(tmp_path, images, capsys):
    model = load_model("torchvision:resnet18")
    checkpoint = tmp_path / "weights.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, checkpoint)
    code, stdout, err = run(
        capsys, "explain", *images, "--model", checkpoint, "--arch", "torchvision:resnet18",
        *SIZE, "--out", tmp_path / "quad.png",
    )  # fmt: skip
    assert code == 0, err
    exp = explain(model, images, transform=sized().transform)
    assert f"anchor {float(exp.scores[0, 0]):.3g}," in stdout
    assert stdout.startswith("quadruplet explained")


def test_explain_an_exported_program_end_to_end(tmp_path, images, capsys):
    model_file = exported_program(tmp_path / "model.pt2")
    out = tmp_path / "exported.png"
    code, stdout, err = run(
        capsys, "explain", *images[:3], "--model", model_file, *SIZE, "--out", out, "--dpi", 40
    )
    assert code == 0, err
    assert err == ""
    with Image.open(out) as figure:
        assert figure.format == "PNG"
    with nchw_only():  # as the exported program runs
        exp = explain(conv_net(), images[:3], transform=sized().transform)
    assert exp.layer == "act"
    expected = ", ".join(f"{r} {float(s):.3g}" for r, s in zip(exp.roles, exp.scores[0]))
    assert stdout.splitlines()[0] == f"triplet explained at layer 'act': scores {expected}"


def test_explain_dir_and_report_on_an_exported_program(tmp_path, retrieval_folders, capsys):
    queries, gallery = retrieval_folders
    model = ["--model", exported_program(tmp_path / "model.pt2"), *SIZE, "--batch-size", 3]
    out = tmp_path / "results"
    code, stdout, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 2, "--out", out,
        *model, "--layer", "conv2", "--dpi", 30, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["matches.csv", "q0.png", "q1.png"]
    rows = list(csv.DictReader((out / "matches.csv").open()))
    assert [r["gallery"] for r in rows if r["query"] == "q1.png"][0] == "copy_of_q1.png"
    report = tmp_path / "report"
    code, stdout, err = run(
        capsys, "report", queries, "--gallery", gallery, "--top-k", 2, "--out", report, *model,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert stdout.strip() == f"wrote a report of 2 queries to {report / 'index.html'}"


# --------------------------------------------------------------------------- errors


def text_file(path):
    path.write_text("this is not an image")
    return str(path)


def truncated_image(path):
    write_image(path, 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def state_dict_of(spec, path):
    torch.save(load_model(spec).state_dict(), path)
    return str(path)


def whole_pickled_model(path):
    torch.save(torch.nn.Linear(2, 2), path)
    return str(path)


def exported_program(path, size=64, dynamic=True):
    """conv_net() saved with torch.export for ``size`` px images; returns the path."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    example = torch.randn(2, 3, size, size)
    program = torch.export.export(conv_net(), (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return str(path)


class DictOutput(torch.nn.Module):
    """conv_net() whose embedding comes back in a dict, as Hugging Face models return it."""

    def __init__(self):
        super().__init__()
        self.net = conv_net()

    def forward(self, x):
        embedding = self.net(x)
        return {"norm": embedding.norm(dim=1), "embedding": embedding}


def test_output_picks_the_embedding_on_every_command(tmp_path, images, retrieval_folders,
                                                     capsys, monkeypatch):
    example = torch.randn(2, 3, 64, 64)
    program = torch.export.export(DictOutput().eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    model_file = tmp_path / "dict.pt2"
    torch.export.save(program, str(model_file))
    model = ["--model", model_file, *SIZE]
    code, _, err = run(capsys, "explain", *images[:3], *model, "--out", tmp_path / "no.png")
    assert_one_line_error(code, err, "the model returned a dict with 'norm' (tensor (",
                          "not a tensor of embeddings",
                          "Pick the embedding with --output (e.g. --output embedding")
    code, stdout, err = run(capsys, "explain", *images[:3], *model, "--output", "embedding",
                            "--out", tmp_path / "fig.png", "--dpi", 30)
    assert code == 0, err
    with nchw_only():  # as the exported program runs
        exp = explain(conv_net(), images[:3], transform=sized().transform)
    expected = ", ".join(f"{r} {float(s):.3g}" for r, s in zip(exp.roles, exp.scores[0]))
    assert stdout.splitlines()[0] == f"triplet explained at layer 'net.act': scores {expected}"
    code, _, err = run(capsys, "explain", *images[:3], *model, "--output", "1",
                       "--out", tmp_path / "fig.png")
    assert_one_line_error(code, err, "--output 1 picks nothing from the model's output",
                          "try --output embedding")

    import simexplain.viz.figures as figures

    titles = []
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure", lambda figure, path, dpi=150: titles.append(
        figure._suptitle.get_text()) or real_save(figure, path, dpi))
    queries, gallery = retrieval_folders
    out = tmp_path / "results"
    code, _, err = run(capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 2,
                       "--out", out, *model, "--output", "embedding", "--layer", "net.act",
                       "--dpi", 30, "--no-progress")
    assert code == 0, err
    assert titles == [f"maps: {DEFAULT_METHOD}"] * 2  # every figure names its method
    rows = list(csv.DictReader((out / "matches.csv").open()))
    assert [r["gallery"] for r in rows if r["query"] == "q1.png"][0] == "copy_of_q1.png"
    code, stdout, err = run(capsys, "report", queries, "--gallery", gallery, "--top-k", 2,
                            "--out", tmp_path / "report", *model, "--output", "embedding",
                            "--layer", "net.act", "--no-progress")
    assert code == 0, err
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"Maps: <code>{DEFAULT_METHOD}</code>" in page  # the report names its method


def torchscript_archive(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        torch.jit.trace(conv_net(), torch.randn(2, 3, 64, 64)).save(str(path))
    return str(path)


def truncated_checkpoint(path):
    state_dict_of("torchvision:resnet18", path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return str(path)


ERROR_CASES = {
    "missing image": (
        lambda t, imgs: [str(t / "nope.png"), imgs[1], "--model", "timm:resnet10t"],
        ["image file not found", "nope.png"],
    ),
    "unreadable image": (
        lambda t, imgs: [text_file(t / "x.png"), imgs[1], "--model", "timm:resnet10t"],
        ["cannot read image", "x.png"],
    ),
    "truncated image": (
        lambda t, imgs: [truncated_image(t / "cut.png"), imgs[1], "--model", "timm:resnet10t"],
        ["cannot read image", "truncated"],
    ),
    "unknown timm model": (
        lambda t, imgs: [*imgs[:3], "--model", "timm:resnet5O"],
        ["unknown timm model 'resnet5O'", "did you mean resnet50"],
    ),
    "unknown torchvision model": (
        lambda t, imgs: [*imgs[:3], "--model", "torchvision:resnet19"],
        ["unknown torchvision model 'resnet19'", "resnet18"],
    ),
    "neither name nor file": (
        lambda t, imgs: [*imgs[:3], "--model", "resnet50"],
        ["neither timm:NAME, torchvision:NAME nor an existing checkpoint"],
    ),
    "checkpoint of another architecture": (
        lambda t, imgs: [*imgs[:3], "--model", state_dict_of("torchvision:resnet18", t / "r.pt"),
                         "--arch", "timm:resnet10t"],
        ["does not match timm:resnet10t", "missing", "check --arch"],
    ),  # fmt: skip
    "checkpoint of another size": (
        lambda t, imgs: [*imgs[:3], "--model", state_dict_of("torchvision:resnet18", t / "r.pt"),
                         "--arch", "torchvision:resnet34"],
        ["does not match torchvision:resnet34"],
    ),  # fmt: skip
    "checkpoint without --arch": (
        lambda t, imgs: [*imgs[:3], "--model", state_dict_of("torchvision:resnet18", t / "r.pt")],
        ["holds weights only", "--arch timm:NAME or --arch torchvision:NAME"],
    ),
    "pickled model object": (
        lambda t, imgs: [*imgs[:3], "--model", whole_pickled_model(t / "m.pt")],
        ["never unpickles", "with --arch"],
    ),
    "truncated checkpoint": (
        lambda t, imgs: [*imgs[:3], "--model", truncated_checkpoint(t / "cut.pt"),
                         "--arch", "torchvision:resnet18"],
        ["cannot read checkpoint"],
    ),  # fmt: skip
    "TorchScript archive": (
        lambda t, imgs: [*imgs[:3], "--model", torchscript_archive(t / "model.pt")],
        ["TorchScript archive", "cannot be hooked", "torch.export.export(", "torch.export.save"],
    ),
    "exported with a fixed batch size": (
        lambda t, imgs: [*imgs[:3], "--model", exported_program(t / "m.pt2", dynamic=False)],
        ["fixed batch size of 2", "dynamic_shapes=({0: torch.export.Dim('batch')},)"],
    ),
    "exported for another image size": (
        lambda t, imgs: [*imgs[:3], "--model", exported_program(t / "m.pt2", size=32)],
        ["exported for images of 3x32x32", "got 3x64x64", "--size 32"],
    ),
    "unknown layer": (
        lambda t, imgs: [*imgs[:3], "--model", "torchvision:resnet18", "--layer", "layer9"],
        ["layer9"],
    ),
    "pair without labels": (
        lambda t, imgs: [*imgs[:2], "--model", "torchvision:resnet18"],
        ["a pair needs labels"],
    ),
    "labels do not match": (
        lambda t, imgs: [*imgs[:3], "--labels", "0", "1", "--model", "torchvision:resnet18"],
        ["2 label(s) for 3 images"],
    ),
    "five images": (
        lambda t, imgs: [*imgs, imgs[0], "--model", "torchvision:resnet18"],
        ["got 5 image(s)"],
    ),
    "unknown figure format": (
        lambda t, imgs: [*imgs[:3], "--model", "torchvision:resnet18", "--out", str(t / "o.xyz")],
        ["cannot write figures as 'xyz'"],
    ),
    "missing option": (lambda t, imgs: [*imgs[:3]], ["--model", "--help"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_explain_errors_are_one_line_and_write_nothing(tmp_path, images, capsys, case):
    make_args, fragments = ERROR_CASES[case]
    out = tmp_path / "out" / "fig.png"
    args = make_args(tmp_path, images)
    if "--out" not in args:
        args += ["--out", str(out)]
    code, _, err = run(capsys, "explain", *args, *SIZE)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/o.xyz"))


def test_failed_downloads_are_reported_in_one_line(tmp_path, images, capsys, monkeypatch):
    import timm.models._hub
    import torchvision.models._api

    import simexplain.apps.weights_download as weights

    # the hosts answer, then the download fails (offline, it would not be tried: see below)
    monkeypatch.setattr(weights, "host_reachable", lambda host, timeout=0: True)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def no_hub(*args, **kwargs):
        raise ConnectionError("Failed to establish a new connection: network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)
    cases = (("torchvision:resnet18", "name resolution"), ("timm:resnet10t", "unreachable"))
    for spec, reason in cases:
        out = tmp_path / "out.png"
        code, _, err = run(
            capsys, "explain", *images[:3], "--model", spec, "--pretrained", "--out", out
        )
        assert_one_line_error(
            code, err, f"could not download the pretrained weights of {spec}", reason,
            "leave out --pretrained",
        )  # fmt: skip
        assert not out.exists()


def test_pretrained_without_network_fails_at_once_in_one_line(tmp_path, images, capsys,
                                                              monkeypatch):
    """No minute of Hub retries: the weights are not cached and no host answers."""
    import huggingface_hub.constants
    import timm

    import simexplain.apps.weights_download as weights

    monkeypatch.setattr(weights, "host_reachable", lambda host, timeout=0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("the download was attempted")

    monkeypatch.setattr(timm, "create_model", no_download)
    out = tmp_path / "out.png"
    code, stdout, err = run(
        capsys, "explain", *images[:3], "--model", "timm:resnet10t", "--pretrained", "--out", out
    )
    assert_one_line_error(
        code, err, "could not download the pretrained weights of timm:resnet10t: "
        "huggingface.co cannot be reached (no network access?)", "leave out --pretrained",
    )  # fmt: skip
    assert stdout == "" and not out.exists()


def test_unexpected_errors_are_one_line_too(tmp_path, images, capsys, monkeypatch):
    from simexplain.engine import SimilarityEngine

    def broken(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(SimilarityEngine, "attribute", broken)
    code, _, err = run(capsys, "explain", *images[:3], "--model", "torchvision:resnet18", *SIZE)
    assert_one_line_error(code, err, "unexpected RuntimeError: something broke", "SIMEXPLAIN_DEBUG")
    monkeypatch.setenv("SIMEXPLAIN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="broke"):
        main(["explain", *images[:3], "--model", "torchvision:resnet18", *SIZE])


def test_help_and_demo_help_exit_cleanly(capsys):
    assert main(["--help"]) == 0
    assert "explain-dir" in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out


def test_installed_console_script_reports_offline_downloads(tmp_path, images):
    """The real script, with the Hugging Face hub in offline mode: no request is made."""
    script = shutil.which("simexplain", path=str(Path(sys.executable).parent))
    assert script is not None, "install the package: pip install -e ."
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.update(TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1")
    out = tmp_path / "out.png"
    done = subprocess.run(
        [script, "explain", *images[:3], "--model", "timm:resnet10t", "--pretrained",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert_one_line_error(
        done.returncode, done.stderr, "could not download the pretrained weights of timm:resnet10t"
    )
    assert done.stdout == "" and not out.exists()


# --------------------------------------------------------------------------- explain-dir


def test_explain_dir_writes_figures_and_rankings(tmp_path, retrieval_folders, capsys):
    queries, gallery = retrieval_folders
    out = tmp_path / "results"
    code, stdout, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 3, "--out", out,
        "--model", "torchvision:resnet18", *SIZE, "--batch-size", 2, "--dpi", 40,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert err == ""
    assert sorted(os.listdir(out)) == ["matches.csv", "q0.png", "q1.png"]
    rows = list(csv.DictReader((out / "matches.csv").open()))
    assert {r["method"] for r in rows} == {DEFAULT_METHOD}  # as docs/cli.rst says
    assert [(r["query"], r["rank"]) for r in rows] == [
        (q, str(k)) for q in ("q0.png", "q1.png") for k in (1, 2, 3)
    ]
    q1 = [r for r in rows if r["query"] == "q1.png"]
    assert q1[0]["gallery"] == "copy_of_q1.png" and float(q1[0]["cosine_similarity"]) == 1.0
    for query in ("q0.png", "q1.png"):
        sims = [float(r["cosine_similarity"]) for r in rows if r["query"] == query]
        assert sims == sorted(sims, reverse=True)
    assert "wrote 2 figure(s)" in stdout


def test_explain_dir_progress_bars(tmp_path, retrieval_folders, capsys):
    queries, gallery = retrieval_folders
    code, _, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 1, "--out",
        tmp_path / "r", "--model", "torchvision:resnet18", *SIZE, "--progress", "--dpi", 30,
    )  # fmt: skip
    assert code == 0
    for stage in ("indexing gallery", "explaining queries"):
        assert stage in err
    assert "5/5" in err and "2/2" in err


def test_explain_dir_errors(tmp_path, retrieval_folders, capsys):
    queries, gallery = retrieval_folders
    out = tmp_path / "results"
    common = ["--out", out, "--model", "torchvision:resnet18", *SIZE]
    truncated_image(gallery / "broken.png")
    code, _, err = run(capsys, "explain-dir", queries, "--gallery", gallery, *common)
    assert_one_line_error(code, err, "cannot read image", "broken.png")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "explain-dir", empty, "--gallery", gallery, *common)
    assert_one_line_error(code, err, "no image files in")
    code, _, err = run(capsys, "explain-dir", queries, "--gallery", tmp_path / "nope", *common)
    assert_one_line_error(code, err, "image folder not found")
    a_file = queries / "q0.png"  # a file that exists: not "not found"
    code, _, err = run(capsys, "explain-dir", a_file, "--gallery", gallery, *common)
    assert_one_line_error(code, err, f"{a_file} is a file, not a folder")
    code, _, err = run(capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 0, *common)
    assert_one_line_error(code, err, "--top-k must be at least 1")
    # a layer that is no feature map fails at the first explanation, before any output
    (gallery / "broken.png").unlink()
    code, _, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, *common, "--layer", "avgpool"
    )
    assert_one_line_error(code, err, "avgpool")
    assert not out.exists()
