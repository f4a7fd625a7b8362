import shutil

import pytest
import torch

from image_files import write_image


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other test processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def retrieval_folders(tmp_path):
    """A folder of two queries and a gallery of five images (one a copy of a query) and a
    text file."""
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
