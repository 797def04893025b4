"""Each paper's example script runs end to end on the embedded tiny models and writes its figures."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name,figures", [
    ("blip_causal_tracing", ["encoder_resid.png", "encoder_attn_w3.png", "encoder_cross_attn_w3.png",
                             "decoder_resid.png"]),
    ("notice", ["sip_cross_attention_heads.png", "sip_stream.png", "str_self_attention_heads.png",
                "top_head_overlay.png", "llava_sip_lm_heads.png"]),
    ("neo", ["logit_lens_image_tokens.png", "logit_lens_last_layer.png"]),
    ("vseam", ["head_positive.png", "head_negative.png", "head_delta.png"]),
])
def test_example_runs(name, figures, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(name)
    assert module.main(["--out", str(tmp_path), "--pairs", "2", "--device", "cpu"]) == 0
    for figure in figures:
        assert (tmp_path / figure).stat().st_size > 1000, figure
    sys.modules.pop(name, None)


def test_vseam_ablates_no_heads_when_no_fit_example_is_answered_correctly(tmp_path, monkeypatch, capsys):
    """With no correct answer there are no positive heads: the script says so instead of ablating arbitrary ones."""
    from hooked_vlm import analysis

    real = analysis.head_scores

    def all_wrong(model, inputs, answer, **kw):
        scores = real(model, inputs, answer, **kw)
        scores.positive = torch.full_like(scores.positive, float("nan"))  # what no correct example gives
        scores.correct = torch.zeros_like(scores.correct)
        return scores

    monkeypatch.setattr(analysis, "head_scores", all_wrong)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module("vseam")
    try:
        assert module.main(["--out", str(tmp_path), "--pairs", "2", "--device", "cpu"]) == 0
    finally:
        sys.modules.pop("vseam", None)
    out = capsys.readouterr().out
    assert "C5 skipped" in out and "positive heads none" in out
    assert "zero" not in out  # no ablation row
