"""The real checkpoints' shapes and processors: LLaVA-1.5-7B, BLIP-VQA-base, InstructBLIP-Vicuna-7B and
InstructBLIP-Flan-T5-XL, built offline with random weights by `hooked_vlm.tiny.build_*_real_shapes` (the LMs cut to
2 layers, or 2 + 2 for T5).

Half precision (slow): each 7B-shaped model and Flan-T5-XL in bfloat16 and float16, converted under HF's precision
rules (docs/weights.md, "Half precision") against HF's model in the same dtype, per block and at the logits; the
errors are printed (`-s`) as absolute and relative to HF's largest magnitude at each site.

Fast: every converter at real size on the meta device (each name and shape accounted for), the hooked configs'
real dimensions, the processors' real image sizes, crops, means and stds against a hand computation, and the
positions bookkeeping (576 image tokens on a 24 x 24 grid), and BLIP-VQA at real widths (2 layers a tower) at
parity with HF per layer. Slow (`@pytest.mark.slow`: minutes and up to 6.3 GB each; `-m "not slow"` leaves them
out): parity with HF per layer in float32 on the three real-shaped models, and in bfloat16 and float16 on BLIP-VQA's
real widths. Each docstring gives
the errors, time and peak memory measured on a shared 2-core CPU; float32 tolerances are about 3x those errors.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vlm import HookedVLM, names
from hooked_vlm.loading import float32_names, hooked_class, load_converted
from hooked_vlm.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    build_blip_vqa_real_shapes,
    build_instructblip_flan_t5_real_shapes,
    build_instructblip_real_shapes,
    build_llava_real_shapes,
    random_image,
)
from weights_conversion import converter_for


BUILDERS = {"llava": build_llava_real_shapes, "blip-vqa": build_blip_vqa_real_shapes,
            "instructblip": build_instructblip_real_shapes, "instructblip-t5": build_instructblip_flan_t5_real_shapes}
IMAGE = random_image((500, 400), seed=3)  # landscape: LLaVA's centre crop cuts 42 columns each side after resizing
LLAVA_PROMPT = "USER: <image>\nwhat is in the picture? ASSISTANT:"


def meta_model(family: str) -> tuple[HookedVLM, object, object]:
    """The hooked model converted from the real-shaped HF model on the meta device (no memory): the converter's
    plan and `load_converted` check every tensor's name and shape at the real sizes."""
    hf, processor = BUILDERS[family](meta=True)
    converter = converter_for(hf)
    cfg = converter.config(hf.config)
    with torch.device("meta"):
        model = hooked_class(converter)(cfg)
    state = hf.state_dict()
    load_converted(model, converter.plan(state, cfg).apply(state), f"real-shaped {family}")
    model.processor = processor
    return model, hf, processor


@pytest.fixture(scope="module")
def llava_meta():
    return meta_model("llava")


# ------------------------------------------------------------------------------------------ shapes, on meta
def test_llava_real_dimensions(llava_meta):
    model, hf, processor = llava_meta
    vision, lm = model.tower_info("vision"), model.tower_info("lm")
    assert tuple(model.cfg.feature_layers) == (23,)  # -2 of CLIP's 24 layers: blocks 0-22 run, 23 is never read
    assert (vision.n_layers, vision.n_heads, lm.n_layers, lm.n_heads) == (23, 16, 2, 32)  # layer 23 of 24 unused
    assert model.cfg.vision.image_size == 336 and model.cfg.vision.patch_size == 14 and model.cfg.vision.grid == 24
    assert model.cfg.tokens_per_image == 576
    assert model.vision.W_pos.shape == (577, 1024)
    assert model.lm.unembed.weight.shape == (32064, 4096)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] == [
        hf.config.image_token_id, hf.config.text_config.pad_token_id]


