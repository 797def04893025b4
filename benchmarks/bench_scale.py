"""Peak memory of each sweep and analysis, per example and as a ratio to one forward's; with `--project`, what the
four papers' largest 7B runs need on one card.

    python benchmarks/bench_scale.py [--examples 4] [--batch-size 8] [--device cpu|cuda] [--dtype float32]
                                     [--project] [--only NAME ...]

Model: the mid-size LLaVA of bench_llava.py (CLIP 512 x 8 at 224 px: 256 image tokens; Llama 512 x 8; a prompt of
about 280 tokens); clean and corrupted inputs differ in the image. Each analysis runs as a paper runs it (the
experiment ids of docs/papers.md), with `batch_size` rows per forward, on 1 and on N examples.

Peak: on CUDA, `max_memory_allocated` above the bytes allocated before the call; on the CPU, the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before each call) above its resident set before the call,
after a garbage collection and `malloc_trim`. On the CPU the script runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`
(it restarts itself with it): every tensor above 64 KiB then gets pages of its own that go back to the system when
it is freed, so the resident set follows the live tensors; with glibc's default (a threshold that rises to 32 MiB)
freed tensors stay in the heap and the peaks drift up from case to case. Each case is measured `--repeats` times,
interleaved with the others; the median is reported (the CPU figures move by a few MiB between runs: read the
per-example column over N >= 4).

Columns: the peak for 1 example and for N; bytes per added example, (peak(N) - peak(1)) / (N - 1); and both as a
ratio to one forward of one example. What a sweep holds per example (its cached clean and corrupted activations)
is the per-example column; what it holds per forward (the rows it runs at once) is in the 1-example column.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hooked_vlm import HookedVLM, analysis, metrics, names, patching  # noqa: E402
from hooked_vlm.components import Block  # noqa: E402
from hooked_vlm.interventions import attention_knockout  # noqa: E402
from hooked_vlm.patching.memory import CUDA_MARGIN  # noqa: E402
from hooked_vlm.tiny import build_llava, build_llava_real_shapes, random_image  # noqa: E402

PROMPT = "USER: <image>\n" + "describe this image in a short caption " * 2 + "ASSISTANT:"
# V-SEAM's LLaVA prompt around a GQA-length question: the token count of the 7B runs (576 image tokens + ~35)
PAPER_PROMPT = ("USER: <image>\nIs the small animal that is sitting on the wooden bench to the left of the tall man a "
                "dog? Please answer with a single word.\nASSISTANT:")
MiB, GiB = 2**20, 2**30


# ------------------------------------------------------------------------------------------------ peak memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the CPU measurement needs Linux)")


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes that `fn` adds at its peak, above what was in use when it started (its result freed afterwards)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed pages of the last case go back to the system
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = _status_kib("VmRSS")
        with torch.no_grad():
            out = fn()
        peak = (_status_kib("VmHWM") - base) * 1024
    del out
    return peak


# ------------------------------------------------------------------------------------------------ the cases
def _moved(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def _image_positions(model: HookedVLM, inputs: dict) -> list[torch.Tensor]:
    """Per example, the positions of its image tokens (the keys a Neo-style knockout blocks)."""
    return [torch.cat([span.indices for span in spans]) for spans in model.positions(**inputs).image]


def build(device: torch.device, dtype: torch.dtype, n: int):
    hf, processor = build_llava(vis_hidden=512, lm_hidden=512, vis_layers=8, lm_layers=8, heads=8, image_size=224,
                                patch=14, inter_mult=4)
    model = HookedVLM.from_hf(hf, processor=processor, device=device, dtype=dtype)
    del hf

    def inputs(seed: int) -> dict:
        return _moved(processor(images=[random_image((256, 256), seed=seed + i) for i in range(n)], text=[PROMPT] * n,
                                return_tensors="pt"), device, dtype)

    return model, inputs(0), inputs(100)


def cases(model: HookedVLM, clean: dict, corrupt: dict, batch_size: int) -> dict[str, Callable[[int], object]]:
    """name -> run on the first n examples. Each is the call a paper's experiment makes (docs/papers.md)."""
    def first(d: dict, n: int) -> dict:
        return {k: v[:n] for k, v in d.items()}

    with torch.no_grad():
        answer = model(**first(clean, 1))[:, -1].argmax(-1)

    def metric_for(n: int) -> metrics.Metric:
        a = answer.expand(n)
        return metrics.logit_diff(a, a + 1)

    projector = names.tower_hook("projector", "hook_out")
    kw = dict(tower="lm", batch_size=batch_size, progress=False)
    L = model.tower_info("lm").n_layers

    def knockout(n: int):
        hooks = attention_knockout(model, [-1], _image_positions(model, first(clean, n)), range(L))
        return model.run_with_hooks(**first(clean, n), fwd_hooks=hooks)

    all_cases: dict[str, Callable[[int], object]] = {
        "forward": lambda n: model(**first(clean, n)),
        "run_with_cache, resid_pre of every LM layer": lambda n: model.run_with_cache(
            **first(clean, n), names_filter=lambda name: name.startswith("lm.blocks.") and name.endswith(
                "hook_resid_pre"))[1],
        "V-SEAM C1 patch_resid, image group, resid_post": lambda n: patching.patch_resid(
            model, first(clean, n), first(corrupt, n), metric_for(n), hook="resid_post", groups="image", **kw),
        "NOTICE A3 patch_heads at the last token": lambda n: patching.patch_heads(
            model, first(clean, n), first(corrupt, n), metric_for(n), positions=[-1], **kw),
        "causal_trace, image noised, last token": lambda n: patching.causal_trace(
            model, first(clean, n), answer.expand(n), corrupt="image", noise=3.0, positions=[-1], **kw),
        "V-SEAM C4 head_scores (mean of the other heads)": lambda n: analysis.head_scores(
            model, first(clean, n), answer.expand(n), **kw),
        "attribution_patch_heads": lambda n: patching.attribution_patch_heads(
            model, first(clean, n), first(corrupt, n), metric_for(n), tower="lm"),
        "Neo D4 logit_lens, top-5 at every position": lambda n: analysis.logit_lens(
            model, first(clean, n), tower="lm", k=5),
        "Neo D3 attention knockout, last token from the image": knockout,
    }
    if projector in model.hook_dict:
        all_cases["Neo D1 mean_activation of the projector"] = lambda n: analysis.mean_activation(
            model, [first(clean, n)], [projector], over="tokens", progress=False)
    return all_cases


