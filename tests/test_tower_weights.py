"""Tower-level stacked weights (`tower.W_Q` ...), the OV/QK circuits and `model.cfg_of`, checked against what the
model computes: OV applied to what a head reads gives its `hook_result`, QK gives its `hook_attn_scores`, and the
flat configs give the HF configs' numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm import names as hn
from hooked_vlm.factored_matrix import FactoredMatrix
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image(seed=0), random_image(seed=1)]


@pytest.fixture(scope="module")
def llava():  # grouped-query attention (2 KV heads for 4 query heads), left-padded batch
    hf, processor = build_llava(seed=2, kv_heads=2)
    texts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    inputs = processor(images=IMAGES, text=texts, padding=True, return_tensors="pt")
    return hf, HookedVLM.from_hf(hf, processor=processor).double(), inputs


@pytest.fixture(scope="module")
def instructblip_t5():  # Q-Former with 3 blocks, cross-attention on blocks 0 and 2
    hf, processor = build_instructblip("t5", seed=2, qf_layers=3)
    inputs = processor(images=IMAGES[:1], text=["what is in the picture?"], return_tensors="pt")
    return hf, HookedVLM.from_hf(hf, processor=processor).double(), inputs


@pytest.fixture(scope="module")
def blip_vqa():
    hf, processor = build_blip("vqa", seed=2)
    inputs = processor(images=IMAGES[:1], text=["what color is the car"], return_tensors="pt")
    return hf, HookedVLM.from_hf(hf, processor=processor).double(), inputs


def run(model, inputs, **kwargs):
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return model.run_with_cache(**inputs, **kwargs)[1]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- layouts
def test_stacks_are_the_blocks_weights_in_transformerlens_layout(llava):
    _, model, _ = llava
    lm = model.tower("lm")
    L, H, H_kv, D, d = 2, 4, 2, 64, 16
    assert lm.W_Q.shape == (L, H, D, d) and lm.W_O.shape == (L, H, d, D)
    assert lm.W_K.shape == lm.W_V.shape == (L, H, D, d) and lm._W_K.shape == (L, H_kv, D, d)
    assert lm.b_Q.shape == lm.b_K.shape == (L, H, d) and lm.b_O.shape == (L, D)
    for layer, block in enumerate(lm.blocks):
        close(lm.W_Q[layer], block.attn.W_Q)
        close(lm.W_O[layer], block.attn.W_O)
        for h in range(H):  # TransformerLens's GQA: query head h reads KV head h // (H / H_kv)
            close(lm.W_K[layer, h], block.attn.W_K[h // 2])
            close(lm.W_V[layer, h], block.attn.W_V[h // 2])
        close(lm.W_in[layer], block.mlp.W_in)
        close(lm.W_gate[layer], block.mlp.W_gate)
        close(lm.W_out[layer], block.mlp.W_out)
    # Llama has no biases: zeros, as TransformerLens's
    for b in (lm.b_Q, lm.b_K, lm.b_V, lm.b_O, lm.b_in, lm.b_out, lm.b_U):
        assert not b.any()
    assert lm.W_E.shape == (lm.cfg.d_vocab, D) and lm.W_U.shape == (D, lm.cfg.d_vocab)
    close(lm.W_U, lm.unembed.weight.T)
    assert isinstance(lm.OV, FactoredMatrix) and lm.OV.shape == (L, H, D, D) and lm.QK.shape == (L, H, D, D)
    close(lm.OV.AB, lm.W_V @ lm.W_O)
    close(lm.QK.AB, lm.W_Q @ lm.W_K.transpose(-2, -1))


def test_weights_a_tower_lacks_say_why(llava, blip_vqa):
    _, model, _ = llava
    lm, vision = model.tower("lm"), model.tower("vision")
    assert not hasattr(lm, "W_pos") and not hasattr(vision, "W_E") and not hasattr(vision, "W_U")
    with pytest.raises(AttributeError, match="no learned absolute positions"):
        lm.W_pos
    with pytest.raises(AttributeError, match="embeds no tokens"):
        vision.W_E
    with pytest.raises(AttributeError, match="not gated"):
        vision.W_gate
    with pytest.raises(ValueError, match="has no block with 'cross_attn'"):
        lm.attention_weights("cross_attn")
    close(vision.W_pos, vision.get_parameter("W_pos"))
    text = blip_vqa[1].tower("text_decoder")
    close(text.W_pos, text.pos_embed.W_pos)
    close(text.b_U, text.unembed.b_U)
    close(text.b_in, torch.stack([b.mlp.in_bias for b in text.blocks]))


# ---------------------------------------------------------------------------------------------- OV
def _check_ov(cache, weights, layer_index, tower, layer, attention, source):
    """What each head writes (`hook_result`) = its pattern over the sources applied to source @ OV (+ b_V W_O)."""
    leaf = lambda name: hn.leaf(attention, name)  # noqa: E731
    pattern = cache[hn.block(tower, layer, leaf("pattern"))]  # [B, H, T, S]
    result = cache[hn.block(tower, layer, leaf("result"))]  # [B, T, H, D]
    z = cache[hn.block(tower, layer, leaf("z"))]  # [B, T, H, d]
    ov, b_V, W_O = weights.OV[layer_index], weights.b_V[layer_index], weights.W_O[layer_index]
    written = source[:, None] @ ov.A @ ov.B + (b_V[:, None] @ W_O)  # [B, H, S, D]: each source through OV
    close(torch.einsum("bhts,bhsm->bthm", pattern, written), result)
    close(torch.einsum("bthd,hdm->bthm", z, W_O), result)


def test_ov_reproduces_each_heads_output_gqa_llama(llava):
    _, model, inputs = llava
    tower = "lm"
    cache = run(model, inputs, names_filter=lambda n: n.startswith("lm.blocks.") and (
        n.endswith(("attn.hook_pattern", "attn.hook_result", "attn.hook_z", "ln1.hook_normalized"))))
    weights = model.tower(tower).attention_weights()
    for layer in range(2):  # the values are not rotated: OV is exact with rotary positions too
        source = cache[hn.block(tower, layer, "ln1.hook_normalized")]  # what the pre-LN attention reads
        _check_ov(cache, weights, layer, tower, layer, "attn", source)


def test_ov_of_the_qformer_cross_attention_on_its_cross_layers(instructblip_t5):
    _, model, inputs = instructblip_t5
    qformer = model.tower("qformer")
    cross = qformer.attention_weights("cross_attn")
    assert cross.layers == (0, 2)  # cross_attention_frequency=2: blocks 0 and 2 only, stacked in that order
    D_vision, D = model.tower("vision").cfg.d_model, qformer.cfg.d_model
    assert cross.W_K.shape == (2, 4, D_vision, D // 4) and cross.OV.shape == (2, 4, D_vision, D)
    assert cross.QK.shape == (2, 4, D, D_vision)
    cache = run(model, inputs, tower_outputs=True,
                names_filter=lambda n: n.startswith("qformer.blocks.") and ".cross_attn.hook_" in n)
    image = cache.tower_outputs["vision"]  # what the cross-attention reads, unnormalised by the Q-Former
    for i, layer in enumerate(cross.layers):
        _check_ov(cache, cross, i, "qformer", layer, "cross_attn", image)


# ---------------------------------------------------------------------------------------------- QK
def _bilinear_scores(x_q, x_k, weights, layer):
    """scale-free scores: (x_q W_Q + b_Q) . (x_k W_K + b_K), with QK carrying the x-x term."""
    qk = weights.QK[layer]
    W_Q, W_K, b_Q, b_K = (w[layer] for w in (weights.W_Q, weights.W_K, weights.b_Q, weights.b_K))
    content = x_q[:, None] @ qk.A @ qk.B @ x_k[:, None].transpose(-2, -1)  # [B, H, T, S]
    q_bias = (b_Q[:, None] @ (x_k[:, None] @ W_K).transpose(-2, -1))  # b_Q . k
    k_bias = (x_q[:, None] @ W_Q) @ b_K[:, :, None]  # q . b_K
    return content + q_bias + k_bias + (b_Q * b_K).sum(-1)[:, None, None]


def test_qk_reproduces_attention_scores_clip_vision(llava):
    """CLIP's vision tower: learned absolute positions, added to the stream, so the score is a bilinear form of
    what the attention reads, and QK (with the bias terms) gives it exactly."""
    _, model, inputs = llava
    cache = run(model, inputs, names_filter=lambda n: n.startswith("vision.blocks.") and (
        n.endswith(("attn.hook_attn_scores", "ln1.hook_normalized"))))
    vision = model.tower("vision")
    weights, scale = vision.attention_weights(), vision.blocks[0].attn.cfg.scale
    for layer in range(len(vision.blocks)):
        x = cache[hn.block("vision", layer, "ln1.hook_normalized")]
        close(scale * _bilinear_scores(x, x, weights, layer),
              cache[hn.block("vision", layer, "attn.hook_attn_scores")])


def test_qk_reproduces_attention_scores_post_ln_bert(blip_vqa):
    """A post-LN tower's attention reads the stream itself (`hook_resid_pre`)."""
    _, model, inputs = blip_vqa
    cache = run(model, inputs, names_filter=lambda n: n.startswith("text_encoder.blocks.") and (
        n.endswith(("hook_resid_pre", ".attn.hook_attn_scores"))))
    tower = model.tower("text_encoder")
    weights, scale = tower.attention_weights(), tower.blocks[0].attn.cfg.scale
    for layer in range(2):
        x = cache[hn.resid("text_encoder", layer)]
        close(scale * _bilinear_scores(x, x, weights, layer),
              cache[hn.block("text_encoder", layer, "attn.hook_attn_scores")])  # one unpadded text: mask 0


