"""NOTICE (Golovanevsky et al., NAACL 2025) on BLIP-VQA: noise-free corruption and head patching.

- SIP, semantic image pairs: the same question about two images differing in one attribute (here: drawn scenes
  whose shape changes colour); patch each question-encoder cross-attention head from the clean into the
  corrupted run, and each layer x position of the stream.
- STR, symmetric token replacement: the same image with one question word swapped for one of equal token length.
- "Universal" heads: heads whose mean |effect| over examples is at least mean + 2 std, and the cross-attention of
  the strongest one drawn over the image's patch grid.
- LLaVA: the same SIP sweep over the language model's heads, patched at the last prompt token.

    python examples/notice.py [--model Salesforce/blip-vqa-base] [--llava-model llava-hf/llava-1.5-7b-hf] [--pairs 4]
"""

from __future__ import annotations

import sys

import torch

from _common import answerable, first_token, llava_prompt, load, parser, to
from hooked_vlm import analysis, corruption, metrics, names, patching, plot


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "notice")
    p.add_argument("--llava-model", default=None, help="a LLaVA hub id or directory; default: a tiny random LLaVA")
    args = p.parse_args(argv)
    model = load(args.model, "blip-vqa", args.device)
    processor, tok = model.processor, model.processor.tokenizer
    pairs = answerable(corruption.synthetic_pairs(4 * args.pairs, "color", seed=1), args.pairs, tok)

    # SIP: one sweep per pair (NOTICE keeps per-example maps to find heads that matter across examples)
    per_pair = []
    for pair in pairs:
        clean, corrupt = (to(x, args.device) for x in pair.inputs(processor))
        metric = metrics.logit_diff(first_token(tok, pair.answer), first_token(tok, pair.wrong_answer))
        per_pair.append(patching.patch_heads(model, clean, corrupt, metric, tower="text_encoder",
                                             attention="cross_attn", normalize=True, progress=False))
    heads = torch.stack(per_pair)  # [pairs, layers, heads]
    plot.heatmap(heads.mean(0), args.out / "sip_cross_attention_heads.png", xlabel="head",
                 title="SIP: question-encoder cross-attention heads (normalised logit diff)")
    universal = analysis.select_heads(heads, k_std=2)
    print(f"SIP universal cross-attention heads (mean |effect| >= mean + 2 std): {universal}")

    clean, corrupt = (to(x, args.device) for x in pairs[0].inputs(processor))
    metric = metrics.logit_diff(first_token(tok, pairs[0].answer), first_token(tok, pairs[0].wrong_answer))
    stream = patching.patch_resid(model, clean, corrupt, metric, tower="text_encoder", hook="resid_post",
                                  normalize=True, progress=False)
    tokens = tok.convert_ids_to_tokens(clean["input_ids"][0])
    plot.heatmap(stream, args.out / "sip_stream.png", xlabel="question token", xticklabels=tokens,
                 title="SIP: question-encoder stream (resid_post) patched per layer and position")

    # STR: swap the colour word of a yes/no question; token counts are checked to be equal
    image = pairs[0].clean_image
    colour, other = pairs[0].answer, pairs[0].wrong_answer
    clean, corrupt = corruption.symmetric_token_replacement(processor, f"is the shape {colour}?", {colour: other},
                                                            images=image)
    clean, corrupt = (to(x, args.device) for x in (clean, corrupt))
    yes_no = metrics.logit_diff(first_token(tok, "yes"), first_token(tok, "no"))
    str_heads = patching.patch_heads(model, clean, corrupt, yes_no, tower="text_encoder", attention="attn",
                                     normalize=True, progress=False)
    plot.heatmap(str_heads, args.out / "str_self_attention_heads.png", xlabel="head",
                 title="STR: question-encoder self-attention heads (normalised yes-no logit diff)")

    # the strongest SIP head's cross-attention from the last question token, minus the mean over heads and
    # layers, over the patch grid (class token dropped)
    layer, head = universal[0] if universal else divmod(int(heads.abs().mean(0).argmax()), heads.shape[-1])
    inputs = to(pairs[0].inputs(processor)[0], args.device)
    _, cache = model.run_with_cache(**inputs, names_filter=names.in_blocks("text_encoder", "cross_attn.hook_pattern"))
    last = int(cache.positions.last[0])
    patterns = torch.stack([cache["text_encoder", i, "cross_attn.pattern"][0, :, last, 1:]
                            for i in range(model.tower_info("text_encoder").n_layers)])  # [L, H, N]
    overlay = patterns[layer, head] - patterns.mean((0, 1))
    size = model.cfg.vision.image_size
    plot.patch_overlay(pairs[0].clean_image.resize((size, size)), overlay, args.out / "top_head_overlay.png",
                       title=f"L{layer}H{head} cross-attention minus the mean head")

    # LLaVA: SIP head patching over the LM's heads, at the last prompt token (left padding: position -1)
    llava = load(args.llava_model, "llava", args.device)
    ltok = llava.processor.tokenizer
    llava_heads = []
    for pair in pairs:
        clean, corrupt = (to(llava.processor(images=image, text=llava_prompt(pair.prompt), return_tensors="pt"),
                             args.device) for image in (pair.clean_image, pair.corrupt_image))
        metric = metrics.logit_diff(first_token(ltok, pair.answer), first_token(ltok, pair.wrong_answer))
        last = [clean["input_ids"].shape[1] - 1]
        llava_heads.append(patching.patch_heads(llava, clean, corrupt, metric, tower="lm", positions=last,
                                                normalize=True, progress=False))
    llava_heads = torch.stack(llava_heads)
    plot.heatmap(llava_heads.mean(0), args.out / "llava_sip_lm_heads.png", xlabel="head",
                 title="LLaVA SIP: LM heads at the last token (normalised logit diff)")
    print(f"LLaVA SIP heads (mean + 2 std): {analysis.select_heads(llava_heads, k_std=2)}")
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
