"""Multi-head attention: one class for self- and cross-attention in every tower (ViT, BERT, Q-Former, CLIP, Llama,
T5); the variants are fields of `AttnConfig`.

Two paths compute the same thing:
- fast: `scaled_dot_product_attention`, taken when nothing hooks the scores or the pattern;
- explicit: scores, softmax and the value mix spelled out, taken when `hook_attn_scores`/`hook_pattern` is hooked
  (which includes caching them) or when `use_fast_path` is switched off.
`hook_result` (per-head outputs in model space) is computed only when hooked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from ..hooks import HookPoint
from .norms import NormConfig, make_norm
from .rotary import Rotary, RotaryConfig, apply_rotary


@dataclass
class AttnConfig:
    n_heads: int
    d_head: int
    n_kv_heads: int | None = None  # grouped-query attention; None: as many as query heads
    cross: bool = False  # keys and values come from another sequence
    kv_dim: int | None = None  # width of that sequence; None: d_model
    bias: bool = True  # biases of the q, k, v projections
    out_bias: bool = True
    scale: float | None = None  # None: d_head ** -0.5 (T5: 1.0, its scaling is folded into the weights)
    # HF eager Llama, CLIP and T5 take the softmax in float32, BLIP in the input dtype. Not read any more: both paths
    # take it in float32 (so hooking changes nothing but rounding); kept so that saved configs load.
    softmax_fp32: bool = False
    rotary: RotaryConfig | None = None
    # a norm over each head's query and key (width d_head) before the rotary embedding (HF Phi's qk_layernorm);
    # None: none
    qk_norm: NormConfig | None = None

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.scale is None:
            self.scale = self.d_head**-0.5


@dataclass
class LayerKV:
    """Keys and values of one attention module kept between generation steps ([B, S, H_kv, d_head], after hooks)."""

    k: Tensor | None = None
    v: Tensor | None = None


class Attention(nn.Module):
    """Parameters are stored fused in `nn.Linear` layout, so that a self-attention projects q, k and v with one GEMM:
    `qkv_weight` [(H + 2 H_kv) d_head, D] (self) or `q_weight` [H d_head, D] and `kv_weight` [2 H_kv d_head, D_kv]
    (cross), and `o_weight` [D, H d_head]. `W_Q`, `W_K`, `W_V`, `W_O` and the biases are per-head views of them.
    """

    def __init__(self, d_model: int, cfg: AttnConfig):
        super().__init__()
        self.cfg = cfg
        H, H_kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.n_heads, self.n_kv_heads, self.d_head = H, H_kv, d
        kv_dim = cfg.kv_dim or d_model
        if cfg.cross:
            self.q_weight = nn.Parameter(torch.empty(H * d, d_model))
            self.q_bias = nn.Parameter(torch.zeros(H * d)) if cfg.bias else None
            self.kv_weight = nn.Parameter(torch.empty(2 * H_kv * d, kv_dim))
            self.kv_bias = nn.Parameter(torch.zeros(2 * H_kv * d)) if cfg.bias else None
        else:
            if kv_dim != d_model:
                raise ValueError("a self-attention reads keys from its own stream: kv_dim must equal d_model")
            self.qkv_weight = nn.Parameter(torch.empty((H + 2 * H_kv) * d, d_model))
            self.qkv_bias = nn.Parameter(torch.zeros((H + 2 * H_kv) * d)) if cfg.bias else None
        self.o_weight = nn.Parameter(torch.empty(d_model, H * d))
        self.o_bias = nn.Parameter(torch.zeros(d_model)) if cfg.out_bias else None
        self.use_fast_path = True

        self.hook_q = HookPoint()  # [B, T, H, d_head]
        self.hook_k = HookPoint()  # [B, S, H_kv, d_head]
        self.hook_v = HookPoint()  # [B, S, H_kv, d_head]
        if cfg.qk_norm is not None:  # each with hook_scale [B, T, H, 1] and hook_normalized [B, T, H, d_head]
            self.q_norm = make_norm(d, cfg.qk_norm)
            self.k_norm = make_norm(d, cfg.qk_norm)
        if cfg.rotary is not None:
            self.hook_rot_q = HookPoint()  # [B, T, H, d_head]
            self.hook_rot_k = HookPoint()  # [B, S, H_kv, d_head]
        self.hook_attn_scores = HookPoint()  # [B, H, T, S], float32 (or float64)
        self.hook_pattern = HookPoint()  # [B, H, T, S]
        self.hook_z = HookPoint()  # [B, T, H, d_head]
        self.hook_result = HookPoint()  # [B, T, H, D], float32 (or float64)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Float[Tensor, "B T D"],
        kv_input: Float[Tensor, "B S D_kv"] | None = None,
        *,
        mask: Float[Tensor, "#B 1 #T S"] | None = None,  # padding masks broadcast over T
        rotary: tuple[Tensor, Tensor] | None = None,
        pos_bias: Float[Tensor, "1 H T S"] | None = None,
        past: LayerKV | None = None,
    ) -> Float[Tensor, "B T D"]:
        """Args:
            x: the stream the queries read.
            kv_input: the sequence a cross-attention reads (ignored once `past` holds its keys).
            mask: additive mask (0 or a large negative), broadcastable to [B, H, T, S].
            rotary: (cos, sin) [B, T, d_head] for the positions of x.
            pos_bias: additive position bias (T5), broadcastable to [B, H, T, S].
            past: keys and values of earlier generation steps; updated in place.
        """
        q, k, v = self._project(x, kv_input, past)
        if self.cfg.qk_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k) if k is not None else None
        if rotary is not None:
            cos, sin = rotary
            q = self.hook_rot_q(apply_rotary(q, cos, sin))
            if k is not None:
                k = self.hook_rot_k(apply_rotary(k, cos, sin))
        k, v = self._with_past(k, v, past)

        q, k, v = (rearrange(t, "B T H d -> B H T d") for t in (q, k, v))
        bias = mask if pos_bias is None else (pos_bias if mask is None else pos_bias + mask)
        if self.use_fast_path and not (self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks):
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.cfg.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            z = self._explicit_attention(q, k, v, bias)
        z = self.hook_z(rearrange(z, "B H T d -> B T H d"))
        return self._output(z)

    def _project(self, x: Tensor, kv_input: Tensor | None, past: LayerKV | None):
        H, H_kv, d = self.n_heads, self.n_kv_heads, self.d_head
        if self.cfg.cross:
            q = F.linear(x, self.q_weight, self.q_bias)
            if past is not None and past.k is not None:
                k = v = None  # the attended sequence does not change between steps: reuse its keys
            else:
                if kv_input is None:
                    raise ValueError("a cross-attention needs the sequence it attends to (kv_input)")
                k, v = F.linear(kv_input, self.kv_weight, self.kv_bias).split(H_kv * d, dim=-1)
        else:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split([H * d, H_kv * d, H_kv * d], dim=-1)
        q = self.hook_q(rearrange(q, "B T (H d) -> B T H d", H=H))
        if k is not None:
            k = self.hook_k(rearrange(k, "B S (H d) -> B S H d", H=H_kv))
            v = self.hook_v(rearrange(v, "B S (H d) -> B S H d", H=H_kv))
        return q, k, v

    def _with_past(self, k: Tensor | None, v: Tensor | None, past: LayerKV | None):
        if past is None:
            return k, v
        if k is None:  # cross-attention, later step
            return past.k, past.v
        if past.k is not None and not self.cfg.cross:
            k, v = torch.cat([past.k, k], dim=1), torch.cat([past.v, v], dim=1)
        past.k, past.v = k, v
        return k, v

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # Scores and softmax in float32 (float64 stays), as the fused kernel accumulates them: in half precision a
        # q.k product can overflow and a masked score saturate, so hooking the pattern would change the result.
        # The pattern is cast back to the values' dtype, as HF's eager attention does.
        wide = torch.promote_types(q.dtype, torch.float32)
        # Scaled and masked in place: the scores are a fresh [B, H, T, S] tensor, and each out-of-place step would
        # allocate (and page-fault) another one that size; in place gives the same numbers, op for op.
        scores = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)).mul_(self.cfg.scale)
        if bias is not None:
            fits = torch.broadcast_shapes(scores.shape, bias.shape) == scores.shape
            if fits and torch.result_type(scores, bias) == scores.dtype:
                scores.add_(bias)
            else:  # a mask wider than the scores (in shape or dtype) makes a new tensor, as it always did
                scores = scores + bias
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1).to(v.dtype))
        return torch.matmul(pattern, v)

    def _output(self, z: Float[Tensor, "B T H d"]) -> Float[Tensor, "B T D"]:
        if self.hook_result.has_hooks:
            # per head and summed in float32 (float64 stays), as the fused GEMM accumulates: in float16 one head's
            # share can overflow where the sum over heads does not (T5's large activations), so hooking the result
            # would change the output
            wide = torch.promote_types(z.dtype, torch.float32)
            result = self.hook_result(torch.einsum("bthd,hdm->bthm", z.to(wide), self.W_O.to(wide)))
            out = result.sum(dim=2)
            out = out + self.o_bias.to(wide) if self.o_bias is not None else out
            return out.to(z.dtype)
        return F.linear(rearrange(z, "B T H d -> B T (H d)"), self.o_weight, self.o_bias)

    # ------------------------------------------------------------------ per-head views (share storage)
    def _in_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        H, H_kv, d = self.n_heads, self.n_kv_heads, self.d_head
        if self.cfg.cross:
            return (self.q_weight, *self.kv_weight.split(H_kv * d))
        return self.qkv_weight.split([H * d, H_kv * d, H_kv * d])

    def _in_biases(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        H, H_kv, d = self.n_heads, self.n_kv_heads, self.d_head
        if self.cfg.cross:
            if self.q_bias is None:
                return None, None, None
            return (self.q_bias, *self.kv_bias.split(H_kv * d))
        if self.qkv_bias is None:
            return None, None, None
        return self.qkv_bias.split([H * d, H_kv * d, H_kv * d])

    @property
    def W_Q(self) -> Float[Tensor, "H D d_head"]:
        return rearrange(self._in_weights()[0], "(H d) D -> H D d", H=self.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "H_kv D_kv d_head"]:
        return rearrange(self._in_weights()[1], "(H d) D -> H D d", H=self.n_kv_heads)

    @property
    def W_V(self) -> Float[Tensor, "H_kv D_kv d_head"]:
        return rearrange(self._in_weights()[2], "(H d) D -> H D d", H=self.n_kv_heads)

    @property
    def W_O(self) -> Float[Tensor, "H d_head D"]:
        return rearrange(self.o_weight, "D (H d) -> H d D", H=self.n_heads)

    @property
    def b_Q(self) -> Float[Tensor, "H d_head"] | None:
        b = self._in_biases()[0]
        return None if b is None else b.view(self.n_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "H_kv d_head"] | None:
        b = self._in_biases()[1]
        return None if b is None else b.view(self.n_kv_heads, self.d_head)

    @property
    def b_V(self) -> Float[Tensor, "H_kv d_head"] | None:
        b = self._in_biases()[2]
        return None if b is None else b.view(self.n_kv_heads, self.d_head)

    @property
    def b_O(self) -> Float[Tensor, "D"] | None:
        return self.o_bias


__all__ = ["AttnConfig", "Attention", "LayerKV", "Rotary", "RotaryConfig"]
