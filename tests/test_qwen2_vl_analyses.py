"""Every documented analysis on Qwen2-VL and Qwen2.5-VL (tiny random models built in the test), each against an
independent reference written out here: attention knockout against a renormalised pattern, the head sweeps, causal
tracing and span patching against one forward per cell, set ablations against hand-written hooks, direct logit
attribution against the logit, the projector's mean against `model.image_features`, batched evaluation against one
example at a time. Images of different sizes (different merged grids) in one batch, left padding included."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, analysis, evaluation, interventions, metrics, patching
from hooked_vlm.head_ablation import head_set_ablation
from hooked_vlm.patching import ImagePatches
from hooked_vlm.tiny import build_qwen2_vl, random_image

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
# merged grids 4 x 5 and 6 x 6 (patch grids 8 x 10, 12 x 12): different spans, row 0 left-padded
IMAGES = [random_image((40, 30), seed=0), random_image((50, 50), seed=1)]
PROMPTS = [f"{IMG}what is in the picture?", f"hi {IMG} tell"]
VERSIONS = {"qwen2": "2", "qwen2.5": "2.5"}


@pytest.fixture(scope="module", params=list(VERSIONS))
def qwen(request):
    hf, processor = build_qwen2_vl(seed=3, version=VERSIONS[request.param])
    model = HookedVLM.from_hf(hf, processor=processor)
    clean = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    corrupt = {**clean, "pixel_values": clean["pixel_values"].flip(0)}  # other pixels, same grids and token counts
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])
    return model, clean, corrupt, metric


def _spans(model, inputs):
    return [row[0] for row in model.positions(**inputs).image]


def _naive(model, target, source, metric, cells, hook_name):
    """One forward of `target` per cell, `hook_name` edited by `edit(act, src)` from the `source` run."""
    with torch.no_grad():
        _, cache = model.run_with_cache(**source, names_filter=hook_name)
    rows = torch.arange(target["input_ids"].shape[0])
    out = []
    for edit in cells:
        def hook(act, hook, edit=edit):
            return edit(act.clone(), cache[hook.name])
        with torch.no_grad():
            out.append(metric(model.run_with_hooks(**target, fwd_hooks=[(hook_name, hook)]), rows).mean())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ knockout
def test_attention_knockout_equals_a_renormalised_pattern(qwen):
    """Blocking the last token from the image span (scores to -inf) equals zeroing those pattern entries and
    renormalising each row, written by hand on `hook_pattern`; the blocked entries are exactly 0."""
    model, inputs, _, _ = qwen
    positions = model.positions(**inputs)
    last = positions.last.tolist()
    image = [s.indices.tolist() for s in _spans(model, inputs)]
    layers = range(model.tower_info("lm").n_layers)
    hooks = interventions.attention_knockout(model, [[p] for p in last], image, layers)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        ours, cache = model.run_with_cache(**inputs, names_filter=lambda n: n.endswith("hook_pattern"))

    def renormalise(pattern, hook):
        pattern = pattern.clone()
        for b in range(pattern.shape[0]):
            pattern[b, :, last[b], image[b]] = 0
            pattern[b, :, last[b]] /= pattern[b, :, last[b]].sum(-1, keepdim=True)
        return pattern

    with torch.no_grad():
        ref = model.run_with_hooks(**inputs, fwd_hooks=[(f"lm.blocks.{i}.attn.hook_pattern", renormalise)
                                                        for i in layers])
        clean = model(**inputs)
    for layer in layers:
        for b in range(2):
            assert torch.all(cache["lm", layer, "pattern"][b, :, last[b], image[b]] == 0)
    keep = inputs["attention_mask"].bool()
    # measured max |diff| 1.3e-6 (both versions); the knockout itself moves the last logits by 2.3-3.1
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
    assert (ours[:, -1] - clean[:, -1]).abs().max() > 0.1
    assert not any(h.has_hooks for h in model.hook_dict.values())


# ------------------------------------------------------------------------------------------ sweeps
# Measured max |sweep - naive loop| on both versions: 0 for the head, span and ablation sweeps (the same forwards,
# resumed), 1.7e-8 for causal tracing; atol 1e-6.
def test_patch_heads_equals_naive_loop(qwen):
    model, clean, corrupt, metric = qwen
    result = patching.patch_heads(model, clean, corrupt, metric, tower="lm", batch_size=3, progress=False)
    H = model.tower_info("lm").n_heads

    def head(h):
        def edit(act, src):
            act[:, :, h] = src[:, :, h]
            return act
        return edit

    for layer in range(model.tower_info("lm").n_layers):
        expected = _naive(model, corrupt, clean, metric, [head(h) for h in range(H)], f"lm.blocks.{layer}.attn.hook_z")
        torch.testing.assert_close(result[layer], expected, atol=1e-6, rtol=0)
    assert result.abs().sum() > 0


def test_vision_patch_heads_equals_naive_loop(qwen):
    """The vision tower's rows are images (padded to the largest): a head patched on every row and position."""
    model, clean, corrupt, metric = qwen
    result = patching.patch_heads(model, clean, corrupt, metric, tower="vision", activation="v", progress=False)
    H = model.tower_info("vision").n_heads

    def head(h):
        def edit(act, src):
            act[:, :, h] = src[:, :, h]
            return act
        return edit

    for layer in range(model.tower_info("vision").n_layers):
        expected = _naive(model, corrupt, clean, metric, [head(h) for h in range(H)],
                          f"vision.blocks.{layer}.attn.hook_v")
        torch.testing.assert_close(result[layer], expected, atol=1e-6, rtol=0)


