"""Offline builders of tiny, randomly initialised Hugging Face reference models.

Everything here is built from in-memory configs, vocabularies and tokenizers: no network, no files,
no checkpoints. **The weights are random** (seeded), so the models produce gibberish; they exist to

* parity-test the hooked reimplementations against HF transformers (same weights, same inputs,
  compare logits and intermediate activations),
* give the demo and the CLI something to run on a machine without the real checkpoints,
* exercise every code path cheaply (padding, cross-attention / no-cross-attention Q-Former layers,
  Llama and T5 language models, GQA, LLaVA feature-layer selection).

Builders (each returns ``(hf_model, processor)``, model in eval mode, float32, eager attention):

* :func:`build_blip` -- ``BlipForConditionalGeneration`` / ``BlipForQuestionAnswering`` /
  ``BlipForImageTextRetrieval`` + ``BlipProcessor``
* :func:`build_llava` -- ``LlavaForConditionalGeneration`` (CLIP + projector + Llama) + ``LlavaProcessor``
* :func:`build_instructblip` -- ``InstructBlipForConditionalGeneration`` with a Llama or T5 LM +
  ``InstructBlipProcessor``
* :func:`build_llava_phi` -- ``LlavaForConditionalGeneration`` with a Phi-2 or Phi-3 LM + ``LlavaProcessor``
* :func:`build_llava_real_shapes`, :func:`build_blip_vqa_real_shapes`, :func:`build_instructblip_real_shapes`,
  :func:`build_instructblip_flan_t5_real_shapes` -- the real checkpoints' widths, heads, vocabularies, token ids and
  processor settings, with the LMs (and EVA's 39 layers) cut to a few layers; ``meta=True`` builds them on the meta
  device (shapes only, no memory)

By default every parameter is overwritten by :func:`randomize_parameters_`: HF's own init leaves
LayerNorms at 1/0, biases at 0 and InstructBLIP's ``query_tokens`` at exactly 0, which hides bugs such
as a dropped bias or a swapped LayerNorm.

Tested with transformers 5.23 (see the version pin in pyproject.toml); several quirks worked around
below are specific to the 5.x API.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    T5Config,
    T5Tokenizer,
)
from transformers.tokenization_utils_base import AddedToken

from .processors import qwen2_vl_processor

__all__ = [
    "WORDS",
    "SENTENCES",
    "random_image",
    "make_bert_tokenizer",
    "make_llama_tokenizer",
    "make_t5_tokenizer",
    "randomize_parameters_",
    "build_blip",
    "build_llava",
    "build_instructblip",
    "build_llava_real_shapes",
    "build_blip_vqa_real_shapes",
    "build_instructblip_real_shapes",
    "build_llava_phi",
    "build_instructblip_flan_t5_real_shapes",
]

WORDS = (
    "a an the picture photo image of with on in at is are what how many color cat cats dog dogs "
    "sitting sleeping couch table red blue green two three one yes no there man woman street car "
    "question answer describe this short caption user assistant"
).split()

SENTENCES = [
    "a picture of two cats sleeping on a couch",
    "what is the color of the car",
    "how many dogs are in the photo",
    "describe this image in a short caption",
    "USER: what is in the picture? ASSISTANT: a red car on the street",
    "there is a man and a woman at the table",
]

_BLIP_CLASSES = {
    "caption": BlipForConditionalGeneration,
    "cg": BlipForConditionalGeneration,  # alias, the HF doc name ("captioning generation")
    "vqa": BlipForQuestionAnswering,
    "itm": BlipForImageTextRetrieval,
}


# ----------------------------------------------------------------------------------------- images
def random_image(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    """A uniformly random RGB image of ``size = (width, height)`` (PIL order)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------- tokenizers
def _bert_base_layout(pieces: list[str]) -> dict[str, int]:
    """bert-base-uncased's 30,522-entry id layout: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, the
    ``pieces`` from 1996 (where its words start), every other id an ``[unusedN]`` placeholder no text produces."""
    ids = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    ids.update({piece: 1996 + i for i, piece in enumerate(pieces)})
    taken = set(ids.values())
    free = (i for i in range(30522) if i not in taken)
    ids.update({f"[unused{n}]": i for n, i in enumerate(free)})
    return ids


