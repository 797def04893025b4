"""HF transformers <-> hooked_vlm: conversion plans, one module per architecture, registered by HF class name;
streaming conversion of checkpoints (`convert_checkpoint`) and export back (`export.py`). The converters build
hooked_vlm's configs (`hooked_vlm.configs`) and never import its models: `hooked_vlm.loading` imports this package."""

# The registry is bound first: importing a converter imports `hooked_vlm`, whose loader imports this package back
# (still initialising) for these names; the converters fill the registry as they are imported.
from .registry import CONVERTERS, Converter, converter_for, register_converter  # isort: skip
from .state_dict import ConversionPlan, Recipe  # isort: skip

from . import blip  # noqa: F401  (registers the BLIP converters)
from . import instructblip  # noqa: F401  (registers the InstructBLIP converter)
from . import llava  # noqa: F401  (registers the LLaVA converter)
from . import qwen2_vl  # noqa: F401  (registers the Qwen2-VL and Qwen2.5-VL converters)
from .streaming import convert_checkpoint

__all__ = ["CONVERTERS", "ConversionPlan", "Converter", "Recipe", "convert_checkpoint", "converter_for",
           "register_converter"]
