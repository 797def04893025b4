"""A NOTICE-style head-patching sweep and a dataset mean over many minimal pairs, sharded across processes.

One process per GPU (or CPU processes with gloo); rank 0 gathers the per-pair scores in the data set's order:

    torchrun --nproc_per_node 2 examples/distributed_sweep.py [--model llava-hf/llava-1.5-7b-hf] [--pairs 64]
    python examples/distributed_sweep.py      # one process: the same numbers

Writes `--out/scores.pt`: {"heads": [pairs, layers, heads], "mean_image_token": [D]} from rank 0.
"""

from __future__ import annotations

import sys

import torch

from _common import first_token, load, parser, to
from hooked_vlm import analysis, corruption, distributed, evaluation, metrics, patching


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0], "distributed")
    p.set_defaults(device=None)
    args = p.parse_args(argv)
    distributed.setup()  # a no-op unless launched by torchrun
    sharded = distributed.world_size() > 1
    device = args.device or distributed.device()
    model = load(args.model, "llava", str(device), args.dtype)
    processor, tok = model.processor, model.processor.tokenizer
    pairs = corruption.synthetic_pairs(args.pairs, "color", seed=3)
    examples = []
    for pair in pairs:  # cheap to build everywhere; each process runs only its share of the sweeps
        prompt = evaluation.prompt(model, f"{pair.prompt} Please answer with a single word.")  # the family's chat
        clean, corrupt = (to(processor(images=img, text=prompt, return_tensors="pt"), device)
                          for img in (pair.clean_image, pair.corrupt_image))
        metric = metrics.logit_diff(first_token(tok, pair.answer), first_token(tok, pair.wrong_answer))
        examples.append((clean, corrupt, metric))
    heads = patching.sweep_dataset(patching.patch_heads, model, examples, tower="lm", normalize=True,
                                   batch_size=args.batch_size, distributed=sharded, progress=distributed.rank() == 0)
    mean = analysis.mean_activation(model, [clean for clean, _, _ in examples], ["projector.hook_out"],
                                    over="tokens", distributed=sharded, batch_size=args.batch_size,
                                    progress=False)["projector.hook_out"]
    if distributed.rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"heads": heads, "mean_image_token": mean.cpu()}, args.out / "scores.pt")
        top = heads.nanmean(0).flatten().topk(3).indices.tolist()
        n_heads = heads.shape[-1]
        print(f"{len(pairs)} pairs on {distributed.world_size()} process(es); top heads (layer, head): "
              f"{[(i // n_heads, i % n_heads) for i in top]}; wrote {args.out / 'scores.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
