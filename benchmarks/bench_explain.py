#!/usr/bin/env python
"""Cost of explaining triplets: simexplain vs a plain forward, pytorch-grad-cam and captum.

For each model and batch size (triplets per call; each call sees 3B images) this measures

  (a) ``forward``    a forward pass under ``torch.no_grad()`` over the same 3B images (the floor);
  (b) ``simexplain`` ``EmbeddingAttribution(model, method=m).attribute((anchor, positive,
                     negative))`` with ``m`` the default method
                     (``simexplain.methods.DEFAULT_METHOD``; each row names it);
  (c) ``gradcam``    pytorch-grad-cam ``GradCAM`` on the same layer, one target per image;
  (d) ``captum``     captum ``LayerGradCam`` on the same layer, with a forward function that
                     returns every image's score (``relu_attributions=True``).

(c) and (d) compute the score that (b) explains, taken from the same object: the method's
``SimilarityScore`` (``attribution.score().bind(3, B)``), with ``fixed_at`` holding each
image's partners at the triplet's embeddings (``PeerScore``). Those embeddings, and
anything the method derives from them such as paper SAM's ``w``, are computed once,
outside every timed region. The layer is the one simexplain finds (``layer4`` for
ResNet-50, ``stages`` for ConvNeXt-T, ``blocks.11.norm1`` for ViT-S/16). pytorch-grad-cam
gets a ``reshape_transform`` that drops the ViT's prefix (class) token and restores the
14x14 grid. captum has no such hook: for the ViT its map is computed over the ``(N, L, C)``
token layout, which costs the same gradient work but is not a meaningful map (cost
comparison only).

Equivalence check (before timing, once per model, not timed): for the default method and
for paper SAM (``"sam"``), simexplain's raw maps (ReLU'd, at layer resolution) are compared
with captum's ``LayerGradCam`` maps (conv nets) and with pytorch-grad-cam's maps before its
min-max scaling (after its ReLU), both peers computing that method's score. The figure is
``max |peer - simexplain| / max |simexplain map|`` over the batch; above ``MAP_RTOL``
(float32: 1e-4 on a CPU, 1e-3 on CUDA) the run stops there with ``EquivalenceError`` and
exit status 1 (nothing of that model is timed or written). pytorch-grad-cam's scaled output
against simexplain's maps upsampled and scaled the same way is printed too (max absolute
difference on [0, 1], not gated: min-max scaling amplifies rounding in maps with a small
range).

How it is measured:

* Time (CPU): wall clock (``time.perf_counter``) of one call, every variant in this
  process. glibc is told to keep what the process frees (``--allocator retain``, the
  default: no ``mmap`` for large blocks, no trimming, ``_measure.retain_freed_memory``),
  so every call runs on memory the process already holds. With glibc's defaults a call
  pays page faults for its large tensors, and how many depends on what ran before: a
  ResNet-50 forward over 24 images took 2.6 s in a process of its own (1.9 s of it system
  time) and 1.4 s with retained memory; captum's call on ConvNeXt-T (one triplet) 0.258 s
  in a process without pytorch-grad-cam and 0.199 s after pytorch-grad-cam had grown the
  heap. simexplain runs its default passes, which the library sizes on a CPU by whether
  the process keeps freed memory (``simexplain.engine.chunking``): 24 images of 224 px a
  pass here, six under glibc's defaults (the ``chunk`` column, in triplets). Every
  variant is called once as a warm-up, then ``repeats`` repetitions each call
  every variant once, in an order rotated per repetition (interleaved, so drift and
  background load hit all variants alike); the table gives medians. ``--processes`` times
  each variant in a worker process of its own instead (``_variant_workers``), driven one
  at a time in the same order. pytorch-grad-cam is used as documented, in a ``with
  GradCAM(...) as cam:`` block per call (its hooks would otherwise stay on the layer and
  keep the last graph alive); the parameter ``.grad`` tensors it fills are dropped after
  each call, outside the timed region.
* Memory (CPU): peak RSS above the process baseline, in a fresh subprocess per variant and
  configuration. The subprocess builds the model and inputs and resolves the layer, then
  resets the kernel's RSS high-water mark (``/proc/self/clear_refs``), reads the baseline
  with ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, and runs ``--mem-calls`` calls (default
  2). The warm-up call is INCLUDED: the figure is the peak over the first call and the
  following ones, from the state right after setup. glibc is told to serve every allocation
  over 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the OS and
  RSS follows live memory. simexplain is given the timing process's passes
  (``chunk_size``), so its memory is that of the call timed. The worker is forked by a
  small ``/bin/sh`` rather than exec'd from the benchmark process, because Linux carries
  a process's largest RSS across exec into ``ru_maxrss``. Where the high-water mark
  cannot be reset, the baseline is the ``ru_maxrss`` after setup (the table says so).
* CUDA (only when available; skipped otherwise): CUDA events around each call, and
  ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()`` before the call, in the
  timing process (the caching allocator's statistics are exact per process).

Targets (issue 25), printed and written to the table (never asserted): time b/a <= 1.05,
memory b/a <= 1.2, time c/b >= 2.5, time d/b >= 1.0, each on medians of nine interleaved
repetitions; every time is printed with its spread (min-max).

Usage::

    python benchmarks/bench_explain.py --quick      # ResNet-50, batches 1 and 8, 2 repeats
    python benchmarks/bench_explain.py              # all four models, batches 1, 8 and 32
    python benchmarks/bench_explain.py --models vit_small --batches 8 --repeats 5

``--quick`` writes ``benchmarks/results/bench_explain_quick.md``; other runs write
``benchmarks/results/bench_explain.md`` (``--out`` overrides), and the raw rows (every
repetition) to the same name with ``.json``; both are rewritten atomically after every row.
``--update`` re-measures some rows of an existing table (e.g. ``--models vit_small
--update`` after a noisy run) and keeps the others; each row records when it was measured
and the load average then. A row re-timed with ``--no-memory`` keeps the memory figures it
had, with their own date.

Runtime on 2 CPU cores (torch 2.14.1): ``--quick`` about 3 minutes; the full default run
(four models, nine repetitions at every batch size) well over an hour, most of it in
pytorch-grad-cam and the batch-32 configurations (96 images per call).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import simexplain  # noqa: F401
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, str(ROOT))

from simexplain import EmbeddingAttribution  # noqa: E402
from simexplain.engine import (  # noqa: E402
    FeatureLayer, SimilarityScore, default_chunk_size, to_spatial,
)
from simexplain.engine._head_only import SPLIT_AFTER_IMAGES  # noqa: E402
from simexplain.methods import DEFAULT_METHOD  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _explain_report import (  # noqa: E402
    VARIANTS,
    check_text,
    print_row,
    write_markdown,
)
from _measure import (  # noqa: E402
    atomic_write_text,
    cpu_name,
    cuda_peak,
    interleaved_times,
    maxrss_kib,
    measure_memory,
    median,
    mem_available_mib,
    ratio,
    release_freed_memory,
    reset_high_water_mark,
    retain_freed_memory,
    status_kib,
)
from _variant_workers import VariantWorkers  # noqa: E402

MODELS = {
    "resnet50": "torchvision resnet50, fc=Identity (2048-d)",
    "convnext_tiny": "timm convnext_tiny, num_classes=0 (768-d)",
    "vit_small": "timm vit_small_patch16_224, num_classes=0 (384-d)",
    "swin_tiny": "timm swin_tiny_patch4_window7_224, num_classes=0 (768-d)",
}
#: The methods whose maps are checked against captum's and pytorch-grad-cam's: the default
#: (the one timed) and paper SAM.
CHECKED_METHODS = tuple(dict.fromkeys((DEFAULT_METHOD, "sam")))
#: Largest accepted ``max |peer - simexplain| / max |simexplain map|`` of the raw maps, by
#: device: float32 rounding on a CPU; on CUDA cuDNN may pick other algorithms (and TF32) for
#: the peers' passes. A peer computing another method's score differs by about 1.
MAP_RTOL = {"cpu": 1e-4, "cuda": 1e-3}


# ------------------------------------------------------------------------------------ setup


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()
    elif name == "convnext_tiny":
        import timm

        model = timm.create_model("convnext_tiny", pretrained=False, num_classes=0)
    elif name == "vit_small":
        import timm

        model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    elif name == "swin_tiny":
        import timm

        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                  num_classes=0)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return model.eval()


class PeerScore:
    """The score simexplain's maps explain, for the peers (pytorch-grad-cam and captum).

    It is the attribution's own :class:`~simexplain.engine.SimilarityScore`, bound to the
    batch, with ``fixed_at`` holding each image's partners (and whatever the method derives
    from them) at the tuples' embeddings. Those are computed here, once, so each image's
    score depends on that image alone, as in simexplain's backward pass.
    """

    def __init__(self, attr: EmbeddingAttribution, slots: tuple[Tensor, ...]):
        self.num_slots, self.batch = len(slots), slots[0].shape[0]
        self.score: SimilarityScore = attr.score().bind(self.num_slots, self.batch)
        with torch.no_grad():
            held = attr.engine.embed(torch.cat(slots))
        self.held = held.reshape(self.num_slots, self.batch, -1)  # (T, B, d)
        self.fixed = self.score.fixed_at(self.held)

    def images(self, embeddings: Tensor) -> Tensor:
        """Every image's score ``(T * B,)`` from the model's output for all images
        (slot-major, as ``Setup.images``): captum's forward function."""
        per_slot = embeddings.reshape(self.num_slots, self.batch, -1)
        return torch.cat([self.fixed(k, f) for k, f in enumerate(per_slot)])

    def targets(self) -> list[Callable[[Tensor], Tensor]]:
        """pytorch-grad-cam's targets, one per image (slot-major): image ``(k, b)``'s score
        from its own output ``(d,)``."""
        per_tuple = [self.score.chunk(b, b + 1).fixed_at(self.held[:, b : b + 1])
                     for b in range(self.batch)]
        return [ImageTarget(per_tuple[b], k) for k in range(self.num_slots)
                for b in range(self.batch)]