def make_bert_tokenizer(add_blip_special_tokens: bool = True, real_ids: bool = False) -> BertTokenizer:
    """WordPiece tokenizer over a tiny in-memory vocab (58 tokens with the BLIP specials, else 56).

    With ``add_blip_special_tokens`` it mirrors Salesforce BLIP: ``bos_token = "[DEC]"`` and an extra
    ``"[ENC]"`` (ids 30522/30523 in the real vocab, 56/57 here). The Q-Former tokenizer of InstructBLIP
    is a plain BERT tokenizer (``add_blip_special_tokens=False``). ``real_ids`` lays the same words out
    as bert-base-uncased's 30,522 ids (see :func:`_bert_base_layout`), so the special tokens get the real
    checkpoints' ids ([SEP] 102, [DEC] 30522).
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = WORDS + ["?", ".", ",", ":", "##s"]
    vocab = _bert_base_layout(pieces) if real_ids else {t: i for i, t in enumerate(specials + pieces)}
    # NB: pass the vocab as `vocab=` (a dict or a path); `vocab_file=path` silently builds a 5-token vocab in 5.x.
    tok = BertTokenizer(vocab=vocab)
    if add_blip_special_tokens:
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _bpe_merges(bpe_tokenizer: Any) -> list[tuple[str, str]]:
    merges = json.loads(bpe_tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def make_llama_tokenizer(image_token: str = "<image>", extra_vocab: int = 400,
                         base_vocab: int | None = None) -> LlamaTokenizer:
    """Llama-style byte-fallback BPE, trained on :data:`SENTENCES` with ``tokenizers``.

    Layout as in Llama: ``<unk>=0 <s>=1 </s>=2``, ``<0x00>..<0xFF> = 3..258``, then the learned pieces,
    then the added tokens ``image_token`` and ``<pad>`` (as in llava-hf: 32000, 32001). With the default
    ``extra_vocab=400`` the vocab has 439 entries (``<image>`` 437, ``<pad>`` 438). Pads on the left.
    ``base_vocab=32000`` fills the vocabulary up to Llama's 32,000 pieces with ``<unusedN>`` placeholders (no
    merge produces them), so the added tokens get llava-hf's ids 32000 and 32001.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # split=True so merges never cross word boundaries (sentencepiece-like "▁word" pieces).
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=259 + extra_vocab,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?.,:!'▁"),
        show_progress=False,
    )
    bpe.train_from_iterator(SENTENCES * 5, trainer=trainer)
    vocab = bpe.get_vocab()
    if base_vocab is not None:
        if base_vocab < len(vocab):
            raise ValueError(f"base_vocab={base_vocab} is below the {len(vocab)} pieces learned; pass at least that")
        vocab.update({f"<unused{i}>": i for i in range(len(vocab), base_vocab)})
    # 5.x: LlamaTokenizer is the tokenizers-backed class, and add_bos_token defaults to False: pass it.
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=_bpe_merges(bpe),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
    )
    # normalized=False: otherwise the Metaspace normaliser rewrites the token and it is split into pieces.
    tok.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def make_t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer from an in-memory (piece, score) list (80 tokens; pad 0, eos 1, unk 2)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - i * 0.01) for i, w in enumerate(WORDS)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz?.,:"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


# ----------------------------------------------------------------------------------------- weights
def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name


@torch.no_grad()
def randomize_parameters_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter of ``model`` in place with seeded noise; returns ``model``.

    Norm weights (``nn.LayerNorm`` and any module whose class name contains ``LayerNorm`` or
    ``RMSNorm``, e.g. ``T5LayerNorm``, ``LlamaRMSNorm``) get ``1 + std * randn``; every other parameter,
    norm biases and InstructBLIP's ``query_tokens`` included, gets ``std * randn``. Each unique tensor is
    drawn once, so tied parameters stay tied. Deterministic for a given seed and model structure; the
    global torch RNG is not touched.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():  # deterministic registration order
        norm = _is_norm(module)
        for pname, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            if norm and pname == "weight":
                noise += 1.0
            param.copy_(noise.to(device=param.device, dtype=param.dtype))
    return model


def _finish(model: torch.nn.Module, seed: int, randomize: bool, eager: bool = True,
            std: float = 0.1) -> torch.nn.Module:
    if eager:
        # Default is sdpa, which silently returns no attention maps for output_attentions=True.
        # This call propagates to every sub-config (vision, Q-Former, LM).
        model.set_attn_implementation("eager")
    if randomize:
        randomize_parameters_(model, seed=seed, std=std)
    return model.float().eval()


def _init_model(cls: type, cfg: Any, seed: int, meta: bool = False) -> torch.nn.Module:
    if meta:  # shapes only: no memory, no init (a real-sized converter check)
        with torch.device("meta"):
            return cls(cfg)
    # HF init draws from the global RNG: seed it, but restore the caller's RNG state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


