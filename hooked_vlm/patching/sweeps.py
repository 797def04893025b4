"""The public sweeps (activation, head and attribution patching, causal tracing, head ablation) and their argument
checks; the runs themselves are `engine`'s."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .. import corruption
from .. import metrics as metrics_
from .. import names
from ..arguments import strict
from ..corruption.noise import Corruption
from ..hooks import HookSpec
from ..models.base import HookedVLM
from .engine import (HEAD_ACTIVATIONS, STREAM_HOOKS, TRACE_KINDS, Corrupt, Direction, _batch_size, _Bound,
                     _check_batch_size, _check_cache_device, _check_corrupt, _check_inputs, _require_leaf,
                     _row_examples, _Runs, _select, _Setup, _site_hook, head_leaf)
from .groups import _by_head, _Cells, _make_cells, _tower_positions
from .memory import choose_batch_size

BatchSize = int | Literal["auto"]

def _public(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Name a sweep after the module users call it from: `strict`'s errors say `patching.patch_resid()`, not
    `sweeps.patch_resid()`."""
    fn.__module__ = __package__
    return fn


@strict
@_public
def patch_resid(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt, metric: metrics_.Metric, *,
                tower: str, hook: str = "resid_pre", positions: Sequence[int] | Tensor | None = None,
                groups: Any = None, direction: Direction = "denoise", normalize: bool = False, samples: int = 1,
                batch_size: BatchSize = 64, progress: bool = True, cache_device: torch.device | str | None = None,
                memory_budget: int | None = None) -> Float[Tensor, "n_layers n_cells"]:
    """For each layer of `tower` and each position (or group of positions), the metric with that activation of
    hook `hook` (any per-block stream or sub-layer output: resid_pre, resid_mid, resid_mid_cross, resid_post,
    attn_out, cross_attn_out, mlp_out) patched from the other run.

    `corrupt`: the corrupted inputs (same token count where positions align) or a `Corruption` of the clean inputs.
    `positions`: None for every position of the tower's sequence, a list shared by all examples, or a [B, P]
    tensor of positions per example (for example from `cache.positions`). `groups` instead: groups of positions
    patched together, one cell each (see `resolve_groups`: "image", "text", "last", "all", `ImagePatches(rows,
    cols)`, a list of positions, one list per example, ...); a Mapping names them. `samples`: draws of a random
    corruption, averaged. Layers where the hook does not exist (a cross-attention hook on a layer without
    cross-attention) are NaN.

    `batch_size`: the most rows per forward, the cached runs' included (cells x examples). Below the number of
    examples, the examples are split into chunks of `batch_size`, each cached and swept in turn (the metric still
    sees each example's index in the whole batch); the results are the unsplit run's. `"auto"`: the largest that
    fits `memory_budget` bytes (None: the free memory of the model's device, see `memory.default_budget`) by
    `memory_estimate`. `cache_device`: where the clean and corrupted runs' cached activations stay (None: where the
    model runs; "cpu": off the accelerator, each layer's brought over while its cells run); the results are the same.
    """
    if hook not in STREAM_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(STREAM_HOOKS)}, got {hook!r}")
    _check_batch_size(batch_size)
    leaf = names.leaf(hook)
    _require_leaf(model, tower, leaf)
    batch_size = _auto(batch_size, memory_budget, model, clean, corrupt, tower, leaf, direction, cache_device)
    setup = _Setup(model, clean, corrupt, metric, tower, [leaf], direction, samples, cache_device, batch_size)

    def one(run: _Runs) -> Tensor:
        cells = run.cells(positions, groups, leaf)
        return run.sweep(lambda layer: [names.block(tower, layer, leaf)], cells.n, cells.patch_stream(), normalize,
                         batch_size, progress, per_example=True, cut=cells.cut)

    return setup.average(one)


