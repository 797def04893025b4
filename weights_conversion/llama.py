"""Decoder-only LMs (Llama, Vicuna, Mistral-shaped): HF text config -> LlamaConfig, and the weight table. Used by
LLaVA and InstructBLIP-Vicuna."""

from __future__ import annotations

from typing import Any

from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig, RotaryConfig
from hooked_vlm.towers.llama import LlamaConfig

from .blip import activation
from .registry import refuse, require_type
from .state_dict import SourceWeights

# LM types whose forward the hooked Llama reproduces, each checked at parity with transformers (Llama: test_llava.py,
# test_instructblip.py; Mistral: test_llava.py::test_mistral_shaped_lm). Look-alikes are refused: Gemma scales the
# embeddings by sqrt(d) and its RMSNorm by 1 + w, Granite multiplies embeddings, residuals, scores and logits.
DECODER_LMS = ("llama", "mistral")


def llama_config(tc: Any) -> LlamaConfig:
    """Fields the HF Llama/Mistral forward reads (modeling_llama.py, modeling_mistral.py): sizes, head_dim,
    num_key_value_heads, hidden_act, rms_norm_eps, rope_parameters (default rope only), attention_bias, mlp_bias,
    sliding_window (Mistral); tied embeddings change only where lm_head is stored."""
    kind = require_type(tc, DECODER_LMS, "language model")

    def read(field: str, default: Any, only: str) -> Any:
        # a field that only the `only` type's forward reads: a stray copy in the other type's config changes nothing
        return getattr(tc, field, default) if kind == only else default

    rope = dict(getattr(tc, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":  # linear, dynamic, yarn, llama3, longrope... rescale the frequencies
        refuse("language model", "rope_type", rope_type, "'default' (the unscaled rotary embedding)")
    base = rope.get("rope_theta", getattr(tc, "rope_theta", 10_000.0))
    # Mistral's sliding window (HF: create_sliding_window_causal_mask whenever config.sliding_window is set)
    window = read("sliding_window", None, only="mistral")
    H = tc.num_attention_heads
    d_head = getattr(tc, "head_dim", None) or tc.hidden_size // H
    attn = AttnConfig(H, d_head, n_kv_heads=getattr(tc, "num_key_value_heads", None) or H,
                      bias=bool(read("attention_bias", False, only="llama")),
                      out_bias=bool(read("attention_bias", False, only="llama")),
                      softmax_fp32=True, rotary=RotaryConfig(float(base)))
    block = BlockConfig(tc.hidden_size, attn,
                        MLPConfig(tc.intermediate_size, act=activation(tc.hidden_act, "language model's hidden_act"),
                                  gated=True, bias=bool(read("mlp_bias", False, only="llama"))),
                        NormConfig("rms", tc.rms_norm_eps), layout="pre")
    return LlamaConfig(tc.vocab_size, tc.num_hidden_layers, block, sliding_window=window)


def convert_llama_lm(w: SourceWeights, cfg: LlamaConfig, src: str, dst: str, *, body: str | None = None,
                     head: str | None = None) -> None:
    """`{src}model.*` (embed_tokens, layers, norm) and `{src}lm_head.weight`; LLaVA's live model keeps the body at
    `model.language_model.` and the head at `lm_head.weight` (pass `body` and `head`)."""
    body = body if body is not None else src + "model."
    head = head if head is not None else src + "lm_head.weight"
    w.copy({"embed.W_E": "embed_tokens.weight", "ln_final.w": "norm.weight"}, dst, body)
    w.put(dst + "unembed.weight", head)
    bias = cfg.block.attn.bias
    for i in range(cfg.n_layers):
        s, d = f"{body}layers.{i}.", f"{dst}blocks.{i}."
        w.concat(d + "attn.qkv_weight", [f"{s}self_attn.{p}_proj.weight" for p in "qkv"])
        if bias:
            w.concat(d + "attn.qkv_bias", [f"{s}self_attn.{p}_proj.bias" for p in "qkv"])
            w.put(d + "attn.o_bias", s + "self_attn.o_proj.bias")
        w.concat(d + "mlp.in_weight", [s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"])  # [gate; linear]
        if cfg.block.mlp.bias:
            w.concat(d + "mlp.in_bias", [s + "mlp.gate_proj.bias", s + "mlp.up_proj.bias"])
            w.put(d + "mlp.out_bias", s + "mlp.down_proj.bias")
        w.copy({"attn.o_weight": "self_attn.o_proj.weight", "mlp.out_weight": "mlp.down_proj.weight",
                "ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight"}, d, s)
