"""The offline demo: its network, the end-to-end run (also as ``simexplain demo``), the cache."""

import pytest
import torch

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
def test_demo_quick_runs_end_to_end(tmp_path, capsys, data):
    out = tmp_path / "demo.png"
    assert demo_main(["--quick", "--data", data, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for kind in ("same_pair", "triplet", "quadruplet"):
        assert kind in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.png"]


def test_cli_demo(tmp_path):
    out = tmp_path / "cli.png"
    assert cli_main(["demo", "--quick", "--data", "shapes", "--out", str(out)]) == 0
    assert out.exists()


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
