"""The data `hooked_vlm.view` embeds equals what it shows: the cache's patterns, the sweep's scores, the lens's
tokens, read back from the HTML in Python and compared with the tensors they came from. The pages themselves are
driven in a real browser in test_view_browser.py."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from hooked_vlm import HookedVLM, analysis, cli, names, tiny, view
from hooked_vlm.view.attention import HeadSet, image_payload, render_attention
from hooked_vlm.view.payload import decode, dequantize, image_data_uri, image_from_pixels, quantize_rows
from hooked_vlm.view.tokens import TokenAxis, image_grid

FAMILIES = {
    "blip": lambda: tiny.build_blip("vqa", seed=1),
    "llava": lambda: tiny.build_llava(seed=1),
    "instructblip": lambda: tiny.build_instructblip("llama", seed=1),
    "instructblip-t5": lambda: tiny.build_instructblip("t5", seed=1),
}


def _run(family: str):
    hf, processor = FAMILIES[family]()
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = processor(images=tiny.random_image(seed=4), text=model.prompt_template.format(question="what is it?"),
                       return_tensors="pt")
    _, cache = model.run_with_cache(**inputs, names_filter=view.attention_names(model))
    return model, inputs, cache


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request):
    return (request.param, *_run(request.param))


def _pattern(cache, s: dict, layer: int) -> torch.Tensor:
    return cache[names.block(s["tower"], layer, names.leaf(s["attention"], "pattern"))][0]


def test_attention_payload_equals_cache(run):
    family, model, inputs, cache = run
    v = view.attention(model, cache, inputs=inputs, precision="float16", max_bytes=None)
    payload = view.load_payload(v.html)
    cached = {(names.parse(n).tower, names.parse(n).leaf) for n in cache.keys()}
    assert {(s["tower"], names.leaf(s["attention"], "pattern")) for s in payload["sets"]} == cached
    for s in payload["sets"]:
        values = decode(s["values"])  # [L, H, Q, S]
        for i, layer in enumerate(s["layers"]):
            expected = _pattern(cache, s, layer)[:, s["queries"]].float().half()
            assert np.array_equal(values[i], expected.numpy()), (s["name"], layer)
        assert s["queries"] == [i for i, r in enumerate(s["q_axis"]["real"]) if r]
    # the prompt tower's labels are to_str_tokens's; its image tokens' patches are the positions' spans
    prompt = next(s for s in payload["sets"] if s["tower"] == model.prompt_tower)
    assert prompt["q_axis"]["labels"] == model.to_str_tokens(inputs["input_ids"][0])
    for span in cache.positions.image[0] if cache.positions.image else []:
        assert prompt["q_axis"]["rows"][span.start:span.stop] == span.rows.tolist()
        assert prompt["q_axis"]["cols"][span.start:span.stop] == span.cols.tolist()
    # a cross-attention over the vision tower has the patch grid as keys: token 1 + r * grid + c is patch (r, c)
    grid = model.cfg.vision.grid
    for s in payload["sets"]:
        if s["attention"] == "cross_attn" and len(s["k_axis"]["labels"]) == grid * grid + 1:
            assert s["k_axis"]["rows"][1 + 2 * grid + 3] == 2 and s["k_axis"]["cols"][1 + 2 * grid + 3] == 3
    assert payload["grid"] == [grid, grid] and payload["image"]["uri"].startswith("data:image/")
    assert "This file holds" in v.html and v.holds in payload["holds"]


def test_attention_uint8_within_bound():
    model, inputs, cache = _run("llava")
    v = view.attention(model, cache, inputs=inputs, precision="uint8", max_bytes=None)
    worst = 0.0
    for s in view.load_payload(v.html)["sets"]:
        segment = np.array([i == 0 and r >= 0 for i, r in zip(s["k_axis"]["image"], s["k_axis"]["rows"])])
        scales = decode(s["scales"])
        got = dequantize(decode(s["values"]), scales, segment)
        for i, layer in enumerate(s["layers"]):
            exact = _pattern(cache, s, layer)[:, s["queries"]].float().numpy()
            bound = np.where(segment, scales[i][..., 1:2], scales[i][..., 0:1]) / 510
            err = np.abs(got[i] - exact)
            worst = max(worst, float((err / np.maximum(bound, 1e-30)).max()))
            assert (err <= bound * 1.0001 + 1e-9).all(), (s["name"], layer, float(err.max()))
    print(f"uint8: worst error {worst:.3f} of its bound (scale / 510)")


def test_quantize_rows_keeps_each_segment_own_range():
    """The image segment's small values are not crushed by a large text value in the same row."""
    row = torch.tensor([[0.9, 0.001, 0.002, 0.0005, 0.0965]])
    segment = torch.tensor([False, True, True, True, False])
    codes, scales = quantize_rows(row, segment)
    assert scales.tolist() == [[pytest.approx(0.9), pytest.approx(0.002)]]
    back = dequantize(codes.numpy(), scales.numpy(), segment.numpy())
    assert np.allclose(back[0, 1:4], [0.001, 0.002, 0.0005], atol=0.002 / 510 * 1.0001)
    with pytest.raises(ValueError, match="non-negative"):
        quantize_rows(-row, segment)


