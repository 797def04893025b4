"""Activation patching sweeps that reuse work, built on the public hook API.

A sweep runs the clean and the corrupted input once each (caching only the hooks it needs), then, for each layer,
runs the variants of that layer (its positions, position groups or heads) stacked along the batch, in chunks of at
most `batch_size` rows, resuming the patched tower at that layer from the cached stream (`HookedVLM.resume`): the
towers before it and its earlier blocks are not re-run. Each cell equals the naive loop's (one full forward per
cell with `run_with_hooks`), which the tests check.

The corrupted run is either other inputs (a minimal pair) or the clean inputs with a `Corruption`
(`hooked_vlm.corruption`: Gaussian, multiplicative or constant-scale noise on a site, or hooks of your own). A
corruption that draws anew in every forward (`redraw="forward"`) gives every cell its own draw; its cells then run
whole forwards (still stacked), since the stream before the patch differs from cell to cell.

`direction="denoise"` runs the corrupted input with one activation taken from the clean run; `"noise"` the
reverse. With `normalize=True` a cell is `(m - m_corrupt) / (m_clean - m_corrupt)`: 0 is the corrupted run, 1 the
clean one. A sweep over a batch of examples reports the mean over examples; with `samples > 1` (random
corruptions) the mean over samples of the (normalised) cells.

Cells are single positions (`positions`), groups of positions patched jointly (`groups`: "image", "text", "last",
an object's patches, any positions per example, ragged), or heads. `sweep_results` runs a sweep over a data set and
keeps each example's values with its metadata, aligned by role (`SweepResults.aligned("last")`); over any iterable
of examples, and with `out=FOLDER` each example's result is stored as it finishes, so that a killed run resumes
(`hooked_vlm.result_store`). `cache_device="cpu"` keeps the cached runs off the accelerator; `batch_size` bounds
every forward, the cached runs' included, by splitting the examples into chunks, and `batch_size="auto"` picks the
largest that fits a memory budget (`memory_estimate`).

The package: `sweeps` (the public sweeps and their argument checks), `groups` (positions and groups of positions),
`engine` (the runs: clean and corrupted once per chunk of examples, the cells stacked and resumed), `memory` (bytes
per example and per forward row, the batch size a budget allows) and `results` (sweeps over a data set).
"""

from .engine import Corrupt, Direction
from .groups import GROUP_NAMES, ImagePatches, Patch, example_positions, resolve_groups
from .memory import MemoryEstimate, default_budget, memory_estimate
from .results import ANCHORS, AlignedResults, SweepResults, sweep_dataset, sweep_results
from .sweeps import (HEAD_ACTIVATIONS, STREAM_HOOKS, TRACE_KINDS, ablation_sweep, attribution_patch_heads,
                     attribution_patch_resid, causal_trace, head_leaf, patch_heads, patch_resid)

__all__ = [
    "patch_resid", "patch_heads", "causal_trace", "attribution_patch_resid", "attribution_patch_heads",
    "ablation_sweep", "sweep_dataset", "sweep_results", "SweepResults", "AlignedResults", "ImagePatches",
    "resolve_groups", "example_positions", "head_leaf", "TRACE_KINDS", "STREAM_HOOKS", "HEAD_ACTIVATIONS",
    "GROUP_NAMES", "ANCHORS", "Direction", "Corrupt", "Patch", "memory_estimate", "MemoryEstimate", "default_budget",
]
