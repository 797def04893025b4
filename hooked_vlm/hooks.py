"""Hook points and the root module that owns them (TransformerLens semantics).

A `HookPoint` is an identity module placed on a tensor of interest. Hook functions `fn(tensor, hook)` attached to
it see the tensor as it flows past; a returned tensor replaces it, so every hook point can edit, not only read.
Hooks are called directly from `HookPoint.forward` (no `nn.Module` hook machinery), which keeps an unhooked
forward free of overhead and lets components ask `hook.has_hooks` before computing costly optional tensors.

Threads. Hooks attached by `hooks()`, `run_with_hooks`, `run_with_cache` and `generate(fwd_hooks=...)` are
*scoped*: they live in a `contextvars` scope that only the thread (or context) that opened it sees, so several
threads can run different hooks on one model at once. Hooks attached by `add_hook` outside such a block, and
permanent hooks, are *global*: every thread sees them. Per-call state that a forward writes and a later call
reads (`last_positions`, a tower's resume and recording switches) is kept per context the same way (`PerCall`).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, Union

import torch
from torch import Tensor, nn

from .arguments import keyword_names

HookFn = Callable[..., Union[Tensor, None]]
NameFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
HookSpec = tuple[Union[str, Callable[[str], bool]], HookFn]
Direction = Literal["fwd", "bwd"]
V = TypeVar("V")


class PerCall(Generic[V]):
    """A class attribute whose value is private to the thread (more exactly the `contextvars` context) that set it:
    state one call writes and the same call (or the caller's next line) reads, e.g. `model.last_positions`.

    Each instance gets its own `ContextVar`, created on first use and kept in a weak table, so models stay
    copyable and picklable. A thread that never set the attribute reads `default`."""

    def __init__(self, default: V) -> None:
        self.default = default
        self._vars: weakref.WeakKeyDictionary[Any, contextvars.ContextVar] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _var(self, obj: Any) -> contextvars.ContextVar:
        var = self._vars.get(obj)
        if var is None:
            with self._lock:  # two threads' first use must not create two variables
                var = self._vars.setdefault(obj, contextvars.ContextVar(self.name, default=self.default))
        return var

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else self._var(obj).get()

    def __set__(self, obj: Any, value: V) -> None:
        self._var(obj).set(value)


class _Scope:
    """The hooks one `hooks()` block attached, per hook point; `parent` is the enclosing block's scope."""

    __slots__ = ("parent", "fwd", "bwd")

    def __init__(self, parent: "_Scope | None") -> None:
        self.parent = parent
        self.fwd: dict[HookPoint, list[HookHandle]] = {}
        self.bwd: dict[HookPoint, list[HookHandle]] = {}

    def chain(self) -> list["_Scope"]:
        """This scope and its parents, outermost first (the order their hooks were added in)."""
        scopes, scope = [], self
        while scope is not None:
            scopes.append(scope)
            scope = scope.parent
        return scopes[::-1]


# the innermost open `hooks()` scope of the current thread / context; None outside every block
_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("hooked_vlm_hook_scope", default=None)


@dataclass(eq=False)
class HookHandle:
    """One hook attached to one hook point; `remove()` detaches exactly this hook."""

    point: "HookPoint"
    fn: HookFn
    dir: Direction
    is_permanent: bool = False
    owner: list["HookHandle"] | None = None  # the list holding it: the point's global list or a scope's

    def remove(self) -> None:
        if self.owner is not None and self in self.owner:
            self.owner.remove(self)


def check_hook_fn(fn: Any, where: str) -> None:
    """Refuse, when it is attached, a hook that the forward could not call as `fn(tensor, hook=point)`."""
    if not callable(fn):
        raise TypeError(f"{where}: the hook function is a {type(fn).__name__} ({fn!r:.60}), not callable; pass a "
                        "function fn(tensor, hook) -> Tensor | None")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        signature.bind(None, hook=None)
    except TypeError:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise TypeError(f"{where}: hook function {name}{signature} cannot be called as fn(tensor, hook=point); "
                        "define it as fn(tensor, hook) (the second parameter must be named 'hook')") from None


def check_direction(dir: Any) -> None:
    if dir not in ("fwd", "bwd"):
        raise ValueError(f"hook direction must be 'fwd' (forward) or 'bwd' (backward), got {dir!r}")


class HookPoint(nn.Module):
    """An identity module on which forward and backward hooks can be attached.

    Forward hooks run in the order they were added, global hooks first, then those of the calling context's
    `hooks()` blocks (outermost first); each sees the output of the previous one. A hook that returns a tensor must
    return one of the same shape and dtype as it received (the error names the hook and both shapes). Backward
    hooks receive the gradient of the loss with respect to this tensor and may return a replacement.

    `views_parameter=True` marks a point whose tensor is a view of a parameter (a learned position table, query
    tokens): when hooked it hands its hooks a copy, so an in-place hook or a cache edit can never change a weight.
    """

    def __init__(self, *, views_parameter: bool = False) -> None:
        super().__init__()
        self.name: str = ""
        self.views_parameter = views_parameter
        self._fwd: list[HookHandle] = []  # global hooks, seen by every thread
        self._bwd: list[HookHandle] = []
        self.ctx: dict[str, Any] = {}  # scratch space for hook functions, cleared by reset_hooks

    def _visible(self, dir: Direction) -> list[HookHandle]:
        """The hooks the calling thread sees here: global ones, then its scopes' (outermost first)."""
        hooks = list(self._fwd if dir == "fwd" else self._bwd)
        scope = _SCOPE.get()
        if scope is not None:
            for s in scope.chain():
                hooks += (s.fwd if dir == "fwd" else s.bwd).get(self, ())
        return hooks

    @property
    def fwd_hooks(self) -> tuple[HookHandle, ...]:
        """The forward hooks the calling thread sees, in calling order (read-only: attach with `add_hook`, detach
        with `handle.remove()` or `remove_hooks`)."""
        return tuple(self._visible("fwd"))

    @property
    def bwd_hooks(self) -> tuple[HookHandle, ...]:
        return tuple(self._visible("bwd"))

    @property
    def has_hooks(self) -> bool:
        if self._fwd or self._bwd:
            return True
        scope = _SCOPE.get()
        while scope is not None:
            if self in scope.fwd or self in scope.bwd:
                return True
            scope = scope.parent
        return False

    def add_hook(
        self,
        fn: HookFn,
        dir: Direction = "fwd",
        *,
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> HookHandle:
        """Attach `fn`: inside a `hooks()` block (and not permanent) for the calling context only, until the block
        ends; otherwise globally, until removed."""
        check_direction(dir)
        check_hook_fn(fn, f"hook on {self.name!r}")
        return self._attach(fn, dir, is_permanent, prepend, None if is_permanent else _SCOPE.get())

    def _attach(self, fn: HookFn, dir: Direction, is_permanent: bool, prepend: bool,
                scope: _Scope | None) -> HookHandle:
        if scope is None:
            hooks = self._fwd if dir == "fwd" else self._bwd
        else:
            hooks = (scope.fwd if dir == "fwd" else scope.bwd).setdefault(self, [])
        handle = HookHandle(self, fn, dir, is_permanent, hooks)
        hooks.insert(0, handle) if prepend else hooks.append(handle)
        return handle

    def remove_hooks(self, dir: Direction | Literal["both"] = "both", *, including_permanent: bool = False) -> None:
        """Remove the global hooks (permanent ones only if asked) and the calling context's scoped ones."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        dirs = ("fwd", "bwd") if dir == "both" else (dir,)
        for d in dirs:
            hooks = self._fwd if d == "fwd" else self._bwd
            hooks[:] = [h for h in hooks if h.is_permanent and not including_permanent]  # in place: handles own it
        scope = _SCOPE.get()
        while scope is not None:
            for d in dirs:
                (scope.fwd if d == "fwd" else scope.bwd).pop(self, None)
            scope = scope.parent

    def forward(self, x: Tensor) -> Tensor:
        # the unhooked path: two list checks and one context-variable read (then a walk of the open scopes)
        if not (self._fwd or self._bwd) and (_SCOPE.get() is None or not self.has_hooks):
            return x
        fwd, bwd = self._visible("fwd"), self._visible("bwd")
        if self.views_parameter:
            x = x.clone()  # hooks get a copy: an in-place edit or a cached tensor must not reach the weight
        for handle in fwd:
            out = handle.fn(x, hook=self)
            if out is not None:
                self._check_replacement(x, out)
                x = out
        if bwd and x.requires_grad:
            # bind the hooks visible now: backward usually runs after run_with_hooks has removed them (and on
            # autograd's own threads, which do not see this context's scopes)
            x.register_hook(lambda grad: self._run_bwd_hooks(grad, bwd))
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


def _hook_specs(specs: Any, what: str) -> list[tuple[str | Callable[[str], bool], HookFn]]:
    """`fwd_hooks` / `bwd_hooks` as a list of (name or predicate, fn) pairs, each checked (nothing attached yet)."""
    shape = "a list of (name, fn) pairs, e.g. [('lm.blocks.0.hook_resid_post', fn)]"
    if isinstance(specs, Mapping):
        raise TypeError(f"{what} is a {type(specs).__name__}; pass {shape} (from a dict: list(d.items()))")
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Iterable):
        raise TypeError(f"{what} must be {shape}, got {type(specs).__name__} {specs!r:.60}")
    specs = list(specs)
    if len(specs) == 2 and isinstance(specs[0], str) and callable(specs[1]):
        raise TypeError(f"{what} is a single (name, fn) pair; wrap it in a list: {what}=[(name, fn)]")
    for i, spec in enumerate(specs):
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise TypeError(f"{what}[{i}] is {type(spec).__name__} {spec!r:.60}, not a (name, fn) pair; pass {shape}")
        name, fn = spec
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"{what}[{i}]: the hook name must be a str or a predicate name -> bool, got "
                            f"{type(name).__name__} {name!r:.60}")
        check_hook_fn(fn, f"{what}[{i}] ({name if isinstance(name, str) else 'predicate'})")
    return specs


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
            names = [n for n in self.hook_dict if self._select(names_filter, n, "names_filter")]
            if not names:
                raise ValueError("names_filter matched no hook point; see model.hook_dict for the names")
            return names
        if isinstance(names_filter, (bytes, Mapping)) or not isinstance(names_filter, Iterable):
            raise TypeError(f"names_filter must be None, a hook name, a list of names or a predicate name -> bool; "
                            f"got {type(names_filter).__name__} {names_filter!r:.60}")
        names = list(names_filter)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"names_filter holds {type(bad[0]).__name__} {bad[0]!r:.60}; a list of names must hold "
                            "only hook names (str), e.g. ['lm.blocks.0.hook_resid_post']")
        if not names:
            raise ValueError("names_filter is an empty list: it would select no hook point")
        return [self._check_name(n) for n in names]

    @staticmethod
    def _select(pred: Callable[[str], bool], name: str, what: str) -> bool:
        chosen = pred(name)
        if callable(chosen) or isinstance(chosen, str):  # e.g. `lambda n: n.endswith` (the call forgotten)
            raise TypeError(f"{what} returned {type(chosen).__name__} {chosen!r:.60} for {name!r}; a predicate "
                            "must return True or False for a hook name")
        return bool(chosen)

    def _check_name(self, name: str) -> str:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, self.hook_dict.keys(), n=5, cutoff=0.5)
            hint = f"; closest names: {', '.join(close)}" if close else "; see model.hook_dict for the names"
            raise KeyError(f"no hook point named {name!r}{hint}")
        return name

    def _points(self, name_or_pred: str | Callable[[str], bool]) -> list[HookPoint]:
        if isinstance(name_or_pred, str):
            return [self.hook_dict[self._check_name(name_or_pred)]]
        if not callable(name_or_pred):
            raise TypeError(f"a hook name must be a str or a predicate name -> bool, got "
                            f"{type(name_or_pred).__name__} {name_or_pred!r:.60}")
        points = [p for n, p in self.hook_dict.items() if self._select(name_or_pred, n, "hook name predicate")]
        if not points:
            raise ValueError("hook name predicate matched no hook point; see model.hook_dict for the names")
        return points

    # ---------------------------------------------------------------- attaching hooks
    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn, dir: Direction = "fwd", *,
                 is_permanent: bool = False, prepend: bool = False) -> list[HookHandle]:
        """Attach `fn` to the named point(s). Inside a `hooks()` block (unless permanent) it is scoped to that block:
        only the calling thread sees it and the block's end removes it; elsewhere it is global (every thread sees
        it) until `reset_hooks()` or `handle.remove()`."""
        check_direction(dir)
        check_hook_fn(fn, f"hook on {name!r}" if isinstance(name, str) else "hook")
        scope = None if is_permanent else _SCOPE.get()
        return [p._attach(fn, dir, is_permanent, prepend, scope) for p in self._points(name)]

    def reset_hooks(self, *, including_permanent: bool = False) -> None:
        """Remove global hooks (permanent ones only if asked) and the hooks of the calling context's open `hooks()`
        blocks; other threads' scoped hooks are theirs to remove."""
        for point in self.hook_dict.values():
            point.remove_hooks("both", including_permanent=including_permanent)
            point.ctx.clear()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = (),
              reset_hooks_end: bool = True) -> Iterator["HookedRootModule"]:
        """Attach hooks for the duration of a `with` block, for the calling thread (context) only: other threads
        calling the model meanwhile do not see them. Hooks added with `add_hook` inside the block are scoped the
        same way. On exit (also on an exception) they are all gone; enclosing blocks and global hooks are untouched.

        With `reset_hooks_end=False` the hooks are attached globally instead (every thread sees them) and stay
        attached after the block, until `reset_hooks()`.
        """
        if not isinstance(reset_hooks_end, bool):
            raise TypeError(f"reset_hooks_end must be True or False, got {type(reset_hooks_end).__name__} "
                            f"{reset_hooks_end!r:.60}")
        # resolve and check everything before attaching anything: a bad spec leaves no hook behind
        attach = [(p, fn, dir) for dir, specs in (("fwd", _hook_specs(fwd_hooks, "fwd_hooks")),
                                                 ("bwd", _hook_specs(bwd_hooks, "bwd_hooks")))
                  for name, fn in specs for p in self._points(name)]
        if not reset_hooks_end:
            for point, fn, dir in attach:
                point._attach(fn, dir, False, False, None)
            yield self
            return
        scope = _Scope(_SCOPE.get())
        token = _SCOPE.set(scope)
        try:
            for point, fn, dir in attach:
                point._attach(fn, dir, False, False, scope)
            yield self
        finally:
            _SCOPE.reset(token)  # the scope and every hook in it are gone with it

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = (),
                       reset_hooks_end: bool = True, **inputs: Any) -> Any:
        """Run the forward with hooks attached for this call only (other threads do not see them); they are removed
        afterwards (with `reset_hooks_end=False`: attached globally and kept).

        Backward hooks are bound to the tensors of this forward, so a later `.backward()` on its output still runs
        them although they are no longer attached.
        """
        self._check_own_keywords(inputs, ("fwd_hooks", "bwd_hooks", "reset_hooks_end"), "run_with_hooks()")
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(*args, **inputs)

    def _check_own_keywords(self, inputs: Mapping[str, Any], own: Sequence[str], where: str) -> None:
        """A keyword the forward does not take but that looks like one of the caller's own (`names_filtr=`) is a
        typo of the caller's: say so, rather than let the forward name its own closest keyword."""
        takes = set(keyword_names(self.forward))
        for key in inputs.keys() - takes:
            close = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
            if close:
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}; did you mean {close[0]!r}?")

    def run_with_cache(self, *args: Any, names_filter: NameFilter = None, device: torch.device | str | None = None,
                       incl_bwd: bool = False, remove_batch_dim: bool = False, **inputs: Any):
        """Run the forward and return `(output, cache)`, the cache holding the selected activations.

        `device` moves each activation there as soon as it is produced (for example "cpu", so that a GPU never
        holds the cache). With `incl_bwd=True`, call `.backward()` on a function of the output afterwards: the
        gradients then arrive in the cache under `name + "_grad"` (no hook stays attached in between).
        Cached tensors never share memory with a parameter: editing the cache cannot change a weight.
        """
        from .cache import ActivationCache

        self._check_own_keywords(inputs, ("names_filter", "device", "incl_bwd", "remove_batch_dim", "tower_outputs"),
                                 "run_with_cache()")
        names = self.hook_names(names_filter)
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"run_with_cache: device={device!r} is not a device ({e}); pass e.g. 'cpu' or "
                                 "'cuda:0'") from None
        if incl_bwd and not torch.is_grad_enabled():
            raise RuntimeError("run_with_cache(incl_bwd=True) under torch.no_grad() would cache no gradient; call "
                               "it with gradients enabled")
        store: dict[str, Tensor] = {}

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
