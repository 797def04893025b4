"""The runs of a sweep: the clean and corrupted runs made once (`_Setup`, `_Runs`), a `Corruption` bound to a batch
(`_Bound`), the cells of each layer stacked along the batch and resumed at that layer (`_Runs.sweep`), and the
checks and batch helpers they share."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .. import metrics as metrics_
from .. import names
from ..components.kv_cache import KVCache
from ..corruption.noise import Corruption, empirical_std
from ..hooks import HookSpec
from ..models.base import HookedVLM
from ..utils import progress_bar
from .groups import Patch, _Cells, _group, _make_cells, _tower_positions, example_positions

Direction = Literal["denoise", "noise"]
Corrupt = Mapping[str, Any] | Corruption


# ---------------------------------------------------------------------------------------------- what sweeps patch
STREAM_HOOKS = ("resid_pre", "resid_mid", "resid_mid_cross", "resid_post", "attn_out", "cross_attn_out", "mlp_out")
HEAD_ACTIVATIONS = ("z", "q", "k", "v", "pattern")
TRACE_KINDS = {"resid": "hook_resid_post", "resid_mid": "hook_resid_mid", "resid_mid_cross": "hook_resid_mid_cross",
               "attn": "hook_attn_out", "mlp": "hook_mlp_out", "cross_attn": "hook_cross_attn_out"}


def _require_leaf(model: HookedVLM, tower: str, leaf: str, what: str | None = None) -> None:
    """Raise before any forward if no block of `tower` has the hook `leaf` (a cross-attention where there is none)."""
    n_layers = model.tower_info(tower).n_layers  # raises for an unknown tower, naming the towers
    if not any(names.block(tower, i, leaf) in model.hook_dict for i in range(n_layers)):
        hint = (f"tower {tower!r} has no cross-attention" if "cross_attn" in leaf
                else f"no layer of tower {tower!r} has a hook {leaf!r}")
        raise ValueError(f"{what or leaf}: {hint}; choose a tower and hook it has (model.hook_names() lists them)")


def head_leaf(model: HookedVLM, tower: str, attention: str, activation: str) -> str:
    """The block-relative hook name of a head activation (`"cross_attn.hook_z"`), checked, before any forward, to
    exist in some block of `tower`."""
    if attention not in ("attn", "cross_attn"):
        raise ValueError(f"attention must be 'attn' or 'cross_attn', got {attention!r}")
    leaf = names.leaf(attention, activation)
    _require_leaf(model, tower, leaf, f"attention={attention!r}")
    return leaf


# ---------------------------------------------------------------------------------------------- corruptions
def _site_hook(model: HookedVLM, c: Corruption, tower: str) -> str | None:
    """The hook a corruption changes (None for hooks of the user's own)."""
    if c.kind == "hooks":
        for name, _ in c.hooks:
            if isinstance(name, str) and name not in model.hook_dict:
                raise ValueError(f"from_hooks: {name!r} is not a hook of this model (model.hook_names() lists them)")
        return None
    if c.site == "image":
        site = model.image_embeddings_hook
        if not site or site not in model.hook_dict:
            raise ValueError(f"{site or 'image_embeddings_hook'} is not a hook of this model: nothing to add noise "
                             "to")
        return site
    if c.site == "tokens":
        site = names.tower_hook(c.tower or tower, "hook_embed")
        if site not in model.hook_dict:
            raise ValueError(f"site='tokens': {site} is not a hook of this model: name a tower with token embeddings")
        return site
    if c.site not in model.hook_dict:
        raise ValueError(f"site={c.site!r} is not a hook of this model; pass 'image', 'tokens' or a hook name "
                         "(model.hook_names() lists them)")
    return c.site


class _Bound:
    """A corruption bound to a chunk of a batch: its site, the positions it changes there ([B, T] mask; None: all),
    the scale of a Gaussian; `hooks(sample, forwards)` for a batch of len(forwards) stacked copies of the chunk's
    examples, copy k being forward `forwards[k]` (see `Corruption.seed_of`).

    `rows` (None: the whole batch): the chunk's examples, as indices in the whole batch of `total`. Every draw is made
    for the whole batch's shape, as `Corruption.draw` defines it, and the chunk keeps its rows, so that chunking
    never changes the numbers an example gets. `positions` (None: the cache's): the whole batch's `Positions`, for
    the mask; `std` (None: from the cache): the Gaussian's scale measured over the whole batch."""

    def __init__(self, model: HookedVLM, c: Corruption, tower: str, site: str | None, clean_cache: Any,
                 offloaded: bool = False, *, rows: Tensor | None = None, total: int | None = None,
                 positions: Any = None, std: float | None = None):
        self.c, self.site, self.mask, self.std = c, site, None, None
        self._drawn: dict[int, Tensor] = {}
        self.rows, self.total = rows, total
        if site is None:  # hooks of the user's own
            self.shape = None
            return
        values = clean_cache[site]
        self.shape = tuple(values.shape)
        self.mask = _site_mask(model, c, site, clean_cache.positions if positions is None else positions,
                               self.shape[0] if total is None else total, self.shape[1])
        if self.mask is not None and rows is not None:
            self.mask = self.mask[rows]
        if c.kind == "gaussian":
            given = c.params.get("std")
            if given is not None or not c.params["scale"]:
                self.std = float(given) if given is not None else 0.0
            elif std is not None:
                self.std = std
            else:
                if offloaded:  # the std is computed where the default computes it (the same float sum)
                    values = values.to(model.device)
                self.std = empirical_std(values, self.mask)

    @property
    def cut_allowed(self) -> bool:
        """False when the corruption touches a block hook (the sweep's resumed runs would see it on a suffix)."""
        sites = [self.site] if self.site is not None else [name for name, _ in self.c.hooks]
        return all(isinstance(s, str) and names.parse(s).layer is None for s in sites)

    def _draw(self, sample: int, forward: int) -> Tensor:
        """The draw of (sample, forward) for this chunk's rows: drawn for the whole batch, then its rows kept."""
        if self.rows is None:
            return self.c.draw(self.shape, sample, forward)
        return self.c.draw((self.total, *self.shape[1:]), sample, forward)[self.rows]

    def hooks(self, sample: int, forwards: Sequence[int]) -> list[HookSpec]:
        c = self.c
        if c.kind == "hooks":
            return list(c.hooks)
        n, B = len(forwards), self.shape[0]
        noise = None
        if c.per_forward:
            noise = torch.cat([self._draw(sample, f) for f in forwards])
        elif c.random:
            if sample not in self._drawn:
                self._drawn = {sample: self._draw(sample, 0)}
            noise = self._drawn[sample].repeat(n, *([1] * (len(self.shape) - 1)))
        mask = None if self.mask is None else self.mask.repeat(n, 1)
        site, shape = self.site, self.shape

        def corrupt(t: Tensor, hook: Any) -> Tensor:
            if t.shape[0] != n * B or tuple(t.shape[1:]) != shape[1:]:
                raise ValueError(f"the corruption of {site} was drawn for activations of shape {shape} ({n} "
                                 f"stacked), but the activation has shape {tuple(t.shape)}")
            return c.apply(t, mask, noise, self.std)

        return [(site, corrupt)]


def _site_mask(model: HookedVLM, c: Corruption, site: str, positions: Any, B: int, T: int) -> Tensor | None:
    """The [B, T] positions of `site` a corruption changes (None: all), from the batch's `Positions`."""
    mask = None
    if c.site == "image":
        image = model.image_embeddings_mask(positions) if positions is not None else None
        mask = None if image is None else image.bool().cpu()
    if c.positions is not None:
        pos = _tower_positions(model, names.parse(site).tower, positions)
        pos = pos if pos is not None and pos.input_ids.shape[1] == T else None
        if isinstance(c.positions, (list, tuple, Tensor)) and _ints(c.positions):
            members = list(example_positions(c.positions, B, T))  # a list shared or [B, P] per example
        else:
            members = _group(c.positions, "positions", pos, B, T)
        chosen = torch.zeros(B, T, dtype=torch.bool)
        for b, m in enumerate(members):
            chosen[b, m.cpu()] = True
        mask = chosen if mask is None else mask & chosen
    if c.kind != "gaussian" and mask is not None and not mask.any():
        raise ValueError("no site to corrupt: the positions select nothing")
    return mask


def _ints(value: Any) -> bool:
    if isinstance(value, Tensor):
        return not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class _Setup:
    """The runs of a sweep, shared by its samples, chunk by chunk of its examples.

    The examples are split into chunks of at most `batch_size` (None: one chunk), so that no forward, the cached
    runs included, holds more than `batch_size` rows. Per chunk: with corrupted inputs, the two runs; with a
    `Corruption`, the clean run once (the values to patch in or the clean metric, and what the corruption reads),
    then per sample the corrupted run; `corrupt=None` (an ablation sweep), the one run. What depends on the whole
    batch is computed for the whole batch: the cells (`_Runs.cells`, from the whole batch's positions), the
    Gaussian's empirical std (a pass over the chunks up to the corrupted site, when there are several), the draws
    (`_Bound`); the metric sees each row's index in the whole batch. `average(one)` runs `one` (the cells of one
    chunk and sample, per example, examples last) on every chunk and sample, joins the chunks along the examples
    and averages over the examples (unless `per_example`) and the samples."""

    def __init__(self, model: HookedVLM, clean: Mapping[str, Any], corrupt: Corrupt | None, metric: metrics_.Metric,
                 tower: str, leaves: list[str], direction: Direction, samples: int,
                 cache_device: torch.device | str | None = None, batch_size: int | None = None):
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        if corrupt is None:
            _check_inputs(model, clean, clean)
        else:
            _check_corrupt(model, clean, corrupt)
        if samples > 1 and not (isinstance(corrupt, Corruption) and corrupt.random):
            what = "corrupted inputs" if isinstance(corrupt, Mapping) else f"a {corrupt.kind} corruption"
            raise ValueError(f"samples={samples} with {what}: every sample would be the same run; samples average "
                             "the draws of a random corruption (gaussian, multiplicative)")
        self.model, self.clean, self.corrupt, self.metric = model, clean, corrupt, metric
        self.tower, self.leaves, self.direction, self.samples = tower, leaves, direction, samples
        self.cache_device = cache_device = _check_cache_device(cache_device)
        self.B = _batch_size(clean)
        self.chunks = example_chunks(self.B, batch_size)
        chunked = len(self.chunks) > 1
        # the whole batch's positions: the cells and the corruption's mask are resolved on them; the images of
        # each example (`Positions.image_examples`), for the chunks to take their examples' images
        self.positions = self.clean_positions = self.clean_images = self.corrupt_images = None
        if chunked:
            for inputs in (clean, corrupt if isinstance(corrupt, Mapping) else {}):
                _check_batch_first({k: v for k, v in inputs.items() if k not in IMAGE_INPUTS}, self.B)
            self.clean_positions = self.positions = model.positions(**clean)
            self.clean_images = self.corrupt_images = _input_images(self.clean_positions)
            if isinstance(corrupt, Mapping):
                corrupt_positions = model.positions(**corrupt)
                self.corrupt_images = _input_images(corrupt_positions)
                self.positions = corrupt_positions if direction == "denoise" else self.clean_positions
            for inputs, images in ((clean, self.clean_images), (corrupt if isinstance(corrupt, Mapping) else {},
                                                                self.corrupt_images)):
                _check_batch_first(inputs, self.B, images)
        self.site, self.std = None, None
        if isinstance(corrupt, Corruption):
            if corrupt.kind == "hooks" and chunked:
                raise ValueError(f"a from_hooks corruption runs on the whole batch of {self.B} examples (its hooks "
                                 f"may hold per-example values), but batch_size={batch_size} splits it: pass "
                                 f"batch_size >= {self.B}, or sweep fewer examples per call (sweep_dataset)")
            self.site = _site_hook(model, corrupt, tower)
            site_tower = None if self.site is None else names.parse(self.site).tower
            image_rows = site_tower is not None and _row_examples(model, site_tower, self.clean_positions) is not None
            if chunked and image_rows:
                # its rows are images padded to the chunk's largest: the draws and a Gaussian's std would differ
                raise ValueError(f"a corruption of {self.site}, in tower {site_tower!r} whose rows are the images "
                                 f"(padded to the largest), cannot be split into chunks of examples: pass batch_size "
                                 f">= {self.B}, or corrupt the image where the language model reads it "
                                 "(site='image')")
        self.normalize: bool | None = None  # as the sweep's cells ran (for the chunks with no row to patch)

    def _global_std(self) -> float | None:
        """A Gaussian's empirical std over the whole batch, when the chunks cannot measure it alone: the values at
        the site, chunk by chunk (each forward stopped there), joined in the order the whole batch holds them."""
        c = self.corrupt
        if (len(self.chunks) == 1 or not isinstance(c, Corruption) or c.kind != "gaussian"
                or c.params.get("std") is not None or not c.params["scale"]):
            return None
        model, site, picked = self.model, self.site, []
        mask = None
        for rows in self.chunks:
            inputs = _select(self.clean, rows, self.clean_images)
            with torch.no_grad():
                _, cache = model.run_with_cache(**inputs, names_filter=lambda n: n == site, stop_at_hook=site,
                                                device=self.cache_device)
            values = cache[site]
            if mask is None:
                mask = _site_mask(model, c, site, self.clean_positions, self.B, values.shape[1])
            if mask is not None:
                m = mask[rows].to(values.device)
                values = values[m.reshape(*m.shape, *([1] * (values.ndim - 2))).expand_as(values)]
            picked.append(values.flatten())
        values = torch.cat(picked)
        if self.cache_device is not None:  # measured where the default measures it (the same float sum)
            values = values.to(model.device)
        return empirical_std(values, None)

    def average(self, one: Callable[["_Runs"], Tensor], per_example: bool = False) -> Tensor:
        std = self._global_std()
        parts: list[list[Tensor]] = [[] for _ in range(self.samples)]
        for rows in self.chunks:
            chunk = _Chunk(self, rows, std)
            for sample in range(self.samples):
                runs = chunk.runs(sample)
                parts[sample].append(one(runs) if runs.R else _Unpatched(runs))
            del chunk, runs  # before the next chunk's runs: never two chunks' caches at once
        for p in parts:  # the chunks with no row in the swept tower, shaped as the others
            template = next((t for t in p if isinstance(t, Tensor)), None)
            if template is None:
                raise ValueError(f"no example has a row in tower {self.tower!r} (its rows are the images, and no "
                                 "prompt holds one): nothing to sweep")
            p[:] = [t if isinstance(t, Tensor) else t.like(template, bool(self.normalize)) for t in p]
        results = [torch.cat(p, dim=-1) for p in parts]  # [..., B]: the chunks' examples joined
        if not per_example:
            results = [r.mean(dim=-1) for r in results]
        return results[0] if len(results) == 1 else torch.stack(results).mean(0)


class _Chunk:
    """The runs of one chunk of a sweep's examples (`rows`, indices in the whole batch)."""

    def __init__(self, setup: _Setup, rows: Tensor, std: float | None):
        self.setup, self.rows = setup, rows
        whole = len(setup.chunks) == 1
        self.clean = setup.clean if whole else _select(setup.clean, rows, setup.clean_images)
        corrupt = setup.corrupt
        self.corrupt = (corrupt if whole or not isinstance(corrupt, Mapping)
                        else _select(corrupt, rows, setup.corrupt_images))
        self.where = {} if whole else {"rows": rows, "n_total": setup.B, "positions": setup.positions,
                                       "setup": setup}
        if not isinstance(corrupt, Corruption):
            return
        model, tower, site, cache_device = setup.model, setup.tower, setup.site, setup.cache_device
        wanted = _target_wanted(model, tower, setup.leaves)
        with torch.no_grad():
            self.clean_run = model.run_with_cache(**self.clean, tower_outputs=True, device=cache_device,
                                                  names_filter=lambda n: wanted(n) or n == site)
        _offload_outputs(self.clean_run[1], cache_device)
        chunked = {} if whole else {"rows": rows, "total": setup.B, "positions": setup.clean_positions, "std": std}
        self.bound = _Bound(model, corrupt, tower, site, self.clean_run[1], offloaded=cache_device is not None,
                            **chunked)

    def runs(self, sample: int) -> "_Runs":
        setup = self.setup
        model, clean, tower, leaves = setup.model, self.clean, setup.tower, setup.leaves
        if setup.corrupt is None:  # an ablation sweep: the one run is the target and its own "source"
            return _Runs(model, clean, None, setup.metric, tower, leaves, clean_is_source=True,
                         cache_device=setup.cache_device, **self.where)
        if not isinstance(setup.corrupt, Corruption):  # checked on the whole batch (a chunk may have no image)
            denoise = setup.direction == "denoise"
            target, source = (self.corrupt, clean) if denoise else (clean, self.corrupt)
            return _Runs(model, target, source, setup.metric, tower, leaves, clean_is_source=denoise,
                         cache_device=setup.cache_device, **self.where)
        bound = self.bound
        if setup.direction == "denoise":
            return _Runs(model, clean, self.clean_run, setup.metric, tower, leaves, clean_is_source=True,
                         target_hooks=lambda forwards: bound.hooks(sample, forwards),
                         resumable=not setup.corrupt.per_forward, cut_allowed=bound.cut_allowed,
                         cache_device=setup.cache_device, **self.where)
        with torch.no_grad(), model.hooks(bound.hooks(sample, [0])):
            corrupted = model.run_with_cache(**clean, names_filter=names.in_blocks(tower, *leaves),
                                             device=setup.cache_device)
        return _Runs(model, clean, corrupted, setup.metric, tower, leaves, clean_is_source=False,
                     target_run=self.clean_run, cache_device=setup.cache_device, **self.where)


def example_chunks(n_examples: int, batch_size: int | None) -> list[Tensor]:
    """The examples 0..n_examples-1 in consecutive chunks of at most `batch_size` (None: one chunk)."""
    size = n_examples if batch_size is None else max(1, min(batch_size, n_examples))
    return [torch.arange(start, min(start + size, n_examples)) for start in range(0, n_examples, size)]


# the processor's inputs with one entry per image, not per example (Qwen2-VL's pixel_values: each image's patches,
# as many as its image_grid_thw row's product)
IMAGE_INPUTS = ("pixel_values", "image_grid_thw")


def _check_batch_first(inputs: Mapping[str, Any], B: int, images: Tensor | None = None) -> None:
    """Refuse to split inputs that hold a tensor whose first dimension is not the examples (`images`, the example
    of each image: the image inputs hold the images instead)."""
    for key, value in inputs.items():
        if not isinstance(value, Tensor) or images is not None and key in IMAGE_INPUTS:
            continue
        if value.ndim == 0 or value.shape[0] != B:
            raise ValueError(f"input {key!r} has shape {tuple(value.shape)}, not one row per example of the "
                             f"{B}: it cannot be split into chunks of examples; pass batch_size >= {B} or inputs "
                             "with the examples first")
    if images is not None:
        _image_bounds(inputs, len(images))  # raises for image inputs that are not the images'


def _image_bounds(inputs: Mapping[str, Any], n_images: int) -> dict[str, list[int]]:
    """Per image input, where each image's rows start (and the last ends): one row per image, or, for
    pixel_values with an image_grid_thw, each image's patches."""
    grid = inputs.get("image_grid_thw")
    out = {}
    for key in IMAGE_INPUTS:
        value = inputs.get(key)
        if not isinstance(value, Tensor):
            continue
        per_image = grid.prod(-1).tolist() if key == "pixel_values" and isinstance(grid, Tensor) else [1] * n_images
        ends = [0, *torch.tensor(per_image, dtype=torch.long).cumsum(0).tolist()]
        if value.ndim == 0 or len(per_image) != n_images or value.shape[0] != ends[-1]:
            raise ValueError(f"input {key!r} has shape {tuple(value.shape)}, not the rows of the {n_images} images "
                             "the prompts hold: it cannot be split into chunks of examples; pass the processor's "
                             "output, or batch_size >= the number of examples")
        out[key] = ends
    return out


def _select(inputs: Mapping[str, Any], rows: Tensor, images: Tensor | None = None) -> dict[str, Any]:
    """The inputs of the examples `rows` (a slice: consecutive rows). `images` (None: every tensor has one row
    per example): the example of each image (`Positions.image_examples`); the image inputs then keep the rows of
    these examples' images, and a chunk of text-only examples gets none (its model runs without the image
    towers)."""
    start, stop = int(rows[0]), int(rows[-1]) + 1
    out = {k: v[start:stop] if isinstance(v, Tensor) and (images is None or k not in IMAGE_INPUTS) else v
           for k, v in inputs.items()}
    if images is None:
        return out
    chosen = torch.nonzero((images >= start) & (images < stop)).flatten()  # consecutive: images are in example order
    for key, ends in _image_bounds(inputs, len(images)).items():
        if chosen.numel():
            out[key] = inputs[key][ends[int(chosen[0])]:ends[int(chosen[-1]) + 1]]
        else:
            del out[key]
    return out


def _input_images(positions: Any) -> Tensor | None:
    """The example of each image of a batch (`Positions.image_examples`); None where the prompts hold no image
    spans (BLIP's image enters by cross-attention, one per example)."""
    return positions.image_examples if positions is not None and any(positions.image) else None


def _row_examples(model: HookedVLM, tower: str, positions: Any) -> Tensor | None:
    """The example of each row of `tower`, when its rows are the batch's images (a tower that runs before the
    prompt tower, fed by the images: `Positions.image_examples`); None when its rows are the examples."""
    order = list(model.tower_names)
    if tower not in order or model.prompt_tower not in order or order.index(tower) >= order.index(model.prompt_tower):
        return None
    return _input_images(positions)


def _rows_of(examples: Tensor, row_examples: Tensor | None) -> Tensor:
    """The rows that belong to `examples` (indices in the whole batch), of a tower whose row i is example
    `row_examples[i]` (None: row i is example i)."""
    if row_examples is None:
        return examples
    return torch.nonzero(torch.isin(row_examples, examples.cpu())).flatten()


# ---------------------------------------------------------------------------------------------- runs
def _target_wanted(model: HookedVLM, tower: str, leaves: list[str]) -> Callable[[str], bool]:
    """What the target run keeps: the patched hooks (to check that lengths agree), the stream entering each block
    and the keys and values of a causal tower (what the resumed runs start from)."""
    wanted = names.in_blocks(tower, *leaves)
    stream = names.in_blocks(tower, "hook_resid_pre")
    kv_names = set(model.prefix_hook_names(tower)) if model.towers()[tower].prefix_resumable else set()
    return lambda name: wanted(name) or name in kv_names or stream(name)


class _Runs:
    """One sweep: the source run (values to patch in; given as inputs, as a finished `(logits, cache)` run, or
    None for an ablation sweep) and the target run (the one patched), done once each, and the runs of its cells.

    `target_hooks(forwards)` corrupt the target run (a `Corruption`'s hooks): the target run is forward 0, the
    cell of layer L and variant v forward 1 + L * n_variants + v. They also run in the cells' runs, whose batch holds
    several copies of the target batch. `resumable=False` (a corruption drawn anew in every forward) runs the cells
    as whole forwards; otherwise they resume at the patched layer. `target_run`: the target run already made.

    `cache_device` (None: where each activation is produced): where the cached activations of both runs stay
    (`"cpu"` keeps them off the accelerator); a chunk of cells brings to its blocks' devices only what it reads: the
    stream entering its first patched layer, the keys and values of the prefix from that layer on, the towers'
    outputs, and the source values of its cells (gathered where they are cached).

    `rows` (None: all): the examples these runs hold, as indices in a whole batch of `n_total` that a sweep split
    into chunks; `positions` is then that batch's `Positions`. The metric sees each row's index in the whole batch
    (`metrics.evaluate(..., n_examples=n_total)`), and the cells are resolved on the whole batch, then the chunk's
    rows kept (`cells`), so that a chunk's results are the whole batch's for its examples.

    A tower whose rows are the images (the vision tower and projector of LLaVA and Qwen2-VL: `_row_examples`) has
    `R` rows here, the images of these examples in order (`tower_rows`, indices in the whole batch's images): a
    cell patches its positions in every image row of an example, the metric stays per example, and examples
    without an image have no row (a patch leaves them as the unpatched run). `setup`: the `_Setup` of a chunked
    sweep (told whether the cells' metrics are normalised)."""

    def __init__(self, model: HookedVLM, target: Mapping[str, Any],
                 source: Mapping[str, Any] | tuple[Tensor, Any] | None,
                 metric: metrics_.Metric, tower: str, leaves: list[str], *, clean_is_source: bool,
                 target_hooks: Callable[[list[int]], list[HookSpec]] | None = None,
                 target_run: tuple[Tensor, Any] | None = None, resumable: bool = True, cut_allowed: bool = True,
                 cache_device: torch.device | str | None = None, rows: Tensor | None = None,
                 n_total: int | None = None, positions: Any = None, setup: Any = None):
        if not callable(metric):
            raise TypeError(f"metric is a {type(metric).__name__}: pass a function (logits, examples) -> one value per "
                            "row, e.g. metrics.logit_diff(correct_id, wrong_id)")
        self.model, self.metric, self.tower = model, metric, tower
        self.n_layers = model.tower_info(tower).n_layers
        self.target, self.target_hooks = dict(target), target_hooks
        self.resumable, self.cut_allowed = resumable, cut_allowed
        cache_device = _check_cache_device(cache_device)
        self.B = _batch_size(self.target)
        self.rows = torch.arange(self.B) if rows is None else rows.cpu()
        self.n_total = self.B if n_total is None else n_total
        self.whole_positions = positions
        wanted = names.in_blocks(tower, *leaves)
        # a causal tower with a KV cache resumes on the positions after the first patched one: the target run's
        # keys and values stand for the unchanged prefix (`model.prefix_cache`)
        self.prefix_resumable = model.towers()[tower].prefix_resumable

        with torch.no_grad():
            if isinstance(source, tuple):  # a run the caller already made (its cache must hold the leaves)
                source_logits, self.source = source
            elif source is not None:
                source_logits, self.source = model.run_with_cache(**source, names_filter=wanted, device=cache_device)
            if target_run is not None:
                target_logits, self.target_cache = target_run
            else:  # what the resumed runs start from: the stream, the towers' outputs, the patched hooks
                with model.hooks(target_hooks([0]) if target_hooks is not None else []):
                    target_logits, self.target_cache = model.run_with_cache(
                        **self.target, tower_outputs=True, names_filter=_target_wanted(model, tower, leaves),
                        device=cache_device)
        _offload_outputs(self.target_cache, cache_device)
        self.target_logits = target_logits
        if source is None:  # an ablation sweep: no values to patch in; the target's own serve as "source"
            source_logits, self.source = target_logits, self.target_cache
        self.setup = setup
        self._map_rows(source is not None)
        examples = self.rows.to(target_logits.device)
        m_source = metrics_.evaluate(metric, source_logits, examples, "the unpatched run", self.n_total)
        m_target = metrics_.evaluate(metric, target_logits, examples, "the unpatched run", self.n_total)
        metrics_.check_finite(m_source, "the unpatched source run's examples", self.rows)
        metrics_.check_finite(m_target, "the unpatched target run's examples", self.rows)
        self.m_clean, self.m_corrupt = (m_source, m_target) if clean_is_source else (m_target, m_source)
        self.m_target = m_target
        order = list(model.tower_names)
        self.given = {t: out for t, out in self.target_cache.tower_outputs.items()
                      if order.index(t) < order.index(tower)} if resumable else {}

    @classmethod
    def for_direction(cls, model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any],
                      metric: metrics_.Metric, tower: str, direction: Direction, leaves: list[str],
                      cache_device: torch.device | None = None, **chunk: Any) -> "_Runs":
        if direction not in ("denoise", "noise"):
            raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
        _check_inputs(model, clean, corrupt)
        target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
        return cls(model, target, source, metric, tower, leaves, clean_is_source=direction == "denoise",
                   cache_device=cache_device, **chunk)

    def _map_rows(self, paired: bool) -> None:
        """The swept tower's rows: `R` here, `tower_rows` among the whole batch's `n_rows`, `row_examples` the
        whole batch's example of each (None: the rows are the examples)."""
        whole = self.whole_positions if self.whole_positions is not None else self.target_cache.positions
        self.row_examples = _row_examples(self.model, self.tower, whole)
        self.tower_rows = _rows_of(self.rows, self.row_examples)
        self.R = len(self.tower_rows)
        self.n_rows = self.n_total if self.row_examples is None else len(self.row_examples)
        if self.row_examples is not None and paired:  # the two runs' image rows must be the same examples'
            mine = [_row_examples(self.model, self.tower, getattr(c, "positions", None))
                    for c in (self.source, self.target_cache)]
            if all(m is not None for m in mine) and not torch.equal(*mine):
                raise ValueError(f"the clean and corrupted inputs hold their images in different examples "
                                 f"({mine[0].tolist()} vs {mine[1].tolist()}, Positions.image_examples), so tower "
                                 f"{self.tower!r}'s rows do not pair up: give each example the same number of "
                                 "images in both")

    def source_act(self, leaf: str) -> Tensor:
        name = next(filter(names.in_blocks(self.tower, leaf), self.source.keys()), None)
        if name is None:
            raise ValueError(f"tower {self.tower!r} has no hook ending in {leaf!r} in any layer")
        self._check_rows(name)
        return self.source[name]

    def _check_rows(self, name: str) -> None:
        """The tower's rows must be those its positions give (one per example, or one per image): say so rather
        than pair rows with the wrong examples."""
        rows = self.source[name].shape[0]
        if rows != self.R or self.target_cache[name].shape[0] != self.R:
            what = "examples" if self.row_examples is None else "images (Positions.image_examples)"
            raise ValueError(f"{name} has {rows} rows, but these {self.B} examples hold {self.R} {what}: pass the "
                             "processor's output, one span of placeholder tokens per image")

    def length(self, leaf: str, dim: int = 1) -> int:
        """The length of the patched sequence; checks that source and target agree where positions align."""
        name = next(filter(names.in_blocks(self.tower, leaf), self.source.keys()), None)
        if name is None:
            raise ValueError(f"tower {self.tower!r} has no hook ending in {leaf!r} in any layer")
        self._check_rows(name)
        source_len, target_len = self.source[name].shape[dim], self.target_cache[name].shape[dim]
        if source_len != target_len:
            raise ValueError(
                f"the clean and corrupted inputs differ in length at {name} ({source_len} vs {target_len} "
                f"positions), so position-wise patching would pair unrelated tokens; make their token counts "
                "equal or patch named spans")
        return source_len

    def cells(self, positions: Sequence[int] | Tensor | None, groups: Any, leaf: str, dim: int = 1) -> _Cells:
        """The cells of each layer: one per position, or one per group of `groups`; resolved on the whole batch
        (its positions, its first patched position `cut`), then this chunk's rows kept."""
        whole = self.whole_positions if self.whole_positions is not None else getattr(self.target_cache,
                                                                                       "positions", None)
        pos = _tower_positions(self.model, self.tower, whole)
        length = self.length(leaf, dim)
        own = _tower_positions(self.model, self.tower, getattr(self.target_cache, "positions", None))
        if self.row_examples is not None and pos is not None and own is not None and (
                own.input_ids.shape[1] == length):  # rows of images padded to the largest: the whole batch's
            length = pos.input_ids.shape[1]
        cells = _make_cells(positions, groups, pos, self.n_rows, length)
        if self.n_rows == self.R and self.tower_rows.equal(torch.arange(self.R)):
            return cells
        return _within(cells.select(self.tower_rows), self.length(leaf, dim))

    def _prefix(self, first: int, cut: int, n: int) -> KVCache | None:
        """The target run's keys and values of the first `cut` positions, for n stacked copies of the batch, on the
        devices of their blocks."""
        if not cut:
            return None
        blocks = self.model.towers()[self.tower].blocks
        kv = {name: _to(self.target_cache[name][:, :cut], blocks[names.layer_of(name)])  # [B, cut, ...] each
              for name in self.model.prefix_hook_names(self.tower, first)}
        prefix = self.model.prefix_cache(self.tower, kv, cut, start_layer=first)
        return prefix if n == 1 else prefix.select(torch.arange(self.R).repeat(n))

    def sweep(self, cell_hooks: Callable[[int], list[str]], n_variants: int, patch: Patch, normalize: bool,
              batch_size: int, progress: bool, per_example: bool = False, cut: int = 0
              ) -> Float[Tensor, "n_layers n_variants *B"]:
        """For each layer, the metric of each variant (mean over examples, or per example), patched at the hooks
        `cell_hooks(layer)` (all in this tower; the run resumes at the first of their blocks).

        `cut`: no patch touches a position before it. In a causal tower with a KV cache those positions are then
        the target run's at every layer, so the resumed runs compute only the positions from `cut` on, with the
        target's keys and values for the rest, and take the target's logits there."""
        B = self.B
        _check_batch_size(batch_size)
        if self.setup is not None:
            self.setup.normalize = normalize
        if normalize:  # before any cell runs: an example whose clean and corrupted metrics are equal has no scale
            metrics_.check_normalizable(self.m_clean, self.m_corrupt, self.rows)
        cut = cut if self.prefix_resumable and self.resumable and self.cut_allowed else 0
        per_chunk = max(1, batch_size // B)  # variants per forward (B rows each: one variant when batch_size < B)
        out = torch.full((self.n_layers, n_variants, B), float("nan"))
        layers = [layer for layer in range(self.n_layers)
                  if cell_hooks(layer) and all(name in self.source.keys() for name in cell_hooks(layer))]
        if self.resumable:  # the cells of one layer per forward, resumed at that layer
            chunks = [[(layer, v) for v in range(start, min(start + per_chunk, n_variants))]
                      for layer in layers for start in range(0, n_variants, per_chunk)]
        else:  # every cell draws its own corruption: whole forwards, any cells stacked together
            cells = [(layer, v) for layer in layers for v in range(n_variants)]
            chunks = [cells[i:i + per_chunk] for i in range(0, len(cells), per_chunk)]
        bar = progress_bar(len(chunks), progress and len(chunks) > 8, f"patching {self.tower}")
        for chunk in chunks:
            values = self._run_chunk(chunk, cell_hooks, n_variants, patch, normalize, cut)
            for k, (layer, v) in enumerate(chunk):
                out[layer, v] = values[k]
            bar.update(1)
        bar.close()
        return out if per_example else out.mean(dim=2)

    def _run_chunk(self, chunk: list[tuple[int, int]], cell_hooks: Callable[[int], list[str]], n_variants: int,
                   patch: Patch, normalize: bool, cut: int) -> Float[Tensor, "n B"]:
        """One forward: the cells `chunk` ((layer, variant) pairs) stacked cell-major, B rows each; the metric of
        each row (normalised if asked), on the CPU."""
        n, B, R = len(chunk), self.B, self.R
        variant = torch.tensor([v for _, v in chunk]).repeat_interleave(R)  # the tower's rows, cell-major
        row = torch.arange(R).repeat(n)  # each one's row (image or example) of the target batch
        example = torch.arange(B).repeat(n)  # the LM's rows, cell-major
        hooked = {name: [k for k, (layer, _) in enumerate(chunk) if name in cell_hooks(layer)]
                  for layer in dict.fromkeys(layer for layer, _ in chunk) for name in cell_hooks(layer)}
        forwards = [1 + layer * n_variants + v for layer, v in chunk]
        corrupting = self.target_hooks(forwards) if self.target_hooks is not None else []
        offset = cut if self.resumable else 0
        fwd_hooks = [*corrupting, *((name, self._patch_rows(patch, blocks, n, variant, row, offset))
                                    for name, blocks in hooked.items())]
        inputs = {k: _repeat(v, n) for k, v in self.target.items()}
        if self.resumable:
            first = min(names.layer_of(name) for name in hooked)
            towers = self.model.towers()
            # what the resumed run reads, brought from the cache to where its blocks run
            given = {k: _repeat(_to(v, towers[k], last=True), n) for k, v in self.given.items()}
            resid = self.target_cache[names.resid(self.tower, first, "pre")][:, cut:]  # [B, T - cut, D]
            resid = _repeat(_to(resid, towers[self.tower].blocks[first]), n)
            with torch.no_grad(), self.model.resume(self.tower, first, resid, given, self._prefix(first, cut, n)):
                logits = self.model.run_with_hooks(**inputs, fwd_hooks=fwd_hooks)
        else:
            with torch.no_grad():
                logits = self.model.run_with_hooks(**inputs, fwd_hooks=fwd_hooks)
        if cut:  # the prefix's logits are the target run's
            logits = torch.cat([_repeat(self.target_logits[:, :cut], n), logits], dim=1)
        values = metrics_.evaluate(self.metric, logits, self.rows[example].to(logits.device), "a patched run",
                                   self.n_total).float()
        values = values.view(n, B)
        if not torch.isfinite(values).all():  # reported, not averaged into a NaN with no word
            where = (f"at layer {chunk[0][0]} of {self.tower!r} (variants {chunk[0][1]}..{chunk[-1][1]})"
                     if chunk[0][0] == chunk[-1][0] else
                     f"at layers {chunk[0][0]}..{chunk[-1][0]} of {self.tower!r} (cells {chunk[0]}..{chunk[-1]})")
            bad = int((~torch.isfinite(values)).sum())
            warnings.warn(f"the metric is non-finite in {bad} patched runs {where}; those cells hold it: check "
                          "the model's dtype (float16 overflows; try float32)", RuntimeWarning, stacklevel=5)
        if normalize:
            values = metrics_.normalized(values, self.m_clean.float(), self.m_corrupt.float())
        return values.cpu()

    def _patch_rows(self, patch: Patch, blocks: list[int], n: int, variant: Tensor, example: Tensor,
                    offset: int) -> Callable[[Tensor, Any], Tensor]:
        """A hook patching the rows of the cells `blocks` (indices into the n stacked cells, R rows each)."""
        R = self.R
        if len(blocks) == n:
            return lambda act, hook: patch(act, self.source[hook.name], variant, example, offset)
        rows = (torch.tensor(blocks)[:, None] * R + torch.arange(R)).flatten()

        def hook(act: Tensor, hook: Any) -> Tensor:
            sel = rows.to(act.device)
            act = act.clone()
            act[sel] = patch(act[sel], self.source[hook.name], variant[rows], example[rows], offset)
            return act

        return hook


class _Unpatched:
    """A chunk whose examples have no row in the swept tower (text-only examples, a tower whose rows are images):
    no cell touches them, so each cell's metric is the unpatched target run's (normalised as the cells were)."""

    def __init__(self, runs: _Runs):
        self.rows = runs.rows
        self.m_target, self.m_clean, self.m_corrupt = (m.float().cpu() for m in (runs.m_target, runs.m_clean,
                                                                                  runs.m_corrupt))

    def like(self, template: Float[Tensor, "*cells b"], normalize: bool) -> Float[Tensor, "*cells B"]:
        """Shaped as another chunk's result; NaN where it is NaN for every example (a layer without the hook)."""
        values = self.m_target
        if normalize:
            metrics_.check_normalizable(self.m_clean, self.m_corrupt, self.rows)
            values = metrics_.normalized(values, self.m_clean, self.m_corrupt)
        out = values.expand(*template.shape[:-1], len(values)).clone()
        out[torch.isnan(template).all(-1)] = float("nan")
        return out


def _within(cells: _Cells, length: int) -> _Cells:
    """A chunk's cells on image rows padded to the chunk's largest image, shorter than the whole batch's: the
    positions past `length` are padding in every row here (nothing reads them), so they are dropped; a row left
    with none patches nothing."""
    inside = cells.idx < length
    if bool(inside.all()):
        return cells
    valid = cells.valid & inside
    has = valid.any(-1, keepdim=True)
    first = torch.gather(cells.idx, -1, valid.long().argmax(-1, keepdim=True))  # each row's first kept position
    idx = torch.where(valid, cells.idx, torch.where(has, first, torch.zeros_like(first)))  # padding repeats it
    return _Cells(idx, valid, cells.names, cells.whole_cut)


def _check_batch_size(batch_size: Any) -> None:
    if batch_size == "auto" and isinstance(batch_size, str):
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: pass the most rows per forward (variants x examples), an int "
                         ">= 1, or 'auto' (the largest that fits memory_budget)")


