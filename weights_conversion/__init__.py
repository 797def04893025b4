"""HF transformers -> hooked_vlm weight converters, one module per architecture, registered by HF class name."""

from . import blip  # noqa: F401  (registers the BLIP converters)
from .registry import CONVERTERS, Converter, converter_for, register_converter

__all__ = ["CONVERTERS", "Converter", "converter_for", "register_converter"]
