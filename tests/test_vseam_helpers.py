"""V-SEAM's helpers against loops written out by hand: answers of several sub-tokens (policies, correctness by any
sub-token), head scores streamed over batches, set ablations with the authors' random sets, the logit lens of the
attention / MLP outputs and streams through HF's own modules, and rescaling with the authors' epsilon and clip."""

from __future__ import annotations

import random

import pytest
import torch

from hooked_vlm import HookedVLM, analysis, metrics
from hooked_vlm.analysis import HeadScores
from hooked_vlm.tiny import build_llava, make_bert_tokenizer, make_llama_tokenizer, random_image

QUESTIONS = ["what is in the picture?", "hi", "is it red?", "what color is the shape?", "count them", "yes or no?"]


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    images = [random_image(seed=i) for i in range(len(QUESTIONS))]

    def encode(idx, side="left"):
        processor.tokenizer.padding_side = side
        try:
            return dict(processor(images=[images[i] for i in idx],
                                  text=[f"USER: <image>\n{QUESTIONS[i]} ASSISTANT:" for i in idx],
                                  padding=True, return_tensors="pt"))
        finally:
            processor.tokenizer.padding_side = "left"

    full = encode(range(len(QUESTIONS)))
    with torch.no_grad():
        top = model(**full)[:, -1].argmax(-1)
    tok = processor.tokenizer
    answers = [metrics.answer_tokens(tok, w) for w in ("yes", "no", "red", "blue", "two", "cat")]
    # examples 0, 3 and 4 answered correctly, by their answer's first or by its last sub-token; the rest (very
    # likely) not
    answers[0] = [int(top[0])] + answers[0]
    answers[3] = answers[3] + [int(top[3])]
    answers[4] = answers[4] + [int(top[4])]
    return hf, model, encode, full, answers


# ------------------------------------------------------------------------------------------ answers and policies
def test_answer_tokens_are_the_words_pieces_less_a_lone_boundary():
    tok = make_llama_tokenizer()
    for word in ("yes", "purple", "Brick", "2"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        expect = ids[1:] if pieces[0] == "▁" else ids
        assert metrics.answer_tokens(tok, word) == expect
        assert metrics.answer_tokens(tok, word)[0] == metrics.answer_token(tok, word)


@pytest.mark.no_typecheck
def test_answers_given_as_words_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="unknown token"):
        metrics.answer_tokens(make_bert_tokenizer(), "Zebra")  # not in the tiny BERT vocabulary
    with pytest.raises(TypeError, match="answer_tokens"):
        metrics.answer_prob(["yes", "no"])
    with pytest.raises(ValueError, match="policy"):
        metrics.answer_prob([[1]], "mean")
    with pytest.raises(ValueError, match="empty"):
        metrics.answer_prob([[1], []])


def naive(logits, answers, position, policy):
    """One example at a time, with Python loops: what each policy means."""
    out = []
    for b, ids in enumerate(answers):
        p = position[b] if isinstance(position, list) else position
        at = logits[b, p]
        probs, unique = at.softmax(-1), list(dict.fromkeys(ids))
        if policy == "first":
            out.append(probs[ids[0]])
        elif policy == "last":
            out.append(probs[ids[-1]])
        elif policy == "sum":
            out.append(sum(probs[i] for i in unique))
        elif policy == "sequence":
            out.append(torch.stack([logits[b, p + j].log_softmax(-1)[i] for j, i in enumerate(ids)]).sum().exp())
        elif policy == "mean_logit":
            out.append(torch.stack([at[i] for i in unique]).mean())
        elif policy == "correct":
            out.append(torch.tensor(int(at.argmax()) in ids))
    return torch.stack(out)


@pytest.mark.parametrize("policy", ["first", "last", "sum", "sequence"])
def test_answer_prob_policies_equal_the_loop(policy):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g) * 3
    answers = [[4, 9, 4], [16], [2, 3]]  # a repeated sub-token, a one-token answer, two tokens
    position = [2, 5, 6] if policy == "sequence" else -1
    got = metrics.answer_prob(answers, policy, position)(logits, torch.arange(3))
    torch.testing.assert_close(got, naive(logits, answers, position if policy == "sequence" else 8, policy))
    # a stacked batch (rows -> examples), as the sweeps call metrics
    rows = torch.tensor([2, 0, 1, 0])
    stacked = metrics.answer_prob(answers, policy, position)(logits[rows], rows)
    torch.testing.assert_close(stacked, got[rows])


