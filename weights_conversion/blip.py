"""BLIP (captioning, VQA, ITM): HF config -> hooked config, HF state dict -> hooked state dict.

The ViT and BERT-layer tables here also serve InstructBLIP, whose vision tower and Q-Former share these layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig
from hooked_vlm.configs import BlipConfig
from hooked_vlm.towers.bert import TextConfig
from hooked_vlm.towers.vit import VisionConfig

from .registry import refuse, register_converter, require_type
from .state_dict import ConversionPlan, SourceWeights

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "quick_gelu": "quick_gelu", "silu": "silu", "relu": "relu"}


def activation(name: str, what: str = "activation") -> str:
    """hooked_vlm's name of the HF activation `name`; `what` says which config field it came from."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"the {what} {name!r} is not supported by hooked_vlm; supported: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def check_vision(vc: Any, supported: tuple[str, ...]) -> None:
    """A vision tower of a supported type, with the 3-channel patch embedding the hooked tower has."""
    require_type(vc, supported, "vision tower")
    channels = getattr(vc, "num_channels", 3)
    if channels != 3:
        refuse("vision tower", "num_channels", channels, "3 (RGB images)")


# ---------------------------------------------------------------------------------------------- configs
def vit_config(vc: Any, *, qkv_bias: bool = True) -> VisionConfig:
    """BLIP / InstructBLIP (EVA) vision tower: pre-LN, fused qkv, no pre-norm, post-norm on every token."""
    check_vision(vc, ("blip_vision_model", "instructblip_vision_model"))
    d_head = vc.hidden_size // vc.num_attention_heads
    block = BlockConfig(
        d_model=vc.hidden_size,
        attn=AttnConfig(vc.num_attention_heads, d_head, bias=qkv_bias),
        mlp=MLPConfig(vc.intermediate_size, act=activation(vc.hidden_act, "vision tower's hidden_act")),
        norm=NormConfig("layer", vc.layer_norm_eps),
        layout="pre",
    )
    return VisionConfig(vc.image_size, vc.patch_size, vc.num_hidden_layers, block, patch_bias=True, ln_pre=False,
                        ln_post=True)


def bert_block_config(tc: Any, *, cross: bool, kv_dim: int | None = None) -> BlockConfig:
    """A post-LN BERT layer; with `cross`, a cross-attention reading a sequence of width `kv_dim`."""
    H = tc.num_attention_heads
    d_head = tc.hidden_size // H
    return BlockConfig(
        d_model=tc.hidden_size,
        attn=AttnConfig(H, d_head),
        cross_attn=AttnConfig(H, d_head, cross=True, kv_dim=kv_dim) if cross else None,
        mlp=MLPConfig(tc.intermediate_size, act=activation(tc.hidden_act, f"{tc.model_type} hidden_act")),
        norm=NormConfig("layer", tc.layer_norm_eps),
        layout="post",
    )


def blip_text_config(tc: Any, *, causal: bool, lm_head: bool) -> TextConfig:
    # every BLIP text tower built with is_decoder=True has a cross-attention in each layer, the encoders included
    block = bert_block_config(tc, cross=bool(tc.is_decoder), kv_dim=tc.encoder_hidden_size)
    return TextConfig(tc.vocab_size, tc.max_position_embeddings, tc.num_hidden_layers, block, causal=causal,
                      lm_head=lm_head, head_act=activation(tc.hidden_act, "text model's hidden_act"))


def _blip_config(hf: Any, *, encoder: bool, decoder: bool, itm: bool, mask_cross_attention: bool = False
                 ) -> BlipConfig:
    tc = hf.text_config
    return BlipConfig(
        vision=vit_config(hf.vision_config),
        text_encoder=blip_text_config(tc, causal=False, lm_head=False) if encoder else None,
        text_decoder=blip_text_config(tc, causal=True, lm_head=True) if decoder else None,
        bos_token_id=tc.bos_token_id,
        pad_token_id=tc.pad_token_id,
        sep_token_id=tc.sep_token_id,
        itm_dim=hf.image_text_hidden_size if itm else None,
        mask_cross_attention=mask_cross_attention,
    )


def caption_config(hf: Any, **options: Any) -> BlipConfig:
    return _blip_config(hf, encoder=False, decoder=True, itm=False, **options)


def vqa_config(hf: Any, **options: Any) -> BlipConfig:
    return _blip_config(hf, encoder=True, decoder=True, itm=False, **options)


def itm_config(hf: Any, **options: Any) -> BlipConfig:
    return _blip_config(hf, encoder=True, decoder=False, itm=True, **options)


# ---------------------------------------------------------------------------------------------- weights
def convert_vit(w: SourceWeights, cfg: VisionConfig, src: str, dst: str) -> None:
    """BLIP/EVA vision tower: `{src}embeddings.*`, `{src}encoder.layers.{i}.*`, `{src}post_layernorm.*`."""
    w.put(dst + "class_embed", src + "embeddings.class_embedding", (-1,))
    w.put(dst + "W_pos", src + "embeddings.position_embedding", (cfg.n_tokens, -1))
    w.copy({"patch_embed.W_patch": "embeddings.patch_embedding.weight",
            "patch_embed.b_patch": "embeddings.patch_embedding.bias",
            "ln_post.w": "post_layernorm.weight", "ln_post.b": "post_layernorm.bias"}, dst, src)
    for i in range(cfg.n_layers):
        w.copy({
            "ln1.w": "layer_norm1.weight", "ln1.b": "layer_norm1.bias",
            "attn.qkv_weight": "self_attn.qkv.weight",  # columns already [q | k | v], heads contiguous
            "attn.qkv_bias": "self_attn.qkv.bias",
            "attn.o_weight": "self_attn.projection.weight", "attn.o_bias": "self_attn.projection.bias",
            "ln2.w": "layer_norm2.weight", "ln2.b": "layer_norm2.bias",
            "mlp.in_weight": "mlp.fc1.weight", "mlp.in_bias": "mlp.fc1.bias",
            "mlp.out_weight": "mlp.fc2.weight", "mlp.out_bias": "mlp.fc2.bias",
        }, f"{dst}blocks.{i}.", f"{src}encoder.layers.{i}.")


