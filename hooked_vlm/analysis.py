"""Dataset-level analyses built on the hook API."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import distributed as distributed_
from . import interventions, metrics, patching
from . import names as names_
from .arguments import strict
from .cache import ActivationCache
from .data.collate import InputBatch, check_batch_size, split
from .head_ablation import Batch, unablated_runs
from .head_ablation import (  # noqa: F401  (re-exported: analysis.head_set_ablation, ...)
    PAPER_NEGATIVE_HEADS, PAPER_POSITIVE_HEADS, SetAblation, head_set_ablation, random_head_sets)
from .head_selection import select_heads  # noqa: F401  (re-exported: analysis.select_heads)
from .hooks import NameFilter
from .models.base import HookedVLM
from .utils import progress_bar


@strict
@torch.no_grad()
def mean_activation(model: HookedVLM, batches: Iterable[Mapping[str, Any]], hook_names: NameFilter, *,
                    over: str = "examples", mask_key: str | None = "attention_mask", distributed: bool = False,
                    batch_size: int | None = None, progress: bool = True) -> dict[str, Tensor]:
    """Stream the mean of activations over a data set without holding it: a running sum in float64 per hook,
    whatever the model's dtype (a half-precision sum would lose the small terms of a long stream); the means are
    returned in the model's dtype.

    `batches`: any iterable of input dicts, read lazily one at a time: the processor's outputs, or
    `data.collate(model, examples, batch_size=...)`, which pads and records each example's positions.
    `batch_size`: the most examples per forward; a larger batch is split (None: each batch as given). The means
    equal those of one batch holding every example (up to float64 rounding).

    `over="examples"`: the mean over examples, per position ([T, ...]; every batch must have the same length, and
    pad positions are averaged as they are). `over="tokens"`: the mean over examples and positions ([...], e.g.
    [H, d_head] for a `hook_z`, [D] for a stream), counting only real tokens: padding is left out by each tower's
    mask in `model.positions` (the prompt tower's `attention_mask`, `positions.towers[...]` for the others; towers
    without one, such as the vision tower, have no padding). `mask_key=None` counts every position, padding
    included.

    Each forward stops after the last of `hook_names` (`run_with_hooks(stop_at_hook=True)`): nothing after it runs.

    `distributed=True`: each process of the torch.distributed group runs every `world_size`-th batch and the sums
    are added across processes; every rank returns the same means, on the CPU (equal to one process's up to float64
    rounding). `progress`: a progress bar over the batches.
    """
    if over not in ("examples", "tokens"):
        raise ValueError(f"over must be 'examples' or 'tokens', got {over!r}")
    if mask_key not in ("attention_mask", None):
        raise ValueError(f"mask_key={mask_key!r}: pass 'attention_mask' (each tower's padding, from model.positions) "
                         "or None (every position counts)")
    check_batch_size(batch_size)
    if distributed:
        distributed_.require_group()
    names = model.hook_names(hook_names)
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    bar = progress_bar(len(batches) if isinstance(batches, Sized) else None, progress, "mean_activation")
    try:
        for i, batch in enumerate(batches):
            if distributed and i % distributed_.world_size() != distributed_.rank():
                bar.update(1)
                continue  # another process's batch
            if not isinstance(batch, Mapping):
                raise TypeError(f"batch {i} is a {type(batch).__name__}: each batch must be the processor's output (a "
                                "dict of tensors), e.g. from data.collate")
            for _, chunk in split(batch, batch_size):
                masks = _padding_masks(model, chunk, mask_key) if over == "tokens" else {}
                _accumulate(model, chunk, names, over, masks, sums, counts)
            bar.update(1)
    finally:
        bar.close()
    if distributed:  # every rank gets the sums over all the processes' batches (on the CPU)
        sums, counts = distributed_.all_sum(sums), distributed_.all_sum(counts)
    if not sums:
        raise ValueError("mean_activation got no batches: pass a non-empty iterable of input dicts (a generator "
                         "already consumed is empty)")
    return {n: (sums[n] / counts[n]).to(model.dtype) for n in names if n in sums}


def _padding_masks(model: HookedVLM, batch: Mapping[str, Any], mask_key: str | None) -> dict[str, Tensor]:
    """The [B, T] real-token mask of each tower that has padding, by tower name (none for mask_key=None)."""
    if mask_key is None:
        return {}
    positions = getattr(batch, "positions", None) if isinstance(batch, InputBatch) else None
    positions = positions if positions is not None else model.positions(**batch)
    masks = {model.prompt_tower: positions.attention_mask}
    masks.update({tower: p.attention_mask for tower, p in positions.towers.items()})
    return masks


def _accumulate(model: HookedVLM, batch: Mapping[str, Any], names: list[str], over: str,
                masks: dict[str, Tensor], sums: dict[str, Tensor], counts: dict[str, Tensor]) -> None:
    """One forward, stopped after the last of `names`, adding each hook's float64 sum and count."""

    def accumulate(t: Tensor, hook: Any) -> None:
        x = t.detach().double()
        mask = masks.get(names_.parse(hook.name).tower)
        if over == "examples":
            total, count = x.sum(0), torch.tensor(x.shape[0], dtype=torch.float64)
        elif mask is not None and mask.shape == x.shape[:2]:
            keep = mask.to(x.device).bool()
            total, count = x[keep].sum(0), keep.sum().double()
        else:
            total, count = x.flatten(0, 1).sum(0), torch.tensor(x.shape[0] * x.shape[1], dtype=torch.float64)
        if hook.name in sums and sums[hook.name].shape != total.shape:
            raise ValueError(f"{hook.name} changed shape between batches ({tuple(sums[hook.name].shape)} vs "
                             f"{tuple(total.shape)}); pad every batch to one length or use over='tokens'")
        sums[hook.name] = sums.get(hook.name, 0) + total
        counts[hook.name] = counts.get(hook.name, 0) + count.to(total.device)

    # the forward ends after the last hook asked for: a projector's mean never runs the LM
    model.run_with_hooks(**batch, fwd_hooks=[(n, accumulate) for n in names], stop_at_hook=True)


