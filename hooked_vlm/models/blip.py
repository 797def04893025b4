"""BLIP: captioning, visual question answering and image-text matching.

Towers (hook-name prefixes): `vision` (ViT), `text_encoder` (the question or text, cross-attending to the image),
`text_decoder` (the caption or answer, cross-attending to the image, or in VQA to the encoded question).

HF quirk kept by default: transformers 5.23's BLIP text cross-attention ignores its attention mask, so in VQA the
answer decoder attends to the question's pad tokens as well. `mask_cross_attention=True` applies the mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..arguments import keyword_names, reject_unknown
from ..configs import BlipConfig
from ..positions import Positions
from ..tokens import TokenLayout
from ..towers.bert import TextTower
from ..towers.vit import VisionTower
from .base import HookedVLM
from .generation import Pick, decode, decoding_step, greedy
from .inputs import check_batch, check_ids, check_mask, check_pixels, processor_output_positional, strict_forward


class _Blip(HookedVLM):
    image_embeddings_hook = "vision.ln_post.hook_normalized"  # every vision token, as the text towers read them
    prompt_name = ""  # what the prompt is, for error messages

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        if "text_encoder" in self.tower_names:
            self.text_encoder = TextTower(cfg.text_encoder)
        if "text_decoder" in self.tower_names:
            self.text_decoder = TextTower(cfg.text_decoder)

    def image_features(self, pixel_values: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B N D"]:
        """The vision tower's output (class token and patches, after its final norm): what the text towers
        cross-attend to."""
        return self.vision(pixel_values)

    def _tokens(self, ids: Tensor | None, mask: Tensor | None, tower: str, name: str = "input_ids",
                mask_name: str = "attention_mask") -> tuple[Tensor, Tensor]:
        """Checked ids and mask (all ones if None) of what `tower` reads."""
        cfg = getattr(self, tower).cfg
        ids = check_ids(ids, name, cfg.d_vocab, cfg.n_ctx)
        return ids, check_mask(mask, ids, mask_name, name)

    def _prompt(self, input_ids: Tensor | None, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if input_ids is None:
            raise ValueError(f"input_ids is missing: pass the {self.prompt_name} tokenized by model.processor")
        return self._tokens(input_ids, attention_mask, self.prompt_tower)

    @processor_output_positional  # positions(inputs) as positions(**inputs), like forward
    def positions(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                  input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                  **others: Any) -> Positions:
        """Where the prompt's tokens are (what `prompt_tower` reads: the caption prompt, the question or the text),
        per example; no image spans, since BLIP's image enters by cross-attention.

        A pure function of the inputs (forward's, the prompt checked as forward checks it): it runs no tower and
        leaves nothing on the model, so it holds for any call, thread or resumed run with these inputs.
        `run_with_cache` labels its cache with it (`cache.positions`).
        """
        reject_unknown(others, keyword_names(self.forward), f"{type(self).__name__}.positions()")
        return Positions(*self._prompt(input_ids, attention_mask))

    def token_layout(self) -> TokenLayout:
        """No image placeholders (the image enters by cross-attention); the prompt tower's learned positions."""
        return TokenLayout(n_ctx=getattr(self, self.prompt_tower).cfg.n_ctx)

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
    prompt_name = "caption prompt"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.setup()

    @strict_forward
    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None
                ) -> Float[Tensor, "B T V"]:
        """Caption logits for every position of `input_ids` (as HF's forward: the prompt's first token is used as
        given, `[CLS]` from the processor; HF's generate replaces it by `[DEC]`)."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask)
        self._check_batch(pixel_values, input_ids)
        image = self.image_features(pixel_values)
        resid = self.text_decoder(input_ids, attention_mask, kv_input=image)
        return self.text_decoder.logits(resid)

    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  pick: Pick = greedy) -> Tensor:
        """Captioning, from `[DEC]` alone or continuing a prompt (right-padded prompts as HF pads them)."""
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
        image = self.image_features(pixel_values)
        step = decoding_step(self.text_decoder, position_key="positions", kv_input=image)
        return decode(step, ids, mask, max_new_tokens, pick=pick, **self._stop_tokens(eos_token_id, pad_token_id))


class HookedBlipVQA(_Blip):
    """`BlipForQuestionAnswering`: towers `vision`, `text_encoder` (the question), `text_decoder` (the answer)."""

    tower_names = ("vision", "text_encoder", "text_decoder")
    prompt_tower, output_tower = "text_encoder", "text_decoder"
    prompt_name = "question"

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.setup()

    def _question(self, pixel_values: Tensor | None, input_ids: Tensor | None,
                  attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Checked question ids and mask."""
        input_ids, attention_mask = self._prompt(input_ids, attention_mask)
        self._check_batch(pixel_values, input_ids)
        return input_ids, attention_mask

    def encode_question(self, pixel_values: Tensor | None, input_ids: Tensor | None,
                        attention_mask: Tensor | None, checked: bool = False) -> tuple[Tensor, Tensor]:
        """The question encoded by `text_encoder` reading the image, and its mask."""
        if not checked:
            input_ids, attention_mask = self._question(pixel_values, input_ids, attention_mask)
        image = self.image_features(pixel_values)
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
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  pick: Pick = greedy) -> Tensor:
        """The answer to the question, from `[DEC]`."""
        question, question_mask = self.encode_question(pixel_values, input_ids, attention_mask)
        kv_mask = question_mask if self.cfg.mask_cross_attention else None
        ids = torch.full((question.shape[0], 1), self.cfg.bos_token_id, dtype=torch.long, device=question.device)
        step = decoding_step(self.text_decoder, position_key="positions", kv_input=question, kv_mask=kv_mask)
        return decode(step, ids, None, max_new_tokens, pick=pick, **self._stop_tokens(eos_token_id, pad_token_id))


class HookedBlipITM(_Blip):
    """`BlipForImageTextRetrieval`: towers `vision`, `text_encoder`; the ITM head or the contrastive projections."""

    tower_names = ("vision", "text_encoder")
    prompt_tower = "text_encoder"
    prompt_name = "text"

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
        input_ids, attention_mask = self._prompt(input_ids, attention_mask)
        if use_itm_head:
            self._check_batch(pixel_values, input_ids)
        else:  # similarities of every image with every text: the batches may differ
            check_pixels(pixel_values, self.vision)
        image = self.image_features(pixel_values)
        if use_itm_head:
            text = self.text_encoder(input_ids, attention_mask, kv_input=image)
            return self.itm_head(text[:, 0])
        text = self.text_encoder(input_ids, attention_mask)
        image_feat = F.normalize(self.vision_proj(image[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        return image_feat @ text_feat.t()
