"""Figures of sweep results, written to PNG (matplotlib: `pip install hooked-vlm[plot]`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from .positions import ImageSpan


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("hooked_vlm.plot needs matplotlib: pip install 'hooked-vlm[plot]'") from e
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)  # a reader never sees a half-written figure
    _pyplot().close(fig)
    return path


def _limits(values: np.ndarray, centered: bool) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -1.0, 1.0
    if centered:
        bound = float(np.abs(finite).max()) or 1.0
        return -bound, bound
    return float(finite.min()), float(finite.max())


def heatmap(scores: Float[Tensor, "rows cols"], path: str | Path, *, title: str = "", xlabel: str = "",
            ylabel: str = "layer", xticklabels: Sequence[str] | None = None,
            image_spans: Sequence[ImageSpan] = (), centered: bool = True, cmap: str = "RdBu_r") -> Path:
    """A heatmap of a [layers, heads] or [layers, positions] result (NaN cells blank), saved as PNG.

    `xticklabels`: one label per column (token strings for positions); `image_spans` shade the columns that
    are image tokens. Returns the path.
    """
    plt = _pyplot()
    values = torch.as_tensor(scores).detach().float().cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"heatmap takes a 2-d result, got shape {values.shape}")
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.32 * cols, 24), min(1.5 + 0.32 * rows, 16)))
    lo, hi = _limits(values, centered)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_yticks(range(rows))
    if xticklabels is not None:
        if len(xticklabels) != cols:
            raise ValueError(f"{len(xticklabels)} labels for {cols} columns")
        ax.set_xticks(range(cols))
        ax.set_xticklabels(list(xticklabels), rotation=90, fontsize=7)
    for span in image_spans:
        ax.axvspan(span.start - 0.5, span.stop - 0.5, color="gold", alpha=0.15, lw=0)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def patch_overlay(image: Image.Image, scores: Float[Tensor, "n_patches"] | Float[Tensor, "rows cols"],
                  path: str | Path, *, grid: int | None = None, title: str = "", alpha: float = 0.55, cmap: str = "RdBu_r", centered: bool = True) -> Path:
    """Per-patch scores (one per image token, row-major over the patch grid, class token excluded; or the
    [rows, cols] map itself, as `overlays.head_overlay` returns it) drawn over the image as seen by the model (pass
    the resized/cropped image for a faithful overlay)."""
    plt = _pyplot()
    values = torch.as_tensor(scores).detach().float().cpu().numpy()
    if values.ndim != 2:
        values = values.ravel()
        grid = grid or int(round(values.size**0.5))
        if grid * grid != values.size:
            raise ValueError(f"{values.size} scores do not fill a {grid}x{grid} patch grid; drop the class token or "
                             "pass grid")
        values = values.reshape(grid, grid)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(image.convert("RGB"))
    lo, hi = _limits(values, centered)
    w, h = image.size
    im = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi, alpha=alpha, extent=(0, w, h, 0),
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(title=title, xticks=[], yticks=[])
    return _save(fig, path)
