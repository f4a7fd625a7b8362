"""How reproduce_pretrained keys its stored runs (each arm by the settings it depends on)
and how long its compute-matched baseline trains."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _finetune  # noqa: E402
from _finetune import (  # noqa: E402
    arm_settings,
    matched_steps,
    mining_options,
    run_key,
    same_run_as,
    with_current_keys,
)

SETTINGS = {"size": 96, "steps": 100, "batch": 40, "lr": 1e-4, "frozen_blocks": 5,
            "gamma": 0.25, "alpha": 10.0, "beta": 0.5, "mining_gradient": "full",
            "masked_slots": None, "test_limit": 2000}


def test_mining_settings_do_not_split_the_baseline():
    other = {**SETTINGS, "gamma": 0.1, "mining_gradient": "maps", "masked_slots": [1]}
    for arm in ("untrained", "baseline"):
        assert run_key("all", "triplet", arm, 0, SETTINGS) == run_key("all", "triplet", arm, 0,
                                                                      other)
    for arm in ("sam_default", "sam_paper", "baseline_compute_matched"):
        assert run_key("all", "triplet", arm, 0, SETTINGS) != run_key("all", "triplet", arm, 0,
                                                                      other)
    # the untrained net does not depend on training, the baseline does
    longer = {**SETTINGS, "steps": 300}
    assert run_key("all", "-", "untrained", 0, SETTINGS) == run_key("all", "-", "untrained",
                                                                    0, longer)
    assert run_key("all", "triplet", "baseline", 0, SETTINGS) != run_key(
        "all", "triplet", "baseline", 0, longer)
    assert set(arm_settings("untrained", SETTINGS)) == {"size", "test_limit"}


def test_runs_stored_before_settings_were_added_are_re_keyed():
    old = {k: v for k, v in SETTINGS.items() if k not in ("mining_gradient", "masked_slots")}
    stored = {json.dumps(["all", "triplet", arm, 1, old], sort_keys=True): {"arm": arm}
              for arm in ("baseline", "sam_default")}
    runs = with_current_keys(stored)
    assert run_key("all", "triplet", "baseline", 1, SETTINGS) in runs
    assert runs[run_key("all", "triplet", "sam_default", 1, SETTINGS)] == {"arm": "sam_default"}


def test_default_maps_split_only_the_arms_that_use_them():
    """Runs stored before the default maps changed are keyed as partner-aware SAM's."""
    now = {**SETTINGS, "default_method": "contribution"}
    for arm in ("sam_default", "baseline_compute_matched", "erase", "crop"):
        assert run_key("all", "triplet", arm, 0, SETTINGS) != run_key("all", "triplet", arm,
                                                                      0, now)
    for arm in ("untrained", "baseline", "sam_paper"):
        assert run_key("all", "triplet", arm, 0, SETTINGS) == run_key("all", "triplet", arm,
                                                                      0, now)
    assert run_key("all", "triplet", "sam_default", 0, SETTINGS) == run_key(
        "all", "triplet", "sam_default", 0, {**SETTINGS, "default_method": "psam"})


def test_hinge_margins_are_the_metric_losses_and_paper_arms_are_shared():
    assert mining_options("erase_hinge", "siamese") == {"direction": "erase",
                                                        "mining_margin": 0.5}
    assert mining_options("drop_hinge", "siamese")["mining_margin"] == 0.0
    assert mining_options("erase_hinge", "quadruplet")["mining_margin"] == 0.2
    assert mining_options("crop", "triplet") == {"augmentation": "crop"}
    shared = {(arm, kind): same_run_as(arm, kind)
              for arm in ("erase", "drop", "erase_hinge", "drop_hinge", "crop", "sam_default")
              for kind in ("siamese", "triplet", "quadruplet")}
    assert {k: v for k, v in shared.items() if v} == {
        ("erase", "siamese"): "sam_default", ("drop", "triplet"): "sam_default",
        ("drop", "quadruplet"): "sam_default", ("drop_hinge", "siamese"): "drop"}


def test_file_protocol_reads_a_benchmark_folder(tmp_path):
    from PIL import Image

    from _finetune import file_protocol

    for c in range(4):  # CUB's layout: images/<id>.<name>/<file>
        for j in range(3):
            path = tmp_path / "images" / f"00{c + 1}.Bird_{c}" / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + j, 16), (60 * c, 10 * j, 0)).save(path)
    protocol = file_protocol("cub200", str(tmp_path), 8, test_limit=4)
    assert protocol.train_raw.shape == (6, 3, 8, 8) and protocol.train_count == 6
    assert protocol.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert protocol.test_images.shape == (4, 3, 8, 8)
    assert set(protocol.test_labels.tolist()) <= {2, 3}
    assert protocol.train_batch(torch.tensor([0, 5])).shape == (2, 3, 8, 8)


def test_the_compute_matched_length_is_the_ratio_of_step_costs_timed_side_by_side(monkeypatch):
    calls = []
    per_step = {"baseline": 0.4, "sam_default": 1.0}

    def timed(arm, kind, protocol, seed, steps, settings):
        calls.append((arm, kind, seed, steps))
        return None, {"train_s": per_step[arm] * steps}

    monkeypatch.setattr(_finetune, "train_arm", timed)
    assert matched_steps("triplet", None, 2, 100, SETTINGS, probe=5) == 250
    assert calls == [("baseline", "triplet", 2, 5), ("sam_default", "triplet", 2, 5),
                     ("sam_default", "triplet", 2, 5), ("baseline", "triplet", 2, 5)]
    per_step["sam_default"] = 0.2  # never shorter than the baseline itself
    assert matched_steps("triplet", None, 2, 100, SETTINGS, probe=5) == 100
