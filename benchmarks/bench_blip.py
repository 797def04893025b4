"""BLIP forward cost: HF vs hooked forward vs run_with_cache, side by side on a mid-size random model.

    python benchmarks/bench_blip.py [--repeats 15] [--threads 1]

Mid-size BLIP: vision and text 512 wide, 8 layers, 8 heads, 224 px images (196 patches + class token), a 16-token
question, batch 1; all weights random. Targets (issue 2): hooked forward no slower than HF; run_with_cache of every
hook at most 1.3x the hooked forward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, report  # noqa: E402

from hooked_vlm import HookedVLM, names  # noqa: E402
from hooked_vlm.tiny import build_blip, random_image  # noqa: E402

QUESTION = "what is the color of the car that is parked on the street next to the man"


def bench(kind: str, repeats: int) -> str:
    hf, processor = build_blip(kind, vis_hidden=512, txt_hidden=512, layers=8, heads=8, image_size=224, patch=16,
                               inter_mult=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=random_image((256, 256)), text=QUESTION, return_tensors="pt")
    assert inputs["input_ids"].shape[1] >= 16

    if kind == "vqa":
        bos = torch.full((1, 1), hf.config.text_config.bos_token_id)

        def hf_forward():
            image = hf.vision_model(inputs["pixel_values"]).last_hidden_state
            question = hf.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                       encoder_hidden_states=image).last_hidden_state
            return hf.text_decoder(input_ids=bos, encoder_hidden_states=question).logits
    else:
        def hf_forward():
            return hf(**inputs).logits

    residual = names.in_blocks(None, "hook_resid_pre", "hook_resid_post")
    results = compare({
        "HF forward (eager)": hf_forward,
        "hooked forward": lambda: model(**inputs),
        "run_with_cache (all hooks)": lambda: model.run_with_cache(**inputs),
        "run_with_cache (residual only)": lambda: model.run_with_cache(**inputs, names_filter=residual),
    }, repeats=repeats)
    n_hooks = len(model.hook_dict)
    table = report(f"BLIP {kind}, mid-size ({n_hooks} hook points)", results, baseline="hooked forward")
    hf_ratio = results["hooked forward"]["median_ms"] / results["HF forward (eager)"]["median_ms"]
    return table + f"\n\nhooked forward / HF forward: {hf_ratio:.2f}x\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--kinds", nargs="+", default=["vqa", "caption"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats, medians\n")
    for kind in args.kinds:
        print(bench(kind, args.repeats))


if __name__ == "__main__":
    main()
