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
from .inputs import check_batch, check_ids, check_mask, check_pixels, strict_forward


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

    def _tokens(self, ids: Tensor | None, mask: Tensor | None, tower: str, name: str = "input_ids",
                mask_name: str = "attention_mask") -> tuple[Tensor, Tensor]:
        """Checked ids and mask (all ones if None) of what `tower` reads."""
        cfg = getattr(self, tower).cfg
        ids = check_ids(ids, name, cfg.d_vocab, cfg.n_ctx)
        return ids, check_mask(mask, ids, mask_name, name)

    def _prompt(self, input_ids: Tensor | None, attention_mask: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
        if input_ids is None:
            raise ValueError(f"input_ids is missing: pass the {what} tokenized by model.processor")
        input_ids, attention_mask = self._tokens(input_ids, attention_mask, self.prompt_tower)
        self.last_positions = Positions(input_ids, attention_mask)
        return input_ids, attention_mask

    def _stop_tokens(self, eos_token_id: int | list[int] | None, pad_token_id: int | None) -> dict[str, Any]:
        """The end ([SEP]) and pad tokens of generation, unless overridden, as in HF's generate."""
        return {"eos_token_id": self.cfg.sep_token_id if eos_token_id is None else eos_token_id,
                "pad_token_id": self.cfg.pad_token_id if pad_token_id is None else pad_token_id}

    def _check_batch(self, pixel_values: Tensor | None, input_ids: Tensor) -> None:
        """Checked pixels, one image per text."""
        check_pixels(pixel_values, self.vision)
        check_batch({"pixel_values": pixel_values.shape[0], "input_ids": input_ids.shape[0]},
                    "pass one image per text")


class HookedBlipCaptioning(_Blip):
    """`BlipForConditionalGeneration`: towers `vision`, `text_decoder`."""

    tower_names = ("vision", "text_decoder")
    prompt_tower = output_tower = "text_decoder"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.setup()

    @strict_forward
    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None
                ) -> Float[Tensor, "B T V"]:
        """Caption logits for every position of `input_ids` (as HF's forward: the prompt's first token is used as
        given, `[CLS]` from the processor; HF's generate replaces it by `[DEC]`)."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, "caption prompt")
        self._check_batch(pixel_values, input_ids)
        image = self.vision(pixel_values)
        resid = self.text_decoder(input_ids, attention_mask, kv_input=image)
        return self.text_decoder.logits(resid)

    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Tensor:
        """Greedy captioning, from `[DEC]` alone or continuing a prompt (right-padded prompts as HF pads them)."""
        if input_ids is None:
            check_pixels(pixel_values, self.vision)
            ids = torch.full((pixel_values.shape[0], 1), self.cfg.bos_token_id, dtype=torch.long,
                             device=pixel_values.device)
            mask = None
        else:
            input_ids, attention_mask = self._tokens(input_ids, attention_mask, "text_decoder")
            if input_ids.shape[1] < 2:
                raise ValueError(f"a caption prompt has at least [CLS] and [SEP], got input_ids of shape "
                                 f"{tuple(input_ids.shape)}; tokenize it with model.processor")
            # as HF: the prompt's first token becomes [DEC] and its last column (the [SEP]) is dropped
            ids = input_ids.clone()
            ids[:, 0] = self.cfg.bos_token_id
            ids = ids[:, :-1]
            mask = attention_mask[:, :-1].clone()
        self._check_batch(pixel_values, ids)
        image = self.vision(pixel_values)
        past = KVCache.for_tower(self.text_decoder)
        self.last_positions = Positions(ids, mask if mask is not None else torch.ones_like(ids))

        def step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
            resid = self.text_decoder(new_ids, mask, positions=positions, kv_input=image, past=past)
            return self.text_decoder.logits(resid[:, -1:])[:, -1]

        return greedy_decode(step, ids, mask, max_new_tokens, **self._stop_tokens(eos_token_id, pad_token_id))


class HookedBlipVQA(_Blip):
    """`BlipForQuestionAnswering`: towers `vision`, `text_encoder` (the question), `text_decoder` (the answer)."""

    tower_names = ("vision", "text_encoder", "text_decoder")
    prompt_tower, output_tower = "text_encoder", "text_decoder"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.setup()

    def _question(self, pixel_values: Tensor | None, input_ids: Tensor | None,
                  attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Checked question ids and mask."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, "question")
        self._check_batch(pixel_values, input_ids)
        return input_ids, attention_mask

    def encode_question(self, pixel_values: Tensor | None, input_ids: Tensor | None,
                        attention_mask: Tensor | None, checked: bool = False) -> tuple[Tensor, Tensor]:
        """The question encoded by `text_encoder` reading the image, and its mask."""
        if not checked:
            input_ids, attention_mask = self._question(pixel_values, input_ids, attention_mask)
        image = self.vision(pixel_values)
        return self.text_encoder(input_ids, attention_mask, kv_input=image), attention_mask

    @strict_forward
    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                decoder_input_ids: Int[Tensor, "B T_dec"] | None = None,
                decoder_attention_mask: Int[Tensor, "B T_dec"] | None = None) -> Float[Tensor, "B T_dec V"]:
        """Answer-decoder logits. Without `decoder_input_ids` the decoder reads the single `[DEC]` token, so
        `logits[:, -1]` is the distribution of the answer's first token (what BLIP-VQA interpretability reads)."""
        input_ids, attention_mask = self._question(pixel_values, input_ids, attention_mask)
        if decoder_input_ids is not None:
            decoder_input_ids, decoder_attention_mask = self._tokens(decoder_input_ids, decoder_attention_mask,
                                                                     "text_decoder", "decoder_input_ids",
                                                                     "decoder_attention_mask")
            check_batch({"input_ids": input_ids.shape[0], "decoder_input_ids": decoder_input_ids.shape[0]},
                        "pass one answer prefix per question")
        elif decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask was given without decoder_input_ids; pass both or neither")
        question, question_mask = self.encode_question(pixel_values, input_ids, attention_mask, checked=True)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((question.shape[0], 1), self.cfg.bos_token_id, dtype=torch.long,
                                           device=question.device)
        kv_mask = question_mask if self.cfg.mask_cross_attention else None
        resid = self.text_decoder(decoder_input_ids, decoder_attention_mask, kv_input=question, kv_mask=kv_mask)
        return self.text_decoder.logits(resid)

    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Tensor:
        """Greedy answer to the question, from `[DEC]`."""
        question, question_mask = self.encode_question(pixel_values, input_ids, attention_mask)
        kv_mask = question_mask if self.cfg.mask_cross_attention else None
        ids = torch.full((question.shape[0], 1), self.cfg.bos_token_id, dtype=torch.long, device=question.device)
        past = KVCache.for_tower(self.text_decoder)

        def step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
            resid = self.text_decoder(new_ids, mask, positions=positions, kv_input=question, kv_mask=kv_mask,
                                      past=past)
            return self.text_decoder.logits(resid[:, -1:])[:, -1]

        return greedy_decode(step, ids, None, max_new_tokens, **self._stop_tokens(eos_token_id, pad_token_id))


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

    @strict_forward
    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                use_itm_head: bool = True) -> Tensor:
        """`use_itm_head=True`: match logits [B, 2] (index 1 = match) from the text encoder reading the image.
        `False`: cosine similarities [B_images, B_texts] of the projected class tokens, the text encoded without
        cross-attention, as HF computes them (no temperature)."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask, "text")
        if use_itm_head:
            self._check_batch(pixel_values, input_ids)
        else:  # similarities of every image with every text: the batches may differ
            check_pixels(pixel_values, self.vision)
        image = self.vision(pixel_values)
        if use_itm_head:
            text = self.text_encoder(input_ids, attention_mask, kv_input=image)
            return self.itm_head(text[:, 0])
        text = self.text_encoder(input_ids, attention_mask)
        image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        return image_feat @ text_feat.t()
