"""``import simexplain`` is light: names load their module on first use, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import simexplain

# (tqdm is left out: torch itself imports it.)
HEAVY = ("captum", "matplotlib", "PIL", "timm", "torchvision", "safetensors", "onnxruntime",
         "onnx")
OURS = ("simexplain.apps", "simexplain.attribution", "simexplain.cli", "simexplain.demo",
        "simexplain.viz")


def modules_after(code: str) -> set[str]:
    """The modules loaded by ``code`` in a new interpreter."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def loaded(modules: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in roots))


def test_import_simexplain_loads_nothing_heavy():
    modules = modules_after("import simexplain")
    assert loaded(modules, HEAVY + OURS + ("torch",)) == []


@pytest.mark.parametrize("name, allowed", [
    ("explain", {"PIL", "simexplain.apps"}),   # images may be files, read with PIL
    ("get_method", set()),
    ("SAMLoss", set()),
    ("SimilarityEngine", set()),
])
def test_a_name_loads_only_what_it_needs(name, allowed):
    modules = modules_after(f"from simexplain import {name}")
    heavy = set(loaded(modules, HEAVY + OURS)) - {
        m for m in loaded(modules, tuple(allowed))
    }
    assert sorted(heavy) == [], f"{name} loaded {sorted(heavy)}"


def test_the_captum_face_loads_captum_and_nothing_above_it():
    modules = modules_after("from simexplain import EmbeddingAttribution")
    assert "captum" in modules  # (which itself imports matplotlib's pyplot)
    assert loaded(modules, ("simexplain.apps", "simexplain.cli", "simexplain.demo",
                            "simexplain.viz", "simexplain.training")) == []


def test_root_names_resolve_and_unknown_ones_raise():
    assert all(hasattr(simexplain, name) for name in simexplain.__all__)
    assert set(simexplain.__all__) <= set(dir(simexplain))
    assert simexplain.metrics.pointing_game is simexplain.metrics.localisation.pointing_game
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        simexplain.nothing_here  # noqa: B018
