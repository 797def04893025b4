"""python -m weights_conversion SOURCE OUT_DIR [--dtype bfloat16]

Convert a transformers checkpoint (a hub id or a local HF directory) to hooked_vlm's own format in OUT_DIR
(written atomically; with --overwrite an existing OUT_DIR is replaced only if it is an empty folder or a hooked_vlm
checkpoint, never the source or a folder holding it); `HookedVLM.from_pretrained(OUT_DIR)` then loads it without
transformers' model classes.
Safetensors checkpoints are streamed tensor by tensor (memory: a few tensors, not the model); pickle-only ones are
loaded through transformers' own safe loader first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hooked_vlm import serialization
from hooked_vlm.arguments import as_dtype
from hooked_vlm.loading import from_pretrained

from .checkpoint import NoSafetensors, resolve
from .streaming import convert_checkpoint

DTYPES = {name: as_dtype(name) for name in ("float32", "float16", "bfloat16")}  # also the CLI's choices


def convert(source: str, out_dir: str, *, dtype: torch.dtype | str | None = None, overwrite: bool = False,
            progress: bool = True) -> Path:
    dtype = as_dtype(dtype)
    try:
        return convert_checkpoint(source, out_dir, dtype=dtype, overwrite=overwrite, progress=progress)
    except NoSafetensors:
        folder = resolve(source)  # convert_checkpoint checked `out_dir` against it before finding no safetensors
        model = from_pretrained(folder, dtype=dtype)
        return serialization.save(model, out_dir, dtype=dtype, overwrite=overwrite, sources=[folder])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_conversion", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="hub id or local HF directory")
    parser.add_argument("out_dir", help="where to write hooked_vlm's format (must not exist, unless --overwrite)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="store the weights in this dtype (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace out_dir if it is an empty folder or a hooked_vlm checkpoint (default: refuse)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                      progress=not args.quiet)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"weights_conversion: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB of safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
