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
from timing import forward_and_generation  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
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

    print(forward_and_generation("LLaVA mid-size", hf, model, inputs, repeats=args.repeats,
                                 new_tokens=args.new_tokens))


if __name__ == "__main__":
    main()
