"""InstructBLIP parity against transformers' own models (Flan-T5 and Vicuna/Llama LMs), built tiny and fully
randomised in the test: logits, every tower's stream and attention maps, generation, positions, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_instructblip, random_image

IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]
PROMPTS = ["what is in the picture of the street?", "a cat"]  # different lengths: padding in both tokenizers
GOLDEN = Path(__file__).parent / "golden"
LMS = ["t5", "llama"]  # both towers are required: a missing one fails the tests, it is not skipped


def _build(lm, cross_freq=2, seed=3, **kw):
    hf, processor = build_instructblip(lm, seed=seed, cross_freq=cross_freq, **kw)
    hf.set_attn_implementation("eager")
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    if lm == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 7, 9, 11], [0, 4, 6, 1, 8]])
    return hf, model, inputs


@pytest.fixture(scope="module", params=LMS)
def ib(request):
    return (request.param, *_build(request.param))


def hf_position_ids(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def hf_logits(lm, hf, inputs, **kw):
    """HF's forward; decoder-only with the mask-derived positions that hooked_vlm uses by default."""
    with torch.no_grad():
        if lm == "llama" and "position_ids" not in kw:
            kw["position_ids"] = hf_position_ids(inputs["attention_mask"])
        return hf(**inputs, **kw).logits


def real(lm, inputs, logits):
    """Positions of the logits to compare: the prompt's real tokens (decoder-only) or every decoder token (T5)."""
    if lm == "llama":
        return inputs["attention_mask"].bool()
    return torch.ones(logits.shape[:-1], dtype=torch.bool)


# ------------------------------------------------------------------------------------------ logits
@pytest.mark.parametrize("fast", [False, True], ids=["explicit", "fast"])
def test_logits_match_hf(ib, fast):
    lm, hf, model, inputs = ib
    model.set_fast_attention(fast)
    try:
        with torch.no_grad():
            ours = model(**inputs)
    finally:
        model.set_fast_attention(True)
    ref = hf_logits(lm, hf, inputs)
    keep = real(lm, inputs, ref)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4 if fast else 1e-5, rtol=0)


@pytest.mark.parametrize("lm", LMS)
def test_cross_attention_on_every_qformer_layer(lm):
    hf, model, inputs = _build(lm, cross_freq=1, seed=5, qf_layers=3)
    assert all(model.tower_info("qformer").has_cross_attn)
    model.set_fast_attention(False)
    with torch.no_grad():
        ours = model(**inputs)
    ref = hf_logits(lm, hf, inputs)
    keep = real(lm, inputs, ref)
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lm", LMS)
def test_float64_matches_hf(lm):
    """HF eager in float64 gives NaN on padded batches (reference notes, pitfall 14): HF's sdpa is the reference."""
    hf, model, inputs = _build(lm)
    hf64, model64 = hf.double(), model.double()
    hf64.set_attn_implementation("sdpa")
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        ours = model64(**inputs64)
    ref = hf_logits(lm, hf64, inputs64)
    keep = real(lm, inputs, ref)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-10, rtol=0)


def test_t5_scaled_decoder_outputs_match_hf():
    """T5 with tied embeddings scales the decoder stream by d_model^-0.5 before lm_head (`scale_decoder_outputs`)."""
    hf, _, inputs = _build("t5")
    hf.language_model.config.scale_decoder_outputs = True
    model = HookedVLM.from_hf(hf)
    assert model.cfg.lm_decoder.scale_outputs
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), hf_logits("t5", hf, inputs), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ per layer
def _hf_image_side(hf, inputs):
    """HF's vision and Q-Former outputs with every stream and map; Q-Former self/cross maps by forward hooks on the
    HF attention modules (HF's `attentions` output interleaves the two kinds)."""
    maps, handles = {}, []
    for i, layer in enumerate(hf.qformer.encoder.layer):
        handles.append(layer.attention.attention.register_forward_hook(
            lambda mod, args, out, i=i: maps.__setitem__(("self", i), out[1])))
        if layer.has_cross_attention:
            handles.append(layer.crossattention.attention.register_forward_hook(
                lambda mod, args, out, i=i: maps.__setitem__(("cross", i), out[1])))
    try:
        with torch.no_grad():
            out = hf.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                        inputs["qformer_attention_mask"], output_hidden_states=True,
                                        output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return out, maps


