"""Phi language models (Phi-2: HF `phi`, Phi-3: HF `phi3`) as configurations of the decoder tower (`LlamaConfig`):
HF text config -> hooked config, and the weight tables. Used by LLaVA (`llava.py`).

- Phi-2 (modeling_phi.py): one LayerNorm (with bias) read by attention and MLP in parallel (`BlockConfig.parallel`),
  biases on q/k/v/dense/fc1/fc2, a plain gelu_new MLP, partial rotary, optional per-head q/k LayerNorms
  (`qk_layernorm`), a final LayerNorm.
- Phi-3 (modeling_phi3.py): Llama's sequential RMSNorm blocks with the projections stored fused (`qkv_proj` =
  [q; k; v], `gate_up_proj` = [gate; up]: exactly the hooked layouts, so they are copied as they are), partial rotary
  and a sliding window where configured. Long-context rotary scaling (`longrope`, HF's name for "su" and "yarn") is
  refused.
"""

from __future__ import annotations

from typing import Any

from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig, RotaryConfig
from hooked_vlm.towers.llama import LlamaConfig

from .blip import activation
from .registry import refuse, require_type
from .state_dict import SourceWeights


def _head_dim(tc: Any) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def _rotary(tc: Any, d_head: int, what: str) -> RotaryConfig:
    """HF's default rotary (`compute_default_rope_parameters`) over int(d_head * partial_rotary_factor) dims."""
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":  # Phi-3's longrope (short/long factors and an attention scaling), linear, dynamic...
        refuse(what, "rope_type", rope_type, "'default' (the unscaled rotary embedding; Phi-3's longrope, as in the "
               "128k-context checkpoints, is not implemented)")
    factor = rope.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1.0))
    dim = int(d_head * factor)
    if dim % 2 or dim <= 0:
        refuse(what, "partial_rotary_factor", factor, f"a factor giving an even number of rotated dims (d_head "
               f"{d_head} * {factor} = {dim})")
    base = rope.get("rope_theta", getattr(tc, "rope_theta", 10_000.0))
    return RotaryConfig(float(base), dim=None if dim == d_head else dim)


def phi_config(tc: Any) -> LlamaConfig:
    """Phi-2 (HF `PhiConfig`): the fields PhiModel's forward reads."""
    require_type(tc, ("phi",), "language model")
    H = tc.num_attention_heads
    d_head = _head_dim(tc)
    qk_norm = None
    if getattr(tc, "qk_layernorm", False):
        if d_head != tc.hidden_size // H:  # HF sizes q_layernorm by hidden_size // heads, not head_dim
            refuse("language model", "qk_layernorm", True, f"only with head_dim = hidden_size // num_attention_heads "
                   f"({tc.hidden_size // H}), got head_dim {d_head}")
        qk_norm = NormConfig("layer", tc.layer_norm_eps)
    attn = AttnConfig(H, d_head, n_kv_heads=getattr(tc, "num_key_value_heads", None) or H, bias=True, out_bias=True,
                      softmax_fp32=True, rotary=_rotary(tc, d_head, "language model"), qk_norm=qk_norm)
    mlp = MLPConfig(tc.intermediate_size, act=activation(tc.hidden_act, "language model's hidden_act"), bias=True)
    block = BlockConfig(tc.hidden_size, attn, mlp, NormConfig("layer", tc.layer_norm_eps), layout="pre",
                        parallel=True)
    return LlamaConfig(tc.vocab_size, tc.num_hidden_layers, block)


def phi3_config(tc: Any) -> LlamaConfig:
    """Phi-3 (HF `Phi3Config`): the fields Phi3Model's forward reads (no biases anywhere; a sliding window whenever
    `sliding_window` is set, as HF picks create_sliding_window_causal_mask)."""
    require_type(tc, ("phi3",), "language model")
    H = tc.num_attention_heads
    d_head = _head_dim(tc)
    attn = AttnConfig(H, d_head, n_kv_heads=getattr(tc, "num_key_value_heads", None) or H, bias=False,
                      out_bias=False, softmax_fp32=True, rotary=_rotary(tc, d_head, "language model"))
    mlp = MLPConfig(tc.intermediate_size, act=activation(tc.hidden_act, "language model's hidden_act"), gated=True,
                    bias=False)
    block = BlockConfig(tc.hidden_size, attn, mlp, NormConfig("rms", tc.rms_norm_eps), layout="pre")
    return LlamaConfig(tc.vocab_size, tc.num_hidden_layers, block, sliding_window=getattr(tc, "sliding_window", None))


def convert_phi_lm(w: SourceWeights, cfg: LlamaConfig, src: str, dst: str, *, body: str | None = None,
                   head: str | None = None) -> None:
    """Phi-2's `{body}` (embed_tokens, layers, final_layernorm) and `head` (lm_head.weight; LLaVA's has no bias)."""
    body = body if body is not None else src + "model."
    head = head if head is not None else src + "lm_head.weight"
    w.copy({"embed.W_E": "embed_tokens.weight", "ln_final.w": "final_layernorm.weight",
            "ln_final.b": "final_layernorm.bias"}, dst, body)
    w.put(dst + "unembed.weight", head)
    for i in range(cfg.n_layers):
        s, d = f"{body}layers.{i}.", f"{dst}blocks.{i}."
        for kind in ("weight", "bias"):
            w.concat(f"{d}attn.qkv_{kind}", [f"{s}self_attn.{p}_proj.{kind}" for p in "qkv"])
        w.copy({"attn.o_weight": "self_attn.dense.weight", "attn.o_bias": "self_attn.dense.bias",
                "mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
                "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias",
                "ln1.w": "input_layernorm.weight", "ln1.b": "input_layernorm.bias"}, d, s)
        if cfg.block.attn.qk_norm is not None:
            w.copy({"attn.q_norm.w": "self_attn.q_layernorm.weight", "attn.q_norm.b": "self_attn.q_layernorm.bias",
                    "attn.k_norm.w": "self_attn.k_layernorm.weight", "attn.k_norm.b": "self_attn.k_layernorm.bias"},
                   d, s)


def convert_phi3_lm(w: SourceWeights, cfg: LlamaConfig, src: str, dst: str, *, body: str | None = None,
                    head: str | None = None) -> None:
    """Phi-3's `{body}` (embed_tokens, layers, norm) and `head`; the fused projections are the hooked layouts."""
    body = body if body is not None else src + "model."
    head = head if head is not None else src + "lm_head.weight"
    w.copy({"embed.W_E": "embed_tokens.weight", "ln_final.w": "norm.weight"}, dst, body)
    w.put(dst + "unembed.weight", head)
    for i in range(cfg.n_layers):
        s, d = f"{body}layers.{i}.", f"{dst}blocks.{i}."
        w.copy({"attn.qkv_weight": "self_attn.qkv_proj.weight",  # [q; k; v] along the output dim, as hooked
                "attn.o_weight": "self_attn.o_proj.weight",
                "mlp.in_weight": "mlp.gate_up_proj.weight",  # [gate; up]: HF chunks it in this order
                "mlp.out_weight": "mlp.down_proj.weight",
                "ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight"}, d, s)
