"""A sphinx-gallery image scraper for figures made with matplotlib's object API.

simexplain never uses pyplot, so the stock scraper (which asks pyplot for its open
figures) sees nothing. This one collects every ``matplotlib.figure.Figure`` that an
example's code block leaves in its globals, once per figure.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from sphinx_gallery.scrapers import figure_rst

_seen: set[int] = set()


def _figures(value):
    if isinstance(value, Figure):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, Figure):
                yield item


def object_api_scraper(block, block_vars, gallery_conf, **kwargs) -> str:
    paths = []
    for value in list(block_vars["example_globals"].values()):
        for figure in _figures(value):
            if id(figure) in _seen:
                continue
            _seen.add(id(figure))
            path = next(block_vars["image_path_iterator"])
            figure.savefig(path, dpi=80)
            paths.append(path)
    return figure_rst(paths, gallery_conf["src_dir"])
