"""Activation patching sweeps that reuse work, built on the public hook API.

A sweep runs the clean and the corrupted input once each (caching only the hooks it needs), then, for each layer,
runs the variants of that layer (its positions or heads) stacked along the batch, in chunks of at most `batch_size`
rows, resuming the patched tower at that layer from the cached stream (`HookedVLM.resume`): the towers before it
and its earlier blocks are not re-run. Each cell equals the naive loop's (one full forward per cell with
`run_with_hooks`), which the tests check.

`direction="denoise"` runs the corrupted input with one activation taken from the clean run; `"noise"` the
reverse. With `normalize=True` a cell is `(m - m_corrupt) / (m_clean - m_corrupt)`: 0 is the corrupted run, 1 the
clean one. A sweep over a batch of examples reports the mean over examples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import corruption
from . import distributed as distributed_
from . import metrics as metrics_
from . import names
from .arguments import keyword_names, reject_unknown, strict
from .components.kv_cache import KVCache
from .models.base import HookedVLM

Direction = Literal["denoise", "noise"]
STREAM_HOOKS = ("resid_pre", "resid_mid", "resid_mid_cross", "resid_post", "attn_out", "cross_attn_out", "mlp_out")
HEAD_ACTIVATIONS = ("z", "q", "k", "v", "pattern")


# ---------------------------------------------------------------------------------------------- public sweeps
@strict
def patch_resid(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any], metric: metrics_.Metric, *,
                tower: str, hook: str = "resid_pre", positions: Sequence[int] | Tensor | None = None,
                direction: Direction = "denoise", normalize: bool = False, batch_size: int = 64,
                progress: bool = True) -> Float[Tensor, "n_layers n_positions"]:
    """For each layer of `tower` and each position, the metric with that one activation of hook `hook` (any
    per-block stream or sub-layer output: resid_pre, resid_mid, resid_mid_cross, resid_post, attn_out,
    cross_attn_out, mlp_out) patched from the other run.

    `positions`: None for every position of the tower's sequence, a list shared by all examples, or a [B, P]
    tensor of positions per example (for example from `cache.positions`). Layers where the hook does not exist (a
    cross-attention hook on a layer without cross-attention) are NaN.
    """
    if hook not in STREAM_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(STREAM_HOOKS)}, got {hook!r}")
    leaf = names.leaf(hook)
    _require_leaf(model, tower, leaf)
    run = _Runs.for_direction(model, clean, corrupt, metric, tower, direction, [leaf])
    pos = run.positions(positions, leaf)  # [B, P]
    return run.sweep(lambda layer: [names.block(tower, layer, leaf)], pos.shape[1], _patch_position(pos),
                     normalize, batch_size, progress, cut=int(pos.min()))


@strict
def patch_heads(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any], metric: metrics_.Metric, *,
                tower: str, attention: Literal["attn", "cross_attn"] = "attn",
                activation: Literal["z", "q", "k", "v", "pattern"] = "z",
                positions: Sequence[int] | Tensor | None = None, by_position: bool = False,
                direction: Direction = "denoise", normalize: bool = False, batch_size: int = 64,
                progress: bool = True) -> Float[Tensor, "n_layers n_heads *n_positions"]:
    """For each layer and head of `tower`'s self- (`attention="attn"`) or cross-attention, the metric with that
    head's `activation` patched from the other run: at `positions` (None: all) together, or, with
    `by_position=True`, one position at a time ([n_layers, n_heads, n_positions]).

    Positions index the queries (z, q, pattern) or the keys (k, v). k and v have one head per key/value head.
    Layers without that attention (the Q-Former's layers without cross-attention) are NaN.
    """
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(HEAD_ACTIVATIONS)}, got {activation!r}")
    leaf = head_leaf(model, tower, attention, activation)
    run = _Runs.for_direction(model, clean, corrupt, metric, tower, direction, [leaf])

    def by_head(t: Tensor) -> Tensor:
        """A view [N, positions, heads, ...] of any head activation (the pattern is [N, heads, queries, keys])."""
        return t.transpose(1, 2) if activation == "pattern" else t

    n_heads = by_head(run.source_act(leaf)).shape[2]
    pos = run.positions(positions, leaf, dim=2 if activation == "pattern" else 1)  # [B, P]
    n_pos = pos.shape[1]

    def patch(act: Tensor, source: Tensor, variant: Tensor, example: Tensor, offset: int) -> Tensor:
        act = act.clone()
        view, src = by_head(act), by_head(source)
        rows = torch.arange(act.shape[0], device=act.device)
        if by_position:  # variant = head * n_pos + position index
            head, p = variant // n_pos, pos[example, variant % n_pos]
            view[rows, p - offset, head] = src[example, p, head].to(act.dtype)
        else:  # variant = head, at all the positions at once
            head, p = variant[:, None], pos[example]
            view[rows[:, None], p - offset, head] = src[example[:, None], p, head].to(act.dtype)
        return act

    n_variants = n_heads * n_pos if by_position else n_heads
    out = run.sweep(lambda layer: [names.block(tower, layer, leaf)], n_variants, patch, normalize, batch_size,
                    progress, cut=int(pos.min()))
    return out.view(out.shape[0], n_heads, n_pos) if by_position else out


TRACE_KINDS = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out",
               "cross_attn": "hook_cross_attn_out"}


@strict
def causal_trace(model: HookedVLM, inputs: Mapping[str, Any], target: metrics_.TokenIds | metrics_.Metric, *,
                 tower: str, corrupt: Literal["image"] | Sequence[int] | Tensor = "image", noise: float = 3.0,
                 kind: Literal["resid", "attn", "mlp", "cross_attn"] = "resid", window: int = 1, samples: int = 1,
                 seed: int = 0, position: metrics_.Position = -1, positions: Sequence[int] | Tensor | None = None,
                 normalize: bool = False, batch_size: int = 64, progress: bool = True
                 ) -> Float[Tensor, "n_layers n_positions"]:
    """ROME-style causal tracing adapted to VLMs (Meng et al. 2022; Palit et al. 2023 for BLIP).

    The corrupted run adds Gaussian noise to the image embeddings (`corrupt="image"`: what the text reads of the
    image, `model.image_embeddings_hook`) or to the token embeddings of the given positions of `tower`; its scale is
    `noise` times the empirical standard deviation of the values it corrupts. Each cell restores the clean output of
    `kind` (the block output, or its attention, MLP or cross-attention output) at one position, in a window of
    `window` layers centred on the cell's layer, and reports P(target) (or `target` as a metric) at `position`.

    The noise is drawn once per sample from `seed` (sample s uses seed + s) and shared by every cell; with
    `samples > 1` the cells average over the samples. `normalize=True` reports (p - p_corrupt) / (p_clean -
    p_corrupt). Layers where `kind` does not exist are NaN.
    """
    if kind not in TRACE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TRACE_KINDS)}, got {kind!r}")
    if window < 1 or samples < 1:
        raise ValueError(f"window and samples must be >= 1, got window={window}, samples={samples}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise={noise!r}: pass a positive number of standard deviations (e.g. 3.0)")
    if noise == 0 and normalize:  # the corrupted run is the clean one: every example would divide 0 by 0
        raise ValueError("noise=0 with normalize=True: without noise the corrupted run equals the clean one, so the "
                         "normalised effect is 0/0; pass noise > 0 (e.g. 3.0) or normalize=False")
    _check_inputs(model, inputs, inputs)
    _require_leaf(model, tower, TRACE_KINDS[kind], f"kind={kind!r}")
    metric = target if callable(target) else metrics_.prob(target, position)
    leaf = TRACE_KINDS[kind]
    n_layers = model.tower_info(tower).n_layers
    site = model.image_embeddings_hook if isinstance(corrupt, str) else names.tower_hook(tower, "hook_embed")
    if isinstance(corrupt, str) and corrupt != "image":
        raise ValueError(f"corrupt must be 'image' or positions, got {corrupt!r}")
    if site not in model.hook_dict:
        raise ValueError(f"{site} is not a hook of this model: nothing to add noise to")

    def cell_hooks(layer: int) -> list[str]:
        span = range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))
        return [name for name in (names.block(tower, i, leaf) for i in span) if name in model.hook_dict]

    restored = names.in_blocks(tower, leaf)
    with torch.no_grad():  # the clean run, shared by every sample: the values to restore and to scale the noise by
        clean_run = model.run_with_cache(**inputs, names_filter=lambda n: n == site or restored(n))
    values = clean_run[1][site]
    if isinstance(corrupt, str):
        sites = model.image_embeddings_mask(clean_run[1].positions)
    else:
        pos = example_positions(corrupt, values.shape[0], values.shape[1])
        sites = torch.zeros(values.shape[:2], dtype=torch.bool)
        sites[torch.arange(values.shape[0])[:, None], pos] = True
    results = []
    for sample in range(samples):
        offset = corruption.gaussian_noise(values, noise, sites=sites, seed=seed + sample)
        run = _Runs(model, inputs, clean_run, metric, tower, [leaf], clean_is_source=True,
                    target_hooks=[corruption.add_hook(site, offset)])
        pos = run.positions(positions, leaf)
        results.append(run.sweep(cell_hooks, pos.shape[1], _patch_position(pos), normalize, batch_size, progress,
                                 cut=int(pos.min())))
    return torch.stack(results).mean(0)


@strict
def attribution_patch_resid(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any],
                            metric: metrics_.Metric, *, tower: str, hook: str = "resid_pre",
                            positions: Sequence[int] | Tensor | None = None, direction: Direction = "denoise",
                            normalize: bool = False) -> Float[Tensor, "n_layers n_positions"]:
    """`patch_resid`'s first-order approximation (attribution patching, Nanda 2023): metric(target) +
    (source - target) . d metric / d activation, from one source forward, one target forward and one backward."""
    if hook not in STREAM_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(STREAM_HOOKS)}, got {hook!r}")
    leaf = names.leaf(hook)
    _require_leaf(model, tower, leaf)
    attr, pos = _attribute(model, clean, corrupt, metric, tower, leaf, direction, positions, pos_dim=1)
    # per layer: [B, T, D] -> effect of patching each position alone: [B, P]
    cells = {layer: (d * g).sum(-1).gather(1, pos.to(d.device)) for layer, (d, g) in attr.items()}
    return _finish_attribution(cells, attr.m_target, attr, pos.shape[1], normalize)


@strict
def attribution_patch_heads(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any],
                            metric: metrics_.Metric, *, tower: str, attention: Literal["attn", "cross_attn"] = "attn",
                            activation: Literal["z", "q", "k", "v", "pattern"] = "z",
                            positions: Sequence[int] | Tensor | None = None, by_position: bool = False,
                            direction: Direction = "denoise", normalize: bool = False
                            ) -> Float[Tensor, "n_layers n_heads *n_positions"]:
    """`patch_heads`'s first-order approximation (attribution patching), with the same arguments and result."""
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(HEAD_ACTIVATIONS)}, got {activation!r}")
    leaf = head_leaf(model, tower, attention, activation)
    pattern = activation == "pattern"
    attr, pos = _attribute(model, clean, corrupt, metric, tower, leaf, direction, positions, pos_dim=2 if pattern else 1)
    cells = {}
    for layer, (d, g) in attr.items():
        prod = d * g
        per_pos_head = prod.sum(-1).transpose(1, 2) if pattern else prod.sum(-1)  # [B, T, H]
        picked = per_pos_head.gather(1, pos.to(d.device)[..., None].expand(-1, -1, per_pos_head.shape[2]))
        cells[layer] = picked.transpose(1, 2).flatten(1) if by_position else picked.sum(1)  # [B, H * P] or [B, H]
    n_heads = next(iter(cells.values())).shape[1] // (pos.shape[1] if by_position else 1)
    out = _finish_attribution(cells, attr.m_target, attr, cells[next(iter(cells))].shape[1], normalize)
    return out.view(out.shape[0], n_heads, pos.shape[1]) if by_position else out


