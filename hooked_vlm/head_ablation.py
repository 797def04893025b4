"""Ablating sets of heads at once against the unablated model (V-SEAM's set ablation, `Attention_Head_Ablation.py`):
a positive set, a negative set and seeded random sets of k heads, with accuracy and the mean change of P(answer)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import interventions, metrics
from .arguments import strict
from .data.collate import batch_rows, check_batch_size, split
from .models.base import HookedVLM

Head = tuple[int, int]  # (layer, head)

# The sets hard-coded in V-SEAM's Attention_Head_Ablation.py (EXAMPLE_POSITIVE_HEADS / EXAMPLE_NEGATIVE_HEADS), used
# there for LLaVA-1.5-7B and InstructBLIP-Vicuna-7B alike (32 layers x 32 heads).
PAPER_POSITIVE_HEADS: list[Head] = [(0, 11), (6, 26), (10, 15), (26, 11), (11, 1)]
PAPER_NEGATIVE_HEADS: list[Head] = [(31, 11), (30, 11), (29, 11), (12, 2), (9, 27)]


Batch = tuple[Mapping[str, Any], metrics.AnswerIds]


def batches_of(inputs: Mapping[str, Any] | Iterable[Batch], answer: metrics.AnswerIds | None,
               where: str) -> Iterable[Batch]:
    """One batch `(inputs, answer)` or an iterable of `(inputs, answers)` batches, as the dataset analyses take
    them (`head_set_ablation`, `analysis.head_scores`); each batch is checked as it comes."""
    if isinstance(inputs, Mapping):
        if answer is None:
            raise TypeError(f"{where}: pass the answers of the batch (token ids, or one list of sub-token ids per "
                            "example: metrics.answer_tokens)")
        return [(inputs, answer)]
    if answer is not None:
        raise TypeError(f"{where}: with an iterable of batches each batch carries its answers: pass (inputs, answers) "
                        "pairs and no answer")
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise TypeError(f"{where}: inputs is a {type(inputs).__name__}: pass the processor's output (a dict of "
                        "tensors) or an iterable of (inputs, answers) batches")

    def checked() -> Iterable[Batch]:
        for i, item in enumerate(inputs):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping)):
                raise TypeError(f"{where}: batch {i} is a {type(item).__name__}: each batch must be a pair (inputs, "
                                "answers), inputs the processor's output")
            yield item[0], item[1]

    return checked()


def positions_of(model: HookedVLM, inputs: Mapping[str, Any], position: metrics.Position | str) -> metrics.Position:
    """`position`, or, for `"last"`, each example's last real token (`model.positions(**inputs).last`): the
    position to read a right-padded batch's answer at."""
    if isinstance(position, str):
        if position != "last":
            raise ValueError(f"position={position!r}: pass 'last', an int or one int per example")
        return model.positions(**inputs).last
    return position


@dataclass
class Unablated:
    """One batch's run without ablation, which the ablations of that batch are compared with: its `metric` (P of
    the answer under the policy, read at `position`), per example `prob` (float64, CPU) and `correct` (bool, CPU)."""

    inputs: Mapping[str, Any]
    answers: metrics.AnswerIds | metrics.AnswerTable
    position: metrics.Position
    metric: metrics.Metric
    examples: Tensor
    prob: Tensor
    correct: Tensor


def unablated_runs(model: HookedVLM, inputs: Mapping[str, Any] | Iterable[Batch], answer: metrics.AnswerIds | None,
                   position: metrics.Position | str, policy: str, where: str, batch_size: int | None = None
                   ) -> Iterator[Unablated]:
    """The unablated run of each batch (`batches_of`), its metric checked to be finite; with `batch_size`, each
    batch is split into chunks of at most that many examples (their answers and positions with them), one run per
    chunk, so that sums over the runs equal those over the whole batch."""
    check_batch_size(batch_size)
    for inputs_b, answers_b in batches_of(inputs, answer, where):
        for inputs_i, answers, pos in _chunks(model, inputs_b, answers_b, position, batch_size):
            metric = metrics.answer_prob(answers, policy, pos)
            with torch.no_grad():
                logits = model(**inputs_i)
            examples = torch.arange(logits.shape[0], device=logits.device)
            prob = metrics.evaluate(metric, logits, examples, where).double().cpu()  # [B]
            metrics.check_finite(prob, "the unablated run's examples")
            yield Unablated(inputs_i, answers, pos, metric, examples, prob,
                            metrics.correct(logits, answers, pos).cpu())


