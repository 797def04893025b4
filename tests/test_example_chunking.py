"""Sweeps that split their examples into chunks (`batch_size` below the number of examples): no forward, the cached
clean and corrupted runs included, holds more than `batch_size` rows, the metric sees each row's index in the whole
batch, and the results are the unsplit run's (to float32 rounding: a forward over fewer rows rounds differently;
exactly where the arithmetic is the same, against each chunk swept by hand)."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.tiny import build_blip, build_llava, random_image

N = 4  # examples; batch sizes 1 and 3 split them as 1+1+1+1 and 3+1
# measured: chunked vs unchunked, max |difference| over every sweep below, both models, batch sizes 1 and 3:
# 1.3e-5 (attribution with a Gaussian, and normalised BLIP groups: float32 rounding of matmuls over a different
# number of rows, divided by clean - corrupted, 0.035 for one example); most sweeps 1e-9..1e-6; ~8x margin
ATOL, RTOL = 1e-4, 1e-5


def _setup(hf, processor, prompts):
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=i) for i in range(N)]
    clean = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    corrupt = processor(images=images[1:] + images[:1], text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)  # one answer per example: the metric looks each row's up by its example
    return model, clean, corrupt, answer, (answer + 1) % logits.shape[-1]


@pytest.fixture(scope="module", params=["blip", "llava"])
def vlm(request):
    if request.param == "blip":
        hf, processor = build_blip("vqa", seed=7)
        prompts = ["what color is the car", "how many cats", "is it day", "where is the dog sitting now"]
        return ("text_encoder", *_setup(hf, processor, prompts))
    hf, processor = build_llava(seed=3, kv_heads=2)
    prompts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:",
               "USER: <image>\nwhy ASSISTANT:", "USER: <image>\ncount the cats please ASSISTANT:"]
    return ("lm", *_setup(hf, processor, prompts))


def _sweeps(tower, model, clean, corrupt, answer, wrong):
    """Each sweep, on the engine's paths: inputs and Corruptions, denoise and noise, a KV prefix (positions after
    the first), groups, per-example positions, windows, redraws per sample and per forward, ablation, attribution."""
    metric = metrics.logit_diff(answer, wrong)
    gauss = corruption.gaussian(3.0, seed=1)
    per_example = torch.tensor([[-1, -2]] * N)  # a [B, P] argument: resolved on the whole batch
    sweeps = {
        "resid_inputs": lambda **kw: patching.patch_resid(
            model, clean, corrupt, metric, tower=tower, positions=[-2, -1], **kw),
        "resid_inputs_noise_normalized": lambda **kw: patching.patch_resid(
            model, clean, corrupt, metric, tower=tower, positions=per_example, direction="noise", normalize=True,
            **kw),
        "resid_gaussian_groups": lambda **kw: patching.patch_resid(
            model, clean, gauss, metric, tower=tower, groups={"text": "text", "last": "last"}, normalize=True, **kw),
        "resid_gaussian_tokens_noise": lambda **kw: patching.patch_resid(
            model, clean, corruption.gaussian(2.0, site="tokens", positions=per_example, seed=4), metric,
            tower=tower, positions=[-1], direction="noise", **kw),
        "heads_by_position": lambda **kw: patching.patch_heads(
            model, clean, corrupt, metric, tower=tower, positions=[-1], by_position=True, **kw),
        "heads_groups_v": lambda **kw: patching.patch_heads(
            model, clean, gauss, metric, tower=tower, activation="v", groups=["last", [0, 1]], **kw),
        "trace_window": lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, window=3, positions=[-1], **kw),
        "trace_mlp_scale": lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, kind="mlp", corrupt=corruption.scale(0.5), positions=[-1], **kw),
        "trace_attn_sample_redraw": lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, kind="attn", corrupt=corruption.multiplicative(1.0, 2.0, seed=3),
            positions=[-1], samples=2, **kw),
        "trace_per_forward": lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, corrupt=corruption.multiplicative(1.0, 5.0, redraw="forward", seed=2),
            positions=[-1], samples=2, **kw),
        "ablation": lambda **kw: patching.ablation_sweep(model, clean, metric, tower=tower, **kw),
    }
    if tower == "text_encoder":  # BLIP's text encoder cross-attends to the image
        sweeps["trace_cross_attn"] = lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, kind="cross_attn", positions=[-1], **kw)
    for name, sweep in list(sweeps.items()):
        sweeps[name] = (lambda s: lambda **kw: s(progress=False, **kw))(sweep)
    for hook_or_heads, fn in (("attribution_resid", patching.attribution_patch_resid),
                              ("attribution_heads", patching.attribution_patch_heads)):
        for label, c in (("inputs", corrupt), ("gaussian", gauss)):
            sweeps[f"{hook_or_heads}_{label}"] = (lambda f, c: lambda **kw: f(
                model, clean, c, metric, tower=tower, positions=[-2, -1], normalize=True, **kw))(fn, c)
    return sweeps


class _Rows:
    """The rows of every forward of the model (its inputs' batch), as a forward pre-hook sees them."""

    def __init__(self, model):
        self.seen: list[int] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        value = kwargs.get("input_ids", kwargs.get("pixel_values"))
        self.seen.append(value.shape[0])


def _sweep_names():
    hf_free = ["resid_inputs", "resid_inputs_noise_normalized", "resid_gaussian_groups", "resid_gaussian_tokens_noise",
               "heads_by_position", "heads_groups_v", "trace_window", "trace_mlp_scale", "trace_attn_sample_redraw",
               "trace_per_forward", "ablation", "trace_cross_attn"]
    return hf_free + [f"attribution_{k}_{c}" for k in ("resid", "heads") for c in ("inputs", "gaussian")]


@pytest.mark.parametrize("name", _sweep_names())
def test_chunked_sweeps_equal_the_whole_batch_and_bound_every_forward(vlm, name):
    """Every sweep with batch_size 1 and 3 (4 examples: chunks 1+1+1+1 and 3+1; cache on the CPU for 3) gives the
    unsplit run's result (a random corruption's draws included: they are drawn for the whole batch), and no
    forward (cached runs, the global std's pass and backward included) holds more rows than batch_size."""
    sweeps = _sweeps(*vlm)
    if name not in sweeps:
        pytest.skip("BLIP only (cross-attention)")
    sweep = sweeps[name]
    whole = sweep(batch_size=None) if name.startswith("attribution") else sweep(batch_size=64)
    assert not whole.isnan().all()
    rows = _Rows(vlm[1])
    try:
        for batch_size, cache_device in ((1, None), (3, "cpu")):
            rows.seen.clear()
            chunked = sweep(batch_size=batch_size, cache_device=cache_device)
            assert rows.seen and max(rows.seen) <= batch_size, (batch_size, rows.seen)
            assert chunked.shape == whole.shape
            err = (chunked - whole).abs().nan_to_num().max().item()
            print(f"{name} batch_size={batch_size}: max |chunked - whole| = {err:.3g}")
            torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=RTOL, equal_nan=True, msg=name)
    finally:
        rows.handle.remove()


