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

The LM side (checking its inputs, writing the queries in, positions, logits, decoding) is the language-model adapter
of `language_model.py`, shared with LLaVA: this class never asks which kind of LM it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..configs import InstructBlipConfig
from ..hooks import HookPoint
from ..positions import ImageSpan, Positions, image_spans
from ..tokens import TokenLayout
from ..towers.qformer import QFormerTower
from ..towers.vit import VisionTower
from .base import HookedVLM
from .generation import Pick, greedy
from .inputs import check_batch, check_ids, check_mask, check_pixels, strict_forward
from .language_model import LMPrompt, language_model


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
        # the text side, whichever LM the config holds (the kind is looked up once, from the configs' types)
        self.language = language_model(cfg.lm, cfg.lm_encoder, cfg.lm_decoder, image_token_id=cfg.image_token_id,
                                       bos_token_id=cfg.bos_token_id,
                                       decoder_start_token_id=cfg.decoder_start_token_id)
        for name, tower in self.language.towers.items():  # hook names and state-dict keys: `lm.*`, `lm_encoder.*`, ...
            setattr(self, name, tower)
        self.tower_names = ("vision", "qformer", "projector", *self.language.tower_names)
        self.prompt_tower, self.output_tower = self.language.prompt_tower, self.language.output_tower
        self.setup()

    def token_layout(self) -> TokenLayout:
        """As `InstructBlipProcessor`: one placeholder per query in front of every row (before `<s>` and the pads),
        labelled by its query."""
        n = self.cfg.qformer.n_query
        return TokenLayout(self.cfg.image_token_id, tuple(f"query {q}" for q in range(n)), prepend=n)

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, pixel_values: Tensor | None, qformer_input_ids: Tensor | None,
                      qformer_attention_mask: Tensor | None, input_ids: Tensor | None, attention_mask: Tensor | None,
                      decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, generating: bool = False) -> LMPrompt:
        """Clear errors for what HF accepts silently or fails on obscurely; returns the checked LM prompt (the
        Q-Former's inputs are checked in place)."""
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
        prompt = self.language.check(input_ids, attention_mask, position_ids=position_ids,
                                     decoder_input_ids=decoder_input_ids,
                                     decoder_attention_mask=decoder_attention_mask, generating=generating)
        check_batch({"pixel_values": pixel_values.shape[0], "qformer_input_ids": qformer_input_ids.shape[0],
                     **prompt.sizes},
                    "pass one image and one instruction per prompt (the processor repeats nothing: give it as many "
                    "images as texts)")
        counts = prompt.is_image.sum(dim=1)
        n = self.cfg.qformer.n_query
        if (counts != n).any():
            raise ValueError(f"every prompt needs exactly {n} image placeholder tokens (id {self.cfg.image_token_id}), "
                             f"one per query, but the rows hold {counts.tolist()}; build the inputs with "
                             "model.processor(images=..., text=...), which inserts them (HF would silently ignore "
                             "the image or use part of it)")
        return prompt

    def image_features(self, pixel_values: Float[Tensor, "B 3 H W"], qformer_input_ids: Int[Tensor, "B T_q"],
                     qformer_attention_mask: Int[Tensor, "B T_q"] | None = None) -> Float[Tensor, "B n_query D_lm"]:
        """Vision tower, Q-Former and projection: the queries in the LM's embedding space."""
        image = self.vision(pixel_values)
        return self.projector(self.qformer(qformer_input_ids, qformer_attention_mask, image))

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
        prompt = self._check_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                    attention_mask, decoder_input_ids, decoder_attention_mask, position_ids)
        queries = self.image_features(pixel_values, qformer_input_ids, qformer_attention_mask)
        embeds = self.language.inputs_embeds(prompt, queries)
        return self.language.logits(prompt, embeds, hf_positions=self.cfg.hf_positions)

    @strict_forward
    def positions(self, pixel_values: Float[Tensor, "B 3 H W"] | None = None,
                  qformer_input_ids: Int[Tensor, "B T_q"] | None = None,
                  qformer_attention_mask: Int[Tensor, "B T_q"] | None = None,
                  input_ids: Int[Tensor, "B T"] | None = None, attention_mask: Int[Tensor, "B T"] | None = None,
                  decoder_input_ids: Int[Tensor, "B T_dec"] | None = None,
                  decoder_attention_mask: Int[Tensor, "B T_dec"] | None = None,
                  position_ids: Int[Tensor, "B T"] | None = None) -> Positions:
        """Where the prompt's tokens are in the LM's input, per example: the queries' span (`image`), the text, the
        last real token; `towers["qformer"]` for the Q-Former's sequence (the learned queries, then the
        instruction) and, with a T5, `towers["lm_decoder"]` for the decoder's tokens.

        A pure function of the inputs (forward's, checked as forward checks them): it runs no tower and leaves
        nothing on the model, so it holds for any call, thread or resumed run with these inputs. `run_with_cache`
        labels its cache with it (`cache.positions`).
        """
        prompt = self._check_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                    attention_mask, decoder_input_ids, decoder_attention_mask, position_ids)
        n = self.cfg.qformer.n_query
        positions = self.language.positions(prompt, image_spans(prompt.is_image, n))
        B = qformer_input_ids.shape[0]
        q_mask = qformer_attention_mask if qformer_attention_mask is not None else torch.ones_like(qformer_input_ids)
        not_patch = torch.full((n,), -1)
        positions.towers["qformer"] = Positions(
            torch.cat([qformer_input_ids.new_full((B, n), -1), qformer_input_ids], dim=1),  # -1: a learned query
            torch.cat([q_mask.new_ones(B, n), q_mask], dim=1),
            [[ImageSpan(0, n, not_patch, not_patch)] for _ in range(B)],
        )
        return positions

    # ------------------------------------------------------------------ generation
    def _generate(self, *, max_new_tokens: int, pixel_values: Tensor | None = None,
                  qformer_input_ids: Tensor | None = None, qformer_attention_mask: Tensor | None = None,
                  input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  pick: Pick = greedy) -> Tensor:
        """Decoding with a KV cache (greedy, or sampling by `pick`), as HF: decoder-only returns the prompt and the
        new tokens, T5 the decoder's tokens (from the start token). Without `input_ids` a decoder-only prompt is the
        placeholders and `<s>`. `eos_token_id` and `pad_token_id` override the model's, as in HF's generate. A
        decoder-only LM refuses a right-padded batch (see `inputs.refuse_right_padding`)."""
        if input_ids is None and isinstance(pixel_values, Tensor):
            placeholders = [self.cfg.image_token_id] * self.cfg.qformer.n_query
            input_ids = self.language.generation_prompt(placeholders, pixel_values.shape[0], pixel_values.device)
        prompt = self._check_inputs(pixel_values, qformer_input_ids, qformer_attention_mask, input_ids,
                                    attention_mask, generating=True)
        queries = self.image_features(pixel_values, qformer_input_ids, qformer_attention_mask)
        embeds = self.language.inputs_embeds(prompt, queries)
        return self.language.generate(prompt, embeds, max_new_tokens,
                                      eos_token_id=self.cfg.eos_token_id if eos_token_id is None else eos_token_id,
                                      pad_token_id=self.cfg.pad_token_id if pad_token_id is None else pad_token_id,
                                      pick=pick)