def _llava_7b_sets(n_text: int = 24, grid: int = 24, seed: int = 0) -> list[HeadSet]:
    """A 7B LLaVA's LM attention, shaped as in a real run (32 layers x 32 heads; 576 image tokens and `n_text`
    text tokens), random softmax rows, built without a model: every query row a view of one row per head (so the
    [32, 32, 600, 600] tensor takes no memory until the view picks its queries)."""
    g = torch.Generator().manual_seed(seed)
    n = grid * grid + n_text
    start = 5
    labels, rows, cols, image = [], [], [], []
    for p in range(n):
        patch = p - start
        if 0 <= patch < grid * grid:
            labels.append(f"<image 0:{patch // grid},{patch % grid}>")
            rows.append(patch // grid), cols.append(patch % grid), image.append(0)
        else:
            labels.append(f"tok{p}"), rows.append(-1), cols.append(-1), image.append(-1)
    axis = TokenAxis(labels, image, rows, cols)
    base = torch.randn(32, 32, 1, n, generator=g).mul(3).softmax(-1)
    return [HeadSet("lm", "attn", list(range(32)), base.expand(32, 32, n, n), list(range(n)), axis, axis)]


def test_size_of_a_7b_llava_view():
    """32 layers x 32 heads, 600 tokens, one example: every query's row would be 368 M values, so by default the
    view keeps the text tokens as queries, as uint8: ~20 MB, and says so in its header."""
    common = {"grid": [24, 24], "image": {"uri": image_data_uri(tiny.random_image((336, 336)))[0], "width": 336,
                                          "height": 336}}
    v = render_attention(_llava_7b_sets(), common, "the 24x24 patch grid and the image (336x336 px)")
    s = view.load_payload(v.html)["sets"][0]
    print(f"7B LLaVA attention view: {v.nbytes / 2**20:.1f} MiB ({s['precision']}, {len(s['queries'])} queries)")
    assert s["precision"] == "uint8" and len(s["queries"]) == 24
    assert v.nbytes < 32 * 2**20
    assert "24 of 600 query tokens" in v.html[:2000] and "image-patch tokens as queries were left out" in v.html[:2000]
    with pytest.raises(ValueError, match="max_bytes"):
        render_attention(_llava_7b_sets(), common, "", max_bytes=2**20)


def test_sweep_payload_equals_scores():
    model, inputs, cache = _run("llava")
    info = model.tower_info("lm")
    heads = torch.randn(info.n_layers, info.n_heads)
    heads[0, 1] = float("nan")
    v = view.sweep(heads, kind="heads", model=model, cache=cache, inputs=inputs, tower="lm")
    payload = view.load_payload(v.html)
    assert np.array_equal(decode(payload["scores"]), heads.numpy(), equal_nan=True)
    query = int(cache.positions.last[0])
    assert payload["query"] == query
    s = payload["sets"][0]
    for i, layer in enumerate(s["layers"]):
        assert np.array_equal(decode(s["values"])[i, :, 0], cache["lm", layer, "pattern"][0, :, query].half().numpy())
    T = inputs["input_ids"].shape[1]
    resid = torch.randn(info.n_layers, T)
    payload = view.load_payload(view.sweep(resid, kind="positions", model=model, inputs=inputs, tower="lm").html)
    assert payload["col_labels"] == model.to_str_tokens(inputs["input_ids"][0])
    assert np.array_equal(decode(payload["scores"]), resid.numpy())
    span = cache.positions.image[0][0]
    assert payload["axis"]["rows"][span.start:span.stop] == span.rows.tolist()


def test_lens_payload_equals_lens():
    model, inputs, _ = _run("llava")
    result = analysis.logit_lens(model, inputs, tower="lm", k=4, tokens=[5, 7])
    payload = view.load_payload(view.lens(model, result, inputs=inputs, token_names=["five", "seven"]).html)
    top, vocab = decode(payload["top"]), payload["vocab"]
    L, _, P, k = result.ids.shape
    assert [[[vocab[i] for i in row] for row in layer] for layer in top.tolist()] == [
        result.tokens[l][0] for l in range(L)]
    assert np.array_equal(decode(payload["top_ids"]), result.ids[:, 0].numpy())
    assert np.array_equal(decode(payload["probs"]), result.probs[:, 0].half().numpy())
    assert np.array_equal(decode(payload["token_probs"]), result.token_probs[:, 0].half().numpy())
    assert payload["positions"] == result.positions[0].tolist()
    assert payload["axis"]["labels"] == model.to_str_tokens(inputs["input_ids"][0])


def test_image_is_the_one_the_model_saw():
    """The image drawn under the grid, re-processed, gives the model's pixel values back (to 8-bit rounding)."""
    model, inputs, cache = _run("blip")
    v = view.attention(model, cache, inputs=inputs)
    image = image_from_pixels(inputs["pixel_values"][0], model.processor)
    again = model.processor(images=image, text="x", return_tensors="pt")["pixel_values"][0]
    std = torch.tensor(model.processor.image_processor.image_std).view(3, 1, 1)
    err = ((again - inputs["pixel_values"][0]) * std).abs().max().item()  # in [0, 1] pixel units
    print(f"re-processed image: max error {err:.5f} (8-bit rounding: {0.5 / 255:.5f})")
    assert err <= 0.5 / 255 + 1e-6
    assert view.load_payload(v.html)["image"]["width"] == image.width


def test_notebook_form_and_save(tmp_path):
    model, inputs, cache = _run("blip")
    v = view.attention(model, cache, tmp_path / "a.html", inputs=inputs)
    assert view.load_payload(tmp_path / "a.html") == v.payload == view.load_payload(v._repr_html_())
    assert v._repr_html_().startswith("<iframe") and "srcdoc=" in v._repr_html_()
    with pytest.raises(ValueError, match=r"\.html"):
        v.save(tmp_path / "a.png")


@pytest.mark.no_typecheck
def test_bad_inputs_say_what_to_fix():
    model, inputs, cache = _run("llava")
    _, empty = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("resid_post"))
    with pytest.raises(ValueError, match="attention_names"):
        view.attention(model, empty)
    with pytest.raises(ValueError, match="towers"):
        view.attention(model, cache, towers=["nope"])
    with pytest.raises(ValueError, match="queries"):
        view.attention(model, cache, queries=[999])
    with pytest.raises(ValueError, match="precision"):
        view.attention(model, cache, precision="int4")
    with pytest.raises(ValueError, match="2-d"):
        view.sweep(torch.zeros(2, 4, 3), kind="heads")
    with pytest.raises(ValueError, match="kind"):
        view.sweep(torch.zeros(2, 4), kind="cells")
    with pytest.raises(ValueError, match="labels"):
        view.sweep(torch.zeros(2, 4), kind="heads", labels=["a"])
    with pytest.raises(ValueError, match="layers"):
        view.sweep(torch.zeros(3, 4), kind="heads", model=model, tower="lm")
    with pytest.raises(TypeError, match="LogitLens"):
        view.lens(model, torch.zeros(3))


