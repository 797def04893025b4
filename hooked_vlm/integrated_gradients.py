"""Integrated gradients (Sundararajan et al. 2017) at hook points: how much each position and feature of an
activation contributes to a target logit (or any metric), relative to a baseline activation.

For a hook with activation x and baseline b (equal to x outside the chosen positions), the attribution is

    IG(x) = (x - b) * sum_k w_k * grad f(b + alpha_k (x - b))

with the quadrature `rule` over alpha in [0, 1]. The attributions of a hook add up to f(x) - f(b) up to the
quadrature's error (`Attributions.delta`), which shrinks as `steps` grows; for an f linear in the hook's activation
they are exact. Each hook is attributed on its own path (the other hooks keep their values), as Captum's
`LayerIntegratedGradients` does per layer. The alphas of a hook run as stacked batches of at most `batch_size` rows.

Neo et al. (`get_high_gradient_indices` of clemneo/llava-interp): the LM's input embeddings (`lm.hook_inputs_embeds`)
with the mean visual token as baseline at the image tokens, 50 steps of `torch.linspace(0, 1, 50)` each weighted
1/50 (rule "linspace"), target the last position's logit, tokens ranked by the L1 norm of their attributions
(`Attributions.top`). See docs/neo.md for the target token their code reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from . import metrics as metrics_
from .interventions import Positions as PositionSpec
from .interventions import position_mask
from .models.base import HookedVLM

__all__ = ["Attributions", "integrated_gradients", "alphas_and_weights", "RULES"]

Rule = Literal["linspace", "left", "right", "midpoint", "trapezoid"]
RULES = ("linspace", "left", "right", "midpoint", "trapezoid")


def alphas_and_weights(steps: int, rule: Rule = "linspace") -> tuple[Tensor, Tensor]:
    """The interpolation points alpha_k in [0, 1] and their weights (summing to 1), float64.

    linspace: `torch.linspace(0, 1, steps)`, each weighted 1/steps (Neo et al.'s loop; both ends included);
    left / right / midpoint: k/steps, (k+1)/steps, (k+1/2)/steps for k < steps, each 1/steps (Riemann sums);
    trapezoid: `linspace(0, 1, steps)` with the trapezoid weights (ends halved)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: pass a number of interpolation steps >= 1")
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "linspace":
        return torch.linspace(0, 1, steps, dtype=torch.float64), torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule in ("left", "right", "midpoint"):
        shift = {"left": 0.0, "right": 1.0, "midpoint": 0.5}[rule]
        return (k + shift) / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if rule == "trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs steps >= 2 (both ends)")
        w = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return torch.linspace(0, 1, steps, dtype=torch.float64), w
    raise ValueError(f"rule={rule!r}: pass one of {', '.join(RULES)}")


@dataclass
class Attributions:
    """Integrated gradients per hook.

    values[hook]: [B, T, ...] float32, the attribution of every element of the hook's activation (0 where the
    baseline equals the input: outside `masks[hook]`); masks[hook] [B, T]: the positions given the baseline;
    target [B]: f at the
    input; at_baseline[hook] [B]: f with that hook at its baseline; steps, rule: the quadrature."""

    values: dict[str, Tensor]
    masks: dict[str, Tensor]
    target: Float[Tensor, "B"]
    at_baseline: dict[str, Tensor]
    steps: int
    rule: str

    def __getitem__(self, hook: str) -> Tensor:
        try:
            return self.values[hook]
        except KeyError:
            raise KeyError(f"no attributions for {hook!r}; hooks: {list(self.values)}") from None

    def per_position(self, hook: str, *, absolute: bool = False) -> Float[Tensor, "B T"]:
        """[B, T]: the attributions summed over each position's features (their absolute values with
        `absolute=True`, Neo et al.'s token importance `integrated_grads.abs().sum(-1)`)."""
        v = self[hook]
        v = v.abs() if absolute else v
        return v.flatten(2).sum(-1) if v.ndim > 2 else v

    def delta(self, hook: str) -> Float[Tensor, "B"]:
        """Completeness error: sum of the attributions minus (f(input) - f(baseline)), per example."""
        return self[hook].flatten(1).sum(-1) - (self.target - self.at_baseline[hook])

    def top(self, hook: str, k: int, *, absolute: bool = True) -> list[Tensor]:
        """Per example, the k positions among `masks[hook]` with the highest per-position score (descending; ties
        in position order)."""
        scores = self.per_position(hook, absolute=absolute)
        out = []
        for b in range(scores.shape[0]):
            idx = torch.nonzero(self.masks[hook][b]).flatten()
            order = scores[b, idx].argsort(descending=True, stable=True)
            out.append(idx[order[:k]])
        return out