def test_answer_logit_mean_correct_and_one_id_per_example():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 11, generator=g)
    answers = [[4, 9, 4], [10], [2, 3]]
    torch.testing.assert_close(metrics.answer_logit(answers)(logits, torch.arange(3)),
                               naive(logits, answers, -1, "mean_logit"))
    top = logits[:, -1].argmax(-1)
    hit = [[5, int(top[0])], [int(top[1])], [int(top[2]) + 1 if int(top[2]) < 10 else 0]]
    assert metrics.correct(logits, hit).tolist() == [True, True, False]
    assert torch.equal(metrics.correct(logits, hit), naive(logits, hit, -1, "correct"))
    # one id per example is a one-token answer each: the same as metrics.prob
    ids = [3, 7, 1]
    torch.testing.assert_close(metrics.answer_prob(ids)(logits, torch.arange(3)),
                               metrics.prob(ids)(logits, torch.arange(3)))
    assert torch.equal(metrics.correct(logits, top), torch.ones(3, dtype=torch.bool))


def test_sequence_policy_refuses_an_answer_past_the_inputs():
    logits = torch.randn(1, 4, 7)
    with pytest.raises(ValueError, match="run past"):
        metrics.answer_prob([[1, 2, 3]], "sequence", [2])(logits, torch.arange(1))