def test_vision_and_qformer_match_hf(ib):
    lm, hf, model, inputs = ib
    out, maps = _hf_image_side(hf, inputs)
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith(("vision.", "qformer.",
                                                                                        "projector.")))
    vision = out.vision_outputs
    n = model.tower_info("vision").n_layers
    for layer in range(n):
        torch.testing.assert_close(cache["vision", layer, "resid_pre"], vision.hidden_states[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache["vision", layer, "pattern"], vision.attentions[layer], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["vision.ln_post.hook_normalized"], vision.last_hidden_state, atol=1e-5, rtol=0)

    qf = out.qformer_outputs
    nq = model.cfg.qformer.n_query
    q_mask = torch.cat([torch.ones(2, nq, dtype=torch.bool), inputs["qformer_attention_mask"].bool()], dim=1)
    info = model.tower_info("qformer")
    assert info.has_cross_attn == tuple(layer.has_cross_attention for layer in hf.qformer.encoder.layer)
    for layer in range(info.n_layers):
        torch.testing.assert_close(cache["qformer", layer, "resid_pre"][q_mask], qf.hidden_states[layer][q_mask],
                                   atol=1e-5, rtol=0)
        # self-attention: the rows of real tokens (a pad row's pattern is not meaningful)
        torch.testing.assert_close(cache["qformer", layer, "pattern"].transpose(1, 2)[q_mask],
                                   maps["self", layer].transpose(1, 2)[q_mask], atol=1e-6, rtol=0)
        if info.has_cross_attn[layer]:
            torch.testing.assert_close(cache["qformer", layer, "cross_attn.pattern"], maps["cross", layer],
                                       atol=1e-6, rtol=0)
            assert cache["qformer", layer, "cross_attn_out"].shape[1] == nq  # only the queries read the image
        else:
            assert f"qformer.blocks.{layer}.cross_attn.hook_pattern" not in cache
    torch.testing.assert_close(cache["qformer", -1, "resid_post"][q_mask], qf.last_hidden_state[q_mask],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["qformer.hook_out"], qf.last_hidden_state[:, :nq], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["projector.hook_out"], out.pooler_output, atol=1e-5, rtol=0)
    # the text MLP is a separate module, and hook_mlp_out covers queries and instruction
    T = q_mask.shape[1]
    assert cache["qformer", 0, "mlp.post"].shape[1] == nq
    assert cache["qformer", 0, "mlp_text.post"].shape[1] == T - nq
    assert cache["qformer", 0, "mlp_out"].shape[1] == T


def test_lm_streams_and_patterns_match_hf(ib):
    lm, hf, model, inputs = ib
    with torch.no_grad():
        feats = hf.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                      inputs["qformer_attention_mask"]).pooler_output
        ids = inputs["input_ids"]
        embeds = hf.get_input_embeddings()(ids).masked_scatter((ids == hf.config.image_token_id)[..., None], feats)
        mask = inputs["attention_mask"]
        _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.startswith("lm"))
        if lm == "llama":
            out = hf.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=hf_position_ids(mask),
                                          output_hidden_states=True, output_attentions=True)
            towers = [("lm", out.hidden_states, out.attentions, None, mask.bool())]
        else:
            out = hf.language_model(inputs_embeds=embeds, attention_mask=mask,
                                    decoder_input_ids=inputs["decoder_input_ids"], output_hidden_states=True,
                                    output_attentions=True)
            dec_rows = torch.ones(inputs["decoder_input_ids"].shape, dtype=torch.bool)
            towers = [("lm_encoder", out.encoder_hidden_states, out.encoder_attentions, None, mask.bool()),
                      ("lm_decoder", out.decoder_hidden_states, out.decoder_attentions, out.cross_attentions, dec_rows)]
    first = "lm" if lm == "llama" else "lm_encoder"
    torch.testing.assert_close(cache[f"{first}.hook_inputs_embeds"], embeds, atol=1e-5, rtol=0)
    for tower, hidden, attentions, cross, rows in towers:
        n = model.tower_info(tower).n_layers
        for layer in range(n):
            # hidden_states[-1] is after the final norm: compare the last block's input and the final norm instead
            torch.testing.assert_close(cache[tower, layer, "resid_pre"][rows], hidden[layer][rows], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache[tower, layer, "pattern"].transpose(1, 2)[rows],
                                       attentions[layer].transpose(1, 2)[rows], atol=1e-5, rtol=0)
            if cross is not None:
                torch.testing.assert_close(cache[tower, layer, "cross_attn.pattern"], cross[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache[f"{tower}.ln_final.hook_normalized"][rows], hidden[n][rows], atol=1e-5,
                                   rtol=0)


# ------------------------------------------------------------------------------------------ hooks
@pytest.mark.parametrize("hook", ["qformer.hook_out", "qformer.blocks.0.cross_attn.hook_z", "projector.hook_out",
                                  "qformer.hook_query_tokens"])
def test_ablations_change_the_logits(ib, hook):
    lm, hf, model, inputs = ib

    def zero(t, hook):
        if t.ndim == 4:  # one head
            t = t.clone()
            t[:, :, 1] = 0
            return t
        return torch.zeros_like(t)

    with torch.no_grad():
        clean = model(**inputs)
        ablated = model.run_with_hooks(**inputs, fwd_hooks=[(hook, zero)])
    keep = real(lm, inputs, clean)
    assert (clean[keep] - ablated[keep]).abs().max() > 1e-3


def test_projector_ablation_matches_hf(ib):
    """An edit at `projector.hook_out` flows on exactly as the same edit in HF's language_projection."""
    lm, hf, model, inputs = ib
    handle = hf.language_projection.register_forward_hook(lambda mod, args, out: out * 0.5)
    try:
        ref = hf_logits(lm, hf, inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        ours = model.run_with_hooks(**inputs, fwd_hooks=[("projector.hook_out", lambda t, hook: t * 0.5)])
    keep = real(lm, inputs, ref)
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)


def test_hook_names(ib):
    lm, hf, model, inputs = ib
    names = set(model.hook_dict)
    for name in ["qformer.hook_query_tokens", "qformer.hook_embed", "qformer.hook_out", "projector.hook_out",
                 "qformer.blocks.0.cross_attn.hook_z", "qformer.blocks.0.hook_cross_attn_out",
                 "qformer.blocks.1.mlp.hook_post", "qformer.blocks.1.mlp_text.hook_post",
                 "qformer.blocks.1.ln_mlp_text.hook_normalized", "qformer.blocks.1.hook_mlp_out"]:
        assert name in names, name
    assert "qformer.blocks.1.cross_attn.hook_z" not in names  # cross-attention on every second layer
    if lm == "t5":
        for name in ["lm_encoder.hook_embed", "lm_encoder.hook_inputs_embeds", "lm_decoder.hook_embed",
                     "lm_decoder.blocks.1.cross_attn.hook_pattern", "lm_decoder.ln_final.hook_normalized"]:
            assert name in names, name
        assert model.tower_names == ("vision", "qformer", "projector", "lm_encoder", "lm_decoder")
    else:
        assert {"lm.hook_embed", "lm.hook_inputs_embeds"} <= names
        assert model.tower_names == ("vision", "qformer", "projector", "lm")


# ------------------------------------------------------------------------------------------ generation
def _hf_generate(lm, hf, inputs, n):
    with torch.no_grad():
        kw = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        return hf.generate(**kw, max_new_tokens=n, do_sample=False)


def test_generate_matches_hf(ib):
    lm, hf, model, inputs = ib
    kw = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    ours = model.generate(**kw, max_new_tokens=6)
    ref = _hf_generate(lm, hf, inputs, 6)
    assert torch.equal(ours, ref), (ours, ref)


def test_generate_with_a_hook_matches_hf(ib):
    lm, hf, model, inputs = ib
    kw = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    handle = hf.language_projection.register_forward_hook(lambda mod, args, out: -out)
    try:
        ref = _hf_generate(lm, hf, inputs, 6)
    finally:
        handle.remove()
    ours = model.generate(**kw, max_new_tokens=6, fwd_hooks=[("projector.hook_out", lambda t, hook: -t)])
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, model.generate(**kw, max_new_tokens=6))