def test_cli_writes_views_next_to_its_files(tmp_path, capsys):
    """`--html` writes the view beside the PNG/JSON, holding the very scores the JSON holds (and, for the lens,
    the top-1 tokens the command prints)."""
    for argv in (["patch", "--html"], ["patch", "--resid", "--html"]):
        assert cli.main([*argv, "--model", "tiny-llava", "--out", str(tmp_path)]) == 0
        scores = np.array(json.loads((tmp_path / "patch.json").read_text())["scores"], dtype=np.float64)
        payload = view.load_payload(tmp_path / "patch.html")
        assert payload["mode"] == ("positions" if "--resid" in argv else "heads")
        np.testing.assert_array_equal(decode(payload["scores"]), scores.astype(np.float32))
    capsys.readouterr()
    assert cli.main(["lens", "--html", "--model", "tiny-llava", "--out", str(tmp_path), "--k", "2"]) == 0
    printed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("layer")]
    payload = view.load_payload(tmp_path / "lens.html")
    top = decode(payload["top"])
    assert [payload["vocab"][top[l, -1, 0]] for l in range(top.shape[0])] == printed


def test_grid_follows_the_image_tokens():
    """A grid that is not the config's square (dynamic resolution): the views draw as far as image 0's tokens reach."""
    cells = [(r, c) for r in range(3) for c in range(5)]
    axis = TokenAxis(["t"] + [f"<{r},{c}>" for r, c in cells] + ["u"], [-1] + [0] * 15 + [-1],
                     [-1] + [r for r, _ in cells] + [-1], [-1] + [c for _, c in cells] + [-1])
    assert image_grid([axis], None) == [3, 5]
    assert image_grid([TokenAxis.plain(4)], None) is None