def test_each_chunk_is_exactly_the_sweep_of_its_examples(vlm):
    """A chunked ablation sweep equals, bit for bit, the sweeps of each chunk's examples run alone with their own
    answers: the same forwards run, and the metric of the chunked sweep looks each row's answer up by its index in
    the whole batch (examples 3 of 4 is 3, not 0)."""
    tower, model, clean, _, answer, wrong = vlm
    chunked = patching.ablation_sweep(model, clean, metrics.logit_diff(answer, wrong), tower=tower, batch_size=3,
                                      progress=False)
    parts = []
    for start, stop in ((0, 3), (3, 4)):
        sub = {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in clean.items()}
        parts.append(patching.ablation_sweep(model, sub, metrics.logit_diff(answer[start:stop], wrong[start:stop]),
                                             tower=tower, batch_size=3, progress=False))
    assert chunked.shape[-1] == N
    assert torch.equal(chunked, torch.cat(parts, dim=-1))


def test_the_metric_sees_global_example_indices_and_the_whole_count(vlm):
    """Inside a chunked sweep every row's example index is its index in the whole batch and
    `metrics.n_examples` is the whole batch's size, in the cached runs and in the patched ones."""
    tower, model, clean, corrupt, answer, wrong = vlm
    seen, counts = set(), set()
    inner = metrics.logit_diff(answer, wrong)

    def metric(logits, examples):
        seen.update(examples.tolist())
        counts.add(metrics.n_examples(examples))
        return inner(logits, examples)

    patching.patch_resid(model, clean, corrupt, metric, tower=tower, positions=[-1], batch_size=1, progress=False)
    assert seen == set(range(N)) and counts == {N}


