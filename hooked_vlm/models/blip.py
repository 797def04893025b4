"""BLIP: captioning, visual question answering and image-text matching.

Towers (hook-name prefixes): `vision` (ViT), `text_encoder` (the question or text, cross-attending to the image),
`text_decoder` (the caption or answer, cross-attending to the image, or in VQA to the encoded question).

HF quirk kept by default: transformers 5.23's BLIP text cross-attention ignores its attention mask, so in VQA the
answer decoder attends to the question's pad tokens as well. `mask_cross_attention=True` applies the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components.kv_cache import KVCache
from ..positions import Positions
from ..towers.bert import TextConfig, TextTower
from ..towers.vit import VisionConfig, VisionTower
from .base import HookedVLM
from .generation import greedy_decode


@dataclass
class BlipConfig:
    vision: VisionConfig
    text_encoder: TextConfig | None  # VQA and ITM
    text_decoder: TextConfig | None  # captioning and VQA
    bos_token_id: int  # [DEC]: the decoder's first token
    pad_token_id: int
    sep_token_id: int  # ends a generated text
    itm_dim: int | None = None  # ITM: width of the image-text projections
    mask_cross_attention: bool = False  # False reproduces HF 5.23 (mask ignored)


class _Blip(HookedVLM):
    image_embeddings_hook = "vision.ln_post.hook_normalized"  # every vision token, as the text towers read them

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        if "text_encoder" in self.tower_names:
            self.text_encoder = TextTower(cfg.text_encoder)
        if "text_decoder" in self.tower_names:
            self.text_decoder = TextTower(cfg.text_decoder)

    def _prompt(self, input_ids: Tensor | None, attention_mask: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
        if input_ids is None:
            raise ValueError(f"input_ids is missing: pass the {what} tokenized by model.processor")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}")
        self.last_positions = Positions(input_ids, attention_mask)
        return input_ids, attention_mask

    @staticmethod
    def _check_batch(pixel_values: Tensor | None, input_ids: Tensor) -> None:
        if pixel_values is not None and pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but input_ids {input_ids.shape[0]} "
                             "texts; pass one image per text")


class HookedBlipCaptioning(_Blip):
    """`BlipForConditionalGeneration`: towers `vision`, `text_decoder`."""

    tower_names = ("vision", "text_decoder")
    prompt_tower = output_tower = "text_decoder"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.setup()

    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                **unused: Any) -> Float[Tensor, "B T V"]:
        """Caption logits for every position of `input_ids` (as HF's forward: the prompt's first token is used as
        given, `[CLS]` from the processor; HF's generate replaces it by `[DEC]`)."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, "caption prompt")
        self._check_batch(pixel_values, input_ids)
        image = self.vision(pixel_values)
        resid = self.text_decoder(input_ids, attention_mask, kv_input=image)
        return self.text_decoder.logits(resid)

    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **unused: Any) -> Tensor:
        image = self.vision(pixel_values)
        B = image.shape[0]
        if input_ids is None:
            ids = torch.full((B, 1), self.cfg.bos_token_id, dtype=torch.long, device=image.device)
            mask = None
        else:
            # as HF: the prompt's first token becomes [DEC] and its last column (the [SEP]) is dropped
            ids = input_ids.clone()
            ids[:, 0] = self.cfg.bos_token_id
            ids = ids[:, :-1]
            mask = attention_mask[:, :-1].clone() if attention_mask is not None else None
        self._check_batch(pixel_values, ids)
        past = KVCache.for_tower(self.text_decoder)
        self.last_positions = Positions(ids, mask if mask is not None else torch.ones_like(ids))

        def step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
            resid = self.text_decoder(new_ids, mask, positions=positions, kv_input=image, past=past)
            return self.text_decoder.logits(resid[:, -1:])[:, -1]

        return greedy_decode(step, ids, mask, max_new_tokens, eos_token_id=self.cfg.sep_token_id,
                             pad_token_id=self.cfg.pad_token_id)


class HookedBlipVQA(_Blip):
    """`BlipForQuestionAnswering`: towers `vision`, `text_encoder` (the question), `text_decoder` (the answer)."""

    tower_names = ("vision", "text_encoder", "text_decoder")
    prompt_tower, output_tower = "text_encoder", "text_decoder"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.setup()

    def encode_question(self, pixel_values: Tensor | None, input_ids: Tensor | None,
                        attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, "question")
        self._check_batch(pixel_values, input_ids)
        image = self.vision(pixel_values)
        return self.text_encoder(input_ids, attention_mask, kv_input=image), attention_mask

    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                decoder_input_ids: Int[Tensor, "B T_dec"] | None = None,
                decoder_attention_mask: Int[Tensor, "B T_dec"] | None = None, **unused: Any
                ) -> Float[Tensor, "B T_dec V"]:
        """Answer-decoder logits. Without `decoder_input_ids` the decoder reads the single `[DEC]` token, so
        `logits[:, -1]` is the distribution of the answer's first token (what BLIP-VQA interpretability reads)."""
        question, question_mask = self.encode_question(pixel_values, input_ids, attention_mask)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((question.shape[0], 1), self.cfg.bos_token_id, dtype=torch.long,
                                           device=question.device)
            decoder_attention_mask = None
        kv_mask = question_mask if self.cfg.mask_cross_attention else None
        resid = self.text_decoder(decoder_input_ids, decoder_attention_mask, kv_input=question, kv_mask=kv_mask)
        return self.text_decoder.logits(resid)

    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **unused: Any) -> Tensor:
        question, question_mask = self.encode_question(pixel_values, input_ids, attention_mask)
        kv_mask = question_mask if self.cfg.mask_cross_attention else None
        ids = torch.full((question.shape[0], 1), self.cfg.bos_token_id, dtype=torch.long, device=question.device)
        past = KVCache.for_tower(self.text_decoder)

        def step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
            resid = self.text_decoder(new_ids, mask, positions=positions, kv_input=question, kv_mask=kv_mask,
                                      past=past)
            return self.text_decoder.logits(resid[:, -1:])[:, -1]

        return greedy_decode(step, ids, None, max_new_tokens, eos_token_id=self.cfg.sep_token_id,
                             pad_token_id=self.cfg.pad_token_id)


class HookedBlipITM(_Blip):
    """`BlipForImageTextRetrieval`: towers `vision`, `text_encoder`; the ITM head or the contrastive projections."""

    tower_names = ("vision", "text_encoder")
    prompt_tower = "text_encoder"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        D_v, D_t = cfg.vision.d_model, cfg.text_encoder.d_model
        self.itm_head = nn.Linear(D_t, 2)
        self.vision_proj = nn.Linear(D_v, cfg.itm_dim)
        self.text_proj = nn.Linear(D_t, cfg.itm_dim)
        self.setup()

    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                use_itm_head: bool = True, **unused: Any) -> Tensor:
        """`use_itm_head=True`: match logits [B, 2] (index 1 = match) from the text encoder reading the image.
        `False`: cosine similarities [B_images, B_texts] of the projected class tokens, the text encoded without
        cross-attention, as HF computes them (no temperature)."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, "text")
        image = self.vision(pixel_values)
        if use_itm_head:
            self._check_batch(pixel_values, input_ids)
            text = self.text_encoder(input_ids, attention_mask, kv_input=image)
            return self.itm_head(text[:, 0])
        text = self.text_encoder(input_ids, attention_mask)
        image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        return image_feat @ text_feat.t()
