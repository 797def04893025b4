"""Corrupted inputs for patching: symmetric token replacement (text), seeded Gaussian noise (embeddings), and
minimal image pairs (the same scene with one attribute changed)."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .hooks import HookSpec


# ---------------------------------------------------------------------------------------------- text
def symmetric_token_replacement(tokenizer_or_processor: Any, text: str, replacements: Mapping[str, str], *,
                                images: Any = None, **processor_kwargs: Any) -> tuple[dict, dict]:
    """Clean and corrupted inputs for STR (NOTICE): `text`, and `text` with each word of `replacements` swapped
    for its replacement, tokenized alike so that every position lines up.

    Raises if a replacement changes the token count (naming it and both tokenizations), since position-wise
    patching would then pair unrelated tokens. With a processor and `images`, both inputs carry the same images.
    """
    corrupted = text
    for old, new in replacements.items():
        if old not in corrupted:
            raise ValueError(f"{old!r} does not occur in {text!r}")
        corrupted = corrupted.replace(old, new)
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    for old, new in replacements.items():
        a = tokenizer(" " + old, add_special_tokens=False)["input_ids"]
        b = tokenizer(" " + new, add_special_tokens=False)["input_ids"]
        if len(a) != len(b):
            raise ValueError(f"replacing {old!r} ({len(a)} tokens: {tokenizer.convert_ids_to_tokens(a)}) by {new!r} "
                             f"({len(b)} tokens: {tokenizer.convert_ids_to_tokens(b)}) changes the token count; "
                             "choose a replacement of the same length")

    def encode(t: str) -> dict:
        if images is not None:
            return dict(tokenizer_or_processor(images=images, text=t, return_tensors="pt", **processor_kwargs))
        return dict(tokenizer_or_processor(t, return_tensors="pt", **processor_kwargs))

    clean, corrupt = encode(text), encode(corrupted)
    if clean["input_ids"].shape != corrupt["input_ids"].shape:
        raise ValueError(f"{text!r} and {corrupted!r} tokenize to {clean['input_ids'].shape[-1]} and "
                         f"{corrupt['input_ids'].shape[-1]} tokens; choose replacements of the same length")
    return clean, corrupt


# ---------------------------------------------------------------------------------------------- noise
def gaussian_noise(values: Tensor, scale: float, *, sites: Tensor | None = None, seed: int = 0) -> Tensor:
    """A seeded Gaussian draw shaped like `values` ([B, T, ...]), `scale` times the empirical standard deviation of
    `values` at `sites` ([B, T] bool; None: everywhere), and zero off the sites. Draw it once and add it in every
    cell of a sweep, so that the cells are comparable and the run is reproducible."""
    mask = torch.ones(values.shape[:2], dtype=torch.bool) if sites is None else sites.bool()
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale={scale!r}: pass a positive number of standard deviations (e.g. 3.0)")
    if not mask.any():
        raise ValueError("no site to add noise to (sites is all False): select at least one position to corrupt")
    mask = mask.to(values.device).reshape(*mask.shape, *([1] * (values.ndim - 2))).expand_as(values)
    std = values[mask].float().std()
    if scale and (not torch.isfinite(std) or std == 0):
        raise ValueError(f"the values to corrupt have standard deviation {std.item()}, so noise scaled by it is "
                         f"{'zero' if std == 0 else 'not a number'}: corrupt more than one value, and finite ones")
    draw = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed)).to(values.device, values.dtype)
    return torch.where(mask, draw * (scale * std).to(values.dtype), torch.zeros_like(draw))


def add_hook(hook_name: str, offset: Tensor) -> HookSpec:
    """A hook adding `offset` [B, ...] to an activation; a batch of n stacked copies of the B examples (as in a
    patching sweep) gets the offset repeated n times."""

    def hook(t: Tensor, hook: Any) -> Tensor:
        if t.shape[0] % offset.shape[0] or t.shape[1:] != offset.shape[1:]:
            raise ValueError(f"the offset for {hook_name} has shape {tuple(offset.shape)}, the activation "
                             f"{tuple(t.shape)}")
        return t + offset.to(t.dtype).repeat(t.shape[0] // offset.shape[0], *([1] * (t.ndim - 1)))

    return hook_name, hook


# ---------------------------------------------------------------------------------------------- image pairs
@dataclass
class MinimalPair:
    """Two images that differ in one property, a prompt about it, and the answers each image should get."""

    clean_image: Image.Image
    corrupt_image: Image.Image
    prompt: str
    answer: str
    wrong_answer: str

    def inputs(self, processor: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Processor inputs of the clean and the corrupted image with the same prompt."""
        encode = lambda image: dict(processor(images=image, text=self.prompt, return_tensors="pt", **kwargs))  # noqa
        return encode(self.clean_image), encode(self.corrupt_image)


