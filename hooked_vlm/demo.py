"""The main demo: ask BLIP-VQA about a picture it draws, look inside, and patch one cross-attention head.

    python -m hooked_vlm.demo [--model Salesforce/blip-vqa-base] [--device cpu]

Uses the real checkpoint when its files are in the local HF cache (or `--download` is given), otherwise a tiny BLIP
built offline with fixed seeds, whose weights are random: its answers are noise, but every step below is real.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image, ImageDraw

from hooked_vlm import HookedVLM, names
from hooked_vlm.tiny import build_blip

DEFAULT_MODEL = "Salesforce/blip-vqa-base"
UNIVERSAL_HEAD = (5, 3)  # a text-encoder cross-attention head NOTICE (Golovanevsky et al. 2025) found in BLIP-VQA


def draw_scene(color: str, size: int = 384) -> Image.Image:
    """A filled circle of the given colour on a light background."""
    image = Image.new("RGB", (size, size), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.25, size * 0.25, size * 0.75, size * 0.75), fill=color, outline="black", width=4)
    return image


def load(model_name: str, download: bool, device: str) -> tuple[HookedVLM, str]:
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model_name, "config.json"), str)
    if cached or download:
        model = HookedVLM.from_pretrained(model_name, local_files_only=cached and not download, device=device)
        return model, f"{model_name} ({'local HF cache' if cached else 'downloaded'})"
    hf, processor = build_blip("vqa", seed=0)
    model = HookedVLM.from_hf(hf, processor=processor, device=device)
    return model, (f"a tiny BLIP-VQA built offline with seed 0 -- its weights are RANDOM, so its answers mean "
                   f"nothing ({model_name} is not in the local HF cache; pass --download to fetch it)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a BLIP-VQA hub id or local directory")
    parser.add_argument("--question", default="what color is the circle?")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--download", action="store_true", help="download the model if it is not cached")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, description = load(args.model, args.download, args.device)
    processor = model.processor
    print(f"model: {description}")
    print(f"towers: {', '.join(model.tower_names)}; {len(model.hook_dict)} hook points\n")

    clean = processor(images=draw_scene("red"), text=args.question, return_tensors="pt").to(args.device)
    corrupt = processor(images=draw_scene("blue"), text=args.question, return_tensors="pt").to(args.device)

    # 1. answer the question (greedy generation, with a KV cache)
    answer_ids = model.generate(**clean, max_new_tokens=5)
    print(f"Q: {args.question}  (picture: a red circle)")
    print(f"A: {processor.batch_decode(answer_ids, skip_special_tokens=True)[0]!r}\n")

    # 2. cache activations and look at a few
    layer, head = UNIVERSAL_HEAD
    layer = min(layer, model.tower_info("text_encoder").n_layers - 1)
    head = min(head, model.tower_info("text_encoder").n_heads - 1)
    z_name = names.block("text_encoder", layer, "cross_attn.hook_z")
    shown = names.in_blocks(None, "hook_resid_post", "cross_attn.hook_pattern")  # every tower's
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(**clean, names_filter=lambda n: shown(n) or n == z_name)
    print(f"cached {len(cache)} activations ({cache.nbytes / 2**20:.1f} MiB), for example:")
    last_decoder_layer = model.tower_info("text_decoder").n_layers - 1
    pattern_name = names.block("text_encoder", layer, "cross_attn.hook_pattern")
    for name in [z_name, pattern_name, "vision.blocks.0.hook_resid_post",
                 names.resid("text_decoder", last_decoder_layer, "post")]:
        print(f"  {name:55s} {tuple(cache[name].shape)}")

    # 3. patch one cross-attention head from the clean run into a run on the corrupted picture
    answer = int(clean_logits[0, -1].argmax())

    def patch_head(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        z[:, :, head] = cache[z_name][:, :, head]
        return z

    with torch.no_grad():
        corrupt_logits = model(**corrupt)
        patched_logits = model.run_with_hooks(**corrupt, fwd_hooks=[(z_name, patch_head)])
    token = processor.tokenizer.convert_ids_to_tokens(answer)
    print(f"\npatching text-encoder cross-attention head L{layer}H{head} (hook {z_name}, head {head}):")
    for label, logits in (("clean (red circle)", clean_logits), ("corrupted (blue circle)", corrupt_logits),
                          ("corrupted + clean head", patched_logits)):
        print(f"  P({token!r}) {label:26s} {logits[0, -1].softmax(-1)[answer].item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
