"""python -m weights_conversion SOURCE OUT_DIR [--dtype bfloat16]

Convert a transformers checkpoint (a hub id or a local HF directory) to hooked_vlm's own format in OUT_DIR
(written atomically); `HookedVLM.from_pretrained(OUT_DIR)` then loads it without transformers' model classes.
Today the source is loaded through transformers first, so peak memory is about twice the weights.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_conversion", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="hub id or local HF directory")
    parser.add_argument("out_dir", help="where to write hooked_vlm's format (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="store the weights in this dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)
    from hooked_vlm import HookedVLM

    try:
        dtype = DTYPES[args.dtype] if args.dtype else None
        model = HookedVLM.from_pretrained(args.source, dtype=dtype)
        out = model.save_pretrained(args.out_dir, dtype=dtype, overwrite=args.overwrite)
    except (OSError, ValueError, KeyError) as e:
        print(f"weights_conversion: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
