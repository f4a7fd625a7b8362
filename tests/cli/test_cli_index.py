"""``simexplain index`` and ``simexplain retrieve``: a gallery indexed once, queries
explained from it, to disk."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from command_line import assert_one_line_error, run
from image_files import write_labelled_folders
from simexplain import load_maps

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ["--model", "timm:resnet10t", "--size", "128"]  # a 4x4 grid at layer4


@pytest.fixture
def folders(tmp_path):
    return write_labelled_folders(tmp_path, {"gallery": 4, "queries": 2})


def test_index_then_retrieve_writes_maps_tables_and_report(folders, capsys):
    torch.manual_seed(0)
    code, out, err = run(capsys, "index", folders / "gallery", *MODEL,
                         "--out", folders / "index")
    assert code == 0, err
    assert "indexed 8 images at layer 'layer4'" in out and "head after the layer" in out
    torch.manual_seed(0)  # the same random weights
    code, out, err = run(capsys, "retrieve", folders / "queries", *MODEL, "--index",
                         folders / "index", "--top-k", 3, "--out", folders / "out")
    assert code == 0, err
    assert "explained 4 queries x top 3 with contribution" in out and "Recall@1" in out
    maps = load_maps(folders / "out" / "maps")
    assert maps["maps"].shape == (12, 2, 4, 4)
    with open(folders / "out" / "matches.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {r["method"] for r in rows} == {"contribution"}
    assert {r["query_label"] for r in rows} == {"cat", "dog"}
    summary = json.loads((folders / "out" / "retrieval.json").read_text())
    assert summary["labelled_queries"] == 4
    failures = (folders / "out" / "failures.csv").read_text().splitlines()
    assert len(failures) == 1 + summary["failures"]
    assert (folders / "out" / "report" / "index.html").is_file()


def test_retrieve_with_other_weights_is_refused_in_one_line(folders, capsys):
    torch.manual_seed(0)
    assert run(capsys, "index", folders / "gallery", *MODEL, "--out", folders / "index")[0] == 0
    torch.manual_seed(1)
    code, _, err = run(capsys, "retrieve", folders / "queries", *MODEL, "--index",
                       folders / "index", "--out", folders / "out")
    assert_one_line_error(code, err, "other model weights")


def test_retrieve_without_an_index_says_how_to_build_one(folders, capsys):
    code, _, err = run(capsys, "retrieve", folders / "queries", *MODEL, "--index",
                       folders / "nothing", "--out", folders / "out")
    assert_one_line_error(code, err, "no complete index", "simexplain index")