@dataclass
class LogitLens:
    """Top-k tokens of the unembedding applied to each layer's `hook` (a stream or a sub-layer's output): `ids`,
    `probs` [n_layers, B, P, k] (one layer row for `hook="embed"`) and the token strings
    `tokens[layer][example][position][rank]`, at the sequence positions `positions` [B, P]; `token_probs`
    [n_layers, B, P, n]: the probabilities of the token ids asked for (`logit_lens(tokens=...)`, e.g. each example's
    answer), else None."""

    ids: Tensor
    probs: Tensor
    tokens: list
    positions: Tensor
    hook: str = "resid_post"
    token_probs: Tensor | None = None


LENS_HOOKS = ("resid_post", "resid_mid", "attn_out", "mlp_out", "resid_pre", "resid_mid_cross", "cross_attn_out",
              "embed")
# a chunk's float32 probabilities [L, B, chunk, V], with the logits and softmax temporaries (~3 copies), stay under
# this when `logit_lens(chunk_size=None)`: ~21 positions per step for LLaVA-7B (32 layers, 32,064 tokens), one image
LENS_CHUNK_BYTES = 256 * 2**20


@strict
@torch.no_grad()
def logit_lens(model: HookedVLM, cache_or_inputs: ActivationCache | Mapping[str, Any], *, tower: str,
               hook: str = "resid_post", positions: Sequence[int] | Tensor | None = None, k: int = 5,
               tokens: Sequence[int] | Tensor | None = None, chunk_size: int | None = None) -> LogitLens:
    """Per layer and position, the top-k next-token predictions read off `hook` of every block through the
    tower's own output head (`tower.logits`: its final norm, applied once, and the unembedding; BLIP's
    prediction-head transform). `hook="resid_post"` (the block's output; its last layer reproduces the model's
    logits), `"resid_mid"` (the stream after the attention), `"attn_out"` / `"mlp_out"` (the sub-layers'
    outputs, unembedded as they are, through the same norm: V-SEAM's LogitLens.py), another stream hook, or
    `"embed"`: one row, the stream entering block 0 (`blocks.0.hook_resid_pre`, the embeddings as the blocks read
    them; with the image written in for LLaVA and InstructBLIP).

    `cache_or_inputs`: a cache holding that hook of every layer of the tower, or inputs to run (the run stops after
    the last stream it needs). `tokens`: token ids whose probability to keep at every layer and position
    (`LogitLens.token_probs`): a list shared by the examples or a [B, n] tensor, one row per example (e.g. each
    example's answer's first sub-token, [B, 1]).

    Memory: the probabilities are computed `chunk_size` positions at a time ([L, B, chunk, V] at most, never the
    whole [L, B, P, V]); None picks the most positions that fit `LENS_CHUNK_BYTES`. The result does not depend on it
    (the same ids; probabilities equal up to float rounding)."""
    if hook not in LENS_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(LENS_HOOKS)}, got {hook!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: pass a number of positions per step >= 1 (None: by memory)")
    head = model.tower(tower)
    if not hasattr(head, "logits") or not hasattr(head, "unembed"):
        raise ValueError(f"tower {tower!r} has no output head to read a stream with; the logit lens applies to the "
                         "towers that predict tokens")
    vocab = head.unembed.weight.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k={k!r}: pass a number of top tokens in 1..{vocab}")
    stream = _lens_streams(model, cache_or_inputs, tower, hook)  # [L, B, T, D]
    L, B, T = stream.shape[:3]
    pos = patching.example_positions(positions, B, T).to(stream.device)  # checked: non-empty, in range, per example
    asked = None if tokens is None else _lens_token_ids(tokens, B, vocab).to(stream.device)
    step = chunk_size or max(1, LENS_CHUNK_BYTES // (3 * 4 * L * B * vocab))
    rows = torch.arange(B, device=stream.device)[:, None]
    top_ids, top_probs, token_probs = [], [], []
    for chunk in pos.split(step, dim=1):  # [B, c]
        picked = stream[:, rows, chunk]  # [L, B, c, D]
        probs = head.logits(picked.flatten(1, 2)).float().softmax(-1).view(*picked.shape[:3], vocab)  # [L, B, c, V]
        top = probs.topk(k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values)
        if asked is not None:
            token_probs.append(probs.gather(-1, asked[None, :, None, :].expand(*probs.shape[:3], -1)))
    ids = torch.cat(top_ids, dim=2)  # [L, B, P, k]
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    names_of = [[[tokenizer.convert_ids_to_tokens(row) for row in ex] for ex in layer]
                for layer in ids.tolist()] if tokenizer is not None else []
    return LogitLens(ids, torch.cat(top_probs, dim=2), names_of, pos.cpu(), hook,
                     torch.cat(token_probs, dim=2) if asked is not None else None)


def _lens_streams(model: HookedVLM, cache_or_inputs: ActivationCache | Mapping[str, Any], tower: str,
                  hook: str) -> Float[Tensor, "L B T D"]:
    """The lens's input, stacked over layers: `hook` of every block of `tower` (block 0's input for "embed"),
    from the cache, or from a run of the inputs that stops after the last of them."""
    if hook == "embed":
        streams = [names_.block(tower, 0, "hook_resid_pre")]
    else:
        streams = [names_.block(tower, layer, names_.leaf(hook)) for layer in range(model.tower_info(tower).n_layers)]
    absent = [n for n in streams if n not in model.hook_dict]
    if absent:
        raise ValueError(f"hook={hook!r}: tower {tower!r} has no {absent[0]} (not every layer has it); pass a hook "
                         f"every block has, e.g. 'resid_post'")
    cache = cache_or_inputs
    if not isinstance(cache, ActivationCache):
        _, cache = model.run_with_cache(**cache_or_inputs, names_filter=streams, stop_at_hook=True)
    missing = [n for n in streams if n not in cache]
    if missing:
        raise ValueError(f"the cache lacks {missing[:3]}...; cache every layer's {names_.leaf(hook)} of {tower!r}")
    return torch.stack([cache[n] for n in streams])


def _lens_token_ids(tokens: Sequence[int] | Tensor, B: int, vocab: int) -> Int[Tensor, "B n"]:
    """`logit_lens(tokens=...)` as [B, n] ids, checked."""
    ids = torch.as_tensor(tokens)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.ndim not in (1, 2) or not ids.numel() or (
            ids.ndim == 2 and ids.shape[0] != B):
        raise ValueError(f"tokens: pass a list of token ids or a [batch={B}, n] tensor of them, got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"tokens: ids must lie in range({vocab}), got {ids.min()}..{ids.max()}")
    return ids.long().expand(B, -1) if ids.ndim == 1 else ids.long()


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
    correct: Tensor  # [N] bool, over all examples in order: the unablated top token is one of the answer's tokens

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
def head_scores(model: HookedVLM, inputs: Mapping[str, Any] | Iterable[Batch],
                answer: metrics.AnswerIds | None = None, *, tower: str = "lm", attention: str = "attn",
                position: metrics.Position | str = -1, policy: str = "first", batch_size: int = 64,
                progress: bool = True, cache_device: torch.device | str | None = None) -> HeadScores:
    """Score every head by replacing its values with the mean of the other heads of its layer, at every position
    (V-SEAM's head contributions, `Attention_Head_Analysis.py`): the drop P_base - P_ablated of the answer at
    `position`, split by whether the unablated model answers correctly.

    `inputs`, `answer`: one batch and its answers, or an iterable of `(inputs, answers)` batches streamed over a
    data set (answer=None); the means are over all examples, each batch weighted by its number of correct and
    incorrect examples, so the scores equal one batch holding them all. Answers: one token id per example, or one
    list of sub-token ids per example (`metrics.answer_tokens`); an example is correct when the top token at
    `position` is any of its answer's sub-tokens, and P follows `policy` (`metrics.answer_prob`; V-SEAM: "first").
    `position`: an int, one per example, or "last" (each example's last real token; for right-padded batches).
    `batch_size` and `cache_device` bound the memory of each batch's ablation sweep (`patching.ablation_sweep`);
    a batch of more than `batch_size` examples is run in chunks of that many (the sums are the same).
    Fit on one split and evaluate the resulting interventions (`rescaling_hooks`) on another.
    """
    if policy not in metrics.ANSWER_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(metrics.ANSWER_POLICIES)}, got {policy!r}")
    patching.head_leaf(model, tower, attention, "z")  # the tower and attention exist: checked before any forward
    positive = negative = delta = None
    n_correct = n_wrong = n = 0
    correct: list[Tensor] = []
    # the unablated forward bounded as the sweep is: a batch of more than batch_size examples is scored in chunks
    for run in unablated_runs(model, inputs, answer, position, policy, "head_scores", batch_size):
        ok = run.correct
        ablated = patching.ablation_sweep(model, run.inputs, run.metric, tower=tower, attention=attention,
                                          mode="mean_of_others", batch_size=batch_size, progress=progress,
                                          cache_device=cache_device)  # [L, H, B]
        drop = run.prob - ablated.double()
        sums = (drop.clamp(min=0)[..., ok].sum(-1), (-drop).clamp(min=0)[..., ~ok].sum(-1), drop.sum(-1))
        positive, negative, delta = sums if positive is None else (positive + sums[0], negative + sums[1],
                                                                   delta + sums[2])
        n_correct, n_wrong, n = n_correct + int(ok.sum()), n_wrong + int((~ok).sum()), n + ok.numel()
        correct.append(ok)
    if positive is None:
        raise ValueError("head_scores got no batches: pass a batch and its answers, or a non-empty iterable of "
                         "(inputs, answers) batches (a generator already consumed is empty)")

    def mean(total: Tensor, count: int) -> Tensor:
        return (total / count).float() if count else torch.full(total.shape, float("nan"))

    return HeadScores(positive=mean(positive, n_correct), negative=mean(negative, n_wrong), delta=mean(delta, n),
                      correct=torch.cat(correct))


@strict
def rescaling_hooks(model: HookedVLM, scores: HeadScores, *, lam: float = 1.0, tower: str = "lm",
                    attention: str = "attn", low: float | None = 0.0, high: float | None = 2.0,
                    epsilon: float = 0.0) -> list:
    """V-SEAM's head rescaling (`Attention_Head_Rescaling.py`) as hooks: each head's values (the `o_proj` input)
    times clip(1 + lam * delta, low, high), where delta is the head's mean signed drop of P(answer) when ablated
    (`HeadScores.delta`, fitted on other questions than those evaluated) and is taken as 0 where |delta| < epsilon
    (the authors' `EPS_FOR_EDIT`, 0 there). low / high None: no clipping on that side (the authors' clip=None)."""
    for name, value in (("lam", lam), ("epsilon", epsilon), ("low", low), ("high", high)):
        if value is not None and (isinstance(value, bool) or not math.isfinite(float(value))):
            raise ValueError(f"{name}={value!r}: pass a finite number")
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r}: pass a threshold >= 0 (heads with |delta| below it are left as they "
                         "are)")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low={low} > high={high}: the clip range is empty")
    delta = torch.nan_to_num(scores.delta.double())
    delta = torch.where(delta.abs() < epsilon, 0.0, delta)
    factors = 1 + lam * delta
    if low is not None or high is not None:
        factors = factors.clamp(low, high)
    return interventions.scale_heads(model, {(layer, head): float(factors[layer, head])
                                             for layer in range(factors.shape[0]) for head in range(factors.shape[1])},
                                     tower=tower, attention=attention)
