"""A tower's weights stacked over its layers, in TransformerLens's names and layouts (`HookedTransformer.W_Q` ...):

    W_Q                   [L, H, D, d_head]      b_Q  [L, H, d_head]
    W_K, W_V              [L, H, D_kv, d_head]   b_K, b_V  [L, H, d_head]   (grouped-query: KV heads repeated)
    _W_K, _W_V            [L, H_kv, D_kv, d_head]                            (the stored KV heads, TL's `_W_K`)
    W_O                   [L, H, d_head, D]      b_O  [L, D]
    W_in, W_gate          [L, D, d_mlp]          b_in [L, d_mlp]   (W_gate: gated MLPs only)
    W_out                 [L, d_mlp, D]          b_out [L, D]
    W_E [d_vocab, D], W_pos [n_ctx, D], W_U [D, d_vocab], b_U [d_vocab]   where the tower has them
    OV = FactoredMatrix(W_V, W_O)  [L, H, D_kv, D];  QK = FactoredMatrix(W_Q, W_K^T)  [L, H, D, D_kv]

Stacks are copies (made on every access, as TransformerLens's are), differentiable, in the parameters' dtype, on
the first block's device.
A projection without a bias has zeros there, as TransformerLens's zero-initialised biases.

Cross-attention (BLIP's text towers, the Q-Former, the T5 decoder) is `tower.attention_weights("cross_attn")`, with
the same names, stacked over the blocks that have one (`.layers`: the Q-Former cross-attends on every
`cross_attention_frequency`-th block only, so index i of its stacks is block `.layers[i]`).

What the circuits mean: `x @ QK[l, h] @ y.T` is head (l, h)'s attention score (before the `1/sqrt(d_head)` scale, the
mask and the softmax, and without the bias terms) between a query reading x and a key reading y, where x and y are
what the attention reads: the normalised stream (`ln1.hook_normalized`) in a pre-LN tower, the stream itself
(`hook_resid_pre`) in a post-LN one. With rotary positions (Llama) the score is `x W_Q R(j - i) W_K^T y` and QK
alone is not the bilinear form; T5 adds its relative position bias to the scores. `x @ OV[l, h]` is what head
(l, h) writes to the stream for a source token x it attends to fully (plus `b_V @ W_O` and the head's share of b_O).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .components.attention import Attention
from .components.mlp import MLP
from .factored_matrix import FactoredMatrix, composition_scores

AttentionKind = Literal["attn", "cross_attn"]


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    # a model spread over devices (accelerate's device maps) has its blocks on several: stack on the first one's
    return torch.stack([t.to(tensors[0].device) for t in tensors])


def _zeros_if_none(bias: Tensor | None, like: Tensor, shape: Sequence[int]) -> Tensor:
    return bias if bias is not None else like.new_zeros(shape)


class StackedAttention:
    """One kind of attention of a tower (`attn` or `cross_attn`), its weights stacked over `layers`.

    Args:
        modules: the `Attention` of each block in `layers`, in order.
        layers: the block index of each.
    """

    def __init__(self, modules: Sequence[Attention], layers: Sequence[int]):
        if not modules:
            raise ValueError("no attention to stack: the tower has no block with it")
        self.modules, self.layers = list(modules), tuple(layers)
        self.n_heads, self.n_kv_heads, self.d_head = modules[0].n_heads, modules[0].n_kv_heads, modules[0].d_head

    def _stack(self, get) -> Tensor:
        return _stack([get(m) for m in self.modules])

    def _repeat_kv(self, t: Tensor) -> Tensor:
        # TransformerLens's grouped-query attention: query head h reads KV head h // (H / H_kv)
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    @property
    def W_Q(self) -> Float[Tensor, "L H D d_head"]:
        return self._stack(lambda m: m.W_Q)

    @property
    def _W_K(self) -> Float[Tensor, "L H_kv D_kv d_head"]:
        return self._stack(lambda m: m.W_K)

    @property
    def _W_V(self) -> Float[Tensor, "L H_kv D_kv d_head"]:
        return self._stack(lambda m: m.W_V)

    @property
    def W_K(self) -> Float[Tensor, "L H D_kv d_head"]:
        return self._repeat_kv(self._W_K)

    @property
    def W_V(self) -> Float[Tensor, "L H D_kv d_head"]:
        return self._repeat_kv(self._W_V)

    @property
    def W_O(self) -> Float[Tensor, "L H d_head D"]:
        return self._stack(lambda m: m.W_O)

    def _bias(self, get, n_heads: int, weight: Tensor) -> Tensor:
        return self._stack(lambda m: _zeros_if_none(get(m), weight, (n_heads, self.d_head)))

    @property
    def b_Q(self) -> Float[Tensor, "L H d_head"]:
        return self._bias(lambda m: m.b_Q, self.n_heads, self.modules[0].o_weight)

    @property
    def _b_K(self) -> Float[Tensor, "L H_kv d_head"]:
        return self._bias(lambda m: m.b_K, self.n_kv_heads, self.modules[0].o_weight)

    @property
    def _b_V(self) -> Float[Tensor, "L H_kv d_head"]:
        return self._bias(lambda m: m.b_V, self.n_kv_heads, self.modules[0].o_weight)

    @property
    def b_K(self) -> Float[Tensor, "L H d_head"]:
        return self._repeat_kv(self._b_K)

    @property
    def b_V(self) -> Float[Tensor, "L H d_head"]:
        return self._repeat_kv(self._b_V)

    @property
    def b_O(self) -> Float[Tensor, "L D"]:
        return self._stack(lambda m: _zeros_if_none(m.b_O, m.o_weight, (m.o_weight.shape[0],)))

    @property
    def OV(self) -> FactoredMatrix:
        """[L, H, D_kv, D]: a source token's vector in, what the head writes out."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """[L, H, D, D_kv]: the bilinear form of the attention scores (query side on the left)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))


