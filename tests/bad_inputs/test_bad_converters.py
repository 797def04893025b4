"""Converters refuse what they cannot reproduce: language models, vision towers and config values whose HF forward
the hooked model does not implement (Gemma's scaled embeddings, Granite's multipliers, rope scaling...), by name and
with the supported list, before a weight is read; from_hf, streamed loading and conversion all go through the check.

Each row builds an HF config from a family's own (so everything but the bad part is valid) and calls the family's
converter, or a loading path, on it.
"""

from __future__ import annotations

import pytest
import transformers
from badcase import expect_error

from hooked_vlm import HookedVLM
from weights_conversion import converter_for
from weights_conversion.streaming import convert_checkpoint

SUPPORTED_LMS = "llama, mistral"


def small_lm(kind: str, **fields):
    """A two-layer text config of `kind` (a transformers config class name), 64 wide, vocabulary of the tiny LLaVA."""
    if kind == "OPTConfig":  # OPT names its sizes its own way
        sizes = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)
    elif kind in ("T5Config", "MT5Config"):
        sizes = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    else:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return getattr(transformers, kind)(vocab_size=439, **ids, **{**sizes, **fields})


def llava(fams, text=None, vision=None, projector_act="gelu"):
    """The tiny LLaVA's config with its text and/or vision config, or its projector's activation, replaced."""
    cfg = fams["llava"].hf.config
    return transformers.LlavaConfig(vision_config=(vision or cfg.vision_config).to_dict(),
                                    text_config=(text or cfg.text_config).to_dict(),
                                    image_token_index=cfg.image_token_id, vision_feature_layer=cfg.vision_feature_layer,
                                    projector_hidden_act=projector_act)


def instructblip(fams, text=None, vision=None, lm="llama"):
    cfg = fams[f"instructblip-{lm}"].hf.config
    return transformers.InstructBlipConfig(vision_config=(vision or cfg.vision_config).to_dict(),
                                           qformer_config=cfg.qformer_config.to_dict(),
                                           text_config=(text or cfg.text_config).to_dict(),
                                           num_query_tokens=cfg.num_query_tokens, image_token_index=cfg.image_token_id)


def blip(fams, text_fields=(), vision_fields=()):
    cfg = fams["blip"].hf.config
    return transformers.BlipConfig(text_config={**cfg.text_config.to_dict(), **dict(text_fields)},
                                   vision_config={**cfg.vision_config.to_dict(), **dict(vision_fields)},
                                   projection_dim=cfg.projection_dim, image_text_hidden_size=cfg.image_text_hidden_size)


def llama_with(fams, **fields):
    text = fams["llava"].hf.config.text_config.to_dict()
    return transformers.LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"} | fields)


def on_llava(build):
    """Row: the LLaVA converter's config step on `build(fams)` (a LlavaConfig)."""
    return lambda fams, tmp: converter_for("LlavaForConditionalGeneration").config(build(fams))


def on_instructblip(build):
    return lambda fams, tmp: converter_for("InstructBlipForConditionalGeneration").config(build(fams))


def on_blip(build):
    return lambda fams, tmp: converter_for("BlipForQuestionAnswering").config(build(fams))


def gemma_llava_model(fams):
    cfg = llava(fams, text=small_lm("GemmaConfig", head_dim=16))
    return transformers.LlavaForConditionalGeneration._from_config(cfg)


def from_hf_gemma(fams, tmp):
    HookedVLM.from_hf(gemma_llava_model(fams))


def saved_gemma(fams, tmp):
    folder = tmp / "llava-gemma"
    gemma_llava_model(fams).save_pretrained(folder)
    return folder


def from_pretrained_gemma(fams, tmp):
    HookedVLM.from_pretrained(saved_gemma(fams, tmp))


def convert_gemma(fams, tmp):
    folder = saved_gemma(fams, tmp)
    try:
        convert_checkpoint(folder, tmp / "out")
    finally:
        assert not (tmp / "out").exists(), "a refused conversion left an output folder"