def convert_bert_attention(w: SourceWeights, dst: str, src: str, *, cross: bool, inner: str = "self") -> None:
    """One BERT attention (`{src}{inner}.{query,key,value}`, `{src}output.dense`) into a fused hooked attention."""
    q, k, v = (f"{src}{inner}.{name}" for name in ("query", "key", "value"))
    for kind in ("weight", "bias"):
        if cross:
            w.put(f"{dst}q_{kind}", f"{q}.{kind}")
            w.concat(f"{dst}kv_{kind}", [f"{k}.{kind}", f"{v}.{kind}"])
        else:
            w.concat(f"{dst}qkv_{kind}", [f"{q}.{kind}", f"{k}.{kind}", f"{v}.{kind}"])
        w.put(f"{dst}o_{kind}", f"{src}output.dense.{kind}")


def convert_bert_layer(w: SourceWeights, cfg: BlockConfig, dst: str, src: str, *, attn_inner: str = "self",
                       mlp_names: tuple[str, str] = ("intermediate", "output")) -> None:
    convert_bert_attention(w, dst + "attn.", src + "attention.", cross=False, inner=attn_inner)
    table = {"ln_attn.w": "attention.output.LayerNorm.weight", "ln_attn.b": "attention.output.LayerNorm.bias"}
    if cfg.cross_attn is not None:
        convert_bert_attention(w, dst + "cross_attn.", src + "crossattention.", cross=True, inner=attn_inner)
        table |= {"ln_cross.w": "crossattention.output.LayerNorm.weight",
                  "ln_cross.b": "crossattention.output.LayerNorm.bias"}
    up, down = mlp_names
    table |= {"mlp.in_weight": f"{up}.dense.weight", "mlp.in_bias": f"{up}.dense.bias",
              "mlp.out_weight": f"{down}.dense.weight", "mlp.out_bias": f"{down}.dense.bias",
              "ln_mlp.w": f"{down}.LayerNorm.weight", "ln_mlp.b": f"{down}.LayerNorm.bias"}
    w.copy(table, dst, src)


def convert_blip_text(w: SourceWeights, cfg: TextConfig, src: str, dst: str) -> None:
    """A BLIP text tower under `src` (`text_encoder.` or `text_decoder.bert.`)."""
    w.copy({"embed.W_E": "embeddings.word_embeddings.weight",
            "pos_embed.W_pos": "embeddings.position_embeddings.weight",
            "ln_embed.w": "embeddings.LayerNorm.weight", "ln_embed.b": "embeddings.LayerNorm.bias"}, dst, src)
    for i in range(cfg.n_layers):
        convert_bert_layer(w, cfg.block, f"{dst}blocks.{i}.", f"{src}encoder.layer.{i}.")


def convert_blip_lm_head(w: SourceWeights, dst: str, src: str) -> None:
    w.copy({"head.weight": "predictions.transform.dense.weight", "head.bias": "predictions.transform.dense.bias",
            "head.ln.w": "predictions.transform.LayerNorm.weight", "head.ln.b": "predictions.transform.LayerNorm.bias",
            "unembed.weight": "predictions.decoder.weight", "unembed.b_U": "predictions.bias"}, dst, src)
    w.drop(src + "predictions.decoder.bias", same_as=src + "predictions.bias")  # tied alias


def _convert_blip(state: Mapping[str, Tensor], cfg: BlipConfig, source: str) -> SourceWeights:
    w = SourceWeights(state, source)
    convert_vit(w, cfg.vision, "vision_model.", "vision.")
    if cfg.text_encoder is not None:
        convert_blip_text(w, cfg.text_encoder, "text_encoder.", "text_encoder.")
    if cfg.text_decoder is not None:
        convert_blip_text(w, cfg.text_decoder, "text_decoder.bert.", "text_decoder.")
        convert_blip_lm_head(w, "text_decoder.", "text_decoder.cls.")
    return w


@register_converter("BlipForConditionalGeneration", caption_config)
def convert_caption(state: Mapping[str, Tensor], cfg: BlipConfig) -> ConversionPlan:
    return _convert_blip(state, cfg, "BlipForConditionalGeneration").finish()


@register_converter("BlipForQuestionAnswering", vqa_config)
def convert_vqa(state: Mapping[str, Tensor], cfg: BlipConfig) -> ConversionPlan:
    return _convert_blip(state, cfg, "BlipForQuestionAnswering").finish()


@register_converter("BlipForImageTextRetrieval", itm_config)
def convert_itm(state: Mapping[str, Tensor], cfg: BlipConfig) -> ConversionPlan:
    w = _convert_blip(state, cfg, "BlipForImageTextRetrieval")
    w.copy({f"{m}.{k}": f"{m}.{k}" for m in ("itm_head", "vision_proj", "text_proj") for k in ("weight", "bias")})
    return w.finish()
