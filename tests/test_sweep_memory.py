"""Memory-bounded sweeps: `cache_device="cpu"` (the clean/corrupted caches kept off the accelerator) and small
`batch_size` (fewer variants per forward) give the default sweep's results: exactly where the arithmetic is the same
(the same batch size), to float32 rounding where only the rows stacked in a forward differ."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, corruption, metrics, patching
from hooked_vlm.tiny import build_blip, build_llava, random_image

IMAGES = [random_image(seed=0), random_image(seed=1)]
OTHER = [random_image(seed=2), random_image(seed=3)]
# measured between batch sizes 1, 3 and 64 (matmuls over a different number of rows; below the number of examples
# the cached runs are split too): 1.2e-6 on values up to 2.8, 6.1e-5 on normalised ones (divided by clean -
# corrupted, 0.035 for one BLIP example); ~8x margin
ATOL, RTOL = 5e-4, 1e-5


def _setup(hf, processor, prompts):
    model = HookedVLM.from_hf(hf, processor=processor)
    clean = processor(images=IMAGES, text=prompts, padding=True, return_tensors="pt")
    corrupt = processor(images=OTHER, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**clean)
    answer = logits[:, -1].argmax(-1)
    return model, clean, corrupt, answer, metrics.logit_diff(answer, (answer + 1) % logits.shape[-1])


@pytest.fixture(scope="module", params=["blip", "llava"])
def vlm(request):
    if request.param == "blip":
        hf, processor = build_blip("vqa", seed=7)
        return ("text_encoder", *_setup(hf, processor, ["what color is the car", "how many cats"]))
    hf, processor = build_llava(seed=3, kv_heads=2)
    prompts = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    return ("lm", *_setup(hf, processor, prompts))


def _sweeps(tower, model, clean, corrupt, answer, metric):
    """One call of each sweep (keyword arguments left for batch_size and cache_device), covering the engine's paths:
    corrupted inputs and Corruptions, denoise and noise, a KV prefix (positions after the first), whole forwards
    (a corruption redrawn per forward), windows, ablations and attribution."""
    gauss = corruption.gaussian(3.0, seed=1)
    return {
        "resid_inputs_noise": lambda **kw: patching.patch_resid(
            model, clean, corrupt, metric, tower=tower, positions=[-2, -1], direction="noise", progress=False, **kw),
        "resid_gaussian_groups": lambda **kw: patching.patch_resid(
            model, clean, gauss, metric, tower=tower, groups={"text": "text"}, normalize=True,
            progress=False, **kw),
        "resid_gaussian_noise": lambda **kw: patching.patch_resid(
            model, clean, gauss, metric, tower=tower, positions=[-1], direction="noise", progress=False, **kw),
        "heads_by_position": lambda **kw: patching.patch_heads(
            model, clean, corrupt, metric, tower=tower, positions=[-1], by_position=True, progress=False, **kw),
        "trace_window": lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, window=3, positions=[-1], progress=False, **kw),
        "trace_per_forward": lambda **kw: patching.causal_trace(
            model, clean, answer, tower=tower, corrupt=corruption.multiplicative(1.0, 5.0, redraw="forward", seed=2),
            positions=[-1], samples=2, progress=False, **kw),
        "ablation": lambda **kw: patching.ablation_sweep(model, clean, metric, tower=tower, progress=False, **kw),
    }


def test_cache_on_cpu_is_exact_and_every_cached_run_goes_there(vlm, monkeypatch):
    """Each sweep with cache_device="cpu" equals the same sweep without it exactly, and every run it caches (clean,
    corrupted; source and target) streams to the cache device: on a GPU that keeps the caches off it (here, on the
    CPU, the device each run is asked for). Small batch sizes: the slow test below."""
    tower, model, clean, corrupt, answer, metric = vlm
    asked = []
    run_with_cache = model.run_with_cache

    def spy(*args, **kwargs):
        asked.append(kwargs.get("device"))
        return run_with_cache(*args, **kwargs)

    monkeypatch.setattr(model, "run_with_cache", spy)
    for name, sweep in _sweeps(*vlm).items():
        asked.clear()
        offloaded = sweep(cache_device="cpu")
        assert asked and all(d == torch.device("cpu") for d in asked), (name, asked)
        assert torch.equal(offloaded, sweep()), name
        assert not offloaded.isnan().all(), name
    asked.clear()
    patching.attribution_patch_resid(model, clean, corruption.gaussian(3.0, seed=1), metric, tower=tower,
                                     direction="noise", cache_device="cpu")
    assert asked and all(d == torch.device("cpu") for d in asked), asked


@pytest.mark.slow
def test_small_batches_equal_the_default(vlm):
    """Batch sizes 1 and 3 (one variant per forward) with the cache on the CPU give the default batch size's results
    to float32 rounding (a forward stacks fewer rows), and exactly the same sweep's without cache_device."""
    for name, sweep in _sweeps(*vlm).items():
        default = sweep()
        for batch_size in (1, 3):
            offloaded = sweep(batch_size=batch_size, cache_device="cpu")
            assert torch.equal(offloaded, sweep(batch_size=batch_size)), name
            torch.testing.assert_close(offloaded, default, atol=ATOL, rtol=RTOL, equal_nan=True, msg=name)


@pytest.mark.parametrize("sweep", [patching.attribution_patch_resid, patching.attribution_patch_heads])
def test_attribution_with_the_source_on_cpu_is_exact(vlm, sweep):
    tower, model, clean, corrupt, _, metric = vlm
    for corrupt_ in (corrupt, corruption.gaussian(3.0, seed=1)):
        default = sweep(model, clean, corrupt_, metric, tower=tower, positions=[-1])
        offloaded = sweep(model, clean, corrupt_, metric, tower=tower, positions=[-1], cache_device="cpu")
        assert torch.equal(offloaded, default)


@pytest.mark.no_typecheck
def test_bad_cache_device_and_batch_size_fail_before_any_forward(vlm, monkeypatch):
    tower, model, clean, corrupt, _, metric = vlm
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("a forward ran before the check"))
    with pytest.raises(ValueError, match="cache_device='gpu0' is not a device"):
        patching.patch_resid(model, clean, corrupt, metric, tower=tower, cache_device="gpu0", progress=False)
    with pytest.raises(ValueError, match="cache_device='gpu0' is not a device"):
        patching.attribution_patch_resid(model, clean, corrupt, metric, tower=tower, cache_device="gpu0")
    for sweep in (lambda **kw: patching.patch_resid(model, clean, corrupt, metric, tower=tower, **kw),
                  lambda **kw: patching.patch_heads(model, clean, corrupt, metric, tower=tower, **kw),
                  lambda **kw: patching.causal_trace(model, clean, 0, tower=tower, **kw),
                  lambda **kw: patching.ablation_sweep(model, clean, metric, tower=tower, **kw)):
        with pytest.raises(ValueError, match="batch_size=0: pass the most rows per forward"):
            sweep(batch_size=0, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the cache and the model on different devices")
def test_cache_on_cpu_equals_the_default_on_cuda(vlm):
    """With the model on a GPU and the caches on the CPU, every tensor a chunk reads is brought back to the GPU, so
    the arithmetic (and the result) is the default's."""
    tower, model, clean, corrupt, answer, metric = vlm
    model = model.to("cuda")
    clean, corrupt = ({k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in d.items()}
                      for d in (clean, corrupt))
    try:
        for name, sweep in _sweeps(tower, model, clean, corrupt, answer.cuda(), metric).items():
            assert torch.equal(sweep(batch_size=3, cache_device="cpu"), sweep(batch_size=3)), name
    finally:
        model.to("cpu")
