"""V-SEAM (Wang, Hu & Jiang, EMNLP 2025) on LLaVA (or InstructBLIP-Vicuna with --family instructblip).

Head contributions (C4): replace each LM head's values with the mean of the other heads of its layer and measure the
change of P(answer), over the questions the model answers correctly (positive heads) and wrongly (negative heads);
set ablation (C5): zero the top positive heads, against as many random heads; rescaling (C6): each head times
clip(1 + lambda * drop, 0, 2), fitted on one split and evaluated on another.

    python examples/vseam.py [--model llava-hf/llava-1.5-7b-hf] [--family llava|instructblip] [--pairs 8]
"""

from __future__ import annotations

import random
import sys

import torch

from _common import first_token, llava_prompt, load, parser, to
from hooked_vlm import analysis, corruption, interventions, metrics, plot


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "vseam")
    p.add_argument("--family", choices=["llava", "instructblip"], default="llava")
    p.add_argument("--lam", type=float, default=1.0)
    args = p.parse_args(argv)
    model = load(args.model, args.family, args.device)
    processor, tok = model.processor, model.processor.tokenizer
    pairs = corruption.synthetic_pairs(max(args.pairs, 4), "color", seed=3)
    prompt = llava_prompt if args.family == "llava" else (lambda q: f"Question: {q} Answer using a single word.")

    def batch(subset):
        inputs = processor(images=[q.clean_image for q in subset], text=[prompt(q.prompt) for q in subset],
                           padding=True, return_tensors="pt")
        answers = torch.tensor([first_token(tok, q.answer) for q in subset], device=args.device)
        return to(inputs, args.device), answers

    half = len(pairs) // 2
    (fit, fit_answers), (held_out, eval_answers) = batch(pairs[:half]), batch(pairs[half:])
    scores = analysis.head_scores(model, fit, fit_answers, tower="lm", progress=False)
    for name in ("positive", "negative", "delta"):
        plot.heatmap(getattr(scores, name), args.out / f"head_{name}.png", xlabel="head",
                     title=f"C4 {name} head scores (fit split)", centered=name == "delta")
    k = min(5, scores.positive.numel() // 2)
    # positive heads exist only if some fit example was answered correctly, negative ones if some was not
    positive = scores.positive_heads(k) if scores.correct.any() else []
    negative = scores.negative_heads(k) if not scores.correct.all() else []
    print(f"C4 fit split: {int(scores.correct.sum())}/{half} answered correctly; positive heads "
          f"{positive or 'none (no correct answer)'}; negative heads {negative or 'none (no wrong answer)'}")

    def evaluate(hooks=()) -> tuple[float, float]:
        with torch.no_grad():
            logits = model.run_with_hooks(**held_out, fwd_hooks=list(hooks))
        examples = torch.arange(len(eval_answers))
        accuracy = (logits[:, -1].argmax(-1) == eval_answers).float().mean().item()
        return accuracy, metrics.prob(eval_answers)(logits, examples).mean().item()

    rng = random.Random(0)
    n_layers, n_heads = scores.positive.shape
    random_heads = rng.sample([(layer, head) for layer in range(n_layers) for head in range(n_heads)], k)
    rows = {"baseline": evaluate()}
    if positive:
        rows[f"zero {k} positive heads"] = evaluate(interventions.ablate_heads(model, positive, tower="lm"))
        rows[f"zero {k} random heads"] = evaluate(interventions.ablate_heads(model, random_heads, tower="lm"))
    else:
        print("C5 skipped: no positive heads to ablate (fit on questions the model answers correctly)")
    rows[f"rescaled, lambda={args.lam}"] = evaluate(analysis.rescaling_hooks(model, scores, lam=args.lam, tower="lm"))
    print("C5/C6 on the evaluation split (held out from the fit):")
    for name, (accuracy, p_answer) in rows.items():
        print(f"  {name:28s} accuracy {accuracy:.3f}  mean P(answer) {p_answer:.5f}")
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
