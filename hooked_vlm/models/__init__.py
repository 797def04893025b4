from .base import HookedVLM, TowerInfo
from .blip import BlipConfig, HookedBlipCaptioning, HookedBlipITM, HookedBlipVQA

__all__ = ["HookedVLM", "TowerInfo", "BlipConfig", "HookedBlipCaptioning", "HookedBlipITM", "HookedBlipVQA"]