def test_causal_trace_image_noise_equals_naive_loop(qwen):
    """ROME's loop written out: Gaussian noise (3 x the std of the image tokens' embeddings, seeded) on the image
    tokens of the LM's input, then each layer's clean stream restored at one position."""
    model, inputs, _, _ = qwen
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    target = logits[:, -1].argmax(-1)
    T = inputs["input_ids"].shape[1]
    cells = [3, 10, T - 1]
    result = patching.causal_trace(model, inputs, target, tower="lm", positions=cells, seed=2, batch_size=4,
                                   progress=False)
    site = model.image_embeddings_hook
    values = cache[site]
    sites = torch.zeros(values.shape[:2], dtype=torch.bool)
    for b, span in enumerate(_spans(model, inputs)):
        sites[b, span.start:span.stop] = True
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(2)) * 3.0 * values[sites].std()
    noise = torch.where(sites[..., None], noise, 0.0)
    rows = torch.arange(2)
    for layer in range(model.tower_info("lm").n_layers):
        name = f"lm.blocks.{layer}.hook_resid_post"
        for j, p in enumerate(cells):
            def restore(act, hook, p=p):
                act = act.clone()
                act[:, p] = cache[name][:, p]
                return act
            with torch.no_grad():
                out = model.run_with_hooks(**inputs, fwd_hooks=[(site, lambda t, hook: t + noise), (name, restore)])
            expected = metrics.prob(target)(out, rows).mean()
            torch.testing.assert_close(result[layer, j], expected, atol=1e-6, rtol=0)