@strict
@_public
def patch_heads(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt, metric: metrics_.Metric, *,
                tower: str, attention: Literal["attn", "cross_attn"] = "attn",
                activation: Literal["z", "q", "k", "v", "pattern"] = "z",
                positions: Sequence[int] | Tensor | None = None, groups: Any = None, by_position: bool = False,
                direction: Direction = "denoise", normalize: bool = False, samples: int = 1,
                batch_size: BatchSize = 64, progress: bool = True, cache_device: torch.device | str | None = None,
                memory_budget: int | None = None) -> Float[Tensor, "n_layers n_heads *n_cells"]:
    """For each layer and head of `tower`'s self- (`attention="attn"`) or cross-attention, the metric with that
    head's `activation` patched from the other run: at `positions` (None: all) together ([n_layers, n_heads]); with
    `by_position=True`, one position at a time ([n_layers, n_heads, n_positions]); with `groups`, one group of
    positions at a time ([n_layers, n_heads, n_groups]). `corrupt`, `samples`, `batch_size`, `memory_budget` and
    `cache_device` as in `patch_resid`.

    Positions index the queries (z, q, pattern) or the keys (k, v). k and v have one head per key/value head.
    Layers without that attention (the Q-Former's layers without cross-attention) are NaN.
    """
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(HEAD_ACTIVATIONS)}, got {activation!r}")
    if by_position and groups is not None:
        raise ValueError("pass by_position=True (one position per cell) or groups (one group per cell), not both")
    _check_batch_size(batch_size)
    leaf = head_leaf(model, tower, attention, activation)
    pattern = activation == "pattern"
    batch_size = _auto(batch_size, memory_budget, model, clean, corrupt, tower, leaf, direction, cache_device)
    setup = _Setup(model, clean, corrupt, metric, tower, [leaf], direction, samples, cache_device, batch_size)

    def one(run: _Runs) -> Tensor:
        n_heads = _by_head(run.source_act(leaf), pattern).shape[2]
        cells = run.cells(positions, groups, leaf, dim=2 if pattern else 1)
        if not by_position and groups is None:
            cells = cells.joined()  # every position at once: one cell per head
        out = run.sweep(lambda layer: [names.block(tower, layer, leaf)], n_heads * cells.n,
                        cells.patch_heads(cells.n, pattern), normalize, batch_size, progress, per_example=True,
                        cut=cells.cut)  # [n_layers, n_heads * n_cells, B]
        split = by_position or groups is not None
        return out.view(out.shape[0], n_heads, cells.n, out.shape[-1]) if split else out

    return setup.average(one)


@strict
@_public
def causal_trace(model: HookedVLM, inputs: Mapping[str, Any], target: metrics_.TokenIds | metrics_.Metric, *,
                 tower: str, corrupt: str | Sequence[int] | Tensor | Corrupt = "image", noise: float | None = None,
                 kind: Literal["resid", "resid_mid", "resid_mid_cross", "attn", "mlp", "cross_attn"] = "resid",
                 window: int = 1, samples: int = 1, seed: int | None = None, position: metrics_.Position = -1,
                 positions: Sequence[int] | Tensor | None = None, groups: Any = None, normalize: bool = False,
                 batch_size: BatchSize = 64, progress: bool = True, cache_device: torch.device | str | None = None,
                 memory_budget: int | None = None) -> Float[Tensor, "n_layers n_cells"]:
    """ROME-style causal tracing adapted to VLMs (Meng et al. 2022; Palit et al. 2023 for BLIP).

    The corrupted run is `inputs` corrupted by `corrupt`: a `Corruption` (`corruption.gaussian(3.0)`,
    `corruption.multiplicative(1, 5, redraw="forward")`, `corruption.scale(0.7691)`, ...), other inputs, or, as
    before, "image" / token positions of `tower` with Gaussian noise of `noise` (default 3.0) times the empirical
    std of what it corrupts, seeded by `seed` (default 0). Each cell restores the clean state of `kind` at one
    position (or one group of `groups`), in a window of `window` layers centred on the cell's layer (clipped at
    the ends), and reports P(target) (or `target` as a metric) at `position`.

    `kind`: the block output ("resid", resid_post), the stream after the attention ("resid_mid") or after the
    cross-attention ("resid_mid_cross") - on the post-LN BERT towers of BLIP these are LayerNorm(x + attn), what HF's
    `.attention` / `.crossattention` modules return - or the attention, MLP or cross-attention output. `samples`
    draws of a random corruption are averaged (sample s seeds as `Corruption.seed_of` says). `normalize=True`
    reports (p - p_corrupt) / (p_clean - p_corrupt), per sample. Layers where `kind` does not exist are NaN.
    `batch_size`, `memory_budget` and `cache_device` as in `patch_resid`.
    """
    if kind not in TRACE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TRACE_KINDS)}, got {kind!r}")
    if window < 1 or samples < 1:
        raise ValueError(f"window and samples must be >= 1, got window={window}, samples={samples}")
    _check_batch_size(batch_size)
    corrupt = _trace_corruption(corrupt, noise, seed, normalize)
    _check_inputs(model, inputs, inputs)
    leaf = TRACE_KINDS[kind]
    _require_leaf(model, tower, leaf, f"kind={kind!r}")
    metric = target if callable(target) else metrics_.prob(target, position)
    n_layers = model.tower_info(tower).n_layers

    def cell_hooks(layer: int) -> list[str]:
        span = range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))
        return [name for name in (names.block(tower, i, leaf) for i in span) if name in model.hook_dict]

    batch_size = _auto(batch_size, memory_budget, model, inputs, corrupt, tower, leaf, "denoise", cache_device)
    setup = _Setup(model, inputs, corrupt, metric, tower, [leaf], "denoise", samples, cache_device, batch_size)

    def one(run: _Runs) -> Tensor:
        cells = run.cells(positions, groups, leaf)
        return run.sweep(cell_hooks, cells.n, cells.patch_stream(), normalize, batch_size, progress,
                         per_example=True, cut=cells.cut)

    return setup.average(one)


