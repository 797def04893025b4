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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from . import metrics as metrics_
from .models.base import HookedVLM

Direction = Literal["denoise", "noise"]
STREAM_HOOKS = ("resid_pre", "resid_mid", "resid_mid_cross", "resid_post", "attn_out", "cross_attn_out", "mlp_out")
HEAD_ACTIVATIONS = ("z", "q", "k", "v", "pattern")


# ---------------------------------------------------------------------------------------------- public sweeps
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
    run = _Runs(model, clean, corrupt, metric, tower, direction, [f"hook_{hook}"])
    pos = run.positions(positions, f"hook_{hook}")  # [B, P]
    n_pos = pos.shape[1]

    def patch(act: Tensor, source: Tensor, variant: Tensor, example: Tensor) -> Tensor:
        rows = torch.arange(act.shape[0], device=act.device)
        p = pos[example, variant].to(act.device)
        act = act.clone()
        act[rows, p] = source[example, p].to(act.dtype)
        return act

    return run.sweep(lambda layer: f"{tower}.blocks.{layer}.hook_{hook}", n_pos, patch, normalize, batch_size,
                     progress)


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
    if attention not in ("attn", "cross_attn"):
        raise ValueError(f"attention must be 'attn' or 'cross_attn', got {attention!r}")
    leaf = f"{attention}.hook_{activation}"
    run = _Runs(model, clean, corrupt, metric, tower, direction, [leaf])

    def by_head(t: Tensor) -> Tensor:
        """A view [N, positions, heads, ...] of any head activation (the pattern is [N, heads, queries, keys])."""
        return t.transpose(1, 2) if activation == "pattern" else t

    n_heads = by_head(run.source_act(leaf)).shape[2]
    pos = run.positions(positions, leaf, dim=2 if activation == "pattern" else 1)  # [B, P]
    n_pos = pos.shape[1]

    def patch(act: Tensor, source: Tensor, variant: Tensor, example: Tensor) -> Tensor:
        act = act.clone()
        view, src = by_head(act), by_head(source)
        rows = torch.arange(act.shape[0], device=act.device)
        if by_position:  # variant = head * n_pos + position index
            head, p = variant // n_pos, pos[example, variant % n_pos]
            view[rows, p, head] = src[example, p, head].to(act.dtype)
        else:  # variant = head, at all the positions at once
            head, p = variant[:, None], pos[example]
            view[rows[:, None], p, head] = src[example[:, None], p, head].to(act.dtype)
        return act

    n_variants = n_heads * n_pos if by_position else n_heads
    out = run.sweep(lambda layer: f"{tower}.blocks.{layer}.{leaf}", n_variants, patch, normalize, batch_size,
                    progress)
    return out.view(out.shape[0], n_heads, n_pos) if by_position else out