def _check_cache_device(device: Any) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"cache_device={device!r} is not a device; pass None (where the model runs) or "
                         "'cpu'") from None


def _offload_outputs(cache: Any, device: torch.device | None) -> None:
    """Move the towers' outputs a cache recorded (`tower_outputs=True`) to `device` (None: leave them)."""
    if device is not None:
        cache.tower_outputs = {k: v.to(device) for k, v in cache.tower_outputs.items()}


def _to(t: Tensor, module: torch.nn.Module, last: bool = False) -> Tensor:
    """`t` on the device of `module`'s first parameter (its last with `last`: where a tower's output is produced),
    where the default sweep has it; a no-op where it already is, and for weights offloaded to disk (on the meta
    device), whose blocks' accelerate hooks bring their inputs to where they run."""
    params = list(module.parameters()) if last else [next(module.parameters())]
    device = params[-1].device
    return t if device.type == "meta" else t.to(device)


def _check_corrupt(model: HookedVLM, clean: Mapping[str, Any], corrupt: Any) -> None:
    if isinstance(corrupt, Corruption):
        _check_inputs(model, clean, clean)
    elif isinstance(corrupt, Mapping):
        _check_inputs(model, clean, corrupt)
    else:
        raise TypeError(f"corrupt is a {type(corrupt).__name__}: pass the corrupted inputs (the processor's output) "
                        "or a Corruption (corruption.gaussian(3.0), corruption.multiplicative(...), ...)")