def _chunks(model: HookedVLM, inputs: Mapping[str, Any], answers: metrics.AnswerIds, position: metrics.Position | str,
            batch_size: int | None) -> Iterator[tuple[Mapping[str, Any], Any, metrics.Position]]:
    """(inputs, answers, position) of each chunk of at most `batch_size` examples of one batch (None: the batch as
    it is). Per-example answers and positions are split with the inputs; a shared one is kept."""
    n = batch_rows(inputs)
    if batch_size is None or batch_size >= n:
        yield inputs, answers, positions_of(model, inputs, position)
        return
    table = metrics.answer_table(answers)
    if not table.shared and len(table) != n:
        raise ValueError(f"answers: {len(table)} given, but the batch has {n} examples; give one per example (or a "
                         "single answer for all)")
    per_example = not isinstance(position, (str, int)) and torch.as_tensor(position).ndim == 1
    if per_example and len(position) != n:
        raise ValueError(f"position: {len(position)} values given, but the batch has {n} examples; give one per "
                         "example (or a single int for all)")
    for rows, chunk in split(inputs, batch_size):
        sub = table if table.shared else metrics.AnswerTable(table.ids[rows.start:rows.stop],
                                                             table.mask[rows.start:rows.stop], shared=False)
        pos = torch.as_tensor(position)[rows.start:rows.stop] if per_example else position
        yield chunk, sub, positions_of(model, chunk, pos)


@strict
def random_head_sets(n_layers: int, n_heads: int, *, k: int = 10, trials: int = 5, seed: int = 42) -> list[list[Head]]:
    """V-SEAM's random head sets: trial t lists every (layer, head) layer-major, shuffles the list with
    `random.Random(seed + t)` and keeps the first k. So each set has k distinct heads, drawn from all heads (the
    positive and negative sets are not excluded), and the sets of different trials are independent; the authors'
    seed is 42 for LLaVA and 42 + 997 for InstructBLIP, and their "random set once" is trial 0's set."""
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads), ("trials", trials)):
        if isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: pass a positive number")
    if isinstance(k, bool) or not 1 <= k <= n_layers * n_heads:
        raise ValueError(f"k={k!r}: pass a number of heads in 1..{n_layers * n_heads}")
    sets = []
    for trial in range(trials):
        pairs = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        random.Random(seed + trial).shuffle(pairs)
        sets.append(pairs[:k])
    return sets


@dataclass
class SetAblation:
    """The result table of `head_set_ablation`: one row per condition (`name`, `heads`, `accuracy`, `mean_prob`:
    mean P(answer), `mean_drop`: mean of P_unablated - P_ablated over the examples), the unablated model first
    (`baseline`, drop 0), each named set, each random trial (`random 1`..), and a summary of the random trials
    (`random`: the mean over trials, with `std_accuracy` and `std_drop`, population std over trials as the authors'
    np.std). `n`: the number of examples."""

    rows: list[dict[str, Any]]
    n: int
    mode: str = "zero"
    trials: list[list[Head]] = field(default_factory=list)

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(f"no condition {name!r}; the table has {[row['name'] for row in self.rows]}")

    def table(self) -> str:
        """The rows as aligned text."""
        width = max(len(row["name"]) for row in self.rows)
        lines = [f"{'condition':{width}s}  accuracy  mean P(answer)  mean drop of P  heads"]
        for row in self.rows:
            spread = (f" ±{row['std_accuracy']:.3f}", f" ±{row['std_drop']:.5f}") if "std_drop" in row else ("", "")
            heads = (f"{row['trials']} sets of {len(row['heads']) // row['trials']}" if "trials" in row
                     else row["heads"] if len(row["heads"]) <= 6 else f"{row['heads'][:5]}... ({len(row['heads'])})")
            lines.append(f"{row['name']:{width}s}  {row['accuracy']:.3f}{spread[0]}  {row['mean_prob']:.5f}  "
                         f"{row['mean_drop']:+.5f}{spread[1]}  {heads}")
        return "\n".join(lines)


