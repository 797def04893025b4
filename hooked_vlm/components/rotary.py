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
    # Qwen2-VL's multimodal rotary (HF Qwen2VLRotaryEmbedding): positions come as [3, B, T] (time, row, column) and
    # the d_head / 2 frequencies are cut into these sections, section i taking its angles from axis i % 3
    mrope_section: tuple[int, ...] | None = None
    # rotate only the first `dim` dims of each head, the rest pass through (HF Phi/Phi-3's partial_rotary_factor:
    # int(d_head * factor)); None: all of them
    dim: int | None = None


class Rotary(nn.Module):
    """Half-split rotary embedding (`rotate_half`, not interleaved), as HF's Llama computes it."""

    def __init__(self, d_head: int, cfg: RotaryConfig):
        super().__init__()
        self.d_head, self.base = d_head, cfg.base
        self.mrope_section = cfg.mrope_section
        if cfg.dim is not None:  # partial rotary: the tables cover the rotated dims only (`apply_rotary` splits)
            if not (0 < cfg.dim <= d_head and cfg.dim % 2 == 0):
                raise ValueError(f"rotary dim {cfg.dim} must be even and in 2..d_head ({d_head})")
            self.d_head = cfg.dim

    @torch.no_grad()
    def forward(self, positions: Int[Tensor, "B T"] | Int[Tensor, "3 B T"], dtype: torch.dtype
                ) -> tuple[Tensor, Tensor]:
        # computed per call (d_head / 2 numbers): no buffer, so a model built on the meta device needs no fix-up
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.int64, device=positions.device).float() / self.d_head
        inv_freq = 1.0 / (self.base**exponents)
        if positions.ndim == 3:
            return self._multimodal(positions, inv_freq, dtype)
        # float32 outer product by matmul, as HF does: the rounding of the angles then matches bit for bit
        inv_freq = inv_freq[None, :, None].expand(positions.shape[0], -1, 1)
        freqs = (inv_freq @ positions[:, None, :].float()).transpose(1, 2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _multimodal(self, positions: Int[Tensor, "3 B T"], inv_freq: Tensor, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
        """(time, row, column) positions: each frequency section takes its angle from one axis (HF's
        `recomposition_frequencies`); text tokens have three equal positions, so for them this is the 1-D rotary."""
        if self.mrope_section is None or sum(self.mrope_section) != self.d_head // 2:
            raise ValueError(f"positions of shape {tuple(positions.shape)} are multimodal (time, row, column): they "
                             f"need RotaryConfig.mrope_section summing to d_head / 2 = {self.d_head // 2}, got "
                             f"{self.mrope_section}")
        if positions.shape[0] != 3:
            raise ValueError(f"multimodal positions must be [3, B, T] (time, row, column), got "
                             f"{tuple(positions.shape)}")
        freqs = positions[..., None].float() * inv_freq  # [3, B, T, d/2], elementwise as HF
        sections = freqs.split(list(self.mrope_section), dim=-1)
        freqs = torch.cat([part[i % 3] for i, part in enumerate(sections)], dim=-1)  # [B, T, d/2]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def axial_rotary(rows: Int[Tensor, "*N"], cols: Int[Tensor, "*N"], d_head: int, base: float, dtype: torch.dtype
                 ) -> tuple[Float[Tensor, "*N d"], Float[Tensor, "*N d"]]:
    """The 2-D rotary of Qwen2-VL's vision tower (HF Qwen2VLVisionRotaryEmbedding): d_head / 4 frequencies over
    d_head / 2, applied to the patch row and to the patch column, concatenated, then doubled for `rotate_half`."""
    spatial = d_head // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, spatial, 2, dtype=torch.int64, device=rows.device).float() / spatial))
    freqs = torch.cat((rows[..., None].float() * inv_freq, cols[..., None].float() * inv_freq), dim=-1)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Float[Tensor, "B T H d"], cos: Float[Tensor, "B T d_rot"], sin: Float[Tensor, "B T d_rot"]
                 ) -> Tensor:
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    d_rot = cos.shape[-1]
    if d_rot < x.shape[-1]:  # partial rotary (HF Phi): rotate the first d_rot dims, pass the rest through
        x_rot, x_pass = x[..., :d_rot], x[..., d_rot:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
    return x * cos + rotate_half(x) * sin
