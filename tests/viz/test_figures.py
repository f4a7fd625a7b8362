"""Figures: de-normalised images, overlays, titles, colorbars, retrieval layout, saving."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from simexplain.methods import DEFAULT_METHOD
from simexplain.apps.explanation import Explanation
from simexplain.viz import (
    display_image,
    draw_overlay,
    name_method,
    plot_explanation,
    plot_explanations,
    plot_retrieval,
    save_figure,
)

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.1)


def normalise(image):
    return (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def make_explanation(kind, count, batch=1, labels=None, size=8):
    g = torch.Generator().manual_seed(count * 10 + batch)
    maps = torch.rand(batch, count, size, size, generator=g)
    return Explanation(
        images=normalise(torch.rand(batch, count, 3, size, size, generator=g)),
        kind=kind,
        raw_maps=maps[..., ::4, ::4],
        maps=maps,
        scores=torch.arange(batch * count, dtype=torch.float32).reshape(batch, count) / 8,
        weights=torch.rand(batch, 4, generator=g),
        embeddings=torch.rand(batch, count, 4, generator=g),
        labels=None if labels is None else torch.tensor(labels),
        mean=MEAN,
        std=STD,
    )


def image_axes(figure):
    return [ax for ax in figure.axes if ax.get_images()]


def colorbar_axes(figure):
    return [ax for ax in figure.axes if ax.get_ylabel().startswith("attention")]


def test_colorbar_names_the_method_that_made_the_maps():
    figure = plot_explanation(make_explanation("triplet", 3))
    assert [ax.get_ylabel() for ax in colorbar_axes(figure)] == [f"attention ({DEFAULT_METHOD})"]
    assert figure._suptitle.get_text() == f"maps: {DEFAULT_METHOD}"  # and its title
    sam = make_explanation("triplet", 3)
    sam.method = "sam"
    assert colorbar_axes(plot_explanation(sam))[0].get_ylabel() == "attention (sam)"
    mixed = plot_explanations([make_explanation("triplet", 3), sam])
    assert mixed._suptitle is None  # each row's colour bar names its own


def test_display_image_undoes_the_model_normalisation():
    original = torch.rand(3, 5, 7)
    shown = display_image(normalise(original), MEAN, STD)
    assert shown.shape == (5, 7, 3)
    np.testing.assert_allclose(shown, original.permute(1, 2, 0).numpy(), atol=1e-6)


def test_display_image_without_statistics_scales_min_max_and_greys():
    grey = torch.tensor([[[-2.0, 0.0], [2.0, 6.0]]])
    shown = display_image(grey)
    assert shown.shape == (2, 2, 3)
    np.testing.assert_allclose(shown[..., 0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(shown[..., 0], shown[..., 2])


def test_draw_overlay_puts_the_map_over_the_image_on_a_fixed_scale():
    figure = Figure()
    ax = figure.subplots()
    heat = torch.rand(6, 6)
    mappable = draw_overlay(ax, torch.rand(3, 6, 6), heat, cmap="magma", alpha=0.3, title="t")
    base, overlay = ax.get_images()
    assert overlay is mappable
    np.testing.assert_allclose(overlay.get_array(), heat.numpy())
    assert overlay.get_clim() == (0, 1)
    assert overlay.get_alpha() == 0.3 and overlay.get_cmap().name == "magma"
    assert ax.get_title() == "t" and not ax.axison
    assert draw_overlay(figure.subplots(), torch.rand(3, 6, 6)) is None


@pytest.mark.parametrize(
    "kind, count, labels, roles",
    [
        ("same_pair", 2, [[4, 4]], ["image 1 (label 4)", "image 2 (label 4)"]),
        ("triplet", 3, None, ["anchor", "positive", "negative"]),
        (
            "quadruplet",
            4,
            [[0, 0, 1, 2]],
            ["anchor (label 0)", "positive (label 0)", "negative 1 (label 1)",
             "negative 2 (label 2)"],
        ),  # fmt: skip
    ],
)
def test_one_tuple_titles_roles_labels_and_scores(kind, count, labels, roles):
    exp = make_explanation(kind, count, labels=labels)
    figure = plot_explanation(exp)
    axes = image_axes(figure)
    expected = [f"{role}\ns = {k / 8:.3g}" for k, role in enumerate(roles)]
    assert [ax.get_title() for ax in axes] == expected
    assert len(colorbar_axes(figure)) == 1
    for t, ax in enumerate(axes):
        base, overlay = ax.get_images()
        np.testing.assert_allclose(overlay.get_array(), exp.maps[0, t].numpy())
        np.testing.assert_allclose(
            base.get_array(), display_image(exp.images[0, t], MEAN, STD), atol=1e-6
        )
    assert figure.canvas.manager is None  # built without pyplot: no window, no global state


def test_batch_has_one_row_and_one_colorbar_per_tuple():
    exp = make_explanation("triplet", 3, batch=4)
    figure = plot_explanation(exp)
    assert len(image_axes(figure)) == 12 and len(colorbar_axes(figure)) == 4
    titles = [ax.get_title().split("\n")[1] for ax in image_axes(figure)]
    assert titles == [f"s = {k / 8:.3g}" for k in range(12)]
    chosen = plot_explanation(exp, indices=[2])
    assert [ax.get_title() for ax in image_axes(chosen)][0] == "anchor\ns = 0.75"


def test_mixed_kinds_share_columns_and_carry_row_titles():
    pair = make_explanation("different_pair", 2, labels=[[1, 2]])
    quad = make_explanation("quadruplet", 4)
    figure = plot_explanations([pair, quad], titles=["a pair", "a quadruplet"])
    assert len(image_axes(figure)) == 6 and len(colorbar_axes(figure)) == 2
    rows = figure.subfigs
    assert [r._suptitle.get_text() for r in rows] == ["a pair", "a quadruplet"]
    assert sum(1 for ax in rows[0].axes if not ax.get_images() and ax.get_ylabel() == "") == 2
    default = plot_explanations([pair])
    assert default.subfigs[0]._suptitle.get_text() == "different pair"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_explanations([])


def retrieval_inputs(k=3, size=8):
    g = torch.Generator().manual_seed(k)
    return (
        normalise(torch.rand(3, size, size, generator=g)),
        normalise(torch.rand(k, 3, size, size, generator=g)),
        torch.rand(k, size, size, generator=g),
        torch.rand(k, size, size, generator=g),
        torch.linspace(0.9, 0.5, k),
    )


def test_retrieval_figure_shows_query_matches_and_their_maps():
    query, gallery, query_maps, gallery_maps, scores = retrieval_inputs()
    figure = plot_retrieval(
        query, gallery, query_maps, gallery_maps, scores, mean=MEAN, std=STD,
        gallery_titles=["a.jpg", "b.jpg", "c.jpg"], query_title="q.jpg",
    )  # fmt: skip
    axes = image_axes(figure)
    assert [ax.get_title() for ax in axes] == [
        "q.jpg", "q.jpg vs #1", "q.jpg vs #2", "q.jpg vs #3",
        "#1 a.jpg\ncos = 0.900", "#2 b.jpg\ncos = 0.700", "#3 c.jpg\ncos = 0.500",
    ]  # fmt: skip
    assert len(axes[0].get_images()) == 1  # the query alone, without a map
    for j in range(3):
        np.testing.assert_allclose(axes[1 + j].get_images()[1].get_array(), query_maps[j])
        np.testing.assert_allclose(axes[4 + j].get_images()[1].get_array(), gallery_maps[j])
        np.testing.assert_allclose(
            axes[4 + j].get_images()[0].get_array(), display_image(gallery[j], MEAN, STD),
            atol=1e-6,
        )  # fmt: skip
    assert len(colorbar_axes(figure)) == 1
    assert figure.canvas.manager is None


def test_retrieval_figure_variants_and_bad_input():
    query, gallery, query_maps, gallery_maps, scores = retrieval_inputs(k=2)
    one_row = plot_retrieval(query, gallery, None, gallery_maps, scores, score_name="sim")
    assert [ax.get_title() for ax in image_axes(one_row)] == [
        "query", "#1\nsim = 0.900", "#2\nsim = 0.500",
    ]  # fmt: skip
    shared = plot_retrieval(query, gallery, query_maps[0], gallery_maps, scores)
    for ax in image_axes(shared)[1:3]:
        np.testing.assert_allclose(ax.get_images()[1].get_array(), query_maps[0])
    with pytest.raises(ValueError, match="same number k"):
        plot_retrieval(query, gallery, None, gallery_maps[:1], scores)
    with pytest.raises(ValueError, match="gallery_titles"):
        plot_retrieval(query, gallery, None, gallery_maps, scores, gallery_titles=["x"])


def test_retrieval_figure_names_its_method():
    query, gallery, query_maps, gallery_maps, scores = retrieval_inputs(k=2)
    figure = plot_retrieval(query, gallery, query_maps, gallery_maps, scores, method="psam")
    assert figure._suptitle.get_text() == "maps: psam"
    assert [ax.get_ylabel() for ax in colorbar_axes(figure)] == ["attention (psam)"]
    unnamed = plot_retrieval(query, gallery, query_maps, gallery_maps, scores)
    assert unnamed._suptitle is None
    assert name_method(unnamed, DEFAULT_METHOD)._suptitle.get_text() == f"maps: {DEFAULT_METHOD}"


def test_save_figure_creates_a_missing_folder(tmp_path):
    figure = Figure(figsize=(1, 1))
    path = tmp_path / "new" / "deeper" / "f.png"
    assert save_figure(figure, path, dpi=20) == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]


def test_save_figure_at_chosen_dpi_and_format(tmp_path):
    figure = Figure(figsize=(2, 1))
    figure.subplots().plot([0, 1])
    for dpi in (50, 120):
        path = save_figure(figure, tmp_path / f"f{dpi}.png", dpi=dpi)
        with Image.open(path) as image:
            assert image.size == (2 * dpi, dpi)
    assert (tmp_path / "f.svg").exists() is False
    save_figure(figure, tmp_path / "f.svg")
    assert (tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.svg", "f120.png", "f50.png"]
