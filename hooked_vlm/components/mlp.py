"""The feed-forward sub-layer: plain (ViT, BERT, CLIP) or gated (Llama's SiLU, T5's tanh-GELU)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from ..hooks import HookPoint

Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"]


def gelu_tanh(x: Tensor) -> Tensor:
    # HF's NewGELUActivation ("gelu_new", T5's gated-gelu), written as HF writes it so the rounding matches
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)  # CLIP's activation


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": gelu_tanh, "quick_gelu": quick_gelu, "silu": F.silu, "relu": F.relu}


@dataclass
class MLPConfig:
    d_mlp: int
    act: Activation = "gelu"
    gated: bool = False  # out = W_out(act(W_gate x) * W_in x)
    bias: bool = True


class MLP(nn.Module):
    """`hook_pre` is the pre-activation (the gate branch when gated), `hook_pre_linear` the linear branch of a gated
    MLP, `hook_post` the activation (times the linear branch). Weights in `nn.Linear` layout [out, in]; a gated MLP
    keeps gate and linear branch in one matrix so both come from one GEMM."""

    def __init__(self, d_model: int, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.d_mlp = cfg.d_mlp
        self.act = ACTIVATIONS[cfg.act]
        n_in = 2 * cfg.d_mlp if cfg.gated else cfg.d_mlp
        self.in_weight = nn.Parameter(torch.empty(n_in, d_model))  # gated: [gate; linear]
        self.in_bias = nn.Parameter(torch.zeros(n_in)) if cfg.bias else None
        self.out_weight = nn.Parameter(torch.empty(d_model, cfg.d_mlp))
        self.out_bias = nn.Parameter(torch.zeros(d_model)) if cfg.bias else None
        self.hook_pre = HookPoint()  # [B, T, d_mlp]
        if cfg.gated:
            self.hook_pre_linear = HookPoint()  # [B, T, d_mlp]
        self.hook_post = HookPoint()  # [B, T, d_mlp]

    def forward(self, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        h = F.linear(x, self.in_weight, self.in_bias)
        if self.cfg.gated:
            gate, linear = h.split(self.d_mlp, dim=-1)
            post = self.act(self.hook_pre(gate)) * self.hook_pre_linear(linear)
        else:
            post = self.act(self.hook_pre(h))
        # the output projection reads its own dtype: HF keeps T5's `wo` in float32 when it loads float16 weights and
        # casts its input up (T5DenseGatedActDense.forward); a no-op wherever the weights share one dtype
        post = self.hook_post(post)
        return F.linear(post.to(self.out_weight.dtype), self.out_weight, self.out_bias)

    # TransformerLens-layout views (share storage with the parameters)
    @property
    def W_in(self) -> Float[Tensor, "D d_mlp"]:
        return self.in_weight[-self.d_mlp:].T

    @property
    def W_gate(self) -> Float[Tensor, "D d_mlp"]:
        if not self.cfg.gated:
            raise AttributeError("this MLP is not gated: it has no W_gate")
        return self.in_weight[: self.d_mlp].T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp D"]:
        return self.out_weight.T