class _Attribution(dict):
    """{layer: (source - target activation, gradient of the metric there)} plus the runs' metrics."""

    n_layers: int
    m_target: Tensor
    m_clean: Tensor
    m_corrupt: Tensor


def _attribute(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any], metric: metrics_.Metric,
               tower: str, leaf: str, direction: Direction, positions: Sequence[int] | Tensor | None,
               pos_dim: int) -> tuple[_Attribution, Tensor]:
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    _check_inputs(model, clean, corrupt)
    if not callable(metric):
        raise TypeError(f"metric is a {type(metric).__name__}: pass a function (logits, examples) -> one value per "
                        "row, e.g. metrics.logit_diff(correct_id, wrong_id)")
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    hooked = [n for n in model.hook_dict if names.in_blocks(tower, leaf)(n)]
    if not hooked:
        raise ValueError(f"tower {tower!r} has no hook ending in {leaf!r}")
    with torch.no_grad():
        source_logits, source_cache = model.run_with_cache(**source, names_filter=hooked)
    acts: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: Any) -> Tensor:
        if not t.requires_grad:  # parameters frozen: make the first hooked tensor the leaf of the graph
            t = t.detach().requires_grad_(True)
        acts[hook.name] = t
        return t

    B = _batch_size(target)
    examples = torch.arange(B)
    pos = example_positions(positions, B, source_cache[hooked[0]].shape[pos_dim])  # checked before the costly runs
    m_source = metrics_.evaluate(metric, source_logits, examples.to(source_logits.device), "the source run")
    metrics_.check_finite(m_source, "the source run's examples")
    with torch.enable_grad():
        target_logits = model.run_with_hooks(**target, fwd_hooks=[(n, keep) for n in hooked])
        for name in hooked:  # before the backward pass and before subtracting: a clear error, not a broadcast one
            if source_cache[name].shape != acts[name].shape:
                raise ValueError(f"the clean and corrupted inputs differ in shape at {name} "
                                 f"({tuple(source_cache[name].shape)} vs {tuple(acts[name].shape)}); make their "
                                 "token counts equal")
        m_target = metrics_.evaluate(metric, target_logits, examples.to(target_logits.device), "the target run")
        metrics_.check_finite(m_target.detach(), "the target run's examples")
        grads = torch.autograd.grad(m_target.sum(), [acts[n] for n in hooked], allow_unused=True)
    result = _Attribution()
    for name, grad in zip(hooked, grads):
        diff = source_cache[name] - acts[name].detach()
        result[names.layer_of(name)] = (diff.float(), torch.zeros_like(diff, dtype=torch.float) if grad is None
                                           else grad.float())
    result.n_layers = model.tower_info(tower).n_layers
    result.m_target = m_target.detach().float()
    result.m_clean, result.m_corrupt = ((m_source, result.m_target) if direction == "denoise"
                                        else (result.m_target, m_source))
    return result, pos


