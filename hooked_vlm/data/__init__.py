"""Loaders for the papers' data files, each reading the real format into lazily loaded `Example`s, and the collate
that streams examples into model input batches (`collate`)."""

from .coco import CocoAnnotation, CocoImage, coco_instances, neo_filter
from .coco_qa import coco_qa
from .collate import InputBatch, collate, in_stream_order
from .example import Example, ImageFile
from .gqa import gqa
from .notice import notice_pairs
from .pope import pope

__all__ = ["CocoAnnotation", "CocoImage", "Example", "ImageFile", "coco_instances", "neo_filter",
           "coco_qa", "gqa", "notice_pairs", "pope", "InputBatch", "collate", "in_stream_order"]
