"""Hook points and the root module that owns them (TransformerLens semantics).

A `HookPoint` is an identity module placed on a tensor of interest. Hook functions `fn(tensor, hook)` attached to
it see the tensor as it flows past; a returned tensor replaces it, so every hook point can edit, not only read.
Hooks are called directly from `HookPoint.forward` (no `nn.Module` hook machinery), which keeps an unhooked
forward free of overhead and lets components ask `hook.has_hooks` before computing costly optional tensors.

Threads. Hooks attached by `hooks()`, `run_with_hooks`, `run_with_cache` and `generate(fwd_hooks=...)` are
*scoped*: they live in a `contextvars` scope that only the thread (or context) that opened it sees, so several
threads can run different hooks on one model at once. Hooks attached by `add_hook` outside such a block, and
permanent hooks, are *global*: every thread sees them. Per-call state that a forward writes and a later call
reads (a tower's resume and recording switches) is kept per context the same way (`PerCall`).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, Union

import torch
from torch import Tensor, nn

from . import names as names_
from .arguments import keyword_names
from .cache import ActivationCache
from .utils import Slice

HookFn = Callable[..., Union[Tensor, None]]
NameFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
HookSpec = tuple[Union[str, Callable[[str], bool]], HookFn]
Direction = Literal["fwd", "bwd"]
V = TypeVar("V")


class PerCall(Generic[V]):
    """A class attribute whose value is private to the thread (more exactly the `contextvars` context) that set it:
    state one call writes and the same call (or the caller's next line) reads, e.g. a tower's `recorded_output`.

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
        hook: HookFn,
        dir: Direction = "fwd",
        *,
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> HookHandle:
        """Attach `hook`: inside a `hooks()` block (and not permanent) for the calling context only, until the block
        ends; otherwise globally, until removed."""
        check_direction(dir)
        check_hook_fn(hook, f"hook on {self.name!r}")
        return self._attach(hook, dir, is_permanent, prepend, None if is_permanent else _SCOPE.get())

    def add_perma_hook(self, hook: HookFn, dir: Direction = "fwd") -> HookHandle:
        """Attach `hook` permanently (TransformerLens's `add_perma_hook`): globally, kept by `reset_hooks()` and
        `remove_hooks()`, removed only by those with `including_permanent=True` (or `handle.remove()`)."""
        return self.add_hook(hook, dir, is_permanent=True)

    def _attach(self, fn: HookFn, dir: Direction, is_permanent: bool, prepend: bool,
                scope: _Scope | None) -> HookHandle:
        if scope is None:
            hooks = self._fwd if dir == "fwd" else self._bwd
        else:
            hooks = (scope.fwd if dir == "fwd" else scope.bwd).setdefault(self, [])
        handle = HookHandle(self, fn, dir, is_permanent, hooks)
        hooks.insert(0, handle) if prepend else hooks.append(handle)
        return handle

    def remove_hooks(self, dir: Direction | Literal["both"] = "fwd", including_permanent: bool = False,
                     level: int | None = None) -> None:
        """Remove hooks in direction `dir` ("fwd" by default, as in TransformerLens; "bwd" or "both"): the global
        ones (permanent ones only with `including_permanent=True`) and the calling context's scoped ones.

        `level=k` removes only the hooks of the calling context's k-th open `hooks()` block (1: the outermost),
        TransformerLens's context levels; global and permanent hooks have no level and stay."""
        dirs = _directions(dir, "dir")
        scopes = _scopes_at(level, including_permanent)
        if level is None:
            for d in dirs:
                hooks = self._fwd if d == "fwd" else self._bwd
                hooks[:] = [h for h in hooks if h.is_permanent and not including_permanent]  # in place: handles own it
        for scope in scopes:
            for d in dirs:
                (scope.fwd if d == "fwd" else scope.bwd).pop(self, None)

    def clear_context(self) -> None:
        """Empty `ctx`, the scratch space hook functions share (TransformerLens's `clear_context`)."""
        self.ctx = {}

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

    @property
    def tower(self) -> str:
        """The tower this point belongs to, the first part of its name (`"lm"` for `lm.blocks.3.attn.hook_z`)."""
        return names_.parse(self._named()).tower

    def layer(self) -> int:
        """The index of the block this point is in (3 for `lm.blocks.3.attn.hook_z`), as TransformerLens's
        `HookPoint.layer()`; like it, raises for a point outside the blocks (`lm.hook_embed`, `lm.ln_final.hook_scale`)
        and for a point not yet named by its root module's `setup()`.

        Where hooked_vlm differs: its names start with a tower, so the index is the part after `{tower}.blocks`, not
        the second part (TransformerLens reads `blocks.3.attn.hook_z`); and the error is always a ValueError naming
        the rule (TransformerLens's is whatever its `int(name.split(".")[1])` raises: an IndexError or a
        ValueError). `hooked_vlm.names.parse(name).layer` gives None instead of raising for a tower-level name."""
        return names_.layer_of(self._named())

    def _named(self) -> str:
        if not self.name:
            raise ValueError("this hook point has no name yet: a root module's setup() names its hook points")
        return self.name

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _directions(direction: Any, what: str) -> tuple[Direction, ...]:
    if direction not in ("fwd", "bwd", "both"):
        raise ValueError(f"{what} must be 'fwd', 'bwd' or 'both', got {direction!r}")
    return ("fwd", "bwd") if direction == "both" else (direction,)


def _scopes_at(level: Any, including_permanent: bool) -> list[_Scope]:
    """The calling context's open `hooks()` scopes that a removal at `level` touches: all of them (None), or the
    level-th from the outermost (TransformerLens numbers its context levels from 1)."""
    scope = _SCOPE.get()
    scopes = scope.chain() if scope is not None else []
    if level is None:
        return scopes
    if including_permanent:
        raise ValueError(f"including_permanent=True removes every hook, whatever its level; pass level={level!r} or "
                         "including_permanent=True, not both")
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= len(scopes):
        open_ = f"{len(scopes)} are open" if scopes else "none is open"
        raise ValueError(f"level={level!r} is not an open hooks() block of this thread: levels count the open blocks "
                         f"from 1 (the outermost), and {open_}")
    return [scopes[level - 1]]


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
    def hook_points(self) -> list[HookPoint]:
        """Every hook point, in execution order (TransformerLens's `hook_points()`)."""
        return list(self.hook_dict.values())

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: Direction = "fwd", *,
                 is_permanent: bool = False, prepend: bool = False) -> list[HookHandle]:
        """Attach `hook` to the named point(s). Inside a `hooks()` block (unless permanent) it is scoped to that
        block: only the calling thread sees it and the block's end removes it; elsewhere it is global (every thread
        sees it) until `reset_hooks()` or `handle.remove()`."""
        check_direction(dir)
        check_hook_fn(hook, f"hook on {name!r}" if isinstance(name, str) else "hook")
        scope = None if is_permanent else _SCOPE.get()
        return [p._attach(hook, dir, is_permanent, prepend, scope) for p in self._points(name)]

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn,
                       dir: Direction = "fwd") -> list[HookHandle]:
        """TransformerLens's `add_perma_hook`: attach `hook` permanently, globally (every thread sees it, also inside
        `hooks()` blocks); `reset_hooks()` and `remove_all_hook_fns()` keep it, unless called with
        `including_permanent=True`."""
        return self.add_hook(name, hook, dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: Direction | Literal["both"] = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        """TransformerLens's `remove_all_hook_fns`: remove the hooks in `direction` ("fwd", "bwd", "both") from
        every point, permanent ones only with `including_permanent=True`; `hook.ctx` is kept (`reset_hooks` clears
        it). Global hooks go, and the calling context's scoped ones; other threads' scoped hooks are theirs.

        `level=k` removes only the hooks of the calling context's k-th open `hooks()` block (1: the outermost),
        where TransformerLens numbers its context levels the same way; global hooks have no level and stay."""
        _directions(direction, "direction")
        _scopes_at(level, including_permanent)  # checked once, before any hook is removed
        for point in self.hook_dict.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        """Empty every hook point's `ctx` (TransformerLens's `clear_contexts`)."""
        for point in self.hook_dict.values():
            point.clear_context()

    def reset_hooks(self, clear_contexts: bool = True, direction: Direction | Literal["both"] = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        """Remove global hooks (permanent ones only if asked) and the hooks of the calling context's open `hooks()`
        blocks (other threads' scoped hooks are theirs to remove), and empty every `hook.ctx`: TransformerLens's
        `reset_hooks`, with its arguments (see `remove_all_hook_fns`)."""
        if not isinstance(clear_contexts, bool):  # TL's first positional: anything but a bool is a mix-up
            raise TypeError(f"clear_contexts must be True or False, got {type(clear_contexts).__name__} "
                            f"{clear_contexts!r:.60}")
        self.remove_all_hook_fns(direction, including_permanent, level)
        if clear_contexts:
            self.clear_contexts()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False) -> Iterator["HookedRootModule"]:
        """Attach hooks for the duration of a `with` block, for the calling thread (context) only: other threads
        calling the model meanwhile do not see them. Hooks added with `add_hook` inside the block are scoped the
        same way. On exit (also on an exception) they are all gone; enclosing blocks and global hooks are untouched;
        with `clear_contexts=True` every `hook.ctx` is emptied too (TransformerLens's argument).

        With `reset_hooks_end=False` the hooks are attached globally instead (every thread sees them) and stay
        attached after the block, until `reset_hooks()`.
        """
        for value, what in ((reset_hooks_end, "reset_hooks_end"), (clear_contexts, "clear_contexts")):
            if not isinstance(value, bool):
                raise TypeError(f"{what} must be True or False, got {type(value).__name__} {value!r:.60}")
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
            if clear_contexts:
                self.clear_contexts()

    def run_with_hooks(self, *args: Any, fwd_hooks: Iterable[HookSpec] = (), bwd_hooks: Iterable[HookSpec] = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False,
                       stop_at_hook: str | bool | None = None, **inputs: Any) -> Any:
        """Run the forward with hooks attached for this call only (other threads do not see them); they are removed
        afterwards (with `reset_hooks_end=False`: attached globally and kept). The inputs are keywords, or the
        processor's output as one positional dict (`run_with_hooks(inputs, fwd_hooks=...)`).

        Backward hooks are bound to the tensors of this forward, so a later `.backward()` on its output still runs
        them although they are no longer attached (TransformerLens needs `reset_hooks_end=False` for that).

        `stop_at_hook`: a hook name, or True for the last point `fwd_hooks` attach to (in execution order): the
        forward ends right after that point's hooks ran, and the call returns None (see `_forward_until`).
        """
        inputs = model_inputs(args, inputs, "run_with_hooks()")
        self._check_own_keywords(inputs, ("fwd_hooks", "bwd_hooks", "reset_hooks_end", "clear_contexts",
                                          "stop_at_hook"), "run_with_hooks()")
        stop = None
        if stop_at_hook is not None and stop_at_hook is not False:
            fwd_hooks = _hook_specs(fwd_hooks, "fwd_hooks")  # a list: read here and again by hooks()
            if _hook_specs(bwd_hooks, "bwd_hooks"):
                raise ValueError("run_with_hooks(stop_at_hook=...) returns no output to call .backward() on; drop "
                                 "bwd_hooks or stop_at_hook")
            hooked = [p.name for name, _ in fwd_hooks for p in self._points(name)]
            stop = self._stop_point(stop_at_hook, hooked, "run_with_hooks()", "the last of fwd_hooks")
            order = self._execution_order()
            late = [name for name, _ in fwd_hooks if isinstance(name, str) and order[name] > order[stop]]
            if late:  # a hook named explicitly that would never run
                raise ValueError(f"run_with_hooks(): fwd_hooks hook {late[0]!r}, which runs after stop_at_hook="
                                 f"{stop!r}; stop later (stop_at_hook=True stops after the last hooked point)")
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self._forward_until(stop, inputs)

    def _stop_point(self, stop_at_hook: Any, needed: Sequence[str], where: str, what: str) -> str:
        """The hook point `stop_at_hook` names: itself, or for True the last of `needed` in execution order
        (`hook_dict` is in execution order; tests/test_stop_early.py checks it on every family)."""
        if stop_at_hook is True:
            if not needed:
                raise ValueError(f"{where}: stop_at_hook=True stops after {what}, but there is none; pass a hook name")
            order = self._execution_order()
            return max(needed, key=order.__getitem__)
        if not isinstance(stop_at_hook, str):
            raise TypeError(f"{where}: stop_at_hook must be a hook name, True (stop after {what}) or None, got "
                            f"{type(stop_at_hook).__name__} {stop_at_hook!r:.60}")
        return self._check_name(stop_at_hook)

    def _execution_order(self) -> dict[str, int]:
        """Each hook name's index in `hook_dict`, which is the order the points run in."""
        return {name: i for i, name in enumerate(self.hook_dict)}

    def _forward_until(self, stop: str | None, inputs: Mapping[str, Any]) -> Any:
        """`self(**inputs)`, ended right after hook point `stop` ran (None: not ended): a hook attached last there
        raises a private exception that only this call catches, so nothing after that point runs (a projector's
        output never runs the LM). Returns None when it stopped; the output if the point never ran (a block the
        tower skips). The stop hook lives in its own `hooks()` scope: gone on return and on any exception."""
        if stop is None:
            return self(**inputs)
        signal = _StopForward(stop)

        def stop_forward(tensor: Tensor, hook: HookPoint) -> None:
            raise signal

        with self.hooks([(stop, stop_forward)]):  # the innermost scope: its hook runs after all others at `stop`
            try:
                return self(**inputs)
            except _StopForward as e:
                if e is not signal:  # a nested call's stop escaped it: not ours to swallow
                    raise
                return None

    def _check_own_keywords(self, inputs: Mapping[str, Any], own: Sequence[str], where: str) -> None:
        """A keyword the forward does not take but that looks like one of the caller's own (`names_filtr=`) is a
        typo of the caller's: say so, rather than let the forward name its own closest keyword."""
        takes = set(keyword_names(self.forward))
        for key in inputs.keys() - takes:
            close = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
            if close:
                raise TypeError(f"{where} got an unexpected keyword argument {key!r}; did you mean {close[0]!r}?")

    # ---------------------------------------------------------------- caching
    def get_caching_hooks(self, names_filter: NameFilter = None, incl_bwd: bool = False,
                          device: torch.device | str | None = None, remove_batch_dim: bool = False,
                          cache: MutableMapping[str, Tensor] | None = None, pos_slice: Any = None,
                          ) -> tuple[MutableMapping[str, Tensor], list[HookSpec], list[HookSpec]]:
        """TransformerLens's `get_caching_hooks`: `(cache, fwd_hooks, bwd_hooks)`, hooks that store the selected
        activations (and with `incl_bwd=True` their gradients, under `name + "_grad"`) in `cache` (a new dict by
        default) when attached, e.g. `with model.hooks(fwd_hooks, bwd_hooks): metric(model(**inputs)).backward()`.
        Nothing is attached here.

        Each activation is stored detached, moved to `device` (None: where it is), with its batch dimension dropped
        if `remove_batch_dim` (a batch of one only), and selected along its position dimension by `pos_slice`
        (TransformerLens's `Slice`: an int keeps the dimension, `-1` stores `[..., -1:, ...]`; a tuple is
        `slice(*t)`; a list or tensor of indices). The position dimension is TransformerLens's: third from last for
        `hook_q`, `hook_k`, `hook_v`, `hook_z`, `hook_result` (and, where TransformerLens slices the heads instead,
        `hook_rot_q`, `hook_rot_k`), second from last for everything else, which for `hook_pattern` and
        `hook_attn_scores` is the query position (the keys are kept whole). Each tower's hooks are sliced along
        their own sequence: the vision tower's patches, the LM's tokens, and, for cross-attention `hook_k` and
        `hook_v`, the attended tower's positions.
        """
        names = self.hook_names(names_filter)
        device = _cache_device(device, "get_caching_hooks")
        positions = Slice.unwrap(pos_slice)
        if not isinstance(incl_bwd, bool) or not isinstance(remove_batch_dim, bool):
            raise TypeError(f"incl_bwd and remove_batch_dim must be True or False, got {incl_bwd!r} and "
                            f"{remove_batch_dim!r}")
        if cache is None:
            cache = {}
        elif not isinstance(cache, MutableMapping):
            raise TypeError(f"cache must be a dict to store the activations in (or None), got {type(cache).__name__}")

        def save(backward: bool) -> HookFn:
            def save_hook(tensor: Tensor, hook: HookPoint) -> None:
                x = tensor.detach() if device is None else tensor.detach().to(device)
                if remove_batch_dim:
                    if x.shape[0] != 1:
                        raise ValueError(f"remove_batch_dim=True needs a batch of one example; {hook.name} has "
                                         f"batch size {x.shape[0]}")
                    x = x[0]
                if not positions.is_identity:
                    dim = _position_dim(hook.name)
                    if tensor.ndim >= -dim:  # TransformerLens's check: the tensor has that many dimensions
                        x = positions.apply(x, dim)
                        if positions.mode == "slice":  # a view would keep the whole activation alive
                            x = x.clone()
                cache[hook.name + "_grad" if backward else hook.name] = x
            return save_hook

        fwd: list[HookSpec] = [(name, save(False)) for name in names]
        bwd: list[HookSpec] = [(name, save(True)) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def run_with_cache(self, *args: Any, names_filter: NameFilter = None, device: torch.device | str | None = None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, pos_slice: Any = None, return_cache_object: bool = True,
                       stop_at_hook: str | bool | None = None, **inputs: Any):
        """Run the forward and return `(output, cache)`, the cache holding the selected activations
        (TransformerLens's `run_with_cache`, arguments and defaults included). The inputs are keywords, or the
        processor's output as one positional dict (`run_with_cache(inputs)`).

        `device` moves each activation there as soon as it is produced (for example "cpu", so that a GPU never
        holds the cache); `remove_batch_dim` drops the batch dimension of a single example; `pos_slice` keeps only
        some positions of each activation (see `get_caching_hooks`). `return_cache_object=False` returns the plain
        dict instead of an `ActivationCache`. Cached tensors never share memory with a parameter: editing the cache
        cannot change a weight.

        `incl_bwd=True` does what TransformerLens does: it calls `.backward()` on the output, inside the run, and
        caches the gradients under `name + "_grad"`. That needs an output of one element (TransformerLens's
        `return_type="loss"`); hooked_vlm's forwards return logits, so for the gradients of a metric attach
        `get_caching_hooks(names, incl_bwd=True)` with `hooks()` and call `.backward()` on the metric yourself.

        `stop_at_hook` ends the forward right after one hook point ran, and the output is None (TransformerLens's
        `stop_at_layer` returns the residual stream instead; here it is in the cache): True stops after the last
        cached name (in execution order), so `names_filter="projector.hook_out"` never runs the LM; a name stops
        there, and a `names_filter` of None or a predicate then selects only the points up to it (an explicit name
        after it is an error). TransformerLens's `stop_at_layer=L` is `stop_at_hook="lm.blocks.{L}.hook_resid_pre"`
        (which also caches the stream TL returns). Activations equal a full run's exactly.
        """
        inputs = model_inputs(args, inputs, "run_with_cache()")
        self._check_own_keywords(inputs, ("names_filter", "device", "incl_bwd", "remove_batch_dim", "tower_outputs",
                                          "reset_hooks_end", "clear_contexts", "pos_slice", "return_cache_object",
                                          "stop_at_hook"), "run_with_cache()")
        stop = None
        if stop_at_hook is not None and stop_at_hook is not False:
            if incl_bwd:
                raise ValueError("run_with_cache(incl_bwd=True) calls .backward() on the output, which "
                                 "stop_at_hook leaves out; pass one of them")
            stop, names_filter = self._names_until(stop_at_hook, names_filter)
        if incl_bwd and not torch.is_grad_enabled():
            raise RuntimeError("run_with_cache(incl_bwd=True) under torch.no_grad() would cache no gradient; call "
                               "it with gradients enabled")
        if remove_batch_dim:  # token ids and masks have one row per example (images may be several per example)
            batched = {k: v.shape[0] for k, v in inputs.items() if isinstance(v, Tensor) and v.ndim == 2
                       and not v.dtype.is_floating_point and v.shape[0] != 1}
            if batched:
                key, size = next(iter(batched.items()))
                raise ValueError(f"remove_batch_dim=True needs a batch of one example; {key} holds {size}")
        store, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice)
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self._forward_until(stop, inputs)
            if incl_bwd:
                _backward(out)
        if not return_cache_object:
            return out, store
        positions = self.positions(**inputs) if hasattr(self, "positions") else None  # a pure function of the inputs
        return out, ActivationCache(store, self, positions=positions, has_batch_dim=not remove_batch_dim)

    def _names_until(self, stop_at_hook: Any, names_filter: NameFilter) -> tuple[str, list[str]]:
        """`run_with_cache`'s stop point and the names it caches: the selected names up to the stop point (an
        explicit name after it is an error: it would silently be missing from the cache)."""
        names = self.hook_names(names_filter)
        stop = self._stop_point(stop_at_hook, names, "run_with_cache()", "the last cached name")
        order = self._execution_order()
        after = [n for n in names if order[n] > order[stop]]
        if after and not (names_filter is None or callable(names_filter)):
            raise ValueError(f"run_with_cache(): names_filter asks for {after[0]!r}, which runs after stop_at_hook="
                             f"{stop!r}; stop later (stop_at_hook=True stops after the last cached name) or cache less")
        kept = [n for n in names if order[n] <= order[stop]]
        if not kept:
            raise ValueError(f"run_with_cache(): every name names_filter selects runs after stop_at_hook={stop!r}, so "
                             "the cache would be empty; stop later or select earlier hooks")
        return stop, kept


class _StopForward(Exception):
    """Raised by the hook `_forward_until` attaches, to end a forward at a hook point; caught by that call alone."""

    def __init__(self, point: str) -> None:
        super().__init__(f"forward stopped after {point} (stop_at_hook); this escaped the call that stopped it")


def model_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """The model's keyword inputs, with a processor's output passed positionally (`model(inputs)`, a `BatchFeature`
    or any mapping) merged in, as `model(**inputs)` would pass it. Anything else positional is a TypeError."""
    if not args:
        return kwargs
    if len(args) == 1 and isinstance(args[0], Mapping):
        given = args[0]
        bad = [k for k in given if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: the positional inputs hold key {bad[0]!r:.60}; a processor's output maps input "
                            "names (str) to tensors")
        twice = sorted(given.keys() & kwargs.keys())
        if twice:
            raise TypeError(f"{where} got {twice[0]!r} twice, in the positional processor output and as a keyword; "
                            "pass it once")
        return {**given, **kwargs}
    kinds = ", ".join(type(a).__name__ for a in args)
    hint = (" (TransformerLens's model(tokens) is model(input_ids=tokens, pixel_values=...) here)"
            if isinstance(args[0], Tensor) else "")
    raise TypeError(f"{where} takes the processor's output, as keywords (model(**inputs)) or as one positional dict "
                    f"(model(inputs)); got positional {kinds}{hint}: pass the inputs by name")


def _cache_device(device: Any, where: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{where}: device={device!r} is not a device ({e}); pass e.g. 'cpu' or 'cuda:0'") from None


# TransformerLens's rule: per-head tensors [..., pos, head, d] have their positions third from last. Its list leaves
# out hook_rot_q / hook_rot_k (it slices their heads); here they follow hook_q / hook_k.
_HEAD_LAST = frozenset({"hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k"})


def _position_dim(name: str) -> int:
    return -3 if name.rpartition(".")[2] in _HEAD_LAST else -2


def _backward(out: Any) -> None:
    """TransformerLens's `model_out.backward()`, refused with the reason where it cannot run."""
    if not isinstance(out, Tensor) or out.numel() != 1:
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise RuntimeError(f"run_with_cache(incl_bwd=True) calls .backward() on the model's output, as TransformerLens "
                           f"does, which needs one element (TL's return_type='loss'), but the output is {what}; for "
                           "the gradients of a metric: cache, fwd, bwd = model.get_caching_hooks(names, "
                           "incl_bwd=True), then with model.hooks(fwd, bwd): metric(model(**inputs)).backward()")
    if not out.requires_grad:
        raise RuntimeError("run_with_cache(incl_bwd=True): the output does not require grad (every parameter frozen "
                           "and no input requiring grad), so there is no gradient to cache")
    out.backward()
