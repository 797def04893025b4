"""InstructBLIP cost: HF vs hooked forward, run_with_cache, and greedy generation, side by side in one process.

    python benchmarks/bench_instructblip.py [--repeats 15] [--threads 1] [--lms t5 llama] [--device cpu]

Mid-size random InstructBLIP: vision tower, Q-Former and LM each 512 wide with 8 layers and 8 heads, 224 px images
(patch 14: 256 patches + class token), 32 queries, an instruction of ~16 tokens, batch 1; all weights random.
Targets (issue 4): hooked forward at most 1.0x HF's; run_with_cache of every hook at most 1.3x the hooked forward;
greedy generation at least 0.9x HF's tokens per second (both run the same number of tokens: no end-of-text stop).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, report  # noqa: E402

from hooked_vlm import HookedVLM  # noqa: E402
from hooked_vlm.tiny import build_instructblip, random_image  # noqa: E402

PROMPT = "what is the color of the car that is parked on the street next to the man"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(lm: str, repeats: int, new_tokens: int, device: str) -> str:
    hf, processor = build_instructblip(lm, vis_hidden=512, qf_hidden=512, lm_hidden=512, layers=8, qf_layers=8,
                                       heads=8, image_size=224, patch=14, num_query_tokens=32, inter_mult=4)
    hf = hf.to(device)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=random_image((256, 256)), text=PROMPT, return_tensors="pt").to(device)
    fwd = dict(inputs)
    if lm == "t5":
        fwd["decoder_input_ids"] = torch.zeros(1, 8, dtype=torch.long, device=device)
    # same number of new tokens on both sides: no end-of-text stop
    hf.language_model.generation_config.eos_token_id = None
    model.cfg.eos_token_id = None

    def timed(fn):
        def run():
            out = fn()
            sync(device)
            return out
        return run

    hf_gen = lambda: hf.generate(**inputs, max_new_tokens=new_tokens,  # noqa: E731
                                 do_sample=False)
    ours_gen = lambda: model.generate(**inputs, max_new_tokens=new_tokens)  # noqa: E731
    with torch.no_grad():
        a, b = hf_gen(), ours_gen()
    assert torch.equal(a, b), "hooked generation differs from HF's"

    hf.set_attn_implementation("sdpa")  # HF's default
    hf_eager = copy.deepcopy(hf)
    hf_eager.set_attn_implementation("eager")
    results = compare({
        "HF forward (sdpa)": timed(lambda: hf(**fwd).logits),
        "HF forward (eager)": timed(lambda: hf_eager(**fwd).logits),
        "hooked forward": timed(lambda: model(**fwd)),
        "run_with_cache (all hooks)": timed(lambda: model.run_with_cache(**fwd)),
        f"HF generate ({new_tokens} tokens)": timed(hf_gen),
        f"hooked generate ({new_tokens} tokens)": timed(ours_gen),
    }, repeats=repeats)
    table = report(f"InstructBLIP-{lm}, mid-size ({len(model.hook_dict)} hook points, {device})", results,
                   baseline="hooked forward")
    med = {k: v["median_ms"] for k, v in results.items()}
    fwd_ratio = med["hooked forward"] / med["HF forward (sdpa)"]
    cache_ratio = med["run_with_cache (all hooks)"] / med["hooked forward"]
    gen_ratio = med[f"HF generate ({new_tokens} tokens)"] / med[f"hooked generate ({new_tokens} tokens)"]
    return (table + f"\n\nhooked forward / HF forward: {fwd_ratio:.2f}x (target <= 1.0)  \n"
            f"run_with_cache (all hooks) / hooked forward: {cache_ratio:.2f}x (target <= 1.3)  \n"
            f"hooked generate tokens/s / HF's: {gen_ratio:.2f}x (target >= 0.9)\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    default_lms = ["t5"] + (["llama"] if importlib.util.find_spec("hooked_vlm.towers.llama") else [])
    parser.add_argument("--lms", nargs="+", default=default_lms)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats, medians\n")
    for lm in args.lms:
        print(bench(lm, args.repeats, args.new_tokens, args.device))


if __name__ == "__main__":
    main()
