"""Corruptions as values: the sweeps take a `Corruption` (Gaussian, multiplicative, constant scale, hooks of one's own)
in place of corrupted inputs, with an explicit, seeded redraw policy; each sweep equals a naive loop (one full
forward per cell, the noise written out here from the documented seeds). Also the causal-trace kinds resid_mid /
resid_mid_cross, checked against HF's own `.attention` / `.crossattention` modules."""

from __future__ import annotations

import hashlib

import pytest
import torch

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.tiny import build_blip, build_llava, random_image

QUESTIONS = ["what color is the car on the street", "how many cats"]
IMAGE_SITE = "vision.ln_post.hook_normalized"  # BLIP's image embeddings, as the text towers read them


@pytest.fixture(scope="module")
def vqa():
    hf, processor = build_blip("vqa", seed=7)
    model = HookedVLM.from_hf(hf, processor=processor)
    clean = processor(images=[random_image(seed=0), random_image(seed=1)], text=QUESTIONS, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        answer = model(**clean)[:, -1].argmax(-1)  # the clean first answer token, per example
    return hf, model, clean, answer


def corrupt_fn(c, values, mask, std, z):
    """The corruption written out: the documented formulas, with `z` the standard normal draw."""
    m = torch.ones(values.shape[:2], dtype=torch.bool) if mask is None else mask
    m = m[..., None].expand_as(values)
    if c.kind == "gaussian":
        return values + torch.where(m, z * c.params["scale"] * std, 0.0)
    if c.kind == "multiplicative":
        return values * torch.where(m, c.params["mean"] + c.params["std"] * z, 1.0)
    return values * torch.where(m, torch.full_like(values, c.params["factor"]), 1.0)


def naive_corrupted(model, inputs, c, site, mask, cell_hooks, n_variants, metric, samples=1, normalize=False,
                    n_layers=None, restore=None):
    """ROME's / Palit's loop: for each sample, the corrupted baseline (forward 0) and one full forward per cell
    (layer L, variant v: forward 1 + L * n_variants + v), each with the draw the documented seed gives."""
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(**inputs)
    values = cache[site]
    std = None
    if c.kind == "gaussian":
        m = torch.ones(values.shape[:2], dtype=torch.bool) if mask is None else mask
        std = values[m[..., None].expand_as(values)].std()
    examples = torch.arange(values.shape[0])
    out = []
    for s in range(samples):
        def noise_hook(f):
            z = torch.randn(values.shape, generator=torch.Generator().manual_seed(c.seed_of(s, f)))
            return site, lambda t, hook: corrupt_fn(c, t, mask, std, z)

        with torch.no_grad():
            m_clean = metric(clean_logits, examples)
            m_corrupt = metric(model.run_with_hooks(**inputs, fwd_hooks=[noise_hook(0)]), examples)
            table = torch.full((n_layers, n_variants), float("nan"))
            for layer in range(n_layers):
                hooks = cell_hooks(layer)
                if not hooks:
                    continue
                for v in range(n_variants):
                    logits = model.run_with_hooks(**inputs, fwd_hooks=[noise_hook(1 + layer * n_variants + v)] + [
                        (name, lambda act, hook, v=v: restore(act.clone(), cache[hook.name], v)) for name in hooks])
                    value = metric(logits, examples)
                    if normalize:
                        value = metrics.normalized(value, m_clean, m_corrupt)
                    table[layer, v] = value.mean()
        out.append(table)
    return torch.stack(out).mean(0)


def restore_position(act, src, p):
    act[:, p] = src[:, p]
    return act


def window_hooks(model, tower, leaf, window):
    n_layers = model.tower_info(tower).n_layers

    def hooks(layer):
        span = range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))
        return [n for n in (f"{tower}.blocks.{i}.{leaf}" for i in span) if n in model.hook_dict]

    return hooks


