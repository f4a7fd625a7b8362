"""Streaming explanations from a DataLoader and writing maps to disk (simexplain.stream)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simexplain import EmbeddingAttribution, InputError, explain
from simexplain.apps.map_store import MapWriter, iter_shards, load_maps, read_manifest
from simexplain.apps.stream import StreamItem, explain_stream, explain_to_disk, unpack_batch
from simexplain.engine import TupleResult
from simexplain.methods import get_method

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


class TinyNet(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, dim))

    def forward(self, x):
        return self.head(self.features(x))


class Triplets(Dataset):
    """Deterministic random triplets: item i is ``(anchor, positive, negative)``."""

    def __init__(self, n: int, slots: int = 3, with_target: bool = False):
        self.n, self.slots, self.with_target = n, slots, with_target

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        images = tuple(torch.randn(3, SIZE, SIZE, generator=g) for _ in range(self.slots))
        if self.with_target:
            return images, bool(i % 2)
        return images


def all_slots(dataset: Triplets) -> tuple[torch.Tensor, ...]:
    items = [dataset[i] for i in range(len(dataset))]
    if dataset.with_target:
        items = [images for images, _ in items]
    return tuple(torch.stack([it[k] for it in items]) for k in range(dataset.slots))


@pytest.fixture
def attr():
    torch.manual_seed(0)
    return EmbeddingAttribution(TinyNet().eval(), "features", method="sam")


def run(attr, loader, **kw):
    return list(explain_stream(attr, loader, progress=False, **kw))


def cat(items, field):
    return torch.cat([getattr(it.result, field) for it in items])


# ------------------------------------------------------------------ equal to attribute


def test_stream_equals_attribute(attr):
    data = Triplets(10)
    items = run(attr, DataLoader(data, batch_size=4), chunk_size=3)
    assert [(it.index, it.start, it.stop) for it in items] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert all(isinstance(it, StreamItem) for it in items)
    ref = attr.attribute_tuples(all_slots(data))
    for field in ("maps", "scores", "weights", "embeddings"):
        torch.testing.assert_close(cat(items, field), getattr(ref, field), rtol=1e-5, atol=1e-6)
    assert {it.result.kind for it in items} == {"triplet"}
    assert all(not it.result.maps.requires_grad for it in items)
    # and the public attribute() of the whole set, slot by slot
    maps = attr.attribute(all_slots(data))
    for k, m in enumerate(maps):
        torch.testing.assert_close(cat(items, "maps")[:, k], m[:, 0], rtol=1e-5, atol=1e-6)


def test_pairs_with_targets_from_the_loader(attr):
    data = Triplets(6, slots=2, with_target=True)
    items = run(attr, DataLoader(data, batch_size=4))
    same = torch.tensor([bool(i % 2) for i in range(6)])
    ref = attr.attribute_tuples(all_slots(data), target=same)
    torch.testing.assert_close(cat(items, "maps"), ref.maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cat(items, "weights"), ref.weights, rtol=1e-5, atol=1e-6)


def test_batch_layouts():
    a, p, n = torch.randn(3, 2, 3, 8, 8)
    target = torch.tensor([True, False])
    stacked = torch.stack([a, p], dim=1)  # (B, T, C, H, W)
    assert unpack_batch([a, p, n]) == ((a, p, n), None)
    slots, t = unpack_batch(stacked)
    assert len(slots) == 2 and torch.equal(slots[1], p) and t is None
    slots, t = unpack_batch(((a, p), target))
    assert slots == (a, p) and t is target
    slots, t = unpack_batch([stacked, target])
    assert len(slots) == 2 and t is target
    slots, t = unpack_batch((a, p, target))  # flat, as (x1, x2, same) items collate
    assert slots == (a, p) and t is target
    slots, t = unpack_batch({"images": (a, p), "target": target})
    assert slots == (a, p) and t is target
    with pytest.raises(InputError, match="images"):
        unpack_batch({"x": a})
    with pytest.raises(InputError, match="unpack="):
        unpack_batch(3)


def test_default_target_and_custom_unpack(attr):
    data = Triplets(4, slots=2)
    items = run(attr, DataLoader(data, batch_size=4), target=True)
    ref = attr.attribute_tuples(all_slots(data), target=True)
    torch.testing.assert_close(cat(items, "maps"), ref.maps, rtol=1e-5, atol=1e-6)
    loader = [{"pics": all_slots(data)}]
    items = run(attr, loader, unpack=lambda b: (b["pics"], True))
    torch.testing.assert_close(cat(items, "maps"), ref.maps, rtol=1e-5, atol=1e-6)


def test_wrong_attribution_type():
    with pytest.raises(TypeError, match="EmbeddingAttribution or a built method"):
        explain_stream(TinyNet(), [])


def test_a_decomposition_streams_like_explain():
    method = get_method("stylianou").build(TinyNet().eval(), "features")
    data = Triplets(6, slots=2, with_target=True)
    items = run(method, DataLoader(data, batch_size=4))
    same = torch.tensor([bool(i % 2) for i in range(6)])
    labels = torch.stack([torch.zeros(6), (~same).float()], dim=1).long()
    exp = explain(method.model, torch.stack(all_slots(data), dim=1), labels, layer="features",
                  method="stylianou")
    torch.testing.assert_close(cat(items, "maps"), exp.raw_maps)  # signed, as explain's
    torch.testing.assert_close(cat(items, "scores"), exp.scores)
    torch.testing.assert_close(cat(items, "embeddings"), exp.embeddings)
    torch.testing.assert_close(cat(items, "scores"), cat(items, "maps").sum(dim=(-2, -1)))


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("file_format", ["npz", "safetensors"])
def test_shards_written_and_readable(attr, tmp_path, file_format):
    if file_format == "safetensors":
        pytest.importorskip("safetensors")
    data = Triplets(10)
    writer = MapWriter(
        tmp_path / "maps", shard_size=3, fields=("maps", "scores", "embeddings"),
        file_format=file_format,
    )
    items = run(attr, DataLoader(data, batch_size=4), writer=writer)
    files = sorted(p.name for p in (tmp_path / "maps").iterdir())
    suffix = ".npz" if file_format == "npz" else ".safetensors"
    assert files == ["manifest.json"] + [f"shard-{i:06d}{suffix}" for i in range(4)]
    manifest = read_manifest(tmp_path / "maps")
    assert manifest["complete"] is True and manifest["num_tuples"] == 10
    shards = [(s["start"], s["count"]) for s in manifest["shards"]]
    assert shards == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert manifest["kind"] == "triplet" and manifest["layer"] == "features"
    loaded = load_maps(tmp_path / "maps")
    assert sorted(loaded) == ["embeddings", "index", "maps", "scores"]
    np.testing.assert_array_equal(loaded["index"], np.arange(10))
    for field in ("maps", "scores", "embeddings"):
        np.testing.assert_array_equal(loaded[field], cat(items, field).numpy())
    # one shard, a subset of the fields, shard by shard
    one = load_maps(tmp_path / "maps" / f"shard-000001{suffix}", fields=["maps"])
    assert sorted(one) == ["index", "maps"] and list(one["index"]) == [3, 4, 5]
    assert [len(s["index"]) for s in iter_shards(tmp_path / "maps")] == [3, 3, 3, 1]


def test_npz_shards_are_plain_numpy(attr, tmp_path):
    manifest = explain_to_disk(
        attr, DataLoader(Triplets(5), batch_size=2), tmp_path, shard_size=8, progress=False,
        dtype="float16",
    )
    assert manifest["complete"] and manifest["num_tuples"] == 5
    with np.load(tmp_path / "shard-000000.npz", allow_pickle=False) as shard:
        assert sorted(shard.files) == ["index", "maps", "scores"]
        assert shard["maps"].dtype == np.float16 and shard["maps"].shape == (5, 3, 8, 8)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["format"] == "simexplain-maps" and on_disk["version"] == 1


@pytest.mark.parametrize("dtype", [None, "float32", "float16"])
def test_bfloat16_models_and_tensors_go_to_disk(tmp_path, dtype):
    torch.manual_seed(0)
    attr = EmbeddingAttribution(TinyNet().eval().bfloat16(), "features")
    loader = DataLoader(Triplets(3), batch_size=2, collate_fn=lambda b: tuple(
        torch.stack([item[k] for item in b]).bfloat16() for k in range(3)))
    manifest = explain_to_disk(attr, loader, tmp_path / "maps", progress=False, dtype=dtype,
                               fields=("maps", "scores", "embeddings"))
    loaded = load_maps(tmp_path / "maps")
    assert manifest["complete"] and loaded["maps"].shape == (3, 3, 8, 8)
    assert loaded["maps"].dtype == np.dtype(dtype or "float32")
    assert np.isfinite(loaded["maps"]).all() and np.abs(loaded["maps"]).max() > 0
    # the writer itself takes bfloat16 tensors, e.g. a user's own results
    writer = MapWriter(tmp_path / "raw", fields=("maps",), dtype=dtype)
    values = torch.rand(2, 3, 4, 4).bfloat16()
    writer.write(TupleResult(values, torch.rand(2, 3).bfloat16(), None,
                             torch.rand(2, 3, 5).bfloat16(), "triplet", "features"))
    writer.close()
    np.testing.assert_array_equal(load_maps(tmp_path / "raw")["maps"],
                                  values.float().numpy().astype(dtype or "float32"))


def test_writer_refuses_an_existing_set_unless_overwrite(attr, tmp_path):
    explain_to_disk(attr, [all_slots(Triplets(2))], tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        MapWriter(tmp_path)
    explain_to_disk(attr, [all_slots(Triplets(3))], tmp_path, progress=False, overwrite=True)
    assert load_maps(tmp_path)["maps"].shape[0] == 3
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only its own files are removed


def test_writer_holds_at_most_one_shard(attr, tmp_path):
    writer = MapWriter(tmp_path, shard_size=5)
    for item in explain_stream(attr, DataLoader(Triplets(23), batch_size=3), progress=False):
        writer.write(item.result, start=item.start)
        assert writer.pending < 5
    writer.close()
    assert writer.closed and read_manifest(tmp_path)["num_tuples"] == 23
    with pytest.raises(ValueError, match="closed"):
        writer.write(item.result)


# --------------------------------------------------------------------- failures, atomicity


class FailingLoader:
    """Yields ``ok`` batches of two triplets, then raises."""

    def __init__(self, ok: int):
        self.ok = ok

    def __iter__(self):
        for i in range(self.ok):
            yield tuple(torch.randn(2, 3, SIZE, SIZE) for _ in range(3))
        raise RuntimeError("loader broke")


def test_failure_mid_stream_keeps_complete_shards_only(attr, tmp_path):
    writer = MapWriter(tmp_path, shard_size=3)
    with pytest.raises(RuntimeError, match="loader broke"):
        run(attr, FailingLoader(ok=4), writer=writer)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] is False
    assert manifest["num_tuples"] == 8  # all computed tuples are kept, in whole shards
    assert names == ["manifest.json"] + [f"shard-{i:06d}.npz" for i in range(3)]
    assert load_maps(tmp_path)["maps"].shape == (8, 3, 8, 8)


def test_failing_shard_write_leaves_no_partial_file(attr, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_savez = np.savez

    def savez(file, **arrays):
        calls["n"] += 1
        # what is being written is a hidden temporary file, never a shard's final name
        written = Path(file.name)
        assert written.name.startswith(".shard-") and written.name.endswith(".tmp")
        assert written.parent == tmp_path
        if calls["n"] >= 2:  # from the second shard on: write part of it, then fail
            file.write(b"PK\x03\x04 partial zip")
            raise OSError("disk full")
        return real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    writer = MapWriter(tmp_path, shard_size=2)
    with pytest.raises(OSError, match="disk full"):
        run(attr, DataLoader(Triplets(6), batch_size=2), writer=writer)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "shard-000001.npz" not in names
    assert not [n for n in names if n.endswith(".tmp")], names
    # every shard file present is complete and listed; the manifest says incomplete
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] is False
    listed = [s["file"] for s in manifest["shards"]]
    assert sorted(n for n in names if n.startswith("shard-")) == sorted(listed)
    loaded = load_maps(tmp_path)
    assert len(loaded["index"]) == manifest["num_tuples"]


def test_stopping_early_marks_the_set_incomplete(attr, tmp_path):
    writer = MapWriter(tmp_path, shard_size=4)
    stream = explain_stream(attr, DataLoader(Triplets(12), batch_size=2), writer=writer,
                            progress=False)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] is False and manifest["num_tuples"] == 6
    assert len(load_maps(tmp_path)["index"]) == 6


# -------------------------------------------------------------------------- bounded memory


def test_generator_holds_no_past_batches(attr):
    refs: list[list[weakref.ref]] = []

    def make():
        batch = tuple(torch.randn(2, 3, SIZE, SIZE) for _ in range(3))
        refs.append([weakref.ref(t) for t in batch])
        return batch

    def loader():  # keeps no reference to what it yielded
        for _ in range(6):
            yield make()

    result_refs = []
    for k, item in enumerate(explain_stream(attr, loader(), progress=False)):
        gc.collect()
        # this batch's images were dropped before its results were yielded, and so were
        # all earlier batches' images
        assert all(r() is None for batch in refs[: k + 1] for r in batch), k
        # earlier results are not held by the generator once the caller dropped them
        assert all(r() is None for r in result_refs), k
        result_refs.append(weakref.ref(item.result.maps))
        del item
    assert len(refs) == 6


def test_results_detached_and_on_cpu(attr):
    (item,) = run(attr, [all_slots(Triplets(2))])
    for t in (item.result.maps, item.result.scores, item.result.embeddings):
        assert t.device.type == "cpu" and t.grad_fn is None and not t.requires_grad


# ------------------------------------------------------------------------------ progress


def test_progress_bar_on_stderr(attr, capsys):
    list(explain_stream(attr, DataLoader(Triplets(4), batch_size=2)))
    err = capsys.readouterr().err
    assert "4/4" in err


def test_progress_total_follows_the_sampler(attr, capsys):
    from torch.utils.data import SubsetRandomSampler

    loader = DataLoader(Triplets(10), batch_size=3, sampler=SubsetRandomSampler(range(7)),
                        drop_last=True)
    items = list(explain_stream(attr, loader))
    assert sum(len(it.result.maps) for it in items) == 6
    assert "6/6" in capsys.readouterr().err
