"""A transformer block: self-attention, optional cross-attention, MLP, each added to the residual stream.

    pre-LN (ViT, CLIP, Llama, T5)             post-LN (BERT-style text towers)
    x ── ln1 ── attn ──(+)── resid_mid        x ── attn ──(+)── ln_attn ── resid_mid
    resid_mid ── ln_cross ── cross ──(+)      resid_mid ── cross ──(+)── ln_cross ── resid_mid_cross
    ── ln2 ── mlp ──(+)── resid_post          ── mlp ──(+)── ln_mlp ── resid_post

    parallel (Phi-2, `parallel=True`; TransformerLens's parallel_attn_mlp): one norm, both sub-layers read it
    x ── ln1 ──┬── attn ── attn_out ──┐
               └── mlp ─── mlp_out ───(+ x)── resid_post      (no resid_mid, no ln2)

Sub-layer outputs (`hook_attn_out`, `hook_cross_attn_out`, `hook_mlp_out`) are what is added to the stream, in
both layouts; in a post-LN block the stream hooks hold the normalised stream that the next sub-layer reads.

A tower whose block routes rows differently subclasses `Block` and overrides `build_mlp` (the modules of the MLP
sub-layer, registered in execution order), `cross_sublayer` and `mlp_sublayer`; the residual wiring (`residual`)
and the hook points stay the same.
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


@dataclass
class BlockConfig:
    d_model: int
    attn: AttnConfig
    mlp: MLPConfig
    norm: NormConfig
    layout: Literal["pre", "post"] = "pre"
    cross_attn: AttnConfig | None = None  # None: the block has no cross-attention
    # True: a forward without the attended sequence skips the cross-attention (a tower that runs its blocks both
    # with and without one declares this); False: a missing `kv_input` is an error
    cross_attn_optional: bool = False
    # True: attention and MLP read the same `ln1` output and both are added to the input at once (HF PhiDecoderLayer:
    # attn_out + mlp_out + resid); the block then has no `hook_resid_mid` and no `ln2`. Pre-LN, no cross-attention.
    parallel: bool = False
    # True: in float16, after each sub-layer the stream is clamped to +-(65504 - 1000) if any of it (any row of the
    # batch) overflowed to inf, else to +-65504, as HF's T5Block does (modeling_t5.py, "clamp inf values to enable fp16
    # training"); other dtypes are untouched. Set by the T5 converter.
    clamp_half_overflow: bool = False


@dataclass
class BlockKV:
    """A block's keys and values kept between generation steps."""

    attn: LayerKV
    cross_attn: LayerKV


