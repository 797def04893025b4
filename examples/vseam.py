"""V-SEAM (Wang, Hu & Jiang, EMNLP 2025) on LLaVA-1.5 (or InstructBLIP-Vicuna with --family instructblip), as the
authors' released code (petergit1/V-SEAM) runs it, each experiment one library call (docs/vseam.md):

V2/V3 image-token / text-query group patching: per LM layer, the clean block output restored at all image (text)
  positions at once in the run on the concept-edited image; V4 token-wise patching: per layer and text position, the
  clean attention (MLP) output restored. Metric: the change, against the edited image's run, of the sum of P over the
  answer's sub-tokens at the last position (and of their mean logit).
V5 logit lens of the block output, attention output, intermediate residual and MLP output.
V6 head contributions: each head's values replaced by the mean of the other heads; positive heads from the questions
  answered correctly, negative heads from the others. V7: the top heads shared across subsets. V8 set ablation: zero
  the top positive / negative heads against random sets of 10 heads (5 seeded trials). V9 rescaling: each head times clip(1 + lambda * drop, 0, 2),
  fitted on one split and evaluated on another.

    python examples/vseam.py [--model llava-hf/llava-1.5-7b-hf] [--family llava|instructblip] [--pairs 1000]
                             [--data data/GQA/Object_Level/Animal/Animal.json data/GQA/Attribute_Level/Color/Color.json]

--model takes any family whose LM reads the image tokens (LLaVA-1.5, LLaVA-Phi, InstructBLIP-Vicuna, Qwen2-VL,
Qwen2.5-VL); --family only picks the tiny default model and V8's seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from _common import load, parser, to
from hooked_vlm import analysis, corruption, data, evaluation, metrics, names, patching, plot, view

STREAMS = ("resid_post", "attn_out", "resid_mid", "mlp_out")  # V5: block, attention, intermediate residual, MLP
INSTRUCTION = "Please answer with a single word."
# The authors' prompts, by the chat format (`model.prompt_template`) of the model they ran: LLaVA-1.5's, and
# InstructBLIP's bare question. Other families get their own chat format around the question and INSTRUCTION.
AUTHORS_PROMPTS = {"USER: <image>\n{question} ASSISTANT:": "USER: <image>\n{question} " + INSTRUCTION + "\nASSISTANT:",
                   "{question}": "Question: {question} Answer using a single word."}


def vseam_prompt(model, question: str) -> str:
    """V-SEAM's prompt for `question` in `model`'s chat format (the authors' own where they ran that format)."""
    authors = AUTHORS_PROMPTS.get(model.prompt_template)
    return authors.format(question=question) if authors else evaluation.prompt(model, f"{question} {INSTRUCTION}")


def subsets(args) -> dict[str, list[tuple[str, str, object, object]]]:
    """Per semantic subset, its (question, answer, clean image, edited image): the GQA subsets given by --data
    (V-SEAM's clean/ and corrupt/ folders beside each JSON, or the folders given), else drawn minimal pairs that
    change a colour and a shape."""
    n = max(args.pairs, 4)  # a fit and an evaluation split of at least two questions each
    if not args.data:
        return {attribute: [(p.prompt, p.answer, p.clean_image, p.corrupt_image)
                            for p in corruption.synthetic_pairs(n, attribute, seed=3)]
                for attribute in ("color", "shape")}
    out = {}
    for path in args.data:
        one = len(args.data) == 1
        examples = data.gqa(path, clean_dir=(args.clean_dir if one else None) or path.parent / "clean",
                            corrupt_dir=(args.corrupt_dir if one else None) or path.parent / "corrupt", limit=n)
        out[path.stem] = [(e.question, e.answer, e.image.load(), e.corrupt_image.load()) for e in examples]
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "vseam")
    p.add_argument("--family", choices=["llava", "instructblip"], default="llava")
    p.add_argument("--data", type=Path, nargs="*", default=[],
                   help="V-SEAM / GQA questions JSONs, one per semantic subset: V2-V6, V8, V9 on the first, V7 "
                        "compares V6's heads across them (default: drawn pairs)")
    p.add_argument("--clean-dir", type=Path, default=None, help="default: clean/ beside the (one) --data")
    p.add_argument("--corrupt-dir", type=Path, default=None, help="default: corrupt/ beside the (one) --data")
    p.add_argument("--lam", type=float, default=1.0, help="V9's lambda (the authors': 1)")
    p.add_argument("--top", type=int, default=5, help="heads per set in V8 (the paper's sets have 5)")
    p.add_argument("--paper-heads", action="store_true",
                   help="V8 with the authors' fixed head sets (32 x 32-head models) instead of V6's top heads")
    args = p.parse_args(argv)
    model = load(args.model, args.family, args.device, args.dtype)
    processor, tok = model.processor, model.processor.tokenizer
    if model.prompt_tower != model.output_tower:
        raise SystemExit(f"vseam.py patches and reads the LM that holds the image tokens and predicts the answer; "
                         f"this model reads the prompt in {model.prompt_tower!r} and answers in "
                         f"{model.output_tower!r} (BLIP, InstructBLIP-T5): pass LLaVA-1.5, LLaVA-Phi, "
                         "InstructBLIP-Vicuna, Qwen2-VL or Qwen2.5-VL")
    lm = model.output_tower  # reads the prompt, image tokens included, and predicts the answer
    levels = subsets(args)
    level, rows = next(iter(levels.items()))
    answers = [metrics.answer_tokens(tok, answer) for _, answer, _, _ in rows]

    def encode(subset, image: int) -> dict:  # image 2: the clean image, 3: the edited one
        return to(processor(images=[r[image] for r in subset], text=[vseam_prompt(model, r[0]) for r in subset],
                            padding=True, return_tensors="pt"), args.device)

    n_layers = model.tower_info(lm).n_layers
    out = args.out

    # ---------------------------------------------------------------- V2-V4: patching clean -> edited image
    def delta_metric(corrupt: dict, answer: list[list[int]], logit: bool = False):
        """Patched minus the edited image's run, per question: V-SEAM's Delta of the sum of P (or of the mean
        logit) over the answer's sub-tokens at the last position."""
        metric = metrics.answer_logit(answer, "mean") if logit else metrics.answer_prob(answer, "sum")
        with torch.no_grad():
            base = metric(model(**corrupt), torch.arange(len(answer), device=args.device))
        return lambda logits, examples: metric(logits, examples) - base[examples]

    clean, corrupt = encode(rows, 2), encode(rows, 3)
    groups, logit_groups = (patching.patch_resid(model, clean, corrupt, delta_metric(corrupt, answers, logit),
                                                 tower=lm, hook="resid_post", groups=["image", "text"],
                                                 batch_size=args.batch_size, progress=False)
                             for logit in (False, True))  # [L, 2] each: V2, V3
    plot.heatmap(groups, out / "v2_v3_group_patching.png", xticklabels=["image tokens (V2)", "text tokens (V3)"],
                 title=f"V2/V3 ({level}): Delta sum P(answer) restoring the clean block output at a group")
    for column, label in ((0, "V2 image-token"), (1, "V3 text-query ")):
        print(f"{label} group patching per layer: Delta sum P {[f'{v:.2e}' for v in groups[:, column].tolist()]}, "
              f"Delta mean logit {[f'{v:.2e}' for v in logit_groups[:, column].tolist()]}")

    # V4 per text position: prompts of different lengths do not align, so questions are swept in groups of equal
    # text length, the positions counted from the first text token as the authors do, and each cell averaged over
    # the questions that have it
    by_length: dict[int, list[int]] = {}
    for i, text in enumerate(model.positions(**clean).text):
        by_length.setdefault(len(text), []).append(i)
    width = max(by_length)
    for hook, name in (("attn_out", "attention"), ("mlp_out", "MLP")):
        total, count = torch.zeros(n_layers, width), torch.zeros(width)
        for length, idx in by_length.items():
            subset = [rows[i] for i in idx]
            clean_g, corrupt_g = encode(subset, 2), encode(subset, 3)
            text = torch.stack(model.positions(**clean_g).text)  # [B, P] each question's text positions
            cells = patching.patch_resid(model, clean_g, corrupt_g, delta_metric(corrupt_g, [answers[i] for i in idx]),
                                         tower=lm, hook=hook, positions=text,
                                         batch_size=args.batch_size, progress=False)  # [L, P]
            total[:, :length] += cells * len(idx)
            count[:length] += len(idx)
        plot.heatmap(total / count, out / f"v4_tokenwise_{hook.removesuffix('_out')}.png", xlabel="text position",
                     title=f"V4: Delta sum P(answer) restoring the clean {name} output at one text token")

    # ---------------------------------------------------------------- the fit / evaluation split (clean images)
    half = len(rows) // 2
    fit, fit_answers = encode(rows[:half], 2), answers[:half]
    held_out, eval_answers = encode(rows[half:], 2), answers[half:]

    # ---------------------------------------------------------------- V5: logit lens of the four streams
    first = torch.tensor([[ids[0]] for ids in fit_answers])
    last = model.positions(**fit).last[:, None]
    # a parallel block (Phi-2's attention and MLP read the same input) has no intermediate residual
    streams = [h for h in STREAMS if all(names.block(lm, i, names.leaf(h)) in model.hook_dict
                                         for i in range(n_layers))]
    for hook in sorted(set(STREAMS) - set(streams), key=STREAMS.index):
        print(f"V5 {hook}: skipped, not every block of this LM has it (a parallel attention + MLP block has no "
              "intermediate residual)")
    lens = {hook: analysis.logit_lens(model, fit, tower=lm, hook=hook, positions=last, k=3, tokens=first)
            for hook in streams}
    plot.heatmap(torch.stack([lens[h].token_probs[:, :, 0, 0].mean(1) for h in streams], 1),
                 out / "v5_logit_lens.png", xticklabels=streams, centered=False, cmap="viridis",
                 title="V5: P(answer's first sub-token) read off each stream at the last position")
    for hook in streams:
        top = [lens[hook].tokens[i][0][0][0] for i in range(n_layers)]
        print(f"V5 {hook:10s} top token per layer (question 0): {top}")

    # ---------------------------------------------------------------- V6: head contributions (fit split)
    scores = analysis.head_scores(model, fit, fit_answers, tower=lm, batch_size=args.batch_size, progress=False)
    for name in ("positive", "negative", "delta"):
        plot.heatmap(getattr(scores, name), out / f"v6_head_{name}.png", xlabel="head",
                     title=f"V6 {name} head scores (fit split)", centered=name == "delta")
    # click a head: its attention from the last token of the first fit question, over the image and the text
    first_fit = encode(rows[:1], 2)  # encoded alone: Qwen2-VL's pixel rows are patches, not one per question
    _, head_cache = model.run_with_cache(**first_fit, names_filter=view.attention_names(model, [lm]))
    view.sweep(scores.delta, out / "v6_head_delta.html", kind="heads", model=model, cache=head_cache,
               inputs=first_fit, tower=lm, title="V6 delta head scores (fit split); patterns of fit question 0")
    del head_cache
    k = min(args.top, scores.positive.numel() // 2)
    # positive heads exist only if some fit example was answered correctly, negative ones if some was not
    positive = scores.positive_heads(k) if scores.correct.any() else []
    negative = scores.negative_heads(k) if not scores.correct.all() else []
    print(f"V6 fit split: {int(scores.correct.sum())}/{half} answered correctly; positive heads "
          f"{positive or 'none (no correct answer)'}; negative heads {negative or 'none (no wrong answer)'}")

    # ---------------------------------------------------------------- V7: top heads shared across subsets
    tops = {level: (set(positive), set(negative))}
    for other, other_rows in list(levels.items())[1:]:
        fit_rows = other_rows[:len(other_rows) // 2]
        other_scores = analysis.head_scores(model, encode(fit_rows, 2),
                                            [metrics.answer_tokens(tok, r[1]) for r in fit_rows], tower=lm,
                                            batch_size=args.batch_size, progress=False)
        tops[other] = (set(other_scores.positive_heads(k)) if other_scores.correct.any() else set(),
                       set(other_scores.negative_heads(k)) if not other_scores.correct.all() else set())
    subset_names = list(tops)
    for i, a in enumerate(subset_names):
        for b in subset_names[i + 1:]:
            print(f"V7 top-{k} heads shared by {a} and {b}: positive {sorted(tops[a][0] & tops[b][0])}, "
                  f"negative {sorted(tops[a][1] & tops[b][1])}")

    # ---------------------------------------------------------------- V8: set ablation (evaluation split)
    if args.paper_heads:
        positive, negative = analysis.PAPER_POSITIVE_HEADS, analysis.PAPER_NEGATIVE_HEADS
    if positive:
        sets = {"positive": positive, **({"negative": negative} if negative else {})}
        table = analysis.head_set_ablation(model, held_out, eval_answers, sets=sets,
                                           random_k=min(10, scores.positive.numel() // 2), random_trials=5,
                                           seed=42 if args.family == "llava" else 42 + 997,  # the authors' seeds
                                           batch_size=args.batch_size)
        print("V8 set ablation on the evaluation split (heads set to 0 at every position):")
        print(table.table())
    else:
        print("V8/C5 skipped: no positive heads to ablate (fit on questions the model answers correctly)")

    # ---------------------------------------------------------------- V9: rescaling (fit -> evaluation split)
    def evaluate(hooks=()) -> tuple[float, float]:
        with torch.no_grad():
            logits = model.run_with_hooks(**held_out, fwd_hooks=list(hooks))
        p_answer = metrics.answer_prob(eval_answers, "first")(logits, torch.arange(len(eval_answers),
                                                                                   device=logits.device))
        return metrics.correct(logits, eval_answers).float().mean().item(), p_answer.mean().item()

    before, after = evaluate(), evaluate(analysis.rescaling_hooks(model, scores, lam=args.lam, tower=lm))
    print(f"V9 rescaling (lambda={args.lam}) on the evaluation split: accuracy {before[0]:.3f} -> {after[0]:.3f}, "
          f"mean P(answer) {before[1]:.5f} -> {after[1]:.5f}")
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
