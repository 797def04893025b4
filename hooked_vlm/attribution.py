"""Direct logit attribution (DLA) for a VLM's language model: which layers, heads (self- and cross-attention),
MLPs and, for one head, which source tokens (image tokens among them) write the answer's logit.

The last block's output is a sum of parts in a pre-LN tower (embeddings, every attention and MLP output); the final
norm is linear once its scale is frozen at the value it took in the run, so each part's logit (difference) through
that frozen norm and the unembedding adds up to the model's: TransformerLens's `decompose_resid` /
`get_full_resid_decomposition` + `logit_attrs`, per tower. A head's output at the answer position is itself a sum
over source positions, pattern[s] * v[s] @ W_O, which gives the per-source view.

Applies to the towers with a linear head after a final norm: LLaVA's and InstructBLIP-Vicuna's `lm`, and
InstructBLIP-Flan-T5's `lm_decoder`. BLIP's text decoder is post-LN (BERT: a LayerNorm after every residual add)
and ends in a non-linear prediction-head transform, so its stream is no sum of component outputs: DLA raises there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import names
from .arguments import strict
from .cache import ActivationCache
from .models.base import HookedVLM

By = Literal["component", "head", "source"]


@dataclass
class LogitAttribution:
    """`values` [n, B]: each component's direct contribution to the logit (difference) of example b at
    `positions[b]`, named by `labels` (n); `total` [B]: the model's logit (difference) there. With `by` "component"
    or "head" the rows sum to `total`; with "source", to the chosen head's own contribution."""

    values: Float[Tensor, "n B"]
    labels: list[str]
    total: Float[Tensor, "B"]
    positions: Int[Tensor, "B"]

    def __getitem__(self, label: str) -> Float[Tensor, "B"]:
        try:
            return self.values[self.labels.index(label)]
        except ValueError:
            raise KeyError(f"no component {label!r}; the labels are {self.labels[:6]}...") from None

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k components with the largest mean |contribution| over the examples, with their mean contribution."""
        mean = self.values.mean(1)
        order = mean.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(mean[i])) for i in order.tolist()]


@strict
@torch.no_grad()
def direct_logit_attribution(model: HookedVLM, cache_or_inputs: ActivationCache | Mapping[str, Any],
                             answer: str | int | Int[Tensor, "B"], wrong: str | int | Int[Tensor, "B"] | None = None,
                             *, tower: str | None = None, by: By = "component",
                             position: int | Int[Tensor, "B"] | None = None, layer: int | None = None,
                             head: int | None = None, attention: Literal["attn", "cross_attn"] = "attn"
                             ) -> LogitAttribution:
    """Direct logit attribution of `answer`'s logit (minus `wrong`'s) at `position`, the final norm's scale frozen
    from the run.

    Args:
        cache_or_inputs: a cache of the tower's hooks (`run_with_cache`), or the inputs to run.
        answer, wrong: a token (str or id), or one id per example ([B]).
        tower: the language-model tower (default: `model.output_tower`, the one producing the logits).
        by: "component": `embed`, `{l}_attn_out`, `{l}_cross_attn_out`, `{l}_mlp_out`;
            "head": every head `L{l}H{h}` (cross-attention `L{l}H{h}_cross`), `{l}_mlp_out`, `embed` and `bias`
            (the attention output biases); "source": for head `head` of block `layer` (`attention`), the part
            written from each source position, `src{s}` (s indexes the attended sequence: the LM's own tokens, or
            the encoder's for a cross-attention).
        position: the position whose logits are attributed: an int for every example, or one per example [B];
            None: each example's last real token.
    """
    tower = tower or model.output_tower
    if not tower:
        raise ValueError("this model has no tower producing logits (model.output_tower); pass tower=")
    info = model.tower_info(tower)
    if info.layout != "pre":
        raise ValueError(f"direct_logit_attribution: tower {tower!r} is post-LN (re-normalised after every sub-layer, "
                         "as BLIP's BERT text towers), so its logits are no sum of component contributions")
    if by not in ("component", "head", "source"):
        raise ValueError(f"by={by!r}: pass 'component', 'head' or 'source'")
    given = (layer, head) != (None, None)
    if (by == "source") != (layer is not None and head is not None) or (by != "source" and given):
        raise ValueError("by='source' needs layer= and head= (the head whose sources are attributed); the other "
                         "views take neither")
    cache = cache_or_inputs
    if not isinstance(cache, ActivationCache):
        prefix = f"{tower}."  # the tower's hooks only; head outputs come from hook_z @ W_O, not hook_result
        _, cache = model.run_with_cache(**cache_or_inputs,
                                        names_filter=lambda n: n.startswith(prefix) and not n.endswith("hook_result"))
    stream = cache[tower, info.n_layers - 1, "resid_post"]  # [B, T, D]
    B, T = stream.shape[:2]
    pos = _positions(cache, tower, position, B, T)
    right = _per_example(cache, answer, B, tower)
    left = _per_example(cache, wrong, B, tower) if wrong is not None else None
    values, labels = None, []
    for p in pos.unique().tolist():
        rows = (pos == p).nonzero().flatten().tolist()
        if by == "component":
            stack, labels = cache.decompose_resid(pos_slice=p, return_labels=True, tower=tower)
        elif by == "head":
            stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=p, return_labels=True,
                                                               tower=tower)
        else:
            stack, labels = _per_source(model, cache, tower, layer, head, attention, p)
        attrs = cache.logit_attrs(stack, right[rows], left[rows] if left is not None else None, pos_slice=p,
                                  batch_slice=rows, tower=tower)  # [n, rows]
        if values is None:
            values = attrs.new_zeros(attrs.shape[0], B)
        values[:, rows] = attrs
    logits = model.tower(tower).logits(stream[torch.arange(B), pos.to(stream.device)][:, None])[:, 0]  # [B, V]
    index = torch.arange(B, device=logits.device)
    total = logits[index, right.to(logits.device)]
    if left is not None:
        total = total - logits[index, left.to(logits.device)]
    return LogitAttribution(values, labels, total, pos)


def _positions(cache: ActivationCache, tower: str, position: int | Tensor | None, B: int, T: int) -> Tensor:
    if position is None:
        found = cache.positions.towers.get(tower, cache.positions) if cache.positions is not None else None
        if found is not None and tuple(found.attention_mask.shape) == (B, T):
            return found.last.cpu()
        return torch.full((B,), T - 1)
    pos = torch.as_tensor(position)
    if pos.is_floating_point() or pos.dtype == torch.bool or pos.ndim > 1 or (pos.ndim == 1 and len(pos) != B):
        raise ValueError(f"position={position!r:.60}: pass an int or one integer position per example ([{B}])")
    if pos.min() < -T or pos.max() >= T:
        raise ValueError(f"position {position!r:.60} is out of range for {T} positions")
    return (pos.expand(B) % T).cpu().long()


def _per_example(cache: ActivationCache, tokens: str | int | Tensor, B: int, tower: str) -> Tensor:
    ids = cache._token_ids(tokens).cpu()
    if ids.ndim == 0:
        return ids.expand(B)
    if ids.shape != (B,):
        raise ValueError(f"pass one token, or one token id per example ([{B}]); got shape {tuple(ids.shape)}")
    return ids


def _per_source(model: HookedVLM, cache: ActivationCache, tower: str, layer: int, head: int, attention: str,
                p: int) -> tuple[Float[Tensor, "S B D"], list[str]]:
    """What head `head` of block `layer` writes at position p from each source position s: pattern[p, s] times
    v[s] @ W_O[head]. Summed over s it is the head's output (z = pattern @ v)."""
    n_layers = model.tower_info(tower).n_layers
    layer = layer + n_layers if layer < 0 else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range for tower {tower!r} with {n_layers} layers")
    block = model.tower(tower).blocks[layer]
    if attention not in ("attn", "cross_attn") or not hasattr(block, attention):
        raise ValueError(f"block {layer} of {tower!r} has no {attention!r}: pass attention='attn' or 'cross_attn'")
    attn = getattr(block, attention)
    if not 0 <= head < attn.n_heads:
        raise ValueError(f"head={head} is out of range: the attention has {attn.n_heads} heads")
    pattern = cache[tower, layer, names.leaf(attention, "pattern")][:, head, p]  # [B, S]
    v = cache[tower, layer, names.leaf(attention, "v")][:, :, head // (attn.n_heads // attn.n_kv_heads)]  # [B, S, d]
    W_O = attn.W_O[head].detach().to(v.device)  # [d, D]
    dtype = torch.promote_types(v.dtype, W_O.dtype)
    out = pattern.to(dtype)[..., None] * (v.to(dtype) @ W_O.to(dtype))  # [B, S, D]
    return out.movedim(1, 0), [f"src{s}" for s in range(out.shape[1])]