def _finish_attribution(cells: dict[int, Tensor], m_target: Tensor, attr: _Attribution, n_cells: int,
                        normalize: bool) -> Tensor:
    if normalize:
        metrics_.check_normalizable(attr.m_clean, attr.m_corrupt)
    out = torch.full((attr.n_layers, n_cells), float("nan"))
    for layer, effect in cells.items():  # effect: [B, n_cells]
        value = m_target[:, None] + effect
        if normalize:
            value = metrics_.normalized(value, attr.m_clean.float()[:, None], attr.m_corrupt.float()[:, None])
        out[layer] = value.mean(0).cpu()
    return out


@strict
def ablation_sweep(model: HookedVLM, inputs: Mapping[str, Any], metric: metrics_.Metric, *, tower: str,
                   attention: Literal["attn", "cross_attn"] = "attn",
                   mode: Literal["zero", "mean_of_others"] = "mean_of_others", batch_size: int = 64,
                   progress: bool = True) -> Float[Tensor, "n_layers n_heads B"]:
    """For each head of `tower`'s self- or cross-attention, the metric of each example with that head's values
    (`hook_z`, every position) replaced by zero or by the mean of the other heads of its layer (V-SEAM's "mean").
    Per example, so callers can split examples (as `analysis.head_scores` does). The heads of a layer run stacked
    along the batch, resumed at that layer, as in the patching sweeps."""
    if mode not in ("zero", "mean_of_others"):
        raise ValueError(f"mode must be 'zero' or 'mean_of_others', got {mode!r}")
    _check_inputs(model, inputs, inputs)
    leaf = head_leaf(model, tower, attention, "z")
    if mode == "mean_of_others" and model.tower_info(tower).n_heads < 2:
        raise ValueError(f"mode='mean_of_others' needs at least two heads per layer; tower {tower!r} has one: use "
                         "mode='zero'")
    run = _Runs(model, inputs, None, metric, tower, [leaf], clean_is_source=True)
    n_heads = run.source_act(leaf).shape[2]

    def ablate(act: Tensor, source: Tensor, variant: Tensor, example: Tensor, offset: int) -> Tensor:
        rows = torch.arange(act.shape[0], device=act.device)
        act = act.clone()
        if mode == "zero":
            act[rows, :, variant] = 0
        else:
            others = (act.sum(dim=2) - act[rows, :, variant]) / (n_heads - 1)  # [N, T, d]
            act[rows, :, variant] = others
        return act

    return run.sweep(lambda layer: [names.block(tower, layer, leaf)], n_heads, ablate, False, batch_size, progress,
                     per_example=True)