def _check_inputs(model: HookedVLM, clean: Mapping[str, Any], corrupt: Mapping[str, Any]) -> None:
    for label, inputs in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(inputs, Mapping):
            raise TypeError(f"the {label} inputs are a {type(inputs).__name__}: pass the processor's output (a dict "
                            "of tensors such as input_ids and pixel_values)")
        if "vision" in model.tower_names and inputs.get("pixel_values") is None:
            raise ValueError(f"the {label} inputs have no pixel_values, but this model needs an image: a sweep without "
                             "it would silently measure an image-blind model; pass the processor's full output")
    if _batch_size(clean) != _batch_size(corrupt):
        raise ValueError(f"clean has {_batch_size(clean)} examples and corrupt {_batch_size(corrupt)}; pair them one "
                         "to one")


def _batch_size(inputs: Mapping[str, Any]) -> int:
    """The number of examples: the rows of input_ids, else of the first tensor."""
    ids = inputs.get("input_ids")
    if isinstance(ids, Tensor) and ids.ndim:
        return ids.shape[0]
    for value in inputs.values():
        if isinstance(value, Tensor):
            return value.shape[0]
    raise ValueError("the inputs hold no tensors; pass the processor's output")


def _repeat(value: Any, n: int) -> Any:
    """n copies of a batch, variant-major ([x_0..x_B-1, x_0..x_B-1, ...])."""
    if not isinstance(value, Tensor) or n == 1:
        return value
    return value.repeat(n, *([1] * (value.ndim - 1)))
