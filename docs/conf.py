"""Sphinx configuration for simexplain."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

import simexplain  # noqa: E402

project = "simexplain"
author = "simexplain contributors"
copyright = "2026, simexplain contributors"
release = simexplain.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx_gallery.gen_gallery",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
intersphinx_mapping = {}
html_theme = "furo"
html_title = f"simexplain {release}"
exclude_patterns = ["_build", "sg_execution_times.rst"]

# The examples run during the build (small models, generated data, CPU), so the gallery
# shows real figures. Every example file is executed.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r".*\.py$",
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("gallery_hooks.object_api_scraper",),
    "reset_argv": "gallery_hooks.example_argv",
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "abort_on_example_error": True,
}
