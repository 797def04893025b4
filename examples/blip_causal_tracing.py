"""Causal tracing in BLIP-VQA as Palit et al. (ICCV-W 2023) run it in their released notebooks, one call per trace.

P1  question encoder: every element of the image embeddings (what the text reads of the image) times its own
    eps ~ N(1, 5), drawn anew in every forward (the corrupted baseline and each cell); restore the clean block
    output (resid_post) at one question token and layer; read P(the model's own clean first answer token) at the
    answer decoder's first step; normalise (p - p_corrupt) / (p_clean - p_corrupt); average 10 noise runs.
P2  answer decoder: the same, restoring the decoder's block output at its one position, [DEC].
P3  attention and cross-attention: the image embeddings times 0.7691 (the second notebook's constant), restoring
    the stream after the attention (resid_mid: LayerNorm(x + attn), HF's `.attention`) or after the
    cross-attention (resid_mid_cross, HF's `.crossattention`) over windows of 3 layers centred on each layer.
P4  heatmaps: per example for the first two (the repository's Question_Enc_1/2 and Answer_Dec_1/2), and the mean
    over examples with the questions aligned on their last token.

Other families (--model llava-hf/llava-1.5-7b-hf, a LLaVA-Phi or Qwen2-VL checkpoint) run the same protocol on their
towers: one LM reads the question with the image tokens in its sequence and predicts the answer, so P1 traces its
positions after the image (restoring an image token would undo the corruption rather than trace how the text
reads it), P2 is P1's last column and not run apart, and P3 runs where the LM has the stream (no cross-attention;
no resid_mid in Phi-2's parallel block). Figures are then named after the tower (lm_1.png, lm_attention_w3.png).

    python examples/blip_causal_tracing.py [--model Salesforce/blip-vqa-base] [--pairs 4]
    python examples/blip_causal_tracing.py --model Salesforce/blip-vqa-base \\
        --data color_coco_qa.csv --images coco/train2017 --pairs 100
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from _common import load, parser
from hooked_vlm import corruption, evaluation, names, patching, plot, view
from hooked_vlm.data import coco_qa


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "blip_causal_tracing")
    p.add_argument("--data", type=Path, default=None, help="a COCO-QA CSV (Palit et al.'s color_coco_qa.csv); "
                   "default: synthetic colour questions")
    p.add_argument("--images", type=Path, default=None, help="the folder of the CSV's COCO images (with --data)")
    p.add_argument("--samples", type=int, default=10, help="noise runs averaged in P1 and P2 (the paper: 10)")
    p.add_argument("--noise-std", type=float, default=5.0, help="std of the multiplicative noise N(1, std) of P1/P2")
    p.add_argument("--scale", type=float, default=0.7691, help="the constant factor of P3")
    p.add_argument("--window", type=int, default=3, help="layers restored together in P3")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    questions = load_questions(args)
    model = load(args.model, "blip-vqa", args.device, args.dtype)

    examples, ids, answers, after_image = [], [], [], []
    tok = model.processor.tokenizer
    for qid, image, question in questions:
        inputs = model.processor(images=image, text=evaluation.prompt(model, question),  # BLIP: the question as is
                                 return_tensors="pt").to(args.device)
        with torch.no_grad():
            answer = model(**inputs)[:, -1].argmax(-1)  # the model's own first answer token (the notebooks' `pred`)
        examples.append((inputs, answer))
        ids.append(qid)
        answers.append(tok.convert_ids_to_tokens(answer.tolist())[0])
        positions = model.positions(**inputs)
        if positions.image and positions.image[0]:  # the prompt tower's sequence holds the image's tokens
            after_image.append(int(positions.last[0]) - positions.image[0][-1].stop + 1)

    # the towers: BLIP's question encoder reads the image by cross-attention and its answer decoder predicts; a
    # decoder-only LM (LLaVA, Qwen2-VL) does both, its answer read at the prompt's last position
    question_tower, answer_tower = model.prompt_tower, model.output_tower
    separate = question_tower != answer_tower
    question_name = "question_encoder" if separate else question_tower
    # cells of the question tower: every token (BLIP), or the tokens after the image, counted from the end so that
    # they line up across questions (as many as the shortest question has)
    cells = list(range(-min(after_image), 0)) if after_image else None
    if cells is not None:
        print(f"{question_name}: tracing the last {len(cells)} positions (after the image tokens) of each prompt")

    noise = corruption.multiplicative(1.0, args.noise_std, redraw="forward", seed=args.seed)
    constant = corruption.scale(args.scale)
    # name: (tower, corruption, kind, window, samples)
    protocol = {question_name: (question_tower, noise, "resid", 1, args.samples)}
    if separate:
        protocol["answer_decoder"] = (answer_tower, noise, "resid", 1, args.samples)
    for where, stream in (("mid", "attention"), ("mid_cross", "crossattention")):
        name = f"{question_name}_{stream}_w{args.window}"
        n_layers = model.tower_info(question_tower).n_layers
        if any(names.resid(question_tower, i, where) in model.hook_dict for i in range(n_layers)):
            protocol[name] = (question_tower, constant, f"resid_{where}", args.window, 1)
        else:
            print(f"({name} skipped: no block of {question_tower!r} has resid_{where}, the stream after its "
                  f"{stream})")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model or "tiny blip-vqa (random weights)", "examples": ids, "answers": answers}
    for name, (tower, corrupt, kind, window, samples) in protocol.items():
        results = patching.sweep_results(patching.causal_trace, model, examples, ids=ids, answers=answers,
                                         tower=tower, corrupt=corrupt, kind=kind, window=window, samples=samples,
                                         positions=cells if tower == question_tower else None, normalize=True,
                                         batch_size=args.batch_size, progress=False)
        record[name] = {"settings": results.settings, "corruption": results.corruption[0]}
        one_step = separate and tower == answer_tower  # the answer decoder: its one position, the first step
        cmap = "Reds" if one_step else "Purples"
        if kind == "resid":  # P4: the first two examples, as the repository's figures
            for i in range(min(2, len(results))):
                labels = cell_labels(results, i)
                path = plot.heatmap(results.values[i], args.out / f"{name}_{i + 1}.png", cmap=cmap, centered=False,
                                    title=f"{name}: restoring after corrupted image, p({answers[i]})",
                                    xlabel="token", xticklabels=labels)
                print(f"{name} example {ids[i]} ({answers[i]!r}): {describe(results.values[i], labels)} -> {path}")
                view.sweep(results.values[i], args.out / f"{name}_{i + 1}.html", kind="positions", model=model,
                           inputs=examples[i][0], tower=tower, labels=labels, centered=False,
                           title=f"{name}: restoring after corrupted image, p({answers[i]})")
        if one_step:
            mean, labels = results.mean(), ["[DEC]"]
        else:  # questions of different lengths: aligned on their last token
            aligned = results.aligned("last")
            mean, labels = aligned.mean(), aligned.labels()
        suffix = "_mean" if kind == "resid" else ""
        path = plot.heatmap(mean, args.out / f"{name}{suffix}.png", cmap=cmap, centered=False, xlabel="token",
                            title=f"{name}: mean of {len(results)} (normalised; {corrupt.kind})", xticklabels=labels)
        print(f"{name + suffix:34s} mean: {describe(mean, labels)} -> {path}")
    (args.out / "protocol.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


def load_questions(args) -> list[tuple[str, object, str]]:
    """(id, image, question) triples: the COCO-QA CSV's first `--pairs` rows, or synthetic colour questions."""
    if args.data is not None:
        if args.images is None:
            raise SystemExit("--data needs --images: the folder of the COCO images its rows name (not shipped)")
        return [(ex.id, ex.image.load(), ex.question) for ex in coco_qa(args.data, args.images, limit=args.pairs)]
    pairs = corruption.synthetic_pairs(args.pairs, "color", seed=args.seed)
    return [(str(i), pair.clean_image, pair.prompt) for i, pair in enumerate(pairs)]


def cell_labels(results: patching.SweepResults, i: int) -> list[str]:
    """Example i's token at each traced cell; "[DEC]" for the answer decoder's one step (no tokens of its own)."""
    tokens, cells = results.tokens[i], results.cell_positions[i]
    if not tokens:
        return ["[DEC]"]
    return [tokens[int(p)] for p in cells] if cells is not None else tokens


def describe(trace: torch.Tensor, labels: list[str]) -> str:
    flat = torch.nan_to_num(trace.float(), nan=-1e9)
    layer, col = divmod(int(flat.argmax()), trace.shape[1])
    return f"strongest restore at layer {layer}, {labels[col]!r}: {trace[layer, col].item():.3f}"


if __name__ == "__main__":
    sys.exit(main())