def measure(runs: dict[str, Callable[[int], object]], sizes: list[int], repeats: int, device: torch.device
            ) -> dict[tuple[str, int], int]:
    """Median peak of each (case, examples), the cases interleaved and shuffled round by round."""
    keys = [(name, n) for name in runs for n in sizes]
    samples: dict[tuple[str, int], list[int]] = {k: [] for k in keys}
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(keys)
        for name, n in keys:
            samples[(name, n)].append(peak_bytes(lambda: runs[name](n), device))
    return {k: int(statistics.median(v)) for k, v in samples.items()}


def table(peaks: dict[tuple[str, int], int], names_: list[str], n: int) -> str:
    f1, fn = peaks[("forward", 1)], peaks[("forward", n)]
    forward_per_example = (fn - f1) / (n - 1)
    lines = [f"| analysis | peak, 1 example (MiB) | x forward | peak, {n} examples (MiB) | per added example (MiB) "
             "| x forward's |", "|---|---|---|---|---|---|"]
    for name in names_:
        p1, pn = peaks[(name, 1)], peaks[(name, n)]
        per = (pn - p1) / (n - 1)
        lines.append(f"| {name} | {p1 / MiB:.1f} | {p1 / f1:.2f} | {pn / MiB:.1f} | {per / MiB:.1f} "
                     f"| {per / forward_per_example:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ projection
# The papers' largest runs on LLaVA-1.5-7B (seed-experiments.md; docs/papers.md ids): name, examples, sweep
# arguments for `patching.memory_estimate` (None: not a sweep, one forward per condition), forwards per example.
PAPER_RUNS = [
    ("NOTICE A3: patch_heads at the token of interest, 32 x 32 heads", 3500,
     dict(sweep="patch_heads"), None),
    ("V-SEAM C1: patch_resid of the image group, resid_post, 32 layers", 1000,
     dict(sweep="patch_resid", hook="resid_post"), None),
    ("V-SEAM C4: head_scores (ablation_sweep, mean of the other heads)", 1000,
     dict(sweep="ablation_sweep"), None),
    ("Neo D3: attention knockout, 34 window conditions", 1000, None, 34),
    ("Neo D4: logit lens, top-5 at every position", 1000, None, 1),
    ("Neo D1: mean of the projector's output (stops after the projector)", 50000, None, 1),
]
CARDS_GIB = (24, 40, 80)
# the mid-size case whose measured memory per forward row stands for each sweep of the papers
MID_SIZE_CASE = {PAPER_RUNS[0][0]: "NOTICE A3 patch_heads at the last token",
                 PAPER_RUNS[1][0]: "V-SEAM C1 patch_resid, image group, resid_post",
                 PAPER_RUNS[2][0]: "V-SEAM C4 head_scores (mean of the other heads)"}


def row_ratios(model: HookedVLM, clean: dict, corrupt: dict, peaks: dict[tuple[str, int], int], batch_size: int
               ) -> tuple[dict[str, float], dict[str, float]]:
    """Per sweep of the papers, from the mid-size measurements: what one forward row holds at the sweep's peak (the
    measured peak for one example less the exact bytes it caches, over `batch_size` rows) as a ratio to one
    forward's peak; and the measured peak over `memory_estimate`'s (how far the estimate's bound is above it)."""
    one = lambda d: {k: v[:1] for k, v in d.items()}  # noqa: E731
    estimates = _estimates(model, one(clean), one(corrupt))
    forward = peaks[("forward", 1)]
    ratios, of_estimate = {}, {}
    for paper, case in MID_SIZE_CASE.items():
        est, peak = estimates[paper], peaks[(case, 1)]
        ratios[paper] = (peak - est.cached_per_example) / (batch_size * forward)
        of_estimate[paper] = peak / est.peak(batch_size, 1)
    return ratios, of_estimate


def _llava_7b(lm_layers: int, vis_layers: int, device: torch.device, dtype: torch.dtype):
    hf, processor = build_llava_real_shapes(randomize=False, vis_layers=vis_layers, lm_layers=lm_layers)
    model = HookedVLM.from_hf(hf, processor=processor, device=device, dtype=dtype)
    del hf
    one = processor(images=random_image((640, 480), seed=0), text=PAPER_PROMPT, return_tensors="pt")
    other = processor(images=random_image((640, 480), seed=1), text=PAPER_PROMPT, return_tensors="pt")
    return model, _moved(one, device, dtype), _moved(other, device, dtype)


def _forward_seconds(model: HookedVLM, clean: dict, device: torch.device, repeats: int = 3) -> float:
    """The median time of one forward (after one warm-up)."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(**clean)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _estimates(model: HookedVLM, clean: dict, corrupt: dict) -> dict[str, patching.MemoryEstimate]:
    out = {}
    for name, _, sweep, _ in PAPER_RUNS:
        if sweep is not None:
            kw = dict(sweep)
            out[name] = patching.memory_estimate(model, clean, None if kw["sweep"] == "ablation_sweep" else corrupt,
                                                 tower="lm", **kw)
    return out


def _forward_like_peaks(model: HookedVLM, clean: dict, device: torch.device) -> dict[str, int]:
    L = model.tower_info("lm").n_layers
    image = _image_positions(model, clean)
    projector = names.tower_hook("projector", "hook_out")
    runs = {
        "forward": lambda: model(**clean),
        PAPER_RUNS[3][0]: lambda: model.run_with_hooks(**clean, fwd_hooks=attention_knockout(
            model, [-1], image, range(L))),
        PAPER_RUNS[4][0]: lambda: analysis.logit_lens(model, clean, tower="lm", k=5),
        PAPER_RUNS[5][0]: lambda: analysis.mean_activation(model, [clean], [projector], over="tokens",
                                                           progress=False),
    }
    return {name: peak_bytes(fn, device) for name, fn in runs.items()}


def _work(model: HookedVLM, clean: dict, corrupt: dict, flops_per_token_layer: dict[str, float]) -> dict[str, float]:
    """Each run's matmul FLOPs on one example: the tokens every block and the LM's unembedding process (rows x
    positions, counted by pre-hooks) times their matmul FLOPs per token at the real widths."""
    work = {"flops": 0.0}

    def count(args: tuple, tower: str) -> None:
        work["flops"] += args[0].shape[0] * args[0].shape[1] * flops_per_token_layer[tower]

    handles = [block.register_forward_pre_hook(lambda m, a, k, t=tower: count(a, t), with_kwargs=True)
               for tower, module in model.towers().items() if tower in flops_per_token_layer
               for block in module.blocks if isinstance(block, Block)]
    # the unembedding: once per forward, once per layer in a logit lens
    handles.append(model.lm.unembed.register_forward_pre_hook(
        lambda m, a, k: count(a, "unembed"), with_kwargs=True))
    answer = model(**clean)[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, answer + 1)
    L = model.tower_info("lm").n_layers
    image = _image_positions(model, clean)
    toi = [clean["input_ids"].shape[1] - 12]  # the token of interest: a word of the question
    runs = {
        "forward": lambda: model(**clean),
        PAPER_RUNS[0][0]: lambda: patching.patch_heads(model, clean, corrupt, metric, tower="lm", positions=toi,
                                                       progress=False),
        PAPER_RUNS[1][0]: lambda: patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook="resid_post",
                                                       groups="image", progress=False),
        PAPER_RUNS[2][0]: lambda: analysis.head_scores(model, clean, answer, tower="lm", progress=False),
        PAPER_RUNS[3][0]: lambda: [model.run_with_hooks(**clean, fwd_hooks=attention_knockout(
            model, [-1], image, range(L))) for _ in range(PAPER_RUNS[3][3])],
        PAPER_RUNS[4][0]: lambda: analysis.logit_lens(model, clean, tower="lm", k=5),
        PAPER_RUNS[5][0]: lambda: analysis.mean_activation(model, [clean], [names.tower_hook("projector", "hook_out")],
                                                           over="tokens", progress=False),
    }
    out = {}
    try:
        with torch.no_grad():
            for name, fn in runs.items():
                work["flops"] = 0.0
                fn()
                out[name] = work["flops"]
    finally:
        for h in handles:
            h.remove()
    return out


def forward_equivalents(image_tokens_real: int, flops_per_token_layer: dict[str, float]) -> dict[str, float]:
    """Per example, each run's work as a multiple of one forward, at LLaVA-1.5-7B's depth and heads (LM 32 x 32,
    CLIP 24 layers) and `image_tokens_real` image tokens. Counted on narrow stand-ins (the count does not depend on
    the width) with 16 and 64 image tokens: every run's work is affine in the number of tokens (whole rows grow with
    it, a resumed suffix does not), so the two counts give it at the real count exactly."""
    counts = {}
    for image_size in (56, 112):  # 4 x 4 and 8 x 8 patches of 14 px
        hf, processor = build_llava(vis_hidden=32, lm_hidden=64, vis_layers=24, lm_layers=32, heads=32,
                                    image_size=image_size, patch=14, randomize=False)
        model = HookedVLM.from_hf(hf, processor=processor)
        inputs = [dict(processor(images=random_image((640, 480), seed=s), text=PAPER_PROMPT, return_tensors="pt"))
                  for s in (0, 1)]
        counts[(image_size // 14) ** 2] = _work(model, inputs[0], inputs[1], flops_per_token_layer)
    (n1, w1), (n2, w2) = sorted(counts.items())
    at_real = {k: w1[k] + (w2[k] - w1[k]) * (image_tokens_real - n1) / (n2 - n1) for k in w1}
    return {k: v / at_real["forward"] for k, v in at_real.items()}


def project(device: torch.device, seconds_per_forward: float | None, ratios: dict[str, float],
            of_estimate: dict[str, float]) -> str:
    """What the papers' 7B runs need, on LLaVA-1.5-7B's real shapes with the LM cut to 1 and 2 layers: a sweep's
    cached bytes per example (exact, `memory_estimate`) extrapolated to 32 layers (affine in the depth: one more
    layer caches one layer's more); its memory per forward row as the mid-size ratio (`row_ratios`) times one 7B
    forward's measured peak; the other runs' measured peaks (`not_a_sweep`); weights counted at 32 layers; work
    counted on narrow stand-ins (`forward_equivalents`). bfloat16 (the bytes of float16; float16 matmuls are slow
    on CPUs)."""
    dtype = torch.bfloat16
    per_layer, seconds = {}, {}
    for layers in (1, 2):
        model, clean, corrupt = _llava_7b(layers, 3, device, dtype)
        per_layer[layers] = (_estimates(model, clean, corrupt), _forward_like_peaks(model, clean, device))
        seconds[layers] = _forward_seconds(model, clean, device)
        T = clean["input_ids"].shape[1]
        del model
    with torch.device("meta"):
        meta, _ = build_llava_real_shapes(randomize=False, lm_layers=32, meta=True)
    weights = sum(p.numel() for p in meta.parameters()) * 2
    del meta

    def at_32(v1: int, v2: int) -> int:
        return v1 + 31 * (v2 - v1)

    # a forward's time at 32 LM layers, from 1 and 2 (the 3 vision layers of both runs cancel out of the slope;
    # the full CLIP-L tower adds 21 more, about 2% of the FLOPs, not counted)
    measured_seconds = seconds[1] + 31 * (seconds[2] - seconds[1])
    if seconds_per_forward is None:
        seconds_per_forward, timing = measured_seconds, f"measured here ({device}, bfloat16)"
    else:
        timing = f"given (--seconds-per-forward); measured here: {measured_seconds:.3g} s on {device}"

    # matmul FLOPs per token and block at the real widths: 2 x the block's weights (attention and MLP)
    flops = {"vision": 2 * (4 * 1024**2 + 2 * 1024 * 4096), "lm": 2 * (4 * 4096**2 + 3 * 4096 * 11008),
             "unembed": 2 * 4096 * 32064}
    work = forward_equivalents(576, flops)

    def not_a_sweep(name: str) -> int:
        """A run that is not a sweep, at 32 layers: its measured peak (the larger of the two depths: the difference
        is the allocator's noise, or the lens's chunk growing towards its budget) plus what it keeps per layer,
        computed: the logit lens holds the stream of every layer (T x d in the model's dtype), the others nothing."""
        kept = T * 4096 * 2 if name == PAPER_RUNS[4][0] else 0
        return max(per_layer[1][1][name], per_layer[2][1][name]) + (32 - 2) * kept

    forward = not_a_sweep("forward")
    lines = [f"Weights: {weights / GiB:.1f} GiB (float16). Prompt: {T} tokens. One forward's peak above the weights: "
             f"{forward / GiB:.2f} GiB. Budget per card: its memory less {CUDA_MARGIN:.0%} (the sweeps' default "
             f"margin) less the weights. One forward: {seconds_per_forward:.3g} s, {timing}.", "",
             "| run | examples | cached per example (GiB) | per forward row (GiB) | estimate's bound per row (GiB) "
             "| measured / estimated peak (mid-size) | "
             + " | ".join(f"batch on {c} GB" for c in CARDS_GIB) + " | forwards per example | hours |",
             "|---|---|---|---|---|---|" + "---|" * len(CARDS_GIB) + "---|---|"]
    for name, n, sweep, _ in PAPER_RUNS:
        bound, check = "-", "-"
        if sweep is not None:
            e1, e2 = per_layer[1][0][name], per_layer[2][0][name]
            cached, row = at_32(e1.cached_per_example, e2.cached_per_example), int(ratios[name] * forward)
            est = patching.MemoryEstimate(cached, row)
            bound, check = f"{at_32(e1.per_row, e2.per_row) / GiB:.2f}", f"{of_estimate[name]:.2f}"
        else:
            est, cached, row = None, 0, not_a_sweep(name)
        cells = []
        for card in CARDS_GIB:
            budget = int(card * GiB * (1 - CUDA_MARGIN)) - weights
            if est is not None:
                try:
                    cells.append(str(est.batch_size(budget, n)))
                except ValueError:
                    cells.append("no (cache_device='cpu')")
            else:
                cells.append(str(max(0, budget // row)) if budget > 0 else "no")
        hours = f"{n * work[name] * seconds_per_forward / 3600:.3g}"
        lines.append(f"| {name} | {n} | {cached / GiB:.2f} | {row / GiB:.2f} | {bound} | {check} | " + " | ".join(cells)
                     + f" | {work[name]:.1f} | {hours} |")
    measured = {k: (per_layer[1][1][k] / MiB, per_layer[2][1][k] / MiB) for k in per_layer[2][1]}
    lines += ["", "Measured peaks of the runs that are not sweeps at 1 / 2 LM layers (MiB), extrapolated to 32: "
              + "; ".join(f"{k.split(':')[0]} {a:.0f} / {b:.0f}" for k, (a, b) in measured.items())]
    return "\n".join(lines)


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # read by glibc at start-up: restart with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward of every sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only the cases whose names contain one of these")
    parser.add_argument("--project", action="store_true",
                        help="also project the papers' 7B runs (real-shaped LLaVA-1.5-7B, bfloat16; minutes)")
    parser.add_argument("--seconds-per-forward", type=float, default=None,
                        help="one 7B forward's time on the target card, for the hours column")
    args = parser.parse_args()
    if args.examples < 2:
        parser.error("--examples must be at least 2 (the per-example column is a difference)")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, clean, corrupt = build(device, dtype, args.examples)
    runs = cases(model, clean, corrupt, args.batch_size)
    if args.only:
        runs = {k: v for k, v in runs.items() if k == "forward" or any(s in k for s in args.only)}
    peaks = measure(runs, [1, args.examples], args.repeats, device)
    print(f"### Peak memory above the loaded model, mid-size LLaVA ({args.dtype}, {device}, batch_size "
          f"{args.batch_size} rows, median of {args.repeats})\n")
    print(table(peaks, list(runs), args.examples))
    if args.project:
        missing = [case for case in MID_SIZE_CASE.values() if case not in runs]
        if missing:
            parser.error(f"--project needs the mid-size cases {missing} (drop --only)")
        ratios, of_estimate = row_ratios(model, clean, corrupt, peaks, args.batch_size)
        del model
        print("\n### The papers' largest 7B runs, projected\n")
        print(project(device, args.seconds_per_forward, ratios, of_estimate))


if __name__ == "__main__":
    main()
