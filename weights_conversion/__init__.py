"""HF transformers <-> hooked_vlm: conversion plans, one module per architecture, registered by HF class name;
streaming conversion of checkpoints (`convert_checkpoint`) and export back (`export.py`)."""

from . import blip  # noqa: F401  (registers the BLIP converters)
from . import instructblip  # noqa: F401  (registers the InstructBLIP converter)
from . import llava  # noqa: F401  (registers the LLaVA converter)
from .registry import CONVERTERS, Converter, converter_for, register_converter
from .state_dict import ConversionPlan, Recipe
from .streaming import convert_checkpoint

__all__ = ["CONVERTERS", "ConversionPlan", "Converter", "Recipe", "convert_checkpoint", "converter_for",
           "register_converter"]