class ImageTarget:
    """pytorch-grad-cam target: the score of one image in slot ``slot`` of its tuple."""

    def __init__(self, fixed: Callable[[int, Tensor], Tensor], slot: int):
        self.fixed, self.slot = fixed, slot

    def __call__(self, output: Tensor) -> Tensor:
        return self.fixed(self.slot, output[None])[0]


class Setup:
    """Model, inputs, layer and the four callables for one (model, batch) configuration."""

    def __init__(self, model: nn.Module, batch: int, size: int, seed: int, device: torch.device,
                 chunk_size: Optional[int] = None, method: str = DEFAULT_METHOD):
        self.model = model
        self.method = method  # what (b) explains and (c) and (d) compute
        self.device = device
        self.chunk_size = chunk_size  # simexplain's tuples per forward pass (None: its default)
        gen = torch.Generator().manual_seed(seed + batch)
        self.slots = tuple(
            torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(3)
        )
        self.images = torch.cat(self.slots)  # slot-major: image j belongs to tuple j % batch
        self.attr = EmbeddingAttribution(model, method=method)
        self.layer: FeatureLayer = self.attr.feature_layer(self.slots[0])
        self.image_hw = (size, size)
        self._peer: Optional[PeerScore] = None
        self.reshape = None
        if self.layer.layout != "NCHW":
            layer, hw = self.layer, self.image_hw
            self.reshape = lambda t: to_spatial(t, layer, hw)

    def settle(self) -> float:
        """Explain the inputs until simexplain's one-time work is done (a class-token
        transformer is split at its layer once ``SPLIT_AFTER_IMAGES`` images were
        explained), so that measured calls see its steady state; the seconds it took."""
        start, images = time.perf_counter(), 0
        while images < max(1, SPLIT_AFTER_IMAGES):
            self.attr.attribute(self.slots, chunk_size=self.chunk_size)
            images += self.images.shape[0]
        return time.perf_counter() - start

    @property
    def peer(self) -> PeerScore:
        """The peers' score; computed once, outside timed regions."""
        if self._peer is None:
            self._peer = PeerScore(self.attr, self.slots)
        return self._peer

    def with_method(self, method: str) -> "Setup":
        """The same model, inputs and layer, explained and scored by the peers with ``method``."""
        other = copy.copy(self)
        other.method = method
        other.attr = EmbeddingAttribution(self.model, self.layer.module, method=method)
        other._peer = None
        return other

    # the four variants --------------------------------------------------------------
    def runner(self, variant: str) -> Callable[[], Any]:
        model, images, slots, layer = self.model, self.images, self.slots, self.layer
        if variant == "forward":

            def run():
                with torch.no_grad():
                    return model(images)

        elif variant == "simexplain":
            attr, chunk_size = self.attr, self.chunk_size

            def run():
                return attr.attribute(slots, chunk_size=chunk_size)

        elif variant == "gradcam":
            from pytorch_grad_cam import GradCAM

            targets = self.peer.targets()
            reshape = self.reshape

            def run(cam_class=GradCAM):
                with cam_class(
                    model=model, target_layers=[layer.module], reshape_transform=reshape
                ) as cam:
                    return cam(input_tensor=images, targets=targets)

        elif variant == "captum":
            from captum.attr import LayerGradCam

            peer = self.peer

            def scores(x):
                return peer.images(model(x))

            gradcam = LayerGradCam(scores, layer.module)

            def run():
                return gradcam.attribute(images, relu_attributions=True)

        else:
            raise ValueError(variant)
        return run

    def cleanup(self) -> None:
        """Drop what a variant leaves on the model (pytorch-grad-cam fills ``.grad``)."""
        for p in self.model.parameters():
            p.grad = None


