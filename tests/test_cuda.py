"""On a CUDA device, in half precision: the hooked model is as close to the exact result as transformers' own model is.

Skipped without CUDA (`scripts/gpu_check.sh` runs this file on a GPU machine). The tolerance is measured in the test,
not assumed: both models run in the same half dtype on the GPU, the hooked model converted to float64 on the CPU is
the exact reference, and the hooked half-precision logits may be at most twice as far from it as HF's half-precision
logits are (plus HF's own error, for ties in rounding). Every cached tensor must be finite, and a sweep with its caches
on the CPU must equal the default exactly.
"""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, metrics, patching
from hooked_vlm.tiny import build_blip, build_instructblip, build_llava, random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")

IMAGES = [random_image(seed=3), random_image(seed=4)]
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
FAMILIES = ["blip", "llava", "instructblip-llama", "instructblip-t5"]


def _family(name: str):
    """An HF model, a padded batch, the extra keywords HF needs to compute what the hooked model computes (the
    mask-derived positions of a left-padded row; the T5 decoder's ids), and the logit positions to compare."""
    if name == "blip":  # captioning: BLIP-VQA's HF forward returns no logits
        hf, processor = build_blip("caption", seed=2)
        text = ["a picture of", "a photo of a big"]
    elif name == "llava":
        hf, processor = build_llava(seed=2)
        text = ["USER: <image>\nwhat is this? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    else:
        hf, processor = build_instructblip(name.split("-")[1], seed=2)
        text = ["what is in the picture?", "describe this"]
    inputs = dict(processor(images=IMAGES, text=text, padding=True, return_tensors="pt"))
    hf_kw: dict = {}
    if name == "instructblip-t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 7, 9, 11], [0, 4, 6, 1, 8]])
        compared = torch.ones(inputs["decoder_input_ids"].shape, dtype=torch.bool)
    else:
        mask = inputs["attention_mask"]
        if name != "blip":
            hf_kw["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        compared = mask.bool()
    return hf, inputs, hf_kw, compared


def _on(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_on_cuda_is_as_close_to_exact_as_hf(name, dtype):
    hf, inputs, hf_kw, compared = _family(name)
    with torch.no_grad():
        exact = HookedVLM.from_hf(hf, dtype=torch.float64)(**_on(inputs, "cpu", torch.float64))[compared]
        model = HookedVLM.from_hf(hf, dtype=dtype, device="cuda")
        hf_half = hf.to("cuda", dtype).eval()
        hf_logits = hf_half(**_on(inputs, "cuda", dtype), **_on(hf_kw, "cuda", dtype)).logits.double().cpu()[compared]
        ours = model(**_on(inputs, "cuda", dtype)).double().cpu()[compared]
        _, cache = model.run_with_cache(**_on(inputs, "cuda", dtype))
    hf_error = (hf_logits - exact).abs().max()
    our_error = (ours - exact).abs().max()
    print(f"{name} {dtype}: max |logit - exact| hooked {our_error:.3g}, HF {hf_error:.3g}")
    assert our_error <= 2 * hf_error + 1e-6, f"hooked {our_error:.3g} vs HF {hf_error:.3g} from the float64 result"
    not_finite = [n for n, t in cache.items() if not torch.isfinite(t).all()]
    assert not not_finite, f"{len(not_finite)} cached tensors hold NaN or inf on CUDA, e.g. {not_finite[:4]}"


@pytest.mark.parametrize("dtype", HALF)
def test_sweep_with_cpu_caches_equals_the_default_on_cuda(dtype):
    hf, inputs, _, _ = _family("llava")
    model = HookedVLM.from_hf(hf, dtype=dtype, device="cuda")
    clean = _on(inputs, "cuda", dtype)
    corrupt = {**clean, "pixel_values": clean["pixel_values"].flip(-1)}
    with torch.no_grad():
        answer = model(**clean)[:, -1].argmax(-1)
    metric = metrics.logit_diff(answer, (answer + 1) % model.cfg.lm.d_vocab)
    kw = dict(tower="lm", positions=[-2, -1], batch_size=3, progress=False)
    on_gpu = patching.patch_resid(model, clean, corrupt, metric, **kw)
    on_cpu = patching.patch_resid(model, clean, corrupt, metric, cache_device="cpu", **kw)
    assert torch.isfinite(on_gpu).all()
    assert torch.equal(on_cpu, on_gpu)
