"""Bad inputs to the sweeps, metrics, analyses, interventions and cache views: each row is one misuse, the error
type it must raise and words its one-line message must hold (what is wrong and what to fix). Below the table, the
cases where a number would come out non-finite: they raise, or warn with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from badcase import expect_error

from hooked_vlm import analysis, interventions, metrics, patching
from hooked_vlm.analysis import HeadScores
from hooked_vlm.tiny import make_llama_tokenizer, random_image

from conftest import LLAVA_PROMPT

TOWER = {"blip": "text_decoder", "llava": "lm", "instructblip-llama": "lm", "instructblip-t5": "lm_decoder"}


def tok(f):
    return getattr(f.processor, "tokenizer", f.processor)


def pair(f):
    """The family's inputs and a corrupted copy (the image negated): the same token counts."""
    corrupt = dict(f.inputs, pixel_values=-f.inputs["pixel_values"])
    return f.inputs, corrupt


DIFF = metrics.logit_diff(1, 2)


def resid(f, **kw):
    clean, corrupt = pair(f)
    kw = {"tower": TOWER[f.name], "progress": False, **kw}
    return patching.patch_resid(f.model, clean, kw.pop("corrupt", corrupt), kw.pop("metric", DIFF), **kw)


def logits(f):
    with torch.no_grad():
        return f.model(**f.inputs)


def cache(f):
    return f.model.run_with_cache(**f.inputs)[1]


def longer_prompt(f):
    return dict(f.processor(images=random_image(seed=1), text=LLAVA_PROMPT.replace("picture?", "picture today?"),
                            return_tensors="pt"))


def scores(correct: list[bool]) -> HeadScores:
    g = torch.Generator().manual_seed(0)
    return HeadScores(torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g),
                      torch.tensor(correct))