# ------------------------------------------------------------------------ equivalence check


class EquivalenceError(RuntimeError):
    """simexplain's maps and a peer's differ by more than the tolerance."""


def raw_gradcam_class() -> type:
    """pytorch-grad-cam's ``GradCAM``, its call also returning the maps before its min-max
    scaling (after its ReLU), ``(N, h, w)``."""
    import numpy as np
    from pytorch_grad_cam import GradCAM

    class RawGradCAM(GradCAM):
        def get_cam_image(self, *args, **kwargs):
            cam = super().get_cam_image(*args, **kwargs)
            self.raw = np.maximum(cam, 0)
            return cam

        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs), self.raw

    return RawGradCAM


def check_equivalence(setup: Setup, peers: Optional[Setup] = None,
                      rtol: Optional[float] = None) -> dict:
    """Compare the maps of (b) with (c) and (d) once (not timed).

    ``peers``: the setup whose score (c) and (d) compute (default ``setup`` itself, same
    model, inputs and layer); another method's makes the check fail. Raises
    :class:`EquivalenceError` when a peer's raw maps differ from simexplain's by more than
    ``rtol`` (default ``MAP_RTOL`` for the device) times the largest simexplain map, or
    when every map is zero (nothing checked).
    """
    peers = setup if peers is None else peers
    rtol = MAP_RTOL.get(setup.device.type, MAP_RTOL["cuda"]) if rtol is None else rtol
    out: dict[str, Any] = {"method": setup.method, "peer_method": peers.method, "rtol": rtol}
    result = setup.attr.attribute_tuples(setup.slots)
    t, b = result.maps.shape[1], result.maps.shape[0]
    raw = result.maps.transpose(0, 1).reshape(t * b, *result.maps.shape[2:]).float().cpu()
    scale = float(raw.abs().max().clamp_min(1e-12))
    out["zero_maps"] = int((raw.flatten(1).amax(1) <= 0).sum())
    out["maps"] = t * b

    def rel_diff(peer_maps: Tensor) -> float:
        return float((peer_maps.float().cpu() - raw).abs().max()) / scale

    if setup.layer.layout == "NCHW":
        out["captum_max_rel_diff"] = rel_diff(peers.runner("captum")().detach().squeeze(1))
    else:
        out["captum_max_rel_diff"] = None  # captum has no reshape_transform: token layout
    cam, cam_raw = peers.runner("gradcam")(raw_gradcam_class())
    peers.cleanup()
    out["gradcam_max_rel_diff"] = rel_diff(torch.from_numpy(cam_raw))

    def minmax(x):
        flat = x.flatten(1)
        flat = flat - flat.amin(1, keepdim=True)
        return (flat / (1e-7 + flat.amax(1, keepdim=True))).reshape(x.shape)

    ours = minmax(F.relu(raw)).unsqueeze(1)
    ours = F.interpolate(ours, size=setup.image_hw, mode="bilinear", align_corners=False)
    ours = minmax(ours.squeeze(1).clamp_min(0))
    out["gradcam_scaled_max_abs_diff"] = float((torch.from_numpy(cam).float() - ours).abs().max())
    failed = [f"{name} {out[key]:.1e}" for name, key in
              (("captum", "captum_max_rel_diff"), ("pytorch-grad-cam", "gradcam_max_rel_diff"))
              if out[key] is not None and not out[key] <= rtol]
    if out["zero_maps"] == out["maps"]:
        failed.append("every simexplain map is zero, nothing compared")
    if failed:
        raise EquivalenceError(
            f"`{setup.method}` maps vs peers computing `{peers.method}`'s score: "
            + ", ".join(failed) + f" (max |diff| / max |map|, tolerance {rtol:.0e})"
        )
    return out


