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
