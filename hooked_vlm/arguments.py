"""Checks of what users pass to the public API: unknown keyword arguments and dtypes.

A keyword that nothing reads is the quietest bug there is (`atention_mask=` drops the mask, `temprature=` is
ignored): every public entry point either uses a keyword or refuses it here, naming the closest accepted one.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# Weights and activations are floating point; the names are torch's own (`torch.float16` is "float16").
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "fp32": "float32", "fp16": "float16",
            "bf16": "bfloat16", "fp64": "float64"}


def reject_unknown(given: Iterable[str], accepted: Iterable[str], where: str) -> None:
    """Raise a TypeError for the first name of `given` that is not in `accepted`, naming the closest accepted one."""
    accepted = sorted(set(accepted))
    for name in given:
        if name in accepted:
            continue
        close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it accepts {', '.join(accepted)}"
        raise TypeError(f"{where} got an unexpected keyword argument {name!r}{hint}")


def keyword_names(fn: Callable[..., Any]) -> list[str]:
    """The names `fn` accepts as keywords (a method's `self` is not one a user may pass)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name != "self"]


def strict(fn: F) -> F:
    """Decorate a function without `**kwargs` so that an unknown keyword is a TypeError that names the closest
    accepted one (Python's own error names only the unknown one)."""
    accepted = frozenset(keyword_names(fn))
    where = f"{fn.__module__.rpartition('.')[2]}.{fn.__qualname__}()"

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not accepted.issuperset(kwargs):
            reject_unknown(kwargs, accepted, where)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def as_dtype(value: torch.dtype | str | None, what: str = "dtype") -> torch.dtype | None:
    """A floating-point torch dtype from a dtype or its name ("float16", "torch.bfloat16", "half"); None stays None.
    Anything else (int8, "fp8", a typo) is refused at once, before any work is done."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value.removeprefix("torch.").lower()
        name = _ALIASES.get(name, name)
        if name in FLOAT_DTYPES:
            return FLOAT_DTYPES[name]
    elif isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    raise TypeError(f"{what}={value!r} is not supported: pass one of torch.float32, torch.float16, torch.bfloat16, "
                    "torch.float64 (or its name, e.g. 'bfloat16')")
