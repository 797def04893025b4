"""The tower protocol (`Tower.run`): every tower type started at a block from a stream by explicit arguments, the
position offset every tower reports while generating, and the blocks' rules for the attended sequence."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.components import AttnConfig, Block, BlockConfig, MLPConfig, NormConfig
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

IMAGES = [random_image(seed=0), random_image(seed=1)]
STEPS = 4  # the prompt's forward and three one-token steps


def _blip(kind, texts):
    hf, processor = build_blip(kind, seed=1)
    return HookedVLM.from_hf(hf, processor=processor), processor(images=IMAGES, text=texts, padding=True,
                                                                  return_tensors="pt")


def _llava():  # left-padded; the vision tower returns the streams after blocks 1 and 2
    hf, processor = build_llava(seed=1, vision_feature_layer=[1, -2])
    texts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    return HookedVLM.from_hf(hf, processor=processor), processor(images=IMAGES, text=texts, padding=True,
                                                                  return_tensors="pt")


def _instructblip(lm):
    hf, processor = build_instructblip(lm, seed=1, qf_layers=3)
    texts = ["what is in the picture?", "describe this image"]
    return HookedVLM.from_hf(hf, processor=processor), processor(images=IMAGES, text=texts, padding=True,
                                                                  return_tensors="pt")


BUILDERS = {"blip_caption": lambda: _blip("caption", ["a picture of", "a dog"]),
            "blip_vqa": lambda: _blip("vqa", ["what color is the car", "how many"]),
            "llava": _llava, "instructblip_t5": lambda: _instructblip("t5")}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = BUILDERS[case]()
        return cache[case]

    return get


def tower_call(model, inputs, name):
    """The arguments the model's forward passes to tower `name` (its first call)."""
    seen = []
    handle = model.tower(name).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args, kwargs)) if not seen else None, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    assert seen, f"the forward never called {name}"
    return seen[0]


# every tower type: ViT (BLIP, EVA, CLIP with feature layers), BERT encoder and decoder, Q-Former, Llama, T5 stacks
TOWERS = [("blip_vqa", "vision"), ("blip_vqa", "text_encoder"), ("blip_vqa", "text_decoder"), ("llava", "vision"),
          ("llava", "lm"), ("instructblip_t5", "vision"), ("instructblip_t5", "qformer"),
          ("instructblip_t5", "lm_encoder"), ("instructblip_t5", "lm_decoder")]


@pytest.mark.parametrize("case,name", TOWERS, ids=[f"{c}-{n}" for c, n in TOWERS])
@torch.no_grad()
def test_tower_started_at_a_block_equals_the_full_run(built, case, name):
    model, inputs = built(case)
    tower = model.tower(name)
    args, kwargs = tower_call(model, inputs, name)
    full = tower(*args, **kwargs)
    layer = 1
    streams = {}
    with model.hooks(fwd_hooks=[(f"{name}.blocks.{layer}.hook_resid_pre", lambda t, hook: streams.setdefault(0, t))]):
        tower(*args, **kwargs)
    ran = []
    spy = [(lambda n: n.startswith(f"{name}.") and (".blocks." not in n or n.endswith("hook_resid_pre")),
            lambda t, hook: ran.append(hook.name))]
    with model.hooks(fwd_hooks=spy):
        started = tower(*args, **kwargs, start_at_layer=layer, resid=streams[0])
    torch.testing.assert_close(started, full, rtol=1e-5, atol=1e-5)  # the spy on norm scales takes their slow path
    n_layers = model.tower_info(name).n_layers
    blocks = [n for n in ran if ".blocks." in n]
    assert blocks == [f"{name}.blocks.{i}.hook_resid_pre" for i in range(layer, n_layers)]
    assert not [n for n in ran if "embed" in n or "query_tokens" in n or "ln_pre" in n], "embeddings were recomputed"


