"""Streaming data sets: `data.collate` turns a lazy stream of examples into padded model batches through the model's
processor (positions recorded, optional length bucketing with its order guarantees), and `analysis.mean_activation`
reads such a stream one batch at a time, its means over positions leaving the padding out."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, analysis, data
from hooked_vlm.data.collate import rows_of
from hooked_vlm.tiny import build_instructblip, build_llava, random_image

QUESTIONS = ["hi", "what is in the picture?", "is it red?", "what colour is the big shape on the left of the table?",
             "count them", "yes or no?", "where is the small blue thing that sits next to the cube?"]


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=5)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=i) for i in range(len(QUESTIONS))]
    texts = [model.prompt_template.format(question=q) for q in QUESTIONS]
    return model, images, texts


@pytest.fixture(scope="module")
def instructblip():
    hf, processor = build_instructblip("llama", seed=6)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=10 + i) for i in range(len(QUESTIONS))]
    return model, images, list(QUESTIONS)


class Counting:
    """An iterable that records how many items have been read from it."""

    def __init__(self, items):
        self.items, self.read = list(items), 0

    def __iter__(self):
        for item in self.items:
            self.read += 1
            yield item


# ------------------------------------------------------------------------------------------ collate
def test_collate_is_the_processor_left_padded_with_positions(llava):
    model, images, texts = llava
    batches = list(data.collate(model, zip(images, texts), batch_size=3))
    assert [b.index for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b.ids for b in batches][0] == ["0", "1", "2"]
    tok = model.processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        expect = model.processor(images=images[3:6], text=texts[3:6], padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    assert tok.padding_side == side  # the collate put the tokenizer's own setting back
    got = batches[1]
    assert set(got) == set(expect)
    for key in expect:
        assert torch.equal(got[key], expect[key]), key
    assert not bool(got["attention_mask"].all())  # the batch is padded (on the left)
    assert bool(got["attention_mask"][:, -1].all())
    positions = model.positions(**expect)
    assert torch.equal(got.positions.last, positions.last)
    assert [[(s.start, s.stop) for s in spans] for spans in got.positions.image] == \
        [[(s.start, s.stop) for s in spans] for spans in positions.image]
    right = next(data.collate(model, zip(images, texts), batch_size=3, side="right"))
    assert bool(right["attention_mask"][:, 0].all()) and not bool(right["attention_mask"][:, -1].all())


def test_collate_of_examples_loads_images_lazily(llava, tmp_path):
    model, images, _ = llava
    examples = []
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        image.save(tmp_path / f"{i}.png")
        examples.append(data.Example(id=f"q{i}", question=question, image=data.ImageFile(tmp_path / f"{i}.png")))
    stream = Counting(examples)
    batches = data.collate(model, stream, batch_size=2)
    first = next(batches)
    assert stream.read == 2  # nothing read beyond the first batch
    assert first.ids == ["q0", "q1"] and first.examples == examples[:2]
    expect = model.processor(images=[e.image.load() for e in examples[:2]],
                             text=[model.prompt_template.format(question=e.question) for e in examples[:2]],
                             padding=True, return_tensors="pt")
    assert torch.equal(first["pixel_values"], expect["pixel_values"])
    custom = next(data.collate(model, examples, batch_size=1, prompt=lambda e: f"USER: <image>\n{e.id} ASSISTANT:"))
    assert torch.equal(custom["input_ids"], model.processor(images=images[0], text="USER: <image>\nq0 ASSISTANT:",
                                                            return_tensors="pt")["input_ids"])


def test_bucketing_groups_lengths_and_results_come_back_in_stream_order(llava):
    model, images, texts = llava
    plain = list(data.collate(model, zip(images, texts), batch_size=2))
    bucketed = list(data.collate(model, zip(images, texts), batch_size=2, bucket=4))
    # each window (4 items, then 3) sorted by length, cut into batches; every item exactly once
    assert sorted(i for b in bucketed for i in b.index) == list(range(len(texts)))
    assert {i for b in bucketed[:2] for i in b.index} == {0, 1, 2, 3}
    lengths = [int(m.sum()) for b in bucketed for m in b["attention_mask"]]
    assert lengths[:4] == sorted(lengths[:4]) and lengths[4:] == sorted(lengths[4:])
    pads = lambda bs: sum(int((~b["attention_mask"].bool()).sum()) for b in bs)  # noqa: E731
    assert pads(bucketed) < pads(plain)

    def last_logits(batches):
        out = []
        for b in batches:
            with torch.no_grad():
                logits = model(**b)
            out.append((b, logits[torch.arange(len(b.index)), b.positions.last]))
        return out

    ordered = torch.stack(data.in_stream_order(last_logits(bucketed)))
    reference = torch.cat([x for _, x in last_logits(plain)])
    err = (ordered - reference).abs().max().item()
    print(f"bucketed vs stream-order last-token logits: max abs error {err:.2e}")
    torch.testing.assert_close(ordered, reference, atol=1e-5, rtol=0)  # measured 1.3e-6 (other padding)
    with pytest.raises(ValueError, match="no result"):
        data.in_stream_order(last_logits(bucketed)[1:])


@pytest.mark.no_typecheck
def test_collate_refuses_bad_input(llava):
    model, images, texts = llava
    with pytest.raises(TypeError, match="data.Example"):
        next(data.collate(model, [images[0]], batch_size=1))
    with pytest.raises(ValueError, match="bucket=2"):
        next(data.collate(model, zip(images, texts), batch_size=3, bucket=2))
    with pytest.raises(ValueError, match="batch_size=0"):
        next(data.collate(model, zip(images, texts), batch_size=0))
    with pytest.raises(ValueError, match="side must be"):
        next(data.collate(model, zip(images, texts), side="middle"))
    with pytest.raises(ValueError, match="has no image"):
        next(data.collate(model, [data.Example(id="x", question="hi")]))
    batch = next(data.collate(model, zip(images, texts), batch_size=2))
    with pytest.raises(ValueError, match="one row per example"):
        rows_of({**batch, "pixel_values": batch["pixel_values"][:1]}, [0])


# ------------------------------------------------------------------------------------------ streaming means
def real_token_mean(model, items, hook, tower_mask):
    """The naive reference: each example run alone (no padding at all), its real tokens collected, one float64
    mean over all of them."""
    rows = []
    for item in items:
        batch = next(data.collate(model, [item], batch_size=1))
        with torch.no_grad():
            _, cache = model.run_with_cache(**batch, names_filter=hook)
        x = cache[hook][0].double()
        keep = tower_mask(batch.positions)[0].bool()
        assert bool(keep.all())  # alone, an example has no padding
        rows.append(x[keep])
    return torch.cat(rows).mean(0)


def test_a_padded_stream_mean_equals_the_unpadded_per_example_mean(llava):
    model, images, texts = llava
    hook = "lm.blocks.1.hook_resid_post"
    stream = Counting(zip(images, texts))
    seen = []
    handle = model.tower("lm").blocks[0].register_forward_pre_hook(lambda m, a: seen.append(stream.read))
    try:
        got = analysis.mean_activation(model, data.collate(model, stream, batch_size=3), [hook], over="tokens")[hook]
    finally:
        handle.remove()
    assert seen == [3, 6, 7]  # lazy: each forward saw only the items of its own batch read
    expect = real_token_mean(model, zip(images, texts), hook, lambda p: p.attention_mask)
    err = (got.double() - expect).abs().max().item()
    print(f"padded stream mean vs per-example unpadded mean: max abs error {err:.2e}")
    torch.testing.assert_close(got.double(), expect, atol=1e-6, rtol=0)  # measured 7e-8 (float32 forwards)
    # the same stream bucketed, and as plain dicts split by batch_size: the same mean
    bucketed = analysis.mean_activation(model, data.collate(model, zip(images, texts), batch_size=2, bucket=7),
                                        [hook], over="tokens")[hook]
    torch.testing.assert_close(bucketed.double(), expect, atol=1e-6, rtol=0)
    whole = dict(next(data.collate(model, zip(images, texts), batch_size=len(texts))))
    rows = []
    handle = model.tower("lm").blocks[0].register_forward_pre_hook(
        lambda m, a, kw: rows.append((list(a) + list(kw.values()))[0].shape[0]), with_kwargs=True)
    try:
        split = analysis.mean_activation(model, [whole], [hook], over="tokens", batch_size=2)[hook]
    finally:
        handle.remove()
    assert rows == [2, 2, 2, 1]  # every forward bounded by batch_size
    torch.testing.assert_close(split.double(), expect, atol=1e-6, rtol=0)
    # the padding would show: the mean over every position of the padded batches is another number
    with_pads = analysis.mean_activation(model, data.collate(model, zip(images, texts), batch_size=3), [hook],
                                         over="tokens", mask_key=None)[hook]
    assert (with_pads.double() - expect).abs().max() > 100 * max(err, 1e-7)


def test_the_qformer_mean_leaves_out_its_instruction_padding(instructblip):
    """InstructBLIP's Q-Former reads the learned queries and then the (padded) instruction: its mask comes from
    `positions.towers["qformer"]`, not from the LM's attention_mask."""
    model, images, texts = instructblip
    hook = "qformer.blocks.1.hook_resid_post"
    got = analysis.mean_activation(model, data.collate(model, zip(images, texts), batch_size=4), [hook],
                                   over="tokens")[hook]
    expect = real_token_mean(model, zip(images, texts), hook, lambda p: p.towers["qformer"].attention_mask)
    err = (got.double() - expect).abs().max().item()
    print(f"Q-Former padded stream mean vs unpadded: max abs error {err:.2e}")
    torch.testing.assert_close(got.double(), expect, atol=1e-6, rtol=0)  # measured 5e-8


def test_progress_over_a_stream(llava, monkeypatch):
    model, images, texts = llava
    made = []
    real = analysis.progress_bar

    def spy(total, enabled, desc):
        made.append((total, enabled))
        return real(total, False, desc)

    monkeypatch.setattr(analysis, "progress_bar", spy)
    batches = list(data.collate(model, zip(images, texts), batch_size=4))
    analysis.mean_activation(model, batches, "projector.hook_out", over="tokens")
    analysis.mean_activation(model, iter(batches), "projector.hook_out", over="tokens", progress=False)
    assert made == [(2, True), (None, False)]


@pytest.mark.no_typecheck
def test_mean_activation_refuses_a_bad_batch_size(llava):
    model, images, texts = llava
    with pytest.raises(ValueError, match="batch_size=0"):
        analysis.mean_activation(model, data.collate(model, zip(images, texts)), "projector.hook_out", batch_size=0)
    with pytest.raises(ValueError, match="mask_key='qformer_attention_mask'"):
        analysis.mean_activation(model, data.collate(model, zip(images, texts)), "projector.hook_out",
                                 mask_key="qformer_attention_mask")
