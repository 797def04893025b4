"""The offline tiny-model builders in hooked_vlm.tiny: they run, their processors pad as expected, and
randomize_parameters_ touches what HF init leaves degenerate while keeping tied weights tied."""

import pytest
import torch

from hooked_vlm.tiny import (
    build_blip,
    build_instructblip,
    build_llava,
    make_bert_tokenizer,
    make_llama_tokenizer,
    make_t5_tokenizer,
    random_image,
    randomize_parameters_,
)

IMAGES = [random_image((40, 30)), random_image((50, 50), seed=1)]
BLIP_TEXT = ["a picture of", "a photo of two cats"]  # different lengths -> padding
INSTR_TEXT = ["what is in the picture?", "describe"]
LLAVA_TEXT = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]

VARIANTS = ["blip-caption", "blip-vqa", "blip-itm", "llava", "instructblip-llama", "instructblip-t5"]


def _build(variant, **kw):
    if variant.startswith("blip-"):
        return build_blip(variant.split("-")[1], **kw)
    if variant == "llava":
        return build_llava(**kw)
    return build_instructblip(variant.split("-")[1], **kw)


def _inputs(variant, processor):
    text = BLIP_TEXT if variant.startswith("blip") else LLAVA_TEXT if variant == "llava" else INSTR_TEXT
    return processor(images=IMAGES, text=text, padding=True, return_tensors="pt")


@pytest.fixture(scope="module", params=VARIANTS)
def built(request):
    model, processor = _build(request.param)
    return request.param, model, processor


def test_tokenizers():
    bert = make_bert_tokenizer()
    assert len(bert) == 58 and bert.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [56, 57]
    assert bert.bos_token == "[DEC]"
    assert len(make_bert_tokenizer(add_blip_special_tokens=False)) == 56
    llama = make_llama_tokenizer()
    assert len(llama) == 439
    assert llama.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, 437, 438]
    ids = llama("USER: <image>\nhi").input_ids
    assert ids[0] == llama.bos_token_id and ids.count(437) == 1 and 3 + 0x0A in ids  # <s>, one <image>, <0x0A>
    assert llama.padding_side == "left"
    t5 = make_t5_tokenizer()
    assert len(t5) == 80 and (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)


def test_random_image():
    img = random_image((40, 30), seed=3)
    assert img.size == (40, 30) and img.mode == "RGB"
    assert img.tobytes() == random_image((40, 30), seed=3).tobytes()
    assert img.tobytes() != random_image((40, 30), seed=4).tobytes()


def test_processor_outputs(built):
    variant, model, processor = built
    inp = _inputs(variant, processor)
    assert inp["pixel_values"].shape == (2, 3, 32, 32)
    mask = inp["attention_mask"]
    assert inp["input_ids"].shape == mask.shape and mask.shape[0] == 2
    assert (mask == 0).any(), "the two prompts should need padding"
    if variant.startswith("blip"):
        assert set(inp) == {"input_ids", "attention_mask", "pixel_values"}
        assert mask[:, 0].all() and not mask[0, -1]  # right padding
    elif variant == "llava":
        assert set(inp) == {"input_ids", "attention_mask", "pixel_values"}
        assert mask[:, -1].all() and not mask[1, 0]  # left padding
        assert ((inp["input_ids"] == model.config.image_token_index).sum(1) == 16).all()  # 4x4 patches, no CLS
    else:
        nq = model.config.num_query_tokens
        assert set(inp) == {"input_ids", "attention_mask", "pixel_values", "qformer_input_ids",
                            "qformer_attention_mask"}
        assert (inp["input_ids"][:, :nq] == model.config.image_token_index).all()  # prepended after padding
        assert mask[:, :nq].all()
        assert not inp["qformer_attention_mask"].all()
        pad_at_end = not mask[1, -1]
        assert pad_at_end == (variant == "instructblip-t5")  # Llama pads left (after the images), T5 right