def _trace_corruption(corrupt: Any, noise: float | None, seed: int | None, normalize: bool) -> Corrupt:
    """causal_trace's `corrupt` as a Corruption or inputs; the legacy forms ("image", positions) with `noise` and
    `seed` become `corruption.gaussian(noise, ..., seed=seed)`."""
    if isinstance(corrupt, (Corruption, Mapping)):
        if noise is not None or seed is not None:
            raise ValueError("noise= and seed= go with corrupt='image' or positions; with a Corruption set them on it "
                             "(e.g. corruption.gaussian(3.0, seed=0)), with corrupted inputs there is no noise")
        return corrupt
    if isinstance(corrupt, str) and corrupt != "image":
        raise ValueError(f"corrupt must be 'image', token positions, a Corruption or corrupted inputs, got {corrupt!r}")
    noise = 3.0 if noise is None else noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise={noise!r}: pass a positive number of standard deviations (e.g. 3.0)")
    if noise == 0 and normalize:  # the corrupted run is the clean one: every example would divide 0 by 0
        raise ValueError("noise=0 with normalize=True: without noise the corrupted run equals the clean one, so the "
                         "normalised effect is 0/0; pass noise > 0 (e.g. 3.0) or normalize=False")
    seed = 0 if seed is None else seed
    if isinstance(corrupt, str):
        return corruption.gaussian(noise, site="image", seed=seed)
    return corruption.gaussian(noise, site="tokens", positions=corrupt, seed=seed)


@strict
@_public
def attribution_patch_resid(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt,
                            metric: metrics_.Metric, *, tower: str, hook: str = "resid_pre",
                            positions: Sequence[int] | Tensor | None = None, groups: Any = None,
                            direction: Direction = "denoise", normalize: bool = False,
                            cache_device: torch.device | str | None = None, batch_size: BatchSize | None = None,
                            memory_budget: int | None = None) -> Float[Tensor, "n_layers n_cells"]:
    """`patch_resid`'s first-order approximation (attribution patching, Nanda 2023): metric(target) +
    (source - target) . d metric / d activation, from one source forward, one target forward and one backward. A
    group's effect is the sum of its positions'. A random `Corruption` uses the draw of sample 0, forward 0.
    `cache_device="cpu"` keeps the source run's activations off the accelerator (the target's and their gradients
    stay where the model runs: the backward pass needs them). `batch_size` (None: every example in one pass): the
    most examples per pass (forward and backward), the examples split into chunks below their number; "auto" and
    `memory_budget` as in `patch_resid`."""
    if hook not in STREAM_HOOKS:
        raise ValueError(f"hook must be one of {', '.join(STREAM_HOOKS)}, got {hook!r}")
    leaf = names.leaf(hook)
    _require_leaf(model, tower, leaf)

    def effect(d: Tensor, g: Tensor, cells: _Cells) -> Tensor:  # per layer [B, T, D] -> each cell's effect [B, V]
        return cells.gather_sum((d * g).sum(-1))

    return _attribution(model, clean, corrupt, metric, tower, leaf, direction, positions, groups, 1, cache_device,
                        batch_size, memory_budget, False, effect, normalize)


