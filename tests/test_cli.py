"""The ``simexplain`` command, model specs and checkpoints, and the retrieval it runs on.

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
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from simexplain import EmbeddingAttribution, explain
from simexplain.cli import main
from simexplain.maps import scale_maps, upsample_maps
from simexplain.models import ModelLoadError, load_model
from simexplain.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from simexplain.retrieval import embed_images, explain_matches, list_images, rank_gallery
from simexplain.weights import l2_normalize

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = ["--size", "64"]


def write_image(path, seed, size=(70, 64)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / f"img{i}.png", i) for i in range(4)]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simexplain: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def sized(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=64):
    pipeline = T.Compose(
        [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    )
    return Preprocessing(pipeline, tuple(mean), tuple(std))


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


# --------------------------------------------------------------------------- models


def test_named_models_return_pooled_features():
    assert load_model("timm:resnet10t")(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert load_model("torchvision:resnet18")(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    head = load_model("torchvision:resnet18", keep_head=True)
    assert head(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert not load_model("timm:resnet10t").training


def same_outputs(a, b):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("arch", ["timm:resnet10t", "torchvision:resnet18"])
def test_checkpoints_of_classifiers_load_as_embedding_models(tmp_path, arch):
    from safetensors.torch import save_file

    scheme, _, name = arch.partition(":")
    if scheme == "timm":
        import timm

        classifier = timm.create_model(name, num_classes=7).eval()
    else:
        classifier = torchvision.models.get_model(name, num_classes=7).eval()
    torch.save({"module." + k: v for k, v in classifier.state_dict().items()}, tmp_path / "a.pt")
    save_file(classifier.state_dict(), tmp_path / "a.safetensors")
    for path in ("a.pt", "a.safetensors"):
        embedder = load_model(str(tmp_path / path), arch=arch)
        reference = load_model(arch)
        reference.load_state_dict(classifier.state_dict(), strict=False)
        same_outputs(embedder, reference.eval())
        with_head = load_model(str(tmp_path / path), arch=arch, keep_head=True)
        same_outputs(with_head, classifier)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_checkpoint(tmp_path):
    model = load_model("torchvision:resnet18")
    traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    traced.save(str(tmp_path / "model.pt"))
    loaded = load_model(str(tmp_path / "model.pt"))
    same_outputs(loaded, model)
    with pytest.raises(ModelLoadError, match="needs no --arch"):
        load_model(str(tmp_path / "model.pt"), arch="torchvision:resnet18")


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
        ["holds weights only", "--arch"],
    ),
    "pickled model object": (
        lambda t, imgs: [*imgs[:3], "--model", whole_pickled_model(t / "m.pt")],
        ["never unpickles"],
    ),
    "truncated checkpoint": (
        lambda t, imgs: [*imgs[:3], "--model", truncated_checkpoint(t / "cut.pt"),
                         "--arch", "torchvision:resnet18"],
        ["cannot read checkpoint"],
    ),  # fmt: skip
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


def test_unexpected_errors_are_one_line_too(tmp_path, images, capsys, monkeypatch):
    import simexplain.api

    def broken(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(simexplain.api.EmbeddingAttribution, "attribute_tuples", broken)
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


@pytest.fixture
def folders(tmp_path):
    queries, gallery = tmp_path / "queries", tmp_path / "gallery"
    queries.mkdir()
    gallery.mkdir()
    for i in range(2):
        write_image(queries / f"q{i}.png", 100 + i)
    shutil.copy(queries / "q1.png", gallery / "copy_of_q1.png")
    for i in range(4):
        write_image(gallery / f"g{i}.jpg", 200 + i, size=(64 + 8 * i, 64))
    (gallery / "notes.txt").write_text("not an image, skipped")
    return queries, gallery


def test_explain_dir_writes_a_figure_per_query_and_the_rankings(tmp_path, folders, capsys):
    queries, gallery = folders
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
    assert [(r["query"], r["rank"]) for r in rows] == [
        (q, str(k)) for q in ("q0.png", "q1.png") for k in (1, 2, 3)
    ]
    q1 = [r for r in rows if r["query"] == "q1.png"]
    assert q1[0]["gallery"] == "copy_of_q1.png" and float(q1[0]["cosine_similarity"]) == 1.0
    for query in ("q0.png", "q1.png"):
        sims = [float(r["cosine_similarity"]) for r in rows if r["query"] == query]
        assert sims == sorted(sims, reverse=True)
    assert "wrote 2 figure(s)" in stdout


def test_explain_dir_progress_bars(tmp_path, folders, capsys):
    queries, gallery = folders
    code, _, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 1, "--out",
        tmp_path / "r", "--model", "torchvision:resnet18", *SIZE, "--progress", "--dpi", 30,
    )  # fmt: skip
    assert code == 0
    for stage in ("embedding gallery", "embedding queries", "explaining queries"):
        assert stage in err
    assert "5/5" in err and "2/2" in err


def test_explain_dir_errors(tmp_path, folders, capsys):
    queries, gallery = folders
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
    code, _, err = run(capsys, "explain-dir", queries, "--gallery", gallery, "--top-k", 0, *common)
    assert_one_line_error(code, err, "--top-k must be at least 1")
    # a layer that is no feature map fails at the first explanation, before any output
    (gallery / "broken.png").unlink()
    code, _, err = run(
        capsys, "explain-dir", queries, "--gallery", gallery, *common, "--layer", "avgpool"
    )
    assert_one_line_error(code, err, "avgpool")
    assert not out.exists()


# --------------------------------------------------------------------------- retrieval


def test_rank_gallery_is_exact_cosine_ranking():
    g = torch.Generator().manual_seed(1)
    queries = l2_normalize(torch.randn(3, 5, generator=g))
    gallery = l2_normalize(torch.randn(7, 5, generator=g))
    sims, idx = rank_gallery(queries, gallery, top_k=4)
    full = queries @ gallery.T
    for q in range(3):
        order = sorted(range(7), key=lambda i: -float(full[q, i]))[:4]
        assert idx[q].tolist() == order
        torch.testing.assert_close(sims[q], full[q, order])
    assert rank_gallery(queries, gallery, top_k=50)[1].shape == (3, 7)


def test_embed_images_batches_normalises_and_restores_the_mode(folders):
    _, gallery = folders
    files = list_images(gallery)
    assert [f.name for f in files] == ["copy_of_q1.png", "g0.jpg", "g1.jpg", "g2.jpg", "g3.jpg"]
    model = load_model("torchvision:resnet18").train()
    pre = sized()
    seen = []
    embeddings = embed_images(model, files, pre, batch_size=2, on_batch=seen.append)
    assert seen == [2, 2, 1] and model.training
    model.eval()
    with torch.no_grad():
        batch = torch.stack([pre.transform(Image.open(f).convert("RGB")) for f in files])
        torch.testing.assert_close(embeddings, l2_normalize(model(batch)))


def test_explain_matches_equals_the_pair_attribution():
    model = torchvision.models.resnet18(num_classes=16).eval()
    query, matches = torch.randn(3, 64, 64), torch.randn(2, 3, 64, 64)
    attribution = EmbeddingAttribution(model)
    result = explain_matches(attribution, query, matches, names=["a", "b"])
    raw = attribution.attribute_tuples(
        (query.expand(2, -1, -1, -1), matches), target=torch.tensor([True, True])
    )
    expected = scale_maps(upsample_maps(raw.maps.flatten(0, 1), (64, 64))).reshape(2, 2, 64, 64)
    torch.testing.assert_close(result.query_maps, expected[:, 0])
    torch.testing.assert_close(result.gallery_maps, expected[:, 1])
    with torch.no_grad():
        f = l2_normalize(model(torch.cat([query[None], matches])))
    torch.testing.assert_close(result.similarities, f[1:] @ f[0])
    figure = result.plot(query_title="q")
    titles = [ax.get_title() for ax in figure.axes if ax.get_images()]
    assert titles[:3] == ["q", "q vs #1", "q vs #2"] and titles[3].startswith("#1 a\ncos = ")
