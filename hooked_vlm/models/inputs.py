"""Checks of what the models' `forward` and `generate` are given, run before any computation.

Each failure is one line naming the input, what is wrong with it and what to pass instead; torch's own errors for
the same mistakes ("index out of range in self", "Expected tensor for argument #1 'indices'...") come from deep
inside a tower, and some mistakes (a typo'd keyword, a mask of 2s, NaN pixels) give no error at all.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..arguments import strict
from ..hooks import model_inputs

F = TypeVar("F", bound=Callable[..., Any])

# Keywords of HF's forward that hooked_vlm does not take, with what to do instead (a bare "unexpected keyword"
# would not say that the feature is missing on purpose).
REFUSED_BY_FORWARD: dict[str, str] = {
    "labels": "the forward computes no loss; drop labels= and compute it from the returned logits "
              "(e.g. torch.nn.functional.cross_entropy)",
    "return_type": "the forward returns the logits; drop return_type= and compute the loss from them "
                   "(e.g. torch.nn.functional.cross_entropy)",
    "inputs_embeds": "pass input_ids; to edit the embeddings, hook the tower's hook_embed or hook_inputs_embeds",
    "output_attentions": "use model.run_with_cache(...) and read the hook_pattern entries",
    "output_hidden_states": "use model.run_with_cache(...) and read the hook_resid_post entries",
    "return_dict": "the forward returns the logits tensor; drop return_dict=",
    "use_cache": "the forward keeps no cache; for decoding use model.generate(...)",
    "past_key_values": "the forward keeps no cache; for decoding use model.generate(...)",
    "interpolate_pos_encoding": "images run at the model's own size; resize them with model.processor",
}

# Keywords of HF's generate that hooked_vlm's decoding (greedy, or sampling with temperature, top-k and top-p) does
# not implement.
REFUSED_BY_GENERATE: frozenset[str] = frozenset({
    "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff", "num_beams",
    "num_beam_groups", "num_return_sequences", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "diversity_penalty", "penalty_alpha", "early_stopping", "bad_words_ids", "force_words_ids", "min_length",
    "min_new_tokens", "max_length", "generation_config", "logits_processor", "stopping_criteria", "streamer",
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "use_cache", "assistant_model", "prefix_allowed_tokens_fn", "labels",
})


def strict_forward(fn: F) -> F:
    """`arguments.strict` for a model's forward, saying what to do instead of HF-only keywords (labels=, ...); the
    processor's output may come positionally (`model(inputs)`, as `model(**inputs)`)."""
    checked = strict(fn)
    name = f"{fn.__qualname__}()"

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs = model_inputs(args, kwargs, name)
        refused = sorted(kwargs.keys() & REFUSED_BY_FORWARD.keys())
        if refused:
            raise TypeError(f"{name} does not take {refused[0]}=: {REFUSED_BY_FORWARD[refused[0]]}")
        return checked(self, **kwargs)

    return wrapper  # type: ignore[return-value]


def processor_output_positional(fn: F) -> F:
    """Let a method taking the processor's output as keywords also take it as one positional dict (`model.generate
    (inputs)` as `model.generate(**inputs)`); anything else positional is a TypeError saying so."""
    name = f"{fn.__name__}()"

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(self, **model_inputs(args, kwargs, name))

    return wrapper  # type: ignore[return-value]


def check_generate_keywords(given: Iterable[str], accepted: Iterable[str]) -> None:
    """A TypeError for the first keyword `generate` does not take, listing what it takes: sampling and beam options
    (and their typos: `temprature`) are refused as such, other typos name the closest accepted keyword."""
    accepted = sorted(set(accepted))
    for key in given:
        if key in accepted:
            continue
        takes = f"generate() takes {', '.join(accepted)}"
        if key in REFUSED_BY_GENERATE:
            raise TypeError(f"generate() does not take {key}=: hooked_vlm decodes greedily or samples (do_sample=True "
                            f"with temperature, top_k, top_p; no beam search or other logits processors; the length "
                            f"is max_new_tokens); {takes}")
        close = difflib.get_close_matches(key, [*accepted, *REFUSED_BY_GENERATE], n=1, cutoff=0.6)
        hint = ""
        if close and close[0] in accepted:
            hint = f" (did you mean {close[0]!r}?)"
        elif close:
            hint = f" (did you mean {close[0]!r}? hooked_vlm does not take it)"
        raise TypeError(f"generate() got an unexpected keyword argument {key!r}{hint}; {takes}")


