"""The config of each model family, as a converter builds it from an HF config and a checkpoint stores it, and which
hooked model class runs each HF architecture.

These live apart from the models so that the converters (`weights_conversion`) depend on configs only: the models
import the loader (`HookedVLM.from_pretrained`), and the loader imports the converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .towers.bert import TextConfig
from .towers.llama import LlamaConfig
from .components.norms import NormConfig
from .towers.qformer import QFormerConfig
from .towers.qwen_vision import QwenVisionConfig
from .towers.t5 import T5StackConfig
from .towers.vit import VisionConfig

# The hooked model class (by name; `loading.model_class` gives the class) that runs each HF architecture a converter
# reads: one BLIP config serves three models, so the config class alone does not say.
HOOKED_CLASSES: dict[str, str] = {
    "BlipForConditionalGeneration": "HookedBlipCaptioning",
    "BlipForQuestionAnswering": "HookedBlipVQA",
    "BlipForImageTextRetrieval": "HookedBlipITM",
    "LlavaForConditionalGeneration": "HookedLlava",
    "InstructBlipForConditionalGeneration": "HookedInstructBlip",
}


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
    # parameters (fnmatch patterns of their names) that a float16 load keeps in float32, as HF's
    # `_keep_in_fp32_modules` does (`loading.keep_float32`); bfloat16 and float32 loads keep nothing
    keep_in_float32: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.lm is None) == (self.lm_encoder is None or self.lm_decoder is None):
            raise ValueError("an InstructBLIP config needs either `lm` (decoder-only) or `lm_encoder` and "
                             "`lm_decoder` (encoder-decoder)")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.lm is None


@dataclass
class QwenVLConfig:
    """Qwen2-VL and Qwen2.5-VL: the vision tower (its merger is `projector`) and the Qwen2 LM, whose rotary is
    multimodal (`lm.block.attn.rotary.mrope_section`)."""

    vision: QwenVisionConfig
    lm: LlamaConfig
    image_token_id: int
    merger_norm: NormConfig  # the merger's norm before fusing patches (LayerNorm: Qwen2-VL; RMSNorm: Qwen2.5-VL)
    video_token_id: int | None = None  # refused: videos are not supported
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None


HOOKED_CLASSES.update({
    "Qwen2VLForConditionalGeneration": "HookedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "HookedQwen2VL",
})