@strict
@_public
def attribution_patch_heads(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt,
                            metric: metrics_.Metric, *, tower: str, attention: Literal["attn", "cross_attn"] = "attn",
                            activation: Literal["z", "q", "k", "v", "pattern"] = "z",
                            positions: Sequence[int] | Tensor | None = None, groups: Any = None,
                            by_position: bool = False, direction: Direction = "denoise", normalize: bool = False,
                            cache_device: torch.device | str | None = None, batch_size: BatchSize | None = None,
                            memory_budget: int | None = None) -> Float[Tensor, "n_layers n_heads *n_cells"]:
    """`patch_heads`'s first-order approximation (attribution patching), with the same arguments and result;
    `cache_device`, `batch_size` and `memory_budget` as in `attribution_patch_resid`."""
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(HEAD_ACTIVATIONS)}, got {activation!r}")
    if by_position and groups is not None:
        raise ValueError("pass by_position=True (one position per cell) or groups (one group per cell), not both")
    leaf = head_leaf(model, tower, attention, activation)
    pattern = activation == "pattern"
    split = by_position or groups is not None
    n_heads = []

    def effect(d: Tensor, g: Tensor, cells: _Cells) -> Tensor:
        prod = d * g
        per_pos_head = prod.sum(-1).transpose(1, 2) if pattern else prod.sum(-1)  # [B, T, H]
        n_heads[:] = [per_pos_head.shape[2]]
        out = cells.gather_sum(per_pos_head)  # [B, V, H]
        return out.transpose(1, 2).flatten(1) if split else out[:, 0]  # [B, H * V] or [B, H]

    out = _attribution(model, clean, corrupt, metric, tower, leaf, direction, positions, groups,
                       2 if pattern else 1, cache_device, batch_size, memory_budget, not split, effect, normalize)
    return out.view(out.shape[0], n_heads[0], -1) if split else out


class _Attribution(dict):
    """{layer: (source - target activation, gradient of the metric there)} plus the runs' metrics."""

    n_layers: int
    m_target: Tensor
    m_clean: Tensor
    m_corrupt: Tensor


