"""Causal tracing in BLIP-VQA (Palit et al., ICCV-W 2023), as one call per heatmap.

Noise the image embeddings (3x their standard deviation, one seeded draw shared by every cell), then restore the
clean state at one question-token position and layer (block output; attention and cross-attention outputs over
windows of 3 layers, as the paper's second notebook), and read P(answer's first token). Also the answer decoder's
[DEC] position.

    python examples/blip_causal_tracing.py [--model Salesforce/blip-vqa-base] [--pairs 4]
"""

from __future__ import annotations

import sys

import torch

from _common import load, parser
from hooked_vlm import corruption, patching, plot


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n\n")[0], "blip_causal_tracing").parse_args(argv)
    model = load(args.model, "blip-vqa", args.device)
    pairs = corruption.synthetic_pairs(args.pairs, "color", seed=0)
    inputs = model.processor(images=[p.clean_image for p in pairs], text=[p.prompt for p in pairs],
                             return_tensors="pt").to(args.device)
    with torch.no_grad():
        answer = model(**inputs)[:, -1].argmax(-1)  # the model's own first answer token (the paper's `pred`)
    tokens = model.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    runs = {"encoder_resid": dict(tower="text_encoder", kind="resid", window=1),
            "encoder_attn_w3": dict(tower="text_encoder", kind="attn", window=3),
            "encoder_cross_attn_w3": dict(tower="text_encoder", kind="cross_attn", window=3),
            "decoder_resid": dict(tower="text_decoder", kind="resid", window=1)}
    for name, kw in runs.items():
        trace = patching.causal_trace(model, inputs, answer, corrupt="image", noise=3.0, samples=3, seed=0,
                                      normalize=True, progress=False, **kw)
        labels = tokens if kw["tower"] == "text_encoder" else ["[DEC]"]
        path = plot.heatmap(trace, args.out / f"{name}.png", title=f"causal trace: {name} (normalised)",
                            xlabel="position", xticklabels=labels, centered=False, cmap="Purples")
        best = divmod(int(torch.nan_to_num(trace, nan=-1e9).argmax()), trace.shape[1])
        print(f"{name:24s} strongest cell: layer {best[0]}, position {best[1]} ({labels[best[1]]}), "
              f"{trace[best].item():.3f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
