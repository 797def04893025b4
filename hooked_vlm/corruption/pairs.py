"""Minimal image pairs: the same scene with one property changed, from files or drawn (for demos and tests)."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


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