# --------------------------------------------------------------------- memory (subprocess)


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: peak RSS of ``spec['variant']`` above the baseline."""
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], spec["seed"])
    setup = Setup(model, spec["batch"], spec["size"], spec["seed"], torch.device("cpu"),
                  chunk_size=spec.get("chunk_size"), method=spec.get("method", DEFAULT_METHOD))
    run = setup.runner(spec["variant"])
    if spec["variant"] == "simexplain":
        setup.settle()
    gc.collect()
    reset = reset_high_water_mark()
    base = maxrss_kib()
    base_rss = status_kib("VmRSS")
    for _ in range(spec["calls"]):  # the first (warm-up) call is included
        out = run()
        del out
        setup.cleanup()
    peak = maxrss_kib()
    return {
        "peak_mib": (peak - base) / 1024.0,
        "baseline_mib": base / 1024.0,
        "baseline_rss_mib": None if base_rss is None else base_rss / 1024.0,
        "hwm_reset": reset,
    }


def variant_worker(spec: dict) -> tuple[Callable[[], Any], Callable[[], None], float]:
    """A timing worker's call of ``spec['variant']`` (``_variant_workers``): the model and
    inputs built as in the coordinator, simexplain settled; the seconds that took."""
    if spec["allocator"] == "retain":
        retain_freed_memory()
    setup = Setup(build_model(spec["model"], spec["seed"]), spec["batch"], spec["size"],
                  spec["seed"], torch.device("cpu"), method=spec["method"])
    settled = setup.settle() if spec["variant"] == "simexplain" else 0.0
    return setup.runner(spec["variant"]), setup.cleanup, settled


# ----------------------------------------------------------------------------------- run


def default_repeats(batch: int) -> int:
    """Nine interleaved repetitions at every batch size: a ratio's median then holds
    against a few slow calls (issue 25)."""
    return 9


def run_config(model_name: str, model: nn.Module, batch: int, args, device, first: bool,
               mem_per_image: dict) -> dict:
    row: dict[str, Any] = {"model": model_name, "batch": batch, "images": 3 * batch,
                           "device": device.type,
                           "measured": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                           "load": round(os.getloadavg()[0], 2)}
    setup = Setup(model, batch, args.size, args.seed, device)
    row["layer"] = setup.layer.name
    row["method"] = setup.method
    # simexplain's default passes in this process (its allocator decides them on a CPU);
    # the memory workers run the same ones, whatever their own allocator settings
    row["chunk_size"] = default_chunk_size(setup.slots, batch)
    if first and args.check:
        row["check"] = {}
        setup.settle()  # check the maps the timed calls compute (a split model's, once split)
        for method in CHECKED_METHODS:  # raises EquivalenceError on a disagreement
            row["check"][method] = check_equivalence(setup.with_method(method))
            print(f"  check {check_text(method, row['check'][method])}", flush=True)

    skipped: dict[str, str] = {}
    avail = mem_available_mib()
    # memory, in fresh processes (CPU only), before timing: also guards the big variants
    mem: dict[str, Optional[float]] = {}
    mem_info: dict[str, Any] = {}
    if device.type == "cpu" and args.memory:
        for v in VARIANTS:
            est = mem_per_image.get(v)
            if args.mem_guard and est is not None and avail is not None:
                need = est * 3 * batch
                if need > 0.7 * avail:
                    skipped[v] = f"est. {need / 1024:.1f} GiB > 70% of {avail / 1024:.1f} GiB free"
                    continue
            spec = {"model": model_name, "batch": batch, "size": args.size, "seed": args.seed,
                    "variant": v, "threads": args.threads, "calls": args.mem_calls,
                    "method": setup.method, "chunk_size": row["chunk_size"]}
            res = measure_memory(Path(__file__), spec, timeout=args.worker_timeout)
            mem_info[v] = res
            if "error" in res:
                print(f"  memory {v}: {res['error']}", flush=True)
                mem[v] = None
            else:
                mem[v] = res["peak_mib"]
                # per image at the latest batch (fixed costs such as .grad shrink per image
                # as batches grow, so the smaller batches would overestimate)
                mem_per_image[v] = res["peak_mib"] / (3 * batch)
                print(f"  memory {v:>10}: +{res['peak_mib']:.0f} MiB "
                      f"(baseline {res['baseline_mib']:.0f} MiB, hwm reset {res['hwm_reset']})",
                      flush=True)
    row["mem_mib"] = mem
    row["mem_info"] = mem_info

    variants = [v for v in VARIANTS if v not in skipped]
    repeats = args.repeats or default_repeats(batch)
    row["processes"] = device.type == "cpu" and args.processes
    row["allocator"] = args.allocator
    if row["processes"]:
        del setup
        gc.collect()
        specs = {v: {"model": model_name, "batch": batch, "size": args.size, "seed": args.seed,
                     "variant": v, "threads": args.threads, "method": row["method"],
                     "allocator": args.allocator} for v in variants}
        with VariantWorkers(variant_worker, specs) as workers:
            row["settle_s"] = workers.prepared.get("simexplain")
            times = workers.times(repeats)
    else:
        runners = {v: setup.runner(v) for v in variants}
        if device.type == "cuda":
            row["cuda_mem_mib"] = {v: cuda_peak(runners[v], setup.cleanup) for v in variants}
        row["settle_s"] = setup.settle()
        times = interleaved_times(runners, repeats, device, after=setup.cleanup)
        del setup, runners
    row["times"] = times
    row["time_s"] = {v: median(times[v]) for v in variants}
    row["repeats"] = repeats
    row["skipped"] = skipped
    t, m = row["time_s"], row["mem_mib"]
    row["ratios"] = {
        "time_b_a": ratio(t.get("simexplain"), t.get("forward")),
        "time_c_b": ratio(t.get("gradcam"), t.get("simexplain")),
        "time_d_b": ratio(t.get("captum"), t.get("simexplain")),
        "mem_b_a": ratio(m.get("simexplain"), m.get("forward")),
        "mem_c_b": ratio(m.get("gradcam"), m.get("simexplain")),
        "mem_d_b": ratio(m.get("captum"), m.get("simexplain")),
    }
    if device.type == "cuda":
        cm = row["cuda_mem_mib"]
        row["ratios"]["cuda_mem_b_a"] = ratio(cm.get("simexplain"), cm.get("forward"))
    gc.collect()
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=None, help="triplets per call")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions (default: 9 for B=1, 6 for B=8, 3 for B=32)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-calls", type=int, default=2, help="calls per memory subprocess")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--allocator", choices=("retain", "system"), default="retain",
                   help="retain (default): glibc keeps freed memory for the next calls "
                        "(no mmap, no trimming), so no variant pays page faults that another "
                        "one's allocations would have saved it; system: glibc's defaults")
    p.add_argument("--processes", action="store_true",
                   help="on a CPU, time each variant in a worker process of its own, driven "
                        "in turn (default: all in this process; with --allocator retain "
                        "each worker keeps its peak memory, too much for 32 triplets)")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--no-cuda", dest="cuda", action="store_false")
    p.add_argument("--no-cpu", dest="cpu", action="store_false",
                   help="with CUDA, skip the CPU measurements")
    p.add_argument("--no-mem-guard", dest="mem_guard", action="store_false",
                   help="run variants even when their extrapolated memory exceeds 70%% of free")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: resnet50, batches 1 and 8, 2 repeats")
    p.add_argument("--note", default="Shared, noisy machine: figures are indicative only.",
                   help="a line written under the header (e.g. machine load)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file; the raw rows go to the same name with .json")
    p.add_argument("--update", action="store_true",
                   help="replace only the measured rows in an existing --out (and its .json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["resnet50"]
        args.batches = args.batches or [1, 8]
        args.repeats = args.repeats or 2
    args.models = args.models or list(MODELS)
    args.batches = args.batches or [1, 8, 32]
    if args.out is None:
        name = "bench_explain_quick.md" if args.quick else "bench_explain.md"
        args.out = ROOT / "benchmarks" / "results" / name
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        result = memory_worker(json.loads(args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.allocator == "retain" and not retain_freed_memory():
        print("note: mallopt is not available; timing with the allocator's defaults",
              file=sys.stderr)
        args.allocator = "system"
    devices = []
    if args.cpu:
        devices.append(torch.device("cpu"))
    cuda = args.cuda and torch.cuda.is_available()
    if cuda:
        devices.append(torch.device("cuda"))
    meta = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name(0) if cuda else "not available (skipped)",
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "note": args.note,
    }
    print(f"torch {torch.__version__}, threads {args.threads}, load {meta['load_start']}, "
          f"CUDA {meta['cuda']}", flush=True)
    json_path = args.out.with_suffix(".json")
    rows: list[dict] = []
    meta["runs"] = []
    if args.update and json_path.exists():
        previous = json.loads(json_path.read_text())
        meta["runs"] = previous.get("runs", [])
        rows = previous.get("rows", [])
    run_info = {"argv": meta["argv"], "date": meta["date"], "elapsed_min": 0.0}
    meta["runs"].append(run_info)
    try:
        measure_all(args, devices, rows, meta, run_info, json_path, start)
    except EquivalenceError as err:
        print(f"FAILED equivalence check: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def measure_all(args, devices: list, rows: list[dict], meta: dict, run_info: dict,
                json_path: Path, start: float) -> None:
    def add(row: dict) -> None:
        key = (row["model"], row["batch"], row["device"])
        for i, old in enumerate(rows):
            if (old["model"], old["batch"], old["device"]) == key:
                if not row["mem_mib"] and old.get("mem_mib"):
                    keep_memory(row, old)
                rows[i] = row
                return
        rows.append(row)

    for model_name in args.models:
        for device in devices:
            model = build_model(model_name, args.seed).to(device)
            mem_per_image: dict[str, float] = {}
            for i, batch in enumerate(args.batches):
                print(f"{model_name} on {device.type}, {batch} triplets per call", flush=True)
                row = run_config(model_name, model, batch, args, device, first=(i == 0),
                                 mem_per_image=mem_per_image)
                print_row(row)
                add(row)
                # the next row's warm-up faults its own memory in; this row's peers' heap
                # (up to ~11 GiB at 32 triplets) would otherwise stay with the process
                release_freed_memory()
                run_info["elapsed_min"] = (time.perf_counter() - start) / 60
                # after every row, so that an interrupted run keeps what it measured
                atomic_write_text(json_path, json.dumps({"runs": meta["runs"], "rows": rows},
                                                        indent=1))
                write_markdown(args.out, rows, args, meta)
            del model
            gc.collect()


def keep_memory(row: dict, old: dict) -> None:
    """Carry ``old``'s memory figures into ``row``, re-timed with ``--no-memory``: time and
    memory are measured separately, so a re-timed row keeps the memory it had, with the
    date it was measured (``memory_measured``)."""
    row["mem_mib"], row["mem_info"] = old["mem_mib"], old.get("mem_info", {})
    row["ratios"].update({k: v for k, v in old["ratios"].items() if k.startswith("mem_")})
    row["memory_measured"] = old.get("memory_measured", old.get("measured"))


if __name__ == "__main__":
    sys.exit(main())
