"""The hooked-vlm command on the tiny models of every family: outputs, defaults, and valid JSON.

The errors (one line, exit status 2) are in tests/bad_inputs/test_bad_cli.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedVLM, cli, corruption, metrics, patching
from hooked_vlm.tiny import build_llava, random_image

FAMILIES = {"tiny": "text_encoder", "tiny-llava": "lm", "tiny-instructblip": "lm",
            "tiny-instructblip-t5": "lm_encoder", "tiny-llava-phi": "lm"}  # --model -> the tower reading the prompt (the default sweep)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def strict_json(path):
    """Parse as strict JSON: NaN and Infinity (which Python's json accepts by default) are errors."""
    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def tiny_model(name: str) -> HookedVLM:
    hf, processor = cli.TINY_MODELS[name].build()
    return HookedVLM.from_hf(hf, processor=processor)


@pytest.mark.parametrize("name", FAMILIES)
def test_info_says_the_tiny_model_is_random(capsys, name):
    code, out, err = run(capsys, "info", "--model", name)
    model = tiny_model(name)
    assert code == 0, err
    assert "RANDOM weights" in out and f"{len(model.hook_dict)} hook points" in out
    info = model.tower_info(FAMILIES[name])
    assert f"{FAMILIES[name]}: {info.n_layers} layers, {info.n_heads} heads" in out


@pytest.mark.parametrize("name", FAMILIES)
def test_every_command_runs_on_every_family_by_default(capsys, tmp_path, name):
    """patch (heads and --resid), trace and lens with no option but the model: the family's template, tower and
    attention, finite results of the tower's shape."""
    model = tiny_model(name)
    tower = FAMILIES[name]
    info = model.tower_info(tower)
    code, _, err = run(capsys, "patch", "--model", name, "--out", str(tmp_path / "heads"), "--batch-size", "8")
    assert code == 0, err
    heads = strict_json(tmp_path / "heads" / "patch.json")
    expected_attention = "cross_attn" if any(info.has_cross_attn) else "attn"
    assert heads["tower"] == tower and heads["kind"] == f"{expected_attention} heads"
    assert [len(row) for row in heads["scores"]] == [info.n_heads] * info.n_layers
    tok = model.processor.tokenizer
    assert heads["answer_token_id"] == metrics.answer_token(tok, heads["answer"])
    assert heads["answer_token"] == tok.convert_ids_to_tokens(heads["answer_token_id"])

    code, _, err = run(capsys, "patch", "--model", name, "--resid", "--out", str(tmp_path / "resid"),
                       "--batch-size", "16")
    assert code == 0, err
    assert len(strict_json(tmp_path / "resid" / "patch.json")["scores"]) == info.n_layers

    code, _, err = run(capsys, "trace", "--model", name, "--out", str(tmp_path / "trace"), "--batch-size", "16")
    assert code == 0, err
    trace = strict_json(tmp_path / "trace" / "trace.json")
    assert trace["tower"] == tower and len(trace["scores"]) == info.n_layers

    code, out, err = run(capsys, "lens", "--model", name, "--k", "2")
    assert code == 0, err
    n_out = model.tower_info(model.output_tower).n_layers
    assert f"logit lens of {model.output_tower}" in out and f"layer {n_out - 1:3d}:" in out


def test_llava_patch_equals_the_library_on_the_templated_prompt(capsys, tmp_path):
    """The CLI's numbers are the library's on LLaVA-1.5's chat prompt, with the named answers' tokens."""
    clean_png, corrupt_png = tmp_path / "a.png", tmp_path / "b.png"
    random_image((48, 48), seed=1).save(clean_png)
    random_image((48, 48), seed=2).save(corrupt_png)
    code, _, err = run(capsys, "patch", "--model", "tiny-llava", "--clean-image", str(clean_png), "--corrupt-image",
                       str(corrupt_png), "--prompt", "what is in the picture?", "--answer", "cat",
                       "--wrong-answer", "dog", "--out", str(tmp_path / "out"))
    assert code == 0, err
    got = strict_json(tmp_path / "out" / "patch.json")

    hf, processor = build_llava(seed=0)
    model = HookedVLM.from_hf(hf, processor=processor)
    text = "USER: <image>\nwhat is in the picture? ASSISTANT:"
    clean = processor(images=random_image((48, 48), seed=1).convert("RGB"), text=text, return_tensors="pt")
    corrupt = processor(images=random_image((48, 48), seed=2).convert("RGB"), text=text, return_tensors="pt")
    cat, dog = metrics.answer_token(processor.tokenizer, "cat"), metrics.answer_token(processor.tokenizer, "dog")
    expected = patching.patch_heads(model, dict(clean), dict(corrupt), metrics.logit_diff(cat, dog), tower="lm",
                                    attention="attn", normalize=True, progress=False)
    assert (got["answer_token_id"], got["wrong_answer_token_id"]) == (cat, dog)
    torch.testing.assert_close(torch.tensor(got["scores"]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--resid"], ["--prompt", "what color is the dog?", "--corrupt-prompt",
                                                     "what color is the car?", "--attention", "attn"]])
