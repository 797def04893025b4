"""Qwen2-VL and Qwen2.5-VL (vision tower + patch merger + Qwen2 LM): HF config -> hooked config, HF live state
dict -> hooked state dict (and back, the plan being invertible)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig, RotaryConfig
from hooked_vlm.configs import QwenVLConfig
from hooked_vlm.towers.llama import LlamaConfig
from hooked_vlm.towers.qwen_vision import QwenVisionConfig

from .blip import activation
from .generation import generation_tokens
from .registry import refuse, register_converter, require_type
from .state_dict import ConversionPlan, SourceWeights

VISION_EPS = 1e-6  # HF hard-codes the vision norms' and the merger's eps (Qwen2VLVisionBlock, PatchMerger)


def qwen2_lm_config(tc: Any) -> LlamaConfig:
    """The Qwen2 LM (modeling_qwen2_vl.py Qwen2VLTextModel): Llama-shaped with biases on q, k, v (none on o, none in
    the MLP), head width hidden_size / heads (HF ignores `head_dim`), multimodal rotary sections."""
    require_type(tc, ("qwen2_vl_text", "qwen2_5_vl_text"), "language model")
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        refuse("language model", "rope_type", rope_type, "'default' (HF's mrope without scaling)")
    if getattr(tc, "use_sliding_window", False):  # HF runs it only with flash attention and warns otherwise
        refuse("language model", "use_sliding_window", True, "False")
    H = tc.num_attention_heads
    d_head = tc.hidden_size // H
    section = tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))
    if sum(section) != d_head // 2:
        raise ValueError(f"the language model's mrope_section {list(section)} must sum to d_head / 2 = {d_head // 2}")
    attn = AttnConfig(H, d_head, n_kv_heads=getattr(tc, "num_key_value_heads", None) or H, bias=True, out_bias=False,
                      softmax_fp32=True, rotary=RotaryConfig(float(rope.get("rope_theta", 10_000.0)),
                                                             mrope_section=section))
    block = BlockConfig(tc.hidden_size, attn,
                        MLPConfig(tc.intermediate_size, act=activation(tc.hidden_act, "language model's hidden_act"),
                                  gated=True, bias=False),
                        NormConfig("rms", tc.rms_norm_eps), layout="pre")
    return LlamaConfig(tc.vocab_size, tc.num_hidden_layers, block)


def qwen_vision_config(vc: Any) -> tuple[QwenVisionConfig, NormConfig, int]:
    """The vision tower, the merger's norm and the merger's output width. Qwen2-VL: LayerNorm blocks with a plain
    MLP (`mlp_ratio`); Qwen2.5-VL: RMSNorm blocks with a gated MLP with biases, windowed attention."""
    kind = require_type(vc, ("qwen2_vl_vision", "qwen2_5_vl_vision"), "vision tower")
    if getattr(vc, "in_channels", 3) != 3:
        refuse("vision tower", "in_channels", vc.in_channels, "3 (RGB images)")
    rope = dict(getattr(vc, "rope_parameters", None) or {})
    if rope.get("rope_type", "axial") != "axial":
        refuse("vision tower", "rope_type", rope.get("rope_type"), "'axial'")
    base = float(rope.get("rope_theta", 10_000.0))
    if kind == "qwen2_vl_vision":
        D, d_out, d_mlp = vc.embed_dim, vc.hidden_size, int(vc.embed_dim * vc.mlp_ratio)
        norm, gated, window, full = NormConfig("layer", VISION_EPS), False, None, ()
    else:
        D, d_out, d_mlp = vc.hidden_size, vc.out_hidden_size, vc.intermediate_size
        norm, gated = NormConfig("rms", VISION_EPS), True
        window = vc.window_size // vc.spatial_merge_size // vc.patch_size
        full = tuple(int(i) for i in vc.fullatt_block_indexes)
        if window < 1:
            refuse("vision tower", "window_size", vc.window_size, "at least spatial_merge_size * patch_size")
    H = vc.num_heads
    attn = AttnConfig(H, D // H, bias=True, out_bias=True, softmax_fp32=True, rotary=RotaryConfig(base))
    block = BlockConfig(D, attn, MLPConfig(d_mlp, act=activation(vc.hidden_act, "vision tower's hidden_act"),
                                           gated=gated, bias=True), norm, layout="pre")
    cfg = QwenVisionConfig(vc.patch_size, vc.temporal_patch_size, vc.depth, block, merge_size=vc.spatial_merge_size,
                           rope_base=base, window=window, full_attention_layers=full)
    return cfg, norm, d_out


def qwen_vl_config(hf: Any) -> QwenVLConfig:
    lm = qwen2_lm_config(hf.text_config)
    vision, merger_norm, d_out = qwen_vision_config(hf.vision_config)
    if d_out != lm.d_model:
        raise ValueError(f"the merger's output width {d_out} differs from the language model's {lm.d_model}")
    return QwenVLConfig(vision, lm, hf.image_token_id, merger_norm, video_token_id=getattr(hf, "video_token_id", None),
                        **generation_tokens(hf))


def _convert(state: Mapping[str, Tensor], cfg: QwenVLConfig, source: str) -> ConversionPlan:
    w = SourceWeights(state, source)
    v, vc = "model.visual.", cfg.vision
    layer_norm = vc.block.norm.kind == "layer"
    w.put("vision.W_patch", v + "patch_embed.proj.weight", (vc.d_model, -1))  # Conv3d [D, C, t, p, p] -> [D, K]
    for i in range(vc.n_layers):
        s, d = f"{v}blocks.{i}.", f"vision.blocks.{i}."
        w.copy({"ln1.w": "norm1.weight", "ln2.w": "norm2.weight", "attn.qkv_weight": "attn.qkv.weight",
                "attn.qkv_bias": "attn.qkv.bias", "attn.o_weight": "attn.proj.weight",
                "attn.o_bias": "attn.proj.bias"}, d, s)
        if layer_norm:
            w.copy({"ln1.b": "norm1.bias", "ln2.b": "norm2.bias"}, d, s)
        if vc.block.mlp.gated:  # [gate; linear], as the hooked gated MLP stores them
            w.concat(d + "mlp.in_weight", [s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"])
            w.concat(d + "mlp.in_bias", [s + "mlp.gate_proj.bias", s + "mlp.up_proj.bias"])
            w.copy({"mlp.out_weight": "mlp.down_proj.weight", "mlp.out_bias": "mlp.down_proj.bias"}, d, s)
        else:
            w.copy({"mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
                    "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias"}, d, s)
    m = v + "merger."
    w.copy({"ln.w": "ln_q.weight", "in_weight": "mlp.0.weight", "in_bias": "mlp.0.bias",
            "out_weight": "mlp.2.weight", "out_bias": "mlp.2.bias"}, "projector.", m)
    if cfg.merger_norm.kind == "layer":
        w.put("projector.ln.b", m + "ln_q.bias")
    body = "model.language_model."
    w.copy({"lm.embed.W_E": "embed_tokens.weight", "lm.ln_final.w": "norm.weight"}, "", body)
    # tied checkpoints (Qwen2-VL-2B) may store the head only as the embedding
    w.put("lm.unembed.weight", "lm_head.weight" if "lm_head.weight" in state else body + "embed_tokens.weight")
    for i in range(cfg.lm.n_layers):
        s, d = f"{body}layers.{i}.", f"lm.blocks.{i}."
        w.concat(d + "attn.qkv_weight", [f"{s}self_attn.{p}_proj.weight" for p in "qkv"])
        w.concat(d + "attn.qkv_bias", [f"{s}self_attn.{p}_proj.bias" for p in "qkv"])
        w.concat(d + "mlp.in_weight", [s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"])
        w.copy({"attn.o_weight": "self_attn.o_proj.weight", "mlp.out_weight": "mlp.down_proj.weight",
                "ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight"}, d, s)
    return w.finish()


@register_converter("Qwen2VLForConditionalGeneration", qwen_vl_config)
def convert_qwen2_vl(state: Mapping[str, Tensor], cfg: QwenVLConfig) -> ConversionPlan:
    return _convert(state, cfg, "Qwen2VLForConditionalGeneration")


@register_converter("Qwen2_5_VLForConditionalGeneration", qwen_vl_config)
def convert_qwen2_5_vl(state: Mapping[str, Tensor], cfg: QwenVLConfig) -> ConversionPlan:
    return _convert(state, cfg, "Qwen2_5_VLForConditionalGeneration")
