"""Head-patching sweep: the engine vs the loops users write, side by side, results checked equal.

    python benchmarks/bench_patching.py [--repeats 2]

Mid-size random BLIP-VQA (vision and text 512 wide, 8 layers, 8 heads, 224 px), one clean/corrupted image pair;
full per-head sweep of the question encoder's cross-attention (8 layers x 8 heads, all positions at once), metric
the logit difference of the first answer token. Candidates:
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

from hooked_vlm import HookedVLM, metrics, patching  # noqa: E402
from hooked_vlm.components import Block  # noqa: E402
from hooked_vlm.tiny import build_blip, random_image  # noqa: E402

QUESTION = "what is the color of the car that is parked on the street"


def count_block_rows(model: HookedVLM) -> tuple[Counter, list]:
    counts: Counter = Counter()
    handles = []
    for tower in model.tower_names:
        for block in getattr(model, tower).blocks:
            def pre(module, args, kwargs, tower=tower):
                counts[tower] += args[0].shape[0]
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    return counts, handles


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, processor = build_blip("vqa", vis_hidden=512, txt_hidden=512, layers=8, heads=8, image_size=224, patch=16,
                               inter_mult=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    del hf
    clean = processor(images=random_image((256, 256), seed=0), text=QUESTION, return_tensors="pt")
    corrupt = processor(images=random_image((256, 256), seed=1), text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        answer = model(**clean)[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % model.cfg.text_decoder.d_vocab)
    examples = torch.arange(1)
    L, H = model.tower_info("text_encoder").n_layers, model.tower_info("text_encoder").n_heads
    name = "text_encoder.blocks.{}.cross_attn.hook_z"

    def patched_forward(z_clean, layer, head):
        def hook(z, hook):
            z = z.clone()
            z[:, :, head] = z_clean[:, :, head]
            return z
        return metric(model.run_with_hooks(**corrupt, fwd_hooks=[(name.format(layer), hook)]), examples)

    def engine():
        return patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder", attention="cross_attn",
                                    batch_size=64, progress=False)

    def tl_loop():
        _, cache = model.run_with_cache(**clean, names_filter=lambda n: n.endswith("cross_attn.hook_z"))
        return torch.stack([torch.cat([patched_forward(cache[name.format(layer)], layer, head) for head in range(H)])
                            for layer in range(L)])

    def notice_loop():
        out = torch.empty(L, H)
        for layer in range(L):
            for head in range(H):
                _, cache = model.run_with_cache(**clean, names_filter=name.format(layer))
                model(**corrupt)  # the corrupted baseline, recomputed per cell as the NOTICE scripts do
                out[layer, head] = patched_forward(cache[name.format(layer)], layer, head)
        return out

    def attribution():
        return patching.attribution_patch_heads(model, clean, corrupt, metric, tower="text_encoder",
                                                attention="cross_attn")

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
    print("| run | " + " | ".join(f"{t} block-rows" for t in model.tower_names) + " |")
    print("|---|" + "---|" * len(model.tower_names))
    for label, counts in rows.items():
        print(f"| {label} | " + " | ".join(str(counts.get(t, 0)) for t in model.tower_names) + " |")
    print()

    timings = compare({"engine": engine, "TL loop": tl_loop, "NOTICE loop": notice_loop},
                      repeats=args.repeats, warmup=1)
    print(report(f"BLIP-VQA mid-size, {L}x{H} question-encoder cross-attention heads", timings, baseline="engine"))
    forward = compare({"forward": lambda: model(**corrupt), "attribution": attribution}, repeats=5, warmup=1)
    print()
    print(report("attribution patching (same sweep) vs one forward", forward, baseline="forward"))


if __name__ == "__main__":
    main()
