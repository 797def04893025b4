"""Normalisation layers: LayerNorm (BERT, ViT, CLIP) and RMSNorm (Llama, T5), each with `hook_scale` and
`hook_normalized`.

`hook_scale` [B, T, 1] is the divisor (the standard deviation, or the root mean square, with eps), in float32 for
half-precision inputs: the statistics are taken in float32 on both paths, so hooking changes nothing but rounding;
`hook_normalized` [B, T, D] is the layer's output, weight and bias applied: what the next sub-layer reads.
The fused kernel runs unless `hook_scale` is hooked; then the division is spelled out so an edit flows on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from ..hooks import HookPoint


@dataclass
class NormConfig:
    kind: Literal["layer", "rms"] = "layer"
    eps: float = 1e-5
    bias: bool = True  # LayerNorm only
    # RMSNorm only: True normalises in float32 and casts back to the input's dtype (HF LlamaRMSNorm); False takes
    # only the mean square in float32, scales x in its own dtype or higher and casts to the weight's dtype when that
    # is half (HF T5LayerNorm). They differ in float64, and when a float32 stream meets half weights (float16 T5).
    upcast_input: bool = True


class LayerNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.hook_scale = HookPoint()  # [B, T, 1], float32 (or float64)
        self.hook_normalized = HookPoint()  # [B, T, D]

    def forward(self, x: Float[Tensor, "*B T D"]) -> Float[Tensor, "*B T D"]:  # *B: per-head q/k norms [B T H d]
        if self.hook_scale.has_hooks:
            # In float32 (float64 stays), as F.layer_norm computes half inputs, rounding once at the end: in
            # float16 BERT's eps of 1e-12 is 0, so a constant row would give 0 / 0, and every row would drift.
            x32 = x.to(torch.promote_types(x.dtype, torch.float32))
            x32 = x32 - x32.mean(-1, keepdim=True)
            scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            out = x32 / scale * self.w.to(x32.dtype)
            out = (out + self.b.to(x32.dtype) if self.b is not None else out).to(x.dtype)
        else:
            out = F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        return self.hook_normalized(out)


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32 and cast back, as HF's LlamaRMSNorm and T5LayerNorm do."""

    def __init__(self, d_model: int, eps: float = 1e-6, upcast_input: bool = True):
        super().__init__()
        self.eps = eps
        self.upcast_input = upcast_input
        self.w = nn.Parameter(torch.ones(d_model))
        self.hook_scale = HookPoint()  # [B, T, 1], float32
        self.hook_normalized = HookPoint()  # [B, T, D]

    def forward(self, x: Float[Tensor, "*B T D"]) -> Float[Tensor, "*B T D"]:  # *B: per-head q/k norms [B T H d]
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        if not self.upcast_input:
            x32 = x if x.dtype == torch.float64 else x32  # T5: only the mean square is float32
        if self.hook_scale.has_hooks:
            x32 = x32 / self.hook_scale((mean_square + self.eps).sqrt())
        else:
            x32 = x32 * torch.rsqrt(mean_square + self.eps)
        if self.upcast_input:  # LlamaRMSNorm: back to the input's dtype
            return self.hook_normalized(self.w * x32.to(x.dtype))
        # T5LayerNorm: to the weight's dtype when that is half. A float16 T5 whose `wo` is kept in float32 carries a
        # float32 stream; every norm hands its sub-layer float16 again.
        half = self.w.dtype in (torch.float16, torch.bfloat16)
        return self.hook_normalized(self.w * (x32.to(self.w.dtype) if half else x32))


def make_norm(d_model: int, cfg: NormConfig) -> LayerNorm | RMSNorm:
    if cfg.kind == "layer":
        return LayerNorm(d_model, cfg.eps, cfg.bias)
    if cfg.kind == "rms":
        return RMSNorm(d_model, cfg.eps, cfg.upcast_input)
    raise ValueError(f"unknown norm kind {cfg.kind!r}; expected 'layer' or 'rms'")
