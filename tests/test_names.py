"""hooked_vlm.names: hook names built and parsed in one place; HookPoint.tower and HookPoint.layer()."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedVLM, HookPoint, names
from hooked_vlm.names import HookName
from hooked_vlm.tiny import build_blip, random_image

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.txt"))
# the layout, written independently of names.py: tower, optional block index, leaf (dotted, ends in hook_*)
LAYOUT = re.compile(r"(?P<tower>[a-z_]+)\.(?:blocks\.(?P<layer>\d+)\.)?(?P<leaf>(?:[a-z0-9_]+\.)*hook_[a-z0-9_]+)")


def golden_names(path: Path) -> list[str]:
    return path.read_text().split()


@pytest.fixture(scope="module")
def vqa():
    hf, processor = build_blip("vqa", seed=5)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=[random_image(seed=6)], text=["what is it"], return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_every_golden_name_round_trips(path):
    """parse -> build gives the name back, and parse agrees with the layout read by a regex."""
    listed = golden_names(path)
    assert len(listed) > 20
    for name in listed:
        hook = names.parse(name)
        assert str(hook) == name
        expected = LAYOUT.fullmatch(name)
        assert expected is not None, name
        layer = expected["layer"]
        assert hook == HookName(expected["tower"], None if layer is None else int(layer), expected["leaf"]), name
        if hook.layer is None:
            assert names.tower_hook(hook.tower, hook.leaf) == name
            with pytest.raises(ValueError, match="tower-level"):
                names.layer_of(name)
        else:
            assert names.block(hook.tower, hook.layer, hook.leaf) == name
            assert name.startswith(names.block_prefix(hook.tower, hook.layer) + ".")
            assert names.layer_of(name) == hook.layer


@pytest.mark.parametrize("name, tower, layer, leaf", [
    ("text_decoder.head.ln.hook_scale", "text_decoder", None, "head.ln.hook_scale"),  # dotted tower-level leaf
    ("qformer.blocks.11.mlp_text.hook_post", "qformer", 11, "mlp_text.hook_post"),
    ("lm_decoder.blocks.0.ln_cross.hook_normalized", "lm_decoder", 0, "ln_cross.hook_normalized"),
    ("vision.hook_blocks", "vision", None, "hook_blocks"),  # "blocks" inside a leaf part is not the block list
    ("blocks_of_text.blocks.2.attn.hook_blocks_out", "blocks_of_text", 2, "attn.hook_blocks_out"),
    ("lm.blocks.10.hook_resid_pre_grad", "lm", 10, "hook_resid_pre_grad"),  # a gradient's cache key
])
def test_parse_takes_names_apart(name, tower, layer, leaf):
    assert names.parse(name) == HookName(tower, layer, leaf)
    assert str(names.parse(name)) == name


@pytest.mark.parametrize("name, rule", [
    ("", "none empty"),
    ("lm", "none empty"),  # no leaf
    ("hook_embed", "none empty"),  # no tower
    ("blocks.3.attn.hook_z", "start with their tower"),  # a TransformerLens name
    ("lm..hook_z", "none empty"),
    ("lm.hook_z.", "none empty"),
    ("lm.blocks.3", "layer number and a leaf"),
    ("lm.blocks.x.hook_z", "block index"),
    ("lm.blocks.-1.hook_z", "block index"),
    ("lm.blocks.03.hook_z", "block index"),
    ("lm.blocks.3.attn", "must end in one 'hook_"),
    ("lm.hook_a.hook_b", "must end in one 'hook_"),
    ("lm.blocks.3.blocks.4.hook_z", "dotted identifiers"),
    ("lm.head.blocks.hook_z", "contains 'blocks'"),
    ("lm.blocks.3.attn-2.hook_z", "dotted identifiers"),
    ("hook_x.hook_embed", "not a tower name"),
])
def test_malformed_names_raise_naming_the_rule(name, rule):
    with pytest.raises(ValueError, match=re.escape(rule)):
        names.parse(name)
    assert not names.in_blocks(None)(name)  # a filter does not select it, and does not raise


def test_builders():
    assert names.block("lm", 3, "attn.hook_pattern") == "lm.blocks.3.attn.hook_pattern"
    assert names.tower_hook("vision", "hook_embed") == "vision.hook_embed"
    assert names.block_prefix("lm", 12) == "lm.blocks.12"
    assert names.resid("text_encoder", 1, "mid_cross") == "text_encoder.blocks.1.hook_resid_mid_cross"
    assert names.leaf("cross_attn", "z") == names.leaf("cross_attn.z") == names.leaf("cross_attn", "hook_z") \
        == "cross_attn.hook_z"
    assert names.leaf("resid_pre") == names.leaf("hook_resid_pre") == "hook_resid_pre"


@pytest.mark.no_typecheck  # the library's own errors, which a user without the type checks meets
@pytest.mark.parametrize("build, error, match", [
    (lambda: names.block("lm", -1, "hook_z"), ValueError, "negative"),
    (lambda: names.block("lm", True, "hook_z"), TypeError, "not a block index"),
    (lambda: names.block("lm", "3", "hook_z"), TypeError, "not a block index"),
    (lambda: names.block("lm", 0, "attn.z"), ValueError, "must end in one"),
    (lambda: names.block("blocks", 0, "hook_z"), ValueError, "start with their tower"),
    (lambda: names.tower_hook("lm.blocks.0", "hook_z"), ValueError, "not a tower name"),
    (lambda: names.resid("lm", 0, "after"), ValueError, "'pre', 'mid'"),
    (lambda: names.leaf(), ValueError, "dotted identifiers"),
    (lambda: names.parse(3), TypeError, "must be a str"),
    (lambda: names.in_blocks("lm", "resid_pre"), ValueError, "must end in one"),
])
def test_bad_parts_raise(build, error, match):
    with pytest.raises(error, match=re.escape(match)):
        build()


def test_hook_point_tower_and_layer_on_a_model(vqa):
    model, _ = vqa
    towers, blocks = set(), 0
    for name, point in model.hook_dict.items():
        expected = LAYOUT.fullmatch(name)
        assert point.tower == expected["tower"], name
        towers.add(point.tower)
        if expected["layer"] is None:
            with pytest.raises(ValueError, match="no layer"):  # as TransformerLens, raise outside the blocks
                point.layer()
        else:
            blocks += 1
            assert point.layer() == int(expected["layer"]), name
            assert point.layer() < model.tower_info(point.tower).n_layers
    assert towers == set(model.tower_names) and blocks > 50


def test_hook_functions_read_tower_and_layer(vqa):
    """The TransformerLens idiom: one hook function for many points, told apart by `hook.layer()`."""
    model, inputs = vqa
    seen = []
    with torch.no_grad():
        model.run_with_hooks(**inputs, fwd_hooks=[(names.in_blocks(None, "hook_resid_post"),
                                                   lambda t, hook: seen.append((hook.tower, hook.layer())))])
    expected = [(t, i) for t in model.tower_names for i in range(model.tower_info(t).n_layers)]
    assert seen == expected


def test_an_unnamed_hook_point_has_no_tower_or_layer():
    point = HookPoint()
    with pytest.raises(ValueError, match="no name yet"):
        point.layer()
    with pytest.raises(ValueError, match="no name yet"):
        point.tower


def test_in_blocks_selects_a_towers_block_hooks(vqa):
    model, _ = vqa
    selected = [n for n in model.hook_dict if names.in_blocks("text_encoder", "hook_resid_pre", "attn.hook_z")(n)]
    n = model.tower_info("text_encoder").n_layers
    expected = [f"text_encoder.blocks.{i}.{leaf}" for i in range(n) for leaf in ("hook_resid_pre", "attn.hook_z")]
    assert selected == expected
    everything = [n for n in model.hook_dict if names.in_blocks(None)(n)]
    assert everything == [n for n in model.hook_dict if ".blocks." in n]


def test_cache_shorthand_goes_through_names(vqa):
    model, inputs = vqa
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs)
    assert cache["vision", "ln_post.scale"] is cache["vision.ln_post.hook_scale"]  # dotted tower-level shorthand
    assert cache["text_decoder", "head.ln.normalized"] is cache["text_decoder.head.ln.hook_normalized"]
    assert cache["text_encoder", 1, "cross_attn.hook_z"] is cache["text_encoder.blocks.1.cross_attn.hook_z"]
    n = model.tower_info("vision").n_layers
    assert cache["vision", -1, "resid_post"] is cache[names.resid("vision", n - 1, "post")]
    for bad in [("vision", 0, "attn..z"), ("vision", 0, "resid_pre-"), ("vision.blocks", 0, "z")]:
        assert bad not in cache
        with pytest.raises(KeyError, match="cache key"):
            cache[bad]
