"""Decoder-only language model tower (Llama, Vicuna, Mistral-shaped): pre-LN RMSNorm blocks with rotary positions,
grouped-query attention and a gated SiLU MLP; LLaVA's and InstructBLIP-Vicuna's `lm`.

    input_ids ── embed ── hook_embed ──[the model writes the image in]── hook_inputs_embeds ── blocks ──
        ── ln_final ── unembed

Positions come from the caller (`position_ids`), or from the attention mask (`cumsum(mask) - 1`, pads 0): a
left-padded row then gets the same positions as the prompt alone, as in HF's generate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import Block, BlockConfig, Embed, Rotary, Unembed, make_norm
from ..components.kv_cache import KVCache
from ..components.masks import causal_mask, generation_positions
from ..hooks import HookPoint
from .base import Tower


@dataclass
class LlamaConfig:
    d_vocab: int
    n_layers: int
    block: BlockConfig  # pre-LN, RMS norm, attention with `rotary`, gated MLP
    sliding_window: int | None = None  # Mistral: each token attends to the last `sliding_window` tokens only

    @property
    def d_model(self) -> int:
        return self.block.d_model


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

    def decode_step(self, prompt_embeds: Float[Tensor, "B T D"]):
        """A step function for `greedy_decode`: the prompt's embeddings (the image written in) on the first call,
        then one new token at a time, with a KV cache."""
        past = self.new_cache()

        def step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
            first = past.length == 0
            resid = self(input_ids=None if first else new_ids, inputs_embeds=prompt_embeds if first else None,
                         attention_mask=mask, position_ids=positions, past=past)
            return self.logits(resid[:, -1:])[:, -1]

        return step

    def forward(
        self,
        input_ids: Int[Tensor, "B T"] | None = None,
        attention_mask: Int[Tensor, "B S"] | None = None,
        *,
        inputs_embeds: Float[Tensor, "B T D"] | None = None,
        position_ids: Int[Tensor, "B T"] | None = None,
        past: KVCache | None = None,
    ) -> Float[Tensor, "B T_out D"]:  # T_out < T when resumed on the suffix after a prefix cache
        """The stream after the last block (before `ln_final`; `logits` applies it).

        Args:
            input_ids: the tokens (while generating: the new ones after `past.length`), or
            inputs_embeds: their embeddings with the image written in (from `embed_tokens`).
            attention_mask: 1 for real tokens, 0 for pads, over past and new tokens; None: all real.
            position_ids: positions of the new tokens; None: from the attention mask.
            past: keys and values of earlier steps; updated in place.
        """
        if self.given_output is not None:
            return self.given_output
        if past is None and self.resume_past is not None:
            past = self.resume_past  # resuming on the suffix after a cached prefix
        start = past.length if past is not None else 0
        self.position_offset = start
        first, x = self.start()
        if x is None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids and inputs_embeds")
            x = self.hook_inputs_embeds(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        B, T = x.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, start + T)} "
                             f"({start} earlier and {T} new tokens)")
        if position_ids is None:
            position_ids = generation_positions(attention_mask)[:, start:]
        elif position_ids.shape[1] == start + T:  # the whole sequence's positions: keep the new tokens'
            position_ids = position_ids[:, start:]
        rotary = self.rotary(position_ids.to(x.device), x.dtype)  # once per forward, shared by every block
        mask = causal_mask(attention_mask, T, x.dtype, window=self.cfg.sliding_window)
        for i in range(first, self.cfg.n_layers):
            x = self.blocks[i](x, mask=mask, rotary=rotary, past=past.blocks[i] if past is not None else None)
        if past is not None:
            past.length = start + T
        return self.finish(x)

    def logits(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
        """From a block's output stream to logits: the final norm, applied once, and the unembedding."""
        return self.unembed(self.ln_final(resid))
