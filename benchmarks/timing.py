"""Side-by-side timing: candidates run interleaved (round-robin, shuffled each round) in one process, so that the
load of a shared machine hits them alike; report medians and ratios to a baseline."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch


def compare(candidates: dict[str, Callable[[], object]], *, repeats: int = 15, warmup: int = 3, seed: int = 0
            ) -> dict[str, dict[str, float]]:
    """Time each candidate `repeats` times, interleaved; returns {name: {"median_ms", "min_ms"}}."""
    rng = random.Random(seed)
    names = list(candidates)
    with torch.no_grad():  # not inference_mode: a candidate may enable gradients (attribution patching)
        for _ in range(warmup):
            for name in names:
                candidates[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            rng.shuffle(names)
            for name in names:
                start = time.perf_counter()
                candidates[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t)} for n, t in times.items()}


def report(title: str, results: dict[str, dict[str, float]], baseline: str) -> str:
    """A markdown table of medians and ratios to `baseline`."""
    base = results[baseline]["median_ms"]
    lines = [f"### {title}", "", "| candidate | median ms | min ms | ratio to " + baseline + " |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['median_ms'] / base:.2f}x |")
    return "\n".join(lines)


def forward_and_generation(label: str, hf: torch.nn.Module, model: torch.nn.Module, inputs: dict, *, repeats: int,
                           new_tokens: int) -> str:
    """The LM-family comparison: HF forward, hooked forward, run_with_cache of every hook and of the residual
    stream only; then greedy generation of `new_tokens` by each (neither stops early: no end-of-sequence id).
    Returns the two tables and the ratios, as markdown."""
    from hooked_vlm import names

    results = compare({
        "HF forward (sdpa)": lambda: hf(**inputs),
        "hooked forward": lambda: model(**inputs),
        "run_with_cache (all hooks)": lambda: model.run_with_cache(**inputs),
        "run_with_cache (residual only)": lambda: model.run_with_cache(
            **inputs, names_filter=names.in_blocks(None, "hook_resid_pre", "hook_resid_post")),
    }, repeats=repeats)
    out = [report(f"{label} forward ({len(model.hook_dict)} hook points)", results, "hooked forward")]
    ratio = results["hooked forward"]["median_ms"] / results["HF forward (sdpa)"]["median_ms"]
    out.append(f"\nhooked forward / HF forward: {ratio:.2f}x\n")
    model.cfg.eos_token_id = None  # random weights: never stop early, so both generate exactly new_tokens
    gen = compare({
        "HF generate": lambda: hf.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False, eos_token_id=None),
        "hooked generate": lambda: model.generate(**inputs, max_new_tokens=new_tokens),
    }, repeats=max(3, repeats // 3), warmup=1)
    out.append(report(f"greedy generation of {new_tokens} tokens", gen, "HF generate"))
    speed = gen["HF generate"]["median_ms"] / gen["hooked generate"]["median_ms"]
    out.append(f"\nhooked tokens/s relative to HF: {speed:.2f}x")
    return "\n".join(out)