class Block(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        if cfg.layout not in ("pre", "post"):
            raise ValueError(f"block layout must be 'pre' or 'post', got {cfg.layout!r}")
        if cfg.parallel and (cfg.layout != "pre" or cfg.cross_attn is not None):
            raise ValueError("a parallel block (attention and MLP reading one norm) must be pre-LN without a "
                             "cross-attention: set layout='pre' and cross_attn=None, or parallel=False")
        self.cfg = cfg
        self.pre_norm = cfg.layout == "pre"
        D = cfg.d_model
        # registration order = execution order = hook_dict order
        self.hook_resid_pre = HookPoint()  # [B, T, D]
        if self.pre_norm:
            self.ln1 = make_norm(D, cfg.norm)
        self.attn = Attention(D, cfg.attn)
        self.hook_attn_out = HookPoint()  # [B, T, D]
        if not self.pre_norm:
            self.ln_attn = make_norm(D, cfg.norm)
        if not cfg.parallel:
            self.hook_resid_mid = HookPoint()  # [B, T, D]
        if cfg.cross_attn is not None:
            if self.pre_norm:
                self.ln_cross = make_norm(D, cfg.norm)
            self.cross_attn = Attention(D, cfg.cross_attn)
            self.hook_cross_attn_out = HookPoint()  # [B, T, D]
            if not self.pre_norm:
                self.ln_cross = make_norm(D, cfg.norm)
            self.hook_resid_mid_cross = HookPoint()  # [B, T, D]
        self.build_mlp()
        self.hook_resid_post = HookPoint()  # [B, T, D]

    def build_mlp(self) -> None:
        """The MLP sub-layer's modules: its norm, `mlp`, `hook_mlp_out`, in execution order."""
        D = self.cfg.d_model
        if self.pre_norm and not self.cfg.parallel:  # a parallel block's MLP reads ln1
            self.ln2 = make_norm(D, self.cfg.norm)
        self.mlp = MLP(D, self.cfg.mlp)
        self.hook_mlp_out = HookPoint()  # [B, T, D]
        if not self.pre_norm:
            self.ln_mlp = make_norm(D, self.cfg.norm)

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
        """`kv_input` is the sequence the cross-attention reads (once `past` holds its keys, it may be omitted).
        Without either, a block with `cross_attn_optional` skips its cross-attention (as HF's BLIP text layer does
        when it gets no encoder states); any other block with a cross-attention raises."""
        resid = self.hook_resid_pre(x)
        if self.cfg.parallel:
            h = self.ln1(resid)
            attn_out = self.hook_attn_out(self.attn(h, mask=mask, rotary=rotary, pos_bias=pos_bias,
                                                     past=past and past.attn))
            # summed as HF's PhiDecoderLayer sums them, (attn_out + mlp_out) + resid, so float32 matches bit for bit
            return self.hook_resid_post(attn_out + self.hook_mlp_out(self.mlp(h)) + resid)
        attn_norm = self.ln1 if self.pre_norm else self.ln_attn
        resid = self.hook_resid_mid(self.clamp(self.residual(
            resid, attn_norm, self.hook_attn_out,
            lambda h: self.attn(h, mask=mask, rotary=rotary, pos_bias=pos_bias, past=past and past.attn),
        )))
        if self.cfg.cross_attn is not None and self._has_cross_input(kv_input, past):
            def cross(h: Tensor) -> Tensor:
                return self.cross_attn(h, kv_input, mask=kv_mask, pos_bias=cross_pos_bias,
                                       past=past and past.cross_attn)

            resid = self.hook_resid_mid_cross(self.clamp(self.cross_sublayer(resid, cross)))
        return self.hook_resid_post(self.clamp(self.mlp_sublayer(resid)))

    def clamp(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        """HF T5's float16 overflow clamp (`clamp_half_overflow`): written as HF writes it (a bound chosen on device,
        no host sync), so that the same values come out."""
        if not self.cfg.clamp_half_overflow or resid.dtype != torch.float16:
            return resid
        big = torch.finfo(torch.float16).max
        bound = torch.where(torch.isinf(resid).any(), big - 1000, big).to(resid.dtype)
        return torch.clamp(resid, min=-bound, max=bound)

    def _has_cross_input(self, kv_input: Tensor | None, past: BlockKV | None) -> bool:
        if kv_input is not None or (past is not None and past.cross_attn.k is not None):
            return True
        if self.cfg.cross_attn_optional:
            return False
        raise ValueError("this block has a cross-attention but was given nothing to attend to: pass kv_input (the "
                         "sequence it reads); a tower that runs without one declares BlockConfig.cross_attn_optional")

    def residual(self, resid: Tensor, norm: Callable[[Tensor], Tensor], out_hook: HookPoint,
                 fn: Callable[[Tensor], Tensor]) -> Tensor:
        """One sub-layer added to the stream: pre-LN `resid + fn(norm(resid))`, post-LN `norm(resid + fn(resid))`;
        `out_hook` sees what is added."""
        if self.pre_norm:
            return resid + out_hook(fn(norm(resid)))
        return norm(resid + out_hook(fn(resid)))

    def cross_sublayer(self, resid: Float[Tensor, "B T D"],
                       cross: Callable[[Tensor], Tensor]) -> Float[Tensor, "B T D"]:
        """The stream after the cross-attention (`cross`: queries in, attention output out)."""
        return self.residual(resid, self.ln_cross, self.hook_cross_attn_out, cross)

    def mlp_sublayer(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        """The stream after the MLP."""
        return self.residual(resid, self.ln2 if self.pre_norm else self.ln_mlp, self.hook_mlp_out, self.mlp)

    def new_kv(self) -> BlockKV:
        return BlockKV(LayerKV(), LayerKV())
