"""The Q-Former (InstructBLIP): learned query tokens read the image through cross-attention while sharing
self-attention with the instruction text.

    queries [n_query] ─┐
    instruction ─ embed + pos ─┴─ cat ── ln_embed ── post-LN blocks ── first n_query tokens ── hook_out

Each block (post-LN, as BERT) runs a bidirectional self-attention over queries and instruction together; on blocks
`i % cross_attention_frequency == 0` the query tokens alone then cross-attend to the image; the queries go through
`mlp`, the instruction through `mlp_text` (`Block` with `n_query`). Queries get no position embedding; the
instruction's positions start at 0 (HF `InstructBlipQFormerEmbeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import Block, BlockConfig, Embed, PosEmbed, make_norm
from ..components.masks import padding_mask
from ..hooks import HookPoint
from .base import Tower


@dataclass
class QFormerConfig:
    d_vocab: int
    n_ctx: int  # instruction positions
    n_layers: int
    n_query: int
    block: BlockConfig  # a block with cross-attention; blocks without it drop `cross_attn`
    cross_attention_frequency: int = 2

    def __post_init__(self) -> None:
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        self.block = replace(self.block, n_query=self.n_query)

    @property
    def d_model(self) -> int:
        return self.block.d_model

    def has_cross_attn(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


class QFormerTower(Tower):
    """Learned queries and the instruction -> the queries' outputs [B, n_query, D]."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.query_tokens = nn.Parameter(torch.empty(cfg.n_query, D))
        self.hook_query_tokens = HookPoint(views_parameter=True)  # [B, n_query, D]: a copy when hooked
        self.embed = Embed(cfg.d_vocab, D)
        self.pos_embed = PosEmbed(cfg.n_ctx, D)
        self.hook_embed = HookPoint()  # [B, T_text, D]: instruction token embeddings
        self.hook_pos_embed = HookPoint()  # [B, T_text, D]
        self.ln_embed = make_norm(D, cfg.block.norm)
        self.blocks = nn.ModuleList([
            Block(cfg.block if cfg.has_cross_attn(i) else replace(cfg.block, cross_attn=None))
            for i in range(cfg.n_layers)
        ])
        self.hook_out = HookPoint()  # [B, n_query, D]

    def forward(
        self,
        input_ids: Int[Tensor, "B T_text"],
        attention_mask: Int[Tensor, "B T_text"] | None,
        image: Float[Tensor, "B S D_v"],
    ) -> Float[Tensor, "B n_query D"]:
        """Args:
            input_ids: the instruction, tokenized by the Q-Former's (BERT) tokenizer.
            attention_mask: 1 for its real tokens, 0 for pads; None: all real.
            image: the vision tower's output, which the queries cross-attend to (all of it, unmasked).
        """
        if self.given_output is not None:
            return self.given_output
        B, T = input_ids.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"the Q-Former instruction has {T} tokens, more than its {self.cfg.n_ctx} positions; "
                             "shorten it (the processor's max_length truncates it)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        first, x = self.start()
        if x is None:
            dtype = self.ln_embed.w.dtype
            queries = self.hook_query_tokens(self.query_tokens.to(dtype).expand(B, -1, -1))
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            text = self.hook_embed(self.embed(input_ids)) + self.hook_pos_embed(self.pos_embed(positions))
            x = self.ln_embed(torch.cat([queries, text], dim=1))
        # the queries are never padded: they see every query and the instruction's real tokens
        full_mask = torch.cat([attention_mask.new_ones(B, self.cfg.n_query), attention_mask], dim=1)
        mask = padding_mask(full_mask, x.dtype)
        for block in self.blocks[first:]:
            x = block(x, mask=mask, kv_input=image)
        return self.finish(self.hook_out(x[:, : self.cfg.n_query]))
