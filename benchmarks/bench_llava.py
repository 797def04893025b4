"""LLaVA cost: HF vs hooked forward, run_with_cache, and greedy generation, side by side on a mid-size random model.

    python benchmarks/bench_llava.py [--repeats 9] [--threads 1]

Mid-size LLaVA: CLIP 512 wide, 8 layers, 8 heads, 224 px / patch 14 (256 image tokens, features from layer -2),
Llama 512 wide, 8 layers, 8 heads, about 280 prompt tokens, batch 1; weights random; HF with its default (sdpa)
attention. Targets (issue 3): hooked forward at most 1.0x HF's; run_with_cache of every hook at most 1.3x the hooked
forward; greedy generation of 32 tokens at least 0.9x HF's tokens per second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, report  # noqa: E402

from hooked_vlm import HookedVLM, names  # noqa: E402
from hooked_vlm.tiny import build_llava, random_image  # noqa: E402

PROMPT = "USER: <image>\n" + "describe this image in a short caption " * 2 + "ASSISTANT:"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf, processor = build_llava(vis_hidden=512, lm_hidden=512, vis_layers=8, lm_layers=8, heads=8, image_size=224,
                                patch=14, inter_mult=4)
    hf.set_attn_implementation("sdpa")  # HF's default
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=random_image((256, 256)), text=PROMPT, return_tensors="pt")
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        diff = (model(**inputs) - hf(**inputs).logits).abs().max().item()
    print(f"torch {torch.__version__}, {args.threads} thread(s), prompt {T} tokens, max |logit diff| vs HF {diff:.1e}\n")

    results = compare({
        "HF forward (sdpa)": lambda: hf(**inputs),
        "hooked forward": lambda: model(**inputs),
        "run_with_cache (all hooks)": lambda: model.run_with_cache(**inputs),
        "run_with_cache (residual only)": lambda: model.run_with_cache(
            **inputs, names_filter=names.in_blocks(None, "hook_resid_pre", "hook_resid_post")),
    }, repeats=args.repeats)
    print(report(f"LLaVA mid-size forward ({len(model.hook_dict)} hook points)", results, "hooked forward"))
    ratio = results["hooked forward"]["median_ms"] / results["HF forward (sdpa)"]["median_ms"]
    print(f"\nhooked forward / HF forward: {ratio:.2f}x\n")

    n = args.new_tokens
    eos_free = {"eos_token_id": None}  # random weights: never stop early, so both generate exactly n tokens
    model.cfg.eos_token_id = None
    gen = compare({
        "HF generate": lambda: hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           **eos_free),
        "hooked generate": lambda: model.generate(**inputs, max_new_tokens=n),
    }, repeats=max(3, args.repeats // 3), warmup=1)
    print(report(f"greedy generation of {n} tokens", gen, "HF generate"))
    speed = gen["HF generate"]["median_ms"] / gen["hooked generate"]["median_ms"]
    print(f"\nhooked tokens/s relative to HF: {speed:.2f}x")


if __name__ == "__main__":
    main()