@torch.no_grad()
def test_explicit_start_on_a_suffix_with_a_prefix_cache(built):
    """The Llama tower started at a block on the last positions, the earlier ones' keys and values given as `past`,
    equals the full run on those positions."""
    model, inputs = built("llava")
    args, kwargs = tower_call(model, inputs, "lm")
    full = model.lm(*args, **kwargs)
    layer, cut = 1, full.shape[1] - 3
    _, cache = model.run_with_cache(**inputs, names_filter=[f"lm.blocks.{layer}.hook_resid_pre",
                                                            *model.prefix_hook_names("lm", layer)])
    prefix = model.prefix_cache("lm", cache, cut, start_layer=layer)
    suffix = cache[f"lm.blocks.{layer}.hook_resid_pre"][:, cut:]
    started = model.lm(*args, **kwargs, past=prefix, start_at_layer=layer, resid=suffix)
    torch.testing.assert_close(started, full[:, cut:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_explicit_start_arguments_are_checked(built):
    model, inputs = built("blip_vqa")
    args, kwargs = tower_call(model, inputs, "vision")
    x = torch.zeros(2, model.vision.cfg.n_tokens, model.vision.cfg.d_model)
    with pytest.raises(ValueError, match="start_at_layer and resid together"):
        model.vision(*args, **kwargs, start_at_layer=1)
    with pytest.raises(ValueError, match="start_at_layer 3 is not in 0..2"):
        model.vision(*args, **kwargs, start_at_layer=3, resid=x)
    # the last block count is allowed: no block runs, the output map still applies (here ln_post)
    torch.testing.assert_close(model.vision(*args, **kwargs, start_at_layer=2, resid=x), model.vision.ln_post(x))


# ------------------------------------------------------------------------------------------ position offset
GENERATING = [("blip_caption", "text_decoder"), ("blip_vqa", "text_decoder"), ("llava", "lm"),
              ("instructblip_t5", "lm_decoder")]


@pytest.mark.parametrize("case,name", GENERATING, ids=[f"{c}-{n}" for c, n in GENERATING])
@torch.no_grad()
def test_position_offset_while_generating(built, case, name):
    """Read from inside each forward: 0 for the prompt, then the number of positions already cached; the towers
    that run once per generation (the image, the question, the T5 encoder) read 0."""
    model, inputs = built(case)
    offsets = {tower: [] for tower in model.towers()}
    lengths = []

    def record(t, hook):
        tower = hook.name.split(".")[0]
        offsets[tower].append(model.tower(tower).position_offset)
        if tower == name:
            lengths.append(t.shape[1])

    model.generate(**inputs, max_new_tokens=STEPS,
                   fwd_hooks=[(lambda n: n.endswith("blocks.1.hook_resid_pre"), record)])
    assert len(lengths) == STEPS, "generation stopped early: pick another seed"
    prompt = lengths[0]
    assert offsets[name] == [0] + [prompt + k for k in range(STEPS - 1)]
    for tower, seen in offsets.items():
        if tower != name:
            assert seen and set(seen) == {0}, tower


# ------------------------------------------------------------------------------------------ blocks
def _block(**kw):
    block = Block(BlockConfig(16, AttnConfig(2, 8), MLPConfig(32), NormConfig(), layout="post",
                              cross_attn=AttnConfig(2, 8, cross=True, kv_dim=12), **kw))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return block


def test_missing_cross_attention_input_is_an_error_unless_declared_optional():
    x, image = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    block = _block()
    with pytest.raises(ValueError, match="cross-attention but was given nothing to attend to: pass kv_input"):
        block(x)
    block(x, kv_input=image)  # given: runs

    optional = _block(cross_attn_optional=True)
    fired = []
    optional.hook_cross_attn_out.add_hook(lambda t, hook: fired.append(t))
    without = optional(x)
    assert not fired  # skipped: the stream goes from the self-attention straight to the MLP
    assert not torch.equal(without, optional(x, kv_input=image)) and len(fired) == 1


def test_qformer_block_routes_query_and_instruction_rows(built):
    """Queries alone read the image and go through `mlp`; the instruction rows go through `mlp_text`."""
    model, _ = built("instructblip_t5")
    block = model.qformer.blocks[0]
    n, D = model.cfg.qformer.n_query, model.cfg.qformer.d_model
    x, image = torch.randn(2, n + 5, D), torch.randn(2, 9, model.cfg.vision.d_model)
    seen = {}
    for point in ("hook_resid_mid", "hook_cross_attn_out", "hook_resid_mid_cross", "hook_mlp_out"):
        getattr(block, point).add_hook(lambda t, hook, point=point: seen.__setitem__(point, t))
    try:
        with torch.no_grad():
            out = block(x, kv_input=image)
            assert seen["hook_cross_attn_out"].shape == (2, n, D)
            torch.testing.assert_close(seen["hook_resid_mid_cross"][:, n:], seen["hook_resid_mid"][:, n:],
                                       rtol=0, atol=0)
            for mlp, changed in ((block.mlp, slice(0, n)), (block.mlp_text, slice(n, None))):
                kept = slice(n, None) if changed.start == 0 else slice(0, n)
                mlp.out_weight.mul_(2)
                edited = block(x, kv_input=image)
                mlp.out_weight.div_(2)
                assert not torch.allclose(edited[:, changed], out[:, changed])
                torch.testing.assert_close(edited[:, kept], out[:, kept], rtol=0, atol=0)
    finally:
        model.reset_hooks()
