"""sphinx-gallery hooks: a figure scraper for matplotlib's object API, example arguments.

simexplain never uses pyplot, so the stock scraper (which asks pyplot for its open
figures) sees nothing. :func:`object_api_scraper` collects every
``matplotlib.figure.Figure`` that an example's code block leaves in its globals, once per
figure. :func:`example_argv` gives the long-running examples their quick settings, so the
documentation build stays short.
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


# Command-line arguments per example file during the docs build.
_QUICK_ARGS = {"train_sam.py": ["--quick"]}


def example_argv(gallery_conf, script_vars) -> list[str]:
    from pathlib import Path

    return _QUICK_ARGS.get(Path(script_vars["src_file"]).name, [])
