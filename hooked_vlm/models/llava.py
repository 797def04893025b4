"""LLaVA-1.5: a CLIP vision tower, a two-layer projector, and a Llama language model.

Towers (hook-name prefixes), in execution order: `vision`, `projector`, `lm`. The vision tower runs only up to the
selected feature layer(s) (HF computes the later ones and discards them; here they do not exist, so a hook name in
them is an error, not a hook that silently never fires). The projected image tokens are written into the LM input
at the `<image>` placeholders: `lm.hook_embed` still holds the placeholders' embeddings, `lm.hook_inputs_embeds`
the sequence block 0 reads.

Positions: rotary positions come from the attention mask (`cumsum(mask) - 1`, pads 0), as HF's generate computes
them, so a left-padded row equals the same prompt alone; `hf_positions=True` (a model option) numbers 0..T-1 as
HF's forward does (for LLaVA the two differ by about 1e-6, since the pads sit at the start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components.masks import generation_positions
from ..components.mlp import ACTIVATIONS
from ..hooks import HookPoint
from ..positions import ImageSpan, Positions
from ..towers.llama import LlamaConfig, LlamaTower
from ..towers.vit import VisionConfig, VisionTower
from .base import HookedVLM
from .generation import greedy_decode
from .inputs import check_ids, check_mask, check_pixels, check_positions, refuse_right_padding, strict_forward


@dataclass
class LlavaConfig:
    vision: VisionConfig  # only the blocks up to the deepest feature layer
    lm: LlamaConfig
    feature_layers: tuple[int, ...]  # per selected state, how many vision blocks produced it (0: the embeddings)
    select: Literal["default", "full"]  # "default" drops the class token
    image_token_id: int
    projector_act: str = "gelu"
    projector_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_positions: bool = False  # number positions 0..T-1 across pads, as HF's forward does

    @property
    def tokens_per_image(self) -> int:
        return self.vision.grid**2 + (1 if self.select == "full" else 0)


class Projector(nn.Module):
    """Vision features -> LM space: linear, activation, linear."""

    def __init__(self, d_in: int, d_out: int, act: str, bias: bool):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.in_weight = nn.Parameter(torch.empty(d_out, d_in))
        self.in_bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.out_weight = nn.Parameter(torch.empty(d_out, d_out))
        self.out_bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.hook_in = HookPoint()  # [n_images, N, D_vision * n_feature_layers]: the selected vision features
        self.hook_mid = HookPoint()  # [n_images, N, D_lm]: after the first linear and the activation
        self.hook_out = HookPoint()  # [n_images, N, D_lm]: the image tokens in LM space

    def forward(self, x: Float[Tensor, "n N D_v"]) -> Float[Tensor, "n N D_lm"]:
        h = self.hook_mid(self.act(F.linear(self.hook_in(x), self.in_weight, self.in_bias)))
        return self.hook_out(F.linear(h, self.out_weight, self.out_bias))


class HookedLlava(HookedVLM):
    """`LlavaForConditionalGeneration`. Call it with the `LlavaProcessor` output; returns the LM logits."""

    tower_names = ("vision", "projector", "lm")
    image_embeddings_hook = "lm.hook_inputs_embeds"  # at the image tokens' positions
    prompt_tower = output_tower = "lm"
    prompt_template = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's chat format

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.vision.d_model * len(cfg.feature_layers), cfg.lm.d_model, cfg.projector_act,
                                   cfg.projector_bias)
        self.lm = LlamaTower(cfg.lm)
        self.setup()

    # ------------------------------------------------------------------ the image side
    def image_features(self, pixel_values: Float[Tensor, "n 3 H W"]) -> Float[Tensor, "n N D_lm"]:
        """The image tokens in LM space, one row of `tokens_per_image` per image."""
        features = self.vision(pixel_values, feature_layers=self.cfg.feature_layers)
        if self.cfg.select == "default":
            features = features[:, 1:]  # drop the class token
        return self.projector(features)

    def _check_inputs(self, input_ids: Tensor | None, pixel_values: Tensor | None,
                      attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Checked input ids, attention mask (all ones if None) and placeholder mask [B, T]."""
        if input_ids is None:
            raise ValueError("input_ids is missing: pass the processor's output, e.g. model(**model.processor("
                             "images=image, text='USER: <image>\\nWhat is this? ASSISTANT:', return_tensors='pt'))")
        input_ids = check_ids(input_ids, "input_ids", self.cfg.lm.d_vocab)
        attention_mask = check_mask(attention_mask, input_ids, "attention_mask", "input_ids")
        return input_ids, attention_mask, self._image_tokens(input_ids, pixel_values)

    def _image_tokens(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """The placeholder mask [B, T], after checking that placeholders and images match."""
        if pixel_values is not None:
            check_pixels(pixel_values, self.vision)
        is_image = input_ids == self.cfg.image_token_id
        n_tokens, per_image = int(is_image.sum()), self.cfg.tokens_per_image
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is None and n_tokens:
            raise ValueError(f"the prompts hold {n_tokens} <image> tokens but no pixel_values were given; pass the "
                             "images the prompts refer to")
        if pixel_values is not None and n_tokens != n_images * per_image:
            raise ValueError(
                f"the prompts hold {n_tokens} <image> tokens, but {n_images} image(s) need {per_image} each "
                f"({n_images * per_image}); put one '<image>' per image in the text and build the inputs with "
                "model.processor(images=..., text=...), which expands each into the image's tokens")
        for b, row in enumerate(is_image.cpu()):  # one transfer; the spans are read on the CPU anyway
            idx = torch.nonzero(row).flatten()
            if len(idx) % per_image:
                raise ValueError(f"example {b} holds {len(idx)} <image> tokens, not a multiple of the {per_image} "
                                 "tokens of one image: each image's tokens must sit in one prompt")
            runs = idx.view(-1, per_image) if len(idx) else idx.view(0, per_image)
            if (runs[:, -1] - runs[:, 0] != per_image - 1).any():
                raise ValueError(f"example {b}: the {per_image} <image> tokens of each image must be consecutive, "
                                 "as the processor writes them")
        return is_image

    def _positions(self, input_ids: Tensor, attention_mask: Tensor, is_image: Tensor) -> Positions:
        """Image spans per example (per image, with each token's patch-grid row and column)."""
        per_image, grid = self.cfg.tokens_per_image, self.cfg.vision.grid
        patch = torch.arange(grid * grid)
        rows, cols = patch // grid, patch % grid
        if self.cfg.select == "full":  # the class token first: no patch
            rows, cols = torch.cat([torch.tensor([-1]), rows]), torch.cat([torch.tensor([-1]), cols])
        spans = []
        for row in is_image.cpu():
            idx = torch.nonzero(row).flatten()
            # images fill the placeholders in order; adjacent images form one run, so cut by tokens per image
            spans.append([ImageSpan(int(idx[i]), int(idx[i + per_image - 1]) + 1, rows, cols)
                          for i in range(0, len(idx), per_image)])
        return Positions(input_ids, attention_mask, spans)

    def image_embeddings_mask(self, positions: Positions) -> Tensor:
        mask = torch.zeros(positions.input_ids.shape, dtype=torch.bool)
        for b, spans in enumerate(positions.image):
            for span in spans:
                mask[b, span.start:span.stop] = True
        return mask

    def _inputs_embeds(self, input_ids: Tensor, pixel_values: Tensor | None, is_image: Tensor) -> Tensor:
        embeds = self.lm.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values)
        # row-major over the batch, as HF's masked_scatter: image i fills the i-th run of placeholders
        features = features.to(embeds.device, embeds.dtype).reshape(-1, embeds.shape[-1])  # towers may sit apart
        return embeds.masked_scatter(is_image.to(embeds.device)[..., None], features)

    def lm_positions(self, attention_mask: Int[Tensor, "B T"]) -> Int[Tensor, "B T"]:
        if self.cfg.hf_positions:
            B, T = attention_mask.shape
            return torch.arange(T, device=attention_mask.device).expand(B, T)
        return generation_positions(attention_mask)

    # ------------------------------------------------------------------ forward
    @strict_forward
    def forward(self, input_ids: Int[Tensor, "B T"] | None = None, pixel_values: Float[Tensor, "n 3 H W"] | None = None,
                attention_mask: Int[Tensor, "B T"] | None = None, position_ids: Int[Tensor, "B T"] | None = None,
                mm_token_type_ids: Int[Tensor, "B T"] | None = None) -> Float[Tensor, "B T_out V"]:
        """LM logits for every prompt position (T_out = T; fewer when the LM resumes on a suffix, as patching's
        `model.resume` does). Text-only prompts (no `<image>`, no pixel_values) work too.

        `mm_token_type_ids` (the processor's `return_mm_token_type_ids=True`) is accepted and ignored: it marks the
        `<image>` positions, which the model reads from `input_ids` itself, so it cannot change the result.
        """
        input_ids, attention_mask, is_image = self._check_inputs(input_ids, pixel_values, attention_mask)
        check_positions(position_ids, input_ids)
        self.last_positions = self._positions(input_ids, attention_mask, is_image)
        embeds = self._inputs_embeds(input_ids, pixel_values, is_image)
        positions = position_ids if position_ids is not None else self.lm_positions(attention_mask)
        return self.lm.logits(self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions))

    def _generate(self, *, max_new_tokens: int, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                  attention_mask: Tensor | None = None, eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None, mm_token_type_ids: Tensor | None = None) -> Tensor:
        """Greedy decoding with a KV cache; returns the prompt and the new tokens, as HF. `eos_token_id` and
        `pad_token_id` override the model's (taken from the HF config), as in HF's generate. A right-padded batch
        is refused (see `inputs.refuse_right_padding`); `mm_token_type_ids` is ignored, as in `forward`."""
        input_ids, attention_mask, is_image = self._check_inputs(input_ids, pixel_values, attention_mask)
        refuse_right_padding(attention_mask)
        self.last_positions = self._positions(input_ids, attention_mask, is_image)
        embeds = self._inputs_embeds(input_ids, pixel_values, is_image)
        return greedy_decode(self.lm.decode_step(embeds), input_ids, attention_mask, max_new_tokens,
                             eos_token_id=self.cfg.eos_token_id if eos_token_id is None else eos_token_id,
                             pad_token_id=self.cfg.pad_token_id if pad_token_id is None else pad_token_id)
