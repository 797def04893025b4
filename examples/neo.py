"""Neo et al. (ICLR 2025), "Towards interpreting visual information processing in VLMs", on LLaVA.

D1 the mean image token (a streaming mean of the projector's outputs); D2 mean-ablating the object's image tokens
(prefill only) and reading the answer; D3 attention knockout: the last token may not read the object's tokens, in
windows of layers; D4 the logit lens on the image tokens, drawn over the patch grid.

    python examples/neo.py [--model llava-hf/llava-1.5-7b-hf] [--pairs 4]
"""

from __future__ import annotations

import sys

import torch

from _common import first_token, llava_prompt, load, object_patches, parser, to
from hooked_vlm import analysis, corruption, interventions, metrics, plot


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__.split("\n\n")[0], "neo").parse_args(argv)
    model = load(args.model, "llava", args.device)
    processor, tok = model.processor, model.processor.tokenizer
    pairs = corruption.synthetic_pairs(args.pairs, "shape", seed=2)
    images = [p.clean_image for p in pairs]
    batches = [to(processor(images=image, text=llava_prompt(p.prompt), return_tensors="pt"), args.device)
               for image, p in zip(images, pairs)]

    # D1: the mean image token over every image and token
    mean = analysis.mean_activation(model, batches, ["projector.hook_out"], over="tokens")["projector.hook_out"]
    print(f"D1 mean image token: {mean.numel()}-d, L2 norm {mean.norm():.3f}")

    grid, size = model.cfg.vision.grid, model.cfg.vision.image_size
    drops, knockouts = [], {}
    windows = {"early": range(0, model.tower_info("lm").n_layers // 2),
               "late": range(model.tower_info("lm").n_layers // 2, model.tower_info("lm").n_layers),
               "all": range(model.tower_info("lm").n_layers)}
    for pair, inputs in zip(pairs, batches):
        answer = first_token(tok, pair.answer)
        metric = metrics.log_prob(answer)  # log P: readable at the tiny model's near-uniform probabilities
        with torch.no_grad():
            base = metric(model(**inputs), torch.arange(1)).item()
        positions = model.positions(**inputs)
        span = positions.image[0][0]
        patches = object_patches(pair.clean_image, size, grid)
        objects = torch.cat([span.patches([r], [c]) for r, c in patches]).tolist() if patches else []
        # D2: mean-ablate the object tokens in the LM input, prefill only
        ablate = interventions.replace_positions(model, "lm.hook_inputs_embeds", [objects], mean, prefill_only=True)
        with torch.no_grad():
            ablated = metric(model.run_with_hooks(**inputs, fwd_hooks=[ablate]), torch.arange(1)).item()
        drops.append(base - ablated)
        # D3: the last token may not read the object tokens, in windows of layers
        last = int(positions.last[0])
        for name, layers in windows.items():
            hooks = interventions.attention_knockout(model, [last], objects, layers, tower="lm")
            with torch.no_grad():
                knocked = metric(model.run_with_hooks(**inputs, fwd_hooks=hooks), torch.arange(1)).item()
            knockouts.setdefault(name, []).append(base - knocked)
    print(f"D2 object-token mean ablation: mean drop of log P(answer) {sum(drops) / len(drops):+.5f}")
    for name, values in knockouts.items():
        print(f"D3 knockout last token -> object tokens, {name:5s} layers: mean drop of log P "
              f"{sum(values) / len(values):+.5f}")

    # D4: logit lens on the image tokens of the first image, top-1 probability per patch and layer
    span = model.positions(**batches[0]).image[0][0]
    patch_tokens = span.indices[span.rows >= 0]
    lens = analysis.logit_lens(model, batches[0], tower="lm", positions=patch_tokens[None], k=1)
    top1 = lens.probs[:, 0, :, 0]  # [layers, patches]
    plot.heatmap(top1, args.out / "logit_lens_image_tokens.png", xlabel="image token (row-major patch)",
                 title="D4 logit lens: top-1 probability at each image token", centered=False, cmap="viridis")
    plot.patch_overlay(pairs[0].clean_image.resize((size, size)), top1[-1], args.out / "logit_lens_last_layer.png",
                       grid=grid, title="D4 last layer, top-1 probability per patch", centered=False,
                       cmap="viridis")
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
