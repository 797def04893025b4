"""hooked_vlm: vision-language models (BLIP, LLaVA-1.5, InstructBLIP) with a named hook point on every residual
stream, attention pattern and head, numerically equal to transformers."""

from . import analysis, corruption, distributed, interventions, metrics, patching  # noqa: F401  (public modules)
from .cache import ActivationCache
from .hooks import HookedRootModule, HookPoint
from .models import HookedBlipCaptioning, HookedBlipITM, HookedBlipVQA, HookedInstructBlip, HookedLlava, HookedVLM
from .models.qwen2_vl import HookedQwen2VL
from .positions import ImageSpan, Positions

__all__ = ["ActivationCache", "HookedRootModule", "HookPoint", "HookedVLM", "HookedBlipCaptioning",
           "HookedBlipITM", "HookedBlipVQA", "HookedInstructBlip", "HookedLlava", "HookedQwen2VL", "ImageSpan", "Positions"]
__version__ = "0.1.0"
