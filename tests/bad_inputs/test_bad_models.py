"""The models' own entry points refuse what they cannot honour: unknown or HF-only keywords of `forward` (and so of
`run_with_hooks` / `run_with_cache`) and `generate`, `from_hf`'s switches and dtypes, and malformed inputs, each
with one line saying what to pass instead, before any tower runs. Right-padded batches to a decoder-only
`generate` are refused; left-padded ones give each prompt's tokens alone.
"""

from __future__ import annotations

import pytest
import torch
from badcase import expect_error

from hooked_vlm import HookedVLM
from hooked_vlm.tiny import random_image

PROMPT_TEXT = {"llava": "USER: <image>\nwhat is in the picture? ASSISTANT:"}


def run(keyword: str = "", value=None, drop: tuple[str, ...] = (), via: str = "forward", **changes):
    """A row's call: the family's model on its ready inputs, with `drop` removed, `changes` applied (each a
    function of the inputs) and `keyword=value` added; through forward, run_with_hooks, run_with_cache or generate."""

    def call(fam):
        inputs = {k: v for k, v in fam.inputs.items() if k not in drop}
        inputs.update({k: change(fam.inputs) for k, change in changes.items()})
        if keyword:
            inputs[keyword] = value(fam.inputs) if callable(value) else value
        if via == "generate":
            length = inputs.pop("max_new_tokens", 2)
            return fam.model.generate(**inputs, max_new_tokens=length)
        return getattr(fam.model, via)(**inputs) if via != "forward" else fam.model(**inputs)

    return call


def from_hf(**kw):
    return lambda fam: HookedVLM.from_hf(fam.hf, **kw)


def mask(inputs):
    return inputs["attention_mask"]


def ids(inputs):
    return inputs["input_ids"]


def right_padded(inputs):
    """The mask of a right-padded row: the prompt shifted left by one, a pad at the end."""
    m = inputs["attention_mask"]
    return torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)


