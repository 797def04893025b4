"""Shared by the LLaVA, LLaVA-Phi and Qwen2-VL tests: a decoder-only LM's per-layer parity with HF's, and the
hook points whose edit changes nothing."""

from __future__ import annotations

import torch


def assert_lm_layers_match_hf(cache, out, real: torch.Tensor, *, embeds_atol: float, stream_atol: float,
                              pattern_atol: float) -> None:
    """The hooked `lm` tower's cache against HF's `output_hidden_states` / `output_attentions` at the `real` [B, T]
    positions: the embeddings block 0 reads, every block's output (HF's last hidden state is after the final norm,
    so it meets `ln_final`'s output), and every attention pattern (compared per query position)."""
    n_layers = len(out.attentions)
    torch.testing.assert_close(cache["lm.hook_inputs_embeds"][real], out.hidden_states[0][real], atol=embeds_atol,
                               rtol=0)
    for layer in range(n_layers - 1):
        torch.testing.assert_close(cache["lm", layer, "resid_post"][real], out.hidden_states[layer + 1][real],
                                   atol=stream_atol, rtol=0)
    torch.testing.assert_close(cache["lm.ln_final.hook_normalized"][real], out.hidden_states[-1][real],
                               atol=stream_atol, rtol=0)
    for layer in range(n_layers):
        ours, ref = cache["lm", layer, "pattern"], out.attentions[layer]
        torch.testing.assert_close(ours.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=pattern_atol, rtol=0)


def half_precision_error(hf, half, inputs, dtype: torch.dtype, position_ids: torch.Tensor) -> float:
    """The largest |logit| difference between the half-precision hooked model `half` and HF's float32 model at the
    real (non-pad) positions; checks the half logits are finite and in `dtype`."""
    with torch.no_grad():
        out = half(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
        ref = hf(**inputs, position_ids=position_ids).logits
    keep = inputs["attention_mask"].bool()
    assert out.dtype == dtype and torch.isfinite(out[keep]).all()
    return (out.float()[keep] - ref[keep]).abs().max().item()


def inert_hook_points(model, inputs) -> list[str]:
    """The hook points whose edit leaves the logits unchanged (computed and thrown away): each edited alone,
    scales doubled and every other activation zeroed."""
    with torch.no_grad():
        clean = model(**inputs)
        inert = []
        for name in model.hook_dict:
            edit = (lambda t, hook: t * 2) if name.endswith("hook_scale") else (lambda t, hook: torch.zeros_like(t))
            if torch.allclose(model.run_with_hooks(**inputs, fwd_hooks=[(name, edit)]), clean):
                inert.append(name)
    return inert
