"""Hook points and the root module that owns them (TransformerLens semantics).

A `HookPoint` is an identity module placed on a tensor of interest. Hook functions `fn(tensor, hook)` attached to
it see the tensor as it flows past; a returned tensor replaces it, so every hook point can edit, not only read.
Hooks are called directly from `HookPoint.forward` (no `nn.Module` hook machinery), which keeps an unhooked
forward free of overhead and lets components ask `hook.has_hooks` before computing costly optional tensors.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

HookFn = Callable[..., Union[Tensor, None]]
NameFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
HookSpec = tuple[Union[str, Callable[[str], bool]], HookFn]
Direction = Literal["fwd", "bwd"]


@dataclass(eq=False)
class HookHandle:
    """One hook attached to one hook point; `remove()` detaches exactly this hook."""

    point: "HookPoint"
    fn: HookFn
    dir: Direction
    is_permanent: bool = False
    context_level: int | None = None

    def remove(self) -> None:
        hooks = self.point.fwd_hooks if self.dir == "fwd" else self.point.bwd_hooks
        if self in hooks:
            hooks.remove(self)


class HookPoint(nn.Module):
    """An identity module on which forward and backward hooks can be attached.

    Forward hooks run in the order they were added; each sees the output of the previous one. A hook that returns a
    tensor must return one of the same shape and dtype as it received (the error names the hook and both shapes).
    Backward hooks receive the gradient of the loss with respect to this tensor and may return a replacement.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.fwd_hooks: list[HookHandle] = []
        self.bwd_hooks: list[HookHandle] = []
        self.ctx: dict[str, Any] = {}  # scratch space for hook functions, cleared by reset_hooks

    @property
    def has_hooks(self) -> bool:
        return bool(self.fwd_hooks or self.bwd_hooks)

    def add_hook(
        self,
        fn: HookFn,
        dir: Direction = "fwd",
        *,
        is_permanent: bool = False,
        prepend: bool = False,
        context_level: int | None = None,
    ) -> HookHandle:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        handle = HookHandle(self, fn, dir, is_permanent, context_level)
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        hooks.insert(0, handle) if prepend else hooks.append(handle)
        return handle

    def remove_hooks(self, dir: Direction | Literal["both"] = "both", *, including_permanent: bool = False,
                     level: int | None = None) -> None:
        def keep(h: HookHandle) -> bool:
            if h.is_permanent and not including_permanent:
                return True
            return level is not None and h.context_level != level

        if dir in ("fwd", "both"):
            self.fwd_hooks = [h for h in self.fwd_hooks if keep(h)]
        if dir in ("bwd", "both"):
            self.bwd_hooks = [h for h in self.bwd_hooks if keep(h)]

    def forward(self, x: Tensor) -> Tensor:
        for handle in list(self.fwd_hooks):
            out = handle.fn(x, hook=self)
            if out is not None:
                self._check_replacement(x, out)
                x = out
        if self.bwd_hooks and x.requires_grad:
            # bind the hooks attached now: backward usually runs after run_with_hooks has removed them
            handles = list(self.bwd_hooks)
            x.register_hook(lambda grad: self._run_bwd_hooks(grad, handles))
        return x

    def _run_bwd_hooks(self, grad: Tensor, handles: list[HookHandle]) -> Tensor:
        for handle in handles:
            out = handle.fn(grad, hook=self)
            if out is not None:
                self._check_replacement(grad, out)
                grad = out
        return grad

    def _check_replacement(self, old: Tensor, new: Any) -> None:
        if not isinstance(new, Tensor):
            raise TypeError(f"hook on {self.name!r} returned {type(new).__name__}; return a Tensor or None")
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(
                f"hook on {self.name!r} returned a tensor of shape {tuple(new.shape)} and dtype {new.dtype}, "
                f"but the activation has shape {tuple(old.shape)} and dtype {old.dtype}; a hook must return a "
                "tensor of the same shape and dtype (or None to keep the activation)"
            )

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class HookedRootModule(nn.Module):
    """Root module owning a tree of `HookPoint`s, addressed by their dotted names in `hook_dict`.

    Subclasses call `setup()` at the end of `__init__`. `hook_dict` is ordered by module registration, which is the
    execution order of the towers and blocks.
    """

    hook_dict: dict[str, HookPoint]

    def setup(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        self._context_level = 0

    # ---------------------------------------------------------------- name resolution
    def hook_names(self, names_filter: NameFilter = None) -> list[str]:
        """The hook names selected by a filter (None: all; str: one name; list: those names; callable: predicate).

        Names given explicitly must exist; a filter that selects nothing is an error, since a cache or hook that
        silently attaches to nothing is the usual cause of analyses that look fine and mean nothing.
        """
        if names_filter is None:
            return list(self.hook_dict)
        if isinstance(names_filter, str):
            return [self._check_name(names_filter)]
        if callable(names_filter):
            names = [n for n in self.hook_dict if names_filter(n)]
            if not names:
                raise ValueError("names_filter matched no hook point; see model.hook_dict for the names")
            return names
        names = [self._check_name(n) for n in names_filter]
        if not names:
            raise ValueError("names_filter is an empty list: it would select no hook point")
        return names

    def _check_name(self, name: str) -> str:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, self.hook_dict.keys(), n=5, cutoff=0.5)
            hint = f"; closest names: {', '.join(close)}" if close else ""
            raise KeyError(f"no hook point named {name!r}{hint}")
        return name

    def _points(self, name_or_pred: str | Callable[[str], bool]) -> list[HookPoint]:
        if isinstance(name_or_pred, str):
            return [self.hook_dict[self._check_name(name_or_pred)]]
        points = [p for n, p in self.hook_dict.items() if name_or_pred(n)]
        if not points:
            raise ValueError("hook name predicate matched no hook point; see model.hook_dict for the names")
        return points

    # ---------------------------------------------------------------- attaching hooks
    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn, dir: Direction = "fwd", *,
                 is_permanent: bool = False, prepend: bool = False) -> list[HookHandle]:
        return [p.add_hook(fn, dir, is_permanent=is_permanent, prepend=prepend,
                           context_level=None if is_permanent else self._context_level)
                for p in self._points(name)]

    def reset_hooks(self, *, including_permanent: bool = False) -> None:
        for point in self.hook_dict.values():
            point.remove_hooks("both", including_permanent=including_permanent)
            point.ctx.clear()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = (),
              reset_hooks_end: bool = True) -> Iterator["HookedRootModule"]:
        """Attach hooks for the duration of a `with` block.

        On exit (also on an exception) exactly the hooks this context added are removed, so nested contexts and
        hooks added elsewhere are untouched. With `reset_hooks_end=False` they stay attached.
        """
        handles: list[HookHandle] = []
        self._context_level += 1
        try:
            for name, fn in fwd_hooks:
                handles += self.add_hook(name, fn, "fwd")
            for name, fn in bwd_hooks:
                handles += self.add_hook(name, fn, "bwd")
            yield self
        finally:
            self._context_level -= 1
            if reset_hooks_end:
                for handle in handles:
                    handle.remove()

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = (),
                       reset_hooks_end: bool = True, **inputs: Any) -> Any:
        """Run the forward with hooks attached; they are removed afterwards (unless `reset_hooks_end=False`).

        Backward hooks are bound to the tensors of this forward, so a later `.backward()` on its output still runs
        them although they are no longer attached.
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(*args, **inputs)

    def run_with_cache(self, *args: Any, names_filter: NameFilter = None, device: torch.device | str | None = None,
                       incl_bwd: bool = False, remove_batch_dim: bool = False, **inputs: Any):
        """Run the forward and return `(output, cache)`, the cache holding the selected activations.

        `device` moves each activation there as soon as it is produced (for example "cpu", so that a GPU never
        holds the cache). With `incl_bwd=True`, call `.backward()` on a function of the output afterwards: the
        gradients then arrive in the cache under `name + "_grad"` (no hook stays attached in between).
        """
        from .cache import ActivationCache

        store: dict[str, Tensor] = {}
        names = self.hook_names(names_filter)

        def save(key: str) -> HookFn:
            def hook(tensor: Tensor, hook: HookPoint) -> None:
                store[key] = tensor.detach().to(device) if device is not None else tensor.detach()
            return hook

        fwd = [(n, save(n)) for n in names]
        bwd = [(n, save(n + "_grad")) for n in names] if incl_bwd else []
        with self.hooks(fwd, bwd):
            out = self(*args, **inputs)
        cache = ActivationCache(store, self, positions=getattr(self, "last_positions", None))
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, cache
