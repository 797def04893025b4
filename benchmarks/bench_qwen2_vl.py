"""Qwen2-VL / Qwen2.5-VL cost: HF vs hooked forward, run_with_cache, and greedy generation, side by side on a
mid-size random model.

    python benchmarks/bench_qwen2_vl.py [--version 2|2.5] [--repeats 9] [--threads 1]

Mid-size Qwen2-VL: vision 512 wide, 8 layers, 8 heads, patch 14 merged 2 x 2 (a 448 x 448 image: 32 x 32 patches,
256 image tokens; Qwen2.5: windows of 112 px, full attention in layers 3 and 7), Qwen2 LM 512 wide, 8 layers,
8 heads (2 key/value heads), multimodal rotary sections (8, 12, 12), a prompt of about 290 tokens, batch 1; weights
random; HF with its default (sdpa) attention. Targets as for LLaVA (issue 3): hooked forward at most 1.0x HF's;
run_with_cache of every hook at most 1.3x the hooked forward; greedy generation at least 0.9x HF's tokens per second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import forward_and_generation  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.tiny import build_qwen2_vl, qwen_processor, random_image  # noqa: E402

PROMPT = "<|vision_start|><|image_pad|><|vision_end|>" + "describe this image in a short caption " * 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", choices=["2", "2.5"], default="2")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf, processor = build_qwen2_vl(version=args.version, vis_hidden=512, lm_hidden=512, vis_layers=8, lm_layers=8,
                                   heads=8, kv_heads=2, patch=14, merge=2, mrope_section=(8, 12, 12),
                                   window_size=112, fullatt_block_indexes=(3, 7))
    processor = qwen_processor(processor.tokenizer, patch=14, merge=2, min_pixels=448 * 448, max_pixels=448 * 448)
    hf.set_attn_implementation("sdpa")  # HF's default
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=random_image((448, 448)), text=PROMPT, return_tensors="pt")
    T = inputs["input_ids"].shape[1]
    with torch.no_grad():
        diff = (model(**inputs) - hf(**inputs).logits).abs().max().item()
    print(f"Qwen{args.version}-VL, torch {torch.__version__}, {args.threads} thread(s), prompt {T} tokens "
          f"({int(inputs['image_grid_thw'].prod()) // 4} image tokens), max |logit diff| vs HF {diff:.1e}\n")

    print(forward_and_generation(f"Qwen{args.version}-VL mid-size", hf, model, inputs, repeats=args.repeats,
                                 new_tokens=args.new_tokens))


if __name__ == "__main__":
    main()
