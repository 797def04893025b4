from ..configs import BlipConfig, InstructBlipConfig, LlavaConfig
from .base import HookedVLM, TowerInfo
from .blip import HookedBlipCaptioning, HookedBlipITM, HookedBlipVQA
from .instructblip import HookedInstructBlip
from .llava import HookedLlava

__all__ = ["HookedVLM", "TowerInfo", "BlipConfig", "HookedBlipCaptioning", "HookedBlipITM", "HookedBlipVQA",
            "HookedInstructBlip", "InstructBlipConfig", "HookedLlava", "LlavaConfig"]
