"""Figures are written as PNGs of the expected size, with NaN cells and image spans handled."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from hooked_vlm import plot  # noqa: E402
from hooked_vlm.positions import ImageSpan  # noqa: E402
from hooked_vlm.tiny import random_image  # noqa: E402


def test_heatmap_and_overlay_write_pngs(tmp_path):
    scores = torch.randn(4, 6)
    scores[1, 2] = float("nan")
    span = ImageSpan(1, 4, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    out = plot.heatmap(scores, tmp_path / "sub" / "heads.png", title="heads", xticklabels=list("abcdef"),
                       image_spans=[span])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not list(tmp_path.glob("**/*.tmp.png"))
    with pytest.raises(ValueError, match="labels for 6 columns"):
        plot.heatmap(scores, tmp_path / "bad.png", xticklabels=["a"])
    out = plot.patch_overlay(random_image((64, 64)), torch.randn(16), tmp_path / "overlay.png", title="grid")
    with Image.open(out) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="patch grid"):
        plot.patch_overlay(random_image((64, 64)), torch.randn(17), tmp_path / "x.png")


def test_overlay_takes_a_grid_map_as_head_overlay_returns_it(tmp_path):
    """A [rows, cols] map is drawn as it is (NaN where no patch), not flattened and re-squared."""
    grid = torch.randn(3, 5)
    grid[0, 0] = float("nan")
    out = plot.patch_overlay(random_image((80, 48)), grid, tmp_path / "grid.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
