"""Qwen2-VL's and Qwen2.5-VL's vision tower: images of any size, cut into patches, with 2-D rotary positions and
attention within each image (Qwen2.5: within windows, except in its full-attention blocks).

    pixel_values [P, C*t*p*p], image_grid_thw [n, 3]
        ── split per image, padded to the largest ── patch_embed (a linear over the flattened patch) ── hook_embed
        ── blocks (pre-LN; 2-D rotary on q and k; attention masked to the image, or to its window) ── output

Layout: one row per image, padded. HF packs every image's patches into one sequence and attends within each image
(`cu_seqlens`); here each image is a row of the batch dimension, `[n_images, N, D]` with N the largest image's patch
count, and the pad positions are masked out as keys (their own rows hold numbers that nothing reads). Within a row
the patches keep the processor's order: block-major over the `merge_size` x `merge_size` blocks that the merger
fuses into one LM token (`patch_coordinates`). Qwen2.5-VL's windowed blocks keep this order too: HF permutes the
sequence window by window (`window_index`) and back after the merger; attention within a window is the same
computation in any order, so here a mask restricts each patch to its window instead, and every hook sees the patches
in the processor's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components import Block, BlockConfig
from ..components.masks import group_mask, padding_mask
from ..components.rotary import axial_rotary
from ..hooks import HookPoint
from .base import Tower, TowerCall


@dataclass
class QwenVisionConfig:
    patch_size: int
    temporal_patch_size: int  # an image is repeated over the temporal patch (HF's processor): t = 1 per image
    n_layers: int
    block: BlockConfig  # pre-LN (LayerNorm: Qwen2-VL; RMSNorm: Qwen2.5-VL), attention with `rotary` set
    merge_size: int = 2  # the merger fuses merge_size x merge_size patches into one LM token
    channels: int = 3
    rope_base: float = 10_000.0
    # Qwen2.5-VL: the side of an attention window in merged tokens (HF window_size // merge_size // patch_size);
    # None: every block attends over the whole image (Qwen2-VL)
    window: int | None = None
    full_attention_layers: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks that attend over the whole image

    @property
    def d_model(self) -> int:
        return self.block.d_model

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size**2


def patch_coordinates(rows: int, cols: int, merge: int) -> tuple[Int[Tensor, "N"], Int[Tensor, "N"]]:
    """The patch row and column of each patch of a rows x cols grid in the processor's order: block-major over the
    merge x merge blocks, row-major inside a block (HF `get_vision_position_ids`)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    shape = (rows // merge, merge, cols // merge, merge)
    return r.reshape(shape).transpose(1, 2).flatten(), c.reshape(shape).transpose(1, 2).flatten()


class QwenVisionBlock(Block):
    """A vision block that reads the window mask where it attends within windows (Qwen2.5-VL), else the image mask."""

    def __init__(self, cfg: BlockConfig, windowed: bool):
        super().__init__(cfg)
        self.windowed = windowed

    def forward(self, x: Float[Tensor, "B T D"], *, window_mask: Tensor | None = None, **kwargs: Any
                ) -> Float[Tensor, "B T D"]:
        if self.windowed:
            kwargs["mask"] = window_mask
        return super().forward(x, **kwargs)


@dataclass(kw_only=True)
class QwenVisionCall(TowerCall):
    pixel_values: Tensor  # [P, patch_dim]: every image's patches, one after the other
    grid: Tensor  # [n, 3]: (t, rows, cols) patches per image


class QwenVisionTower(Tower):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        if cfg.block.attn.rotary is None:
            raise ValueError("the Qwen vision tower's attention needs rotary positions (AttnConfig.rotary)")
        if cfg.block.attn.d_head % 4:
            raise ValueError(f"the 2-D rotary needs d_head divisible by 4, got {cfg.block.attn.d_head}")
        self.cfg = cfg
        D = cfg.d_model
        self.W_patch = nn.Parameter(torch.empty(D, cfg.patch_dim))  # HF's Conv3d with stride = kernel, flattened
        self.hook_embed = HookPoint()  # [n_images, N, D] patch embeddings (pads: 0)
        windowed = [cfg.window is not None and i not in cfg.full_attention_layers for i in range(cfg.n_layers)]
        self.blocks = nn.ModuleList([QwenVisionBlock(cfg.block, w) for w in windowed])

    def forward(self, pixel_values: Float[Tensor, "P K"], image_grid_thw: Int[Tensor, "n 3"], *,
                start_at_layer: int | None = None, resid: Float[Tensor, "n N D"] | None = None
                ) -> Float[Tensor, "n N D"]:
        """The stream after the last block, one row per image (padded to the largest image's N patches).

        Args:
            pixel_values: the processor's patches [P, C * t * p * p], every image's one after the other.
            image_grid_thw: per image, its (t, rows, cols) patch grid (the processor's `image_grid_thw`).
            start_at_layer, resid: start at this block from that stream (`Tower.run`).
        """
        call = QwenVisionCall(pixel_values=pixel_values, grid=image_grid_thw)
        return self.run(call, start_at_layer, resid)

    def counts(self, grid: Int[Tensor, "n 3"]) -> list[int]:
        return [int(t * h * w) for t, h, w in grid.tolist()]

    def valid(self, grid: Int[Tensor, "n 3"], device: torch.device | None = None) -> Tensor:
        """[n, N] True at each image's real patches (False at the row's padding)."""
        counts = torch.tensor(self.counts(grid), device=device)
        return torch.arange(int(counts.max()), device=device)[None, :] < counts[:, None]

    def embed_inputs(self, call: QwenVisionCall) -> Float[Tensor, "n N D"]:
        rows = call.pixel_values.split(self.counts(call.grid))
        patches = nn.utils.rnn.pad_sequence(list(rows), batch_first=True)  # [n, N, K], zeros at the pads
        return self.hook_embed(F.linear(patches.to(self.W_patch.dtype), self.W_patch))

    def block_inputs(self, call: QwenVisionCall, x: Float[Tensor, "n N D"]) -> dict[str, Any]:
        n, N = x.shape[:2]
        m, device = self.cfg.merge_size, x.device
        rows = torch.zeros(n, N, dtype=torch.long)
        cols = torch.zeros(n, N, dtype=torch.long)
        windows = torch.full((n, N), -1, dtype=torch.long)  # -1: padding
        for i, (t, h, w) in enumerate(call.grid.tolist()):
            r, c = patch_coordinates(h, w, m)
            k = t * h * w
            rows[i, :k], cols[i, :k] = r.repeat(t), c.repeat(t)
            if self.cfg.window is not None:  # HF get_vision_window_index: windows of merged tokens, row-major
                side = self.cfg.window
                per_row = -(-(w // m) // side)
                frame = torch.arange(t).repeat_interleave(h * w) * (-(-(h // m) // side)) * per_row
                windows[i, :k] = frame + (r.repeat(t) // m // side) * per_row + (c.repeat(t) // m // side)
        rotary = axial_rotary(rows.to(device), cols.to(device), self.cfg.block.attn.d_head, self.cfg.rope_base,
                              x.dtype)
        valid = self.valid(call.grid, device)
        # no padding (one image, or images of one size): no mask, rather than adding zeros to every block's scores
        mask = None if bool(valid.all()) else padding_mask(valid.long(), x.dtype)
        out: dict[str, Any] = dict(mask=mask, rotary=rotary)
        if self.cfg.window is not None:
            out["window_mask"] = group_mask(windows.to(device), x.dtype)
        return out
