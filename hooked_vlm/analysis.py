"""Dataset-level analyses built on the hook API."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import distributed as distributed_
from . import interventions, metrics, patching
from . import names as names_
from .arguments import strict
from .cache import ActivationCache
from .head_selection import select_heads  # noqa: F401  (re-exported: analysis.select_heads)
from .hooks import NameFilter
from .models.base import HookedVLM


@strict
@torch.no_grad()
def mean_activation(model: HookedVLM, batches: Iterable[Mapping[str, Any]], hook_names: NameFilter, *,
                    over: str = "examples", mask_key: str | None = "attention_mask", distributed: bool = False
                    ) -> dict[str, Tensor]:
    """Stream the mean of activations over a data set without holding it: a running sum in float64 per hook.

    `over="examples"`: the mean over examples, per position ([T, ...]; every batch must have the same length).
    `over="tokens"`: the mean over examples and positions ([...], e.g. [H, d_head] for a `hook_z`, [D] for a
    stream), counting only real tokens when the batch's `mask_key` mask has the hook's sequence length.

    `distributed=True`: each process of the torch.distributed group runs every `world_size`-th batch and the sums
    are added across processes; every rank returns the same means, on the CPU (equal to one process's up to float64
    rounding).
    """
    if over not in ("examples", "tokens"):
        raise ValueError(f"over must be 'examples' or 'tokens', got {over!r}")
    if distributed:
        distributed_.require_group()
    names = model.hook_names(hook_names)
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for i, batch in enumerate(batches):
        if distributed and i % distributed_.world_size() != distributed_.rank():
            continue  # another process's batch
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch {i} is a {type(batch).__name__}: each batch must be the processor's output (a dict "
                            "of tensors)")
        mask = batch.get(mask_key) if mask_key else None

        def accumulate(t: Tensor, hook: Any) -> None:
            x = t.detach().double()
            if over == "examples":
                total, count = x.sum(0), torch.tensor(x.shape[0], dtype=torch.float64)
            elif mask is not None and mask.shape[:2] == x.shape[:2]:
                keep = mask.to(x.device).bool()
                total, count = x[keep].sum(0), keep.sum().double()
            else:
                total, count = x.flatten(0, 1).sum(0), torch.tensor(x.shape[0] * x.shape[1], dtype=torch.float64)
            if hook.name in sums and sums[hook.name].shape != total.shape:
                raise ValueError(f"{hook.name} changed shape between batches ({tuple(sums[hook.name].shape)} vs "
                                 f"{tuple(total.shape)}); pad every batch to one length or use over='tokens'")
            sums[hook.name] = sums.get(hook.name, 0) + total
            counts[hook.name] = counts.get(hook.name, 0) + count.to(total.device)

        model.run_with_hooks(**batch, fwd_hooks=[(n, accumulate) for n in names])
    if distributed:  # every rank gets the sums over all the processes' batches (on the CPU)
        sums, counts = distributed_.all_sum(sums), distributed_.all_sum(counts)
    if not sums:
        raise ValueError("mean_activation got no batches: pass a non-empty iterable of input dicts (a generator "
                         "already consumed is empty)")
    return {n: (sums[n] / counts[n]).to(model.dtype) for n in names if n in sums}


@dataclass
class LogitLens:
    """Top-k tokens of the unembedding applied to each layer's stream: `ids`, `probs` [n_layers, B, P, k] and the
    token strings `tokens[layer][example][position][rank]`, at the sequence positions `positions` [B, P]."""

    ids: Tensor
    probs: Tensor
    tokens: list
    positions: Tensor


@strict
@torch.no_grad()
def logit_lens(model: HookedVLM, cache_or_inputs: ActivationCache | Mapping[str, Any], *, tower: str,
               positions: Sequence[int] | Tensor | None = None, k: int = 5) -> LogitLens:
    """Per layer and position, the top-k next-token predictions read off the stream after that block
    (`hook_resid_post`) through the tower's own output head (`tower.logits`: its final norm, applied once, and the
    unembedding; BLIP's prediction-head transform). The last layer reproduces the model's logits.

    `cache_or_inputs`: a cache holding the tower's `hook_resid_post` of every layer, or inputs to run."""
    head = model.tower(tower)
    if not hasattr(head, "logits") or not hasattr(head, "unembed"):
        raise ValueError(f"tower {tower!r} has no output head to read a stream with; the logit lens applies to the "
                         "towers that predict tokens")
    vocab = getattr(getattr(head, "cfg", None), "d_vocab", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (vocab is not None and k > vocab):
        raise ValueError(f"k={k!r}: pass a number of top tokens in 1..{vocab if vocab is not None else 'vocab size'}")
    n_layers = model.tower_info(tower).n_layers
    streams = [names_.resid(tower, layer, "post") for layer in range(n_layers)]
    cache = cache_or_inputs
    if not isinstance(cache, ActivationCache):
        _, cache = model.run_with_cache(**cache_or_inputs, names_filter=streams)
    missing = [n for n in streams if n not in cache]
    if missing:
        raise ValueError(f"the cache lacks {missing[:3]}...; cache every layer's hook_resid_post of {tower!r}")
    stream = torch.stack([cache[n] for n in streams])  # [L, B, T, D]
    B, T = stream.shape[1:3]
    pos = patching.example_positions(positions, B, T)  # checked: non-empty, in range, one row per example
    picked = stream[:, torch.arange(B)[:, None], pos.to(stream.device)]  # [L, B, P, D]
    probs = head.logits(picked.flatten(1, 2)).float().softmax(-1).view(*picked.shape[:3], -1)
    top = probs.topk(k, dim=-1)
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    tokens = [[[tokenizer.convert_ids_to_tokens(row) for row in ex] for ex in layer] for layer in top.indices.tolist()] \
        if tokenizer is not None else []
    return LogitLens(top.indices, top.values, tokens, pos)


@dataclass
class HeadScores:
    """V-SEAM's head contributions (Wang et al. 2025), [n_layers, n_heads] each.

    positive: mean over the examples the model answers correctly of ReLU(P_base - P_ablated): heads it needs.
    negative: mean over the examples it answers wrongly of ReLU(P_ablated - P_base): heads that mislead it.
    delta: mean over all examples of P_base - P_ablated (signed), what the rescaling uses.
    """

    positive: Tensor
    negative: Tensor
    delta: Tensor
    correct: Tensor  # [B] bool: baseline argmax == answer

    def positive_heads(self, k: int = 5) -> list[tuple[int, int]]:
        """The k heads with the highest positive score; raises if no example was answered correctly."""
        if not bool(self.correct.any()):
            raise ValueError(f"no example of the {len(self.correct)} was answered correctly, so no head has a positive "
                             "score: fit head_scores on examples the model answers correctly (see scores.correct)")
        return _top(self.positive, k)

    def negative_heads(self, k: int = 5) -> list[tuple[int, int]]:
        """The k heads with the highest negative score; raises if every example was answered correctly."""
        if bool(self.correct.all()):
            raise ValueError(f"all {len(self.correct)} examples were answered correctly, so no head has a negative "
                             "score: fit head_scores on examples the model answers wrongly too (see scores.correct)")
        return _top(self.negative, k)


def _top(scores: Tensor, k: int) -> list[tuple[int, int]]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: pass a positive number of heads")
    flat = torch.nan_to_num(scores, nan=float("-inf")).flatten()
    idx = flat.topk(min(k, flat.numel())).indices
    return [(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in idx]


@strict
def head_scores(model: HookedVLM, inputs: Mapping[str, Any], answer: metrics.TokenIds, *, tower: str = "lm",
                attention: str = "attn", position: metrics.Position = -1, batch_size: int = 64,
                progress: bool = True) -> HeadScores:
    """Score every head by replacing its values with the mean of the other heads of its layer (V-SEAM's head
    importance): the change of P(answer) at `position` (the first answer token; one id per example allowed),
    split by whether the unablated model answers correctly. Fit on one split and evaluate the resulting
    interventions (`rescaling_hooks`) on another."""
    metric = metrics.prob(answer, position)
    patching.head_leaf(model, tower, attention, "z")  # the tower and attention exist: checked before any forward
    with torch.no_grad():
        logits = model(**inputs)
    examples = torch.arange(logits.shape[0], device=logits.device)
    base = metrics.evaluate(metric, logits, examples, "head_scores").float().cpu()  # [B]
    metrics.check_finite(base, "the unablated run's examples")
    predicted = metrics.logits_at(logits, position, examples).argmax(-1)
    correct = (predicted == metrics.per_row(answer, examples, "answer")).cpu()
    ablated = patching.ablation_sweep(model, inputs, metric, tower=tower, attention=attention,
                                      mode="mean_of_others", batch_size=batch_size, progress=progress)  # [L, H, B]
    drop = base - ablated

    def masked_mean(x: Tensor, keep: Tensor) -> Tensor:
        return x[..., keep].mean(-1) if keep.any() else torch.full(x.shape[:-1], float("nan"))

    return HeadScores(positive=masked_mean(drop.clamp(min=0), correct),
                      negative=masked_mean((-drop).clamp(min=0), ~correct), delta=drop.mean(-1), correct=correct)


@strict
def rescaling_hooks(model: HookedVLM, scores: HeadScores, *, lam: float = 1.0, tower: str = "lm",
                    attention: str = "attn", low: float = 0.0, high: float = 2.0) -> list:
    """V-SEAM's head rescaling as hooks: each head's values times clip(1 + lam * delta, low, high), where delta is
    the head's signed drop of P(answer) when ablated (`HeadScores.delta`)."""
    factors = (1 + lam * torch.nan_to_num(scores.delta)).clamp(low, high)
    return interventions.scale_heads(model, {(layer, head): float(factors[layer, head])
                                             for layer in range(factors.shape[0]) for head in range(factors.shape[1])},
                                     tower=tower, attention=attention)
