"""Integrated gradients at hook points: exact where the target is linear in the hook, complete up to the quadrature
error elsewhere, and equal to Neo et al.'s one-alpha-at-a-time loop however the alphas are batched."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, analysis, metrics
from hooked_vlm.integrated_gradients import RULES, alphas_and_weights, integrated_gradients
from hooked_vlm.tiny import build_llava, random_image

EMBEDS = "lm.hook_inputs_embeds"
TOKEN = 356  # any token id of the tiny vocabulary


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=3, image_size=32, patch=8)
    model = HookedVLM.from_hf(hf, processor=processor, dtype=torch.float64)
    texts = ["USER: <image>\nIs there a car in this image? ASSISTANT:", "USER: <image>\nhi ASSISTANT:"]
    images = [random_image(seed=0), random_image(seed=1)]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].double()
    mean = analysis.mean_activation(model, [inputs], ["projector.hook_out"], over="tokens")["projector.hook_out"]
    return model, processor, inputs, images, texts, mean


@pytest.mark.parametrize("rule", RULES)
def test_rules_weights_sum_to_one(rule):
    alphas, weights = alphas_and_weights(8, rule)
    assert weights.sum().item() == pytest.approx(1.0) and 0 <= alphas.min() and alphas.max() <= 1
    assert torch.equal(alphas_and_weights(50, "linspace")[0], torch.linspace(0, 1, 50, dtype=torch.float64))


def gradient_at_input(model, inputs, name, position):
    """d logit(TOKEN at position) / d activation, by one backward pass at the input."""
    leaf = []

    def grab(t, hook):
        leaf.append(t.detach().requires_grad_(True))
        return leaf[0]

    with torch.enable_grad():
        logits = model.run_with_hooks(**inputs, fwd_hooks=[(name, grab)])
        rows = torch.arange(logits.shape[0])
        (grad,) = torch.autograd.grad(logits[rows, position, TOKEN].sum(), leaf)
    return leaf[0].detach(), grad


@pytest.mark.parametrize("rule", RULES)
def test_exact_where_the_target_is_linear_in_the_hook(llava, rule):
    """The logit is linear in the final norm's output: IG = (x - baseline) * gradient, exactly, for any rule."""
    model, _, inputs, *_ = llava
    name = "lm.ln_final.hook_normalized"
    last = model.positions(**inputs).last
    x, grad = gradient_at_input(model, inputs, name, last)
    baseline = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
    where = [[3, 5, int(last[0])], [int(last[1])]]
    ig = integrated_gradients(model, inputs, TOKEN, name, baseline=baseline, positions=where, steps=3, rule=rule)
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    for b, row in enumerate(where):
        mask[b, row] = True
    expected = torch.where(mask[..., None], (x - baseline) * grad, torch.zeros(()))
    torch.testing.assert_close(ig[name], expected.float(), atol=1e-6, rtol=1e-5)
    assert ig[name][~mask].abs().max() == 0  # positions that keep their value get nothing
    assert ig.delta(name).abs().max() < 1e-5