def load_pairs_csv(path: str | Path) -> list[MinimalPair]:
    """Pairs from a CSV with columns clean_image, corrupt_image, prompt, answer, wrong_answer (image paths relative
    to the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CSV at {path}")
    pairs = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"clean_image", "corrupt_image", "prompt", "answer", "wrong_answer"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{path} needs the columns {sorted(need)}; it has {reader.fieldnames}")
        for row in reader:
            pairs.append(MinimalPair(_open(path.parent / row["clean_image"]), _open(path.parent / row["corrupt_image"]),
                                     row["prompt"], row["answer"], row["wrong_answer"]))
    return pairs


def load_pairs_folder(folder: str | Path) -> list[MinimalPair]:
    """Pairs from a folder of subfolders, each holding clean.<ext>, corrupt.<ext> and pair.json
    ({"prompt", "answer", "wrong_answer"}), in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    pairs = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        meta_path = sub / "pair.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{sub} has no pair.json")
        meta = json.loads(meta_path.read_text())
        clean, corrupt = (next(iter(sorted(sub.glob(f"{stem}.*"))), None) for stem in ("clean", "corrupt"))
        if clean is None or corrupt is None:
            raise FileNotFoundError(f"{sub} needs clean.<ext> and corrupt.<ext> images")
        pairs.append(MinimalPair(_open(clean), _open(corrupt), meta["prompt"], meta["answer"], meta["wrong_answer"]))
    return pairs


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    return Image.open(path).convert("RGB")


COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right", "top", "bottom")
ATTRIBUTES = ("color", "shape", "count", "position")


def synthetic_pairs(n: int, attribute: str = "color", *, seed: int = 0, size: int = 224) -> list[MinimalPair]:
    """`n` minimal pairs of drawn scenes: the same scene with one attribute changed (colour, shape, count of
    shapes, or position), deterministic for a seed. For demos and tests; not a benchmark."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {', '.join(ATTRIBUTES)}, got {attribute!r}")
    rng = random.Random(seed)
    prompts = {"color": "what color is the shape?", "shape": "what shape is it?",
               "count": "how many shapes are there?", "position": "where is the shape?"}
    numbers = ("one", "two", "three", "four")
    pairs = []
    for _ in range(n):
        scene = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "count": rng.randint(1, 4),
                 "position": rng.choice(PLACES)}
        values = {"color": list(COLORS), "shape": list(SHAPES), "count": [1, 2, 3, 4], "position": list(PLACES)}
        other = dict(scene, **{attribute: rng.choice([v for v in values[attribute] if v != scene[attribute]])})
        label = (lambda s: numbers[s["count"] - 1]) if attribute == "count" else (lambda s: str(s[attribute]))
        pairs.append(MinimalPair(_draw(scene, size), _draw(other, size), prompts[attribute], label(scene),
                                 label(other)))
    return pairs


def _draw(scene: dict, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (240, 240, 232))
    draw = ImageDraw.Draw(image)
    r = size // 10
    cx, cy = {"left": (size // 4, size // 2), "right": (3 * size // 4, size // 2), "top": (size // 2, size // 4),
              "bottom": (size // 2, 3 * size // 4)}[scene["position"]]
    offsets = [(0, 0), (2.4 * r, 0), (0, 2.4 * r), (2.4 * r, 2.4 * r)][: scene["count"]]
    for dx, dy in offsets:
        x, y = cx + dx - 1.2 * r * (scene["count"] > 1), cy + dy - 1.2 * r * (scene["count"] > 2)
        box = (x - r, y - r, x + r, y + r)
        fill = COLORS[scene["color"]]
        if scene["shape"] == "circle":
            draw.ellipse(box, fill=fill, outline="black")
        elif scene["shape"] == "square":
            draw.rectangle(box, fill=fill, outline="black")
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill, outline="black")
    return image
