"""LLaVA (CLIP + projector + Llama): HF config -> hooked config, HF live state dict -> hooked state dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig
from hooked_vlm.configs import LlavaConfig
from hooked_vlm.towers.vit import VisionConfig

from .blip import activation, check_vision
from .generation import generation_tokens
from .llama import DECODER_LMS, convert_llama_lm, llama_config
from .phi import convert_phi3_lm, convert_phi_lm, phi3_config, phi_config
from .registry import refuse, register_converter, require_type
from .state_dict import ConversionPlan, SourceWeights


def llava_config(hf: Any, *, hf_positions: bool = False) -> LlavaConfig:
    vc = hf.vision_config
    check_vision(vc, ("clip_vision_model",))  # CLIP only: SigLIP, Pixtral... towers differ
    tc = lm_config(hf.text_config)  # the LM's type and fields, before any vision work
    layers = hf.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    counts = tuple(layer if layer >= 0 else vc.num_hidden_layers + 1 + layer for layer in layers)  # hidden_states
    if not all(0 <= c <= vc.num_hidden_layers for c in counts):
        raise ValueError(f"vision_feature_layer {hf.vision_feature_layer} is out of range for a CLIP tower of "
                         f"{vc.num_hidden_layers} layers (its hidden states are {-vc.num_hidden_layers - 1}.."
                         f"{vc.num_hidden_layers})")
    H = vc.num_attention_heads
    block = BlockConfig(vc.hidden_size, AttnConfig(H, vc.hidden_size // H, softmax_fp32=True),
                        MLPConfig(vc.intermediate_size, act=activation(vc.hidden_act, "vision tower's hidden_act")),
                        NormConfig("layer", vc.layer_norm_eps), layout="pre")
    # only the blocks up to the deepest selected layer: HF computes the rest and throws them away
    vision = VisionConfig(vc.image_size, vc.patch_size, max(counts), block, patch_bias=False, ln_pre=True,
                          ln_post=False)
    if hf.vision_feature_select_strategy not in ("default", "full"):
        refuse("LLaVA config", "vision_feature_select_strategy", hf.vision_feature_select_strategy, "'default', 'full'")
    return LlavaConfig(vision, tc, counts, hf.vision_feature_select_strategy,
                       hf.image_token_id, projector_act=activation(hf.projector_hidden_act, "projector_hidden_act"),
                       projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)), hf_positions=hf_positions,
                       **generation_tokens(hf))


@register_converter("LlavaForConditionalGeneration", llava_config)
def convert_llava(state: Mapping[str, Tensor], cfg: LlavaConfig) -> ConversionPlan:
    w = SourceWeights(state, "LlavaForConditionalGeneration")
    v, n_blocks = "model.vision_tower.", cfg.vision.n_layers
    w.copy({"class_embed": "embeddings.class_embedding", "patch_embed.W_patch": "embeddings.patch_embedding.weight",
            "W_pos": "embeddings.position_embedding.weight",
            "ln_pre.w": "pre_layrnorm.weight", "ln_pre.b": "pre_layrnorm.bias"}, "vision.", v)
    for i in range(n_blocks):
        s, d = f"{v}encoder.layers.{i}.", f"vision.blocks.{i}."
        for kind in ("weight", "bias"):
            w.concat(f"{d}attn.qkv_{kind}", [f"{s}self_attn.{p}_proj.{kind}" for p in "qkv"])
        w.copy({"attn.o_weight": "self_attn.out_proj.weight", "attn.o_bias": "self_attn.out_proj.bias",
                "ln1.w": "layer_norm1.weight", "ln1.b": "layer_norm1.bias",
                "ln2.w": "layer_norm2.weight", "ln2.b": "layer_norm2.bias",
                "mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
                "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias"}, d, s)
    # unused by LLaVA: the blocks after the deepest feature layer, and the pooler's post-layernorm
    for i in range(n_blocks, 10_000):
        if not w.drop_prefix(f"{v}encoder.layers.{i}."):
            break
    w.drop_prefix(v + "post_layernorm.")
    p = "model.multi_modal_projector."
    w.copy({"in_weight": "linear_1.weight", "out_weight": "linear_2.weight"}, "projector.", p)
    if cfg.projector_bias:
        w.copy({"in_bias": "linear_1.bias", "out_bias": "linear_2.bias"}, "projector.", p)
    lm_weights(w.state, "model.language_model.")(w, cfg.lm, "", "lm.", body="model.language_model.",
                                                 head="lm_head.weight")
    return w.finish()


# The language models LLaVA's text_config may hold, by HF model_type: each a configuration of the decoder tower.
LM_CONFIGS = {**{kind: llama_config for kind in DECODER_LMS}, "phi": phi_config, "phi3": phi3_config}

# The LM's weight table, by the HF layout of the checkpoint: the hooked config does not record the HF type, so a
# layer-0 tensor that only that layout has tells them apart (both converting and exporting read HF keys). First
# match wins: Phi-2 also has q_proj.
LM_WEIGHTS = (("self_attn.dense.weight", convert_phi_lm), ("self_attn.qkv_proj.weight", convert_phi3_lm),
              ("self_attn.q_proj.weight", convert_llama_lm))


def lm_config(tc: Any):
    """The hooked LM config of an HF text config whose type is in `LM_CONFIGS`; else an error naming the types."""
    return LM_CONFIGS[require_type(tc, tuple(LM_CONFIGS), "language model")](tc)


def lm_weights(state: Mapping[str, Tensor], body: str):
    """The weight-table function for the LM whose layers are under `body` in `state`."""
    for marker, convert in LM_WEIGHTS:
        if f"{body}layers.0.{marker}" in state:
            return convert
    raise ValueError(f"the language model under {body!r} has none of the layouts hooked_vlm converts (layer 0 holds "
                     f"none of {[marker for marker, _ in LM_WEIGHTS]})")
