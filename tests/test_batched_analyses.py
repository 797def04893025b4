"""Analyses and evaluation bounded by `batch_size`: a batch split into chunks gives the table / means / verdicts of
the whole batch (counts summed, not chunk means averaged), every forward holds at most `batch_size` examples, and a
half-precision model's means are accumulated in float64 (checked against a float64 reference)."""

from __future__ import annotations

import pytest
import torch

from hooked_vlm import HookedVLM, analysis, data, evaluation, metrics
from hooked_vlm.head_ablation import unablated_runs
from hooked_vlm.tiny import build_llava, random_image

QUESTIONS = ["what is in the picture?", "hi", "is it red?", "what color is the shape?", "count them", "yes or no?"]
SETS = {"positive": [(0, 1), (1, 3)], "negative": [(1, 0)]}


def build(dtype=None):
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor, dtype=dtype)
    images = [random_image(seed=i) for i in range(len(QUESTIONS))]

    def encode(idx, side="left"):
        side_before = processor.tokenizer.padding_side
        processor.tokenizer.padding_side = side
        try:
            return dict(processor(images=[images[i] for i in idx],
                                  text=[f"USER: <image>\n{QUESTIONS[i]} ASSISTANT:" for i in idx],
                                  padding=True, return_tensors="pt"))
        finally:
            processor.tokenizer.padding_side = side_before

    return model, images, encode


@pytest.fixture(scope="module")
def llava():
    model, images, encode = build()
    full = encode(range(len(QUESTIONS)))
    with torch.no_grad():
        top = model(**full)[:, -1].argmax(-1)
    tok = model.processor.tokenizer
    answers = [metrics.answer_tokens(tok, w) for w in ("yes", "no", "red", "blue", "two", "cat")]
    answers[0] = [int(top[0])] + answers[0]  # examples 0, 3 and 4 answered correctly
    answers[3] = answers[3] + [int(top[3])]
    answers[4] = [int(top[4])]
    return model, images, encode, full, answers


class Rows:
    """Records the batch size of every forward of a module (a spy on the LM's first block)."""

    def __init__(self, module):
        self.sizes = []
        self.handle = module.register_forward_pre_hook(
            lambda m, a, kw: self.sizes.append((list(a) + list(kw.values()))[0].shape[0]), with_kwargs=True)

    def __enter__(self):
        return self.sizes

    def __exit__(self, *exc):
        self.handle.remove()


def max_row_error(a, b) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a.rows, b.rows) for k in ("mean_prob", "mean_drop"))


# ------------------------------------------------------------------------------------------ set ablation
def test_set_ablation_in_chunks_equals_one_batch(llava):
    model, _, encode, full, answers = llava
    kw = dict(sets=SETS, random_k=3, random_trials=2, seed=7)
    one = analysis.head_set_ablation(model, full, answers, **kw)
    for batch_size in (1, 2, 4):
        with Rows(model.tower("lm").blocks[0]) as sizes:
            chunked = analysis.head_set_ablation(model, full, answers, batch_size=batch_size, **kw)
        assert max(sizes) <= batch_size and sum(sizes) == len(QUESTIONS) * len(one.rows[:-1])
        assert chunked.n == one.n and chunked.trials == one.trials
        err = max_row_error(chunked, one)
        print(f"set ablation, batch_size={batch_size} vs one batch: max error of the means {err:.2e}")
        for a, b in zip(chunked.rows, one.rows):
            assert a["name"] == b["name"] and a["accuracy"] == b["accuracy"]
            assert a["mean_prob"] == pytest.approx(b["mean_prob"], abs=1e-7)  # measured <= 3e-9 (float32 rounding)
            assert a["mean_drop"] == pytest.approx(b["mean_drop"], abs=1e-7)
    # a stream of batches, each split further; one shared answer id; per-example positions of a right-padded batch
    streamed = analysis.head_set_ablation(model, iter([(encode([0, 1, 2]), answers[:3]), (encode([3, 4, 5]),
                                                                                          answers[3:])]),
                                          batch_size=2, **kw)
    assert max_row_error(streamed, one) < 1e-7 and [r["accuracy"] for r in streamed.rows] == \
        [r["accuracy"] for r in one.rows]
    shared = [analysis.head_set_ablation(model, full, answers[4][0], batch_size=b, **kw) for b in (None, 4)]
    assert max_row_error(*shared) < 1e-7
    right = encode(range(len(QUESTIONS)), "right")
    last = model.positions(**right).last
    by_tensor = analysis.head_set_ablation(model, right, answers, position=last, batch_size=4, **kw)
    by_name = analysis.head_set_ablation(model, right, answers, position="last", batch_size=5, **kw)
    assert max_row_error(by_tensor, one) < 1e-6 and max_row_error(by_name, one) < 1e-6  # measured ~1e-8


