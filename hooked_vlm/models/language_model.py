"""The language model of LLaVA and InstructBLIP behind one interface, whatever its kind: decoder-only (Llama/Vicuna,
tower `lm`) or encoder-decoder (Flan-T5, towers `lm_encoder` + `lm_decoder`). `language_model(*configs)` picks the
kind once, by the types of the LM configs; a model then never asks which kind it holds.

The adapter owns the text side the families share:

    check          the LM's inputs; what only one kind takes (`position_ids`: decoder-only; `decoder_input_ids`:
                   encoder-decoder) is refused by the other, and so is a right-padded batch to a decoder-only generate
    inputs_embeds  the prompt's embeddings with the image tokens written in at the placeholders
    positions      where the prompt's tokens are (`Positions`), for every LM tower that reads tokens
    logits         the forward to logits (decoder-only: rotary positions from the mask, or 0..T-1 as HF's forward)
    decoding       the decoding step for `decode`, with the tokens it starts from

The adapter is not a module: the model registers the towers under the adapter's names (`tower_names`), so hook
names and state-dict keys are `lm.*` or `lm_encoder.*` / `lm_decoder.*`, and the adapter keeps references to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..components.masks import generation_positions
from ..positions import ImageSpan, Positions
from ..towers.base import Tower
from ..towers.llama import LlamaConfig, LlamaTower
from ..towers.t5 import T5Stack, T5StackConfig
from .generation import Pick, Step, decode, decoding_step, greedy
from .inputs import check_ids, check_mask, check_positions, refuse_right_padding


@dataclass
class LMPrompt:
    """A checked prompt of the language model, as `LanguageModel.check` returns it."""

    input_ids: Int[Tensor, "B T"]
    attention_mask: Int[Tensor, "B T"]  # all ones if none was given
    is_image: Bool[Tensor, "B T"]  # the image placeholders
    position_ids: Int[Tensor, "B T"] | None = None  # decoder-only: given to override the numbering
    decoder_input_ids: Int[Tensor, "B T_dec"] | None = None  # encoder-decoder: default the start token alone
    decoder_attention_mask: Int[Tensor, "B T_dec"] | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # batch size of each input given, for the model's check


class Decoding(NamedTuple):
    """What `decode` starts from: the step, the tokens it continues and their mask (None: all real)."""

    step: Step
    ids: Int[Tensor, "B T"]
    mask: Int[Tensor, "B T"] | None


class LanguageModel(ABC):
    """The text side of a vision-language model whose image enters as tokens of the LM's input.

    Args:
        towers: the LM's towers by name (`tower_names`), built by the subclass.
        image_token_id: the placeholder token the image tokens replace.
        bos_token_id: decoder-only: the token a prompt-less generation starts from, after the image.
        decoder_start_token_id: encoder-decoder: the decoder's first token.
    """

    tower_names: ClassVar[tuple[str, ...]]
    prompt_tower: ClassVar[str]  # reads the prompt, with the image written in
    output_tower: ClassVar[str]  # predicts the tokens

    def __init__(self, towers: dict[str, Tower], *, image_token_id: int, bos_token_id: int | None = None,
                 decoder_start_token_id: int = 0):
        self.towers = towers
        self.image_token_id = image_token_id
        self.bos_token_id = bos_token_id
        self.decoder_start_token_id = decoder_start_token_id

    @property
    def d_vocab(self) -> int:
        """The vocabulary of the prompt's tokens."""
        return self.towers[self.prompt_tower].cfg.d_vocab

    # ------------------------------------------------------------------ inputs
    def check(self, input_ids: Any, attention_mask: Any, *, position_ids: Any = None, decoder_input_ids: Any = None,
              decoder_attention_mask: Any = None, generating: bool = False) -> LMPrompt:
        """The checked prompt (before any computation): ids in the vocabulary, a mask of their shape, and the
        inputs of this kind of LM; `generating`: also what `generate` refuses."""
        input_ids = check_ids(input_ids, "input_ids", self.d_vocab)
        attention_mask = check_mask(attention_mask, input_ids, "attention_mask", "input_ids")
        prompt = LMPrompt(input_ids, attention_mask, input_ids == self.image_token_id,
                          sizes={"input_ids": input_ids.shape[0]})
        self._check_kind(prompt, position_ids, decoder_input_ids, decoder_attention_mask, generating)
        return prompt

    @abstractmethod
    def _check_kind(self, prompt: LMPrompt, position_ids: Any, decoder_input_ids: Any, decoder_attention_mask: Any,
                    generating: bool) -> None:
        """Check the inputs only this kind of LM takes and set them on `prompt`."""

    def generation_prompt(self, image_prefix: list[int], batch: int, device: torch.device) -> Tensor | None:
        """The prompt of a generation given no `input_ids` (`image_prefix`: the image placeholders), or None
        where this kind of LM needs one."""
        return None

    # ------------------------------------------------------------------ the forward
    def inputs_embeds(self, prompt: LMPrompt, image_tokens: Float[Tensor, "n N D"] | None) -> Float[Tensor, "B T D"]:
        """The prompt's token embeddings (`hook_embed`) with the image tokens written in at the placeholders."""
        embeds = self.towers[self.prompt_tower].embed_tokens(prompt.input_ids)
        if image_tokens is None:
            return embeds
        # row-major over the batch, as HF's masked_scatter: the i-th placeholder takes image token i; the towers
        # may sit on other devices
        return embeds.masked_scatter(prompt.is_image.to(embeds.device)[..., None],
                                     image_tokens.to(embeds.device, embeds.dtype))

    def positions(self, prompt: LMPrompt, image: list[list[ImageSpan]]) -> Positions:
        """Where the prompt's tokens are (`image`: the image spans per example, from `positions.image_spans`)."""
        return Positions(prompt.input_ids, prompt.attention_mask, image)

    @abstractmethod
    def logits(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"], *, hf_positions: bool = False
               ) -> Float[Tensor, "B T_out V"]:
        """The LM's logits given the prompt's embeddings with the image in (`hf_positions`: see
        `DecoderOnlyLM.lm_positions`)."""

    @abstractmethod
    def decoding(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"]) -> Decoding:
        """The decoding step (its KV cache in the closure) and the tokens it starts from."""

    def generate(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"], max_new_tokens: int, *,
                 eos_token_id: int | list[int] | None, pad_token_id: int | None, pick: Pick = greedy
                 ) -> Int[Tensor, "B T_out"]:
        """Decoding (`decode`, each token chosen by `pick`: greedy or a `Sampler`) from the prompt: decoder-only
        returns the prompt and the new tokens, encoder-decoder the decoder's tokens from the start token, as HF."""
        step, ids, mask = self.decoding(prompt, embeds)
        return decode(step, ids, mask, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      pick=pick)


class DecoderOnlyLM(LanguageModel):
    """A decoder-only LM (`LlamaTower` as `lm`): the prompt with the image in is the sequence that is decoded."""

    tower_names = ("lm",)
    prompt_tower = output_tower = "lm"

    @classmethod
    def build(cls, lm: LlamaConfig, **tokens: Any) -> "DecoderOnlyLM":
        return cls({"lm": LlamaTower(lm)}, **tokens)

    @property
    def lm(self) -> LlamaTower:
        return self.towers["lm"]

    def _check_kind(self, prompt: LMPrompt, position_ids: Any, decoder_input_ids: Any, decoder_attention_mask: Any,
                    generating: bool) -> None:
        if decoder_input_ids is not None or decoder_attention_mask is not None:
            raise ValueError("decoder_input_ids is for an encoder-decoder LM (Flan-T5); this model's LM is "
                             "decoder-only: append the tokens to input_ids instead")
        check_positions(position_ids, prompt.input_ids)
        prompt.position_ids = position_ids
        if generating:
            refuse_right_padding(prompt.attention_mask)

    def generation_prompt(self, image_prefix: list[int], batch: int, device: torch.device) -> Tensor | None:
        return torch.tensor([image_prefix + [self.bos_token_id]] * batch, dtype=torch.long, device=device)

    @staticmethod
    def lm_positions(attention_mask: Int[Tensor, "B T"], hf_positions: bool = False) -> Int[Tensor, "B T"]:
        """Rotary positions of the prompt: from the mask (`cumsum(mask) - 1`, pads 0, as HF's generate: a padded
        row equals the prompt alone), or 0..T-1 across the pads with `hf_positions`, as HF's forward."""
        if hf_positions:
            B, T = attention_mask.shape
            return torch.arange(T, device=attention_mask.device).expand(B, T)
        return generation_positions(attention_mask)

    def logits(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"], *, hf_positions: bool = False
               ) -> Float[Tensor, "B T_out V"]:
        positions = prompt.position_ids
        if positions is None:
            positions = self.lm_positions(prompt.attention_mask, hf_positions)
        resid = self.lm(inputs_embeds=embeds, attention_mask=prompt.attention_mask, position_ids=positions)
        return self.lm.logits(resid)

    def decoding(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"]) -> Decoding:
        step = decoding_step(self.lm, prompt_embeds=embeds, position_key="position_ids")
        return Decoding(step, prompt.input_ids, prompt.attention_mask)


class EncoderDecoderLM(LanguageModel):
    """An encoder-decoder LM (`T5Stack`s as `lm_encoder` and `lm_decoder`): the encoder reads the prompt with the
    image in, the decoder its own tokens (`decoder_input_ids`), cross-attending to the encoder's output."""

    tower_names = ("lm_encoder", "lm_decoder")
    prompt_tower, output_tower = "lm_encoder", "lm_decoder"

    @classmethod
    def build(cls, encoder: T5StackConfig, decoder: T5StackConfig, **tokens: Any) -> "EncoderDecoderLM":
        return cls({"lm_encoder": T5Stack(encoder), "lm_decoder": T5Stack(decoder)}, **tokens)

    @property
    def encoder(self) -> T5Stack:
        return self.towers["lm_encoder"]

    @property
    def decoder(self) -> T5Stack:
        return self.towers["lm_decoder"]

    def _check_kind(self, prompt: LMPrompt, position_ids: Any, decoder_input_ids: Any, decoder_attention_mask: Any,
                    generating: bool) -> None:
        if decoder_input_ids is None and decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask was given without decoder_input_ids; pass both or neither")
        if decoder_input_ids is not None:
            decoder_input_ids = check_ids(decoder_input_ids, "decoder_input_ids", self.decoder.cfg.d_vocab)
            check_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask", "decoder_input_ids")
            prompt.sizes["decoder_input_ids"] = decoder_input_ids.shape[0]
        else:  # the start token alone: logits[:, -1] is the first answer token's distribution
            decoder_input_ids = self._start(prompt)
        if position_ids is not None:
            raise ValueError("position_ids is for a decoder-only LM; T5 has relative positions: drop position_ids")
        prompt.decoder_input_ids, prompt.decoder_attention_mask = decoder_input_ids, decoder_attention_mask

    def _start(self, prompt: LMPrompt) -> Int[Tensor, "B 1"]:
        B = prompt.input_ids.shape[0]
        return torch.full((B, 1), self.decoder_start_token_id, dtype=torch.long, device=prompt.input_ids.device)

    def positions(self, prompt: LMPrompt, image: list[list[ImageSpan]]) -> Positions:
        positions = super().positions(prompt, image)
        dec_ids, dec_mask = prompt.decoder_input_ids, prompt.decoder_attention_mask
        dec_mask = torch.ones_like(dec_ids) if dec_mask is None else dec_mask
        positions.towers[self.output_tower] = Positions(dec_ids, dec_mask)  # the decoder's own tokens
        return positions

    def _encode(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
        return self.encoder(attention_mask=prompt.attention_mask, inputs_embeds=embeds)

    def logits(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"], *, hf_positions: bool = False
               ) -> Float[Tensor, "B T_dec V"]:
        encoded = self._encode(prompt, embeds)  # T5's positions are relative: `hf_positions` has nothing to number
        resid = self.decoder(prompt.decoder_input_ids, prompt.decoder_attention_mask, kv_input=encoded,
                             kv_mask=prompt.attention_mask)
        return self.decoder.logits(resid)

    def decoding(self, prompt: LMPrompt, embeds: Float[Tensor, "B T D"]) -> Decoding:
        step = decoding_step(self.decoder, kv_input=self._encode(prompt, embeds), kv_mask=prompt.attention_mask)
        return Decoding(step, self._start(prompt), None)


# the kind of LM, by the types of its configs (in the order the model's config lists them)
LANGUAGE_MODELS: dict[tuple[type, ...], Callable[..., LanguageModel]] = {
    (LlamaConfig,): DecoderOnlyLM.build,
    (T5StackConfig, T5StackConfig): EncoderDecoderLM.build,
}


def language_model(*configs: Any, **tokens: Any) -> LanguageModel:
    """The adapter for the LM these configs describe (None entries are skipped: a config may list the fields of
    every kind), with its towers built; `tokens` as `LanguageModel`'s keywords."""
    given = tuple(cfg for cfg in configs if cfg is not None)
    build = LANGUAGE_MODELS.get(tuple(type(cfg) for cfg in given))
    if build is None:
        kinds = "; ".join(" + ".join(t.__name__ for t in key) for key in LANGUAGE_MODELS)
        raise ValueError(f"no language model is built from {[type(cfg).__name__ for cfg in given]}; the kinds are: "
                         f"{kinds}")
    return build(*given, **tokens)
