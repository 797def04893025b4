"""Head-patching sweep: the engine vs the loops users write, side by side, results checked equal.

    python benchmarks/bench_patching.py [--family blip|llava] [--repeats 2]

BLIP: mid-size random BLIP-VQA (vision and text 512 wide, 8 layers, 8 heads, 224 px), one clean/corrupted image
pair; full per-head sweep of the question encoder's cross-attention (8 layers x 8 heads, all positions at once),
metric the logit difference of the first answer token. LLaVA: the mid-size LLaVA of bench_llava.py (CLIP 512x8 at
224 px, Llama 512x8, 277 tokens); full sweep of the LM's self-attention heads (8 x 8), all positions at once, metric
the logit difference at the last token. Candidates:
- engine: `patching.patch_heads` (clean and corrupted runs once, the vision tower and earlier layers not re-run,
  the heads of a layer stacked along the batch);
- TransformerLens-style loop: the clean run cached once, then one full forward of the corrupted input per cell;
- NOTICE-style loop: a clean, a corrupted and a patched forward per cell.
Also attribution patching, as a multiple of one forward. Block forwards are counted in example-rows (a block run on
a batch of n counts n), per tower, to explain the distance to the ideal.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import compare, report  # noqa: E402

from hooked_vlm import HookedVLM, metrics, names, patching  # noqa: E402
from hooked_vlm.components import Block  # noqa: E402
from hooked_vlm.tiny import build_blip, build_llava, random_image  # noqa: E402

QUESTION = "what is the color of the car that is parked on the street"
LLAVA_PROMPT = "USER: <image>\n" + "describe this image in a short caption " * 2 + "ASSISTANT:"


def count_block_rows(model: HookedVLM) -> tuple[Counter, list]:
    counts: Counter = Counter()
    handles = []
    for tower, module in model.towers().items():
        for block in module.blocks:
            def pre(module, args, kwargs, tower=tower):
                counts[tower] += args[0].shape[0]
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    return counts, handles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", choices=["blip", "llava"], default="blip")
    parser.add_argument("--at", choices=["all", "last"], default="all",
                        help="patch each head at every position at once, or at the last token only (NOTICE's LLaVA "
                             "sweep patches the token of interest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.family == "blip":
        hf, processor = build_blip("vqa", vis_hidden=512, txt_hidden=512, layers=8, heads=8, image_size=224,
                                   patch=16, inter_mult=4)
        text, tower, attention = QUESTION, "text_encoder", "cross_attn"
    else:
        hf, processor = build_llava(vis_hidden=512, lm_hidden=512, vis_layers=8, lm_layers=8, heads=8,
                                    image_size=224, patch=14, inter_mult=4)
        text, tower, attention = LLAVA_PROMPT, "lm", "attn"
    model = HookedVLM.from_hf(hf, processor=processor)
    del hf
    clean = processor(images=random_image((256, 256), seed=0), text=text, return_tensors="pt")
    corrupt = processor(images=random_image((256, 256), seed=1), text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
        answer = logits[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
    examples = torch.arange(1)
    L, H = model.tower_info(tower).n_layers, model.tower_info(tower).n_heads
    leaf = names.leaf(attention, "z")

    at = slice(None) if args.at == "all" else slice(-1, None)
    positions = None if args.at == "all" else [clean["input_ids"].shape[1] - 1]

    def patched_forward(z_clean, layer, head):
        def hook(z, hook):
            z = z.clone()
            z[:, at, head] = z_clean[:, at, head]
            return z
        return metric(model.run_with_hooks(**corrupt, fwd_hooks=[(names.block(tower, layer, leaf), hook)]), examples)

    def engine():
        return patching.patch_heads(model, clean, corrupt, metric, tower=tower, attention=attention,
                                    positions=positions, batch_size=64, progress=False)

    def tl_loop():
        z_names = [names.block(tower, layer, leaf) for layer in range(L)]
        _, cache = model.run_with_cache(**clean, names_filter=z_names)
        return torch.stack([torch.cat([patched_forward(cache[z_names[layer]], layer, head) for head in range(H)])
                            for layer in range(L)])

    def notice_loop():
        out = torch.empty(L, H)
        for layer in range(L):
            for head in range(H):
                _, cache = model.run_with_cache(**clean, names_filter=names.block(tower, layer, leaf))
                model(**corrupt)  # the corrupted baseline, recomputed per cell as the NOTICE scripts do
                out[layer, head] = patched_forward(cache[names.block(tower, layer, leaf)], layer, head)
        return out

    def attribution():
        return patching.attribution_patch_heads(model, clean, corrupt, metric, tower=tower, attention=attention,
                                                positions=positions)

    with torch.no_grad():
        results = {"engine": engine(), "TL loop": tl_loop(), "NOTICE loop": notice_loop()}
    torch.testing.assert_close(results["engine"], results["TL loop"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["engine"], results["NOTICE loop"], atol=1e-4, rtol=1e-4)
    print("engine, TL loop and NOTICE loop agree (atol 1e-4)\n")

    rows = {}
    for label, fn in (("engine", engine), ("TL loop", tl_loop), ("NOTICE loop", notice_loop),
                      ("one forward", lambda: model(**corrupt))):
        counts, handles = count_block_rows(model)
        with torch.no_grad():
            fn()
        for h in handles:
            h.remove()
        rows[label] = dict(counts)
    towers = list(model.towers())
    print("| run | " + " | ".join(f"{t} block-rows" for t in towers) + " |")
    print("|---|" + "---|" * len(towers))
    for label, counts in rows.items():
        print(f"| {label} | " + " | ".join(str(counts.get(t, 0)) for t in towers) + " |")
    print()

    timings = compare({"engine": engine, "TL loop": tl_loop, "NOTICE loop": notice_loop},
                      repeats=args.repeats, warmup=1)
    print(report(f"{args.family} mid-size, {L}x{H} {tower} {attention} heads, patched at {args.at} positions",
                 timings, baseline="engine"))
    forward = compare({"forward": lambda: model(**corrupt), "attribution": attribution}, repeats=5, warmup=1)
    print()
    print(report("attribution patching (same sweep) vs one forward", forward, baseline="forward"))


if __name__ == "__main__":
    main()