def _attribution(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt, metric: metrics_.Metric,
                 tower: str, leaf: str, direction: Direction, positions: Sequence[int] | Tensor | None, groups: Any,
                 pos_dim: int, cache_device: torch.device | str | None, batch_size: BatchSize | None,
                 memory_budget: int | None, joined: bool, effect: Any, normalize: bool) -> Tensor:
    """An attribution sweep chunk by chunk of its examples: per chunk, the effect of each cell per example
    (`effect(d, g, cells)` -> [B_chunk, n_cells] per layer), normalised per example if asked; the chunks joined
    along the examples, then averaged over them. The cells, the corruption's mask and a Gaussian's std are the
    whole batch's, and the metric sees each row's index in it (as in `_Setup`)."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    _check_corrupt(model, clean, corrupt)
    if not callable(metric):
        raise TypeError(f"metric is a {type(metric).__name__}: pass a function (logits, examples) -> one value per "
                        "row, e.g. metrics.logit_diff(correct_id, wrong_id)")
    cache_device = _check_cache_device(cache_device)
    if batch_size is not None:
        _check_batch_size(batch_size)
        batch_size = choose_batch_size(batch_size, memory_budget, model, clean, corrupt, tower, [leaf], direction,
                                       attribution=True, cache_device=cache_device)
    elif memory_budget is not None:
        raise ValueError(f"memory_budget={memory_budget} goes with batch_size='auto' (which it sizes)")
    setup = _Setup(model, clean, corrupt, metric, tower, [leaf], direction, 1, cache_device, batch_size)
    B, whole = setup.B, len(setup.chunks) == 1
    # (a model with no `positions`, such as a bare HookedRootModule, has no image rows)
    row_examples = _row_examples(model, tower, model.positions(**clean)) if hasattr(model, "positions") else None
    if row_examples is not None and not row_examples.equal(torch.arange(B)):
        raise ValueError(f"tower {tower!r} has one row per image and this batch's images are not one per example "
                         f"(their examples: {row_examples.tolist()}); attribution patching pairs rows with examples, "
                         "so give it one image per example, or use the activation-patching sweeps, which map "
                         "image rows to their examples")
    source = clean if isinstance(corrupt, Corruption) or direction == "denoise" else corrupt
    source_positions = None if whole else model.positions(**source)
    std = setup._global_std()
    per_layer: dict[int, list[Tensor]] = {}
    n_layers, n_cells = model.tower_info(tower).n_layers, 0
    for rows in setup.chunks:
        chunk = {} if whole else {"rows": rows, "n_total": B, "whole_positions": source_positions,
                                  "clean_positions": setup.clean_positions, "std": std}
        attr = _attribute(model, clean if whole else _select(clean, rows),
                          corrupt if whole or not isinstance(corrupt, Mapping) else _select(corrupt, rows), metric,
                          tower, leaf, direction, positions, groups, pos_dim, cache_device, **chunk)
        cells = attr.cells.joined() if joined else attr.cells
        examples = attr.rows
        if normalize:
            metrics_.check_normalizable(attr.m_clean, attr.m_corrupt, examples)
        for layer, (d, g) in attr.items():
            value = attr.m_target[:, None] + effect(d, g, cells)  # [B_chunk, n_cells]
            if normalize:
                value = metrics_.normalized(value, attr.m_clean.float()[:, None], attr.m_corrupt.float()[:, None])
            per_layer.setdefault(layer, []).append(value.cpu())
            n_cells = value.shape[1]
        del attr  # before the next chunk's runs
    out = torch.full((n_layers, n_cells), float("nan"))
    for layer, parts in per_layer.items():
        out[layer] = torch.cat(parts).mean(0)
    return out


def _attribute(model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt, metric: metrics_.Metric,
               tower: str, leaf: str, direction: Direction, positions: Sequence[int] | Tensor | None, groups: Any,
               pos_dim: int, cache_device: torch.device | None = None, *, rows: Tensor | None = None,
               n_total: int | None = None, whole_positions: Any = None, clean_positions: Any = None,
               std: float | None = None) -> _Attribution:
    """One chunk's attribution: `clean`/`corrupt` hold the examples `rows` of a whole batch of `n_total` (None:
    the whole batch), whose `Positions` are `whole_positions` (the source's, for the cells) and `clean_positions` (the
    corruption's mask); `std`: a Gaussian's std measured over the whole batch."""
    hooked = [n for n in model.hook_dict if names.in_blocks(tower, leaf)(n)]
    if not hooked:
        raise ValueError(f"tower {tower!r} has no hook ending in {leaf!r}")
    target_hooks: list[HookSpec] = []
    B = _batch_size(clean)
    rows = torch.arange(B) if rows is None else rows
    n_total = B if n_total is None else n_total
    chunked = {} if n_total == B else {"rows": rows, "total": n_total, "positions": clean_positions, "std": std}
    with torch.no_grad():
        if isinstance(corrupt, Corruption):  # the clean run (and what the corruption reads), then the corrupted one
            site = _site_hook(model, corrupt, tower)
            clean_run = model.run_with_cache(**clean, names_filter=lambda n: n in hooked or n == site,
                                             device=cache_device)
            corrupted = _Bound(model, corrupt, tower, site, clean_run[1], cache_device is not None,
                               **chunked).hooks(0, [0])
            target = clean
            if direction == "denoise":
                source_logits, source_cache = clean_run
                target_hooks = corrupted
            else:
                with model.hooks(corrupted):
                    source_logits, source_cache = model.run_with_cache(**clean, names_filter=hooked,
                                                                       device=cache_device)
        else:
            target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
            source_logits, source_cache = model.run_with_cache(**source, names_filter=hooked, device=cache_device)
    acts: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: Any) -> Tensor:
        if not t.requires_grad:  # parameters frozen: make the first hooked tensor the leaf of the graph
            t = t.detach().requires_grad_(True)
        acts[hook.name] = t
        return t

    # checked before the costly runs; resolved on the whole batch, then this chunk's rows kept
    whole = source_cache.positions if whole_positions is None else whole_positions
    cells = _make_cells(positions, groups, _tower_positions(model, tower, whole), n_total,
                        source_cache[hooked[0]].shape[pos_dim])
    cells = cells if n_total == B else cells.select(rows)
    m_source = metrics_.evaluate(metric, source_logits, rows.to(source_logits.device), "the source run", n_total)
    metrics_.check_finite(m_source, "the source run's examples", rows)
    with torch.enable_grad():
        target_logits = model.run_with_hooks(**target, fwd_hooks=[*target_hooks, *((n, keep) for n in hooked)])
        for name in hooked:  # before the backward pass and before subtracting: a clear error, not a broadcast one
            if source_cache[name].shape != acts[name].shape:
                raise ValueError(f"the clean and corrupted inputs differ in shape at {name} "
                                 f"({tuple(source_cache[name].shape)} vs {tuple(acts[name].shape)}); make their "
                                 "token counts equal")
        m_target = metrics_.evaluate(metric, target_logits, rows.to(target_logits.device), "the target run", n_total)
        metrics_.check_finite(m_target.detach(), "the target run's examples", rows)
        grads = torch.autograd.grad(m_target.sum(), [acts[n] for n in hooked], allow_unused=True)
    result = _Attribution()
    for name, grad in zip(hooked, grads):
        act = acts[name].detach()
        diff = source_cache[name].to(act.device) - act
        result[names.layer_of(name)] = (diff.float(), torch.zeros_like(diff, dtype=torch.float) if grad is None
                                           else grad.float())
    result.m_target = m_target.detach().float()
    result.m_clean, result.m_corrupt = ((m_source, result.m_target) if direction == "denoise"
                                        else (result.m_target, m_source))
    result.cells, result.rows = cells, rows
    return result


def _auto(batch_size: BatchSize, memory_budget: int | None, model: HookedVLM, clean: Mapping[str, Any],
          corrupt: Any, tower: str, leaf: str, direction: Direction, cache_device: Any) -> int:
    """`batch_size`, or for "auto" the largest that fits `memory_budget` (`memory.choose_batch_size`)."""
    if isinstance(corrupt, (str, Sequence, Tensor)) and not isinstance(corrupt, Mapping):
        corrupt = None  # causal_trace's legacy forms were turned into a Corruption before this
    return choose_batch_size(batch_size, memory_budget, model, clean, corrupt, tower, [leaf], direction,
                             cache_device=_check_cache_device(cache_device))

@strict
@_public
def ablation_sweep(model: HookedVLM, inputs: Mapping[str, Any], metric: metrics_.Metric, *, tower: str,
                   attention: Literal["attn", "cross_attn"] = "attn",
                   mode: Literal["zero", "mean_of_others"] = "mean_of_others", batch_size: BatchSize = 64,
                   progress: bool = True, cache_device: torch.device | str | None = None,
                   memory_budget: int | None = None) -> Float[Tensor, "n_layers n_heads B"]:
    """For each head of `tower`'s self- or cross-attention, the metric of each example with that head's values
    (`hook_z`, every position) replaced by zero or by the mean of the other heads of its layer (V-SEAM's "mean").
    Per example, so callers can split examples (as `analysis.head_scores` does). The heads of a layer run stacked
    along the batch, resumed at that layer, as in the patching sweeps; `batch_size` (examples are split into chunks
    below their number), `memory_budget` and `cache_device` as in `patch_resid`."""
    if mode not in ("zero", "mean_of_others"):
        raise ValueError(f"mode must be 'zero' or 'mean_of_others', got {mode!r}")
    _check_batch_size(batch_size)
    _check_inputs(model, inputs, inputs)
    leaf = head_leaf(model, tower, attention, "z")
    if mode == "mean_of_others" and model.tower_info(tower).n_heads < 2:
        raise ValueError(f"mode='mean_of_others' needs at least two heads per layer; tower {tower!r} has one: use "
                         "mode='zero'")
    batch_size = _auto(batch_size, memory_budget, model, inputs, None, tower, leaf, "denoise", cache_device)
    setup = _Setup(model, inputs, None, metric, tower, [leaf], "denoise", 1, cache_device, batch_size)

    def one(run: _Runs) -> Tensor:
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

        return run.sweep(lambda layer: [names.block(tower, layer, leaf)], n_heads, ablate, False, batch_size,
                         progress, per_example=True)

    return setup.average(one, per_example=True)
