"""GalleryIndex.build into a folder holding an index of another gallery: an update that
embeds only new and changed files, copies the other rows and swaps in atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T

from image_files import write_image
from networks import conv_net
from simexplain import GalleryIndex
from simexplain.apps.index import IndexMismatchError
from simexplain.apps.index.storage import RowStore
from simexplain.data.preprocessing import Preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

PREP = Preprocessing(T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()]),
                     (0.0,) * 3, (1.0,) * 3)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "gallery"
    folder.mkdir()
    return [Path(write_image(folder / f"{i}.png", seed=i, size=(20, 20))) for i in range(6)]


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the image files the gallery source reads, in order."""
    from simexplain.apps.index import sources

    read: list[str] = []
    original = sources.load_image

    def counting(path):
        read.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(sources, "load_image", counting)
    return read


def build(gallery, path: Path, transform=PREP, model=None, **options) -> GalleryIndex:
    return GalleryIndex.build(model or conv_net(), gallery, path=path, transform=transform,
                              shard_size=4, batch_size=2, **options)


def fail(store, number, arrays, info):
    """A shard writer that is killed before it writes anything."""
    raise RuntimeError("killed")


def rows(index: GalleryIndex, which: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored embeddings and crossing values of rows ``which``."""
    return index.embeddings[which], index.crossing(torch.tensor(which))[0]


def test_an_update_embeds_new_and_changed_files_only_and_copies_the_rest_exactly(
        tmp_path, files, reads):
    path = tmp_path / "index"
    old = build(files, path)
    assert (old.rows_embedded, old.rows_reused) == (6, 0)
    old_embeddings, old_crossing = rows(old, [5, 0, 1, 3])
    write_image(files[2], seed=99, size=(20, 20))  # changed
    new = Path(write_image(files[0].with_name("new.png"), seed=7, size=(20, 20)))
    gallery = [files[5], files[0], files[1], files[2], files[3], new]  # 4.png removed
    reads.clear()
    index = build(gallery, path)
    # the first two files are read once more, to find the layer's grid
    assert reads == ["5.png", "0.png", "2.png", "new.png"]
    assert (index.rows_embedded, index.rows_reused) == (2, 4)
    assert index.names == [str(p) for p in gallery]
    embeddings, crossing = rows(index, [0, 1, 2, 4])
    assert torch.equal(embeddings, old_embeddings) and torch.equal(crossing, old_crossing)
    fresh = build(gallery, tmp_path / "fresh")
    torch.testing.assert_close(index.embeddings, fresh.embeddings, rtol=0, atol=1e-6)
    # crossing values are stored in float16: embedded in batches of another size, a value
    # next to a rounding boundary may land one float16 step (2 ** -10 relative) away
    torch.testing.assert_close(index.crossing(torch.arange(6)), fresh.crossing(torch.arange(6)),
                               rtol=2 ** -10, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "gallery", "index"]
    loaded = GalleryIndex.load(path, conv_net())
    assert len(loaded) == 6 and torch.equal(loaded.embeddings, index.embeddings)

    reads.clear()
    again = build(gallery, path)  # nothing changed: nothing embedded
    assert again.rows_embedded == 0 and reads == ["5.png", "0.png"]
    touched = files[3].stat().st_mtime_ns + 10**9
    os.utime(files[3], ns=(touched, touched))
    assert build(gallery, path).rows_embedded == 1


def test_an_interrupted_update_leaves_the_old_index_and_resumes(tmp_path, files, monkeypatch):
    path = tmp_path / "index"
    old_embeddings = build(files, path).embeddings
    write_image(files[0], seed=50, size=(20, 20))
    written = []
    original = RowStore.write_arrays

    def fail_after_one_shard(store, number, arrays, info):
        if written:
            raise RuntimeError("disk full")
        written.append(number)
        original(store, number, arrays, info)

    monkeypatch.setattr(RowStore, "write_arrays", fail_after_one_shard)
    with pytest.raises(RuntimeError, match="disk full"):
        build(files, path)
    monkeypatch.setattr(RowStore, "write_arrays", original)
    assert torch.equal(GalleryIndex.load(path, conv_net()).embeddings, old_embeddings)
    assert (tmp_path / ".index.update" / "shards" / "00000").is_dir()
    index = build(files, path)  # shard 0 is resumed, shard 1 copied: nothing to embed
    assert index.rows_embedded == 0
    assert not torch.allclose(index.embeddings[0], old_embeddings[0])
    assert torch.equal(index.embeddings[1:], old_embeddings[1:])
    torch.testing.assert_close(index.embeddings, build(files, tmp_path / "fresh").embeddings,
                               rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "gallery", "index"]


def test_an_abandoned_update_is_cleared_once_the_gallery_is_back(tmp_path, files, monkeypatch):
    path = tmp_path / "index"
    build(files, path)
    before = files[0].stat()
    write_image(files[0], seed=50, size=(20, 20))
    monkeypatch.setattr(RowStore, "write_arrays", fail)
    with pytest.raises(RuntimeError, match="killed"):
        build(files, path)
    monkeypatch.undo()
    write_image(files[0], seed=0, size=(20, 20))  # as it was
    os.utime(files[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    assert build(files, path).rows_embedded == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "index"]


def test_an_unfinished_build_of_another_gallery_is_started_again(tmp_path, files, monkeypatch):
    monkeypatch.setattr(RowStore, "write_arrays", fail)
    with pytest.raises(RuntimeError, match="killed"):
        build(files, tmp_path / "index")
    monkeypatch.undo()
    index = build(files[:5], tmp_path / "index")
    assert index.rows_embedded == 5 and len(GalleryIndex.load(tmp_path / "index", conv_net())) == 5


SMALLER = Preprocessing(T.Compose([T.Resize(12), T.CenterCrop(12), T.ToTensor()]),
                        (0.0,) * 3, (1.0,) * 3)


@pytest.mark.parametrize("change, field", [
    (lambda: {"model": conv_net(seed=1)}, "fingerprint"),
    (lambda: {"transform": SMALLER}, "image_shape"),
    (lambda: {"dtype": torch.float32}, "dtype"),
    (lambda: {"activations": False}, "activations"),
])
def test_another_model_or_storage_is_refused_and_the_index_kept(tmp_path, files, change, field):
    path = tmp_path / "index"
    embeddings = build(files, path).embeddings
    with pytest.raises(IndexMismatchError, match=field):
        build(files[:3], path, **change())
    assert torch.equal(GalleryIndex.load(path, conv_net()).embeddings, embeddings)


def test_another_or_an_unrecognisable_preprocessing_embeds_everything_again(tmp_path, files):
    path = tmp_path / "index"
    build(files, path)
    grey = Preprocessing(T.Compose([T.Resize(16), T.CenterCrop(16), T.Grayscale(3),
                                    T.ToTensor()]), (0.0,) * 3, (1.0,) * 3)
    assert build(files, path, transform=grey).rows_embedded == 6
    lambda_prep = Preprocessing(lambda image: PREP.transform(image), (0.0,) * 3, (1.0,) * 3)
    first = build(files, path, transform=lambda_prep)
    second = build(files, path, transform=lambda_prep)  # cannot be recognised: rebuilt
    assert first.rows_embedded == second.rows_embedded == 6
    assert torch.equal(first.embeddings, build(files, tmp_path / "plain").embeddings)
    assert torch.equal(second.embeddings, first.embeddings)


def test_a_tensor_gallery_is_recognised_by_its_contents(tmp_path):
    gallery = torch.randn(6, 3, 16, 16)
    path = tmp_path / "index"
    build(gallery, path)
    assert build(gallery.clone(), path).rows_embedded == 0
    changed = gallery.clone()
    changed[3] += 1
    index = build(changed, path)
    assert index.rows_embedded == 6  # rows of a tensor are not told apart: all embedded
    torch.testing.assert_close(index.embeddings, build(changed, None).embeddings)


def test_an_embeddings_only_index_explains_with_the_full_model(tmp_path, files):
    index = build(files, tmp_path / "index", activations=False, dtype=torch.float32)
    assert not index.splits and "activations=False" in index.fallback_reason
    assert not list((tmp_path / "index" / "shards" / "00000").glob("crossing-*"))
    full = build(files, tmp_path / "full", dtype=torch.float32)
    assert torch.equal(index.embeddings, full.embeddings)
    queries = files[:2]
    first, second = index.explain(queries, top_k=2), full.explain(queries, top_k=2)
    assert torch.equal(first.indices, second.indices)
    # stored activations come back NCHW, fresh ones channels-last: float32 sums in another order
    torch.testing.assert_close(first.gallery_maps, second.gallery_maps, rtol=2e-4, atol=1e-5)
    loaded = GalleryIndex.load(tmp_path / "index", conv_net())
    assert not loaded.splits and torch.equal(loaded.embeddings, index.embeddings)
