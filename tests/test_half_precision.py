"""HF's half-precision rules, followed when a model is converted or loaded in float16.

transformers keeps some weights in float32 when it loads a model in float16 (`_keep_in_fp32_modules`, only for
float16: `PreTrainedModel._get_dtype_plan`): InstructBLIP's `query_tokens`, and T5's `wo` (the FFN's output
projection), which HF 5.x matches as a substring, so the Q-Former's `word_embeddings` stays float32 as well. T5's
FFN casts its input to `wo`'s dtype, so the stream becomes float32 after the first FFN, and T5LayerNorm hands each
sub-layer the weight's dtype again. T5Block clamps a float16 stream after each sub-layer (to +-(65504 - 1000) when any
of it overflowed to inf). The reference is HF's own `from_pretrained(dtype=torch.float16)` of the same folder, run
in the same test; the tolerances are about 2x the errors measured on a shared 2-core CPU (printed with `-s`).
"""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import build_instructblip, random_image
from weights_conversion import converter_for

IMAGES = [random_image(seed=3), random_image(seed=4)]
PROMPTS = ["what is in the picture?", "a picture of two cats"]
DECODER_IDS = torch.tensor([[0, 5, 7, 9, 11], [0, 4, 6, 1, 8]])


def _saved(lm: str, tmp_path, scale_attn_out: float | None = None):
    """A tiny InstructBLIP (float32) saved with its processor, and the batch; `scale_attn_out` multiplies the T5
    encoder's and decoder's first self-attention output projection, so that float16 overflows there."""
    hf, processor = build_instructblip(lm, seed=3)
    if scale_attn_out is not None:
        with torch.no_grad():
            for stack in ("encoder", "decoder"):
                hf.language_model.get_submodule(f"{stack}.block.0.layer.0.SelfAttention.o").weight.mul_(scale_attn_out)
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    inputs = processor(images=IMAGES, text=PROMPTS, padding=True, return_tensors="pt")
    if lm == "t5":
        inputs["decoder_input_ids"] = DECODER_IDS
    else:  # the mask-derived positions hooked_vlm numbers a left-padded prompt with
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return hf, processor, inputs


def _hf_half(path, dtype=torch.float16):
    from transformers import InstructBlipForConditionalGeneration

    hf = InstructBlipForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    hf.set_attn_implementation("eager")
    return hf


def _float32(named) -> set[str]:
    return {name for name, t in named if t.dtype == torch.float32}


def _half(inputs, dtype=torch.float16):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


# ------------------------------------------------------------------------------------------ what stays float32
@pytest.mark.parametrize("lm", ["t5", "llama"])
def test_float16_load_keeps_in_float32_what_hf_keeps(lm, tmp_path):
    """HF's float32 weights after its own float16 load, mapped to hooked names through the converter, are exactly the
    float32 parameters after `from_hf(..., dtype=float16)` and `from_pretrained(..., dtype=float16)` of the HF folder
    and of hooked_vlm's own (saved in float32), with HF's values bit for bit; a bfloat16 load keeps nothing, in HF and here."""
    hf, processor, _ = _saved(lm, tmp_path)
    hf16 = _hf_half(tmp_path)
    hf_kept = _float32(hf16.state_dict().items())
    converter = converter_for(hf)
    plan = converter.plan(hf.state_dict(), converter.config(hf.config))
    expected = {name for name, recipe in plan.recipes.items() if set(recipe.sources) & hf_kept}
    assert "qformer.query_tokens" in expected
    assert ("lm_encoder.blocks.0.mlp.out_weight" in expected) == (lm == "t5")
    converted = HookedVLM.from_hf(hf, processor=processor, dtype=torch.float16)
    converted32 = HookedVLM.from_hf(hf, processor=processor)
    converted32.save_pretrained(tmp_path / "hooked")  # hooked_vlm's own folder, float32, read back in float16
    for model in (converted, HookedVLM.from_pretrained(tmp_path, dtype=torch.float16),
                  HookedVLM.from_pretrained(tmp_path / "hooked", dtype=torch.float16)):
        params = dict(model.named_parameters())
        assert _float32(params.items()) == expected
        assert {p.dtype for name, p in params.items() if name not in expected} == {torch.float16}
        assert torch.equal(params["qformer.query_tokens"], hf16.query_tokens[0])
        if lm == "t5":
            wo = hf16.language_model.encoder.block[1].layer[1].DenseReluDense.wo.weight
            assert torch.equal(params["lm_encoder.blocks.1.mlp.out_weight"], wo)
    assert not _float32(_hf_half(tmp_path, torch.bfloat16).state_dict().items())
    for model in (HookedVLM.from_hf(hf, processor=processor, dtype=torch.bfloat16),
                  HookedVLM.from_pretrained(tmp_path, dtype=torch.bfloat16)):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------ parity in float16
def _t5_streams(model: HookedVLM, hf, inputs):
    """Ours and HF's T5 streams (HF's hidden states: the embeddings, each block's output but the last, then the
    final norm's output) and logits, in float16 inputs."""
    inputs = _half(inputs)
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
        out = hf(**inputs, output_hidden_states=True)
    lm = out.language_model_outputs
    pairs = {"logits": (logits, out.logits)}
    for tower, hidden in (("lm_encoder", lm.encoder_hidden_states), ("lm_decoder", lm.decoder_hidden_states)):
        n = model.tower_info(tower).n_layers
        pairs |= {f"{tower}.{layer}": (cache[tower, layer, "resid_pre"], hidden[layer]) for layer in range(n)}
        pairs[f"{tower}.ln_final"] = (cache[f"{tower}.ln_final.hook_normalized"], hidden[n])
    return pairs


