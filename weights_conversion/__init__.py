"""HF transformers -> hooked_vlm weight converters, one module per architecture, registered by HF class name."""

from . import blip  # noqa: F401  (registers the BLIP converters)
from . import instructblip  # noqa: F401  (registers the InstructBLIP converter)
from . import llava  # noqa: F401  (registers the LLaVA converter)
from .registry import CONVERTERS, Converter, converter_for, register_converter

__all__ = ["CONVERTERS", "Converter", "converter_for", "register_converter"]
