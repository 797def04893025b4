"""Corruptions of activations, as values the patching sweeps take in place of corrupted inputs.

A `Corruption` says what to do to one site of the clean run (the image embeddings the text reads, the token
embeddings of some positions of a tower, or any hook), how, and how its randomness is drawn:

    corruption.gaussian(3.0)                 ROME: add noise, 3 x the empirical std of the corrupted values
    corruption.multiplicative(1.0, 5.0)      Palit et al.'s first notebook: every element times eps ~ N(1, 5)
    corruption.scale(0.7691)                 Palit et al.'s second notebook: every element times 0.7691
    corruption.from_hooks([(name, fn), ...]) any hooks of your own

The corrupted run of a sweep is the clean inputs with the corruption's hooks. `describe()` says what it was (kind,
parameters, site, seed, redraw policy), for reporting with the results.

Randomness (gaussian, multiplicative) is seeded and its redraw policy explicit:

- `redraw="sample"` (default): one draw per sample, shared by the corrupted baseline and every cell of the sweep
  (ROME's causal tracing). Sample s draws from `torch.Generator().manual_seed(seed + s)`.
- `redraw="forward"`: every forward draws anew (Palit et al.'s released code, which noises inside every forward:
  the baseline and each cell). Forward f of sample s draws from `torch.Generator().manual_seed(
  corruption.seed_of(s, f))`, where forward 0 is the corrupted (unpatched) baseline and the cell of layer L and
  variant v (its position, group or head, in the order of the result's last axes, flattened) is forward
  `1 + L * n_variants + v`. A sweep that stacks several cells in one batch gives each its own draw, so it equals
  the naive loop of one forward per cell.

A draw is `torch.randn(shape, generator=...)` in float32 on the CPU, shaped like the site's activation for the
batch [B, ...], then moved to the activation's device and dtype: the same numbers on every device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..hooks import HookSpec

Redraw = Literal["sample", "forward"]
KINDS = ("gaussian", "multiplicative", "scale", "hooks")
SITE_DOC = ("'image' (the image embeddings the text side reads: model.image_embeddings_hook, at "
            "model.image_embeddings_mask), 'tokens' (the token embeddings of a tower, `{tower}.hook_embed`), or a hook "
            "name")


class Corruption:
    """A corruption of one site of the clean run; build one with `gaussian`, `multiplicative`, `scale` or
    `from_hooks`. Attributes: `kind`, `params` (the kind's numbers), `site`, `tower` (for site='tokens'; None: the
    swept tower), `positions` (which positions of the site; None: all of it, or for 'image' every image token),
    `seed`, `redraw`, `hooks` (from_hooks only)."""

    def __init__(self, kind: str, params: dict[str, float | None], *, site: str = "image", tower: str | None = None,
                 positions: Any = None, seed: int = 0, redraw: Redraw = "sample",
                 hooks: Sequence[HookSpec] = (), label: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if redraw not in ("sample", "forward"):
            raise ValueError(f"redraw must be 'sample' (one draw shared by every cell of a sample) or 'forward' (a "
                             f"new draw in every forward), got {redraw!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed={seed!r} is not an int")
        if not isinstance(site, str) or not site:
            raise TypeError(f"site={site!r}: pass {SITE_DOC}")
        if tower is not None and site != "tokens":
            raise ValueError(f"tower={tower!r} names whose token embeddings site='tokens' corrupts; site={site!r} "
                             "needs no tower")
        self.kind, self.params, self.site, self.tower = kind, dict(params), site, tower
        self.positions, self.seed, self.redraw = positions, seed, redraw
        self.hooks, self.label = list(hooks), label

    # ------------------------------------------------------------------ what it is
    @property
    def random(self) -> bool:
        """True for the kinds that draw noise (gaussian, multiplicative)."""
        return self.kind in ("gaussian", "multiplicative")

    @property
    def per_forward(self) -> bool:
        """True when every forward draws anew (`redraw="forward"` on a random kind)."""
        return self.random and self.redraw == "forward"

    def describe(self) -> dict[str, Any]:
        """What the corruption was, as plain values (for a results file or a figure's caption)."""
        out: dict[str, Any] = {"kind": self.kind, **self.params}
        if self.kind == "hooks":
            out["hooks"] = [name if isinstance(name, str) else getattr(name, "__name__", repr(name))
                            for name, _ in self.hooks]
            if self.label:
                out["label"] = self.label
            return out
        out["site"] = self.site
        if self.tower is not None:
            out["tower"] = self.tower
        out["positions"] = _plain(self.positions)
        if self.random:
            out["seed"], out["redraw"] = self.seed, self.redraw
        return out

    def __repr__(self) -> str:
        return f"Corruption({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"

    # ------------------------------------------------------------------ draws
    def seed_of(self, sample: int, forward: int = 0) -> int:
        """The seed of the draw of forward `forward` of sample `sample` (see the module's docstring): `seed + sample`
        with redraw='sample' (every forward of a sample shares it); with redraw='forward' the first 8 bytes
        (little-endian, top bit cleared) of sha256(f"{seed}/{sample}/{forward}")."""
        if self.redraw == "sample":
            return self.seed + sample
        digest = hashlib.sha256(f"{self.seed}/{sample}/{forward}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def draw(self, shape: Sequence[int], sample: int, forward: int = 0) -> Tensor:
        """The standard normal draw [shape] (float32, CPU) of forward `forward` of sample `sample`."""
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(self.seed_of(sample, forward)))

    def apply(self, t: Tensor, mask: Tensor | None, noise: Tensor | None, std: float | None = None) -> Tensor:
        """`t` corrupted at `mask` (broadcast over t's trailing dims; None: everywhere) with the standard normal draw
        `noise` (shaped like t; None for a kind without noise). `std`: the standard deviation a gaussian scales by
        (its `std` parameter, or the empirical one of the clean values)."""
        if mask is not None:
            mask = mask.to(t.device).reshape(*mask.shape, *([1] * (t.ndim - mask.ndim)))
        if self.kind == "gaussian":
            offset = noise.to(t.device, t.dtype) * torch.as_tensor(self.params["scale"] * std, dtype=t.dtype)
            return t + (offset if mask is None else torch.where(mask, offset, torch.zeros_like(offset)))
        if self.kind == "multiplicative":
            factor = (self.params["mean"] + self.params["std"] * noise).to(t.device, t.dtype)
        elif self.kind == "scale":
            factor = torch.full_like(t, self.params["factor"])
        else:
            raise ValueError("a from_hooks corruption applies its own hooks")
        return t * (factor if mask is None else torch.where(mask, factor, torch.ones_like(factor)))


# ---------------------------------------------------------------------------------------------- factories
def gaussian(scale: float = 3.0, *, std: float | None = None, site: str = "image", tower: str | None = None,
             positions: Any = None, seed: int = 0, redraw: Redraw = "sample") -> Corruption:
    """Add Gaussian noise (ROME's causal tracing): `scale` times `std`, or, with std=None, times the empirical
    standard deviation of the clean run's values at the corrupted positions (over the whole batch) - ROME's 3 x
    the std of the subject's embeddings. For a whole data set, pass one `std` measured over it."""
    _finite(scale, "scale", positive=True)
    if std is not None:
        _finite(std, "std", positive=True)
    return Corruption("gaussian", {"scale": float(scale), "std": None if std is None else float(std)}, site=site,
                      tower=tower, positions=positions, seed=seed, redraw=redraw)


def multiplicative(mean: float = 1.0, std: float = 5.0, *, site: str = "image", tower: str | None = None,
                   positions: Any = None, seed: int = 0, redraw: Redraw = "sample") -> Corruption:
    """Multiply every corrupted element by its own eps ~ N(mean, std) (eps = mean + std * z, z standard normal):
    Palit et al.'s first notebook (mean 1, std 5, on all the image embeddings, drawn anew in every forward: pass
    redraw='forward' to run it as they did)."""
    _finite(mean, "mean")
    _finite(std, "std", positive=True)
    return Corruption("multiplicative", {"mean": float(mean), "std": float(std)}, site=site, tower=tower,
                      positions=positions, seed=seed, redraw=redraw)


def scale(factor: float, *, site: str = "image", tower: str | None = None, positions: Any = None) -> Corruption:
    """Multiply every corrupted element by `factor` (Palit et al.'s second notebook: 0.7691 on all the image
    embeddings). Deterministic: no seed, nothing to redraw."""
    _finite(factor, "factor")
    return Corruption("scale", {"factor": float(factor)}, site=site, tower=tower, positions=positions)


def from_hooks(hooks: Sequence[HookSpec], *, label: str | None = None) -> Corruption:
    """Hooks of your own as the corruption: the corrupted run is the clean inputs with `hooks` attached. In a sweep
    they also run in the batched cells, whose batch holds several copies of the examples stacked (n * B rows,
    variant-major): a hook must accept that (e.g. by repeating a [B, ...] offset, as `add_hook` does). They are
    treated as deterministic: one corrupted run, shared by every cell."""
    hooks = list(hooks)
    if not hooks:
        raise ValueError("from_hooks got no hooks: pass a list of (hook name, function) pairs")
    for spec in hooks:
        if not (isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1])):
            raise TypeError(f"from_hooks takes (hook name, function) pairs, got {spec!r:.80}")
    return Corruption("hooks", {}, site="hooks", hooks=hooks, label=label)