def _check(pairs, tolerance: float, label: str) -> dict[str, float]:
    """Each site's largest error relative to HF's largest magnitude there (half precision rounds relative to
    scale: a stream clamped at 64512 carries errors of hundreds); printed with the absolute ones."""
    errors, absolute = {}, {}
    for site, (ours, ref) in pairs.items():
        assert ours.dtype == ref.dtype, f"{site}: ours {ours.dtype}, HF {ref.dtype}"
        assert torch.isfinite(ours).all(), f"{site}: ours is not finite"
        absolute[site] = (ours.double() - ref.double()).abs().max().item()
        errors[site] = absolute[site] / ref.double().abs().max().item()
    print(label, {site: f"{absolute[site]:.3g} ({errors[site]:.2g})" for site in errors})
    over = {site: err for site, err in errors.items() if err > tolerance}
    assert not over, f"{label}: relative errors over {tolerance}: {over}"
    return errors


def test_t5_float16_matches_hf_float16_load(tmp_path):
    """The stream is float16 up to the first FFN and float32 after it (its `wo` is float32), in HF and here; every
    stream and the logits within 0.0075 of HF's, relative to the largest magnitude (measured 0.0031; absolute 0.0098
    on streams, 0.0068 on logits: float16 rounding of different but equivalent kernels). Converted live and
    streamed from the folder alike."""
    hf, processor, inputs = _saved("t5", tmp_path)
    hf16 = _hf_half(tmp_path)
    for model in (HookedVLM.from_hf(hf, processor=processor, dtype=torch.float16),
                  HookedVLM.from_pretrained(tmp_path, dtype=torch.float16)):
        pairs = _t5_streams(model, hf16, inputs)
        assert pairs["lm_encoder.1"][0].dtype == torch.float32 and pairs["logits"][0].dtype == torch.float16
        _check(pairs, 0.0075, "t5 float16")


@pytest.mark.parametrize("keep", [True, False], ids=["wo_float32", "all_float16"])
def test_t5_float16_overflow_is_clamped_as_hf_does(keep, tmp_path):
    """The first self-attention's output scaled by 1e5 overflows float16: HF's T5Block clamps the stream to
    +-(65504 - 1000) (64512 in float16), and so do we, to the same numbers (without the clamp ours is inf, then NaN). Loaded as HF loads float16
    (`wo` float32: the clamps at the first block's attention only) or cast whole (`.half()`: a clamp after every
    sub-layer). Measured relative errors (to the largest magnitude): streams 0.0055 (352 on a stream holding 64512,
    where one float16 step is 32), logits 0.00083."""
    hf, processor, inputs = _saved("t5", tmp_path, scale_attn_out=1e5)
    if keep:
        hf16, model = _hf_half(tmp_path), HookedVLM.from_pretrained(tmp_path, dtype=torch.float16)
    else:
        hf16 = hf.half()
        model = HookedVLM.from_hf(hf16, processor=processor)
    mids = {}  # HF's stream after the first block's attention: what its FFN reads, clamped
    for tower, stack in (("lm_encoder", "encoder"), ("lm_decoder", "decoder")):
        ffn = hf16.language_model.get_submodule(f"{stack}.block.0.layer.{2 if stack == 'decoder' else 1}")
        ffn.register_forward_pre_hook(lambda module, args, tower=tower: mids.__setitem__(tower, args[0]))
    pairs = _t5_streams(model, hf16, inputs)
    for tower in ("lm_encoder", "lm_decoder"):
        where = "resid_mid_cross" if tower == "lm_decoder" else "resid_mid"
        ours = model.run_with_cache(**_half(inputs), names_filter=f"{tower}.blocks.0.hook_{where}")[1]
        pairs[f"{tower}.0.{where}"] = (ours[tower, 0, where], mids[tower])
    clamped = torch.tensor(torch.finfo(torch.float16).max - 1000, dtype=torch.float16).item()  # 64504 -> 64512
    assert pairs["lm_encoder.0.resid_mid"][1].abs().max().item() == clamped  # the plant overflowed; HF clamped it
    _check({k: v for k, v in pairs.items() if k != "logits"}, 0.012, "t5 overflow streams")
    _check({"logits": pairs["logits"]}, 0.002, "t5 overflow logits")


def test_t5_bfloat16_is_not_clamped_nor_kept(tmp_path):
    """bfloat16 keeps nothing in float32 and is not clamped (its range is float32's): every stream stays bfloat16
    and the logits within 0.12 of HF's bfloat16 load, relative to their largest magnitude (measured 0.054, 0.131
    absolute: bfloat16 keeps 8 bits)."""
    hf, processor, inputs = _saved("t5", tmp_path)
    hf16 = _hf_half(tmp_path, torch.bfloat16)
    model = HookedVLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    inputs = _half(inputs, torch.bfloat16)
    with torch.no_grad():
        logits, cache = model.run_with_cache(**inputs)
        ref = hf16(**inputs).logits
    assert cache["lm_encoder", 1, "resid_post"].dtype == torch.bfloat16
    _check({"logits": (logits, ref)}, 0.12, "t5 bfloat16")