def _tensor(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(value).__name__}; call the processor with "
                        "return_tensors='pt'")
    return value


def check_ids(ids: Any, name: str, d_vocab: int, n_ctx: int | None = None) -> Tensor:
    """Token ids: an integer tensor [batch, tokens], not empty, every id in the vocabulary (and within the tower's
    `n_ctx` positions if it has learned ones)."""
    ids = _tensor(ids, name)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}; pass the tokenizer's ids "
                        "(e.g. ids.long())")
    if ids.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected [batch, tokens]; add the batch dimension "
                         f"({name}[None]) or pass the processor's output")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}: the batch is empty; pass at least one example with "
                         "at least one token")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= d_vocab:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary 0..{d_vocab - 1}; tokenize with "
                         "model.processor (a different tokenizer's ids?)")
    if n_ctx is not None and T > n_ctx:
        raise ValueError(f"{name} has {T} tokens, more than the {n_ctx} positions the model was trained with; "
                         "shorten the text (the processor's truncation=True, max_length=...)")
    return ids


def check_mask(mask: Any, ids: Tensor, name: str, ids_name: str) -> Tensor:
    """An attention mask of `ids`' shape holding only 0 and 1 with a real token in every row; None: all ones."""
    if mask is None:
        return torch.ones_like(ids)
    mask = _tensor(mask, name)
    if mask.shape != ids.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but {ids_name} has {tuple(ids.shape)}; pass the "
                         "mask the tokenizer returned with these ids")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must hold only 0 (pad) and 1 (token), got values {mask.unique().tolist()[:5]}")
    empty = (mask == 0).all(dim=1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} rows {empty} are all padding; every example needs at least one real token")
    return mask


def check_positions(position_ids: Any, input_ids: Tensor) -> None:
    """Position ids given to override a model's numbering: integers, one per token, not negative."""
    if position_ids is None:
        return
    position_ids = _tensor(position_ids, "position_ids")
    if position_ids.dtype.is_floating_point or position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids must be integers of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{position_ids.dtype} of shape {tuple(position_ids.shape)}")
    if (position_ids < 0).any():
        raise ValueError("position_ids holds negative positions; number the tokens from 0")


def check_pixels(pixel_values: Any, vision: Any) -> Tensor:
    """Float, finite pixel values of the vision tower's image size [n_images, 3, S, S]."""
    if pixel_values is None:
        return vision.check_pixels(None)  # raises: "pixel_values is missing: this model needs an image; ..."
    pixel_values = _tensor(pixel_values, "pixel_values")
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"pixel_values must be floating point, got dtype {pixel_values.dtype} (raw pixels?); "
                        "preprocess images with model.processor, which rescales and normalizes them")
    vision.check_pixels(pixel_values)
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no image (shape (0, ...)); pass at least one")
    if not torch.isfinite(pixel_values).all():
        raise ValueError("pixel_values holds NaN or infinite values, which would make every logit NaN; check the "
                         "image preprocessing")
    return pixel_values


def check_batch(sizes: Mapping[str, int], what: str = "pass one of each per example") -> None:
    """All batch sizes equal."""
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise ValueError(f"batch sizes differ ({listed}); {what}")


def refuse_right_padding(attention_mask: Tensor) -> None:
    """Decoder-only generation continues from each row's last position: a right-padded row would continue from its
    pads and give other tokens than the same prompt alone (HF only warns), so refuse it."""
    rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"generate() got a right-padded batch (rows {rows} end with padding), whose tokens would "
                         "differ from each prompt alone; pad on the left: set processor.tokenizer.padding_side = "
                         "'left' before tokenizing")