def test_unablated_runs_in_chunks_equal_one_batch(llava):
    model, _, _, full, answers = llava
    [one] = unablated_runs(model, full, answers, -1, "sum", "test")
    chunks = list(unablated_runs(model, full, answers, -1, "sum", "test", batch_size=4))
    assert [len(c.prob) for c in chunks] == [4, 2]
    assert torch.equal(torch.cat([c.correct for c in chunks]), one.correct)
    err = (torch.cat([c.prob for c in chunks]) - one.prob).abs().max().item()
    print(f"unablated runs in chunks: max error of P(answer) {err:.2e}")
    torch.testing.assert_close(torch.cat([c.prob for c in chunks]), one.prob, atol=1e-7, rtol=0)


def test_head_scores_of_a_large_batch_run_in_chunks(llava):
    """One batch of six questions with batch_size=2: the unablated forwards as well as the sweeps hold two rows."""
    model, _, _, full, answers = llava
    one = analysis.head_scores(model, full, answers, progress=False)
    with Rows(model.tower("lm").blocks[0]) as sizes:
        chunked = analysis.head_scores(model, full, answers, progress=False, batch_size=2)
    assert max(sizes) <= 2
    assert torch.equal(chunked.correct, one.correct)
    for field in ("positive", "negative", "delta"):
        err = (getattr(chunked, field) - getattr(one, field)).abs().max().item()
        print(f"head_scores {field}, batch_size=2 vs 64: max error {err:.2e}")
        torch.testing.assert_close(getattr(chunked, field), getattr(one, field), atol=5e-8, rtol=0)  # measured 5e-9