def test_blip_vqa_and_instructblip_real_dimensions():
    blip, hf, _ = meta_model("blip-vqa")
    assert [(blip.tower_info(t).n_layers, blip.tower_info(t).n_heads) for t in ("vision", "text_encoder",
                                                                                "text_decoder")] == [(12, 12)] * 3
    assert blip.vision.W_pos.shape == (577, 768)
    assert blip.processor.tokenizer.convert_tokens_to_ids(["[DEC]", "[SEP]", "[PAD]"]) == [30522, 102, 0]

    ib, hf, processor = meta_model("instructblip")
    qformer = ib.tower_info("qformer")
    assert (qformer.n_layers, qformer.n_heads, sum(qformer.has_cross_attn)) == (12, 12, 6)
    assert ib.cfg.qformer.n_query == 32 and ib.vision.W_pos.shape == (257, 1408)
    assert (ib.tower_info("vision").n_heads, ib.tower_info("lm").n_heads) == (16, 32)
    assert len(processor.qformer_tokenizer) == 30523


# ------------------------------------------------------------------------------------------ processors
def clip_pixels(image: Image.Image, resize: tuple[int, int], crop: tuple[int, int, int, int]) -> torch.Tensor:
    """The preprocessing by hand: bicubic resize to `resize` (w, h), crop (left, top, right, bottom), scale to
    [0, 1], normalise with CLIP's mean and std. [3, H, W]."""
    pixels = np.asarray(image.convert("RGB").resize(resize, Image.Resampling.BICUBIC).crop(crop), dtype=np.float32)
    pixels = (pixels / 255 - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.mark.parametrize("family,resize,crop", [
    ("llava", (420, 336), (42, 0, 378, 336)),  # shortest edge 400 -> 336, then the centre 336 x 336
    ("blip-vqa", (384, 384), (0, 0, 384, 384)),  # squashed to 384 x 384, no crop
    ("instructblip", (224, 224), (0, 0, 224, 224)),
    ("instructblip-t5", (224, 224), (0, 0, 224, 224)),
])
def test_processor_sizes_crops_means_and_stds(family, resize, crop):
    _, processor = BUILDERS[family](meta=True)
    text = LLAVA_PROMPT if family == "llava" else "what is in the picture?"
    pixels = processor(images=IMAGE, text=text, return_tensors="pt")["pixel_values"]
    expected = clip_pixels(IMAGE, resize, crop)
    assert pixels.shape == (1, *expected.shape)
    torch.testing.assert_close(pixels[0], expected, atol=1e-6, rtol=0)  # measured 0.0 (float32 throughout)


# ------------------------------------------------------------------------------------------ positions
def test_llava_positions_576_image_tokens_on_a_24_by_24_grid(llava_meta):
    """Left-padded batch of two prompts: each image span is 576 `<image>` tokens after the template's prefix, its
    patches numbered row by row, and `patches(rows, cols)` finds the corners and a block of the grid."""
    model, hf, processor = llava_meta
    prompts = [LLAVA_PROMPT, "USER: <image>\nhi ASSISTANT:"]
    inputs = processor(images=[IMAGE, random_image((336, 336), seed=4)], text=prompts, padding=True,
                       return_tensors="pt")
    positions = model.positions(**inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    grid = torch.arange(576)
    for b in range(2):
        (span,) = positions.image[b]
        pad = int((mask[b] == 0).sum())
        prefix = len(processor.tokenizer("USER: ")["input_ids"])  # <s> and the pieces before <image>
        assert (span.start, span.stop) == (pad + prefix, pad + prefix + 576)
        assert bool((ids[b, span.start:span.stop] == 32000).all()) and int((ids[b] == 32000).sum()) == 576
        assert torch.equal(span.rows, grid // 24) and torch.equal(span.cols, grid % 24)
        corners = [span.patches(rows=[r], cols=[c]).tolist() for r, c in ((0, 0), (0, 23), (23, 0), (23, 23))]
        assert corners == [[span.start], [span.start + 23], [span.start + 23 * 24], [span.stop - 1]]
        block = span.patches(rows=[10, 11], cols=[3, 4, 5])
        assert block.tolist() == [span.start + r * 24 + c for r in (10, 11) for c in (3, 4, 5)]
        assert set(positions.text[b].tolist()).isdisjoint(range(span.start, span.stop))
        assert int(positions.text[b][0]) < span.start < span.stop <= int(positions.text[b][-1])
    assert positions.last.tolist() == [ids.shape[1] - 1] * 2


def test_instructblip_positions_32_query_tokens_first():
    model, _, processor = meta_model("instructblip")
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    (span,) = model.positions(**inputs).image[0]
    assert (span.start, span.stop) == (0, 32) and bool((inputs["input_ids"][0, :32] == 32000).all())


# ------------------------------------------------------------------------------------------ parity, float32
def _errors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    return {site: (ours.float() - ref.float()).abs().max().item() for site, (ours, ref) in pairs.items()}


def _assert_within(errors: dict[str, float], tolerance: dict[str, float]) -> None:
    """Each site's error within the tolerance of the first key of `tolerance` that prefixes it; all named at once."""
    over = {site: err for site, err in errors.items()
            if err > next(tol for prefix, tol in tolerance.items() if site.startswith(prefix))}
    assert not over, f"over tolerance: {over} (all errors: {errors})"


def _streams(model: HookedVLM, inputs, towers: dict[str, str], extra: tuple[str, ...]):
    """Logits and a cache of only `towers`' streams (tower -> "pre" or "post": `names.resid`) and `extra` hooks: the
    full cache of a real-shaped model would take GBs."""
    wanted = {names.resid(tower, layer, where) for tower, where in towers.items()
              for layer in range(model.tower_info(tower).n_layers)} | set(extra)
    with torch.no_grad():
        return model.run_with_cache(**inputs, names_filter=lambda name: name in wanted)


def _hf_llava_run(hf, inputs):
    """HF LLaVA's forward spelled out so that its intermediates come back: the vision tower's hidden states, the
    projected image features, the LM's hidden states and the logits."""
    with torch.no_grad():
        image = hf.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                            vision_feature_select_strategy="default", output_hidden_states=True)
        ids = inputs["input_ids"]
        features = torch.cat(list(image.pooler_output))
        embeds = hf.get_input_embeddings()(ids).masked_scatter((ids == hf.config.image_token_id)[..., None], features)
        out = hf.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                      output_hidden_states=True)
        return image, features, out, hf.lm_head(out.last_hidden_state)


@pytest.mark.slow
def test_llava_real_shapes_match_hf_per_layer():
    """CLIP-L/14-336 (24 layers, 577 positions), the projector and a 2-layer Llama at d 4096 with the 32064-token
    head, on a 587-token prompt. Measured max errors: vision stream 8.1e-6 (values up to 13), projector 6.2e-6,
    LM stream 1.6e-5 (values up to 14), logits 9.4e-6. About 260 s and 6.3 GB peak here."""
    hf, processor = build_llava_real_shapes(seed=0)
    model = HookedVLM.from_hf(hf, processor=processor, share_weights=True)
    inputs = processor(images=IMAGE, text=LLAVA_PROMPT, return_tensors="pt")
    logits, cache = _streams(model, inputs, {"vision": "post", "lm": "post"},
                             ("vision.ln_pre.hook_normalized", "projector.hook_out", "lm.hook_inputs_embeds",
                              "lm.ln_final.hook_normalized"))
    image, features, out, ref_logits = _hf_llava_run(hf, inputs)
    pairs = {"vision.ln_pre": (cache["vision.ln_pre.hook_normalized"], image.hidden_states[0]),
             "projector": (cache["projector.hook_out"][0], features),
             "lm.embeds": (cache["lm.hook_inputs_embeds"], out.hidden_states[0]),
             "lm.ln_final": (cache["lm.ln_final.hook_normalized"], out.hidden_states[-1]),
             "logits": (logits, ref_logits)}
    pairs |= {f"vision.{layer}": (cache["vision", layer, "resid_post"], image.hidden_states[layer + 1])
              for layer in range(model.tower_info("vision").n_layers)}
    pairs |= {f"lm.{layer}": (cache["lm", layer, "resid_post"], out.hidden_states[layer + 1])
              for layer in range(model.tower_info("lm").n_layers - 1)}  # HF's last hidden state is after the norm
    _assert_within(_errors(pairs), {"vision": 2.5e-5, "projector": 2e-5, "lm": 5e-5, "logits": 3e-5})


def _blip_vqa_pairs(hf, model: HookedVLM, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ours and HF's stream at every block of the three towers, and the first answer token's logits. HF's VQA
    forward returns no logits: they come from its submodules as its generate() runs them (the notes' section 2.4)."""
    towers = ("vision", "text_encoder", "text_decoder")
    logits, cache = _streams(model, inputs, dict.fromkeys(towers, "pre"),
                             tuple(names.resid(t, model.tower_info(t).n_layers - 1, "post") for t in towers)
                             + ("vision.ln_post.hook_normalized",))
    with torch.no_grad():
        vision = hf.vision_model(inputs["pixel_values"], output_hidden_states=True)
        image = vision.last_hidden_state
        question = hf.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   encoder_hidden_states=image, encoder_attention_mask=torch.ones(image.shape[:2]),
                                   output_hidden_states=True)
        bos = torch.full((image.shape[0], 1), hf.config.text_config.bos_token_id)
        answer = hf.text_decoder(input_ids=bos, encoder_hidden_states=question.last_hidden_state,
                                 encoder_attention_mask=inputs["attention_mask"], output_hidden_states=True)
    pairs = {"vision.ln_post": (cache["vision.ln_post.hook_normalized"], image), "logits": (logits, answer.logits)}
    for tower, out in zip(towers, (vision, question, answer)):
        n = model.tower_info(tower).n_layers
        pairs |= {f"{tower}.{layer}": (cache[tower, layer, "resid_pre"], out.hidden_states[layer])
                  for layer in range(n)}
        pairs[f"{tower}.{n}"] = (cache[tower, n - 1, "resid_post"], out.hidden_states[n])
    return pairs


def test_blip_vqa_real_widths_two_layers_match_hf():
    """BLIP-VQA-base's widths, 384 px images and vocabulary with each tower cut to 2 layers. Measured max errors:
    1.7e-6 (streams), 1.3e-6 (logits); a text LayerNorm eps of 1e-5 instead of 1e-12 gives 7e-4. 5-11 s here."""
    hf, processor = build_blip_vqa_real_shapes(seed=0, vis_layers=2, text_layers=2)
    model = HookedVLM.from_hf(hf, processor=processor, share_weights=True)
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    _assert_within(_errors(_blip_vqa_pairs(hf, model, inputs)), {"": 5e-6})


@pytest.mark.slow
def test_blip_vqa_base_in_full_matches_hf_per_layer():
    """BLIP-VQA-base's shapes in full (12 + 12 + 12 layers, 361 M parameters). Measured max errors: 3.7e-6
    (streams), 2.6e-6 (logits). About 110 s and 2.3 GB peak here."""
    hf, processor = build_blip_vqa_real_shapes(seed=0)
    model = HookedVLM.from_hf(hf, processor=processor, share_weights=True)
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    _assert_within(_errors(_blip_vqa_pairs(hf, model, inputs)), {"": 1e-5})


@pytest.mark.slow
def test_instructblip_real_shapes_match_hf_per_layer():
    """EVA-g/14 at width 1408 (2 of 39 layers), the Q-Former in full (12 layers, 32 queries) and a 2-layer Vicuna
    at d 4096. Measured max errors: vision 2.3e-6, Q-Former 2.6e-6, projector 1.8e-6, LM stream 1.2e-5, logits
    8.8e-6. About 200 s and 5.3 GB peak here."""
    hf, processor = build_instructblip_real_shapes(seed=0)
    model = HookedVLM.from_hf(hf, processor=processor, share_weights=True)
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    n_lm = model.tower_info("lm").n_layers
    qformer_out = names.resid("qformer", model.tower_info("qformer").n_layers - 1, "post")
    logits, cache = _streams(model, inputs, {"vision": "pre", "qformer": "pre", "lm": "pre"},
                             ("vision.ln_post.hook_normalized", qformer_out, "projector.hook_out",
                              "lm.hook_inputs_embeds", "lm.ln_final.hook_normalized"))
    with torch.no_grad():
        image = hf.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                      inputs["qformer_attention_mask"], output_hidden_states=True)
        ids = inputs["input_ids"]
        features = image.pooler_output
        embeds = hf.get_input_embeddings()(ids).masked_scatter((ids == hf.config.image_token_id)[..., None], features)
        out = hf.language_model.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                      output_hidden_states=True)
        ref_logits = hf.language_model.lm_head(out.last_hidden_state)
    vision, qformer = image.vision_outputs, image.qformer_outputs
    pairs = {"vision.ln_post": (cache["vision.ln_post.hook_normalized"], vision.last_hidden_state),
             "qformer.out": (cache[qformer_out], qformer.last_hidden_state),
             "projector": (cache["projector.hook_out"], features),
             "lm.embeds": (cache["lm.hook_inputs_embeds"], embeds),
             "lm.ln_final": (cache["lm.ln_final.hook_normalized"], out.hidden_states[n_lm]),
             "logits": (logits, ref_logits)}
    for tower, hidden in (("vision", vision.hidden_states), ("qformer", qformer.hidden_states),
                          ("lm", out.hidden_states)):
        pairs |= {f"{tower}.{layer}": (cache[tower, layer, "resid_pre"], hidden[layer])
                  for layer in range(model.tower_info(tower).n_layers)}
    _assert_within(_errors(pairs), {"vision": 1e-5, "qformer": 1e-5, "projector": 1e-5, "lm": 4e-5, "logits": 3e-5})