# ----------------------------------------------------------------------------------------- BLIP
def _blip_config(
    tok: BertTokenizer,
    *,
    vis_hidden: int = 64,
    txt_hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch: int = 8,
    inter_mult: int = 2,
) -> BlipConfig:
    text = BlipTextConfig(
        vocab_size=len(tok),
        hidden_size=txt_hidden,
        intermediate_size=txt_hidden * inter_mult,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,  # [DEC]
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,  # BLIP generation stops on [SEP]
        projection_dim=32,
    )
    vision = BlipVisionConfig(
        hidden_size=vis_hidden,
        intermediate_size=vis_hidden * inter_mult,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    # BlipConfig.__post_init__ sets text_config.encoder_hidden_size = vision hidden size (cross-attn K/V).
    return BlipConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=32,
        image_text_hidden_size=32,
    )


def build_blip(kind: str = "caption", seed: int = 0, randomize: bool = True, **cfg_kw: Any):
    """Tiny BLIP of ``kind`` ``"caption"`` (alias ``"cg"``), ``"vqa"`` or ``"itm"`` + ``BlipProcessor``.

    ``cfg_kw``: ``vis_hidden=64, txt_hidden=64, layers=2, heads=4, image_size=32, patch=8, inter_mult=2``.
    VQA needs ``vis_hidden == txt_hidden`` (the HF decoder's cross-attention is sized by the vision width
    but attends to the question encoder). Returns ``(model, processor)``.
    """
    if kind not in _BLIP_CLASSES:
        raise ValueError(f"kind must be one of {sorted(_BLIP_CLASSES)}, got {kind!r}")
    if kind == "vqa" and cfg_kw.get("vis_hidden", 64) != cfg_kw.get("txt_hidden", 64):
        raise ValueError("BLIP VQA needs vis_hidden == txt_hidden (HF sizes decoder cross-attn by the vision width)")
    tok = make_bert_tokenizer()
    cfg = _blip_config(tok, **cfg_kw)
    model = _init_model(_BLIP_CLASSES[kind], cfg, seed)
    # BLIP is eager-only (sdpa/flex raise), so no attention switch is needed.
    model = _finish(model, seed, randomize, eager=False)
    s = cfg.vision_config.image_size
    # The *Pil image processor: the default class needs torchvision and only falls back with a warning.
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": s, "width": s}), tokenizer=tok)
    return model, processor