# ------------------------------------------------------------------------------------------ draws and descriptions
def test_seeds_and_descriptions_are_as_documented():
    c = corruption.multiplicative(1.0, 5.0, redraw="forward", seed=3)
    digest = hashlib.sha256(b"3/1/7").digest()
    assert c.seed_of(1, 7) == int.from_bytes(digest[:8], "little") >> 1
    assert c.seed_of(0, 1) != c.seed_of(0, 2) != c.seed_of(1, 1)
    assert not torch.equal(c.draw((2, 3), 0, 1), c.draw((2, 3), 0, 2))  # every forward its own draw
    g = corruption.gaussian(3.0, seed=5)
    assert [g.seed_of(s, f) for s in (0, 2) for f in (0, 9)] == [5, 5, 7, 7]  # one draw per sample
    assert torch.equal(g.draw((4,), 1), torch.randn(4, generator=torch.Generator().manual_seed(6)))
    assert c.describe() == {"kind": "multiplicative", "mean": 1.0, "std": 5.0, "site": "image", "positions": None,
                            "seed": 3, "redraw": "forward"}
    assert corruption.scale(0.7691).describe() == {"kind": "scale", "factor": 0.7691, "site": "image",
                                                   "positions": None}
    assert corruption.gaussian(2.0, site="tokens", tower="text_encoder", positions=[1, 2]).describe()["positions"] == [
        1, 2]
    hooks = corruption.from_hooks([("vision.hook_embed", lambda t, hook: t)], label="mine").describe()
    assert hooks == {"kind": "hooks", "hooks": ["vision.hook_embed"], "label": "mine"}


@pytest.mark.no_typecheck
def test_bad_corruptions_are_refused():
    for bad, words in ((lambda: corruption.gaussian(-1.0), "scale=-1.0"),
                       (lambda: corruption.multiplicative(std=float("nan")), "std=nan"),
                       (lambda: corruption.gaussian(redraw="cell"), "redraw must be"),
                       (lambda: corruption.from_hooks([]), "no hooks"),
                       (lambda: corruption.scale(2.0, tower="lm"), "needs no tower")):
        with pytest.raises(ValueError, match=words):
            bad()


def test_gaussian_noise_function_is_the_gaussian_corruption():
    values = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)) * 4
    sites = torch.zeros(2, 5, dtype=torch.bool)
    sites[:, 1:3] = True
    offset = corruption.gaussian_noise(values, 3.0, sites=sites, seed=1)
    z = torch.randn(values.shape, generator=torch.Generator().manual_seed(1))
    expected = corrupt_fn(corruption.gaussian(3.0), values, sites, values[sites].std(), z) - values
    torch.testing.assert_close(offset, expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ causal tracing
def test_gaussian_corruption_equals_the_legacy_noise_argument(vqa):
    _, model, clean, answer = vqa
    legacy = patching.causal_trace(model, clean, answer, tower="text_encoder", noise=2.0, seed=4, samples=2,
                                   progress=False)
    value = patching.causal_trace(model, clean, answer, tower="text_encoder",
                                  corrupt=corruption.gaussian(2.0, seed=4), samples=2, progress=False)
    torch.testing.assert_close(value, legacy, atol=0, rtol=0)
    tokens = patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=[1, 2], seed=1, progress=False)
    value = patching.causal_trace(model, clean, answer, tower="text_encoder",
                                  corrupt=corruption.gaussian(site="tokens", positions=[1, 2], seed=1), progress=False)
    torch.testing.assert_close(value, tokens, atol=0, rtol=0)


@pytest.mark.parametrize("kind,window,tower", [("resid", 1, "text_encoder"), ("resid_mid", 3, "text_encoder"),
                                               ("resid_mid_cross", 3, "text_encoder"), ("resid", 1, "text_decoder")])
