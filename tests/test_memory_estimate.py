"""`patching.memory_estimate` and `batch_size="auto"`: the bytes a sweep caches per example are exactly what it
caches, the per-row estimate bounds the measured peak of whole sweeps on the CPU, and "auto" picks the largest batch
size within the budget (or says what to lower)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.tiny import build_blip, build_llava, random_image

N = 4


@pytest.fixture(scope="module", params=["blip", "llava"])
def vlm(request):
    if request.param == "blip":
        hf, processor = build_blip("vqa", seed=7)
        tower, prompts = "text_encoder", ["what color is the car", "how many cats", "is it day", "where is it"]
    else:
        hf, processor = build_llava(seed=3, kv_heads=2)
        tower = "lm"
        prompts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:",
                   "USER: <image>\nwhy ASSISTANT:", "USER: <image>\ncount the cats ASSISTANT:"]
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=i) for i in range(N)]
    clean = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    corrupt = processor(images=images[1:] + images[:1], text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        answer = model(**clean)[:, -1].argmax(-1)
    return tower, model, clean, corrupt, answer, metrics.logit_diff(answer, (answer + 1) % 50)


def _cases(tower, model, clean, corrupt, answer, metric):
    """(sweep call taking batch_size, memory_estimate's arguments) for each way a sweep caches."""
    gauss = corruption.gaussian(3.0, seed=1)
    cases = {}
    for direction in ("denoise", "noise"):
        for label, c in (("inputs", corrupt), ("gaussian", gauss)):
            cases[f"resid_{label}_{direction}"] = (
                lambda c=c, d=direction, **kw: patching.patch_resid(model, clean, c, metric, tower=tower,
                                                                    positions=[-1], direction=d, progress=False, **kw),
                dict(corrupt=c, sweep="patch_resid", direction=direction))
            cases[f"attribution_{label}_{direction}"] = (
                lambda c=c, d=direction, **kw: patching.attribution_patch_heads(
                    model, clean, c, metric, tower=tower, positions=[-1], direction=d, **kw),
                dict(corrupt=c, sweep="attribution_patch_heads", direction=direction))
    cases["heads_pattern"] = (
        lambda **kw: patching.patch_heads(model, clean, corrupt, metric, tower=tower, activation="pattern",
                                          progress=False, **kw),
        dict(corrupt=corrupt, sweep="patch_heads", activation="pattern"))
    cases["trace_mlp"] = (
        lambda **kw: patching.causal_trace(model, clean, answer, tower=tower, kind="mlp", positions=[-1],
                                           progress=False, **kw),
        dict(sweep="causal_trace", kind="mlp"))
    cases["ablation"] = (lambda **kw: patching.ablation_sweep(model, clean, metric, tower=tower, progress=False, **kw),
                         dict(sweep="ablation_sweep"))
    return cases


def _cached_bytes(model, monkeypatch):
    """The bytes of every cache the sweep's runs return (activations and tower outputs), the std pass excluded."""
    total = []
    run_with_cache = model.run_with_cache

    def spy(*args, **kwargs):
        out = run_with_cache(*args, **kwargs)
        if kwargs.get("stop_at_hook") is None:
            cache = out[1]
            total.append(sum(v.nbytes for v in cache.store.values())
                         + sum(v.nbytes for v in cache.tower_outputs.values()))
        return out

    monkeypatch.setattr(model, "run_with_cache", spy)
    return total


@pytest.mark.parametrize("case", ["resid_inputs_denoise", "resid_inputs_noise", "resid_gaussian_denoise",
                                  "resid_gaussian_noise", "attribution_inputs_denoise", "attribution_inputs_noise",
                                  "attribution_gaussian_denoise", "attribution_gaussian_noise", "heads_pattern",
                                  "trace_mlp", "ablation"])
def test_cached_bytes_per_example_are_exact(vlm, case, monkeypatch):
    """The summed nbytes of every cache a sweep makes is N x `cached_per_example`, unsplit and in chunks of 2."""
    tower, model = vlm[0], vlm[1]
    sweep, args = _cases(*vlm)[case]
    est = patching.memory_estimate(model, vlm[2], tower=tower, **args)
    assert est.cached_per_example > 0
    for batch_size in (64, 2):
        total = _cached_bytes(model, monkeypatch)
        sweep(batch_size=batch_size)
        monkeypatch.undo()
        assert sum(total) == N * est.cached_per_example, (case, batch_size, total, est)


def _peak(fn) -> int:
    """The peak of CPU memory allocated by torch while `fn` runs, above what was allocated before, from the
    profiler's allocation events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = best = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        best = max(best, live)
    return best


@pytest.mark.parametrize("case", ["resid_inputs_denoise", "resid_gaussian_noise", "heads_pattern", "ablation",
                                  "attribution_inputs_denoise"])
def test_the_estimate_bounds_the_measured_peak(vlm, case):
    """A whole sweep's measured peak (caches, forwards, metric; on the CPU) stays under `peak(batch_size, N)` for
    batch sizes that split the examples and that stack several cells per forward."""
    tower, model = vlm[0], vlm[1]
    sweep, args = _cases(*vlm)[case]
    est = patching.memory_estimate(model, vlm[2], tower=tower, **args)
    for batch_size in (2, 8):
        measured = _peak(lambda: sweep(batch_size=batch_size))
        bound = est.peak(batch_size, N)
        print(f"{case} batch_size={batch_size}: measured {measured} <= estimated {bound} "
              f"({measured / bound:.2f})")
        assert measured <= bound, (case, batch_size, measured, bound, est)


def test_per_row_parts_follow_the_config(vlm):
    """The logits and KV parts are the config's arithmetic: T x V (model dtype) plus two float32 vocabulary rows;
    2 x layers x T x kv_heads x d_head for a causal tower's keys and values."""
    tower, model, clean = vlm[0], vlm[1], vlm[2]
    est = patching.memory_estimate(model, clean, vlm[3], tower=tower)
    with torch.no_grad():
        logits = model(**{k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in clean.items()})
    V, T, size = logits.shape[-1], logits.shape[1], logits.element_size()
    assert est.parts["logits"] == T * V * size + 2 * 4 * V
    blocks = model.towers()[tower].blocks
    cfg = blocks[0].cfg.attn
    if model.towers()[tower].prefix_resumable:  # the LM: its sequence is the logits'
        assert est.parts["kv"] == 2 * len(blocks) * T * cfg.n_kv_heads * cfg.d_head * size
    else:
        assert est.parts["kv"] == 0
    assert est.per_row == sum(est.parts.values())


def test_auto_picks_the_largest_batch_within_the_budget(vlm):
    tower, model, clean, corrupt, answer, metric = vlm
    est = patching.memory_estimate(model, clean, corrupt, tower=tower)
    for budget in (est.peak(1, N), est.peak(3, N) + 1, est.peak(4, N), est.peak(4, N) + est.per_row - 1,
                   est.peak(40, N)):
        chosen = est.batch_size(budget, N)
        assert est.peak(chosen, N) <= budget < est.peak(chosen + 1, N), (budget, chosen)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        auto = patching.patch_resid(model, clean, corrupt, metric, tower=tower, positions=[-1], progress=False,
                                    batch_size="auto", memory_budget=est.peak(3, N))
    finally:
        handle.remove()
    assert max(seen) == 3
    fixed = patching.patch_resid(model, clean, corrupt, metric, tower=tower, positions=[-1], progress=False,
                                 batch_size=3)
    assert torch.equal(auto, fixed)


@pytest.mark.no_typecheck
def test_auto_errors_say_what_to_lower(vlm):
    tower, model, clean, corrupt, _, metric = vlm
    est = patching.memory_estimate(model, clean, corrupt, tower=tower)
    with pytest.raises(ValueError, match="does not hold one example.*raise memory_budget, pass cache_device='cpu'"):
        patching.patch_resid(model, clean, corrupt, metric, tower=tower, batch_size="auto",
                             memory_budget=est.peak(1, N) - 1, progress=False)
    with pytest.raises(ValueError, match="memory_budget=100 goes with batch_size='auto'"):
        patching.patch_resid(model, clean, corrupt, metric, tower=tower, batch_size=4, memory_budget=100,
                             progress=False)
    with pytest.raises(ValueError, match="batch_size='big'"):
        patching.patch_resid(model, clean, corrupt, metric, tower=tower, batch_size="big", progress=False)
    assert 0 < patching.default_budget(model)