# ----------------------------------------------------------------------------------------- LLaVA
def build_llava(
    seed: int = 0,
    randomize: bool = True,
    *,
    vis_hidden: int = 32,
    lm_hidden: int = 64,
    vis_layers: int = 3,
    lm_layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    image_size: int = 32,
    patch: int = 8,
    inter_mult: int = 2,
    vision_feature_layer: int | Sequence[int] = -2,
    vision_feature_select_strategy: str = "default",
):
    """Tiny LLaVA-1.5 (CLIP vision + 2-layer GELU projector + Llama) + ``LlavaProcessor``.

    ``vis_layers=3`` so that the default feature layer -2 is neither the first nor the last.
    ``kv_heads`` < ``heads`` gives grouped-query attention. ``vision_feature_layer`` may be a list
    (features concatenated along channels); ``vision_feature_select_strategy`` is ``"default"`` (drop
    CLS) or ``"full"``, and the processor uses the same strategy. Returns ``(model, processor)``.
    """
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got "
                         f"{vision_feature_select_strategy!r}")
    tok = make_llama_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vis_hidden,
        intermediate_size=vis_hidden * inter_mult,
        num_hidden_layers=vis_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )  # hidden_act defaults to quick_gelu, as in CLIP ViT-L/14
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=lm_hidden,
        intermediate_size=lm_hidden * inter_mult,
        num_hidden_layers=lm_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if not isinstance(vision_feature_layer, int):
        vision_feature_layer = list(vision_feature_layer)
    n_image_tokens = (image_size // patch) ** 2 + (vision_feature_select_strategy == "full")
    cfg = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_image_tokens,  # informational only: unused by the 5.x model and processor
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    model = _finish(_init_model(LlavaForConditionalGeneration, cfg, seed), seed, randomize)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # num_additional_image_tokens defaults to 0 in 5.x, which inserts one <image> too few with
    # "default" (CLS dropped): real llava-hf processors set 1 (the CLS position).
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    return model, processor


# ----------------------------------------------------------------------------------------- InstructBLIP
def build_instructblip(
    lm: str = "llama",
    seed: int = 0,
    randomize: bool = True,
    *,
    vis_hidden: int = 32,
    qf_hidden: int = 32,
    lm_hidden: int = 64,
    layers: int = 2,
    qf_layers: int = 2,
    heads: int = 4,
    image_size: int = 32,
    patch: int = 8,
    num_query_tokens: int = 4,
    cross_freq: int = 2,
    inter_mult: int = 2,
):
    """Tiny InstructBLIP (BLIP vision + Q-Former + Llama or T5 LM) + ``InstructBlipProcessor``.

    ``lm="llama"``: decoder-only LM, processor pads left. ``lm="t5"``: encoder-decoder LM with an
    **untied** ``lm_head`` and ``scale_decoder_outputs=False`` (the flan-t5 layout), processor pads right.
    ``cross_freq=2`` with ``qf_layers=2``: layer 0 has cross-attention, layer 1 does not.
    Returns ``(model, processor)``.
    """
    if lm not in ("llama", "t5"):
        raise ValueError(f"lm must be 'llama' or 't5', got {lm!r}")
    qf_tok = make_bert_tokenizer(add_blip_special_tokens=False)
    if lm == "llama":
        lm_tok = make_llama_tokenizer()  # already holds <image> as a special AddedToken
    else:
        lm_tok = make_t5_tokenizer()
        lm_tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    # Add <image> ourselves *before* sizing the config: otherwise InstructBlipProcessor adds it and grows
    # the vocab behind the config's back. And never set `lm_tok.image_token = "<image>"` (a str): the 5.x
    # processor then crashes with "'str' object has no attribute 'content'".

    vision = InstructBlipVisionConfig(
        hidden_size=vis_hidden,
        intermediate_size=vis_hidden * inter_mult,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qf_tok),
        hidden_size=qf_hidden,
        intermediate_size=qf_hidden * inter_mult,
        num_hidden_layers=qf_layers,
        num_attention_heads=heads,
        cross_attention_frequency=cross_freq,
        max_position_embeddings=64,
        pad_token_id=qf_tok.pad_token_id,
    )
    if lm == "llama":
        text = LlamaConfig(
            vocab_size=len(lm_tok),
            hidden_size=lm_hidden,
            intermediate_size=lm_hidden * inter_mult,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=256,
            bos_token_id=lm_tok.bos_token_id,
            eos_token_id=lm_tok.eos_token_id,
            pad_token_id=lm_tok.pad_token_id,
        )
    else:
        # 5.x T5Config turns tie_word_embeddings=False into scale_decoder_outputs=False and then forces
        # tie_word_embeddings=True; the head is untied by hand below.
        text = T5Config(
            vocab_size=len(lm_tok),
            d_model=lm_hidden,
            d_kv=lm_hidden // heads,
            d_ff=lm_hidden * inter_mult,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            feed_forward_proj="gated-gelu",
            pad_token_id=lm_tok.pad_token_id,
            eos_token_id=lm_tok.eos_token_id,
            decoder_start_token_id=lm_tok.pad_token_id,
            tie_word_embeddings=False,
        )
    cfg = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        # Must be explicit: the default None crashes, and a wrong id silently drops the image.
        image_token_index=lm_tok.convert_tokens_to_ids("<image>"),
    )
    model = _init_model(InstructBlipForConditionalGeneration, cfg, seed)
    if lm == "t5":
        # A fresh 5.x T5 ties lm_head to `shared`; flan-t5 checkpoints have a separate lm_head. Untie so
        # converters and hooked models are tested on that layout (randomize_parameters_ then fills it).
        # Init like HF's _init_weights does for an untied T5 head (normal, std = initializer_factor).
        # Also drop the pair from the tied-keys maps, as from_pretrained does for a checkpoint whose head
        # differs from `shared`. An explicit model.tie_weights() would still re-tie (config says tied).
        lm_head = model.language_model.lm_head
        gen = torch.Generator().manual_seed(seed + 1)
        std = cfg.text_config.initializer_factor
        lm_head.weight = torch.nn.Parameter(torch.randn(lm_head.weight.shape, generator=gen) * std)
        model.language_model.all_tied_weights_keys.pop("lm_head.weight", None)
        model.all_tied_weights_keys.pop("language_model.lm_head.weight", None)
    model = _finish(model, seed, randomize)
    s = cfg.vision_config.image_size
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": s, "width": s}),
        tokenizer=lm_tok,
        qformer_tokenizer=qf_tok,
        num_query_tokens=cfg.num_query_tokens,  # must equal the config's
    )
    return model, processor


# ----------------------------------------------------------------------------------------- real checkpoint shapes
# The checkpoints' own widths, head counts, vocabularies, token ids, norms' eps and processor settings (from their
# config.json and preprocessor_config.json), with random weights and the LMs cut to `lm_layers` so that they fit a
# CPU. Weights get std 0.02 (HF's initializer_range) rather than 0.1: at width 4096 a 0.1 weight multiplies the
# stream's scale by ~6 per linear layer, which saturates every softmax and hides the errors a parity test looks for.
REAL_STD = 0.02
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, used by LLaVA-1.5, BLIP and InstructBLIP alike
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _real_model(cls: type, cfg: Any, seed: int, randomize: bool, meta: bool, eager: bool = True) -> torch.nn.Module:
    model = _init_model(cls, cfg, seed, meta=meta)
    return _finish(model, seed, randomize and not meta, eager=eager, std=REAL_STD)