# ---------------------------------------------------------------------------------------------- functions
def gaussian_noise(values: Tensor, scale: float, *, sites: Tensor | None = None, seed: int = 0) -> Tensor:
    """A seeded Gaussian draw shaped like `values` ([B, T, ...]), `scale` times the empirical standard deviation of
    `values` at `sites` ([B, T] bool; None: everywhere), and zero off the sites. Draw it once and add it in every
    cell of a sweep, so that the cells are comparable and the run is reproducible. (`corruption.gaussian(...)` is the
    same noise as a value the sweeps take.)"""
    mask = torch.ones(values.shape[:2], dtype=torch.bool) if sites is None else sites.bool()
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale={scale!r}: pass a positive number of standard deviations (e.g. 3.0)")
    std = empirical_std(values, mask) if scale else 0.0
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed))
    return gaussian(scale, seed=seed).apply(torch.zeros_like(values), mask, noise, std)


def empirical_std(values: Tensor, mask: Tensor | None) -> float:
    """The standard deviation of `values` at `mask` ([B, T] bool; None: all), refused when it is zero or not finite
    (noise scaled by it would be zero or NaN)."""
    if mask is not None and not mask.any():
        raise ValueError("no site to add noise to (the positions select nothing): select at least one position to "
                         "corrupt")
    if mask is not None:
        mask = mask.to(values.device).reshape(*mask.shape, *([1] * (values.ndim - mask.ndim))).expand_as(values)
    std = (values if mask is None else values[mask]).float().std()
    if not torch.isfinite(std) or std == 0:
        raise ValueError(f"the values to corrupt have standard deviation {std.item()}, so noise scaled by it is "
                         f"{'zero' if std == 0 else 'not a number'}: corrupt more than one value, and finite ones "
                         "(or pass gaussian(std=...))")
    return float(std)


def add_hook(hook_name: str, offset: Tensor) -> HookSpec:
    """A hook adding `offset` [B, ...] to an activation; a batch of n stacked copies of the B examples (as in a
    patching sweep) gets the offset repeated n times."""

    def hook(t: Tensor, hook: Any) -> Tensor:
        if t.shape[0] % offset.shape[0] or t.shape[1:] != offset.shape[1:]:
            raise ValueError(f"the offset for {hook_name} has shape {tuple(offset.shape)}, the activation "
                             f"{tuple(t.shape)}")
        return t + offset.to(t.dtype).repeat(t.shape[0] // offset.shape[0], *([1] * (t.ndim - 1)))

    return hook_name, hook


def _finite(value: Any, what: str, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value < 0):
        raise ValueError(f"{what}={value!r}: pass a finite{' non-negative' if positive else ''} number")


def _plain(positions: Any) -> Any:
    """`positions` as plain Python values for a description."""
    if positions is None or isinstance(positions, (str, int)):
        return positions
    if isinstance(positions, Tensor):
        return positions.tolist()
    if isinstance(positions, Sequence):
        return [_plain(p) for p in positions]
    return getattr(positions, "label", None) or getattr(positions, "__name__", None) or repr(positions)
