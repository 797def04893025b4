"""Shared by the example scripts: model loading (tiny offline model by default) and argument parsing."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from hooked_vlm import HookedVLM, spatial
from hooked_vlm.metrics import answer_token


DTYPES = ("float32", "float16", "bfloat16")  # the --dtype choices, torch's own names


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (a batch of 0 would loop forever or divide by zero)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parser(description: str, default_out: str, batch_size: int = 64) -> argparse.ArgumentParser:
    """The options every example shares; `batch_size` is the script's default for `--batch-size`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=None, help="a hub id or local directory; default: the embedded tiny model")
    p.add_argument("--out", type=Path, default=Path("examples/out") / default_out, help="where figures go")
    p.add_argument("--pairs", type=int, default=4, help="number of synthetic minimal pairs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="load the weights in this dtype (default: the checkpoint's own; float32 for the tiny models); "
                        "float16 or bfloat16 halves the memory of a 7B model (~14 GB instead of 28)")
    p.add_argument("--batch-size", type=_positive, default=batch_size,
                   help=f"examples or patched variants per forward pass (default {batch_size}); lower it if the "
                        "device runs out of memory")
    return p


def load(model_name: str | None, tiny: str, device: str, dtype: str | None = None) -> HookedVLM:
    """The named checkpoint, or a tiny random model built offline (`tiny`: blip-vqa, llava, instructblip), on
    `device` with its weights in `dtype` (a name from DTYPES; None: the checkpoint's own, float32 for a tiny one).
    A checkpoint is read straight into `dtype`: a float32-stored 7B never takes 28 GB on the way."""
    if model_name:
        return HookedVLM.from_pretrained(model_name, device=device, dtype=dtype)
    from hooked_vlm import tiny as builders

    if tiny == "blip-vqa":
        hf, processor = builders.build_blip("vqa", seed=0, image_size=64, patch=16)
    elif tiny == "llava":
        hf, processor = builders.build_llava(seed=0, image_size=48, patch=8)
    elif tiny == "instructblip":
        hf, processor = builders.build_instructblip("llama", seed=0)
    else:
        raise ValueError(f"no tiny model {tiny!r}")
    print(f"(using a tiny {tiny} with RANDOM weights built offline: the numbers show the pipeline, not a finding)")
    return HookedVLM.from_hf(hf, processor=processor, device=device, dtype=dtype)


def first_token(tokenizer, word: str) -> int:
    """The first sub-word of `word` as the model would generate it (see `hooked_vlm.metrics.answer_token`)."""
    return answer_token(tokenizer, word)


def answerable(pairs: list, n: int, tokenizer) -> list:
    """The first `n` pairs whose answers the tokenizer has a token for (a tiny model's vocabulary lacks some colour
    words, whose answers would all be the unknown token); says which it skips."""
    keep = []
    for pair in pairs:
        try:
            first_token(tokenizer, pair.answer), first_token(tokenizer, pair.wrong_answer)
        except ValueError as e:
            print(f"(skipping the pair {pair.answer!r}/{pair.wrong_answer!r}: {e})")
            continue
        keep.append(pair)
    if len(keep) < n:
        raise SystemExit(f"only {len(keep)} of {len(pairs)} pairs have answers this tokenizer knows; {n} needed")
    return keep[:n]


def to(inputs: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def image_geometry(model: HookedVLM, size: tuple[int, int]) -> spatial.ImageGeometry:
    """How `model`'s processor maps an image of `size` (width, height) onto its token grid, the grid always filled
    in: the processor's own where it sizes each image's grid (Qwen2-VL), else the model's fixed one (LLaVA-1.5: 24 x
    24), so that callers need no `grid` argument whatever the family."""
    geometry = spatial.processor_geometry(model.processor, size)
    if geometry.grid is None:
        grid = model.cfg.vision.grid
        geometry = dataclasses.replace(geometry, grid=(grid, grid))
    return geometry

