"""The discriminative benchmark's quick mode runs end to end on the pretrained backbone."""

import json

from pretrained_inputs import needs_pretrained

from simexplain.methods import DEFAULT_METHOD

pytestmark = needs_pretrained


def test_quick_run_writes_every_method_and_the_model_occlusion(tmp_path):
    import discriminative

    out = tmp_path / "discriminative.md"
    assert discriminative.main(["--quick", "--kinds", "pair", "triplet", "--out", str(out)]) == 0
    text = out.read_text()
    for method in discriminative.METHODS:
        assert f"| {method} |" in text
    assert "occlusion (model)" in text and "## triplets, signed+rot embedding" in text
    assert "agrees with model" in text and "deletion AUC" in text
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    rotated = summary[f"pooled|pair|{DEFAULT_METHOD}"]["rotation_corr"][0]
    assert rotated > 0.999  # the default's maps do not move when the embedding is rotated
    assert summary["pooled|pair|sam"]["partner_corr"][0] > 0.9  # paper SAM's barely do
    row = summary[f"pooled|pair|{DEFAULT_METHOD}"]
    assert 0 <= row["agrees"][0] <= 1 and row["deletion_auc"][0] < row["insertion_auc"][0]
