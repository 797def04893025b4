"""COCO instance annotations (`instances_{split}.json`): images with their objects' categories, boxes,
segmentations and areas, and Neo et al.'s selection of images with one small single-instance object."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .example import ImageFile

__all__ = ["CocoAnnotation", "CocoImage", "coco_instances", "neo_filter"]


@dataclass(frozen=True)
class CocoAnnotation:
    """One object instance: `category` is the category's name ("dog"); `bbox` [x, y, width, height] in pixels;
    `segmentation` polygons [[x0, y0, x1, y1, ...], ...] or an RLE dict (crowd annotations); `area` the mask's
    area in pixels, as the file gives it. `raw` is the annotation's JSON object, unchanged (what
    `spatial.annotation_mask` reads)."""

    id: int
    category_id: int
    category: str
    bbox: tuple[float, float, float, float]
    segmentation: Any
    area: float
    iscrowd: bool
    raw: dict = field(repr=False, compare=False)


@dataclass(frozen=True)
class CocoImage:
    """An image of the file, opened only by `image.load()`, with its annotations in the file's order."""

    id: int
    image: ImageFile
    width: int
    height: int
    annotations: tuple[CocoAnnotation, ...]
    meta: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL's `Image.size`."""
        return self.width, self.height


def coco_instances(json_path: str | Path, image_root: str | Path) -> list[CocoImage]:
    """The images of a COCO instances file, in the file's order, each with its annotations in the file's order
    (pycocotools' `getImgIds()` / `getAnnIds(imgIds=...)` order, which Neo et al.'s loop follows). Images are
    read lazily from `image_root / file_name`; the JSON itself is read at once.

    Raises if the file lacks the `images`, `annotations` or `categories` lists, or an annotation names an image
    or category the file does not have.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"no COCO instances file at {json_path}")
    with json_path.open() as f:
        data = json.load(f)
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ValueError(f"{json_path} is not a COCO instances file: it lacks {missing} (an instances_*.json has "
                         "'images', 'annotations' and 'categories')")
    categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    by_image: dict[int, list[CocoAnnotation]] = {int(image["id"]): [] for image in data["images"]}
    for ann in data["annotations"]:
        image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in by_image:
            raise ValueError(f"annotation {ann.get('id')} refers to image {image_id}, which {json_path} does not list")
        if category_id not in categories:
            raise ValueError(f"annotation {ann.get('id')} has category {category_id}, which {json_path} does not list")
        by_image[image_id].append(CocoAnnotation(
            id=int(ann["id"]), category_id=category_id, category=categories[category_id],
            bbox=tuple(float(v) for v in ann["bbox"]), segmentation=ann.get("segmentation"),
            area=float(ann["area"]), iscrowd=bool(ann.get("iscrowd", 0)), raw=ann))
    images = []
    for image in data["images"]:
        image_id = int(image["id"])
        meta = {k: v for k, v in image.items() if k not in ("id", "file_name", "width", "height")}
        images.append(CocoImage(image_id, ImageFile(image_root / image["file_name"]), int(image["width"]),
                                int(image["height"]), tuple(by_image[image_id]), meta))
    return images


def neo_filter(image: CocoImage, *, max_annotations: int = 3, area: tuple[float, float] = (1000, 2000)
               ) -> CocoAnnotation | None:
    """Neo et al.'s selection (`filter_fn` of their scripts): None for an image with more than `max_annotations`
    annotations (crowd ones included); otherwise, grouping its annotations by category in order of first
    appearance, the annotation of the first category with exactly one instance whose area lies strictly inside
    `area` (px², of the original image); None if there is none."""
    if len(image.annotations) > max_annotations:
        return None
    groups: dict[int, list[CocoAnnotation]] = {}
    for ann in image.annotations:
        groups.setdefault(ann.category_id, []).append(ann)
    for group in groups.values():
        if len(group) == 1 and area[0] < group[0].area < area[1]:
            return group[0]
    return None