def _vicuna_config(tok: LlamaTokenizer, *, vocab_size: int, layers: int, eps: float, max_positions: int) -> LlamaConfig:
    """Llama/Vicuna-7B's widths: d 4096, 32 heads of 128 (no grouped-query), MLP 11008, untied head."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max_positions,
                       rms_norm_eps=eps, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def build_llava_real_shapes(seed: int = 0, randomize: bool = True, *, vis_layers: int = 24, lm_layers: int = 2,
                            meta: bool = False):
    """``llava-hf/llava-1.5-7b-hf``'s shapes + ``LlavaProcessor``, the LM cut to ``lm_layers``.

    CLIP ViT-L/14 at 336 px (24 layers, d 1024, 16 heads, MLP 4096, quick_gelu, 577 positions), features from
    layer -2 without CLS: 576 image tokens on a 24 x 24 grid; projector 1024 -> 4096 -> 4096 (GELU, biases);
    Llama d 4096, 32 heads, MLP 11008, RMSNorm eps 1e-5, vocabulary 32064 with ``<image>`` 32000 and ``<pad>``
    32001, untied head. The processor resizes the shortest edge to 336 (bicubic), centre-crops 336 x 336 and
    normalises with CLIP's mean and std. About 1.0 B parameters (4 GB in float32) with the defaults.
    Returns ``(model, processor)``.
    """
    tok = make_llama_tokenizer(base_vocab=32000)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vis_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = _vicuna_config(tok, vocab_size=32064, layers=lm_layers, eps=1e-5, max_positions=4096)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = _real_model(LlavaForConditionalGeneration, cfg, seed, randomize, meta)
    image_processor = CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": 336}, resample=Image.Resampling.BICUBIC, do_center_crop=True,
        crop_size={"height": 336, "width": 336}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    return model, processor


def _blip_image_processor(size: int) -> BlipImageProcessorPil:
    """Salesforce's BLIP / InstructBLIP preprocessing: a bicubic resize to size x size (no crop), CLIP's mean/std."""
    return BlipImageProcessorPil(do_resize=True, size={"height": size, "width": size},
                                 resample=Image.Resampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
                                 do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def build_blip_vqa_real_shapes(seed: int = 0, randomize: bool = True, *, vis_layers: int = 12,
                               text_layers: int = 12, meta: bool = False):
    """``Salesforce/blip-vqa-base``'s shapes + ``BlipProcessor``: in full with the defaults (361 M parameters).

    ViT-B/16 at 384 px (d 768, 12 heads, MLP 3072, LN eps 1e-5, 577 positions); BERT-base question encoder and
    answer decoder (d 768, 12 heads, MLP 3072, LN eps 1e-12, 512 positions), vocabulary 30524 laid out as
    bert-base-uncased's with ``[DEC]`` 30522 (bos) and ``[ENC]`` 30523. ``vis_layers`` / ``text_layers`` cut the
    towers (each text tower gets ``text_layers``). Returns ``(model, processor)``.
    """
    tok = make_bert_tokenizer(real_ids=True)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=text_layers, num_attention_heads=12, max_position_embeddings=512,
                          layer_norm_eps=1e-12, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                          sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id, projection_dim=512)
    vision = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=vis_layers,
                              num_attention_heads=12, image_size=384, patch_size=16, layer_norm_eps=1e-5,
                              projection_dim=512)
    cfg = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=512,
                     image_text_hidden_size=256)
    model = _real_model(BlipForQuestionAnswering, cfg, seed, randomize, meta, eager=False)  # BLIP is eager-only
    return model, BlipProcessor(image_processor=_blip_image_processor(384), tokenizer=tok)


def build_instructblip_real_shapes(seed: int = 0, randomize: bool = True, *, vis_layers: int = 2,
                                   qf_layers: int = 12, lm_layers: int = 2, meta: bool = False):
    """``Salesforce/instructblip-vicuna-7b``'s shapes + ``InstructBlipProcessor``, EVA and Vicuna cut.

    EVA ViT-g/14 at 224 px (d 1408, 16 heads, MLP 6144, LN eps 1e-6, qkv biases, 257 positions) cut from 39 to
    ``vis_layers``; the Q-Former in full (12 layers, d 768, 12 heads, MLP 3072, cross-attention to width 1408
    every 2nd layer, 32 query tokens, vocabulary 30523: bert-base-uncased's plus ``[DEC]``); Vicuna-7B (d 4096,
    32 heads, MLP 11008, RMSNorm eps 1e-6) cut to ``lm_layers``. The LM vocabulary is Vicuna's 32,000 pieces plus
    ``<image>`` 32000 and ``<pad>`` 32001 (a layout of our own: the checkpoint's added tokens may be numbered
    differently). Images are resized to 224 x 224 (bicubic) and normalised with CLIP's mean and std.
    Returns ``(model, processor)``.
    """
    qf_tok = make_bert_tokenizer(add_blip_special_tokens=False, real_ids=True)
    qf_tok.add_special_tokens({"bos_token": "[DEC]"})  # LAVIS's Q-Former tokenizer: 30523 entries
    lm_tok = make_llama_tokenizer(base_vocab=32000)
    vision = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=vis_layers,
                                      num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6,
                                      qkv_bias=True)
    qformer = InstructBlipQFormerConfig(vocab_size=len(qf_tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=qf_layers, num_attention_heads=12,
                                        cross_attention_frequency=2, encoder_hidden_size=1408,
                                        max_position_embeddings=512, layer_norm_eps=1e-12,
                                        pad_token_id=qf_tok.pad_token_id)
    text = _vicuna_config(lm_tok, vocab_size=len(lm_tok), layers=lm_layers, eps=1e-6, max_positions=2048)
    cfg = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=32,
                             image_token_index=lm_tok.convert_tokens_to_ids("<image>"))
    model = _real_model(InstructBlipForConditionalGeneration, cfg, seed, randomize, meta)
    processor = InstructBlipProcessor(image_processor=_blip_image_processor(224), tokenizer=lm_tok,
                                      qformer_tokenizer=qf_tok, num_query_tokens=32)
    return model, processor


# ----------------------------------------------------------------------------------------- LLaVA with Phi LMs
def build_llava_phi(
    lm: str = "phi",
    seed: int = 0,
    randomize: bool = True,
    *,
    lm_hidden: int = 80,
    lm_layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    inter_mult: int = 2,
    partial_rotary_factor: float | None = None,
    qk_layernorm: bool = False,
    sliding_window: int | None = None,
    rope_parameters: dict | None = None,
    rope_theta: float = 10_000.0,
    lm_inter: int | None = None,
    lm_act: str | None = None,
    norm_eps: float = 1e-5,
    tie_word_embeddings: bool = False,
    head_dim: int | None = None,
    **llava_kw: Any,
):
    """Tiny LLaVA whose ``text_config`` is Phi-2 (``lm="phi"``, ``PhiConfig``) or Phi-3 (``lm="phi3"``,
    ``Phi3Config``), with :func:`build_llava`'s CLIP tower, projector, tokenizer and processor (``llava_kw``: its
    vision options). Every parameter is randomised, LayerNorm weights and biases included.

    ``partial_rotary_factor`` defaults to 0.4 for Phi-2 (Phi-2's own: with ``lm_hidden=80`` and 4 heads, 8 of each
    head's 20 dims rotate) and 1.0 for Phi-3 (Phi-3-mini's). ``qk_layernorm`` (Phi-2 only) adds HF's per-head q/k
    LayerNorms; ``sliding_window`` (Phi-3 only; Phi-3-mini-4k has 2047); ``rope_parameters`` replaces the rotary
    settings entirely (e.g. a longrope dict, to check that it is refused). ``lm_inter`` sets the MLP width (default
    ``lm_hidden * inter_mult``), ``lm_act`` the MLP activation (default gelu_new for Phi-2, silu for Phi-3),
    ``norm_eps`` the LayerNorm (Phi-2) or RMSNorm (Phi-3) eps, ``head_dim`` a head width other than
    ``lm_hidden // heads`` (HF reads it where set). Returns ``(model, processor)``.
    """
    from transformers import Phi3Config, PhiConfig  # only this builder needs them

    if lm not in ("phi", "phi3"):
        raise ValueError(f"lm must be 'phi' (Phi-2) or 'phi3' (Phi-3), got {lm!r}")
    # the vision side and processor of the Llama builder; its LM is replaced below
    vision_src, processor = build_llava(seed, randomize=False, lm_layers=1, heads=heads, **llava_kw)
    tok = processor.tokenizer
    factor = partial_rotary_factor if partial_rotary_factor is not None else (0.4 if lm == "phi" else 1.0)
    rope = rope_parameters or {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": factor}
    common = dict(vocab_size=len(tok), hidden_size=lm_hidden, intermediate_size=lm_inter or lm_hidden * inter_mult,
                  num_hidden_layers=lm_layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                  max_position_embeddings=512, rope_parameters=rope, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  hidden_act=lm_act or ("gelu_new" if lm == "phi" else "silu"))
    if head_dim is not None:
        common["head_dim"] = head_dim
    if lm == "phi":
        text = PhiConfig(**common, qk_layernorm=qk_layernorm, layer_norm_eps=norm_eps)
    else:
        if qk_layernorm:
            raise ValueError("qk_layernorm is a Phi-2 option; Phi-3 has none")
        text = Phi3Config(**common, sliding_window=sliding_window, original_max_position_embeddings=512,
                          rms_norm_eps=norm_eps)
    src = vision_src.config
    cfg = LlavaConfig(vision_config=src.vision_config.to_dict(), text_config=text.to_dict(),
                      image_token_index=src.image_token_id, image_seq_length=src.image_seq_length,
                      vision_feature_layer=src.vision_feature_layer,
                      vision_feature_select_strategy=src.vision_feature_select_strategy, projector_hidden_act="gelu",
                      tie_word_embeddings=tie_word_embeddings)
    model = _finish(_init_model(LlavaForConditionalGeneration, cfg, seed), seed, randomize)
    return model, processor


# ----------------------------------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                       "<|video_pad|>")


def make_qwen_tokenizer() -> LlamaTokenizer:
    """A byte-fallback BPE (:func:`make_llama_tokenizer`) with Qwen2-VL's special tokens added (``<|image_pad|>``,
    ``<|vision_start|>``, ...): Qwen2VLProcessor finds ``<|image_pad|>`` by name and expands it. Pads on the left."""
    tok = make_llama_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    return tok


def qwen_processor(tok: LlamaTokenizer, *, patch: int, merge: int = 2, temporal: int = 2, min_pixels: int = 16 * 16,
                   max_pixels: int = 48 * 48):
    """``Qwen2VLProcessor`` from the PIL image processor and ``tok``, without a video processor: the default one
    imports torchvision, which is not installed. HF's own processor code still expands each ``<|image_pad|>`` into
    the image's merged-token count. Images are resized to multiples of ``patch * merge`` within the pixel budget."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch, merge_size=merge,
        temporal_patch_size=temporal)
    return qwen2_vl_processor(image_processor, tok)


