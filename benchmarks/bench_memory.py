"""Peak memory (RSS) and time of converting and loading a mid-size random LLaVA, against HF's own from_pretrained.

    python benchmarks/bench_memory.py [--repeats 3] [--lm-hidden 1536] [--lm-layers 12]

Each measurement runs in a fresh process (peak RSS only grows within a process), the candidates interleaved and
shuffled round by round; a candidate's peak is the process's high-water mark minus its RSS after the imports, as a
ratio to the size of the weights in the dtype it produces. Every candidate loads the processor too; the modules
they import are imported before the clock starts. Loaders touch every parameter before the peak is read, so a
memory-mapped tensor counts once its pages are in. Targets (issue 7): converting and loading at most about
1.3x the weights.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ---------------------------------------------------------------------------------------------- one measurement
def run_case(case: str, work: Path) -> dict:
    import torch
    import transformers
    # every module any candidate imports is imported before the clock starts: imports are baseline, not work
    import transformers.conversion_mapping  # noqa: F401
    import transformers.models.auto.processing_auto  # noqa: F401
    import transformers.models.llava.modeling_llava  # noqa: F401

    from hooked_vlm import HookedVLM
    from weights_conversion.streaming import convert_checkpoint

    torch.set_num_threads(1)
    base = rss_mib("VmRSS")
    start = time.perf_counter()
    model = None
    if case == "HF from_pretrained":  # with its processor, as every candidate loads one
        model = transformers.LlavaForConditionalGeneration.from_pretrained(work / "hf")
        transformers.AutoProcessor.from_pretrained(work / "hf")
    elif case == "HF from_pretrained + from_hf (no streaming)":
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(work / "hf")
        model = HookedVLM.from_hf(hf, processor=transformers.AutoProcessor.from_pretrained(work / "hf"),
                                  share_weights=True)
        del hf
    elif case == "HF from_pretrained + save_pretrained (an HF re-save, for scale)":
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(work / "hf")
        hf.save_pretrained(work / "resaved")
        transformers.AutoProcessor.from_pretrained(work / "hf").save_pretrained(work / "resaved")
    elif case == "hooked from_pretrained (HF checkpoint, streamed)":
        model = HookedVLM.from_pretrained(work / "hf")
    elif case == "hooked from_pretrained (hooked_vlm format)":
        model = HookedVLM.from_pretrained(work / "hooked")
    elif case == "convert to hooked_vlm format, fp32":
        convert_checkpoint(work / "hf", work / "out-fp32", overwrite=True)
    elif case == "convert to hooked_vlm format, bf16":
        convert_checkpoint(work / "hf", work / "out-bf16", dtype=torch.bfloat16, overwrite=True)
    else:
        raise ValueError(case)
    if model is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.sum()  # every page in memory
    seconds = time.perf_counter() - start
    return {"peak_mib": rss_mib("VmHWM") - base, "seconds": seconds}


CASES = {  # name: the dtype of what it produces
    "HF from_pretrained": "float32",
    "HF from_pretrained + from_hf (no streaming)": "float32",
    "HF from_pretrained + save_pretrained (an HF re-save, for scale)": "float32",
    "hooked from_pretrained (HF checkpoint, streamed)": "float32",
    "hooked from_pretrained (hooked_vlm format)": "float32",
    "convert to hooked_vlm format, fp32": "float32",
    "convert to hooked_vlm format, bf16": "bfloat16",
}


# ---------------------------------------------------------------------------------------------- orchestration
def prepare(work: Path, args: argparse.Namespace) -> float:
    """Save the random model as an HF checkpoint and in hooked_vlm's format; returns its fp32 size in MiB."""
    import torch

    from hooked_vlm import HookedVLM
    from hooked_vlm.tiny import build_llava

    torch.manual_seed(0)
    hf, processor = build_llava(vis_hidden=1024, lm_hidden=args.lm_hidden, vis_layers=8, lm_layers=args.lm_layers,
                                heads=16, image_size=224, patch=14, inter_mult=4)
    hf.save_pretrained(work / "hf")
    processor.save_pretrained(work / "hf")
    HookedVLM.from_hf(hf, processor=processor).save_pretrained(work / "hooked")
    return sum(p.numel() * p.element_size() for p in hf.state_dict().values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lm-hidden", type=int, default=1536)
    parser.add_argument("--lm-layers", type=int, default=12)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement
        print(json.dumps(run_case(args.case, args.work)))
        return
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        work = Path(tmp)
        size_fp32 = prepare(work, args)
        size = {"float32": size_fp32, "bfloat16": size_fp32 / 2}
        results: dict[str, list[dict]] = {name: [] for name in CASES}
        rng = random.Random(0)
        for _ in range(args.repeats):
            names = list(CASES)
            rng.shuffle(names)
            for name in names:
                out = subprocess.run([sys.executable, __file__, "--case", name, "--work", str(work)], check=True,
                                     capture_output=True, text=True, cwd=ROOT)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = "HF from_pretrained"
    base_peak = statistics.median(r["peak_mib"] for r in results[base])
    base_time = statistics.median(r["seconds"] for r in results[base])
    lines = [f"weights: {size_fp32:.0f} MiB in fp32 ({size_fp32 * 2**20 / 4 / 1e6:.0f} M parameters); medians of "
             f"{args.repeats} fresh processes", "",
             "| candidate | peak RSS MiB | ratio to its weights | ratio to HF's peak | seconds | ratio to HF's time |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        peak = statistics.median(r["peak_mib"] for r in runs)
        seconds = statistics.median(r["seconds"] for r in runs)
        lines.append(f"| {name} | {peak:.0f} | {peak / size[CASES[name]]:.2f}x | {peak / base_peak:.2f}x | "
                     f"{seconds:.2f} | {seconds / base_time:.2f}x |")
    print("\n".join(lines))
    (ROOT / "benchmarks" / "results-memory.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