def test_per_forward_redraw_equals_the_naive_loop(vqa, kind, window, tower):
    """Palit et al.'s first protocol: multiplicative N(1, 5) noise on the image embeddings, drawn anew in every
    forward (baseline and cells), averaged over samples; stacking every cell of a layer in one batch (and chunking
    it differently) changes nothing, since each cell has its own draw."""
    _, model, clean, answer = vqa
    c = corruption.multiplicative(1.0, 5.0, redraw="forward", seed=11)
    leaf = patching.TRACE_KINDS[kind]
    run = lambda batch: patching.causal_trace(model, clean, answer, tower=tower, corrupt=c, kind=kind,  # noqa
                                              window=window, samples=2, batch_size=batch, progress=False)
    stacked, chunked = run(10_000), run(3)
    torch.testing.assert_close(chunked, stacked, atol=1e-6, rtol=1e-5)
    T = stacked.shape[1]
    expected = naive_corrupted(model, clean, c, IMAGE_SITE, None, window_hooks(model, tower, leaf, window), T,
                               metrics.prob(answer), samples=2, restore=restore_position,
                               n_layers=model.tower_info(tower).n_layers)
    torch.testing.assert_close(stacked, expected, atol=1e-6, rtol=1e-5)
    assert stacked.unique().numel() > T  # the cells differ: not one shared draw


def test_constant_scale_with_windows_equals_the_naive_loop(vqa):
    """Palit et al.'s second protocol: every image embedding times 0.7691, attention states restored over windows
    of 3 layers."""
    _, model, clean, answer = vqa
    c = corruption.scale(0.7691)
    result = patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=c, kind="resid_mid", window=3,
                                   progress=False)
    expected = naive_corrupted(model, clean, c, IMAGE_SITE, None, window_hooks(model, "text_encoder",
                                                                               "hook_resid_mid", 3),
                               result.shape[1], metrics.prob(answer), restore=restore_position,
                               n_layers=model.tower_info("text_encoder").n_layers)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="same run"):
        patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=c, samples=2, progress=False)
    with pytest.raises(ValueError, match="set them on it"):
        patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=c, noise=3.0, progress=False)


