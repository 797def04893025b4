"""A flat view of one tower's configuration in TransformerLens's names (`HookedTransformerConfig`), for code written
against `model.cfg`: `model.cfg_of("lm").n_layers`. Read from the tower's modules and its config dataclass, so it
says what the tower computes; it is a view, not a way to build one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .components import Block, Embed, Unembed
from .towers.base import Tower
from .towers.t5 import RelativePositionBias

# our activation names -> TransformerLens's `act_fn` spelling
TL_ACT_FN = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu", "silu": "silu", "relu": "relu"}


@dataclass(frozen=True)
class TLConfig:
    """TransformerLens's config fields for one tower, plus what a VLM tower adds (`tower`, `layout`,
    `cross_attn_layers`). None where a field does not apply (d_vocab of a vision tower, n_ctx of a tower without
    learned positions)."""

    tower: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    act_fn: str  # TransformerLens's spelling ("gelu_new" for the tanh approximation)
    normalization_type: str  # "LN" or "RMS"
    layout: str  # "pre" (norm before each sub-layer, as TL) or "post" (BERT-style: after each residual add)
    positional_embedding_type: str  # "standard" (learned absolute), "rotary" or "relative_positional_bias" (T5)
    eps: float
    gated_mlp: bool
    d_vocab: int | None = None  # token embedding rows; None: the tower embeds no tokens
    d_vocab_out: int | None = None  # unembedding columns; None: the tower predicts no tokens
    n_ctx: int | None = None  # positions the learned position embedding covers (plus learned queries); None: unbounded
    n_key_value_heads: int | None = None  # grouped-query attention; None when every query head has its own (as TL)
    attn_scale: float = 1.0  # scores are divided by it (TransformerLens); sqrt(d_head), or 1 for T5
    use_attn_scale: bool = True
    rotary_base: float | None = None
    rotary_dim: int | None = None
    cross_attn_layers: tuple[int, ...] = ()  # blocks with a cross-attention
    original_architecture: str | None = None  # the HF class of the whole model this tower belongs to
    parallel_attn_mlp: bool = False  # attention and MLP read the same norm and add to the stream together (Phi-2)


def tl_config(tower: Tower, name: str, original_architecture: str | None = None) -> TLConfig:
    """The `TLConfig` of `tower`, registered as `name` in its model."""
    blocks = [b for b in tower.blocks if isinstance(b, Block)]
    if not blocks:
        raise ValueError(f"tower {name!r} has no transformer blocks")
    cfg = blocks[0].cfg
    attn = cfg.attn
    embed, unembed = getattr(tower, "embed", None), getattr(tower, "unembed", None)
    if attn.rotary is not None:
        pos_type = "rotary"
    elif any(isinstance(m, RelativePositionBias) for m in tower.modules()):
        pos_type = "relative_positional_bias"
    else:
        pos_type = "standard"
    try:
        # the learned queries of a Q-Former precede the instruction in the sequence, without positions of their own
        n_ctx = tower.W_pos.shape[0] + getattr(tower.cfg, "n_query", 0)
    except AttributeError:
        n_ctx = None
    return TLConfig(
        tower=name,
        n_layers=len(blocks),
        d_model=cfg.d_model,
        n_heads=attn.n_heads,
        d_head=attn.d_head,
        d_mlp=cfg.mlp.d_mlp,
        act_fn=TL_ACT_FN.get(cfg.mlp.act, cfg.mlp.act),
        normalization_type={"layer": "LN", "rms": "RMS"}[cfg.norm.kind],
        layout=cfg.layout,
        positional_embedding_type=pos_type,
        eps=cfg.norm.eps,
        gated_mlp=cfg.mlp.gated,
        d_vocab=embed.W_E.shape[0] if isinstance(embed, Embed) else None,  # a ViT's `embed` is a method
        d_vocab_out=unembed.weight.shape[0] if isinstance(unembed, Unembed) else None,
        n_ctx=n_ctx,
        n_key_value_heads=attn.n_kv_heads if attn.n_kv_heads != attn.n_heads else None,
        attn_scale=1.0 / attn.scale,
        use_attn_scale=attn.scale != 1.0,
        rotary_base=attn.rotary.base if attn.rotary is not None else None,
        rotary_dim=(attn.rotary.dim or attn.d_head) if attn.rotary is not None else None,  # Phi: partial
        cross_attn_layers=tuple(i for i, b in enumerate(blocks) if b.cfg.cross_attn is not None),
        original_architecture=original_architecture,
        parallel_attn_mlp=cfg.parallel,
    )


__all__ = ["TLConfig", "tl_config", "TL_ACT_FN"]
