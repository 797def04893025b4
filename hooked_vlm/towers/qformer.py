"""The Q-Former (InstructBLIP): learned query tokens read the image through cross-attention while sharing
self-attention with the instruction text.

    queries [n_query] ─┐
    instruction ─ embed + pos ─┴─ cat ── ln_embed ── post-LN blocks ── first n_query tokens ── hook_out

Each block (post-LN, as BERT) runs a bidirectional self-attention over queries and instruction together; on blocks
`i % cross_attention_frequency == 0` the query tokens alone then cross-attend to the image; the queries go through
`mlp`, the instruction through `mlp_text` (`QFormerBlock`). Queries get no position embedding; the
instruction's positions start at 0 (HF `InstructBlipQFormerEmbeddings`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import MLP, Block, BlockConfig, Embed, PosEmbed, make_norm
from ..components.masks import padding_mask
from ..hooks import HookPoint
from .base import Tower, TowerCall


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
        if self.block.layout != "post":
            raise ValueError(f"the Q-Former's blocks are post-LN (HF InstructBlipQFormerLayer), got "
                             f"{self.block.layout!r}")

    @property
    def d_model(self) -> int:
        return self.block.d_model

    def has_cross_attn(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


def split_rows(n: int, first: Callable[[Tensor], Tensor],
               rest: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """`first` on the first n rows of a [B, T, D] stream, `rest` on the others, back in sequence order."""
    return lambda x: torch.cat([first(x[:, :n]), rest(x[:, n:])], dim=1)


class QFormerBlock(Block):
    """A post-LN `Block` whose first `n_query` rows (the learned queries) alone cross-attend to the image
    (`hook_cross_attn_out` [B, n_query, D]; `hook_resid_mid_cross` is the whole stream, the other rows unchanged)
    and go through `mlp` and `ln_mlp`; the rows after them (the instruction) go through `mlp_text` and
    `ln_mlp_text` (HF InstructBlipQFormerLayer's feed_forward_chunk_query and feed_forward_chunk). `hook_mlp_out`
    holds both MLPs' outputs, in sequence order."""

    def __init__(self, cfg: BlockConfig, n_query: int):
        super().__init__(cfg)
        self.n_query = n_query

    def build_mlp(self) -> None:
        D = self.cfg.d_model
        self.mlp = MLP(D, self.cfg.mlp)
        self.mlp_text = MLP(D, self.cfg.mlp)
        self.hook_mlp_out = HookPoint()  # [B, T, D]
        self.ln_mlp = make_norm(D, self.cfg.norm)
        self.ln_mlp_text = make_norm(D, self.cfg.norm)

    def cross_sublayer(self, resid: Float[Tensor, "B T D"],
                       cross: Callable[[Tensor], Tensor]) -> Float[Tensor, "B T D"]:
        n = self.n_query
        queries = self.residual(resid[:, :n], self.ln_cross, self.hook_cross_attn_out, cross)
        return torch.cat([queries, resid[:, n:]], dim=1)

    def mlp_sublayer(self, resid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        n = self.n_query
        return self.residual(resid, split_rows(n, self.ln_mlp, self.ln_mlp_text), self.hook_mlp_out,
                             split_rows(n, self.mlp, self.mlp_text))


@dataclass(kw_only=True)
class QFormerCall(TowerCall):
    input_ids: Tensor
    attention_mask: Tensor | None
    image: Tensor


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
            QFormerBlock(cfg.block if cfg.has_cross_attn(i) else replace(cfg.block, cross_attn=None), cfg.n_query)
            for i in range(cfg.n_layers)
        ])
        self.hook_out = HookPoint()  # [B, n_query, D]

    def forward(
        self,
        input_ids: Int[Tensor, "B T_text"],
        attention_mask: Int[Tensor, "B T_text"] | None,
        image: Float[Tensor, "B S D_v"],
        *,
        start_at_layer: int | None = None,
        resid: Float[Tensor, "B T D"] | None = None,
    ) -> Float[Tensor, "B n_query D"]:
        """Args:
            input_ids: the instruction, tokenized by the Q-Former's (BERT) tokenizer.
            attention_mask: 1 for its real tokens, 0 for pads; None: all real.
            image: the vision tower's output, which the queries cross-attend to (all of it, unmasked).
            start_at_layer: with `resid`, start at this block from that stream (`Tower.run`).
            resid: the stream entering block `start_at_layer` (queries, then instruction).
        """
        call = QFormerCall(input_ids=input_ids, attention_mask=attention_mask, image=image)
        return self.run(call, start_at_layer, resid)

    def embed_inputs(self, call: QFormerCall) -> Float[Tensor, "B T D"]:
        B, T = call.input_ids.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"the Q-Former instruction has {T} tokens, more than its {self.cfg.n_ctx} positions; "
                             "shorten it (the processor's max_length truncates it)")
        dtype = self.ln_embed.w.dtype
        queries = self.hook_query_tokens(self.query_tokens.to(dtype).expand(B, -1, -1))
        positions = torch.arange(T, device=call.input_ids.device).expand(B, T)
        text = self.hook_embed(self.embed(call.input_ids)) + self.hook_pos_embed(self.pos_embed(positions))
        # in the norm's dtype, as HF's InstructBlipQFormerEmbeddings: a float16 load keeps `word_embeddings` in
        # float32 (HF 5.x's keep-in-float32 pattern "wo" matches it), so the text rows arrive in float32
        return self.ln_embed(torch.cat([queries, text.to(dtype)], dim=1))

    def block_inputs(self, call: QFormerCall, x: Float[Tensor, "B T D"]) -> dict[str, Any]:
        attention_mask = call.attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(call.input_ids)
        # the queries are never padded: they see every query and the instruction's real tokens
        full_mask = torch.cat([attention_mask.new_ones(x.shape[0], self.cfg.n_query), attention_mask], dim=1)
        return dict(mask=padding_mask(full_mask, x.dtype), kv_input=call.image)

    def output(self, call: QFormerCall, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B n_query D"]:
        return self.hook_out(x[:, : self.cfg.n_query])
