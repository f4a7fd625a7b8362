"""Sphinx configuration for simexplain."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

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
exclude_patterns = ["_build"]
