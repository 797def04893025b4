"""Loaders for the papers' data files, each reading the real format into lazily loaded `Example`s."""

from .coco import CocoAnnotation, CocoImage, coco_instances, neo_filter
from .coco_qa import coco_qa
from .example import Example, ImageFile
from .gqa import gqa
from .notice import notice_pairs
from .pope import pope

__all__ = ["CocoAnnotation", "CocoImage", "Example", "ImageFile", "coco_instances", "neo_filter",
           "coco_qa", "gqa", "notice_pairs", "pope"]
