from .base import HookedVLM, TowerInfo
from .blip import BlipConfig, HookedBlipCaptioning, HookedBlipITM, HookedBlipVQA
from .instructblip import HookedInstructBlip, InstructBlipConfig
from .llava import HookedLlava, LlavaConfig

__all__ = ["HookedVLM", "TowerInfo", "BlipConfig", "HookedBlipCaptioning", "HookedBlipITM", "HookedBlipVQA",
            "HookedInstructBlip", "InstructBlipConfig", "HookedLlava", "LlavaConfig"]