def _target_fn(model: HookedVLM, target: metrics_.TokenIds | metrics_.Metric, position: Any, last: Tensor | None):
    """f(logits, examples) -> [N]: a metric, or the raw logit of a token at a position (default: the last real
    token of each example)."""
    if callable(target) and not isinstance(target, (int, Tensor)):
        if position is not None:
            raise ValueError("position= applies to a token target; a metric reads its own position")
        return target

    def logit(logits: Tensor, examples: Tensor) -> Tensor:
        where = position
        if where is None:
            where = last if last is not None and logits.ndim == 3 else -1
        at = metrics_.logits_at(logits, where, examples).float()
        ids = metrics_.per_row(target, examples, "target", at.shape[-1])
        return at[torch.arange(at.shape[0], device=at.device), ids.to(at.device)]

    return logit


def _baseline_value(baseline: Any, hook: str, means: Mapping[str, Tensor] | None) -> Tensor | float:
    if isinstance(baseline, str):
        if baseline == "zeros":
            return 0.0
        if baseline == "mean":
            if means is None or hook not in means:
                raise ValueError(f"baseline='mean' needs means[{hook!r}] (e.g. analysis.mean_activation(model, "
                                 f"batches, [{hook!r}], over='tokens')); or pass the mean tensor as baseline=")
            return means[hook]
        raise ValueError(f"baseline={baseline!r}: pass 'zeros', 'mean' (with means=), a tensor, or {{hook: tensor}}")
    if isinstance(baseline, Mapping):
        if hook not in baseline:
            raise ValueError(f"baseline has no entry for {hook!r}; it has {list(baseline)}")
        return baseline[hook]
    if isinstance(baseline, (Tensor, int, float)) and not isinstance(baseline, bool):
        return baseline
    raise TypeError(f"baseline is a {type(baseline).__name__}: pass 'zeros', 'mean', a tensor or {{hook: tensor}}")