def test_resid_mid_hooks_equal_hf_attention_modules(vqa):
    """On BLIP's post-LN BERT towers the stream after the attention is LayerNorm(x + attn): what HF's
    `.attention` and `.crossattention` modules return (the states Palit et al.'s second notebook restores)."""
    hf, model, clean, _ = vqa
    seen = {}
    handles = []
    for tower, hf_tower in (("text_encoder", hf.text_encoder), ("text_decoder", hf.text_decoder.bert)):
        for i, layer in enumerate(hf_tower.encoder.layer):
            for module, leaf in ((layer.attention, "resid_mid"), (layer.crossattention, "resid_mid_cross")):
                handles.append(module.register_forward_hook(
                    lambda m, args, out, key=f"{tower}.blocks.{i}.hook_{leaf}": seen.__setitem__(
                        key, out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            image = hf.vision_model(clean["pixel_values"]).last_hidden_state
            question = hf.text_encoder(input_ids=clean["input_ids"], attention_mask=clean["attention_mask"],
                                       encoder_hidden_states=image).last_hidden_state
            bos = torch.full((2, 1), hf.config.text_config.bos_token_id)
            hf.text_decoder(input_ids=bos, encoder_hidden_states=question,
                            encoder_attention_mask=clean["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean)
    assert len(seen) == 2 * 2 * model.tower_info("text_encoder").n_layers
    for name, value in seen.items():
        torch.testing.assert_close(cache[name], value, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ patch_resid / patch_heads
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patch_resid_with_a_corruption_equals_the_naive_loop(vqa, direction):
    _, model, clean, answer = vqa
    c = corruption.gaussian(3.0, seed=2)
    metric = metrics.logit_diff(answer, (answer + 1) % 30)
    result = patching.patch_resid(model, clean, c, metric, tower="text_encoder", hook="resid_post",
                                  direction=direction, batch_size=7, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean)
        values = cache[IMAGE_SITE]
        z = torch.randn(values.shape, generator=torch.Generator().manual_seed(2))
        noisy = [(IMAGE_SITE, lambda t, hook: corrupt_fn(c, t, None, values.std(), z))]
        with model.hooks(noisy):
            _, corrupted = model.run_with_cache(**clean)
    examples = torch.arange(2)
    T = result.shape[1]
    for layer in range(model.tower_info("text_encoder").n_layers):
        name = f"text_encoder.blocks.{layer}.hook_resid_post"
        source = cache if direction == "denoise" else corrupted
        row = []
        for p in range(T):
            hooks = [(name, lambda act, hook, p=p: restore_position(act.clone(), source[name], p))]
            with torch.no_grad():
                logits = model.run_with_hooks(**clean, fwd_hooks=(noisy if direction == "denoise" else []) + hooks)
            row.append(metric(logits, examples).mean())
        torch.testing.assert_close(result[layer], torch.stack(row), atol=1e-5, rtol=1e-5)


def test_patch_heads_with_per_forward_noise_equals_the_naive_loop(vqa):
    _, model, clean, answer = vqa
    c = corruption.multiplicative(1.0, 2.0, redraw="forward", seed=5)
    metric = metrics.prob(answer)
    result = patching.patch_heads(model, clean, c, metric, tower="text_encoder", attention="cross_attn",
                                  batch_size=4, progress=False)
    info = model.tower_info("text_encoder")

    def restore(act, src, head):
        act[:, :, head] = src[:, :, head]
        return act

    expected = naive_corrupted(model, clean, c, IMAGE_SITE, None,
                               lambda layer: [f"text_encoder.blocks.{layer}.cross_attn.hook_z"], info.n_heads,
                               metric, restore=restore, n_layers=info.n_layers)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-5)


def test_from_hooks_is_the_same_run_as_the_noise_it_adds(vqa):
    _, model, clean, answer = vqa
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter=IMAGE_SITE)
    offset = corruption.gaussian_noise(cache[IMAGE_SITE], 3.0, seed=9)
    mine = corruption.from_hooks([corruption.add_hook(IMAGE_SITE, offset)])
    a = patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=mine, progress=False)
    b = patching.causal_trace(model, clean, answer, tower="text_encoder", corrupt=corruption.gaussian(3.0, seed=9),
                              progress=False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="not a hook of this model"):
        patching.causal_trace(model, clean, answer, tower="text_encoder",
                              corrupt=corruption.from_hooks([("nowhere.hook_x", lambda t, hook: t)]), progress=False)
    with pytest.raises(ValueError, match="not a hook of this model"):
        patching.causal_trace(model, clean, answer, tower="text_encoder",
                              corrupt=corruption.gaussian(site="vision.hook_nothing"), progress=False)


# ------------------------------------------------------------------------------------------ LLaVA
@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    prompts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    clean = processor(images=[random_image(seed=0), random_image(seed=1)], text=prompts, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        answer = model(**clean)[:, -1].argmax(-1)
    return model, clean, answer


def test_llava_per_forward_noise_on_image_tokens_equals_the_naive_loop(llava):
    """The image site of LLaVA is the LM's input at the image tokens (from cache.positions); per-forward draws run
    whole forwards (no KV prefix), and still equal the loop."""
    model, clean, answer = llava
    c = corruption.multiplicative(1.0, 3.0, redraw="forward", seed=1)
    T = clean["input_ids"].shape[1]
    positions = [T - 2, T - 1]
    result = patching.causal_trace(model, clean, answer, tower="lm", corrupt=c, positions=positions, samples=2,
                                   progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(**clean, names_filter="lm.hook_inputs_embeds")
    mask = model.image_embeddings_mask(cache.positions)
    assert mask.sum() == 2 * model.cfg.tokens_per_image

    def restore(act, src, v):
        return restore_position(act, src, positions[v])

    expected = naive_corrupted(model, clean, c, "lm.hook_inputs_embeds", mask,
                               window_hooks(model, "lm", "hook_resid_post", 1), 2, metrics.prob(answer), samples=2,
                               restore=restore, n_layers=model.tower_info("lm").n_layers)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-5)


def test_llava_shared_draw_resumes_on_the_suffix(llava):
    """With one draw per sample, cells at the last tokens resume after the KV prefix (the corrupted run's keys and
    values), as with corrupted inputs."""
    model, clean, answer = llava
    c = corruption.gaussian(3.0, seed=2)
    T = clean["input_ids"].shape[1]
    lengths = []
    counter = model.lm.register_forward_hook(lambda tower, args, out: lengths.append(out.shape[1]))
    try:
        result = patching.causal_trace(model, clean, answer, tower="lm", corrupt=c, positions=[T - 1],
                                       progress=False)
    finally:
        counter.remove()
    assert set(lengths[2:]) == {1}
    legacy = patching.causal_trace(model, clean, answer, tower="lm", positions=[T - 1], seed=2, progress=False)
    torch.testing.assert_close(result, legacy, atol=0, rtol=0)


class LinearReadout(HookedVLM):
    """A ViT without its final norm, read out linearly, whose last MLP outputs zero: the logits are linear in the
    last block's stream, so attribution patching is exact there (as in test_patching)."""

    tower_names = ("vision",)

    def __init__(self, cfg):
        super().__init__()
        from torch import nn

        from hooked_vlm.towers.vit import VisionTower

        self.vision = VisionTower(cfg)
        self.readout = nn.Linear(cfg.d_model, 5)
        self.setup()

    def forward(self, pixel_values=None, **unused):
        return self.readout(self.vision(pixel_values))


def test_attribution_takes_a_corruption():
    """Attribution patching between the clean run and the run a corruption makes (its draw of sample 0, forward
    0): exact where the metric is linear in the patched activation, as with corrupted inputs."""
    from hooked_vlm.components import AttnConfig, BlockConfig, MLPConfig, NormConfig
    from hooked_vlm.tiny import randomize_parameters_
    from hooked_vlm.towers.vit import VisionConfig

    block = BlockConfig(32, AttnConfig(4, 8), MLPConfig(64), NormConfig("layer", 1e-5))
    model = LinearReadout(VisionConfig(16, 8, 3, block, ln_post=False))
    randomize_parameters_(model, seed=0, std=0.2)
    with torch.no_grad():
        model.vision.blocks[-1].mlp.out_weight.zero_()
        model.vision.blocks[-1].mlp.out_bias.zero_()
    model.eval()
    clean = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    metric = metrics.logit_diff(torch.tensor([0, 2]), torch.tensor([1, 3]))
    for c in (corruption.gaussian(1.0, site="vision.hook_embed", seed=3),
              corruption.multiplicative(1.0, 1.0, site="vision.hook_embed", positions=[1, 2], seed=4)):
        for direction in ("denoise", "noise"):
            exact = patching.patch_resid(model, clean, c, metric, tower="vision", hook="resid_post",
                                         direction=direction, progress=False)
            approx = patching.attribution_patch_resid(model, clean, c, metric, tower="vision", hook="resid_post",
                                                      direction=direction)
            torch.testing.assert_close(approx[-1], exact[-1], atol=1e-5, rtol=1e-5)
            kw = {"groups": ["all", [0, 3]], "normalize": True}
            exact = patching.patch_heads(model, clean, c, metric, tower="vision", direction=direction,
                                         progress=False, **kw)
            approx = patching.attribution_patch_heads(model, clean, c, metric, tower="vision", direction=direction,
                                                      **kw)
            assert approx.shape == exact.shape == (3, 4, 2)
            torch.testing.assert_close(approx[-1], exact[-1], atol=1e-4, rtol=1e-4)
