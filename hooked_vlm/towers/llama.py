"""Decoder-only language model tower (Llama, Vicuna, Mistral-shaped): pre-LN RMSNorm blocks with rotary positions,
grouped-query attention and a gated SiLU MLP; LLaVA's and InstructBLIP-Vicuna's `lm`. Phi-2 and Phi-3 are
configurations of it (weights_conversion/phi.py): Phi-2's parallel LayerNorm blocks with biases and partial rotary,
Phi-3's RMSNorm blocks with partial rotary and a sliding window where configured.

    input_ids ── embed ── hook_embed ──[the model writes the image in]── hook_inputs_embeds ── blocks ──
        ── ln_final ── unembed

Positions come from the caller (`position_ids`), or from the attention mask (`cumsum(mask) - 1`, pads 0): a
left-padded row then gets the same positions as the prompt alone, as in HF's generate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import Block, BlockConfig, Embed, Rotary, Unembed, make_norm
from ..components.kv_cache import KVCache
from ..components.masks import causal_mask, generation_positions
from ..hooks import HookPoint
from .base import Tower, TowerCall


@dataclass
class LlamaConfig:
    d_vocab: int
    n_layers: int
    block: BlockConfig  # pre-LN, RMS norm, attention with `rotary`, gated MLP
    sliding_window: int | None = None  # Mistral: each token attends to the last `sliding_window` tokens only

    @property
    def d_model(self) -> int:
        return self.block.d_model


@dataclass(kw_only=True)
class LlamaCall(TowerCall):
    input_ids: Tensor | None
    inputs_embeds: Tensor | None
    attention_mask: Tensor | None
    position_ids: Tensor | None


class LlamaTower(Tower):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.block.attn.rotary is None:
            raise ValueError("a Llama tower's attention needs rotary positions (AttnConfig.rotary)")
        self.cfg = cfg
        self.prefix_resumable = True
        D = cfg.d_model
        self.embed = Embed(cfg.d_vocab, D)
        self.hook_embed = HookPoint()  # [B, T, D] token embeddings (image positions still hold the placeholder)
        self.hook_inputs_embeds = HookPoint()  # [B, T, D] what block 0 reads: the image written in
        self.rotary = Rotary(cfg.block.attn.d_head, cfg.block.attn.rotary)
        self.blocks = nn.ModuleList([Block(cfg.block) for _ in range(cfg.n_layers)])
        self.ln_final = make_norm(D, cfg.block.norm)
        self.unembed = Unembed(D, cfg.d_vocab, bias=False)

    def embed_tokens(self, input_ids: Int[Tensor, "B T"]) -> Float[Tensor, "B T D"]:
        return self.hook_embed(self.embed(input_ids))

    def new_cache(self) -> KVCache:
        return KVCache.for_tower(self)

    def cached_kv_hooks(self, layer: int) -> tuple[HookPoint, HookPoint]:
        attn = self.blocks[layer].attn
        return attn.hook_rot_k, attn.hook_v  # keys are rotated before they enter the cache (`Attention.forward`)

    def forward(
        self,
        input_ids: Int[Tensor, "B T"] | None = None,
        attention_mask: Int[Tensor, "B S"] | None = None,
        *,
        inputs_embeds: Float[Tensor, "B T D"] | None = None,
        position_ids: Int[Tensor, "B T"] | Int[Tensor, "3 B T"] | None = None,  # [3, B, T]: multimodal rotary
        past: KVCache | None = None,
        start_at_layer: int | None = None,
        resid: Float[Tensor, "B T_out D"] | None = None,
    ) -> Float[Tensor, "B T_out D"]:  # T_out < T when resumed on the suffix after a prefix cache
        """The stream after the last block (before `ln_final`; `logits` applies it).

        Args:
            input_ids: the tokens (while generating: the new ones after `past.length`), or
            inputs_embeds: their embeddings with the image written in (from `embed_tokens`).
            attention_mask: 1 for real tokens, 0 for pads, over past and new tokens; None: all real.
            position_ids: positions of the new tokens; None: from the attention mask.
            past: keys and values of earlier steps (or of a prefix, to resume on the suffix); updated in place.
            start_at_layer: with `resid`, start at this block from that stream (`Tower.run`).
            resid: the stream entering block `start_at_layer` (with `past`: of the positions after it).
        """
        call = LlamaCall(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, past=past)
        return self.run(call, start_at_layer, resid)

    def embed_inputs(self, call: LlamaCall) -> Float[Tensor, "B T D"]:
        if (call.input_ids is None) == (call.inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self.embed_tokens(call.input_ids) if call.inputs_embeds is None else call.inputs_embeds
        return self.hook_inputs_embeds(embeds)

    def block_inputs(self, call: LlamaCall, x: Float[Tensor, "B T D"]) -> dict[str, Any]:
        B, T = x.shape[:2]
        start, attention_mask, position_ids = call.offset, call.attention_mask, call.position_ids
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, start + T)} "
                             f"({start} earlier and {T} new tokens)")
        if position_ids is None:
            position_ids = generation_positions(attention_mask)[:, start:]
        elif position_ids.shape[-1] == start + T:  # the whole sequence's positions: keep the new tokens'
            position_ids = position_ids[..., start:]  # ([3, B, S]: multimodal rotary, RotaryConfig.mrope_section)
        rotary = self.rotary(position_ids.to(x.device), x.dtype)  # once per forward, shared by every block
        mask = causal_mask(attention_mask, T, x.dtype, window=self.cfg.sliding_window)
        return dict(mask=mask, rotary=rotary)

    def logits(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
        """From a block's output stream to logits: the final norm, applied once, and the unembedding."""
        return self.unembed(self.ln_final(resid))

    def unembed_directions(self, tokens: Int[Tensor, "*N"]) -> Float[Tensor, "*N D"]:
        """Per token, the direction d with logit = (stream / ln_final's scale) @ d: the norm's weight times the
        token's unembedding row (no bias follows the norm). Direct logit attribution reads it. A LayerNorm with a
        bias (Phi-2) adds the constant `ln_final.b @ unembed.weight[token]`, which no part of the stream carries
        (TransformerLens's convention: it folds it into b_U)."""
        return self.unembed.weight[tokens] * self.ln_final.w