def sweep_dataset(sweep: Callable[..., Tensor], model: HookedVLM, examples: Sequence[Sequence[Any]], *,
                  distributed: bool = False, progress: bool = True, **kwargs: Any) -> Tensor | None:
    """`sweep(model, *example, **kwargs)` for each example of a data set, stacked: [n_examples, ...]. Any sweep
    here that returns a tensor works: `examples` holds its positional arguments after the model, e.g. (clean, corrupt, metric) for
    `patch_heads` and `patch_resid`, (inputs, target) for `causal_trace`, (inputs, metric) for `ablation_sweep`.

    `distributed=True` shards the examples across the processes of the torch.distributed group (torchrun; see
    `hooked_vlm.distributed`) and gathers the results on rank 0, which returns them (the other ranks return None).
    Each example is swept alone, so the results equal a single process's. Results of different shapes (sweeps
    over every position of prompts of different lengths) are padded with NaN at the end of each dimension.
    """
    accepted = set(keyword_names(sweep)) - {"model", "progress"}
    reject_unknown(kwargs, accepted, f"sweep_dataset({getattr(sweep, '__name__', 'sweep')})")
    if not len(examples):
        raise ValueError("sweep_dataset got no examples: pass a non-empty sequence of argument tuples, e.g. "
                         "[(clean, corrupt, metric), ...]")
    for i, example in enumerate(examples):
        if not isinstance(example, (tuple, list)):
            raise TypeError(f"example {i} is a {type(example).__name__}: each example must be a tuple of the sweep's "
                            "positional arguments after the model, e.g. (clean, corrupt, metric)")
    bar = _progress(len(distributed_.shard(len(examples))) if distributed else len(examples), progress,
                    f"{getattr(sweep, '__name__', 'sweep')} over {len(examples)} examples")

    def one(example: Sequence[Any]) -> Tensor:
        out = sweep(model, *example, progress=False, **kwargs)
        bar.update(1)
        return out

    try:
        results = distributed_.map_dataset(one, examples, distributed=distributed)
    finally:
        bar.close()
    return None if results is None else _stack_padded(results)