class TowerWeights:
    """Mixed into `Tower`: TransformerLens's stacked weights, circuits and composition scores, read from `blocks`
    and the tower's embedding modules (`embed`, `pos_embed` or `W_pos`, `unembed`)."""

    blocks: nn.ModuleList

    def __getattr__(self, name: str):
        # A weight the tower lacks (W_pos of a rotary tower) raises AttributeError in its property, so that hasattr
        # is False; Python then calls __getattr__, whose default (nn.Module's) would drop the property's message.
        try:
            return super().__getattr__(name)
        except AttributeError:
            prop = getattr(TowerWeights, name, None)
            if isinstance(prop, property):
                prop.fget(self)  # raises the property's own error, which says why
            raise

    # ------------------------------------------------------------------ attention
    def attention_weights(self, attention: AttentionKind = "attn") -> StackedAttention:
        """The stacked weights of the self-attention (`"attn"`) or of the cross-attention (`"cross_attn"`, over the
        blocks that have one: `.layers`)."""
        if attention not in ("attn", "cross_attn"):
            raise ValueError(f"attention must be 'attn' or 'cross_attn', got {attention!r}")
        found = [(i, getattr(b, attention)) for i, b in enumerate(self.blocks)
                 if isinstance(getattr(b, attention, None), Attention)]
        if not found:
            raise ValueError(f"{type(self).__name__} has no block with {attention!r}")
        return StackedAttention([m for _, m in found], [i for i, _ in found])

    W_Q = property(lambda self: self.attention_weights().W_Q, doc="[L, H, D, d_head]")
    W_K = property(lambda self: self.attention_weights().W_K, doc="[L, H, D, d_head], KV heads repeated (GQA)")
    W_V = property(lambda self: self.attention_weights().W_V, doc="[L, H, D, d_head], KV heads repeated (GQA)")
    _W_K = property(lambda self: self.attention_weights()._W_K, doc="[L, H_kv, D, d_head]")
    _W_V = property(lambda self: self.attention_weights()._W_V, doc="[L, H_kv, D, d_head]")
    W_O = property(lambda self: self.attention_weights().W_O, doc="[L, H, d_head, D]")
    b_Q = property(lambda self: self.attention_weights().b_Q, doc="[L, H, d_head]")
    b_K = property(lambda self: self.attention_weights().b_K, doc="[L, H, d_head], KV heads repeated (GQA)")
    b_V = property(lambda self: self.attention_weights().b_V, doc="[L, H, d_head], KV heads repeated (GQA)")
    _b_K = property(lambda self: self.attention_weights()._b_K, doc="[L, H_kv, d_head]")
    _b_V = property(lambda self: self.attention_weights()._b_V, doc="[L, H_kv, d_head]")
    b_O = property(lambda self: self.attention_weights().b_O, doc="[L, D]")
    OV = property(lambda self: self.attention_weights().OV, doc="FactoredMatrix [L, H, D, D]: W_V @ W_O")
    QK = property(lambda self: self.attention_weights().QK, doc="FactoredMatrix [L, H, D, D]: W_Q @ W_K^T")

    def all_composition_scores(self, mode: Literal["Q", "K", "V"]) -> Float[Tensor, "L1 H1 L2 H2"]:
        """TransformerLens's composition scores of the self-attention heads: [L1, H1, L2, H2], how much head
        (L2, H2)'s query (`"Q"`), key (`"K"`) or value (`"V"`) input reads what head (L1, H1) writes (its OV);
        zero unless L1 < L2. In a post-LN tower a norm sits between the two heads, which the score ignores."""
        weights = self.attention_weights()
        left = weights.OV
        rights = {"Q": lambda: weights.QK, "K": lambda: weights.QK.T, "V": lambda: weights.OV}
        if mode not in rights:
            raise ValueError(f"mode must be one of 'Q', 'K', 'V', got {mode!r}")
        scores = composition_scores(left, rights[mode](), broadcast_dims=True)
        layers = torch.arange(len(weights.layers), device=scores.device)
        later = layers[:, None, None, None] < layers[None, None, :, None]
        return torch.where(later, scores, torch.zeros_like(scores))

    def all_head_labels(self) -> list[str]:
        """"L{layer}H{head}" for every self-attention head, layer-major (TransformerLens's labels)."""
        return [f"L{layer}H{head}" for layer in range(len(self.blocks))
                for head in range(self.blocks[layer].attn.n_heads)]

    # ------------------------------------------------------------------ MLP
    def mlp_modules(self, mlp: str = "mlp") -> list[MLP]:
        """The `MLP` of every block (`mlp="mlp_text"`: the Q-Former's instruction MLP)."""
        modules = [getattr(b, mlp, None) for b in self.blocks]
        if not all(isinstance(m, MLP) for m in modules):
            raise ValueError(f"not every block of {type(self).__name__} has an MLP named {mlp!r}")
        return modules

    @property
    def W_in(self) -> Float[Tensor, "L D d_mlp"]:
        """The input weights (a gated MLP's linear branch; `W_gate` is the other)."""
        return _stack([m.W_in for m in self.mlp_modules()])

    @property
    def W_gate(self) -> Float[Tensor, "L D d_mlp"]:
        mlps = self.mlp_modules()
        if not mlps[0].cfg.gated:
            raise AttributeError(f"the MLPs of {type(self).__name__} are not gated: they have no W_gate")
        return _stack([m.W_gate for m in mlps])

    @property
    def b_in(self) -> Float[Tensor, "L d_mlp"]:
        """The bias of `W_in`'s branch (zeros without one)."""
        return _stack([m.in_bias[-m.d_mlp:] if m.in_bias is not None else m.in_weight.new_zeros(m.d_mlp)
                            for m in self.mlp_modules()])

    @property
    def W_out(self) -> Float[Tensor, "L d_mlp D"]:
        return _stack([m.W_out for m in self.mlp_modules()])

    @property
    def b_out(self) -> Float[Tensor, "L D"]:
        return _stack([_zeros_if_none(m.out_bias, m.out_weight, (m.out_weight.shape[0],))
                            for m in self.mlp_modules()])

    # ------------------------------------------------------------------ embeddings
    @property
    def W_E(self) -> Float[Tensor, "d_vocab D"]:
        """The token embedding (the tower's `embed`)."""
        embed = getattr(self, "embed", None)
        if embed is None or not hasattr(embed, "W_E"):
            raise AttributeError(f"{type(self).__name__} embeds no tokens (a vision tower embeds patches: "
                             "`patch_embed.W_patch`)")
        return embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx D"]:
        """Learned absolute position embeddings (a ViT's, a BERT's); towers with rotary or relative positions
        have none."""
        pos = getattr(getattr(self, "pos_embed", None), "W_pos", None)
        if pos is None:
            pos = self._parameters.get("W_pos")
        if pos is None:
            raise AttributeError(f"{type(self).__name__} has no learned absolute positions (rotary or relative "
                             "position bias)")
        return pos

    @property
    def W_U(self) -> Float[Tensor, "D d_vocab"]:
        """The unembedding, where the tower predicts tokens (BLIP's text decoder: after its head transform,
        `head`)."""
        return self._unembed().W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        unembed = self._unembed()
        return _zeros_if_none(unembed.b_U, unembed.weight, (unembed.weight.shape[0],))

    def _unembed(self):
        unembed = getattr(self, "unembed", None)
        if unembed is None:
            raise AttributeError(f"{type(self).__name__} has no unembedding (it does not predict tokens)")
        return unembed


__all__ = ["AttentionKind", "StackedAttention", "TowerWeights"]
