"""The logit lens in chunks of positions (issue 15, item 1): never the whole [L, B, P, V] probabilities, and the
same result whatever the chunk; the embedding row (`hook="embed"`); a run of inputs stops after the last stream."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, analysis
from hooked_vlm.tiny import build_blip, build_llava, random_image


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(seed=3), random_image(seed=4)],
                       text=["USER: <image>\nwhat is it? ASSISTANT:", "USER: <image>\ncolour? ASSISTANT:"],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith(("hook_resid_post", "resid_pre")))
    return model, dict(inputs), cache


def reference(model, cache, names, pos, k, asked):
    """The lens spelled out over every position at once: [L, B, P, V] probabilities, then top-k and the asked ids."""
    head = model.tower("lm")
    stream = torch.stack([cache[n] for n in names])[:, torch.arange(pos.shape[0])[:, None], pos]  # [L, B, P, D]
    with torch.no_grad():
        probs = head.logits(stream.flatten(1, 2)).float().softmax(-1).view(*stream.shape[:3], -1)
    top = probs.topk(k, dim=-1)
    return top.indices, top.values, probs.gather(-1, asked[None, :, None, :].expand(*probs.shape[:3], -1))


class RowSpy:
    """Counts the rows each call of the output head gets: the size of the probabilities it leads to."""

    def __init__(self, model, monkeypatch):
        head, self.rows = model.tower("lm"), []
        logits = head.logits
        monkeypatch.setattr(head, "logits", lambda x: (self.rows.append(x.shape[0] * x.shape[1]), logits(x))[1])


def test_chunks_equal_the_whole(llava, monkeypatch):
    model, inputs, cache = llava
    L, B, T = 2, 2, inputs["input_ids"].shape[1]
    pos = torch.stack([torch.arange(T), torch.arange(T).flip(0)])[:, 1:]  # per-example order: chunks must keep it
    asked = torch.tensor([[3, 17, 40], [5, 5, 99]])
    ids, probs, token_probs = reference(model, cache, [f"lm.blocks.{i}.hook_resid_post" for i in range(L)], pos, 4,
                                        asked)
    spy = RowSpy(model, monkeypatch)
    P = pos.shape[1]
    for chunk in (1, 3, 4, P, P + 5):  # 3 does not divide P = T - 1
        assert P % 3 != 0
        spy.rows.clear()
        lens = analysis.logit_lens(model, cache, tower="lm", positions=pos, k=4, tokens=asked, chunk_size=chunk)
        assert torch.equal(lens.ids, ids) and torch.equal(lens.positions, pos)
        # measured: 0 on this machine (the rows go through the same GEMM); 1e-6 leaves room for another BLAS's blocking
        torch.testing.assert_close(lens.probs, probs, atol=1e-6, rtol=0)
        torch.testing.assert_close(lens.token_probs, token_probs, atol=1e-6, rtol=0)
        assert lens.tokens[1][0][0] == model.processor.tokenizer.convert_ids_to_tokens(ids[1, 0, 0].tolist())
        assert max(spy.rows) == L * B * min(chunk, P) and sum(spy.rows) == L * B * P  # never more than a chunk


def test_the_default_chunk_follows_the_memory_budget(llava, monkeypatch):
    model, inputs, cache = llava
    V = model.tower("lm").unembed.weight.shape[0]
    T = inputs["input_ids"].shape[1]
    spy = RowSpy(model, monkeypatch)
    monkeypatch.setattr(analysis, "LENS_CHUNK_BYTES", 3 * 4 * 2 * 2 * V * 5)  # five positions' probabilities
    whole = analysis.logit_lens(model, cache, tower="lm", k=3, chunk_size=T)
    spy.rows.clear()
    lens = analysis.logit_lens(model, cache, tower="lm", k=3)
    assert max(spy.rows) == 2 * 2 * 5 and torch.equal(lens.ids, whole.ids)
    torch.testing.assert_close(lens.probs, whole.probs, atol=1e-6, rtol=0)


def test_the_embedding_row(llava):
    model, inputs, cache = llava
    lens = analysis.logit_lens(model, cache, tower="lm", hook="embed", k=3, chunk_size=5)
    pre = analysis.logit_lens(model, cache, tower="lm", hook="resid_pre", k=3)
    assert lens.hook == "embed" and lens.ids.shape[0] == 1
    assert torch.equal(lens.ids[0], pre.ids[0])  # the stream entering block 0
    T = inputs["input_ids"].shape[1]
    ids, _, _ = reference(model, cache, ["lm.blocks.0.hook_resid_pre"], torch.arange(T).expand(2, T), 3,
                          torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(lens.ids, ids)
    with torch.no_grad():  # with the image written in: not the bare token embeddings
        _, embeds = model.run_with_cache(inputs, names_filter=["lm.hook_embed", "lm.blocks.0.hook_resid_pre"])
    assert not torch.equal(embeds["lm.hook_embed"], embeds["lm.blocks.0.hook_resid_pre"])
    again = analysis.logit_lens(model, inputs, tower="lm", hook="embed", k=3)
    assert torch.equal(again.ids, lens.ids)


def test_a_run_of_inputs_stops_after_the_last_stream(llava, monkeypatch):
    """The model's own logits are never computed: the only unembeddings are the lens's, one per chunk."""
    model, inputs, cache = llava
    head = model.tower("lm")
    calls = []
    unembed = head.unembed.forward
    monkeypatch.setattr(head.unembed, "forward", lambda x: (calls.append(1), unembed(x))[1])
    lens = analysis.logit_lens(model, inputs, tower="lm", k=3, chunk_size=4)
    T = inputs["input_ids"].shape[1]
    assert len(calls) == -(-T // 4)
    assert torch.equal(lens.ids, analysis.logit_lens(model, cache, tower="lm", k=3).ids)


def test_blip_text_decoder_in_chunks():
    """The post-LN text decoder, whose head is a transform then the unembedding: chunks equal the whole there too."""
    hf, processor = build_blip("vqa", seed=3)
    model = HookedVLM.from_hf(hf, processor=processor)
    inputs = dict(processor(images=[random_image(seed=1)], text=["what color is it"], return_tensors="pt"))
    inputs["decoder_input_ids"] = torch.tensor([[model.cfg.bos_token_id, 7, 9, 11, 4]])
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    whole = analysis.logit_lens(model, cache, tower="text_decoder", k=2, tokens=[7, 9], chunk_size=5)
    lens = analysis.logit_lens(model, cache, tower="text_decoder", k=2, tokens=[7, 9], chunk_size=2)
    assert torch.equal(lens.ids, whole.ids)
    torch.testing.assert_close(lens.probs, whole.probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(lens.token_probs, whole.token_probs, atol=1e-6, rtol=0)
    assert torch.equal(lens.ids[-1, :, :, 0], logits.argmax(-1))


@pytest.mark.no_typecheck
@pytest.mark.parametrize("chunk", [0, -2, 1.5, True])
def test_a_bad_chunk_size_is_refused(llava, chunk):
    model, _, cache = llava
    with pytest.raises(ValueError, match="chunk_size"):
        analysis.logit_lens(model, cache, tower="lm", chunk_size=chunk)
