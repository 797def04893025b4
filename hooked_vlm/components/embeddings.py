"""Token, position and patch embeddings, and the unembedding. Parameters in TransformerLens names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "B T"]) -> Float[Tensor, "B T D"]:
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """Learned absolute position embeddings."""

    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))

    def forward(self, positions: Int[Tensor, "B T"]) -> Float[Tensor, "B T D"]:
        return F.embedding(positions, self.W_pos)


class PatchEmbed(nn.Module):
    """Image -> patch embeddings (a strided convolution), flattened row-major over the patch grid."""

    def __init__(self, d_model: int, patch_size: int, bias: bool, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.W_patch = nn.Parameter(torch.empty(d_model, channels, patch_size, patch_size))
        self.b_patch = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, pixel_values: Float[Tensor, "B C H W"]) -> Float[Tensor, "B N D"]:
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch, stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)


class Unembed(nn.Module):
    """Stream -> logits. Stored as [V, D] (`nn.Linear` layout) for the GEMM; `W_U` [D, V] is a view."""

    def __init__(self, d_model: int, d_vocab: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        self.b_U = nn.Parameter(torch.zeros(d_vocab)) if bias else None

    @property
    def W_U(self) -> Float[Tensor, "D V"]:
        return self.weight.T

    def forward(self, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
        return F.linear(x, self.weight, self.b_U)
