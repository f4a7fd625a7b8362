"""The black-box methods through ``explain()`` and the other entry points: any callable
model, every tuple kind, float16, the model left as it was, and clear refusals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from image_files import sized, write_image
from model_state import unchanged
from simexplain import EmbeddingAttribution, InputError, ModelLoadError, explain, explain_matches
from simexplain.apps.retrieval import explainer
from simexplain.apps.stream import explain_stream
from simexplain.engine import image_maps
from simexplain.methods import get_method

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = {"sbsm": {"window": 4, "stride": 4}, "rise": {"n_masks": 24, "grid": 2}}
GRID = {"sbsm": (4, 4), "rise": (16, 16)}  # raw maps of 16 px images
KINDS = {(3, 3): "same_pair", (3, 5): "different_pair", (0, 0, 1): "triplet",
         (0, 0, 1, 2): "quadruplet"}


def net() -> nn.Sequential:
    """A conv, ReLU, pooled embedding: a module with a layer, for the gradient methods too."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 5)).eval()


def images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Service:
    """A model behind a service: numpy in, numpy out, no torch module anywhere."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            answer = self.model(torch.from_numpy(x.numpy())).numpy()
        return torch.from_numpy(answer.copy())


@pytest.mark.parametrize("name", ["sbsm", "rise"])
@pytest.mark.parametrize("labels", list(KINDS))
def test_every_tuple_kind_with_a_function_as_model(name, labels):
    model = net()
    x = images(len(labels))
    exp = explain(lambda batch: model(batch), x, list(labels), method=name, **CHEAP[name])
    assert exp.method == name and exp.layer == "" and exp.kind == KINDS[labels]
    assert exp.raw_maps.shape == (1, len(labels), *GRID[name])
    assert exp.maps.shape == (1, len(labels), 16, 16)
    torch.testing.assert_close(exp.maps, image_maps(exp.raw_maps, (16, 16)), rtol=0, atol=0)
    assert float(exp.raw_maps.min()) >= 0 and float(exp.maps.max()) <= 1
    # the scores are the gradient methods' criterion, the embeddings the model's
    gradient = explain(model, x, list(labels), method="gradcam_cosine")
    torch.testing.assert_close(exp.scores, gradient.scores)
    torch.testing.assert_close(exp.embeddings, gradient.embeddings)


@pytest.mark.parametrize("name", ["sbsm", "rise"])
def test_a_callable_that_is_not_a_module_gives_the_modules_maps(name):
    model = net()
    x = images(6).reshape(2, 3, 3, 16, 16)
    from_module = explain(model, x, [0, 0, 1], method=name, **CHEAP[name])
    from_service = explain(Service(model), x, [0, 0, 1], method=name, **CHEAP[name])
    torch.testing.assert_close(from_service.raw_maps, from_module.raw_maps)
    assert from_service.raw_maps.shape[:2] == (2, 3)


def test_a_different_class_pair_explains_its_dissimilarity():
    model = net()
    x = images(2, seed=3)
    same = explain(model, x, [1, 1], method="sbsm", relu=False, **CHEAP["sbsm"])
    different = explain(model, x, [1, 2], method="sbsm", relu=False, **CHEAP["sbsm"])
    torch.testing.assert_close(different.raw_maps, -same.raw_maps)
    torch.testing.assert_close(different.scores, -same.scores)
    mixed = explain(model, torch.stack([x, x]), [[1, 1], [1, 2]], method="sbsm",
                    **CHEAP["sbsm"])
    assert mixed.kind == "pair"


@pytest.mark.parametrize("name", ["sbsm", "rise"])
def test_a_float16_model_gives_the_float32_maps(name):
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
    x = images(3, seed=4)
    full = explain(linear, x, [0, 0, 1], method=name, relu=False, **CHEAP[name])
    half = explain(linear.half(), x, [0, 0, 1], method=name, relu=False, **CHEAP[name])
    assert half.images.dtype == torch.float32 and half.raw_maps.dtype == torch.float32
    assert half.scores.dtype == torch.float32
    scale = float(full.raw_maps.abs().max())
    torch.testing.assert_close(half.raw_maps, full.raw_maps, rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(half.scores, full.scores, rtol=0, atol=2e-3)


class Packed(nn.Module):
    """Batch norm in train mode, a frozen parameter, a filled gradient, a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.body[0].weight.requires_grad_(False)
        self.body[1].bias.grad = torch.ones(4)

    def forward(self, x):
        return {"embedding": self.body(x)}


@pytest.mark.parametrize("name", ["sbsm", "rise"])
def test_the_model_is_left_as_it_was(name):
    model = Packed().train()
    model.body[2].eval()
    with unchanged(model):
        exp = explain(model, images(3, seed=5), [0, 0, 1], method=name, output="embedding",
                      **CHEAP[name])
    with unchanged(model), pytest.raises(InputError):
        explain(model, images(3), [0, 0, 1], method=name, output="embedding", p=2.0)
    # it ran in eval mode: the running statistics normalised, not the batch's
    with torch.no_grad():
        expected = F.normalize(model.eval()(images(3, seed=5))["embedding"], dim=-1)
    torch.testing.assert_close(exp.embeddings[0], expected)


