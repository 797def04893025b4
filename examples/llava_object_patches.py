"""LLaVA: patch the image tokens of the object's patches, layer by layer, with no hard-coded offset.

The clean image shows a red square on grey, the corrupted one a blue square at the same place. For each LM layer,
the corrupted run gets the clean residual stream (`lm.blocks.{L}.hook_resid_pre`) at the image tokens that show
the square (looked up by patch-grid row and column in `cache.positions`, i.e. `model.positions(**inputs)`), and the
script prints how much of the clean-vs-corrupted logit difference ("red" vs "blue" as the next token) that restores.

    python examples/llava_object_patches.py [--model llava-hf/llava-1.5-7b-hf] [--device cuda]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from PIL import Image

from _common import load, parser
from hooked_vlm import metrics, names

PROMPT = "USER: <image>\nWhat color is the square? ASSISTANT: The square is"


def square_image(size: int, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> Image.Image:
    """A grey image of `size` pixels with a filled box (x0, y0, x1, y1)."""
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = rgb
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "llava_object_patches")
    args = p.parse_args(argv)
    model = load(args.model, "llava", args.device)
    size, patch = model.cfg.vision.image_size, model.cfg.vision.patch_size
    box = (0, 0, size // 2, size // 2)  # the top-left quadrant, so that it covers whole patches
    clean = model.processor(images=square_image(size, box, (220, 20, 20)), text=PROMPT, return_tensors="pt")
    corrupt = model.processor(images=square_image(size, box, (20, 20, 220)), text=PROMPT, return_tensors="pt")
    clean, corrupt = clean.to(args.device), corrupt.to(args.device)

    tok = model.processor.tokenizer
    red, blue = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("red", "blue"))
    diff = metrics.logit_diff(red, blue)  # at the last position

    def metric(logits: torch.Tensor) -> float:
        return float(diff(logits, torch.zeros(1, dtype=torch.long)))

    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(**clean, names_filter=names.in_blocks("lm", "hook_resid_pre"))
        m_clean, m_corrupt = metric(clean_logits), metric(model(**corrupt))

        # where the square is: the image tokens whose patch lies inside the box (prompt 0, image 0)
        (span,) = cache.positions.image[0]
        rows = range(box[1] // patch, -(-box[3] // patch))
        cols = range(box[0] // patch, -(-box[2] // patch))
        object_tokens = span.patches(rows=rows, cols=cols)
        print(f"image tokens {span.start}..{span.stop - 1}; the square covers patch rows {list(rows)}, "
              f"columns {list(cols)}: {len(object_tokens)} tokens")

        print(f"logit diff red - blue: clean {m_clean:.3f}, corrupted {m_corrupt:.3f}")
        print("| layer | patched logit diff | restored |\n|---|---|---|")
        for layer in range(model.tower_info("lm").n_layers):
            name = names.resid("lm", layer, "pre")

            def restore(resid, hook, name=name):
                resid = resid.clone()
                resid[:, object_tokens] = cache[name][:, object_tokens].to(resid.device)
                return resid

            m = metric(model.run_with_hooks(**corrupt, fwd_hooks=[(name, restore)]))
            gap = m_clean - m_corrupt
            share = (m - m_corrupt) / gap if abs(gap) > 1e-9 else float("nan")
            print(f"| {layer} | {m:.3f} | {share:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