def test_qk_plus_relative_position_bias_is_t5s_score(instructblip_t5):
    """T5: no 1/sqrt(d_head), no biases; its scores add a relative position bias that QK does not hold."""
    _, model, inputs = instructblip_t5
    cache = run(model, inputs, names_filter=lambda n: n.startswith("lm_encoder.blocks.") and (
        n.endswith(("ln1.hook_normalized", "attn.hook_attn_scores"))))
    encoder = model.tower("lm_encoder")
    weights = encoder.attention_weights()
    for layer in range(2):
        x = cache[hn.block("lm_encoder", layer, "ln1.hook_normalized")]
        T = x.shape[1]
        scores = cache[hn.block("lm_encoder", layer, "attn.hook_attn_scores")]
        close(x[:, None] @ weights.QK[layer].AB @ x[:, None].transpose(-2, -1) + encoder.rel_pos(T, T), scores)


def test_rotary_breaks_qk_except_where_query_and_key_share_a_position(llava):
    """With rotary positions the score is x_i W_Q R(j - i) W_K^T x_j: QK (no rotation) gives it only where the
    relative rotation is the identity, i.e. a token attending to itself; elsewhere it does not."""
    _, model, inputs = llava
    cache = run(model, inputs, names_filter=lambda n: n.startswith("lm.blocks.") and (
        n.endswith(("ln1.hook_normalized", "attn.hook_attn_scores"))))
    lm = model.tower("lm")
    weights, scale = lm.attention_weights(), lm.blocks[0].attn.cfg.scale
    for layer in range(2):
        x = cache[hn.block("lm", layer, "ln1.hook_normalized")]
        predicted = scale * (x[:, None] @ weights.QK[layer].AB @ x[:, None].transpose(-2, -1))
        scores = cache[hn.block("lm", layer, "attn.hook_attn_scores")]
        # the rotary tables are float32 (as HF's): cos^2 + sin^2 is 1 to float32 rounding only
        torch.testing.assert_close(predicted.diagonal(dim1=-2, dim2=-1), scores.diagonal(dim1=-2, dim2=-1),
                                   rtol=1e-6, atol=1e-6)
        earlier = torch.tril(torch.ones_like(scores[0, 0], dtype=torch.bool), -1)  # row 0 is unpadded
        assert not torch.allclose(predicted[0][:, earlier], scores[0][:, earlier], rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------- composition
def test_all_composition_scores(llava):
    _, model, _ = llava
    lm = model.tower("lm")
    scores = lm.all_composition_scores("Q")
    assert scores.shape == (2, 4, 2, 4)
    assert not scores[1, :, 0].any() and not scores[0, :, 0].any()  # only a later head reads an earlier one
    fro = torch.linalg.matrix_norm
    for mode, right in (("Q", lm.QK.AB), ("K", lm.QK.AB.transpose(-2, -1)), ("V", lm.OV.AB)):
        scores = lm.all_composition_scores(mode)
        left = lm.OV.AB[0, 1]
        expected = fro(left @ right[1, 3]) / (fro(left) * fro(right[1, 3]))
        close(scores[0, 1, 1, 3], expected)
    assert lm.all_head_labels()[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]


@pytest.mark.no_typecheck  # the message a user sees, not jaxtyping's
def test_composition_mode_is_checked(llava):
    with pytest.raises(ValueError, match="mode must be"):
        llava[1].tower("lm").all_composition_scores("O")
    with pytest.raises(ValueError, match="attention must be"):
        llava[1].tower("lm").attention_weights("self")


# ---------------------------------------------------------------------------------------------- cfg_of
def test_cfg_of_llava_against_the_hf_config(llava):
    hf, model, _ = llava
    text, vis = hf.config.text_config, hf.config.vision_config
    lm = model.cfg_of("lm")
    assert (lm.n_layers, lm.d_model, lm.n_heads, lm.d_head, lm.d_mlp) == (
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
        text.hidden_size // text.num_attention_heads, text.intermediate_size)
    assert (lm.d_vocab, lm.d_vocab_out, lm.n_key_value_heads, lm.eps) == (
        text.vocab_size, text.vocab_size, text.num_key_value_heads, text.rms_norm_eps)
    assert (lm.act_fn, lm.normalization_type, lm.layout, lm.positional_embedding_type, lm.gated_mlp) == (
        text.hidden_act, "RMS", "pre", "rotary", True)
    assert lm.n_ctx is None and lm.rotary_dim == lm.d_head and lm.attn_scale == lm.d_head**0.5
    assert lm.original_architecture == "LlavaForConditionalGeneration" and lm.tower == "lm"
    v = model.cfg_of("vision")
    # LLaVA keeps the vision blocks up to its feature layer (-2): one fewer than the HF tower holds
    assert v.n_layers == vis.num_hidden_layers - 1
    assert (v.d_model, v.n_heads, v.d_mlp, v.act_fn, v.eps) == (
        vis.hidden_size, vis.num_attention_heads, vis.intermediate_size, vis.hidden_act, vis.layer_norm_eps)
    assert (v.normalization_type, v.positional_embedding_type, v.d_vocab, v.n_key_value_heads) == (
        "LN", "standard", None, None)
    assert v.n_ctx == (vis.image_size // vis.patch_size) ** 2 + 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.n_layers = 3
    with pytest.raises(KeyError, match="no tower 'projector'"):
        model.cfg_of("projector")


def test_cfg_of_instructblip_t5_against_the_hf_config(instructblip_t5):
    hf, model, _ = instructblip_t5
    t5, qf = hf.config.text_config, hf.config.qformer_config
    for name, n_layers, cross in (("lm_encoder", t5.num_layers, ()),
                                  ("lm_decoder", t5.num_decoder_layers, tuple(range(t5.num_decoder_layers)))):
        c = model.cfg_of(name)
        assert (c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp, c.eps) == (
            n_layers, t5.d_model, t5.num_heads, t5.d_kv, t5.d_ff, t5.layer_norm_epsilon)
        assert (c.act_fn, c.gated_mlp, c.normalization_type, c.positional_embedding_type) == (
            "gelu_new", True, "RMS", "relative_positional_bias")  # feed_forward_proj="gated-gelu": tanh GELU
        assert (c.use_attn_scale, c.attn_scale, c.cross_attn_layers, c.d_vocab) == (False, 1.0, cross, t5.vocab_size)
    assert model.cfg_of("lm_decoder").d_vocab_out == t5.vocab_size and model.cfg_of("lm_encoder").d_vocab_out is None
    q = model.cfg_of("qformer")
    assert (q.n_layers, q.d_model, q.n_heads, q.d_mlp, q.eps, q.layout) == (
        qf.num_hidden_layers, qf.hidden_size, qf.num_attention_heads, qf.intermediate_size, qf.layer_norm_eps, "post")
    assert q.cross_attn_layers == tuple(i for i in range(qf.num_hidden_layers) if i % qf.cross_attention_frequency == 0)
    assert q.n_ctx == qf.max_position_embeddings + hf.config.num_query_tokens  # learned queries, then the text


def test_cfg_of_blip_against_the_hf_config(blip_vqa):
    hf, model, _ = blip_vqa
    text = hf.config.text_config
    for name in ("text_encoder", "text_decoder"):
        c = model.cfg_of(name)
        assert (c.n_layers, c.d_model, c.n_heads, c.d_mlp, c.n_ctx, c.eps, c.act_fn, c.layout) == (
            text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size,
            text.max_position_embeddings, text.layer_norm_eps, text.hidden_act, "post")
        assert c.cross_attn_layers == tuple(range(text.num_hidden_layers))