# ------------------------------------------------------------------------------------------ parity, half precision
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_blip_vqa_real_widths_in_half_precision_as_close_to_float32_as_hf(dtype):
    """Loaded in half precision, the real-width BLIP-VQA (2 layers a tower) is no further from the float32 run than
    HF's own model in the same dtype, at every block: ours/HF's largest error to float32, measured, bfloat16
    0.055/0.052 (logits 0.023/0.022), float16 0.0068/0.0068 (logits 0.0032/0.0029). About 30 s each here."""
    hf, processor = build_blip_vqa_real_shapes(seed=0, vis_layers=2, text_layers=2)
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    full = _blip_vqa_pairs(hf, HookedVLM.from_hf(hf, processor=processor, share_weights=True), inputs)
    hf = hf.to(dtype)  # HF's half run is the yardstick: the rounding a half-precision model cannot avoid
    half = _blip_vqa_pairs(hf, HookedVLM.from_hf(hf, processor=processor, share_weights=True),
                           {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
    assert half["logits"][0].dtype == dtype
    ours = _errors({site: (half[site][0], full[site][1]) for site in full})
    theirs = _errors({site: (half[site][1], full[site][1]) for site in full})
    for tower in ("vision", "text_encoder", "text_decoder", "logits"):
        worst_ours = max(err for site, err in ours.items() if site.startswith(tower))
        worst_theirs = max(err for site, err in theirs.items() if site.startswith(tower))
        assert worst_ours <= 1.5 * worst_theirs, f"{tower}: {worst_ours:.3g} from float32, HF's {worst_theirs:.3g}"


# ------------------------------------------------------------------------------------------ InstructBLIP-Flan-T5-XL
T5_DECODER_IDS = torch.tensor([[0, 17, 15, 13, 6]])  # decoder start (pad), then "▁what ▁is ▁in ▁the"


def test_flan_t5_xl_real_dimensions_and_positions():
    """Flan-T5-XL's widths on the meta device: 32 heads of 64 over d_model 2048, gated-GELU FFN of 5120, 32
    relative-attention buckets up to distance 128, vocabulary 32128 with an untied head, no output scaling; the
    float16 rules the converter sets (T5 blocks clamp, `wo` and the queries kept in float32); the 32 query
    tokens first in the prompt."""
    model, hf, processor = meta_model("instructblip-t5")
    enc, dec = model.cfg.lm_encoder, model.cfg.lm_decoder
    for stack in (enc, dec):
        attn, mlp = stack.block.attn, stack.block.mlp
        assert (stack.d_model, attn.n_heads, attn.d_head, mlp.d_mlp, mlp.act, mlp.gated) == (
            2048, 32, 64, 5120, "gelu_tanh", True)
        assert (stack.n_buckets, stack.max_distance, stack.n_layers, stack.d_vocab) == (32, 128, 2, 32128)
        assert stack.block.clamp_half_overflow and stack.block.norm.eps == 1e-6
    assert not dec.scale_outputs and not enc.decoder and dec.decoder
    assert model.lm_decoder.unembed.weight.shape == (32128, 2048)
    assert hf.language_model.lm_head.weight is not hf.language_model.shared.weight
    assert model.cfg.qformer.n_query == 32 and model.vision.W_pos.shape == (257, 1408)
    assert set(model.cfg.keep_in_float32) >= {"qformer.query_tokens", "lm_encoder.blocks.*.mlp.out_weight"}
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<image>"]) == [0, 1, 32100] == [
        model.cfg.decoder_start_token_id, hf.config.text_config.eos_token_id, hf.config.image_token_id]
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    (span,) = model.positions(**inputs).image[0]
    assert (span.start, span.stop) == (0, 32) and int((inputs["input_ids"] == 32100).sum()) == 32
    assert inputs["input_ids"][0, -1] == 1  # T5 ends the prompt with </s>


def _instructblip_pairs(hf, model: HookedVLM, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ours and HF's stream entering every block of every tower (HF's hidden states), the towers' outputs and the
    logits, for either LM (Vicuna: `lm`; Flan-T5: `lm_encoder`, `lm_decoder`). HF's T5 hidden states end with the
    final norm's output, so a T5 stack's last block output is compared through `ln_final`."""
    towers = [t for t in ("vision", "qformer", "lm", "lm_encoder", "lm_decoder") if t in model.tower_names]
    qformer_out = names.resid("qformer", model.tower_info("qformer").n_layers - 1, "post")
    lm_finals = tuple(f"{t}.ln_final.hook_normalized" for t in towers if t.startswith("lm"))
    logits, cache = _streams(model, inputs, dict.fromkeys(towers, "pre"),
                             ("vision.ln_post.hook_normalized", qformer_out, "projector.hook_out") + lm_finals)
    with torch.no_grad():
        image = hf.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                      inputs["qformer_attention_mask"], output_hidden_states=True)
        ids = inputs["input_ids"]
        features = image.pooler_output
        embeds = hf.get_input_embeddings()(ids).masked_scatter((ids == hf.config.image_token_id)[..., None],
                                                               features.to(hf.get_input_embeddings().weight.dtype))
        if "lm" in towers:
            out = hf.language_model.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                          output_hidden_states=True)
            ref_logits, lm_hidden = hf.language_model.lm_head(out.last_hidden_state), {"lm": out.hidden_states}
        else:
            out = hf.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                    decoder_input_ids=inputs["decoder_input_ids"], output_hidden_states=True)
            ref_logits = out.logits
            lm_hidden = {"lm_encoder": out.encoder_hidden_states, "lm_decoder": out.decoder_hidden_states}
    vision, qformer = image.vision_outputs, image.qformer_outputs
    pairs = {"vision.ln_post": (cache["vision.ln_post.hook_normalized"], vision.last_hidden_state),
             "qformer.out": (cache[qformer_out], qformer.last_hidden_state),
             "projector": (cache["projector.hook_out"], features), "logits": (logits, ref_logits)}
    for tower, hidden in (("vision", vision.hidden_states), ("qformer", qformer.hidden_states), *lm_hidden.items()):
        n = model.tower_info(tower).n_layers
        pairs |= {f"{tower}.{layer}": (cache[tower, layer, "resid_pre"], hidden[layer]) for layer in range(n)}
        if tower.startswith("lm"):
            pairs[f"{tower}.ln_final"] = (cache[f"{tower}.ln_final.hook_normalized"], hidden[n])
    return pairs


@pytest.mark.slow
def test_flan_t5_xl_real_shapes_match_hf_per_layer():
    """EVA-g/14 (2 of 39 layers), the Q-Former in full and Flan-T5-XL's widths (2 + 2 layers), in float32, at every
    block of every tower. Measured max errors: vision 2.3e-6, Q-Former 2.5e-6, projector 1.8e-6, T5 streams
    3.1e-5 (the decoder's final norm), logits 3.2e-5. 85-100 s here (a quarter of 2 cores)."""
    hf, processor = build_instructblip_flan_t5_real_shapes(seed=0)
    model = HookedVLM.from_hf(hf, processor=processor, share_weights=True)
    inputs = processor(images=IMAGE, text="what is in the picture?", return_tensors="pt")
    inputs["decoder_input_ids"] = T5_DECODER_IDS
    errors = _errors(_instructblip_pairs(hf, model, inputs))
    print({site: f"{err:.2g}" for site, err in errors.items()})
    _assert_within(errors, {"lm": 1e-4, "logits": 1e-4, "": 1e-5})


# ------------------------------------------------------------------------------------------ half precision, 7B shapes
def _llava_pairs(hf, model: HookedVLM, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ours and HF's vision stream after every block it runs, the projector's output, the LM stream entering every
    block, its final norm and the logits."""
    logits, cache = _streams(model, inputs, {"vision": "post", "lm": "pre"},
                             ("vision.ln_pre.hook_normalized", "projector.hook_out", "lm.ln_final.hook_normalized"))
    image, features, out, ref_logits = _hf_llava_run(hf, inputs)
    n_lm = model.tower_info("lm").n_layers
    pairs = {"vision.ln_pre": (cache["vision.ln_pre.hook_normalized"], image.hidden_states[0]),
             "projector": (cache["projector.hook_out"][0], features),
             "lm.ln_final": (cache["lm.ln_final.hook_normalized"], out.hidden_states[n_lm]),
             "logits": (logits, ref_logits)}
    pairs |= {f"vision.{layer}": (cache["vision", layer, "resid_post"], image.hidden_states[layer + 1])
              for layer in range(model.tower_info("vision").n_layers)}
    pairs |= {f"lm.{layer}": (cache["lm", layer, "resid_pre"], out.hidden_states[layer]) for layer in range(n_lm)}
    return pairs


@contextmanager
def _as_hf_loads(hf, dtype: torch.dtype):
    """HF's model in `dtype` as its `from_pretrained(dtype=...)` leaves it, for the duration: every weight cast but
    those its dtype plan keeps in float32, matched as its loader matches them (core_model_loading's alternation,
    searched in each name; tests/test_half_precision.py checks the result against a real `from_pretrained`). The
    float32 weights come back afterwards."""
    from transformers.core_model_loading import build_glob_alternation

    plan = hf._get_dtype_plan(dtype)
    kept = build_glob_alternation(list(plan))[0] if plan else None
    originals = []
    for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
        if tensor.is_floating_point() and not (kept is not None and kept.search(name)):
            originals.append((tensor, tensor.data))
            tensor.data = tensor.data.to(dtype)
    try:
        yield hf
    finally:
        for tensor, data in originals:
            tensor.data = data


def _relative(pairs) -> tuple[dict[str, float], dict[str, float]]:
    """Each site's largest absolute error, and that error relative to the reference's largest magnitude."""
    absolute = _errors(pairs)
    return absolute, {site: absolute[site] / max(pairs[site][1].float().abs().max().item(), 1e-30)
                      for site in pairs}


def _worst(errors: dict[str, float], tower: str) -> float:
    return max(err for site, err in errors.items() if site.split(".")[0] == tower)


HALF_SETUPS = {  # builder options (the towers cut to what a 2-core CPU runs in a minute) and the pairs to compare
    # feature layer -2 of 3: 2 CLIP-L blocks run; 1 LM block, as float16 GEMMs on a CPU run at a tenth of bfloat16's
    # speed (587 tokens through a 4096-wide block and the 32064-row head: ~400 GFLOP a run)
    "llava": (dict(vis_layers=3, lm_layers=1), LLAVA_PROMPT, _llava_pairs),
    "instructblip": ({}, "what is in the picture?", _instructblip_pairs),
    "instructblip-t5": ({}, "what is in the picture?", _instructblip_pairs),
}
# Per tower (the first prefix that matches), the largest of (ours - HF) / max|HF| over its sites, both in the same
# dtype: about 2x the measured value, which is in the comment.
HALF_TOLERANCE = {
    # vision 0.011, projector 0.006, LM 0.034, logits 0.034
    ("llava", torch.bfloat16): {"lm": 0.07, "logits": 0.07, "": 0.022},
    # vision 0.001, projector 0.0006, LM 0.011, logits 0.0098
    ("llava", torch.float16): {"lm": 0.022, "logits": 0.02, "": 0.002},
    # vision 0.011, Q-Former 0.016, projector 0.013, LM 0.019, logits 0.019
    ("instructblip", torch.bfloat16): {"": 0.04},
    # vision 0.0013, Q-Former 0.0023, projector 0.0018, LM 0.0023, logits 0.0026
    ("instructblip", torch.float16): {"logits": 0.0052, "": 0.0046},
    # vision 0.011, Q-Former 0.016, projector 0.011, T5 encoder 0.05, decoder 0.14, logits 0.14
    ("instructblip-t5", torch.bfloat16): {"lm_encoder": 0.1, "lm_decoder": 0.28, "logits": 0.28, "": 0.032},
    # vision 0.0013, Q-Former 0.0023, projector 0.0016, T5 encoder 0.0069, decoder 0.017, logits 0.016
    ("instructblip-t5", torch.float16): {"lm_encoder": 0.014, "lm_decoder": 0.034, "logits": 0.032, "": 0.0046},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(HALF_SETUPS))
def test_real_shapes_in_half_precision_match_hf_in_the_same_dtype(family):
    """LLaVA-1.5-7B's, InstructBLIP-Vicuna-7B's and InstructBLIP-Flan-T5-XL's widths, in bfloat16 and in float16:
    HF's model in that dtype as its `from_pretrained` loads it (what stays float32 is exactly what our own float16
    load keeps, `loading.float32_names`; tests/test_half_precision.py compares those loads themselves), converted,
    against HF's, at every block of every tower and at the logits: (1)
    the errors relative to HF's largest magnitude at each site within `HALF_TOLERANCE`; (2) per tower, ours no
    further from HF's float32 run than HF's own run in that dtype is, times 1.5. One build for both dtypes. Wall
    time here, on 2 cores shared by 7 processes (about a quarter of the CPU): LLaVA 410 s (float16 GEMMs on a CPU run
    at a tenth of bfloat16's speed), InstructBLIP-Vicuna 115 s, Flan-T5 60 s; 6.6 GB peak."""
    options, prompt, pairs_of = HALF_SETUPS[family]
    hf, processor = BUILDERS[family](seed=0, **options)
    inputs = processor(images=IMAGE, text=prompt, return_tensors="pt")
    if family == "instructblip-t5":
        inputs["decoder_input_ids"] = T5_DECODER_IDS
    float32 = {site: ref for site, (_, ref) in
               pairs_of(hf, HookedVLM.from_hf(hf, processor=processor, share_weights=True), inputs).items()}
    for dtype in (torch.bfloat16, torch.float16):
        with _as_hf_loads(hf, dtype):  # ours converted from it, sharing its weights: one half copy in memory
            model = HookedVLM.from_hf(hf, processor=processor, share_weights=True)
            assert {n: p.dtype for n, p in model.named_parameters()} == {
                n: torch.float32 if n in float32_names(model.cfg, [n], dtype) else dtype
                for n, _ in model.named_parameters()}  # what our own float16 load would keep, HF's load kept
            half = pairs_of(hf, model, {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
        del model
        assert half["logits"][0].dtype == half["logits"][1].dtype == dtype
        absolute, relative = _relative(half)
        ours = _errors({site: (half[site][0], float32[site]) for site in half})
        theirs = _errors({site: (half[site][1], float32[site]) for site in half})
        towers = sorted({site.split(".")[0] for site in half})
        print(f"\n{family} {dtype}: ours vs HF, max abs (relative):",
              {site: f"{absolute[site]:.2g} ({relative[site]:.2g})" for site in half},
              "\nto float32, ours / HF's:", {t: f"{_worst(ours, t):.2g} / {_worst(theirs, t):.2g}" for t in towers})
        _assert_within(relative, HALF_TOLERANCE[family, dtype])
        for tower in towers:
            assert _worst(ours, tower) <= 1.5 * _worst(theirs, tower), (
                f"{dtype} {tower}: {_worst(ours, tower):.3g} from float32, HF's {_worst(theirs, tower):.3g}")
