"""Building blocks shared by every tower: one class per concept, configured by dataclasses."""

from .attention import Attention, AttnConfig, LayerKV
from .block import Block, BlockConfig, BlockKV
from .embeddings import Embed, PatchEmbed, PosEmbed, Unembed
from .mlp import MLP, MLPConfig
from .norms import LayerNorm, NormConfig, RMSNorm, make_norm
from .rotary import Rotary, RotaryConfig

__all__ = [
    "Attention", "AttnConfig", "LayerKV", "Block", "BlockConfig", "BlockKV", "Embed", "PatchEmbed", "PosEmbed",
    "Unembed", "MLP", "MLPConfig", "LayerNorm", "NormConfig", "RMSNorm", "make_norm", "Rotary", "RotaryConfig",
]