CASES = [
    # ---- forward keywords: typos, HF-only keywords (run_with_hooks / run_with_cache pass them on)
    pytest.param("blip", run("atention_mask", mask, drop=("attention_mask",)), TypeError,
                 ("'atention_mask'", "did you mean 'attention_mask'"), id="blip-forward-typo-mask"),
    pytest.param("llava", run("atention_mask", mask, drop=("attention_mask",)), TypeError,
                 ("'atention_mask'", "did you mean 'attention_mask'"), id="llava-forward-typo-mask"),
    pytest.param("instructblip-llama", run("qformer_atention_mask", lambda x: x["qformer_attention_mask"]),
                 TypeError, ("did you mean 'qformer_attention_mask'",), id="ib-llama-forward-typo-qformer-mask"),
    pytest.param("instructblip-t5", run("decoder_inputs_ids", torch.zeros(1, 1, dtype=torch.long)), TypeError,
                 ("did you mean 'decoder_input_ids'",), id="ib-t5-forward-typo-decoder-ids"),
    pytest.param("llava", run("image_sizes", torch.tensor([[32, 32]])), TypeError, ("'image_sizes'",),
                 id="llava-forward-image-sizes-not-llava-1.5"),
    pytest.param("blip", run("labels", ids), TypeError, ("labels=", "computes no loss", "from the returned logits"),
                 id="blip-forward-labels"),
    pytest.param("instructblip-t5", run("labels", ids), TypeError, ("labels=", "cross_entropy"),
                 id="ib-t5-forward-labels"),
    pytest.param("llava", run("return_type", "loss"), TypeError, ("return_type=", "returns the logits"),
                 id="llava-forward-return-type"),
    pytest.param("llava", run("inputs_embeds", torch.zeros(1, 3, 64)), TypeError, ("inputs_embeds=", "hook"),
                 id="llava-forward-inputs-embeds"),
    pytest.param("blip", run("output_attentions", True), TypeError, ("run_with_cache", "hook_pattern"),
                 id="blip-forward-output-attentions"),
    pytest.param("llava", run("atention_mask", mask, drop=("attention_mask",), via="run_with_hooks"), TypeError,
                 ("did you mean 'attention_mask'",), id="llava-run-with-hooks-typo"),
    pytest.param("instructblip-llama", run("atention_mask", mask, drop=("attention_mask",), via="run_with_cache"),
                 TypeError, ("did you mean 'attention_mask'",), id="ib-llama-run-with-cache-typo"),
    pytest.param("blip", run("labels", ids, via="run_with_cache"), TypeError, ("labels=",),
                 id="blip-run-with-cache-labels"),
    # ---- generate keywords: greedy or HF's sampling, nothing else; typos named
    pytest.param("llava", run("temprature", 0.7, via="generate"), TypeError,
                 ("'temprature'", "did you mean 'temperature'", "max_new_tokens"),
                 id="llava-generate-typo-temperature"),
    pytest.param("blip", run("temperature", 0.7, via="generate"), ValueError, ("temperature=", "do_sample=True"),
                 id="blip-generate-temperature-without-do-sample"),
    pytest.param("instructblip-t5", run("num_beams", 3, via="generate"), TypeError, ("num_beams=", "beam"),
                 id="ib-t5-generate-num-beams"),
    pytest.param("instructblip-llama", run("top_p", 0.9, via="generate"), ValueError, ("top_p=", "do_sample=True"),
                 id="ib-llama-generate-top-p-without-do-sample"),
    pytest.param("instructblip-llama", run("typical_p", 0.9, via="generate"), TypeError,
                 ("typical_p=", "temperature, top_k, top_p"), id="ib-llama-generate-typical-p"),
    pytest.param("llava", run("max_length", 30, via="generate"), TypeError, ("max_length=", "max_new_tokens"),
                 id="llava-generate-max-length"),
    pytest.param("llava", run("eos_token", 2, via="generate"), TypeError, ("did you mean 'eos_token_id'",),
                 id="llava-generate-typo-eos"),
    pytest.param("blip", run("do_sample", True, via="generate", temperature=lambda i: 0.0), ValueError,
                 ("temperature", "> 0", "do_sample=False"), id="blip-generate-temperature-zero"),
    pytest.param("llava", run("do_sample", True, via="generate", top_p=lambda i: 1.5), ValueError,
                 ("top_p", "[0, 1]"), id="llava-generate-top-p-above-one"),
    pytest.param("instructblip-llama", run("max_new_tokens", 2.5, via="generate"), ValueError,
                 ("max_new_tokens", "int", "2.5"), id="ib-llama-generate-float-length"),
    pytest.param("llava", run(via="generate", attention_mask=right_padded), ValueError, ("right-padded", "padding_side = 'left'"), id="llava-generate-right-padded"),
    # ---- from_hf: dtype names, switches, what is converted
    pytest.param("blip", from_hf(dtype="int8"), TypeError, ("dtype='int8'", "bfloat16"), id="blip-from-hf-int8"),
    pytest.param("llava", from_hf(dtype="float61"), TypeError, ("float61", "float16"), id="llava-from-hf-dtype-typo"),
    pytest.param("blip", from_hf(mask_cross_atention=True), TypeError, ("did you mean 'mask_cross_attention'",),
                 id="blip-from-hf-switch-typo"),
    pytest.param("llava", from_hf(mask_cross_attention=True), TypeError, ("'mask_cross_attention'", "hf_positions"),
                 id="llava-from-hf-other-family-switch"),
    pytest.param("instructblip-llama", from_hf(dtpye=torch.float16), TypeError, ("did you mean 'dtype'",),
                 id="ib-from-hf-typo-dtype"),
    pytest.param("blip", lambda fam: HookedVLM.from_hf("Salesforce/blip-vqa-base"), TypeError,
                 ("live transformers model", "from_pretrained", "BlipForQuestionAnswering"), id="from-hf-hub-id"),
    pytest.param("blip", lambda fam: HookedVLM.from_hf(fam.processor), TypeError,
                 ("BlipProcessor", "LlavaForConditionalGeneration"), id="from-hf-processor"),
    pytest.param("blip", lambda fam: HookedVLM.from_hf(fam.hf.vision_model), ValueError,
                 ("BlipVisionModel", "supported HF classes", "BlipForConditionalGeneration"),
                 id="from-hf-unsupported-class"),
    # ---- malformed inputs, refused before any tower runs
    pytest.param("blip", run(pixel_values=lambda x: (x["pixel_values"] * 255).to(torch.uint8)), TypeError,
                 ("pixel_values", "floating point", "uint8", "model.processor"), id="blip-pixels-uint8"),
    pytest.param("llava", run(pixel_values=lambda x: x["pixel_values"].long()), TypeError,
                 ("pixel_values", "int64"), id="llava-pixels-int"),
    pytest.param("instructblip-t5", run(pixel_values=lambda x: x["pixel_values"].numpy()), TypeError,
                 ("pixel_values", "ndarray", "return_tensors='pt'"), id="ib-t5-pixels-numpy"),
    pytest.param("instructblip-llama", run(pixel_values=lambda x: x["pixel_values"] * float("nan")), ValueError,
                 ("pixel_values", "NaN"), id="ib-llama-pixels-nan"),
    pytest.param("llava", run(pixel_values=lambda x: x["pixel_values"][:, :1]), ValueError,
                 ("(1, 1, 32, 32)", "[batch, 3, 32, 32]"), id="llava-pixels-one-channel"),
    pytest.param("blip", run(drop=("pixel_values",)), ValueError, ("pixel_values is missing",),
                 id="blip-pixels-missing"),
    pytest.param("instructblip-t5", run(drop=("pixel_values",), via="generate"), ValueError,
                 ("pixel_values is missing",), id="ib-t5-generate-pixels-missing"),
    pytest.param("blip", run(pixel_values=lambda x: x["pixel_values"].repeat(2, 1, 1, 1)), ValueError,
                 ("pixel_values 2", "input_ids 1", "one image per text"), id="blip-batch-mismatch"),
    pytest.param("instructblip-t5", run(qformer_input_ids=lambda x: x["qformer_input_ids"].repeat(2, 1),
                                        qformer_attention_mask=lambda x: x["qformer_attention_mask"].repeat(2, 1)),
                 ValueError, ("qformer_input_ids 2",), id="ib-t5-qformer-batch-mismatch"),
    pytest.param("llava", run(input_ids=lambda x: x["input_ids"].float()), TypeError,
                 ("input_ids", "integer", "float32"), id="llava-ids-float"),
    pytest.param("instructblip-llama", run(input_ids=lambda x: x["input_ids"][0],
                                           attention_mask=lambda x: x["attention_mask"][0]), ValueError,
                 ("input_ids", "[batch, tokens]", "input_ids[None]"), id="ib-llama-ids-1d"),
    pytest.param("blip", run(input_ids=lambda x: x["input_ids"] + 1000), ValueError,
                 ("input_ids", "outside the vocabulary 0..57"), id="blip-ids-out-of-vocabulary"),
    pytest.param("instructblip-t5", run(qformer_input_ids=lambda x: x["qformer_input_ids"].float()), TypeError,
                 ("qformer_input_ids", "integer"), id="ib-t5-qformer-ids-float"),
    pytest.param("llava", run(attention_mask=lambda x: x["attention_mask"][:, 1:]), ValueError,
                 ("attention_mask", "(1, 26)", "(1, 27)"), id="llava-mask-shape"),
    pytest.param("instructblip-llama", run(qformer_attention_mask=lambda x: x["qformer_attention_mask"][:, 1:]),
                 ValueError, ("qformer_attention_mask", "shape"), id="ib-llama-qformer-mask-shape"),
    pytest.param("blip", run(attention_mask=lambda x: x["attention_mask"] * 2), ValueError,
                 ("attention_mask", "only 0 (pad) and 1"), id="blip-mask-values"),
    pytest.param("instructblip-t5", run(attention_mask=lambda x: x["attention_mask"] * 0), ValueError,
                 ("attention_mask", "all padding"), id="ib-t5-mask-all-pads"),
    pytest.param("llava", run(input_ids=lambda x: x["input_ids"][:0], attention_mask=lambda x: x["attention_mask"][:0]),
                 ValueError, ("input_ids", "empty"), id="llava-empty-batch"),
    pytest.param("blip", run(input_ids=lambda x: x["input_ids"].repeat(1, 20),
                             attention_mask=lambda x: x["attention_mask"].repeat(1, 20)), ValueError,
                 ("140 tokens", "64 positions", "truncation"), id="blip-text-too-long"),
    pytest.param("instructblip-t5", run("decoder_attention_mask", torch.ones(1, 3, dtype=torch.long),
                                        decoder_input_ids=lambda x: torch.zeros(1, 2, dtype=torch.long)),
                 ValueError, ("decoder_attention_mask", "(1, 3)", "(1, 2)"), id="ib-t5-decoder-mask-shape"),
    pytest.param("blip", run("decoder_input_ids", torch.zeros(2, 1, dtype=torch.long)), ValueError,
                 ("decoder_input_ids 2", "one answer prefix per question"), id="blip-decoder-batch-mismatch"),
    pytest.param("instructblip-llama", run("decoder_input_ids", torch.zeros(1, 1, dtype=torch.long)), ValueError,
                 ("decoder_input_ids", "decoder-only", "input_ids"), id="ib-llama-decoder-ids-ignored"),
    pytest.param("instructblip-t5", run("position_ids", lambda x: torch.arange(x["input_ids"].shape[1])[None]),
                 ValueError, ("position_ids", "relative positions"), id="ib-t5-position-ids-ignored"),
    pytest.param("llava", run("position_ids", lambda x: torch.arange(5)[None]), ValueError,
                 ("position_ids", "shape (1, 27)"), id="llava-position-ids-shape"),
]