def test_patch_writes_heatmap_json_csv(capsys, tmp_path, extra):
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, "patch", "--out", str(tmp_path), *extra)
    assert code == 0, err
    data = strict_json(tmp_path / "patch.json")
    assert len(data["scores"]) == 2 and (tmp_path / "patch.csv").read_text().startswith("layer,")
    assert (tmp_path / "patch.png").stat().st_size > 1000


def test_trace_window_and_lens(capsys, tmp_path):
    code, _, err = run(capsys, "trace", "--out", str(tmp_path), "--kind", "attn", "--window", "2")
    assert code == 0, err
    assert strict_json(tmp_path / "trace.json")["window"] == 2
    code, out, _ = run(capsys, "lens", "--k", "3")
    assert code == 0 and "layer   1:" in out


def _scores(path) -> torch.Tensor:
    return torch.tensor([[math.nan if v is None else v for v in row] for row in strict_json(path)["scores"]])


def test_trace_corruptions(capsys, tmp_path):
    """The default --corruption gaussian is the library's causal_trace with noise=3 and seed 0 (as before the
    option existed); --corruption multiplicative (Palit et al.'s eps ~ N(1, 5), drawn anew in every forward) runs
    and gives other scores, and the JSON says which corruption made them."""
    code, _, err = run(capsys, "trace", "--out", str(tmp_path / "gaussian"), "--batch-size", "16")
    assert code == 0, err
    code, _, err = run(capsys, "trace", "--corruption", "multiplicative", "--redraw", "forward", "--out",
                       str(tmp_path / "multiplicative"), "--batch-size", "16")
    assert code == 0, err
    gaussian, multiplicative = (_scores(tmp_path / kind / "trace.json") for kind in ("gaussian", "multiplicative"))
    assert gaussian.shape == multiplicative.shape and torch.isfinite(multiplicative).any()
    assert not torch.allclose(gaussian, multiplicative, equal_nan=True)
    meta = strict_json(tmp_path / "multiplicative" / "trace.json")
    assert meta["corruption"] == {"kind": "multiplicative", "mean": 1.0, "std": 5.0, "site": "image",
                                  "positions": None, "seed": 0, "redraw": "forward"}
    assert strict_json(tmp_path / "gaussian" / "trace.json")["noise"] == 3.0

    model = tiny_model("tiny")
    pair = corruption.synthetic_pairs(1, "color", seed=0)[0]
    inputs = dict(model.processor(images=pair.clean_image, text=model.prompt_template.format(question=pair.prompt),
                                  return_tensors="pt"))
    with torch.no_grad():
        target = model(**inputs)[:, -1].argmax(-1)
    expected = patching.causal_trace(model, inputs, target, tower="text_encoder", noise=3.0, seed=0, normalize=True,
                                     progress=False)
    torch.testing.assert_close(gaussian, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_non_finite_scores_are_written_as_null_with_a_warning(capsys, tmp_path, monkeypatch):
    """A sweep that returns NaN and inf (as normalisation does when clean and corrupted agree) gives valid JSON,
    empty CSV cells and a one-line warning that says how many and why."""
    real = patching.patch_heads

    def with_non_finite(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores[0, 0], scores[1, 1] = math.nan, math.inf
        return scores

    monkeypatch.setattr(patching, "patch_heads", with_non_finite)
    code, _, err = run(capsys, "patch", "--out", str(tmp_path), "--batch-size", "8")
    assert code == 0, err
    scores = strict_json(tmp_path / "patch.json")["scores"]
    assert scores[0][0] is None and scores[1][1] is None and all(
        isinstance(v, float) for row in scores for v in row if v is not None)
    assert (tmp_path / "patch.csv").read_text().splitlines()[1].startswith("0,,")
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "2 of 8 scores are not finite" in warning[0] and "metric(clean)" in warning[0]


def test_layers_without_the_patched_attention_are_null_and_named(capsys, tmp_path):
    """InstructBLIP's Q-Former has cross-attention in some layers only: the others are null, and the warning says
    that this is why (not a normalisation problem)."""
    code, _, err = run(capsys, "patch", "--model", "tiny-instructblip", "--tower", "qformer", "--attention",
                       "cross_attn", "--out", str(tmp_path), "--batch-size", "8")
    assert code == 0, err
    scores = strict_json(tmp_path / "patch.json")["scores"]
    has_cross = tiny_model("tiny-instructblip").tower_info("qformer").has_cross_attn
    without = [layer for layer, has in enumerate(has_cross) if not has]
    assert without and all(has_cross[i] == all(v is not None for v in row) for i, row in enumerate(scores))
    assert f"layers {without} of 'qformer' have no cross_attn.hook_z" in err and "metric(clean)" not in err


def test_every_option_has_help_with_its_default():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            if action.default not in (None, False):
                assert f"(default: {action.default})" in text, f"{name} {action.option_strings} hides its default"


# ------------------------------------------------------------------------------------------ --dtype and --batch-size
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_loads_the_tiny_model_in_that_dtype(capsys, tmp_path, dtype):
    """--dtype reaches the weights: `info` reports them in that dtype, and patch's JSON records the dtype it ran in
    (its metric is accumulated in float32, so the scores stay finite)."""
    code, out, err = run(capsys, "info", "--model", "tiny-llava", "--dtype", dtype)
    assert code == 0, err
    assert f"M parameters in {dtype}" in out
    code, _, err = run(capsys, "patch", "--model", "tiny-llava", "--dtype", dtype, "--out", str(tmp_path),
                       "--batch-size", "8")
    assert code == 0, err
    data = strict_json(tmp_path / "patch.json")
    assert data["dtype"] == dtype and any(v is not None for row in data["scores"] for v in row)


def test_dtype_reads_a_checkpoint_folder_in_that_dtype(capsys, tmp_path):
    """A float32 checkpoint on disk, loaded with --dtype bfloat16, is bfloat16 (the from_pretrained path, not the
    tiny models' from_hf); without --dtype it keeps its own float32."""
    tiny_model("tiny").save_pretrained(tmp_path / "ckpt")
    code, out, err = run(capsys, "info", "--model", str(tmp_path / "ckpt"), "--dtype", "bfloat16")
    assert code == 0, err
    assert "M parameters in bfloat16" in out
    code, out, err = run(capsys, "info", "--model", str(tmp_path / "ckpt"))
    assert code == 0 and "M parameters in float32" in out, err


def test_dtype_outside_the_choices_is_one_line(capsys):
    code, out, err = run(capsys, "lens", "--dtype", "int8")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--dtype" in err and "bfloat16" in err


@pytest.mark.parametrize("command,sweep", [("patch", "patch_heads"), ("trace", "causal_trace")])
def test_batch_size_reaches_the_sweep(capsys, tmp_path, monkeypatch, command, sweep):
    seen = []
    real = getattr(patching, sweep)

    def spy(*args, **kwargs):
        seen.append(kwargs.get("batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(patching, sweep, spy)
    code, _, err = run(capsys, command, "--out", str(tmp_path), "--batch-size", "3")
    assert code == 0, err
    assert seen == [3]


# ------------------------------------------------------------------------------------------ the examples' flags
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_example_offers_dtype_and_batch_size(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(script)
    try:
        with pytest.raises(SystemExit) as exit:
            module.main(["--help"])
    finally:
        sys.modules.pop(script, None)
    text = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0 and "--dtype {float32,float16,bfloat16}" in text and "--batch-size" in text


def test_example_runs_in_the_dtype_and_batch_size_asked(tmp_path, monkeypatch):
    """llava_object_patches with --dtype bfloat16 --batch-size 3: its sweep gets a bfloat16 model and batches of 3."""
    pytest.importorskip("matplotlib")
    seen = []
    real = patching.patch_resid

    def spy(model, *args, **kwargs):
        seen.append((model.dtype, kwargs.get("batch_size")))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(patching, "patch_resid", spy)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module("llava_object_patches")
    try:
        assert module.main(["--out", str(tmp_path), "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "3"]) == 0
    finally:
        sys.modules.pop("llava_object_patches", None)
    assert seen == [(torch.bfloat16, 3)]


@pytest.mark.parametrize("value", ["0", "x"])
def test_example_batch_size_must_be_a_positive_integer(value, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module("llava_object_patches")
    try:
        with pytest.raises(SystemExit) as exit:
            module.main(["--batch-size", value])
    finally:
        sys.modules.pop("llava_object_patches", None)
    assert exit.value.code == 2 and "--batch-size" in capsys.readouterr().err