# ------------------------------------------------------------------------------------------ head scores
def test_head_scores_by_sub_tokens_equal_one_forward_per_head(llava):
    """V-SEAM's Attention_Head_Analysis written out: P of the first sub-token at the last position, correct when
    the argmax is any sub-token, each head replaced by the mean of the others, one forward per head."""
    _, model, _, full, answers = llava
    scores = analysis.head_scores(model, full, answers, progress=False)
    examples = torch.arange(len(answers))
    with torch.no_grad():
        logits = model(**full)
    first = [ids[0] for ids in answers]
    base = metrics.prob(first)(logits, examples)
    correct = torch.tensor([int(logits[b, -1].argmax()) in ids for b, ids in enumerate(answers)])
    assert torch.equal(scores.correct, correct) and correct[[0, 3, 4]].all() and not correct.all()
    assert int(logits[3, -1].argmax()) != answers[3][0]  # correct by its last sub-token only
    for layer in range(2):
        name = f"lm.blocks.{layer}.attn.hook_z"
        for head in range(4):
            def mean_others(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = z[:, :, [h for h in range(4) if h != head]].mean(2)
                return z
            with torch.no_grad():
                drop = base - metrics.prob(first)(model.run_with_hooks(**full, fwd_hooks=[(name, mean_others)]),
                                                  examples)
            torch.testing.assert_close(scores.positive[layer, head], drop.clamp(min=0)[correct].mean(),
                                       atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(scores.negative[layer, head], (-drop).clamp(min=0)[~correct].mean(),
                                       atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(scores.delta[layer, head], drop.mean(), atol=1e-6, rtol=1e-4)


def test_head_scores_streamed_equal_one_batch(llava):
    """Chunks with unequal numbers of correct examples: the means are weighted by those numbers (a mean of the
    chunks' means would differ, which the test checks it can see)."""
    _, model, encode, full, answers = llava
    one = analysis.head_scores(model, full, answers, progress=False)
    split = [[0, 1], [2, 3, 4], [5]]
    chunks = [(encode(idx), [answers[i] for i in idx]) for idx in split]
    streamed = analysis.head_scores(model, iter(chunks), progress=False)  # a one-pass iterator
    assert torch.equal(streamed.correct, one.correct)
    for field in ("positive", "negative", "delta"):
        torch.testing.assert_close(getattr(streamed, field), getattr(one, field), atol=1e-7, rtol=1e-5)
    per_chunk = [analysis.head_scores(model, inputs, ans, progress=False) for inputs, ans in chunks]
    naive_positive = torch.stack([s.positive for s in per_chunk]).nanmean(0)
    assert not torch.allclose(naive_positive, one.positive, atol=1e-7, rtol=1e-5)
    # right padding: position="last" reads each example's last real token
    right = analysis.head_scores(model, [(encode(idx, "right"), [answers[i] for i in idx]) for idx in split],
                                 position="last", progress=False)
    assert torch.equal(right.correct, one.correct)
    torch.testing.assert_close(right.positive, one.positive, atol=1e-6, rtol=1e-4)
    # the ablation sweeps' cached runs kept on the CPU: the same scores exactly; at most two rows per forward (the
    # sweeps then split a chunk's examples too): equal to float32 rounding, measured 1.4e-9 on scores ~1e-2
    bounded = analysis.head_scores(model, iter(chunks), progress=False, cache_device="cpu", batch_size=2)
    same_rows = analysis.head_scores(model, iter(chunks), progress=False, batch_size=2)
    for field in ("positive", "negative", "delta", "correct"):
        assert torch.equal(getattr(bounded, field), getattr(same_rows, field)), field
        torch.testing.assert_close(getattr(bounded, field), getattr(streamed, field), atol=1e-8, rtol=1e-5)
    with pytest.raises(ValueError, match="cache_device"):
        analysis.head_scores(model, full, answers, progress=False, cache_device="no such device")
    with pytest.raises(TypeError, match="pairs"):
        analysis.head_scores(model, chunks, answers, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        analysis.head_scores(model, iter([]), progress=False)


# ------------------------------------------------------------------------------------------ set ablation
def authors_random_sets(n_layers, n_heads, k, trials, seed):
    """Attention_Head_Ablation.py's evaluate_random_trials / pick_random_heads, as the authors run them."""
    rng = random.Random(seed)
    sets = []
    for t in range(trials):
        rng.seed(seed + t)
        pairs = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        rng.shuffle(pairs)
        sets.append(pairs[:k])
    return sets


def test_random_head_sets_are_the_authors():
    assert analysis.random_head_sets(32, 32, k=10, trials=5, seed=42) == authors_random_sets(32, 32, 10, 5, 42)
    once = random.Random(42)  # their "random set once" (sampled with Random(SEED)) is trial 0's set
    pairs = [(layer, head) for layer in range(32) for head in range(32)]
    once.shuffle(pairs)
    assert analysis.random_head_sets(32, 32, seed=42)[0] == pairs[:10]
    for heads in analysis.random_head_sets(2, 4, k=5, trials=3, seed=1):
        assert len(set(heads)) == 5 and all(0 <= layer < 2 and 0 <= head < 4 for layer, head in heads)
    with pytest.raises(ValueError, match="k=9"):
        analysis.random_head_sets(2, 4, k=9)


def test_set_ablation_equals_zeroed_heads_by_hand(llava):
    _, model, encode, full, answers = llava
    first = [ids[0] for ids in answers]
    examples = torch.arange(len(answers))
    sets = {"positive": [(0, 1), (1, 3)], "negative": [(1, 0)]}
    got = analysis.head_set_ablation(model, full, answers, sets=sets, random_k=3, random_trials=2, seed=7)
    trials = authors_random_sets(2, 4, 3, 2, 7)
    assert got.trials == trials and got.n == len(answers)

    def run(heads):
        def zero(layer):
            def hook(z, hook):
                z = z.clone()
                z[:, :, [h for l_, h in heads if l_ == layer]] = 0
                return z
            return hook
        hooks = [(f"lm.blocks.{layer}.attn.hook_z", zero(layer)) for layer in {l_ for l_, _ in heads}]
        with torch.no_grad():
            logits = model.run_with_hooks(**full, fwd_hooks=hooks)
        p = metrics.prob(first)(logits, examples)
        acc = torch.tensor([int(logits[b, -1].argmax()) in ids for b, ids in enumerate(answers)]).float().mean()
        return acc, p

    base_acc, base_p = run([])
    assert got["baseline"]["accuracy"] == pytest.approx(float(base_acc))
    runs = []
    for name, heads in [*sets.items(), ("random 1", trials[0]), ("random 2", trials[1])]:
        acc, p = run(heads)
        row = got[name]
        assert row["heads"] == heads
        assert row["accuracy"] == pytest.approx(float(acc))
        assert row["mean_prob"] == pytest.approx(float(p.mean()), abs=1e-7)
        assert row["mean_drop"] == pytest.approx(float((base_p - p).mean()), abs=1e-7)
        if name.startswith("random"):
            runs.append((float(acc), float((base_p - p).mean())))
    summary = got["random"]
    assert summary["mean_drop"] == pytest.approx(sum(d for _, d in runs) / 2, abs=1e-7)
    assert summary["std_drop"] == pytest.approx(abs(runs[0][1] - runs[1][1]) / 2, abs=1e-7)  # population std
    assert "positive" in got.table()
    # streamed in batches: the same table
    streamed = analysis.head_set_ablation(model, [(encode([0, 1, 2]), answers[:3]), (encode([3, 4, 5]), answers[3:])],
                                          sets=sets, random_k=3, random_trials=2, seed=7)
    for a, b in zip(streamed.rows, got.rows):
        assert a["name"] == b["name"] and a["accuracy"] == pytest.approx(b["accuracy"])
        assert a["mean_drop"] == pytest.approx(b["mean_drop"], abs=1e-6)
    with pytest.raises(ValueError, match="taken"):
        analysis.head_set_ablation(model, full, answers, sets={"baseline": [(0, 0)]})


# ------------------------------------------------------------------------------------------ logit lens
@pytest.mark.parametrize("hook", ["resid_post", "attn_out", "mlp_out", "resid_mid"])
def test_logit_lens_of_each_stream_equals_hf_modules(llava, hook):
    """The stream or sub-layer output taken from HF's own modules (forward hooks on the decoder layer, its
    self-attention and MLP), put through HF's final norm and lm_head once."""
    hf, model, _, full, _ = llava
    lm = hf.model.language_model
    taken: dict[int, dict[str, torch.Tensor]] = {}

    def keep(layer, what):
        def fn(module, args, kwargs, output):
            entry = taken.setdefault(layer, {})
            entry[what] = (output[0] if isinstance(output, tuple) else output).detach()
            if what == "attn_out":  # the stream after the attention: the block's input plus its attention output
                entry["resid_mid"] = entry["resid_pre"] + entry["attn_out"]
        return fn

    def keep_input(layer):
        def fn(module, args, kwargs):
            taken.setdefault(layer, {})["resid_pre"] = (args[0] if args else kwargs["hidden_states"]).detach()
        return fn

    handles = []
    for layer, block in enumerate(lm.layers):
        handles.append(block.register_forward_pre_hook(keep_input(layer), with_kwargs=True))
        handles.append(block.self_attn.register_forward_hook(keep(layer, "attn_out"), with_kwargs=True))
        handles.append(block.mlp.register_forward_hook(keep(layer, "mlp_out"), with_kwargs=True))
        handles.append(block.register_forward_hook(keep(layer, "resid_post"), with_kwargs=True))
    try:
        with torch.no_grad():
            hf_logits = hf(**full).logits
    finally:
        for h in handles:
            h.remove()
    asked = torch.arange(len(QUESTIONS) * 2).view(-1, 2) * 7  # two token ids per example
    lens = analysis.logit_lens(model, full, tower="lm", hook=hook, k=5, tokens=asked)
    assert lens.hook == hook and lens.ids.shape[:3] == (2, len(QUESTIONS), full["input_ids"].shape[1])
    real = full["attention_mask"].bool()  # pad positions are no one's prediction
    for layer in range(2):
        with torch.no_grad():
            probs = hf.lm_head(lm.norm(taken[layer][hook])).float().softmax(-1)
        top = probs.topk(5, dim=-1)
        torch.testing.assert_close(lens.probs[layer][real], top.values[real], atol=1e-5, rtol=1e-4)
        assert torch.equal(lens.ids[layer][real], top.indices[real])
        expect = torch.stack([probs[b][:, asked[b]] for b in range(len(QUESTIONS))])  # [B, T, 2]
        torch.testing.assert_close(lens.token_probs[layer][real], expect[real], atol=1e-6, rtol=1e-4)
    if hook == "resid_post":  # the last block's output through the head once: the model's own prediction
        top = hf_logits.float().softmax(-1).topk(5, dim=-1)
        torch.testing.assert_close(lens.probs[-1][real], top.values[real], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="hook must be one of"):
        analysis.logit_lens(model, full, tower="lm", hook="hook_z")


# ------------------------------------------------------------------------------------------ rescaling
def test_rescaling_matches_the_authors_formula(llava):
    """register_head_edit_hooks: s[|s| < epsilon] = 0; scale = 1 + lambda * s; clip to (0, 2) or not at all."""
    _, model, _, full, _ = llava
    delta = torch.tensor([[0.02, -0.3, 1.5, -0.004], [0.6, 0.0, -2.0, 0.009]])
    scores = HeadScores(positive=delta.clamp(min=0), negative=(-delta).clamp(min=0), delta=delta,
                        correct=torch.ones(3, dtype=torch.bool))
    name = "lm.blocks.1.attn.hook_z"
    for lam, epsilon, low, high in [(1.0, 0.0, 0.0, 2.0), (0.5, 0.01, 0.0, 2.0), (1.0, 0.01, None, None)]:
        s = delta[1].clone()
        s[s.abs() < epsilon] = 0
        expect = 1 + lam * s
        if low is not None:
            expect = expect.clamp(low, high)
        seen = {}
        hooks = analysis.rescaling_hooks(model, scores, lam=lam, epsilon=epsilon, low=low, high=high)
        with torch.no_grad():
            model.run_with_hooks(**full, fwd_hooks=[(name, lambda z, hook: seen.setdefault("before", z.clone())),
                                                    *hooks, (name, lambda z, hook: seen.setdefault("after", z))])
        torch.testing.assert_close(seen["after"], seen["before"] * expect[:, None], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        analysis.rescaling_hooks(model, scores, epsilon=-1.0)