# ------------------------------------------------------------------------------------------ positions
def test_positions_mark_the_queries(ib):
    lm, hf, model, inputs = ib
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter="projector.hook_out")
    nq = model.cfg.qformer.n_query
    pos = cache.positions
    ids = inputs["input_ids"]
    for b in range(2):
        (span,) = pos.image[b]
        assert torch.equal(span.indices, torch.nonzero(ids[b] == hf.config.image_token_id).flatten())
        assert span.stop - span.start == nq and (span.rows == -1).all()
        assert not set(pos.text[b].tolist()) & set(span.indices.tolist())
    qf = pos.towers["qformer"]
    assert all(s.start == 0 and s.stop == nq for (s,) in qf.image)
    for b in range(2):
        real_text = inputs["qformer_attention_mask"][b].sum().item()
        assert torch.equal(qf.text[b], torch.arange(nq, nq + real_text))


def test_llama_batched_equals_unbatched_by_default():
    hf, model, inputs = _build("llama")
    assert inputs["attention_mask"][1].eq(0).any()  # row 1 is padded, between the queries and the text
    single = model.processor(images=IMAGES[1], text=PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        batched = model(**inputs)[1][inputs["attention_mask"][1].bool()]
        alone = model(**single)[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_llama_hf_positions_switch_reproduces_hf_forward():
    hf, _, inputs = _build("llama")
    model = HookedVLM.from_hf(hf, hf_positions=True)
    model.set_fast_attention(False)
    with torch.no_grad():
        ours = model(**inputs)
        ref = hf(**inputs).logits  # HF forward: positions 0..T-1 across the pads
        mask_positions = hf_logits("llama", hf, inputs)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
    assert (ref[keep] - mask_positions[keep]).abs().max() > 1e-2  # the two numberings really differ here


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.no_typecheck  # the library's own messages, which the jaxtyping checks would pre-empt
def test_bad_inputs_raise_clear_errors(ib):
    lm, hf, model, inputs = ib
    image_id = hf.config.image_token_id

    def call(**changes):
        with torch.no_grad():
            model(**{**inputs, **changes})

    no_image = inputs["input_ids"].clone()
    no_image[no_image == image_id] = 5
    with pytest.raises(ValueError, match="image placeholder"):
        call(input_ids=no_image)
    too_few = inputs["input_ids"].clone()
    too_few[:, 0] = 5
    with pytest.raises(ValueError, match=r"exactly \d+ image placeholder"):
        call(input_ids=too_few)
    with pytest.raises(ValueError, match="qformer_input_ids is missing"):
        call(qformer_input_ids=None)
    with pytest.raises(ValueError, match="batch sizes differ"):
        call(pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="expected \\[batch, 3, 32, 32\\]"):
        call(pixel_values=torch.zeros(2, 3, 48, 48))


def test_hook_names_are_pinned(ib):
    """The ordered list of hook names is a public API: a change must be deliberate (update tests/golden); with the
    test below, the pinned order is the execution order."""
    lm, hf, model, inputs = ib
    assert list(model.hook_dict) == (GOLDEN / f"instructblip_{lm}_hook_names.txt").read_text().split()


def test_every_hook_fires_once_in_registration_order(ib):
    """hook_dict order is execution order (the Q-Former's mlp, mlp_text and their norms included)."""
    lm, hf, model, inputs = ib
    fired = []
    with model.hooks([(lambda n: True, lambda t, hook: fired.append(hook.name))]):
        with torch.no_grad():
            model(**inputs)
    assert fired == list(model.hook_dict)


def test_real_size_flan_t5_converts_on_meta():
    """instructblip-flan-t5-xl's shapes (EVA ViT-g, 12-layer Q-Former, Flan-T5-XL), converted without memory."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig, T5Config)

    text = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                    feed_forward_proj="gated-gelu")
    vision = InstructBlipVisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                      num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-6)
    cfg = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=InstructBlipQFormerConfig().to_dict(),
                             text_config=text.to_dict(), num_query_tokens=32, image_token_index=32100)
    with torch.device("meta"):
        hf = InstructBlipForConditionalGeneration(cfg)
    model = HookedVLM.from_hf(hf)
    assert model.tower_info("qformer").has_cross_attn == (True, False) * 6
    assert model.tower_info("vision").n_layers == 39 and model.tower_info("lm_decoder").n_layers == 24
    assert model.cfg.decoder_start_token_id == 0


def test_from_pretrained_local_dir(tmp_path):
    hf, model, inputs = _build("t5")
    hf.save_pretrained(tmp_path)
    model.processor.save_pretrained(tmp_path)
    loaded = HookedVLM.from_pretrained(tmp_path)
    assert loaded.processor is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), atol=0, rtol=0)
