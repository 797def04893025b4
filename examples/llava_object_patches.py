"""LLaVA: restore the image tokens of the object's patches, layer by layer, as one span-patching sweep.

The clean image shows a red square on grey, the corrupted one a blue square at the same place (the top-left
quadrant of the model's token grid, drawn over exactly those patches as the processor maps them: any family whose
image tokens sit in the LM's sequence, LLaVA-1.5, LLaVA-Phi, Qwen2-VL). For each LM layer,
the corrupted run gets the clean residual stream (`lm.blocks.{L}.hook_resid_pre`) at a group of positions patched
together: the image tokens that show the square (`patching.ImagePatches(rows, cols)`, looked up by patch-grid row
and column in `cache.positions`, i.e. `model.positions(**inputs)`: no hard-coded offset), every image token, the
text tokens, the last token. The script prints how much of the clean-vs-corrupted logit difference ("red" vs "blue"
as the next token) each group restores, and draws it.

    python examples/llava_object_patches.py [--model llava-hf/llava-1.5-7b-hf] [--device cuda]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from _common import image_geometry, load, parser
from hooked_vlm import evaluation, metrics, patching, plot, view

SIDE = 336  # the picture's side in pixels: LLaVA-1.5's view; other processors resize it as they resize any image


def square_image(size: int, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> Image.Image:
    """A grey image of `size` pixels with a filled box (x0, y0, x1, y1)."""
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = rgb
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "llava_object_patches")
    args = p.parse_args(argv)
    model = load(args.model, "llava", args.device, args.dtype)
    geometry = image_geometry(model, (SIDE, SIDE))
    grid_rows, grid_cols = geometry.grid
    rows, cols = range(max(1, grid_rows // 2)), range(max(1, grid_cols // 2))  # the grid's top-left quadrant
    # the box over exactly those patches, in the picture's pixels (the processor's resize and crop undone)
    x0, y0, _, _ = geometry.patch_box(rows[0], cols[0])
    _, _, x1, y1 = geometry.patch_box(rows[-1], cols[-1])
    box = (max(0, round(x0)), max(0, round(y0)), min(SIDE, round(x1)), min(SIDE, round(y1)))
    prompt = evaluation.prompt(model, "What color is the square?", suffix=" The square is")
    clean = model.processor(images=square_image(SIDE, box, (220, 20, 20)), text=prompt, return_tensors="pt")
    corrupt = model.processor(images=square_image(SIDE, box, (20, 20, 220)), text=prompt, return_tensors="pt")
    clean, corrupt = clean.to(args.device), corrupt.to(args.device)

    tok = model.processor.tokenizer
    red, blue = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue"))
    metric = metrics.logit_diff(red, blue)  # at the last position

    square = patching.ImagePatches(rows, cols)  # the square's image tokens, found in model.positions(**clean)
    (span,) = model.positions(**clean).image[0]
    print(f"image tokens {span.start}..{span.stop - 1}; the square covers patch rows {list(rows)}, columns "
          f"{list(cols)}: {len(square(model.positions(**clean))[0])} tokens")

    groups = {"square": square, "image": "image", "text": "text", "last": "last"}
    with torch.no_grad():
        m_clean = float(metric(model(**clean), torch.zeros(1, dtype=torch.long)))
        m_corrupt = float(metric(model(**corrupt), torch.zeros(1, dtype=torch.long)))
    diffs = patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook="resid_pre", groups=groups,
                                 batch_size=args.batch_size, progress=False)  # [layers, groups]
    gap = m_clean - m_corrupt
    restored = (diffs - m_corrupt) / gap if abs(gap) > 1e-9 else torch.full_like(diffs, float("nan"))

    print(f"logit diff red - blue: clean {m_clean:.3f}, corrupted {m_corrupt:.3f}")
    print("| layer | " + " | ".join(f"{name} (restored)" for name in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for layer, row in enumerate(restored):
        print(f"| {layer} | " + " | ".join(f"{diffs[layer, g]:.3f} ({row[g]:.2f})" for g in range(len(groups)))
              + " |")
    path = plot.heatmap(restored, args.out / "object_patches.png", xticklabels=list(groups), xlabel="group",
                        title="share of the red-blue logit difference restored (resid_pre)", centered=False,
                        cmap="Purples")
    view.sweep(restored, args.out / "object_patches.html", kind="positions", labels=list(groups), model=model,
               inputs=clean, tower="lm", centered=False, title="share of the logit difference restored (resid_pre)")
    print(f"-> {path} (and object_patches.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
