"""InstructBLIP: an EVA ViT, a Q-Former whose learned queries read the image and the instruction, a linear projection
into the language model, and a decoder-only LM (Vicuna/Llama) or an encoder-decoder LM (Flan-T5).

Towers (hook-name prefixes), in execution order: `vision`, `qformer`, `projector`, then `lm` (decoder-only) or
`lm_encoder` + `lm_decoder` (T5). The projected queries are written into the LM input at the image placeholder
tokens (`<image>` x n_query, which the processor puts in front of every prompt): `lm.hook_embed` holds the token
embeddings with the placeholders, `lm.hook_inputs_embeds` (T5: `lm_encoder.*`) the sequence with the queries in.

Positions (decoder-only LM): HF's forward numbers the positions 0..T-1 across the pads, and the processor puts the
pads *between* the queries and the text (`<image>` x n, pads, `<s>`, text), so in HF a padded row's logits differ
from the same prompt run alone. hooked_vlm numbers positions from the attention mask by default (`cumsum(mask) - 1`,
pads 0), as HF's generate does: batched equals unbatched, and equals HF's forward given those `position_ids`.
`hf_positions=True` (a model option) reproduces HF's forward numbering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..components.kv_cache import KVCache
from ..hooks import HookPoint
from ..positions import ImageSpan, Positions
from ..towers.llama import LlamaConfig, LlamaTower
from ..towers.qformer import QFormerConfig, QFormerTower
from ..towers.t5 import T5Stack, T5StackConfig
from ..towers.vit import VisionConfig, VisionTower
from .base import HookedVLM
from .generation import generation_positions, greedy_decode
from .inputs import (check_batch, check_ids, check_mask, check_pixels, check_positions, refuse_right_padding,
                     strict_forward)


@dataclass
class InstructBlipConfig:
    vision: VisionConfig
    qformer: QFormerConfig
    d_lm: int
    image_token_id: int
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    lm: LlamaConfig | None = None  # decoder-only LM (Vicuna/Llama)
    lm_encoder: T5StackConfig | None = None  # encoder-decoder LM (T5)
    lm_decoder: T5StackConfig | None = None
    bos_token_id: int | None = None  # decoder-only: starts a prompt-less generation
    decoder_start_token_id: int = 0  # T5: the decoder's first token
    hf_positions: bool = False  # decoder-only: number positions 0..T-1 across pads, as HF's forward does

    def __post_init__(self) -> None:
        if (self.lm is None) == (self.lm_encoder is None or self.lm_decoder is None):
            raise ValueError("an InstructBLIP config needs either `lm` (decoder-only) or `lm_encoder` and "
                             "`lm_decoder` (encoder-decoder)")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.lm is None


class QueryProjector(nn.Module):
    """The Q-Former's query outputs -> the LM's embedding space (HF `language_projection`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.hook_out = HookPoint()  # [B, n_query, D_lm]

    def forward(self, x: Float[Tensor, "B n_query D_q"]) -> Float[Tensor, "B n_query D_lm"]:
        return self.hook_out(F.linear(x, self.weight, self.bias))


class HookedInstructBlip(HookedVLM):
    """`InstructBlipForConditionalGeneration` with a Llama (Vicuna) or T5 (Flan-T5) language model.

    Call it with the `InstructBlipProcessor` output; T5 also takes `decoder_input_ids` (default: the decoder start
    token alone, so `logits[:, -1]` is the first answer token's distribution). Returns the LM logits, as HF does.
    """

    image_embeddings_hook = "projector.hook_out"  # the queries in LM space: what the LM reads of the image

    def __init__(self, cfg: InstructBlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.qformer = QFormerTower(cfg.qformer)
        self.projector = QueryProjector(cfg.qformer.d_model, cfg.d_lm)
        if cfg.is_encoder_decoder:
            self.tower_names = ("vision", "qformer", "projector", "lm_encoder", "lm_decoder")
            self.prompt_tower, self.output_tower = "lm_encoder", "lm_decoder"
            self.lm_encoder = T5Stack(cfg.lm_encoder)
            self.lm_decoder = T5Stack(cfg.lm_decoder)
        else:
            self.tower_names = ("vision", "qformer", "projector", "lm")
            self.prompt_tower = self.output_tower = "lm"
            self.lm = LlamaTower(cfg.lm)
        self.setup()

    # ------------------------------------------------------------------ the image side
    def _check_inputs(self, pixel_values: Tensor | None, qformer_input_ids: Tensor | None,
                      qformer_attention_mask: Tensor | None, input_ids: Tensor | None, attention_mask: Tensor | None,
                      decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Clear errors for what HF accepts silently or fails on obscurely; returns the attention mask (all ones if
        None), the Q-Former's mask (as given) and the image-token mask [B, T]."""
        check_pixels(pixel_values, self.vision)
        if qformer_input_ids is None:
            raise ValueError("qformer_input_ids is missing: InstructBLIP's Q-Former reads the instruction too; pass "
                             "the whole processor output, e.g. model(**model.processor(images=image, text=prompt, "
                             "return_tensors='pt'))")
        if input_ids is None:
            raise ValueError("input_ids is missing: pass the prompt tokenized by model.processor (it holds the "
                             f"{self.cfg.qformer.n_query} image placeholder tokens)")
        qformer_input_ids = check_ids(qformer_input_ids, "qformer_input_ids", self.cfg.qformer.d_vocab,
                                      self.cfg.qformer.n_ctx)
        if qformer_attention_mask is not None:  # None stays None: the Q-Former then takes its fast unmasked path
            check_mask(qformer_attention_mask, qformer_input_ids, "qformer_attention_mask", "qformer_input_ids")
        lm_vocab = (self.cfg.lm_encoder if self.cfg.is_encoder_decoder else self.cfg.lm).d_vocab
        input_ids = check_ids(input_ids, "input_ids", lm_vocab)
        attention_mask = check_mask(attention_mask, input_ids, "attention_mask", "input_ids")
        sizes = {"pixel_values": pixel_values.shape[0], "qformer_input_ids": qformer_input_ids.shape[0],
                 "input_ids": input_ids.shape[0]}
        if decoder_input_ids is not None or decoder_attention_mask is not None:
            if not self.cfg.is_encoder_decoder:
                raise ValueError("decoder_input_ids is for an encoder-decoder LM (Flan-T5); this model's LM is "
                                 "decoder-only: append the tokens to input_ids instead")
            if decoder_input_ids is None:
                raise ValueError("decoder_attention_mask was given without decoder_input_ids; pass both or neither")
            decoder_input_ids = check_ids(decoder_input_ids, "decoder_input_ids", self.cfg.lm_decoder.d_vocab)
            check_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask", "decoder_input_ids")
            sizes["decoder_input_ids"] = decoder_input_ids.shape[0]
        check_batch(sizes, "pass one image and one instruction per prompt (the processor repeats nothing: give it as "
                           "many images as texts)")
        if position_ids is not None and self.cfg.is_encoder_decoder:
            raise ValueError("position_ids is for a decoder-only LM; T5 has relative positions: drop position_ids")
        check_positions(position_ids, input_ids)
        is_image = input_ids == self.cfg.image_token_id
        counts = is_image.sum(dim=1)
        n = self.cfg.qformer.n_query
        if (counts != n).any():
            raise ValueError(f"every prompt needs exactly {n} image placeholder tokens (id {self.cfg.image_token_id}), "
                             f"one per query, but the rows hold {counts.tolist()}; build the inputs with "
                             "model.processor(images=..., text=...), which inserts them (HF would silently ignore "
                             "the image or use part of it)")
        return attention_mask, qformer_attention_mask, is_image

    def encode_image(self, pixel_values: Float[Tensor, "B 3 H W"], qformer_input_ids: Int[Tensor, "B T_q"],
                     qformer_attention_mask: Int[Tensor, "B T_q"] | None = None) -> Float[Tensor, "B n_query D_lm"]:
        """Vision tower, Q-Former and projection: the queries in the LM's embedding space."""
        image = self.vision(pixel_values)
        return self.projector(self.qformer(qformer_input_ids, qformer_attention_mask, image))

    def _lm_inputs(self, embeds: Float[Tensor, "B T D"], is_image: Tensor, queries: Tensor) -> Tensor:
        # row-major, as HF's masked_scatter: the i-th placeholder of a row takes query i
        return embeds.masked_scatter(is_image.to(embeds.device)[..., None], queries.to(embeds.device, embeds.dtype))

    def _record_positions(self, input_ids: Tensor, attention_mask: Tensor, is_image: Tensor,
                          qformer_input_ids: Tensor, qformer_attention_mask: Tensor | None,
                          decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None
                          ) -> None:
        n = self.cfg.qformer.n_query
        not_patch = torch.full((n,), -1)
        spans = []
        for row in is_image.cpu():
            idx = torch.nonzero(row).flatten().tolist()
            runs, start = [], idx[0]
            for a, b in zip(idx, idx[1:] + [None]):
                if b != a + 1:
                    runs.append(ImageSpan(start, a + 1, not_patch[: a + 1 - start], not_patch[: a + 1 - start]))
                    start = b
            spans.append(runs)
        positions = Positions(input_ids, attention_mask, spans)
        B = qformer_input_ids.shape[0]
        q_mask = qformer_attention_mask if qformer_attention_mask is not None else torch.ones_like(qformer_input_ids)
        positions.towers["qformer"] = Positions(
            torch.cat([qformer_input_ids.new_full((B, n), -1), qformer_input_ids], dim=1),  # -1: a learned query
            torch.cat([q_mask.new_ones(B, n), q_mask], dim=1),
            [[ImageSpan(0, n, not_patch, not_patch)] for _ in range(B)],
        )
        if decoder_input_ids is not None:
            dec_mask = decoder_attention_mask if decoder_attention_mask is not None else torch.ones_like(
                decoder_input_ids)
            positions.towers["lm_decoder"] = Positions(decoder_input_ids, dec_mask)
        self.last_positions = positions

    def lm_positions(self, attention_mask: Int[Tensor, "B T"]) -> Int[Tensor, "B T"]:
        """Position ids of a decoder-only LM's prompt: from the mask (default) or 0..T-1 (`hf_positions`)."""
        if self.cfg.hf_positions:
            B, T = attention_mask.shape
            return torch.arange(T, device=attention_mask.device).expand(B, T)
        return generation_positions(attention_mask)

    # ------------------------------------------------------------------ forward
    @strict_forward
    def forward(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                qformer_input_ids: Int[Tensor, "B T_q"] | None = None,
                qformer_attention_mask: Int[Tensor, "B T_q"] | None = None,
                input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                decoder_input_ids: Int[Tensor, "B T_dec"] | None = None,
                decoder_attention_mask: Int[Tensor, "B T_dec"] | None = None,
                position_ids: Int[Tensor, "B T"] | None = None) -> Float[Tensor, "B T_out V"]:
        """LM logits: decoder-only, for every prompt position; T5, for every `decoder_input_ids` position.

        `position_ids` (decoder-only) overrides the model's numbering of the prompt positions.
        """
        attention_mask, qformer_attention_mask, is_image = self._check_inputs(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, decoder_input_ids,
            decoder_attention_mask, position_ids)
        if self.cfg.is_encoder_decoder and decoder_input_ids is None:
            decoder_input_ids = torch.full((input_ids.shape[0], 1), self.cfg.decoder_start_token_id,
                                           dtype=torch.long, device=input_ids.device)
            decoder_attention_mask = None
        self._record_positions(input_ids, attention_mask, is_image, qformer_input_ids, qformer_attention_mask,
                               decoder_input_ids, decoder_attention_mask)
        queries = self.encode_image(pixel_values, qformer_input_ids, qformer_attention_mask)
        if self.cfg.is_encoder_decoder:
            embeds = self._lm_inputs(self.lm_encoder.embed_tokens(input_ids), is_image, queries)
            encoded = self.lm_encoder(attention_mask=attention_mask, inputs_embeds=embeds)
            resid = self.lm_decoder(decoder_input_ids, decoder_attention_mask, kv_input=encoded,
                                    kv_mask=attention_mask)
            return self.lm_decoder.logits(resid)
        embeds = self._lm_inputs(self.lm.embed_tokens(input_ids), is_image, queries)
        positions = position_ids if position_ids is not None else self.lm_positions(attention_mask)
        return self.lm.logits(self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions))

    # ------------------------------------------------------------------ generation
    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  qformer_input_ids: Tensor | None = None, qformer_attention_mask: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> Tensor:
        """Greedy decoding with a KV cache, as HF: decoder-only returns the prompt and the new tokens, T5 the
        decoder's tokens (from the start token). Without `input_ids` the prompt is the placeholders and `<s>`.
        `eos_token_id` and `pad_token_id` override the model's, as in HF's generate. A decoder-only LM refuses a
        right-padded batch (see `inputs.refuse_right_padding`)."""
        if input_ids is None and isinstance(pixel_values, Tensor) and not self.cfg.is_encoder_decoder:
            B = pixel_values.shape[0]
            start = [self.cfg.image_token_id] * self.cfg.qformer.n_query + [self.cfg.bos_token_id]
            input_ids = torch.tensor([start] * B, dtype=torch.long, device=pixel_values.device)
        attention_mask, qformer_attention_mask, is_image = self._check_inputs(
            pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask)
        if not self.cfg.is_encoder_decoder:
            refuse_right_padding(attention_mask)
        self._record_positions(input_ids, attention_mask, is_image, qformer_input_ids, qformer_attention_mask)
        queries = self.encode_image(pixel_values, qformer_input_ids, qformer_attention_mask)
        eos = self.cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.cfg.pad_token_id if pad_token_id is None else pad_token_id

        if self.cfg.is_encoder_decoder:
            embeds = self._lm_inputs(self.lm_encoder.embed_tokens(input_ids), is_image, queries)
            encoded = self.lm_encoder(attention_mask=attention_mask, inputs_embeds=embeds)
            past = KVCache.for_tower(self.lm_decoder)

            def t5_step(new_ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
                resid = self.lm_decoder(new_ids, mask, kv_input=encoded, kv_mask=attention_mask, past=past)
                return self.lm_decoder.logits(resid[:, -1:])[:, -1]

            ids = torch.full((input_ids.shape[0], 1), self.cfg.decoder_start_token_id, dtype=torch.long,
                             device=input_ids.device)
            return greedy_decode(t5_step, ids, None, max_new_tokens, eos_token_id=eos, pad_token_id=pad)

        embeds = self._lm_inputs(self.lm.embed_tokens(input_ids), is_image, queries)
        return greedy_decode(self.lm.decode_step(embeds), input_ids, attention_mask, max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad)