def test_forward_and_generate(built):
    variant, model, processor = built
    inp = _inputs(variant, processor)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        if variant == "blip-itm":
            assert model(**inp).itm_score.shape == (2, 2)
            assert model(**inp, use_itm_head=False).itm_score.shape == (2, 2)
            return
        if variant == "blip-vqa":
            out = model(**inp, decoder_input_ids=inp["input_ids"])  # 5.23: returns no logits
            assert out.image_embeds.shape == (2, 17, 64)  # CLS + 4x4 patches
        elif variant == "instructblip-t5":
            dec = torch.zeros(2, 3, dtype=torch.long)
            assert model(**inp, decoder_input_ids=dec).logits.shape == (2, 3, 81)
        else:
            logits = model(**inp).logits
            assert logits.shape[:2] == inp["input_ids"].shape and torch.isfinite(logits).all()
        # BLIP caption generate edits input_ids in place: hand it a copy
        out = model.generate(**{k: v.clone() for k, v in inp.items()}, max_new_tokens=3)
    assert out.shape[0] == 2 and out.shape[1] >= 2


def test_randomization_touches_degenerate_init():
    model, _ = build_instructblip("llama", seed=0)
    base, _ = build_instructblip("llama", seed=0, randomize=False)
    assert not base.query_tokens.any()  # HF init: exactly zero
    assert model.query_tokens.abs().min() > 0
    ln = model.vision_model.post_layernorm
    assert not base.vision_model.post_layernorm.bias.any() and ln.bias.abs().max() > 0
    assert (ln.weight != 1).all() and (ln.weight - 1).abs().max() < 1.0  # centred at 1
    rms = model.language_model.model.norm.weight
    assert (rms != 1).all() and abs(rms.mean().item() - 1) < 0.1
    qf_ln = model.qformer.embeddings.layernorm  # lowercase name, class nn.LayerNorm
    assert qf_ln.bias.abs().max() > 0 and (qf_ln.weight != 1).all()


def test_ties_kept_and_t5_head_untied():
    blip, _ = build_blip("caption")
    dec = blip.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
    t5, _ = build_instructblip("t5")
    lm = t5.language_model
    assert lm.encoder.embed_tokens.weight is lm.shared.weight is lm.decoder.embed_tokens.weight
    assert lm.lm_head.weight is not lm.shared.weight
    assert not torch.equal(lm.lm_head.weight, lm.shared.weight)
    assert lm.config.scale_decoder_outputs is False  # flan-t5 layout
    assert "lm_head.weight" not in lm.all_tied_weights_keys
    assert (lm.encoder.final_layer_norm.weight != 1).all()  # T5LayerNorm counts as a norm


@pytest.mark.parametrize("variant", ["blip-vqa", "instructblip-t5"])
def test_same_seed_same_weights(variant):
    a, b, c = _build(variant, seed=7)[0], _build(variant, seed=7)[0], _build(variant, seed=8)[0]
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vision_model.post_layernorm.bias"], sc["vision_model.post_layernorm.bias"])


def test_randomize_parameters_rule_and_rng():
    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(300))

    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.LayerNorm(300), RMSNorm())
    model[0].extra = model[1].bias  # a tie across modules: drawn once, stays tied
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    randomize_parameters_(model, seed=1, std=0.2)
    assert torch.equal(torch.rand(3), expected_next)  # uses its own generator
    assert model[0].extra is model[1].bias
    assert abs(model[0].weight.std().item() - 0.2) < 0.01 and abs(model[0].weight.mean().item()) < 0.01
    for w in (model[1].weight, model[2].weight):
        assert abs(w.mean().item() - 1) < 0.05 and abs(w.std().item() - 0.2) < 0.05
    assert abs(model[1].bias.mean().item()) < 0.05 and model[1].bias.std() > 0.1
    before = [p.clone() for p in model.parameters()]
    randomize_parameters_(model, seed=1, std=0.2)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_llava_options():
    model, processor = build_llava(vision_feature_select_strategy="full", vision_feature_layer=[-3, -2], kv_heads=2)
    assert model.config.vision_feature_select_strategy == processor.vision_feature_select_strategy == "full"
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * 32
    inp = processor(images=IMAGES, text=LLAVA_TEXT, padding=True, return_tensors="pt")
    assert ((inp["input_ids"] == model.config.image_token_index).sum(1) == 17).all()  # CLS kept
    with torch.no_grad():
        assert model(**inp).logits.shape[:2] == inp["input_ids"].shape


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_blip("nope")
    with pytest.raises(ValueError):
        build_blip("vqa", vis_hidden=32, txt_hidden=64)
    with pytest.raises(ValueError):
        build_instructblip("opt")
