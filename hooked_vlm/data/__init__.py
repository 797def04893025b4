"""Loaders for the papers' data files, each reading the real format into lazily loaded `Example`s."""

from .example import Example, ImageFile

__all__ = ["Example", "ImageFile"]
