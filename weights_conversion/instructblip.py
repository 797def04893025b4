"""InstructBLIP (Vicuna/Llama or Flan-T5 LM): HF config -> hooked config, HF state dict -> hooked state dict.

The vision tower is BLIP's layout (`blip.convert_vit`); the Q-Former layers are BERT layers (`blip.convert_bert_layer`)
with a second FFN (`intermediate_query`/`output_query` for the queries, `intermediate`/`output` for the instruction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig
from hooked_vlm.configs import InstructBlipConfig
from hooked_vlm.towers.qformer import QFormerConfig
from hooked_vlm.towers.t5 import T5StackConfig

from .blip import activation, bert_block_config, convert_bert_layer, convert_vit, vit_config
from .generation import generation_tokens
from .llama import convert_llama_lm, llama_config  # the decoder-only LM, shared with LLaVA
from .registry import register_converter, require_type
from .state_dict import ConversionPlan, SourceWeights


# ---------------------------------------------------------------------------------------------- configs
def qformer_config(hf: Any) -> QFormerConfig:
    qc = hf.qformer_config
    block = bert_block_config(qc, cross=True, kv_dim=qc.encoder_hidden_size)
    return QFormerConfig(qc.vocab_size, qc.max_position_embeddings, qc.num_hidden_layers, hf.num_query_tokens,
                         block, qc.cross_attention_frequency)


# encoder-decoder LMs whose forward the hooked T5 stacks reproduce (parity: test_instructblip.py); mT5, UMT5, BART
# and the rest are refused
ENCODER_DECODER_LMS = ("t5",)


def t5_stack_config(tc: Any, *, decoder: bool) -> T5StackConfig:
    """Pre-LN RMS blocks without biases; attention unscaled (T5 folds 1/sqrt(d) into its init). The HF T5 forward
    reads d_model, d_kv, d_ff, num_heads, the layer counts, feed_forward_proj (dense_act_fn, is_gated_act),
    layer_norm_epsilon, the relative-attention buckets and scale_decoder_outputs: all taken here."""
    require_type(tc, ENCODER_DECODER_LMS, "encoder-decoder language model")
    attn = AttnConfig(tc.num_heads, tc.d_kv, bias=False, out_bias=False, scale=1.0)
    block = BlockConfig(
        d_model=tc.d_model,
        attn=attn,
        cross_attn=replace(attn, cross=True) if decoder else None,
        mlp=MLPConfig(tc.d_ff, act=activation(tc.dense_act_fn, "language model's dense_act_fn"), gated=tc.is_gated_act,
                      bias=False),
        norm=NormConfig("rms", tc.layer_norm_epsilon, upcast_input=False),  # T5LayerNorm
        layout="pre",
        clamp_half_overflow=True,  # T5Block clamps float16 overflows after each sub-layer
    )
    n_layers = tc.num_decoder_layers if decoder else tc.num_layers
    return T5StackConfig(tc.vocab_size, n_layers, block, decoder=decoder, n_buckets=tc.relative_attention_num_buckets,
                         max_distance=tc.relative_attention_max_distance,
                         scale_outputs=decoder and bool(getattr(tc, "scale_decoder_outputs", False)))


def instructblip_config(hf: Any, *, hf_positions: bool = False) -> InstructBlipConfig:
    tc = hf.text_config
    # the language model first: its type decides whether anything below can be reproduced
    if hf.use_decoder_only_language_model:
        lm = dict(lm=llama_config(tc))
    else:
        lm = dict(lm_encoder=t5_stack_config(tc, decoder=False), lm_decoder=t5_stack_config(tc, decoder=True),
                  decoder_start_token_id=_decoder_start(tc))
    require_type(hf.qformer_config, ("instructblip_qformer",), "Q-Former")
    if hf.image_token_id is None:
        raise ValueError("this InstructBLIP config has no image_token_id (image_token_index): the model cannot tell "
                         "where the image goes in the prompt; set it to the id of the tokenizer's <image> token")
    vision = vit_config(hf.vision_config, qkv_bias=getattr(hf.vision_config, "qkv_bias", True))
    d_lm = tc.hidden_size if hasattr(tc, "hidden_size") else tc.d_model
    keep = KEEP_IN_FLOAT32 + (() if hf.use_decoder_only_language_model else T5_KEEP_IN_FLOAT32)
    return InstructBlipConfig(vision=vision, qformer=qformer_config(hf), d_lm=d_lm, image_token_id=hf.image_token_id,
                              hf_positions=hf_positions, keep_in_float32=keep, **generation_tokens(hf), **lm)


# What transformers keeps in float32 when it loads these models in float16 (never in bfloat16), as hooked names.
# HF lists module names (`_keep_in_fp32_modules`: InstructBlipForConditionalGeneration's "query_tokens", T5's "wo",
# the 8-bit fix of transformers#20287) and, since 5.0, matches them as an unanchored regex over the weight names
# (core_model_loading.build_glob_alternation, `.search`): "wo" also catches the Q-Former's `word_embeddings`, which
# then stays float32 too. These lists reproduce what HF does, checked against HF's own load in
# tests/test_half_precision.py.
KEEP_IN_FLOAT32 = ("qformer.query_tokens",)
T5_KEEP_IN_FLOAT32 = ("lm_encoder.blocks.*.mlp.out_weight", "lm_decoder.blocks.*.mlp.out_weight",
                      "qformer.embed.W_E")


def _decoder_start(tc: Any) -> int:
    # T5 starts the decoder from the pad token; configs written without the field mean that
    start = getattr(tc, "decoder_start_token_id", None)
    start = tc.pad_token_id if start is None else start
    return 0 if start is None else start


# ---------------------------------------------------------------------------------------------- weights
def convert_qformer(w: SourceWeights, cfg: QFormerConfig, src: str, dst: str) -> None:
    w.copy({"embed.W_E": "embeddings.word_embeddings.weight",
            "pos_embed.W_pos": "embeddings.position_embeddings.weight",
            "ln_embed.w": "embeddings.layernorm.weight", "ln_embed.b": "embeddings.layernorm.bias"}, dst, src)
    for i in range(cfg.n_layers):
        block = cfg.block if cfg.has_cross_attn(i) else replace(cfg.block, cross_attn=None)
        d, s = f"{dst}blocks.{i}.", f"{src}encoder.layer.{i}."
        convert_bert_layer(w, block, d, s, attn_inner="attention", mlp_names=("intermediate_query", "output_query"))
        w.copy({"mlp_text.in_weight": "intermediate.dense.weight", "mlp_text.in_bias": "intermediate.dense.bias",
                "mlp_text.out_weight": "output.dense.weight", "mlp_text.out_bias": "output.dense.bias",
                "ln_mlp_text.w": "output.LayerNorm.weight", "ln_mlp_text.b": "output.LayerNorm.bias"}, d, s)


def convert_t5_stack(w: SourceWeights, cfg: T5StackConfig, src: str, dst: str) -> None:
    """`{src}block.{i}.layer.{0: self-attention, 1: cross-attention (decoder), last: FFN}`, `{src}final_layer_norm`."""
    w.copy({"rel_pos.W_bias": "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "ln_final.w": "final_layer_norm.weight"}, dst, src)
    ffn = 2 if cfg.decoder else 1
    for i in range(cfg.n_layers):
        d, s = f"{dst}blocks.{i}.", f"{src}block.{i}.layer."
        attn = f"{s}0.SelfAttention."
        w.concat(f"{d}attn.qkv_weight", [attn + "q.weight", attn + "k.weight", attn + "v.weight"])
        w.put(f"{d}attn.o_weight", attn + "o.weight")
        w.put(f"{d}ln1.w", f"{s}0.layer_norm.weight")
        if cfg.decoder:
            cross = f"{s}1.EncDecAttention."
            w.put(f"{d}cross_attn.q_weight", cross + "q.weight")
            w.concat(f"{d}cross_attn.kv_weight", [cross + "k.weight", cross + "v.weight"])
            w.put(f"{d}cross_attn.o_weight", cross + "o.weight")
            w.put(f"{d}ln_cross.w", f"{s}1.layer_norm.weight")
        mlp = f"{s}{ffn}.DenseReluDense."
        if cfg.block.mlp.gated:  # [gate; linear], as MLP keeps them
            w.concat(f"{d}mlp.in_weight", [mlp + "wi_0.weight", mlp + "wi_1.weight"])
        else:
            w.put(f"{d}mlp.in_weight", mlp + "wi.weight")
        w.put(f"{d}mlp.out_weight", mlp + "wo.weight")
        w.put(f"{d}ln2.w", f"{s}{ffn}.layer_norm.weight")


def convert_t5_lm(w: SourceWeights, cfg: InstructBlipConfig, src: str) -> None:
    w.put("lm_encoder.embed.W_E", src + "shared.weight")  # one HF tensor, a copy in each stack
    w.put("lm_decoder.embed.W_E", src + "shared.weight")
    w.drop(src + "encoder.embed_tokens.weight", same_as=src + "shared.weight")  # tied aliases
    w.drop(src + "decoder.embed_tokens.weight", same_as=src + "shared.weight")
    convert_t5_stack(w, cfg.lm_encoder, src + "encoder.", "lm_encoder.")
    convert_t5_stack(w, cfg.lm_decoder, src + "decoder.", "lm_decoder.")
    w.put("lm_decoder.unembed.weight", src + "lm_head.weight")


@register_converter("InstructBlipForConditionalGeneration", instructblip_config)
def convert_instructblip(state: Mapping[str, Tensor], cfg: InstructBlipConfig) -> ConversionPlan:
    w = SourceWeights(state, "InstructBlipForConditionalGeneration")
    convert_vit(w, cfg.vision, "vision_model.", "vision.")
    w.put("qformer.query_tokens", "query_tokens", (cfg.qformer.n_query, -1))
    convert_qformer(w, cfg.qformer, "qformer.", "qformer.")
    w.copy({"projector.weight": "language_projection.weight", "projector.bias": "language_projection.bias"})
    if cfg.is_encoder_decoder:
        convert_t5_lm(w, cfg, "language_model.")
    else:
        convert_llama_lm(w, cfg.lm, "language_model.", "lm.")
    return w.finish()