P = pytest.param
ROWS = [
    # ---------------------------------------------------------------- answers and metrics
    P("blip", lambda f: metrics.answer_token(tok(f), ""), ValueError, "empty", "''", id="answer-empty"),
    P("llava", lambda f: metrics.answer_token(tok(f), "   "), ValueError, "empty", id="answer-whitespace"),
    P("blip", lambda f: metrics.answer_token(tok(f), "Zebra"), ValueError, "unknown token", "[UNK]", "vocabulary",
      id="answer-unk-bert"),
    P("instructblip-t5", lambda f: metrics.answer_token(tok(f), "€"), ValueError, "unknown token", "<unk>",
      id="answer-unk-t5"),
    P("blip", lambda f: metrics.answer_token(tok(f), 7), TypeError, "str", id="answer-not-a-word"),
    P("blip", lambda f: metrics.answer_token(tok(f), wrod="yes"), TypeError, "'word'", id="answer-typo-keyword"),
    P("blip", lambda f: metrics.logit_diff("cat", "dog"), TypeError, "'cat'", "token id", "answer_token",
      id="logit-diff-words"),
    P("blip", lambda f: metrics.logit_diff(1.5, 2), TypeError, "correct=1.5", "int", id="logit-diff-float-id"),
    P("llava", lambda f: metrics.prob(torch.tensor([0.5])), TypeError, "float", "integer", id="prob-float-tensor"),
    P("llava", lambda f: metrics.logit_diff(1, 2, postion=-1), TypeError, "'position'", id="logit-diff-typo-keyword"),
    P("llava", lambda f: metrics.logit_diff(10**6, 2)(logits(f), torch.arange(1)), ValueError, "correct=1000000",
      "out of range", id="logit-diff-id-beyond-vocab"),
    P("instructblip-llama", lambda f: metrics.log_prob(3, position=500)(logits(f), torch.arange(1)), ValueError,
      "position=500", "out of range", id="log-prob-position-out-of-range"),
    P("blip", lambda f: metrics.logit_diff([1, 2, 3], 4)(logits(f), torch.arange(1)), ValueError, "3 values",
      "1 examples", id="per-example-ids-wrong-length"),
    P("blip", lambda f: metrics.normalized(torch.ones(2), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])),
      ValueError, "examples [1]", "equal clean and corrupted", "normalize=False", id="normalized-equal-metrics"),
    # ---------------------------------------------------------------- sweeps: arguments
    P("llava", lambda f: resid(f, metric=lambda lg, ex: lg[:, -1, 0].sum()), ValueError, "one value per row",
      "shape [1]", id="metric-returns-a-scalar"),
    P("blip", lambda f: resid(f, metric="logit_diff"), TypeError, "metric is a str", "function",
      id="metric-not-callable"),
    P("blip", lambda f: patching.patch_resid(f.model, f.inputs["input_ids"], f.inputs, DIFF, tower="text_decoder"),
      TypeError, "clean inputs", "processor's output", id="inputs-a-tensor"),
    P("blip", lambda f: resid(f, normalize=True, corrupt=f.inputs), ValueError, "examples [0]",
      "equal clean and corrupted", "normalize=False", id="normalize-equal-runs"),
    P("instructblip-llama", lambda f: patching.attribution_patch_resid(
        f.model, f.inputs, f.inputs, DIFF, tower="lm", normalize=True), ValueError, "examples [0]", "normalize=False",
      id="attribution-normalize-equal-runs"),
    P("llava", lambda f: patching.attribution_patch_resid(f.model, f.inputs, longer_prompt(f), DIFF, tower="lm"),
      ValueError, "differ in shape", "token counts", id="attribution-different-lengths"),
    P("llava", lambda f: patching.patch_resid(f.model, f.inputs, longer_prompt(f), DIFF, tower="lm", progress=False),
      ValueError, "differ in length", id="patch-different-lengths"),
    P("blip", lambda f: resid(f, tower="text"), KeyError, "'text'", "towers are", id="unknown-tower"),
    P("instructblip-t5", lambda f: resid(f, positions=[]), ValueError, "positions is empty", id="no-positions"),
    P("instructblip-t5", lambda f: resid(f, positions=[999]), ValueError, "position 999", "out of range",
      id="position-out-of-range"),
    P("blip", lambda f: resid(f, positions=[0.5]), TypeError, "integer positions", id="float-positions"),
    P("llava", lambda f: resid(f, hook="resid"), ValueError, "hook must be one of", "resid_pre", id="unknown-hook"),
    P("llava", lambda f: resid(f, direction="both"), ValueError, "'denoise' or 'noise'", id="unknown-direction"),
    P("blip", lambda f: resid(f, normalise=True), TypeError, "'normalise'", "did you mean 'normalize'",
      id="patch-resid-typo-keyword"),
    P("llava", lambda f: patching.patch_heads(f.model, *pair(f), DIFF, tower="lm", attention="cross_attn"),
      ValueError, "no cross-attention", "'lm'", id="patch-heads-no-cross-attn"),
    P("blip", lambda f: patching.patch_heads(f.model, *pair(f), DIFF, tower="text_decoder", attention="self"),
      ValueError, "'attn' or 'cross_attn'", id="patch-heads-unknown-attention"),
    P("instructblip-llama", lambda f: patching.attribution_patch_heads(f.model, *pair(f), DIFF, tower="lm",
                                                                       attention="cross"),
      ValueError, "'attn' or 'cross_attn'", id="attribution-heads-unknown-attention"),
    P("llava", lambda f: patching.causal_trace(f.model, f.inputs, 5, tower="lm", kind="cross_attn"), ValueError,
      "kind='cross_attn'", "no cross-attention", id="trace-cross-attn-on-llava"),
    P("blip", lambda f: patching.causal_trace(f.model, f.inputs, 5, tower="text_decoder", noise=0, normalize=True),
      ValueError, "noise=0", "normalize=False", id="trace-zero-noise-normalized"),
    P("instructblip-t5", lambda f: patching.causal_trace(f.model, f.inputs, 5, tower="lm_decoder", noise=-1.0),
      ValueError, "noise=-1.0", "positive", id="trace-negative-noise"),
    P("blip", lambda f: patching.causal_trace(f.model, f.inputs, 5, tower="text_decoder", nosie=3.0), TypeError,
      "did you mean 'noise'", id="trace-typo-keyword"),
    P("blip", lambda f: patching.causal_trace(f.model, f.inputs, "yes", tower="text_decoder"), TypeError,
      "'yes'", "answer_token", id="trace-target-a-word"),
    P("blip", lambda f: patching.causal_trace(f.model, f.inputs, 5, tower="text_decoder", corrupt=[]), ValueError,
      "positions is empty", id="trace-no-positions"),
    P("llava", lambda f: patching.ablation_sweep(f.model, f.inputs, DIFF, tower="lm", mode="mean"), ValueError,
      "'zero' or 'mean_of_others'", id="ablation-sweep-unknown-mode"),
    P("instructblip-llama", lambda f: patching.ablation_sweep(f.model, f.inputs, DIFF, tower="lm",
                                                              attention="cross_attn"),
      ValueError, "no cross-attention", id="ablation-sweep-no-cross-attn"),
    P("blip", lambda f: patching.sweep_dataset(patching.patch_resid, f.model, [pair(f) + (DIFF,)],
                                               tower="text_decoder", normalise=True),
      TypeError, "sweep_dataset(patch_resid)", "did you mean 'normalize'", id="sweep-dataset-typo-keyword"),
    P("blip", lambda f: patching.sweep_dataset(patching.patch_resid, f.model, [], tower="text_decoder"), ValueError,
      "no examples", id="sweep-dataset-empty"),
    P("blip", lambda f: patching.sweep_dataset(patching.patch_resid, f.model, [f.inputs], tower="text_decoder"),
      TypeError, "example 0 is a dict", "tuple", id="sweep-dataset-example-not-a-tuple"),
    # ---------------------------------------------------------------- cache views
    P("blip", lambda f: cache(f).stack_head_results(tower="vision", attention="cross_attn"), ValueError,
      "'vision' has no cross-attention", "attention='attn'", id="stack-heads-no-cross-attn"),
    P("llava", lambda f: cache(f).stack_head_results(tower="lm", attention="xattn"), ValueError,
      "'attn' or 'cross_attn'", id="stack-heads-unknown-attention"),
    P("instructblip-llama", lambda f: cache(f).stack_head_results(99, tower="lm"), ValueError, "layer=99",
      "out of range", id="stack-heads-layer-out-of-range"),
    P("instructblip-t5", lambda f: cache(f).accumulated_resid(layer=-2, tower="lm_encoder"), ValueError, "layer=-2",
      "out of range", id="accumulated-resid-layer-negative"),
    # ---------------------------------------------------------------- analyses
    P("blip", lambda f: analysis.select_heads(torch.full((3, 4), 0.5)), ValueError, "same mean |score|",
      id="select-heads-constant"),
    P("blip", lambda f: analysis.select_heads(torch.tensor([[1.0, float("nan")], [0.0, 2.0]])), ValueError, "NaN",
      "nan_to_num", id="select-heads-nan"),
    P("blip", lambda f: analysis.select_heads(torch.ones(2, 2), kstd=1), TypeError, "did you mean 'k_std'",
      id="select-heads-typo-keyword"),
    P("blip", lambda f: scores([False, False]).positive_heads(2), ValueError, "no example", "answered correctly",
      id="positive-heads-none-correct"),
    P("blip", lambda f: scores([True, True]).negative_heads(2), ValueError, "answered correctly", "wrongly",
      id="negative-heads-all-correct"),
    P("blip", lambda f: scores([True, False]).positive_heads(0), ValueError, "k=0", id="positive-heads-k-zero"),
    P("llava", lambda f: analysis.mean_activation(f.model, [], "lm.blocks.0.hook_resid_post"), ValueError,
      "no batches", id="mean-activation-no-batches"),
    P("llava", lambda f: analysis.mean_activation(
        f.model, [dict(f.inputs, attention_mask=torch.zeros_like(f.inputs["attention_mask"]))],
        "lm.blocks.0.hook_resid_post", over="tokens"), ValueError, "all padding", id="mean-activation-all-padding"),
    P("llava", lambda f: analysis.mean_activation(f.model, [f.inputs], "lm.blocks.0.hook_resid_post", over="batch"),
      ValueError, "'examples' or 'tokens'", id="mean-activation-unknown-over"),
    P("instructblip-llama", lambda f: analysis.logit_lens(f.model, f.inputs, tower="lm", k=10**7), ValueError,
      "k=10000000", id="logit-lens-k-above-vocab"),
    P("instructblip-llama", lambda f: analysis.logit_lens(f.model, f.inputs, tower="lm", positions=[500]), ValueError,
      "position 500", "out of range", id="logit-lens-position-out-of-range"),
    P("llava", lambda f: analysis.head_scores(f.model, f.inputs, 3, towr="lm"), TypeError, "did you mean 'tower'",
      id="head-scores-typo-keyword"),
    P("llava", lambda f: analysis.head_scores(f.model, f.inputs, "yes"), TypeError, "answer_token",
      id="head-scores-answer-a-word"),
    # ---------------------------------------------------------------- interventions
    P("llava", lambda f: interventions.ablate_heads(f.model, [(99, 0)]), KeyError, "lm.blocks.99.attn.hook_z",
      id="ablate-layer-out-of-range"),
    P("llava", lambda f: interventions.ablate_heads(f.model, [(-1, 0)]), ValueError, "layer -1", "negative",
      id="ablate-negative-layer"),
    P("instructblip-llama", lambda f: interventions.ablate_heads(f.model, [(0, 99)]), ValueError, "head 99",
      "out of range", id="ablate-head-out-of-range"),
    P("llava", lambda f: interventions.ablate_heads(f.model, []), ValueError, "no heads", id="ablate-no-heads"),
    P("llava", lambda f: interventions.ablate_heads(f.model, [(0, 0)], mode="avg"), ValueError, "mode must be",
      id="ablate-unknown-mode"),
    P("llava", lambda f: interventions.ablate_heads(f.model, [(0, 0)], mode="mean"), ValueError, "means[",
      "mean_activation", id="ablate-mean-without-means"),
    P("blip", lambda f: interventions.ablate_heads(f.model, ["0,1"], tower="text_decoder"), TypeError,
      "(layer, head) pair", id="ablate-head-not-a-pair"),
    P("blip", lambda f: interventions.ablate_heads(f.model, [(0, 0)], tower="llm"), KeyError, "'llm'", "towers are",
      id="ablate-unknown-tower"),
    P("instructblip-t5", lambda f: interventions.scale_heads(f.model, {(0, 0): float("nan")}, tower="lm_decoder"),
      ValueError, "not a finite number", id="scale-heads-nan-factor"),
    P("llava", lambda f: interventions.attention_knockout(f.model, [0], [1], layers=[]), ValueError,
      "layers is empty", id="knockout-no-layers"),
    P("llava", lambda f: interventions.attention_knockout(f.model, [0], [1], layers=[0], heads=[99]), ValueError,
      "heads [99]", "out of range", id="knockout-head-out-of-range"),
    P("llava", lambda f: interventions.replace_positions(f.model, "lm.hook_embed", [0], valeu=0.0), TypeError,
      "did you mean 'value'", id="replace-positions-typo-keyword"),
]