def build_qwen2_vl(
    seed: int = 0,
    randomize: bool = True,
    *,
    version: str = "2",
    vis_hidden: int = 32,
    lm_hidden: int = 64,
    vis_layers: int = 3,
    lm_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    patch: int = 4,
    merge: int = 2,
    mrope_section: Sequence[int] = (2, 3, 3),
    window_size: int = 16,
    fullatt_block_indexes: Sequence[int] = (1,),
    vis_heads: int | None = None,
    vis_inter: int | None = None,
    vis_act: str | None = None,
    vis_rope_theta: float = 10_000.0,
    temporal: int = 2,
    lm_inter: int | None = None,
    lm_act: str = "silu",
    rope_theta: float = 10_000.0,
    rms_norm_eps: float = 1e-5,
    tie_word_embeddings: bool = False,
    use_sliding_window: bool = False,
    rope_parameters: dict | None = None,
    min_pixels: int = 16 * 16,
    max_pixels: int = 48 * 48,
):
    """Tiny Qwen2-VL (``version="2"``) or Qwen2.5-VL (``version="2.5"``) + a ``Qwen2VLProcessor`` (see
    :func:`qwen_processor`). The LM has grouped-query heads (``kv_heads``), q/k/v biases and multimodal rotary
    sections ``mrope_section`` (summing to d_head / 2); Qwen2.5's vision tower attends within windows of
    ``window_size`` pixels except in ``fullatt_block_indexes``. Returns ``(model, processor)``.

    Further knobs (defaults as before): ``vis_heads`` (default ``heads``), ``vis_inter`` (the vision MLP width,
    default ``2 * vis_hidden``; Qwen2-VL's ``mlp_ratio`` is ``vis_inter / vis_hidden`` and must be a whole number),
    ``vis_act`` (default HF's: quick_gelu for Qwen2-VL, silu for Qwen2.5-VL), ``vis_rope_theta``, ``temporal``
    (``temporal_patch_size``), ``lm_inter`` (default ``2 * lm_hidden``), ``lm_act``, ``rope_theta``,
    ``rms_norm_eps``, ``tie_word_embeddings``, ``use_sliding_window`` and ``rope_parameters`` (replaces the LM's
    rotary settings, e.g. a scaled rope to check that it is refused), and the processor's ``min_pixels`` /
    ``max_pixels``."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    tok = make_qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    rope = rope_parameters or {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)}
    text = dict(vocab_size=len(tok), hidden_size=lm_hidden, intermediate_size=lm_inter or lm_hidden * 2,
                num_hidden_layers=lm_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=512, rope_parameters=rope, hidden_act=lm_act, rms_norm_eps=rms_norm_eps,
                use_sliding_window=use_sliding_window, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vis_inter = vis_inter or vis_hidden * 2
    common = dict(depth=vis_layers, num_heads=vis_heads or heads, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=temporal, rope_parameters={"rope_type": "axial", "rope_theta": vis_rope_theta})
    if vis_act is not None:
        common["hidden_act"] = vis_act
    if version == "2":
        if vis_inter % vis_hidden:
            raise ValueError(f"Qwen2-VL sizes the vision MLP by a whole mlp_ratio: vis_inter={vis_inter} must be a "
                             f"multiple of vis_hidden={vis_hidden}")
        vision = dict(embed_dim=vis_hidden, hidden_size=lm_hidden, mlp_ratio=vis_inter // vis_hidden, **common)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **ids)
        cls = Qwen2VLForConditionalGeneration
    else:
        vision = dict(hidden_size=vis_hidden, out_hidden_size=lm_hidden, intermediate_size=vis_inter,
                      window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes), **common)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    model = _finish(_init_model(cls, cfg, seed), seed, randomize)
    return model, qwen_processor(tok, patch=patch, merge=merge, temporal=temporal, min_pixels=min_pixels,
                                 max_pixels=max_pixels)


# ----------------------------------------------------------------------------------------- InstructBLIP-Flan-T5-XL shapes
def _flan_t5_tokenizer() -> T5Tokenizer:
    """Flan-T5's layout: 32,000 Unigram pieces (pad 0, eos 1, unk 2; our words, then ``<unusedN>`` fillers that no
    text segments into), the 100 ``<extra_id_N>`` sentinels at 32000-32099, and ``<image>`` added at 32100 (as in
    ``Salesforce/instructblip-flan-t5-xl``'s processor). Pads on the right."""
    pieces = _t5_pieces()
    pieces += [(f"<unused{i}>", -100.0) for i in range(len(pieces), 32000)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=100)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tok


def _t5_pieces() -> list[tuple[str, float]]:
    # the (piece, score) list of make_t5_tokenizer, which the tokenizer does not hand back with its scores
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - i * 0.01) for i, w in enumerate(WORDS)]
    return pieces + [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz?.,:"]


def build_instructblip_flan_t5_real_shapes(seed: int = 0, randomize: bool = True, *, vis_layers: int = 2,
                                           qf_layers: int = 12, lm_layers: int = 2, meta: bool = False):
    """``Salesforce/instructblip-flan-t5-xl``'s shapes + ``InstructBlipProcessor``, EVA and Flan-T5 cut.

    The vision tower and Q-Former as :func:`build_instructblip_real_shapes` (EVA ViT-g/14 at 224 px cut to
    ``vis_layers``; the Q-Former in full, 32 queries); Flan-T5-XL (d_model 2048, 32 heads of d_kv 64, d_ff 5120,
    gated-gelu, RMS eps 1e-6, 32 relative-attention buckets up to distance 128, vocabulary 32128, untied
    ``lm_head``, no decoder-output scaling) with encoder and decoder cut to ``lm_layers`` each. Tokenizer: Flan-T5's
    layout (:func:`_flan_t5_tokenizer`), ``<image>`` 32100 as the config's ``image_token_index``. Images are resized
    to 224 x 224 (bicubic) and normalised with CLIP's mean and std. Returns ``(model, processor)``.
    """
    qf_tok = make_bert_tokenizer(add_blip_special_tokens=False, real_ids=True)
    qf_tok.add_special_tokens({"bos_token": "[DEC]"})  # LAVIS's Q-Former tokenizer: 30523 entries
    lm_tok = _flan_t5_tokenizer()
    vision = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=vis_layers,
                                      num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6,
                                      qkv_bias=True)
    qformer = InstructBlipQFormerConfig(vocab_size=len(qf_tok), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=qf_layers, num_attention_heads=12,
                                        cross_attention_frequency=2, encoder_hidden_size=1408,
                                        max_position_embeddings=512, layer_norm_eps=1e-12,
                                        pad_token_id=qf_tok.pad_token_id)
    # 5.x T5Config turns tie_word_embeddings=False into scale_decoder_outputs=False (and ties; untied below)
    text = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=lm_layers,
                    num_decoder_layers=lm_layers, num_heads=32, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    cfg = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=32,
                             image_token_index=lm_tok.convert_tokens_to_ids("<image>"))
    model = _init_model(InstructBlipForConditionalGeneration, cfg, seed, meta=meta)
    # flan-t5's lm_head is its own tensor: untie it as build_instructblip does (randomised below with the rest)
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone())
    lm.all_tied_weights_keys.pop("lm_head.weight", None)
    model.all_tied_weights_keys.pop("language_model.lm_head.weight", None)
    model = _finish(model, seed, randomize and not meta, std=REAL_STD)
    processor = InstructBlipProcessor(image_processor=_blip_image_processor(224), tokenizer=lm_tok,
                                      qformer_tokenizer=qf_tok, num_query_tokens=32)
    return model, processor


__all__ += ["make_qwen_tokenizer", "qwen_processor", "build_qwen2_vl"]