@pytest.mark.no_typecheck
def test_set_ablation_refuses_what_a_split_would_get_wrong(llava):
    model, _, _, full, answers = llava
    with pytest.raises(ValueError, match="resample"):
        analysis.head_set_ablation(model, full, answers, sets=SETS, random_trials=0, mode="resample", batch_size=2)
    with pytest.raises(ValueError, match="5 given, but the batch has 6"):
        analysis.head_set_ablation(model, full, answers[:5], sets=SETS, random_trials=0, batch_size=2)
    with pytest.raises(ValueError, match="position: 2 values"):
        analysis.head_set_ablation(model, full, answers, sets=SETS, random_trials=0, position=[-1, -1],
                                   batch_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        analysis.head_set_ablation(model, full, answers, sets=SETS, random_trials=0, batch_size=0)


# ------------------------------------------------------------------------------------------ means
def test_mean_activation_in_chunks_equals_one_batch(llava):
    model, _, _, full, _ = llava
    hooks = ["lm.blocks.1.hook_resid_post", "projector.hook_out"]
    for over in ("examples", "tokens"):
        one = analysis.mean_activation(model, [full], hooks, over=over, progress=False)
        with Rows(model.tower("lm").blocks[0]) as sizes:
            chunked = analysis.mean_activation(model, [full], hooks, over=over, batch_size=4, progress=False)
        assert sizes == [4, 2]
        for hook in hooks:
            err = (chunked[hook] - one[hook]).abs().max().item()
            print(f"mean_activation over={over} {hook}, batch_size=4 vs one batch: max error {err:.2e}")
            torch.testing.assert_close(chunked[hook], one[hook], atol=1e-6, rtol=0)  # measured <= 2e-7


def test_a_bfloat16_mean_is_accumulated_in_float64():
    """bf16 forwards, the means summed in float64 and rounded to bf16 once: equal to the float64 mean of the very
    activations the model produced (a bf16 running sum would drift by many bf16 steps over a stream)."""
    model, images, _ = build(torch.bfloat16)
    texts = [model.prompt_template.format(question=q) for q in QUESTIONS] * 4
    items = list(zip(images * 4, texts))
    hook = "lm.blocks.1.hook_resid_post"
    got = analysis.mean_activation(model, data.collate(model, items, batch_size=8), [hook], over="tokens",
                                   batch_size=3, progress=False)[hook]
    assert got.dtype == torch.bfloat16
    rows = []  # the reference: the same chunks' activations, their real tokens, one float64 mean
    for batch in data.collate(model, items, batch_size=8):
        for start in range(0, len(batch.index), 3):
            chunk = {k: v[start:start + 3] for k, v in batch.items()}
            with torch.no_grad():
                _, cache = model.run_with_cache(**chunk, names_filter=hook)
            rows.append(cache[hook].double()[batch.positions.attention_mask[start:start + 3].bool()])
    expect = torch.cat(rows).mean(0)
    step = (expect.abs().to(torch.bfloat16).float() * 2 ** -7).double()  # one bf16 step at each value
    err = ((got.double() - expect).abs() / step).max().item()
    print(f"bf16 stream mean ({sum(len(r) for r in rows)} tokens) vs float64 reference: max error {err:.2f} bf16 steps")
    assert err <= 0.5 + 1e-6  # rounded once: within half a step of the float64 mean
    # chunked vs one batch of the stream in bf16: other forwards, so other activations (stated, not equal)
    whole = analysis.mean_activation(model, data.collate(model, items, batch_size=8), [hook], over="tokens",
                                     progress=False)[hook]
    print(f"bf16: batch_size=3 vs batches of 8: max abs difference {(whole.float() - got.float()).abs().max():.2e}")


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_honours_batch_size_end_to_end(llava):
    model, images, _, _, _ = llava
    classes = ["car", "table", "couch", "dog", "cat", "cup"]
    with Rows(model.tower("lm").blocks[0]) as sizes:
        chunked = evaluation.first_token(model, images, QUESTIONS, classes, batch_size=2, keep_probs=True)
    assert sizes == [2, 2, 2]
    one = evaluation.first_token(model, images, QUESTIONS, classes, batch_size=len(images), keep_probs=True)
    assert torch.equal(chunked.token, one.token) and chunked.text == one.text and torch.equal(chunked.correct,
                                                                                             one.correct)
    err = (chunked.probs - one.probs).abs().max().item()
    print(f"first_token, batch_size=2 vs one batch (other padding): max error of the probabilities {err:.2e}")
    torch.testing.assert_close(chunked.probs, one.probs, atol=1e-6, rtol=0)  # measured ~1e-8
    torch.testing.assert_close(chunked.p_class, one.p_class, atol=1e-6, rtol=0)

    prompts = [evaluation.prompt(model, q) for q in QUESTIONS]
    with Rows(model.tower("lm").blocks[0]) as sizes:
        gen = evaluation.generate(model, images, prompts, max_new_tokens=3, batch_size=4)
    assert max(sizes) <= 4 and sizes.count(4) == 3 and sizes.count(2) == 3  # a prompt forward and 2 steps each
    whole = evaluation.generate(model, images, prompts, max_new_tokens=3, batch_size=len(images))
    assert gen.texts == whole.texts and all(torch.equal(a, b) for a, b in zip(gen.tokens, whole.tokens))

    with Rows(model.tower("lm").blocks[0]) as sizes:
        ident = evaluation.identification(model, images, classes, max_new_tokens=3, poll_tokens=2, batch_size=3)
    assert max(sizes) <= 3
    ident_one = evaluation.identification(model, images, classes, max_new_tokens=3, poll_tokens=2,
                                          batch_size=len(images))
    assert ident.descriptions == ident_one.descriptions and ident.answers == ident_one.answers
    assert torch.equal(ident.generative, ident_one.generative) and torch.equal(ident.polling, ident_one.polling)
