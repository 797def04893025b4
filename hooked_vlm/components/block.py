"""A transformer block: self-attention, optional cross-attention, MLP, each added to the residual stream.

    pre-LN (ViT, CLIP, Llama, T5)             post-LN (BERT-style BLIP text towers, Q-Former)
    x ── ln1 ── attn ──(+)── resid_mid        x ── attn ──(+)── ln_attn ── resid_mid
    resid_mid ── ln_cross ── cross ──(+)      resid_mid ── cross ──(+)── ln_cross ── resid_mid_cross
    ── ln2 ── mlp ──(+)── resid_post          ── mlp ──(+)── ln_mlp ── resid_post

Sub-layer outputs (`hook_attn_out`, `hook_cross_attn_out`, `hook_mlp_out`) are what is added to the stream, in
both layouts; in a post-LN block the stream hooks hold the normalised stream that the next sub-layer reads.

Q-Former variant (`n_query`): only the first n_query tokens go through the cross-attention (`hook_cross_attn_out`
[B, n_query, D]; `hook_resid_mid_cross` is the whole stream, the other rows unchanged), and the tokens after them go
through a second MLP `mlp_text` and its own norm (`ln_mlp_text`); `hook_mlp_out` holds both MLPs' outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..hooks import HookPoint
from .attention import Attention, AttnConfig, LayerKV
from .mlp import MLP, MLPConfig
from .norms import NormConfig, make_norm

NORM_NAMES = {"pre": ("ln1", "ln_cross", "ln2"), "post": ("ln_attn", "ln_cross", "ln_mlp")}


@dataclass
class BlockConfig:
    d_model: int
    attn: AttnConfig
    mlp: MLPConfig
    norm: NormConfig
    layout: Literal["pre", "post"] = "pre"
    cross_attn: AttnConfig | None = None  # None: the block has no cross-attention
    # Q-Former: the first `n_query` tokens (the learned queries) alone cross-attend and go through `mlp`; the tokens
    # after them (the instruction) go through a second MLP `mlp_text` with its own norm. None: one MLP for all.
    n_query: int | None = None


@dataclass
class BlockKV:
    """A block's keys and values kept between generation steps."""

    attn: LayerKV
    cross_attn: LayerKV


class Block(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        if cfg.layout not in NORM_NAMES:
            raise ValueError(f"block layout must be 'pre' or 'post', got {cfg.layout!r}")
        self.cfg = cfg
        self.pre_norm = cfg.layout == "pre"
        D = cfg.d_model
        attn_norm, cross_norm, mlp_norm = NORM_NAMES[cfg.layout]

        self.hook_resid_pre = HookPoint()  # [B, T, D]
        if self.pre_norm:
            setattr(self, attn_norm, make_norm(D, cfg.norm))
        self.attn = Attention(D, cfg.attn)
        self.hook_attn_out = HookPoint()  # [B, T, D]
        if not self.pre_norm:
            setattr(self, attn_norm, make_norm(D, cfg.norm))
        self.hook_resid_mid = HookPoint()  # [B, T, D]
        if cfg.cross_attn is not None:  # registration order = execution order = hook_dict order
            if self.pre_norm:
                self.ln_cross = make_norm(D, cfg.norm)
            self.cross_attn = Attention(D, cfg.cross_attn)
            self.hook_cross_attn_out = HookPoint()  # [B, T, D]
            if not self.pre_norm:
                self.ln_cross = make_norm(D, cfg.norm)
            self.hook_resid_mid_cross = HookPoint()  # [B, T, D]
        if self.pre_norm:
            setattr(self, mlp_norm, make_norm(D, cfg.norm))
        self.mlp = MLP(D, cfg.mlp)
        if cfg.n_query is not None:
            if self.pre_norm:
                setattr(self, mlp_norm + "_text", make_norm(D, cfg.norm))
            self.mlp_text = MLP(D, cfg.mlp)
        self.hook_mlp_out = HookPoint()  # [B, T, D]: both MLPs' outputs, in sequence order
        if not self.pre_norm:
            setattr(self, mlp_norm, make_norm(D, cfg.norm))
            if cfg.n_query is not None:
                setattr(self, mlp_norm + "_text", make_norm(D, cfg.norm))
        self.hook_resid_post = HookPoint()  # [B, T, D]
        # plain tuple: the norms stay registered under their layout's names only
        self._norms = (getattr(self, attn_norm), getattr(self, "ln_cross", None), getattr(self, mlp_norm),
                       getattr(self, mlp_norm + "_text", None))

    def forward(
        self,
        x: Float[Tensor, "B T D"],
        *,
        mask: Tensor | None = None,
        kv_input: Float[Tensor, "B S D_kv"] | None = None,
        kv_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        pos_bias: Tensor | None = None,
        cross_pos_bias: Tensor | None = None,
        past: BlockKV | None = None,
    ) -> Float[Tensor, "B T D"]:
        """`kv_input` is the sequence the cross-attention reads. Without it, and with nothing cached in `past`, the
        cross-attention is skipped, as HF's BLIP text layer does when it gets no encoder states."""
        attn_norm, cross_norm, _, _ = self._norms
        resid = self.hook_resid_pre(x)
        resid = self._sublayer(
            resid, attn_norm, self.hook_attn_out, self.hook_resid_mid,
            lambda h: self.attn(h, mask=mask, rotary=rotary, pos_bias=pos_bias, past=past and past.attn),
        )
        has_cross_kv = kv_input is not None or (past is not None and past.cross_attn.k is not None)
        if self.cfg.cross_attn is not None and has_cross_kv:
            def cross(h: Tensor) -> Tensor:
                return self.cross_attn(h, kv_input, mask=kv_mask, pos_bias=cross_pos_bias,
                                       past=past and past.cross_attn)

            n = self.cfg.n_query
            if n is None:
                resid = self._sublayer(resid, cross_norm, self.hook_cross_attn_out, self.hook_resid_mid_cross, cross)
            else:  # only the queries read the image (hook_cross_attn_out: [B, n_query, D]); the rest pass through
                queries = self._sublayer(resid[:, :n], cross_norm, self.hook_cross_attn_out, _identity, cross)
                resid = self.hook_resid_mid_cross(torch.cat([queries, resid[:, n:]], dim=1))
        return self._sublayer(resid, self._mlp_norm, self.hook_mlp_out, self.hook_resid_post, self._mlp)

    def _sublayer(self, resid: Tensor, norm: Callable[[Tensor], Tensor], out_hook: HookPoint,
                  resid_hook: Callable[[Tensor], Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return resid_hook(resid + out_hook(fn(norm(resid))))
        return resid_hook(norm(resid + out_hook(fn(resid))))

    def _mlp_norm(self, x: Tensor) -> Tensor:
        if self.cfg.n_query is None:
            return self._norms[2](x)
        return _split(x, self.cfg.n_query, self._norms[2], self._norms[3])

    def _mlp(self, x: Tensor) -> Tensor:
        if self.cfg.n_query is None:
            return self.mlp(x)
        return _split(x, self.cfg.n_query, self.mlp, self.mlp_text)

    def new_kv(self) -> BlockKV:
        return BlockKV(LayerKV(), LayerKV())


def _split(x: Tensor, n: int, first: Callable[[Tensor], Tensor], rest: Callable[[Tensor], Tensor]) -> Tensor:
    """`first` on the first n tokens, `rest` on the others, back in sequence order."""
    return torch.cat([first(x[:, :n]), rest(x[:, n:])], dim=1)


def _identity(x: Tensor) -> Tensor:
    return x
