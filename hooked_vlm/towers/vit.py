"""Vision transformer tower: BLIP's and InstructBLIP's EVA ViT, and CLIP (LLaVA)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..components import Block, BlockConfig, PatchEmbed, make_norm
from ..hooks import HookPoint
from .base import Tower, TowerCall


@dataclass
class VisionConfig:
    image_size: int
    patch_size: int
    n_layers: int
    block: BlockConfig
    patch_bias: bool = True  # BLIP/EVA: yes; CLIP: no
    ln_pre: bool = False  # CLIP normalises the embeddings before block 0
    ln_post: bool = True  # BLIP/EVA: the tower's output is normalised (all tokens); LLaVA reads a block's output

    @property
    def d_model(self) -> int:
        return self.block.d_model

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid**2 + 1


@dataclass(kw_only=True)
class VisionCall(TowerCall):
    pixel_values: Tensor | None
    feature_layers: Sequence[int] | None


class VisionTower(Tower):
    """Patch embeddings with a class token in front, absolute positions, pre-LN blocks.

    Token 0 is the class token; token 1 + r * grid + c is the patch at row r, column c.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.patch_embed = PatchEmbed(D, cfg.patch_size, cfg.patch_bias)
        self.class_embed = nn.Parameter(torch.empty(D))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_tokens, D))
        self.hook_embed = HookPoint()  # [B, 1 + N, D]: class token and patch embeddings
        self.hook_pos_embed = HookPoint(views_parameter=True)  # [B, 1 + N, D]: W_pos, a copy when hooked
        if cfg.ln_pre:
            self.ln_pre = make_norm(D, cfg.block.norm)
        self.blocks = nn.ModuleList([Block(cfg.block) for _ in range(cfg.n_layers)])
        if cfg.ln_post:
            self.ln_post = make_norm(D, cfg.block.norm)

    def check_pixels(self, pixel_values: Tensor | None) -> Tensor:
        size = self.cfg.image_size
        if pixel_values is None:
            raise ValueError("pixel_values is missing: this model needs an image; pass the processor's output, e.g. "
                             "model(**model.processor(images=image, text=text, return_tensors='pt'))")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, expected [batch, 3, {size}, {size}]; "
                             "preprocess images with model.processor so they are resized to the model's image size")
        return pixel_values

    def forward(self, pixel_values: Float[Tensor, "B 3 H W"], stop_at_layer: int | None = None,
                feature_layers: Sequence[int] | None = None, *, start_at_layer: int | None = None,
                resid: Float[Tensor, "B T D"] | None = None) -> Float[Tensor, "B T D_out"]:
        """The output of the last block run (`stop_at_layer` blocks if given: later blocks are not computed),
        normalised by `ln_post` when the tower has it and runs to the end.

        `feature_layers`: instead, the streams after that many blocks each (0: the embeddings, after `ln_pre`),
        concatenated along the channels (LLaVA's vision features); blocks after the deepest are not computed.
        `start_at_layer` with `resid`: start at this block from that stream (`Tower.run`).
        """
        call = VisionCall(pixel_values=pixel_values, stop_at_layer=stop_at_layer, feature_layers=feature_layers)
        return self.run(call, start_at_layer, resid)

    def embed_inputs(self, call: VisionCall) -> Float[Tensor, "B T D"]:
        return self.embed(self.check_pixels(call.pixel_values))

    def block_inputs(self, call: VisionCall, x: Float[Tensor, "B T D"]) -> dict[str, Any]:
        if call.feature_layers is not None:
            counts = list(call.feature_layers)
            if not counts or min(counts) < call.first or max(counts) > self.cfg.n_layers:
                raise ValueError(f"feature layers {counts} must lie in {call.first}..{self.cfg.n_layers}")
            call.stop_at_layer, call.keep_streams = max(counts), tuple(counts)
        return {}

    def output(self, call: VisionCall, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D_out"]:
        if call.feature_layers is not None:
            return torch.cat([call.streams[c] for c in call.feature_layers], dim=-1)
        n_run = self.cfg.n_layers if call.stop_at_layer is None else call.stop_at_layer
        return self.ln_post(x) if self.cfg.ln_post and n_run == self.cfg.n_layers else x

    def embed(self, pixel_values: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B T D"]:
        patches = self.patch_embed(pixel_values)
        cls = self.class_embed.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = self.hook_embed(torch.cat([cls, patches], dim=1))
        x = x + self.hook_pos_embed(self.W_pos.to(x.dtype).expand(x.shape[0], -1, -1))
        return self.ln_pre(x) if self.cfg.ln_pre else x
