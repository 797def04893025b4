"""T5 encoder and decoder stacks (InstructBLIP-Flan-T5's language model).

Pre-LN blocks with RMS norms, no 1/sqrt(d_head) in attention (`AttnConfig(scale=1.0)`: T5 folds it into the
weights), a gated tanh-GELU MLP, and a relative position bias: one bucket table per stack (HF keeps it in block 0's
`relative_attention_bias`) turned once per forward into a bias [1, H, T, S] that every block's self-attention adds
to its scores. The decoder's blocks cross-attend to the encoder's output (no position bias there).

    encoder: inputs_embeds ── hook_inputs_embeds ── blocks ── ln_final
    decoder: input_ids ── embed ── hook_embed ── blocks (self, cross, mlp) ── ln_final ── [* d_model^-0.5] ── unembed
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import Block, BlockConfig, Embed, Unembed, make_norm
from ..components.kv_cache import KVCache
from ..components.masks import causal_mask, padding_mask
from ..hooks import HookPoint
from .base import Tower, TowerCall


@dataclass
class T5StackConfig:
    d_vocab: int
    n_layers: int
    block: BlockConfig  # decoder: with cross_attn
    decoder: bool
    n_buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    # decoder: HF's `scale_decoder_outputs` (T5 with tied embeddings) multiplies the stream by d_model^-0.5 before
    # the unembedding; Flan-T5 (untied lm_head) does not
    scale_outputs: bool = False

    @property
    def d_model(self) -> int:
        return self.block.d_model


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias. `W_bias` [n_buckets, H]; buckets as HF's
    `T5Attention._relative_position_bucket` (exact up to max_exact, then logarithmic up to max_distance)."""

    def __init__(self, n_buckets: int, n_heads: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.W_bias = nn.Parameter(torch.empty(n_buckets, n_heads))

    def buckets(self, relative: Int[Tensor, "T S"]) -> Int[Tensor, "T S"]:
        n = self.n_buckets
        out = torch.zeros_like(relative)
        if self.bidirectional:
            n //= 2
            out = out + (relative > 0).long() * n
            relative = relative.abs()
        else:
            relative = -relative.clamp(max=0)
        max_exact = n // 2
        large = max_exact + (torch.log(relative.float() / max_exact) / math.log(self.max_distance / max_exact)
                             * (n - max_exact)).long()
        large = large.clamp(max=n - 1)
        return out + torch.where(relative < max_exact, relative, large)

    def forward(self, n_queries: int, n_keys: int, offset: int = 0) -> Float[Tensor, "1 H T S"]:
        """Bias for queries at positions offset..offset+T-1 over keys 0..S-1."""
        device = self.W_bias.device
        q = torch.arange(n_queries, device=device)[:, None] + offset
        k = torch.arange(n_keys, device=device)[None, :]
        return F.embedding(self.buckets(k - q), self.W_bias).permute(2, 0, 1).unsqueeze(0)


@dataclass(kw_only=True)
class T5Call(TowerCall):
    input_ids: Tensor | None
    inputs_embeds: Tensor | None
    attention_mask: Tensor | None
    kv_input: Tensor | None
    kv_mask: Tensor | None


class T5Stack(Tower):
    """A T5 encoder (reads `inputs_embeds`, into which the model has written the image queries) or decoder (reads
    token ids, cross-attends to the encoder output, ends in the unembedding)."""

    def __init__(self, cfg: T5StackConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.d_model, cfg.block.attn.n_heads
        self.embed = Embed(cfg.d_vocab, D)
        self.hook_embed = HookPoint()  # [B, T, D]
        if not cfg.decoder:
            self.hook_inputs_embeds = HookPoint()  # [B, T, D]: the embeddings with the image queries written in
        self.rel_pos = RelativePositionBias(cfg.n_buckets, H, cfg.max_distance, bidirectional=not cfg.decoder)
        self.blocks = nn.ModuleList([Block(cfg.block) for _ in range(cfg.n_layers)])
        self.ln_final = make_norm(D, cfg.block.norm)
        if cfg.decoder:
            self.unembed = Unembed(D, cfg.d_vocab, bias=False)

    def embed_tokens(self, input_ids: Int[Tensor, "B T"]) -> Float[Tensor, "B T D"]:
        return self.hook_embed(self.embed(input_ids))

    def forward(
        self,
        input_ids: Int[Tensor, "B T"] | None = None,
        attention_mask: Int[Tensor, "B S"] | None = None,
        *,
        inputs_embeds: Float[Tensor, "B T D"] | None = None,
        kv_input: Float[Tensor, "B S_enc D"] | None = None,
        kv_mask: Int[Tensor, "B S_enc"] | None = None,
        past: KVCache | None = None,
        start_at_layer: int | None = None,
        resid: Float[Tensor, "B T D"] | None = None,
    ) -> Float[Tensor, "B T D"]:
        """Encoder: the stream after `ln_final`. Decoder: the stream after the last block (`logits` normalises it).

        Args:
            input_ids: the tokens (decoder: the new ones after `past.length` when generating).
            attention_mask: 1 for real tokens, 0 for pads, over past and new tokens; None: all real.
            inputs_embeds: encoder: the token embeddings with the image written in (instead of input_ids).
            kv_input: decoder: the encoder output it cross-attends to.
            kv_mask: decoder: the encoder's padding mask.
            past: decoder: keys and values of earlier steps; updated in place.
            start_at_layer: with `resid`, start at this block from that stream (`Tower.run`).
            resid: the stream entering block `start_at_layer`.
        """
        call = T5Call(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      kv_input=kv_input, kv_mask=kv_mask, past=past)
        return self.run(call, start_at_layer, resid)

    def embed_inputs(self, call: T5Call) -> Float[Tensor, "B T D"]:
        x = self.embed_tokens(call.input_ids) if call.inputs_embeds is None else call.inputs_embeds
        return x if self.cfg.decoder else self.hook_inputs_embeds(x)

    def block_inputs(self, call: T5Call, x: Float[Tensor, "B T D"]) -> dict[str, Any]:
        B, T, dtype, start = x.shape[0], x.shape[1], x.dtype, call.offset
        attention_mask = call.attention_mask
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=x.device)
        if self.cfg.decoder:
            mask = causal_mask(attention_mask, T, dtype)
            cross_mask = padding_mask(call.kv_mask, dtype) if call.kv_mask is not None else None
        else:
            mask, cross_mask = padding_mask(attention_mask, dtype), None
        pos_bias = self.rel_pos(T, start + T, offset=start).to(dtype)  # once per forward, shared by every block
        return dict(mask=mask, pos_bias=pos_bias, kv_input=call.kv_input, kv_mask=cross_mask)

    def output(self, call: T5Call, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        # the encoder's output is what the decoder reads: normalised; the decoder's is its last block's stream,
        # which `logits` normalises (so the logit lens reads every layer the same way)
        return x if self.cfg.decoder else self.ln_final(x)

    def logits(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
        """Decoder: from a block's output stream to logits (the final norm, applied once, then the unembedding)."""
        resid = self.ln_final(resid)
        if self.cfg.scale_outputs:
            resid = resid * self.cfg.d_model**-0.5
        return self.unembed(resid)

    def unembed_directions(self, tokens: Int[Tensor, "*N"]) -> Float[Tensor, "*N D"]:
        """Decoder: per token, the direction d with logit = (stream / ln_final's scale) @ d: the norm's weight,
        d_model^-0.5 with `scale_outputs`, and the token's unembedding row. Direct logit attribution reads it."""
        w = self.ln_final.w * self.cfg.d_model**-0.5 if self.cfg.scale_outputs else self.ln_final.w
        return self.unembed.weight[tokens] * w