ROWS = [
    # language models that look like Llama but compute something else: refused by type, with the supported list
    *[pytest.param(on_llava(lambda f, k=kind: llava(f, text=small_lm(k))), ValueError,
                   ["language model", name, SUPPORTED_LMS], id=f"llava-lm-{name}")
      for kind, name in [("GemmaConfig", "gemma"), ("Gemma2Config", "gemma2"), ("GraniteConfig", "granite"),
                         ("OPTConfig", "opt"), ("OlmoConfig", "olmo"), ("StableLmConfig", "stablelm"),
                         ("CohereConfig", "cohere"), ("Qwen2Config", "qwen2")]],
    pytest.param(on_instructblip(lambda f: instructblip(f, text=small_lm("OPTConfig"))), ValueError,
                 ["language model", "opt", SUPPORTED_LMS], id="instructblip-lm-opt"),
    pytest.param(on_instructblip(lambda f: instructblip(f, text=small_lm("GraniteConfig"))), ValueError,
                 ["language model", "granite", SUPPORTED_LMS], id="instructblip-lm-granite"),
    pytest.param(on_instructblip(lambda f: instructblip(f, text=small_lm("MT5Config"), lm="t5")), ValueError,
                 ["encoder-decoder language model", "mt5", "types: t5"], id="instructblip-lm-mt5"),
    # every loading path refuses before a weight is read
    pytest.param(from_hf_gemma, ValueError, ["gemma", SUPPORTED_LMS], id="from_hf-llava-gemma"),
    pytest.param(from_pretrained_gemma, ValueError, ["gemma", SUPPORTED_LMS], id="from_pretrained-llava-gemma"),
    pytest.param(convert_gemma, ValueError, ["gemma", SUPPORTED_LMS], id="convert-llava-gemma"),
    # vision towers
    pytest.param(on_llava(lambda f: llava(f, vision=transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=8))), ValueError, ["vision tower", "siglip_vision_model", "clip_vision_model"],
        id="llava-vision-siglip"),
    pytest.param(on_llava(lambda f: llava(f, vision=transformers.CLIPVisionConfig(
        **{**f["llava"].hf.config.vision_config.to_dict(), "num_channels": 1}))), ValueError,
        ["num_channels=1", "3"], id="llava-vision-one-channel"),
    pytest.param(on_llava(lambda f: llava(f, vision=transformers.CLIPVisionConfig(
        **{**f["llava"].hf.config.vision_config.to_dict(), "hidden_act": "gelu_fast"}))), ValueError,
        ["vision tower's hidden_act", "gelu_fast", "quick_gelu"], id="llava-vision-hidden_act"),
    pytest.param(on_instructblip(lambda f: instructblip(f, vision=transformers.InstructBlipVisionConfig(
        **{**f["instructblip-llama"].hf.config.vision_config.to_dict(), "num_channels": 4}))), ValueError,
        ["vision tower", "num_channels=4"], id="instructblip-vision-four-channels"),
    pytest.param(on_blip(lambda f: blip(f, vision_fields={"hidden_act": "relu6"})), ValueError,
                 ["vision tower's hidden_act", "relu6", "supported"], id="blip-vision-hidden_act"),
    pytest.param(on_blip(lambda f: blip(f, text_fields={"hidden_act": "mish"})), ValueError,
                 ["hidden_act", "mish", "supported"], id="blip-text-hidden_act"),
    # values of a supported type that its forward reads and the hooked one does not implement
    *[pytest.param(on_llava(lambda f, r=rope: llava(f, text=llama_with(f, rope_parameters=r))), ValueError,
                   ["rope_type", r_type, "'default'"], id=f"llava-llama-rope-{r_type}")
      for r_type, rope in [("linear", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                           ("dynamic", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
                           ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                       "rope_theta": 10000.0})]],
    pytest.param(on_llava(lambda f: llava(f, text=small_lm("MistralConfig", rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}))), ValueError, ["rope_type", "yarn"],
        id="llava-mistral-rope-yarn"),
    pytest.param(on_llava(lambda f: llava(f, text=llama_with(f, hidden_act="gelu_fast"))), ValueError,
                 ["language model's hidden_act", "gelu_fast", "silu"], id="llava-llama-hidden_act"),
    pytest.param(on_llava(lambda f: llava(f, projector_act="elu")), ValueError, ["projector_hidden_act", "elu", "gelu"],
                 id="llava-projector-act"),
    pytest.param(on_instructblip(lambda f: instructblip(f, text=llama_with(f, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))), ValueError, ["rope_type", "linear"],
        id="instructblip-llama-rope-linear"),
    pytest.param(on_instructblip(lambda f: instructblip(
        f, text=small_lm("T5Config", feed_forward_proj="gated-gelu_fast"), lm="t5")), ValueError,
        ["dense_act_fn", "gelu_fast", "supported"], id="instructblip-t5-dense_act_fn"),
]


@pytest.mark.parametrize("call, error, words", ROWS)
def test_converter_refuses(families, tmp_path, call, error, words):
    expect_error(lambda: call(families, tmp_path), error, *words)