def test_span_groups_on_the_merged_grid_equal_naive_loop(qwen):
    """groups="image" and an `ImagePatches` object (the merged grid's bottom-right 2 x 2 tokens) per example."""
    model, clean, corrupt, metric = qwen
    spans = _spans(model, clean)
    grids = model.merged_grids(clean["image_grid_thw"])
    assert grids[0] != grids[1]
    rows, cols = grids[0]
    obj = ImagePatches(rows=[rows - 2, rows - 1], cols=[cols - 2, cols - 1])
    members = [[s.indices for s in spans], [s.patches([rows - 2, rows - 1], [cols - 2, cols - 1]) for s in spans]]
    # the bottom-right corner of the 4 x 5 grid: its last token and the ones a row above, by hand
    start, stop = spans[0].start, spans[0].stop
    assert members[1][0].tolist() == [stop - cols - 2, stop - cols - 1, stop - 2, stop - 1]
    assert members[1][0].min() >= start
    result = patching.patch_resid(model, clean, corrupt, metric, tower="lm", hook="resid_pre",
                                  groups={"image": "image", "object": obj}, batch_size=4, progress=False)

    def group(g):
        def edit(act, src):
            for b in range(act.shape[0]):
                act[b, members[g][b]] = src[b, members[g][b]]
            return act
        return edit

    for layer in range(model.tower_info("lm").n_layers):
        expected = _naive(model, corrupt, clean, metric, [group(0), group(1)], f"lm.blocks.{layer}.hook_resid_pre")
        torch.testing.assert_close(result[layer], expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ ablations
def test_ablation_sweep_equals_naive_loop(qwen):
    model, inputs, _, metric = qwen
    result = patching.ablation_sweep(model, inputs, metric, tower="lm", mode="zero", progress=False)
    H = model.tower_info("lm").n_heads
    rows = torch.arange(2)
    for layer in range(model.tower_info("lm").n_layers):
        for h in range(H):
            def zero(z, hook, h=h):
                z = z.clone()
                z[:, :, h] = 0
                return z
            with torch.no_grad():
                out = model.run_with_hooks(**inputs, fwd_hooks=[(f"lm.blocks.{layer}.attn.hook_z", zero)])
            torch.testing.assert_close(result[layer, h], metric(out, rows), atol=1e-6, rtol=0)


def test_head_set_ablation_equals_hand_written_hooks(qwen):
    model, inputs, _, _ = qwen
    with torch.no_grad():
        logits = model(**inputs)
    answer = logits[:, -1].argmax(-1)
    heads = [(0, 1), (1, 0)]
    table = head_set_ablation(model, inputs, answer, sets={"mine": heads}, random_trials=0)

    def zero(head):
        def hook(z, hook):
            z = z.clone()
            z[:, :, head] = 0
            return z
        return hook

    with torch.no_grad():
        ablated = model.run_with_hooks(**inputs, fwd_hooks=[(f"lm.blocks.{l}.attn.hook_z", zero(h)) for l, h in heads])
    p = lambda out: out[:, -1].softmax(-1)[torch.arange(2), answer]  # noqa: E731
    accuracy = (ablated[:, -1].argmax(-1) == answer).float().mean()
    torch.testing.assert_close(torch.as_tensor(table["mine"]["accuracy"], dtype=torch.float32), accuracy)
    torch.testing.assert_close(torch.as_tensor(table["mine"]["mean_prob"], dtype=torch.float32),
                               p(ablated).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.as_tensor(table["mine"]["mean_drop"], dtype=torch.float32),
                               (p(logits) - p(ablated)).mean(), atol=1e-6, rtol=0)
    assert table["baseline"]["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------ DLA
def test_decompose_resid_logit_attrs_sum_to_the_logit(qwen):
    """TransformerLens's DLA: the stream's parts through the final RMSNorm (scale frozen) sum to the logit
    (Qwen2's final norm has no bias)."""
    model, inputs, _, _ = qwen
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
    stack = cache.decompose_resid(tower="lm")
    token = logits[:, -1].argmax(-1)
    attrs = cache.logit_attrs(stack[:, :, -1], token, tower="lm", pos_slice=-1)
    assert attrs.shape == (2 * model.tower_info("lm").n_layers + 1, 2)
    # measured max |diff| 4.8e-7
    torch.testing.assert_close(attrs.sum(0), logits[torch.arange(2), -1, token], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ means, evaluation
def test_projector_mean_stops_early_and_equals_image_features(qwen):
    """The merger's mean token over real image tokens (over="tokens") never runs the LM and equals the mean of
    `model.image_features` over each image's real tokens (rows are padded to the largest image)."""
    model, inputs, _, _ = qwen
    calls = []
    handle = model.lm.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        means = analysis.mean_activation(model, [inputs], "projector.hook_out", over="tokens", progress=False)
    finally:
        handle.remove()
    assert not calls
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    counts = [r * c for r, c in model.merged_grids(inputs["image_grid_thw"])]
    real = torch.cat([features[i, :n] for i, n in enumerate(counts)])
    # measured max |diff| 0 (both float64 sums over the same rows)
    torch.testing.assert_close(means["projector.hook_out"], real.double().mean(0).float(), atol=1e-6, rtol=0)


def test_first_token_and_generate_batched_equal_one_by_one(qwen):
    model, _, _, _ = qwen
    images = [random_image((40, 30), seed=4), random_image((50, 50), seed=5), random_image((60, 30), seed=6)]
    questions = ["what is it?", "name the object in this picture", "and this?"]
    classes = ["cat", "dog", "car"]
    batched = evaluation.first_token(model, images, questions, classes, batch_size=3, keep_probs=True)
    alone = [evaluation.first_token(model, [i], [q], [c], batch_size=1, keep_probs=True)
             for i, q, c in zip(images, questions, classes)]
    assert batched.token.tolist() == [int(a.token[0]) for a in alone]
    # measured max |diff| 1.9e-8
    torch.testing.assert_close(batched.probs, torch.cat([a.probs for a in alone]), atol=1e-6, rtol=0)
    prompts = [evaluation.prompt(model, q) for q in questions]
    gen = evaluation.generate(model, images, prompts, max_new_tokens=4, batch_size=3)
    for k, (i, p) in enumerate(zip(images, prompts)):
        one = evaluation.generate(model, [i], [p], max_new_tokens=4, batch_size=1)
        assert torch.equal(gen.tokens[k], one.tokens[0]) and gen.texts[k] == one.texts[0]


# ------------------------------------------------------------------------------------------ saved processors
@pytest.mark.parametrize("processor_class", ["as saved", "Qwen2VLImageTextProcessor"])
def test_from_pretrained_folder_loads_the_whole_processor(tmp_path, processor_class):
    """A saved Qwen2-VL folder (as the tiny processor saves it now, or as it saved it before: its own class name and
    no video processor) loads a processor that expands the image placeholders, without torchvision; hooked_vlm's
    own folder keeps it."""
    import json

    hf, processor = build_qwen2_vl(seed=1)
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    if processor_class != "as saved":
        config = json.loads((tmp_path / "processor_config.json").read_text())
        config.pop("video_processor")
        (tmp_path / "processor_config.json").write_text(json.dumps({**config, "processor_class": processor_class}))
    model = HookedVLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model.processor is not None and hasattr(model.processor, "image_processor")
    ref = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    ours = model.processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    with torch.no_grad():
        keep = ref["attention_mask"].bool()
        torch.testing.assert_close(model(**ours)[keep], hf(**ref).logits[keep], atol=2e-5, rtol=0)
    model.save_pretrained(tmp_path / "hooked")
    again = HookedVLM.from_pretrained(tmp_path / "hooked")
    assert torch.equal(again.processor(images=IMAGES[:1], text=PROMPTS[:1], return_tensors="pt")["input_ids"],
                       processor(images=IMAGES[:1], text=PROMPTS[:1], return_tensors="pt")["input_ids"])


def test_saved_processor_is_hfs_qwen2vl_processor(tmp_path):
    """The saved folder names HF's class (processor_config.json and tokenizer_config.json) and holds the video
    processor config HF's AutoVideoProcessor needs, with the image processor's patch and resize settings."""
    import json

    _, processor = build_qwen2_vl(seed=1, version="2.5")
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    image, video = config["image_processor"], config["video_processor"]
    assert video.pop("video_processor_type") == "Qwen2VLVideoProcessor"
    assert video == {k: image[k] for k in ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale",
                                           "rescale_factor", "do_normalize", "image_mean", "image_std", "patch_size",
                                           "temporal_patch_size", "merge_size")}
    assert (video["patch_size"], video["size"]) == (4, {"shortest_edge": 256, "longest_edge": 2304})  # tiny's own
    with pytest.raises(ValueError, match="does not push to the Hub"):
        processor.save_pretrained(tmp_path / "pushed", push_to_hub=True)


def _stand_in_video_processor(monkeypatch):
    """HF's AutoVideoProcessor resolves the video processor class from the folder, and then needs torchvision to
    build it: stand in for that last step (the class lookup), recording the class asked for and the config that HF's
    own `get_video_processor_dict` finds in the folder. transformers exports VideoProcessorMixin (which the
    processor checks its video processor against) only with torchvision: export it here."""
    from transformers import processing_utils
    from transformers.models.auto import video_processing_auto
    from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

    asked = []

    class StandIn(VideoProcessorMixin):
        def __init__(self, config):
            self.config = config

        @classmethod
        def from_pretrained(cls, folder, **kwargs):
            return cls(BaseVideoProcessor.get_video_processor_dict(folder)[0])

    def load_backend_class(name, backend):
        asked.append((name, backend))
        return StandIn

    monkeypatch.setattr(video_processing_auto, "_load_backend_class", load_backend_class)
    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin,
                        raising=False)
    return asked


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_hfs_auto_processor_loads_the_saved_folder(tmp_path, monkeypatch, version):
    """Where torchvision is installed, processors.load_qwen2_vl_processor hands the folder to HF's AutoProcessor.
    Pretending torchvision is there (find_spec) and standing in only for building the video processor (which
    imports it), HF's own AutoProcessor loads the folder the tiny processor saved: HF's Qwen2VLProcessor, the video
    processor class and config it finds, and the same inputs as the processor that saved it. Without the stand-in,
    HF gets as far as the video processor's class and asks for torchvision."""
    import importlib.util
    import json

    import transformers

    from hooked_vlm.processors import load_qwen2_vl_processor, video_processor_config

    _, processor = build_qwen2_vl(seed=1, version=version)
    processor.save_pretrained(tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision"):
            transformers.AutoProcessor.from_pretrained(tmp_path)
    asked = _stand_in_video_processor(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torchvision" else real_find_spec(name, *a))
    loaded = load_qwen2_vl_processor(tmp_path)
    assert type(loaded) is transformers.Qwen2VLProcessor  # HF's class, not hooked_vlm's
    assert asked == [("Qwen2VLVideoProcessor", "torchvision")]
    written = json.loads(json.dumps(video_processor_config(processor.image_processor)))  # tuples as JSON lists
    assert loaded.video_processor.config == written
    ref = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    ours = loaded(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_a_processor_that_loads_without_its_image_part_raises(tmp_path):
    import json

    from hooked_vlm import serialization

    _, processor = build_qwen2_vl(seed=1)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["processor_class"] = "SomeUnknownProcessor"
    config["image_processor"]["image_processor_type"] = "SomeUnknownImageProcessor"
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="built only a"):
        serialization.load_processor(tmp_path)


def test_vision_sweeps_split_into_chunks_equal_the_whole_batch(qwen):
    """The vision tower's rows are the images, padded to the largest: a chunk of one example pads to its own image,
    and a cell past it (position 100: padding for the 8 x 10 grid's 80 patches) patches nothing there. Several
    images per prompt and text-only prompts: tests/test_multi_image_sweeps.py."""
    model, clean, corrupt, metric = qwen
    args = dict(tower="vision", hook="resid_post", positions=[0, 79, 100], progress=False)
    whole = patching.patch_resid(model, clean, corrupt, metric, **args)
    # measured max |chunked - whole| 0 on both versions
    torch.testing.assert_close(patching.patch_resid(model, clean, corrupt, metric, batch_size=1, **args), whole,
                               atol=1e-6, rtol=0)
    assert whole.abs().sum() > 0
