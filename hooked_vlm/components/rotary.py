"""Rotary position embeddings (Llama): the cos/sin tables are built once per tower from the position ids and
passed down to every attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


@dataclass
class RotaryConfig:
    base: float = 10_000.0


class Rotary(nn.Module):
    """Half-split rotary embedding (`rotate_half`, not interleaved), as HF's Llama computes it."""

    def __init__(self, d_head: int, cfg: RotaryConfig):
        super().__init__()
        self.d_head, self.base = d_head, cfg.base

    @torch.no_grad()
    def forward(self, positions: Int[Tensor, "B T"], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # computed per call (d_head / 2 numbers): no buffer, so a model built on the meta device needs no fix-up
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.int64, device=positions.device).float() / self.d_head
        inv_freq = 1.0 / (self.base**exponents)
        # float32 outer product by matmul, as HF does: the rounding of the angles then matches bit for bit
        inv_freq = inv_freq[None, :, None].expand(positions.shape[0], -1, 1)
        freqs = (inv_freq @ positions[:, None, :].float()).transpose(1, 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Float[Tensor, "B T H d"], cos: Float[Tensor, "B T d"], sin: Float[Tensor, "B T d"]) -> Tensor:
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