def test_pixel_values_that_are_not_images_leave_the_grid_on_grey():
    """Flattened patches (Qwen2-VL's pixel_values) cannot be un-normalised per example: the view says so, draws no
    image, and takes image= instead."""
    model, _, _ = _run("llava")
    with pytest.warns(UserWarning, match="image="):
        assert image_payload(model, None, {"pixel_values": torch.zeros(20, 96)}, 0) is None
    assert image_payload(model, tiny.random_image(), {"pixel_values": torch.zeros(20, 96)}, 0)["width"] == 40


MULTI = {  # example 0 text-only, example 1 one image, example 2 two images (rows 0, 1, 2 of the vision tower)
    "qwen2-vl": (lambda: tiny.build_qwen2_vl(seed=2), "<|vision_start|><|image_pad|><|vision_end|>"),
    "llava": (lambda: tiny.build_llava(seed=1), "<image>"),
}


@pytest.mark.parametrize("family", list(MULTI))
def test_attention_of_several_images_and_a_text_only_example(family):
    """The vision tower has one row per image (`Positions.image_examples`): example e's image k is its row, the
    grid draws it; a text-only example leaves the vision tower's sets out."""
    build, img = MULTI[family]
    hf, processor = build()
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [tiny.random_image((24, 16), seed=0), tiny.random_image((16, 32), seed=1),
              tiny.random_image((32, 24), seed=2)]
    inputs = processor(images=images, text=["no picture here", f"{img} what is it?", f"{img} or {img} which?"],
                       padding=True, return_tensors="pt")
    _, cache = model.run_with_cache(**inputs, names_filter=view.attention_names(model))
    positions = cache.positions
    assert positions.image_examples.tolist() == [1, 2, 2]
    layer = names.block("vision", 0, "attn.hook_pattern")
    qwen = "vision" in positions.towers
    for example, image, row in [(0, 0, None), (1, 0, 0), (2, 0, 1), (2, 1, 2)]:
        with pytest.warns(UserWarning, match="image=") if qwen else contextlib.nullcontext():
            v = view.attention(model, cache, inputs=inputs, example=example, image_index=image, precision="float32",
                               max_bytes=None)
        payload = view.load_payload(v.html)
        sets = {s["tower"]: s for s in payload["sets"]}
        lm = decode(sets["lm"]["values"])
        assert np.array_equal(lm[0], cache[names.block("lm", 0, "attn.hook_pattern")][example][:, sets["lm"]["queries"]]
                              .float().numpy())
        if row is None:
            assert "vision" not in sets and payload["image"] is None
            continue
        values = decode(sets["vision"]["values"])
        assert np.array_equal(values[0], cache[layer][row][:, sets["vision"]["queries"]].float().numpy())
        # the prompt's axis numbers the chosen image 0: the grid draws that image's tokens
        span = positions.image[example][image]
        q = sets["lm"]["q_axis"]
        assert q["image"][span.start:span.stop] == [0] * (span.stop - span.start)
        if qwen:  # each image its own grid; the vision axis is that image's row
            assert sets["vision"]["q_axis"]["rows"][:len(positions.towers["vision"].image[row][0].rows)] == \
                positions.towers["vision"].image[row][0].rows.tolist()
            assert payload["grid"] == [int(positions.towers["vision"].image[row][0].rows.max()) + 1,
                                       int(positions.towers["vision"].image[row][0].cols.max()) + 1]
        else:  # the image drawn is the row's pixels
            assert payload["image"]["uri"] == image_data_uri(image_from_pixels(inputs["pixel_values"][row],
                                                                               processor))[0]
    with pytest.raises(ValueError, match="holds 1 image"):
        view.attention(model, cache, example=1, image_index=1)
    if not qwen:  # the other views (lens, sweep) draw the example's first image, found from the inputs
        assert image_payload(model, None, inputs, 2)["uri"] == image_data_uri(
            image_from_pixels(inputs["pixel_values"][1], processor))[0]
        assert image_payload(model, None, inputs, 0) is None