def _stack_padded(results: list[Tensor]) -> Tensor:
    shape = [max(sizes) for sizes in zip(*(r.shape for r in results))]
    out = torch.full((len(results), *shape), float("nan"), dtype=results[0].dtype)
    for row, r in zip(out, results):
        row[tuple(slice(0, n) for n in r.shape)] = r
    return out


# ---------------------------------------------------------------------------------------------- engine
# (activation, source activation, variant, example, offset): the activation may cover only the positions from
# `offset` on (a run resumed on a suffix); the source always covers the whole sequence
Patch = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


class _Runs:
    """One sweep: the source run (values to patch in; given as inputs, as a finished `(logits, cache)` run, or
    None for an ablation sweep) and the target run (the one patched), done once each, and the resumed runs of its
    cells.

    `target_hooks` corrupt the target run (causal tracing's noise); they also run in the resumed runs, where they
    must accept a batch holding several copies of the target batch.
    """

    def __init__(self, model: HookedVLM, target: Mapping[str, Any],
                 source: Mapping[str, Any] | tuple[Tensor, Any] | None,
                 metric: metrics_.Metric, tower: str, leaves: list[str], *, clean_is_source: bool,
                 target_hooks: Sequence[tuple[str, Callable]] = ()):
        if not callable(metric):
            raise TypeError(f"metric is a {type(metric).__name__}: pass a function (logits, examples) -> one value per "
                            "row, e.g. metrics.logit_diff(correct_id, wrong_id)")
        self.model, self.metric, self.tower = model, metric, tower
        self.n_layers = model.tower_info(tower).n_layers
        self.target, self.target_hooks = dict(target), list(target_hooks)
        self.B = _batch_size(self.target)

        wanted = names.in_blocks(tower, *leaves)
        stream = names.in_blocks(tower, "hook_resid_pre")

        # a causal tower with a KV cache resumes on the positions after the first patched one: the target run's
        # keys and values stand for the unchanged prefix (`model.prefix_cache`)
        self.prefix_resumable = model.towers()[tower].prefix_resumable
        kv_names = set(model.prefix_hook_names(tower)) if self.prefix_resumable else set()

        def target_wanted(name: str) -> bool:
            return wanted(name) or name in kv_names or stream(name)

        with torch.no_grad():
            if isinstance(source, tuple):  # a run the caller already made (its cache must hold the leaves)
                source_logits, self.source = source
            elif source is not None:
                source_logits, self.source = model.run_with_cache(**source, names_filter=wanted)
            # the target run keeps what the resumed runs start from: the stream entering each block, the outputs
            # of the towers before this one, and the patched hooks (to check that lengths agree)
            with model.hooks(self.target_hooks):
                target_logits, self.target_cache = model.run_with_cache(
                    **self.target, tower_outputs=True, names_filter=target_wanted)
        self.target_logits = target_logits
        if source is None:  # an ablation sweep: no values to patch in; the target's own serve as "source"
            source_logits, self.source = target_logits, self.target_cache
        examples = torch.arange(self.B, device=target_logits.device)
        m_source = metrics_.evaluate(metric, source_logits, examples, "the unpatched run")
        m_target = metrics_.evaluate(metric, target_logits, examples, "the unpatched run")
        metrics_.check_finite(m_source, "the unpatched source run's examples")
        metrics_.check_finite(m_target, "the unpatched target run's examples")
        self.m_clean, self.m_corrupt = (m_source, m_target) if clean_is_source else (m_target, m_source)
        order = list(model.tower_names)
        self.given = {t: out for t, out in self.target_cache.tower_outputs.items()
                      if order.index(t) < order.index(tower)}

    @classmethod
    def for_direction(cls, model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any],
                      metric: metrics_.Metric, tower: str, direction: Direction, leaves: list[str]) -> "_Runs":
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        _check_inputs(model, clean, corrupt)
        target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
        return cls(model, target, source, metric, tower, leaves, clean_is_source=direction == "denoise")

    def source_act(self, leaf: str) -> Tensor:
        name = next(filter(names.in_blocks(self.tower, leaf), self.source.keys()), None)
        if name is None:
            raise ValueError(f"tower {self.tower!r} has no hook ending in {leaf!r} in any layer")
        return self.source[name]

    def positions(self, positions: Sequence[int] | Tensor | None, leaf: str, dim: int = 1) -> Tensor:
        """Positions per example [B, P]; checks that source and target agree in length where positions align."""
        name = next(filter(names.in_blocks(self.tower, leaf), self.source.keys()), None)
        if name is None:
            raise ValueError(f"tower {self.tower!r} has no hook ending in {leaf!r} in any layer")
        source_len, target_len = self.source[name].shape[dim], self.target_cache[name].shape[dim]
        if source_len != target_len:
            raise ValueError(
                f"the clean and corrupted inputs differ in length at {name} ({source_len} vs {target_len} "
                f"positions), so position-wise patching would pair unrelated tokens; make their token counts "
                "equal or patch named spans")
        return example_positions(positions, self.B, source_len)

    def _prefix(self, first: int, cut: int, n: int) -> KVCache | None:
        """The target run's keys and values of the first `cut` positions, for n stacked copies of the batch."""
        if not cut:
            return None
        prefix = self.model.prefix_cache(self.tower, self.target_cache, cut, start_layer=first)
        return prefix if n == 1 else prefix.select(torch.arange(self.B).repeat(n))

    def sweep(self, cell_hooks: Callable[[int], list[str]], n_variants: int, patch: Patch, normalize: bool,
              batch_size: int, progress: bool, per_example: bool = False, cut: int = 0
              ) -> Float[Tensor, "n_layers n_variants *B"]:
        """For each layer, the metric of each variant (mean over examples, or per example), patched at the hooks
        `cell_hooks(layer)` (all in this tower; the run resumes at the first of their blocks).

        `cut`: no patch touches a position before it. In a causal tower with a KV cache those positions are then
        the target run's at every layer, so the resumed runs compute only the positions from `cut` on, with the
        target's keys and values for the rest, and take the target's logits there."""
        B = self.B
        if normalize:  # before any cell runs: an example whose clean and corrupted metrics are equal has no scale
            metrics_.check_normalizable(self.m_clean, self.m_corrupt)
        cut = cut if self.prefix_resumable else 0
        per_chunk = max(1, batch_size // B)  # variants per forward
        out = torch.full((self.n_layers, n_variants, B), float("nan"))
        layers = [layer for layer in range(self.n_layers)
                  if cell_hooks(layer) and all(name in self.source.keys() for name in cell_hooks(layer))]
        chunks = [(layer, start) for layer in layers for start in range(0, n_variants, per_chunk)]
        bar = _progress(len(chunks), progress and len(chunks) > 8, f"patching {self.tower}")
        for layer, start in chunks:
            n = min(per_chunk, n_variants - start)
            variant = torch.arange(start, start + n).repeat_interleave(B)  # rows are variant-major
            example = torch.arange(B).repeat(n)
            hooked = cell_hooks(layer)
            first = min(names.layer_of(name) for name in hooked)

            def hook(act: Tensor, hook: Any) -> Tensor:
                return patch(act, self.source[hook.name], variant, example, cut)

            inputs = {k: _repeat(v, n) for k, v in self.target.items()}
            given = {k: _repeat(v, n) for k, v in self.given.items()}
            resid = _repeat(self.target_cache[names.resid(self.tower, first, "pre")][:, cut:], n)
            with torch.no_grad(), self.model.resume(self.tower, first, resid, given, self._prefix(first, cut, n)):
                logits = self.model.run_with_hooks(**inputs, fwd_hooks=[*self.target_hooks,
                                                                        *((name, hook) for name in hooked)])
            if cut:  # the prefix's logits are the target run's
                logits = torch.cat([_repeat(self.target_logits[:, :cut], n), logits], dim=1)
            values = metrics_.evaluate(self.metric, logits, example.to(logits.device), "a patched run").float()
            values = values.view(n, B)
            if not torch.isfinite(values).all():  # reported, not averaged into a NaN with no word
                warnings.warn(f"the metric is non-finite in {int((~torch.isfinite(values)).sum())} patched runs at "
                              f"layer {layer} of {self.tower!r} (variants {start}..{start + n - 1}); those cells "
                              "hold it: check the model's dtype (float16 overflows; try float32)", RuntimeWarning,
                              stacklevel=4)
            if normalize:
                values = metrics_.normalized(values, self.m_clean.float(), self.m_corrupt.float())
            out[layer, start:start + n] = values.cpu()
            bar.update(1)
        bar.close()
        return out if per_example else out.mean(dim=2)


def _patch_position(pos: Tensor) -> Patch:
    """Variant v of example b takes the source's activation at position pos[b, v]."""

    def patch(act: Tensor, source: Tensor, variant: Tensor, example: Tensor, offset: int) -> Tensor:
        rows, p = torch.arange(act.shape[0], device=act.device), pos[example, variant].to(act.device)
        act = act.clone()
        act[rows, p - offset] = source[example, p].to(act.dtype)
        return act

    return patch


def example_positions(positions: Sequence[int] | Tensor | None, B: int, length: int) -> Int[Tensor, "B P"]:
    """The `positions` argument of the sweeps as positions per example [B, P] in 0..length-1: None (every
    position), a list shared by the B examples, or a [B, P] tensor; negative positions count from the end. Raises a
    one-line error for an empty, non-integer, misshapen or out-of-range argument."""
    if positions is None:
        return torch.arange(length).expand(B, length)
    try:
        pos = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        pos = None
    if pos is not None and not pos.numel():
        raise ValueError("positions is empty: pass at least one position (or None for every position)")
    if pos is None or pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"positions={positions!r:.80} are not integer positions: pass a list of ints or a [B, P] "
                        "integer tensor")
    pos = pos.long()
    pos = pos.expand(B, -1) if pos.ndim == 1 else pos
    if pos.ndim != 2 or pos.shape[0] != B:
        raise ValueError(f"positions must be a list or a [batch={B}, P] tensor, got shape {tuple(pos.shape)}")
    if pos.min() < -length or pos.max() >= length:
        bad = pos[(pos < -length) | (pos >= length)][0]
        raise ValueError(f"position {int(bad)} is out of range for {length} positions (valid: {-length}..{length - 1})")
    return pos % length