@given(seed=st.integers(0, 2**16), batch_size=st.integers(1, 20))
@settings(max_examples=12, deadline=None)
def test_rotating_the_embedding_or_changing_the_batch_size_changes_no_map(seed, batch_size):
    """An orthogonal map of the embedding changes no cosine, so no map; the batch size
    changes only how the perturbed images are grouped."""
    model = net().double()
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64,
                                              generator=torch.Generator().manual_seed(seed)))
    x = images(3, seed=seed % 7).double()
    tuples = (x[:1], x[1:2], x[2:])
    for name in ("sbsm", "rise"):
        plain = get_method(name)(model, **CHEAP[name]).explain(tuples)
        turned = get_method(name)(lambda b: model(b) @ rotation.T, batch_size=batch_size,
                                  **CHEAP[name]).explain(tuples)
        torch.testing.assert_close(turned, plain, rtol=1e-9, atol=1e-9)


def test_files_and_pil_images_with_a_function_use_imagenet_defaults_or_transform(tmp_path):
    paths = [write_image(tmp_path / f"{k}.png", k) for k in range(2)]
    seen = []

    def embed(batch):
        seen.append(tuple(batch.shape[1:]))
        return batch.mean(dim=(2, 3))

    exp = explain(embed, paths, [0, 0], method="sbsm", window=56, stride=112)
    assert seen[0] == (3, 224, 224) and exp.images.shape == (1, 2, 3, 224, 224)
    assert exp.mean == pytest.approx((0.485, 0.456, 0.406))
    with Image.open(paths[0]) as first:
        photos = [first.convert("RGB"), Image.fromarray(np.zeros((40, 40, 3), np.uint8))]
    exp = explain(embed, photos, [0, 1], method="sbsm", transform=sized(size=32))
    assert exp.images.shape == (1, 2, 3, 32, 32) and exp.raw_maps.shape == (1, 2, 8, 8)


def test_a_reference_measures_from_its_centre_as_contribution_does():
    model = net()
    x = images(3, seed=6)
    gallery = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    centred = explain(model, x, [0, 0, 1], method="sbsm", reference=gallery, **CHEAP["sbsm"])
    gradient = explain(model, x, [0, 0, 1], reference=gallery)
    torch.testing.assert_close(centred.scores, gradient.scores)
    as_images = explain(Service(model), x, [0, 0, 1], method="sbsm", reference=images(6),
                        **CHEAP["sbsm"])
    assert not torch.allclose(as_images.scores, centred.scores)


def test_streams_and_retrieval_run_a_built_black_box_method():
    model = net()
    method = get_method("rise").build(lambda b: model(b), **CHEAP["rise"])
    x = images(4, seed=7)
    items = list(explain_stream(method, [((x[:2], x[2:]), torch.tensor([True, False]))],
                                progress=False))
    direct = explain(model, torch.stack([x[:2], x[2:]], 1), [[0, 0], [0, 1]], method="rise",
                     **CHEAP["rise"])
    torch.testing.assert_close(items[0].result.maps, direct.raw_maps)
    result = explain_matches(explainer(model, method="sbsm", **CHEAP["sbsm"]), x[0], x[1:])
    assert result.method == "sbsm" and result.layer == "" and result.query_maps.shape == \
        (1, 3, 4, 4)


def test_progress_bar(capsys):
    get_method("sbsm")(net(), progress=True).explain((images(1), images(1, seed=1)))
    assert "sbsm" in capsys.readouterr().err


REFUSALS = {
    "captum face": (lambda m: EmbeddingAttribution(m, method="rise"), InputError,
                    r"'rise' is a black-box method: .* not a captum layer attribution\. Run "
                    r"it with explain\(model, images, labels, method='rise'\)"),
    "captum face, built": (lambda m: EmbeddingAttribution(m, method=get_method("sbsm")(m)),
                           InputError, r"explain\(model, images, labels, method='sbsm'\)"),
    "gradient method of a function": (
        lambda m: explain(lambda b: m(b), images(3), [0, 0, 1]), TypeError,
        r"gradient methods need a PyTorch module.*method='rise' or method='sbsm', take any "
        r"callable"),
    "layer": (lambda m: explain(m, images(3), [0, 0, 1], "0", method="sbsm"), InputError,
              r"'sbsm' is a black-box method: it hides parts of the images and reads no "
              r"layer, so it takes no layer="),
    "chunk size": (lambda m: explain(m, images(3), [0, 0, 1], method="rise", chunk_size=2),
                   InputError, r"takes batch_size= \(perturbed images per forward pass\)"),
    "engine option": (lambda m: explain(m, images(3), [0, 0, 1], method="rise", layout="NCHW"),
                      InputError, r"method 'rise' takes the options \[.*'n_masks'.*\], not "
                      r"\['layout'\]"),
    "not callable": (lambda m: explain(42, images(3), [0, 0, 1], method="sbsm"), InputError,
                     r"model must be callable, images \(N, C, H, W\) -> embeddings"),
    "forward arguments": (
        lambda m: list(explain_stream(get_method("sbsm")(m), [(images(1), images(1))],
                                      progress=False, additional_forward_args=torch.ones(1))),
        InputError, "'sbsm' is a black-box method; it calls the model on the images alone"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_say_what_to_do(case):
    model = net().train()
    call, error, match = REFUSALS[case]
    with unchanged(model), pytest.raises(error, match=match) as info:
        call(model)
    assert type(info.value) is error


def test_a_torchscript_model_the_gradient_methods_refuse_runs_as_a_black_box():
    model = net()
    x = images(3, seed=8)
    with warnings.catch_warnings():  # torch.jit.trace is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x)
    with pytest.raises(ModelLoadError, match="explain it as a black box"):
        explain(traced, x, [0, 0, 1])
    torch.testing.assert_close(explain(traced, x, [0, 0, 1], method="sbsm").raw_maps,
                               explain(model, x, [0, 0, 1], method="sbsm").raw_maps)