@strict
def head_set_ablation(model: HookedVLM, inputs: Mapping[str, Any] | Iterable[tuple[Mapping[str, Any], Any]],
                      answer: metrics.AnswerIds | None = None, *, sets: Mapping[str, Sequence[Head]],
                      random_k: int = 10, random_trials: int = 5, seed: int = 42,
                      mode: Literal["zero", "mean", "mean_of_others", "resample"] = "zero", tower: str = "lm",
                      attention: Literal["attn", "cross_attn"] = "attn", position: metrics.Position | str = -1,
                      policy: str = "first", means: Mapping[str, Tensor] | None = None,
                      batch_size: int | None = None) -> SetAblation:
    """Ablate each set of heads at once (`interventions.ablate_heads`, every position; `mode="zero"` as V-SEAM)
    and compare with the unablated model: accuracy (the top token at `position` is one of the answer's sub-tokens)
    and the mean change of P(answer) (`policy`, see `metrics.answer_prob`; V-SEAM: the first sub-token).

    `sets`: named sets, e.g. {"positive": scores.positive_heads(5), "negative": scores.negative_heads(5)} (or
    `PAPER_POSITIVE_HEADS` / `PAPER_NEGATIVE_HEADS` on a 32 x 32-head model); besides them, `random_trials` random
    sets of `random_k` heads (`random_head_sets(..., seed=seed)`; 0 trials: none). `inputs`, `answer`: one batch
    and its answers, or an iterable of `(inputs, answers)` batches streamed once (answer=None). `position`: an
    int, one per example, or "last". Returns the table (`SetAblation`), one forward per condition and batch.
    `batch_size`: the most examples per forward; larger batches are split (their answers and positions with them)
    and the counts summed, so the table equals one batch holding every example (None: each batch as given).
    `mode="resample"` draws from the other examples of a forward's batch, so it refuses a split.
    """
    if policy not in metrics.ANSWER_POLICIES:
        raise ValueError(f"policy must be one of {', '.join(metrics.ANSWER_POLICIES)}, got {policy!r}")
    if not isinstance(sets, Mapping):
        raise TypeError(f"sets is a {type(sets).__name__}: pass named sets, e.g. {{'positive': [(0, 3), (1, 2)]}}")
    conditions = {name: list(heads) for name, heads in sets.items()}
    for name in conditions:
        if name == "baseline" or name == "random" or name.startswith("random "):
            raise ValueError(f"set name {name!r} is taken by the table's own rows; name it otherwise")
    info = model.tower_info(tower)  # raises for an unknown tower
    trials = random_head_sets(info.n_layers, info.n_heads, k=random_k, trials=random_trials, seed=seed) \
        if random_trials else []
    conditions.update({f"random {t + 1}": heads for t, heads in enumerate(trials)})
    # every set checked (layers, heads, means) before any forward
    hooks = {name: interventions.ablate_heads(model, heads, mode=mode, tower=tower, attention=attention,
                                              means=means, seed=seed) for name, heads in conditions.items()}
    check_batch_size(batch_size)
    totals = {name: torch.zeros(3, dtype=torch.float64) for name in ["baseline", *conditions]}  # correct, P, drop
    n = 0
    batches = batches_of(inputs, answer, "head_set_ablation")
    if mode == "resample" and batch_size is not None:
        batches = _unsplit(batches, batch_size)
    for run in unablated_runs(model, batches, None, position, policy, "head_set_ablation", batch_size):
        base = run.prob
        totals["baseline"] += torch.stack([run.correct.sum().double(), base.sum(), torch.zeros((), dtype=torch.float64)])
        for name, hook_list in hooks.items():
            with torch.no_grad():
                ablated_logits = model.run_with_hooks(**run.inputs, fwd_hooks=hook_list)
            p = metrics.evaluate(run.metric, ablated_logits, run.examples, "head_set_ablation").double().cpu()
            totals[name] += torch.stack([metrics.correct(ablated_logits, run.answers, run.position).sum().double(),
                                         p.sum(), (base - p).sum()])
        n += base.shape[0]
    if not n:
        raise ValueError("head_set_ablation got no batches: pass a batch and its answers, or a non-empty iterable "
                         "of (inputs, answers) batches (a generator already consumed is empty)")
    rows = [{"name": name, "heads": [] if name == "baseline" else conditions[name],
             "accuracy": float(t[0] / n), "mean_prob": float(t[1] / n), "mean_drop": float(t[2] / n)}
            for name, t in totals.items()]
    if trials:
        runs = torch.tensor([[row["accuracy"], row["mean_prob"], row["mean_drop"]] for row in rows
                             if row["name"].startswith("random ")], dtype=torch.float64)
        mean, std = runs.mean(0), runs.std(0, unbiased=False)
        rows.append({"name": "random", "heads": [h for t in trials for h in t], "accuracy": float(mean[0]),
                     "mean_prob": float(mean[1]), "mean_drop": float(mean[2]), "std_accuracy": float(std[0]),
                     "std_drop": float(std[2]), "trials": len(trials)})
    return SetAblation(rows, n, mode, trials)


def _unsplit(batches: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """The batches, each refused if `batch_size` would split it (a resampled head takes another example of the
    same forward's batch: splitting would change the draws)."""
    for inputs, answers in batches:
        if batch_rows(inputs) > batch_size:
            raise ValueError(f"mode='resample' draws each head's values from another example of the batch, so a "
                             f"batch of {batch_rows(inputs)} cannot be split into batch_size={batch_size}: pass "
                             "batch_size=None (or at least the batch's size), or another mode")
        yield inputs, answers