@pytest.mark.parametrize("family,call,error,words", [P(*p.values[:3], p.values[3:], id=p.id) for p in ROWS])
def test_bad_sweep_input(families, family, call, error, words):
    expect_error(lambda: call(families[family]), error, *words)


# ---------------------------------------------------------------------------------------------- finite or explained
def test_answer_token_skips_a_lone_word_boundary_piece():
    tokenizer = make_llama_tokenizer()
    ids = tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "▁"  # the tiny Llama tokenizer spells "yes" out after "▁"
    assert metrics.answer_token(tokenizer, "yes") == ids[1]


def test_a_non_finite_metric_of_the_unpatched_runs_raises(families):
    f = families["blip"]
    nan_metric = lambda lg, ex: torch.full((lg.shape[0],), float("nan"))  # noqa: E731
    expect_error(lambda: resid(f, metric=nan_metric), ValueError, "metric is nan", "dtype")


def test_a_non_finite_metric_in_a_patched_run_warns(families):
    """A metric that overflows only in the patched runs (as half precision can) is reported, with the layer."""
    f = families["blip"]
    calls = []

    def metric(lg, ex):
        calls.append(1)
        value = DIFF(lg, ex)
        return value if len(calls) <= 2 else value + float("inf")  # the two unpatched runs stay finite

    with pytest.warns(RuntimeWarning) as record:
        out = resid(f, metric=metric, positions=[0])
    said = [str(w.message) for w in record]
    assert any("non-finite" in m and "at layer 0 of 'text_decoder'" in m for m in said), said
    assert torch.isinf(out).all()  # every cell holds what the metric gave, none is averaged away


def test_normalized_sweep_is_finite_where_metrics_differ(families):
    """The check does not refuse what is fine: a normalised sweep whose runs differ gives finite cells, and the
    cell of the whole clean activation at block 0 is 1 by definition."""
    f = families["llava"]
    clean, corrupt = pair(f)
    out = patching.patch_resid(f.model, clean, corrupt, DIFF, tower="lm", normalize=True, progress=False)
    assert torch.isfinite(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.normalized(torch.ones(2), torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]))


def test_head_scores_with_no_correct_answer_give_no_positive_heads(families):
    f = families["llava"]
    with torch.no_grad():
        wrong = int(f.model(**f.inputs)[0, -1].argmin())  # an answer the model surely does not give
    got = analysis.head_scores(f.model, f.inputs, wrong, tower="lm", progress=False)
    assert not got.correct.any()
    expect_error(lambda: got.positive_heads(3), ValueError, "answered correctly")
    assert len(got.negative_heads(3)) == 3