def test_a_per_forward_redraw_does_not_change_with_the_chunking(vlm):
    """redraw="forward" draws each cell's noise for the whole batch and keeps the chunk's rows, so every example
    gets the numbers it gets unchunked; a chunk that drew for its own shape would change every cell."""
    tower, model, clean, _, answer, _ = vlm
    c = corruption.multiplicative(1.0, 5.0, redraw="forward", seed=11)
    kw = dict(tower=tower, corrupt=c, positions=[-1, -2], progress=False)
    whole = patching.causal_trace(model, clean, answer, batch_size=64, **kw)
    for batch_size in (1, 2, 3):
        torch.testing.assert_close(patching.causal_trace(model, clean, answer, batch_size=batch_size, **kw), whole,
                                   atol=ATOL, rtol=RTOL, equal_nan=True)


def test_per_example_results_keep_every_example(vlm):
    tower, model, clean, _, answer, wrong = vlm
    out = patching.ablation_sweep(model, clean, metrics.logit_diff(answer, wrong), tower=tower, batch_size=1,
                                  progress=False)
    info = model.tower_info(tower)
    assert out.shape == (info.n_layers, info.n_heads, N)


@pytest.mark.no_typecheck
def test_errors_name_global_examples_and_what_to_pass(vlm):
    """A chunk's normalisation error names the example by its index in the whole batch; a per-example list of the
    wrong length fails in every chunk; a from_hooks corruption refuses to be split."""
    tower, model, clean, corrupt, answer, wrong = vlm
    same = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in corrupt.items()}
    same["pixel_values"][2] = clean["pixel_values"][2]  # example 2's corrupted run is its clean run
    metric = metrics.logit_diff(answer, wrong)
    with pytest.raises(ValueError, match=r"examples \[2\] have equal clean and corrupted"):
        patching.patch_resid(model, clean, same, metric, tower=tower, positions=[-1], normalize=True, batch_size=1,
                             progress=False)
    short = metrics.logit_diff(answer[:1].tolist() * 2, 0)  # 2 answers for 4 examples: a chunk of 2 must not pass
    with pytest.raises(ValueError, match="2 values given, but the batch has 4 examples"):
        patching.patch_resid(model, clean, corrupt, short, tower=tower, positions=[-1], batch_size=2,
                             progress=False)
    hooks = corruption.from_hooks([(model.hook_names()[0], lambda t, hook: t)])
    with pytest.raises(ValueError, match="from_hooks corruption runs on the whole batch"):
        patching.patch_resid(model, clean, hooks, metric, tower=tower, positions=[-1], batch_size=2,
                             progress=False)


# ------------------------------------------------------------------------------------------ metrics.per_row
def test_per_row_on_a_chunk_of_examples():
    """Rows of examples 4..7 of 8: per-example values are looked up by the global index and checked against the
    whole batch's count (carried by `evaluate`); outside a sweep the count is max(examples) + 1."""
    answers = list(range(100, 108))
    rows = torch.tensor([4, 5, 6, 7, 4])
    got = metrics.evaluate(lambda logits, ex: metrics.per_row(answers, ex).float(), torch.zeros(5, 3), rows, "t",
                           n_examples=8)
    assert got.tolist() == [104, 105, 106, 107, 104]
    with pytest.raises(ValueError, match="7 values given, but the batch has 8 examples"):
        metrics.evaluate(lambda logits, ex: metrics.per_row(answers[:7], ex).float(), torch.zeros(5, 3), rows, "t",
                         n_examples=8)
    with pytest.raises(ValueError, match="not examples of a batch of 6"):
        metrics.evaluate(lambda logits, ex: ex.float(), torch.zeros(5, 3), rows, "t", n_examples=6)
    first = torch.tensor([0, 1, 2, 3])  # examples 0..3 of 8: the whole count, not 4, is what the list must match
    with pytest.raises(ValueError, match="4 values given, but the batch has 8 examples"):
        metrics.evaluate(lambda logits, ex: metrics.per_row(answers[:4], ex).float(), torch.zeros(4, 3), first, "t",
                         n_examples=8)
    assert metrics.n_examples(rows) == 8  # outside evaluate: max + 1
    assert metrics.per_row(answers, torch.arange(8)).tolist() == answers


def test_answer_tables_on_a_chunk_of_examples():
    """Per-example answers of several tokens (`answer_prob`) on rows of examples 2..3 of 4 pick those examples'."""
    answers = [[1], [2, 3], [4], [5, 6]]
    metric = metrics.answer_prob(answers, "first")
    logits = torch.randn(2, 10)
    rows = torch.tensor([2, 3])
    got = metrics.evaluate(metric, logits, rows, "t", n_examples=4)
    p = logits.float().softmax(-1)
    assert torch.equal(got, torch.stack([p[0, 4], p[1, 5]]))
    with pytest.raises(ValueError, match="answers: 4 given, but the batch has 5 examples"):
        metrics.evaluate(metric, logits, rows, "t", n_examples=5)