def _tile(inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The batch repeated n times along dim 0 (row r*B + b is example b), images included (they fill the image
    placeholders in order)."""
    return {k: torch.cat([v] * n) if isinstance(v, Tensor) and v.ndim else v for k, v in inputs.items()}


def integrated_gradients(model: HookedVLM, inputs: Mapping[str, Any], target: metrics_.TokenIds | metrics_.Metric,
                         hook_names: str | Sequence[str], *, baseline: str | Tensor | float | Mapping[str, Tensor]
                         = "zeros", positions: Literal["all", "image"] | PositionSpec = "all",
                         means: Mapping[str, Tensor] | None = None, steps: int = 50, rule: Rule = "linspace",
                         position: metrics_.Position | None = None, batch_size: int = 32) -> Attributions:
    """Integrated gradients of `target` with respect to each hook's activation ([B, T, ...], dim 1 the positions).

    Args:
        inputs: the processor's output (B examples).
        target: a token id (or one per example): its raw logit at `position` (default: each example's last real
            token); or a metric `f(logits, examples) -> [N]` as in `hooked_vlm.metrics`.
        hook_names: one hook or several, each attributed on its own path.
        baseline: "zeros"; "mean" (`means[hook]`, e.g. from `analysis.mean_activation`); a tensor broadcast over
            the chosen positions (e.g. the mean visual token [D]); or {hook: tensor}.
        positions: where the activation is moved to the baseline (elsewhere it keeps its value, so its
            attribution is 0): "all"; "image" (the image tokens, from `model.positions(**inputs)`; for hooks of the
            prompt tower); or positions shared by all examples / one list per example / [B, P].
        steps, rule: the quadrature over alpha (`alphas_and_weights`); Neo et al.: 50, "linspace".
        batch_size: rows (alphas x examples) per forward and backward pass, bounding memory.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
    if not names:
        raise ValueError("hook_names is empty: pass at least one hook name")
    model.hook_names(names)  # raises for an unknown name, with the closest ones
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: pass a number of rows >= 1")
    alphas, weights = alphas_and_weights(steps, rule)
    # f at alpha = 0 and 1 exactly, for the completeness check: added with weight 0 where the rule lacks them
    for end in (0.0, 1.0):
        if not (alphas == end).any():
            alphas, weights = torch.cat([alphas, torch.tensor([end], dtype=torch.float64)]), torch.cat(
                [weights, torch.zeros(1, dtype=torch.float64)])
    info = model.positions(**inputs)
    B = info.input_ids.shape[0]
    f = _target_fn(model, target, position, info.last if position is None else None)

    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=names)
    values, masks, at_baseline, f_input = {}, {}, {}, None
    for name in names:
        x = cache[name]
        if x.ndim < 2 or x.shape[0] != B:
            raise ValueError(f"{name} has shape {tuple(x.shape)}: integrated gradients needs one row per example "
                             f"([{B}, T, ...])")
        T = x.shape[1]
        if isinstance(positions, str) and positions == "all":
            mask = torch.ones(B, T, dtype=torch.bool)
        elif isinstance(positions, str) and positions == "image":
            if tuple(info.input_ids.shape) != (B, T):
                raise ValueError(f"positions='image' names positions of the prompt's sequence "
                                 f"{tuple(info.input_ids.shape)}, but {name} is {tuple(x.shape[:2])}: pass the "
                                 "positions explicitly")
            mask = model.image_embeddings_mask(info) if info.image else None
            if mask is None or not mask.any():
                raise ValueError("positions='image': this model's prompt sequence holds no image tokens")
        else:
            mask = position_mask(positions, B, T, torch.device("cpu"))
        value = _baseline_value(baseline, name, means)
        m = mask.to(x.device).reshape(B, T, *([1] * (x.ndim - 2)))
        base = torch.where(m, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)
        diff = (x - base).float()
        grads = torch.zeros_like(x, dtype=torch.float64)
        ends = {}
        per_chunk = max(1, batch_size // B)
        for first in range(0, len(alphas), per_chunk):
            a, w = alphas[first:first + per_chunk], weights[first:first + per_chunk]
            n = len(a)
            leaf: list[Tensor] = []

            def interpolate(t: Tensor, hook: Any, a: Tensor = a, n: int = n, leaf: list = leaf) -> Tensor:
                if t.shape != (n * B, *x.shape[1:]):
                    raise RuntimeError(f"{name} has shape {tuple(t.shape)} in the stacked run, expected "
                                       f"{(n * B, *x.shape[1:])}")
                alpha = a.to(t.device, torch.float32).repeat_interleave(B).view(-1, *([1] * (t.ndim - 1)))
                point = base.float().repeat(n, *([1] * (t.ndim - 1))) + alpha * diff.repeat(n, *([1] * (t.ndim - 1)))
                leaf.append(point.to(t.dtype).detach().requires_grad_(True))
                return leaf[-1]

            with torch.enable_grad():
                logits = model.run_with_hooks(**_tile(inputs, n), fwd_hooks=[(name, interpolate)])
                examples = torch.arange(B, device=logits.device).repeat(n)
                out = metrics_.evaluate(f, logits, examples, "integrated_gradients")
                (grad,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
            out = out.detach().double().cpu().view(n, B)
            for i, alpha in enumerate(a.tolist()):
                if alpha in (0.0, 1.0):
                    ends[alpha] = out[i]
            if grad is not None:
                grads += (grad.detach().double().view(n, *x.shape) * w.to(grad.device).view(n, *([1] * x.ndim))).sum(0)
        values[name] = (grads * diff.double()).float().cpu()
        at_baseline[name] = ends[0.0].float()
        f_input = ends[1.0].float() if f_input is None else f_input
        masks[name] = mask.cpu()
    return Attributions(values, masks, f_input, at_baseline, steps, rule)