# ---------------------------------------------------------------------------------------------- engine
class _Runs:
    """The clean and corrupted runs of one sweep, done once, and the resumed runs of its cells."""

    def __init__(self, model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any],
                 metric: metrics_.Metric, tower: str, direction: Direction, leaves: list[str]):
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        self.model, self.metric, self.tower = model, metric, tower
        info = model.tower_info(tower)
        self.n_layers = info.n_layers
        _check_inputs(model, clean, corrupt)
        self.target, source = (dict(corrupt), dict(clean)) if direction == "denoise" else (dict(clean), dict(corrupt))
        self.B = _batch_size(self.target)

        def wanted(name: str) -> bool:
            return name.startswith(f"{tower}.blocks.") and name.endswith(tuple("." + leaf for leaf in leaves))

        with torch.no_grad():
            source_logits, self.source = model.run_with_cache(**source, names_filter=wanted)
            # the target run keeps what the resumed runs start from: the stream entering each block, the outputs
            # of the towers before this one, and the patched hooks (to check that lengths agree)
            target_logits, self.target_cache = model.run_with_cache(
                **self.target, tower_outputs=True,
                names_filter=lambda n: wanted(n) or (n.startswith(f"{tower}.blocks.") and n.endswith(".hook_resid_pre")))
        self.examples = torch.arange(self.B, device=target_logits.device)
        m_source, m_target = metric(source_logits, self.examples), metric(target_logits, self.examples)
        self.m_clean, self.m_corrupt = (m_source, m_target) if direction == "denoise" else (m_target, m_source)
        order = list(model.tower_names)
        self.given = {t: out for t, out in self.target_cache.tower_outputs.items()
                      if order.index(t) < order.index(tower)}

    def source_act(self, leaf: str) -> Tensor:
        names = [n for n in self.source.keys() if n.endswith("." + leaf)]
        if not names:
            raise ValueError(f"tower {self.tower!r} has no hook ending in {leaf!r} in any layer")
        return self.source[names[0]]

    def positions(self, positions: Sequence[int] | Tensor | None, leaf: str, dim: int = 1) -> Tensor:
        """Positions per example [B, P]; checks that source and target agree in length where positions align."""
        name = next(n for n in self.source.keys() if n.endswith("." + leaf))
        source_len, target_len = self.source[name].shape[dim], self.target_cache[name].shape[dim]
        if source_len != target_len:
            raise ValueError(
                f"the clean and corrupted inputs differ in length at {name} ({source_len} vs {target_len} "
                f"positions), so position-wise patching would pair unrelated tokens; make their token counts "
                "equal or patch named spans")
        if positions is None:
            return torch.arange(source_len).expand(self.B, source_len)
        pos = torch.as_tensor(positions, dtype=torch.long)
        pos = pos.expand(self.B, -1) if pos.ndim == 1 else pos
        if pos.ndim != 2 or pos.shape[0] != self.B:
            raise ValueError(f"positions must be a list or a [batch={self.B}, P] tensor, got shape {tuple(pos.shape)}")
        if pos.numel() and (pos.min() < -source_len or pos.max() >= source_len):
            raise ValueError(f"positions {pos.tolist()} are out of range for {source_len} positions")
        return pos % source_len

    def sweep(self, hook_name: Callable[[int], str], n_variants: int,
              patch: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], normalize: bool, batch_size: int,
              progress: bool) -> Tensor:
        B = self.B
        per_chunk = max(1, batch_size // B)  # variants per forward
        out = torch.full((self.n_layers, n_variants), float("nan"))
        layers = [layer for layer in range(self.n_layers) if hook_name(layer) in self.source.keys()]
        chunks = [(layer, start) for layer in layers for start in range(0, n_variants, per_chunk)]
        bar = _progress(len(chunks), progress and len(chunks) > 8, f"patching {self.tower}")
        for layer, start in chunks:
            n = min(per_chunk, n_variants - start)
            variant = torch.arange(start, start + n).repeat_interleave(B)  # rows are variant-major
            example = torch.arange(B).repeat(n)
            source = self.source[hook_name(layer)]

            def hook(act: Tensor, hook: Any) -> Tensor:
                return patch(act, source, variant, example)

            inputs = {k: _repeat(v, n) for k, v in self.target.items()}
            given = {k: _repeat(v, n) for k, v in self.given.items()}
            resid = _repeat(self.target_cache[f"{self.tower}.blocks.{layer}.hook_resid_pre"], n)
            with torch.no_grad(), self.model.resume(self.tower, layer, resid, given):
                logits = self.model.run_with_hooks(**inputs, fwd_hooks=[(hook_name(layer), hook)])
            values = self.metric(logits, example.to(logits.device)).float().view(n, B)
            if normalize:
                values = metrics_.normalized(values, self.m_clean.float(), self.m_corrupt.float())
            out[layer, start:start + n] = values.mean(dim=1).cpu()
            bar.update(1)
        bar.close()
        return out


def _check_inputs(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any]) -> None:
    for label, inputs in (("clean", clean), ("corrupt", corrupt)):
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