def _require_leaf(model: HookedVLM, tower: str, leaf: str, what: str | None = None) -> None:
    """Raise before any forward if no block of `tower` has the hook `leaf` (a cross-attention where there is none)."""
    n_layers = model.tower_info(tower).n_layers  # raises for an unknown tower, naming the towers
    if not any(names.block(tower, i, leaf) in model.hook_dict for i in range(n_layers)):
        hint = (f"tower {tower!r} has no cross-attention" if "cross_attn" in leaf
                else f"no layer of tower {tower!r} has a hook {leaf!r}")
        raise ValueError(f"{what or leaf}: {hint}; choose a tower and hook it has (model.hook_names() lists them)")


def head_leaf(model: HookedVLM, tower: str, attention: str, activation: str) -> str:
    """The block-relative hook name of a head activation (`"cross_attn.hook_z"`), checked, before any forward, to
    exist in some block of `tower`."""
    if attention not in ("attn", "cross_attn"):
        raise ValueError(f"attention must be 'attn' or 'cross_attn', got {attention!r}")
    leaf = names.leaf(attention, activation)
    _require_leaf(model, tower, leaf, f"attention={attention!r}")
    return leaf


def _check_inputs(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any]) -> None:
    for label, inputs in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(inputs, Mapping):
            raise TypeError(f"the {label} inputs are a {type(inputs).__name__}: pass the processor's output (a dict "
                            "of tensors such as input_ids and pixel_values)")
        if "vision" in model.tower_names and inputs.get("pixel_values") is None:
            raise ValueError(f"the {label} inputs have no pixel_values, but this model needs an image: a sweep without "
                             "it would silently measure an image-blind model; pass the processor's full output")
    if _batch_size(clean) != _batch_size(corrupt):
        raise ValueError(f"clean has {_batch_size(clean)} examples and corrupt {_batch_size(corrupt)}; pair them one "
                         "to one")


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, Tensor):
            return value.shape[0]
    raise ValueError("the inputs hold no tensors; pass the processor's output")


def _repeat(value: Any, n: int) -> Any:
    """n copies of a batch, variant-major ([x_0..x_B-1, x_0..x_B-1, ...])."""
    if not isinstance(value, Tensor) or n == 1:
        return value
    return value.repeat(n, *([1] * (value.ndim - 1)))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
