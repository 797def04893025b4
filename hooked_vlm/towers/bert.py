"""BERT-style text tower (post-LN, learned absolute positions): BLIP's question encoder and answer/caption
decoder. The same blocks with cross-attention read the image (or the encoded question)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import Block, BlockConfig, Embed, PosEmbed, Unembed, make_norm
from ..components.kv_cache import KVCache
from ..components.masks import causal_mask, padding_mask
from ..components.mlp import ACTIVATIONS
from ..hooks import HookPoint
from .base import Tower, TowerCall


@dataclass
class TextConfig:
    d_vocab: int
    n_ctx: int
    n_layers: int
    block: BlockConfig
    causal: bool  # decoder: causal self-attention; encoder: bidirectional
    lm_head: bool = False  # BLIP decoder: dense -> act -> LayerNorm -> unembed
    head_act: str = "gelu"

    @property
    def d_model(self) -> int:
        return self.block.d_model


class HeadTransform(nn.Module):
    """BERT's prediction-head transform before the unembedding: dense, activation, LayerNorm."""

    def __init__(self, d_model: int, act: str, norm_cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.act = ACTIVATIONS[act]
        self.hook_post = HookPoint()  # [B, T, D] after the activation
        self.ln = make_norm(d_model, norm_cfg)

    def forward(self, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        return self.ln(self.hook_post(self.act(F.linear(x, self.weight, self.bias))))


@dataclass(kw_only=True)
class TextCall(TowerCall):
    input_ids: Tensor
    attention_mask: Tensor | None
    positions: Tensor | None
    kv_input: Tensor | None
    kv_mask: Tensor | None


class TextTower(Tower):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed = Embed(cfg.d_vocab, D)
        self.pos_embed = PosEmbed(cfg.n_ctx, D)
        self.hook_embed = HookPoint()  # [B, T, D]
        self.hook_pos_embed = HookPoint()  # [B, T, D]
        self.ln_embed = make_norm(D, cfg.block.norm)
        # BLIP runs its text towers with and without the attended sequence (ITM's text-only path; HF's BlipTextLayer
        # skips its crossattention when no encoder_hidden_states are given): their cross-attention is optional
        block = replace(cfg.block, cross_attn_optional=True)
        self.blocks = nn.ModuleList([Block(block) for _ in range(cfg.n_layers)])
        if cfg.lm_head:
            self.head = HeadTransform(D, cfg.head_act, cfg.block.norm)
            self.unembed = Unembed(D, cfg.d_vocab, bias=True)

    def forward(
        self,
        input_ids: Int[Tensor, "B T"],
        attention_mask: Int[Tensor, "B S"] | None = None,
        *,
        positions: Int[Tensor, "B T"] | None = None,
        kv_input: Float[Tensor, "B S_kv D_kv"] | None = None,
        kv_mask: Int[Tensor, "B S_kv"] | None = None,
        past: KVCache | None = None,
        start_at_layer: int | None = None,
        resid: Float[Tensor, "B T D"] | None = None,
    ) -> Float[Tensor, "B T D"]:
        """The stream after the last block.

        Args:
            input_ids: the new tokens (all of them, or the ones after `past.length` when generating).
            attention_mask: 1 for real tokens, 0 for pads, over past and new tokens; None: all real.
            positions: position ids of the new tokens; None: counted from `past.length`, ignoring pads (HF forward).
            kv_input: the sequence the cross-attention reads (image or encoded question); None: no cross-attention.
            kv_mask: its padding mask; None attends to all of it.
            past: the keys and values of earlier steps; updated in place.
            start_at_layer: with `resid`, start at this block from that stream (`Tower.run`).
            resid: the stream entering block `start_at_layer`.
        """
        call = TextCall(input_ids=input_ids, attention_mask=attention_mask, positions=positions, kv_input=kv_input,
                        kv_mask=kv_mask, past=past)
        return self.run(call, start_at_layer, resid)

    def embed_inputs(self, call: TextCall) -> Float[Tensor, "B T D"]:
        B, T = call.input_ids.shape
        if call.offset + T > self.cfg.n_ctx:
            raise ValueError(f"the text has {call.offset + T} tokens, more than the {self.cfg.n_ctx} positions this "
                             "tower was trained with; shorten it")
        positions = call.positions
        if positions is None:
            positions = torch.arange(call.offset, call.offset + T, device=call.input_ids.device).expand(B, T)
        x = self.hook_embed(self.embed(call.input_ids))
        return self.ln_embed(x + self.hook_pos_embed(self.pos_embed(positions)))

    def block_inputs(self, call: TextCall, x: Float[Tensor, "B T D"]) -> dict[str, Any]:
        B, T, dtype = x.shape[0], x.shape[1], x.dtype
        attention_mask = call.attention_mask
        if attention_mask is None:
            attention_mask = torch.ones(B, call.offset + T, dtype=torch.long, device=x.device)
        mask = causal_mask(attention_mask, T, dtype) if self.cfg.causal else padding_mask(attention_mask, dtype)
        cross_mask = padding_mask(call.kv_mask, dtype) if call.kv_mask is not None else None
        return dict(mask=mask, kv_input=call.kv_input, kv_mask=cross_mask)

    def logits(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
        return self.unembed(self.head(resid))