@pytest.mark.parametrize("family, call, error, words", CASES)
def test_bad_model_input(families, family, call, error, words):
    expect_error(lambda: call(families[family]), error, *words)


def test_ignored_processor_output_changes_nothing(families):
    """LLaVA's `mm_token_type_ids` (the processor's `return_mm_token_type_ids=True`) is accepted and ignored."""
    fam = families["llava"]
    extra = fam.processor(images=random_image(seed=0), text=PROMPT_TEXT["llava"], return_tensors="pt",
                          return_mm_token_type_ids=True)
    assert "mm_token_type_ids" in extra
    with torch.no_grad():
        torch.testing.assert_close(fam.model(**extra), fam.model(**fam.inputs), rtol=0, atol=0)


def test_from_hf_takes_dtype_names(families):
    fam = families["blip"]
    model = HookedVLM.from_hf(fam.hf, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    reference = HookedVLM.from_hf(fam.hf, dtype=torch.bfloat16)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("family", ["llava", "instructblip-llama"])
def test_left_padded_generation_equals_each_prompt_alone(families, family):
    """A decoder-only LM's left-padded batch gives each prompt's tokens as it alone; the same batch padded on the
    right is refused (it would give other tokens)."""
    fam = families[family]
    texts = ([PROMPT_TEXT["llava"], "USER: <image>\nhi ASSISTANT:"] if family == "llava"
             else ["what is in the picture?", "hi"])
    images = [random_image(seed=0), random_image((50, 50), seed=1)]
    tokenizer = fam.processor.tokenizer
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        batch = fam.processor(images=images, text=texts, padding=True, return_tensors="pt")
        tokenizer.padding_side = "right"
        right = fam.processor(images=images, text=texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    assert not batch["attention_mask"].all()  # the prompts differ in length
    together = fam.model.generate(**batch, max_new_tokens=4)
    T = batch["input_ids"].shape[1]
    for row, (image, text) in enumerate(zip(images, texts)):
        single = fam.processor(images=image, text=text, return_tensors="pt")
        alone = fam.model.generate(**single, max_new_tokens=4)[0, single["input_ids"].shape[1]:]
        assert len(alone) > 0 and torch.equal(together[row, T:T + len(alone)], alone), row
    expect_error(lambda: fam.model.generate(**right, max_new_tokens=4), ValueError, "right-padded", "padding_side")


def test_generate_overrides_end_token_in_every_family(families):
    """`eos_token_id=` stops generation as in HF's generate (it was accepted and ignored by BLIP and InstructBLIP):
    with the first generated token as the end token, generation stops after it."""
    for name in ("blip", "instructblip-llama", "instructblip-t5", "llava"):
        fam = families[name]
        free = fam.model.generate(**fam.inputs, max_new_tokens=4)
        # where the generated tokens start: after the prompt (decoder-only LMs) or after the decoder's start token
        start = fam.inputs["input_ids"].shape[1] if name in ("llava", "instructblip-llama") else 1
        assert free.shape[1] > start + 1, name  # without the override, generation goes on after the first token
        first = int(free[0, start])
        stopped = fam.model.generate(**fam.inputs, max_new_tokens=4, eos_token_id=first)
        assert stopped.shape[1] == start + 1 and int(stopped[0, -1]) == first, name