def test_completeness_error_shrinks_with_the_steps(llava):
    model, _, inputs, _, _, mean = llava
    errors = []
    for steps in (2, 8, 32):
        ig = integrated_gradients(model, inputs, TOKEN, EMBEDS, baseline=mean, positions="image", steps=steps,
                                  rule="midpoint", batch_size=64)
        change = (ig.target - ig.at_baseline[EMBEDS]).abs()
        assert (change > 1e-3).all()  # the ablation changes the logit: the check is not vacuous
        errors.append((ig.delta(EMBEDS).abs() / change).max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors
    # Neo et al.'s rule (both ends, equal weights) converges too, more slowly (first order)
    coarse, fine = (integrated_gradients(model, inputs, TOKEN, EMBEDS, baseline=mean, positions="image", steps=s,
                                         batch_size=64).delta(EMBEDS).abs().max() for s in (8, 64))
    assert fine < coarse


def neo_loop(model, inputs, mean, target, steps):
    """Neo et al.'s `integrated_gradients` (one example, one alpha per forward), with a hook standing for their
    `model.model(inputs_embeds=...)` call; the baseline is the mean at the image tokens only."""
    with torch.no_grad():
        _, cache = model.run_with_cache(**inputs, names_filter=EMBEDS)
    x = cache[EMBEDS]
    baseline = x.clone()
    image = model.image_embeddings_mask(cache.positions)
    baseline[image] = mean
    diff = x - baseline
    total = torch.zeros_like(x)
    for alpha in torch.linspace(0, 1, steps, dtype=torch.float64):
        point = (baseline + alpha * diff).requires_grad_(True)
        with torch.enable_grad():
            logits = model.run_with_hooks(**inputs, fwd_hooks=[(EMBEDS, lambda t, hook: point)])
            logits[0, -1, target].backward()
        total += point.grad
    return total * diff / steps


@pytest.fixture(scope="module")
def authors(llava):
    """Per example, alone (unpadded): Neo et al.'s loop with 7 steps."""
    model, processor, inputs, images, texts, mean = llava
    out = []
    for image, text in zip(images, texts):
        alone = processor(images=image, text=text, return_tensors="pt")
        alone["pixel_values"] = alone["pixel_values"].double()
        out.append(neo_loop(model, alone, mean, TOKEN, 7)[0])  # [T_b, D]
    return out


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_equals_the_authors_loop_however_batched(llava, authors, batch_size):
    model, processor, inputs, images, texts, mean = llava
    ig = integrated_gradients(model, inputs, TOKEN, EMBEDS, baseline=mean, positions="image", steps=7,
                              batch_size=batch_size)
    positions = model.positions(**inputs)
    for b, reference in enumerate(authors):
        pad = inputs["input_ids"].shape[1] - reference.shape[0]
        assert (ig[EMBEDS][b, :pad] == 0).all()
        torch.testing.assert_close(ig[EMBEDS][b, pad:], reference.float(), atol=1e-6, rtol=1e-4)
        span = positions.image[b][0]
        assert ig.masks[EMBEDS][b].nonzero().flatten().tolist() == span.indices.tolist()


def test_top_ranks_the_chosen_positions_by_their_l1_norm(llava):
    model, _, inputs, _, _, mean = llava
    ig = integrated_gradients(model, inputs, TOKEN, EMBEDS, baseline=mean, positions="image", steps=4)
    top = ig.top(EMBEDS, 5)
    positions = model.positions(**inputs)
    for b in range(2):
        importance = ig[EMBEDS][b].abs().sum(-1)  # Neo et al.'s token importance
        span = positions.image[b][0]
        expected = span.start + importance[span.start:span.stop].argsort(descending=True)[:5]
        assert top[b].tolist() == expected.tolist()
    signed = ig.per_position(EMBEDS)
    torch.testing.assert_close(signed.sum(-1), ig[EMBEDS].flatten(1).sum(-1))


def test_metric_targets_zero_baselines_and_errors(llava):
    model, _, inputs, _, _, mean = llava
    metric = metrics.log_prob(TOKEN, -1)
    resid = "lm.blocks.0.hook_resid_post"
    means = {EMBEDS: mean, **analysis.mean_activation(model, [inputs], [resid], over="tokens")}
    ig = integrated_gradients(model, inputs, metric, [EMBEDS, resid], baseline="mean", means=means,
                              positions="image", steps=16, rule="trapezoid")
    assert set(ig.values) == {EMBEDS, resid}
    for name in ig.values:
        assert (ig.delta(name).abs() / (ig.target - ig.at_baseline[name]).abs()).max() < 0.01
    # a zero baseline where the path is smooth (after the final norm; a zero *input* to an RMSNorm is a spike of
    # gradient 1/sqrt(eps) that no coarse quadrature resolves)
    name = "lm.ln_final.hook_normalized"
    ig = integrated_gradients(model, inputs, metric, name, baseline="zeros", steps=16, rule="midpoint")
    assert (ig.delta(name).abs() / (ig.target - ig.at_baseline[name]).abs()).max() < 0.01
    with pytest.raises(ValueError, match="means"):
        integrated_gradients(model, inputs, TOKEN, EMBEDS, baseline="mean")
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(model, inputs, TOKEN, EMBEDS, steps=0)
    with pytest.raises(KeyError):
        integrated_gradients(model, inputs, TOKEN, "lm.hook_no_such_thing")
