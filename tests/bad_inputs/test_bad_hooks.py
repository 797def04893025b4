"""The hook API misused: each row is one bad call, the error it must raise and words its one-line message must hold.

Every one is refused before the forward runs and leaves no hook attached (the suite's autouse check).
"""

from __future__ import annotations

import pytest
import torch
from badcase import expect_error

from hooked_vlm.hooks import HookPoint

NAME = "vision.hook_embed"


def keep(tensor, hook):
    return None


def three_args(tensor, hook, extra):
    return None


def rows():
    def run(family="blip", **kw):
        return lambda fams: fams[family].model.run_with_hooks(**fams[family].inputs, **kw)

    def cache(family="blip", **kw):
        return lambda fams: fams[family].model.run_with_cache(**fams[family].inputs, **kw)

    def model_call(method, *args, family="blip", **kw):
        return lambda fams: getattr(fams[family].model, method)(*args, **kw)

    def hooks_block(family="blip", **kw):
        def call(fams):
            with fams[family].model.hooks(**kw):
                pass
        return call

    def point_call(method, *args, **kw):
        return lambda fams: getattr(fams["blip"].model.hook_dict[NAME], method)(*args, **kw)

    return [
        # fwd_hooks / bwd_hooks that are not a list of (name, fn) pairs
        pytest.param(run(fwd_hooks={NAME: keep}), TypeError, ("fwd_hooks is a dict", "list(d.items())"),
                     id="fwd_hooks-dict"),
        # a typo of run_with_cache's / run_with_hooks' own keywords is named as theirs, not as the forward's
        pytest.param(cache(names_filtr=NAME), TypeError, ("run_with_cache()", "'names_filtr'", "'names_filter'"),
                     id="run_with_cache-names_filter-typo"),
        pytest.param(run(fwd_hook=[(NAME, keep)]), TypeError, ("run_with_hooks()", "'fwd_hook'", "'fwd_hooks'"),
                     id="run_with_hooks-fwd_hooks-typo"),
        pytest.param(run(bwd_hooks={NAME: keep}), TypeError, ("bwd_hooks is a dict", "(name, fn) pairs"),
                     id="bwd_hooks-dict"),
        pytest.param(run(fwd_hooks=(NAME, keep)), TypeError, ("single (name, fn) pair", "wrap it in a list"),
                     id="fwd_hooks-single-pair"),
        pytest.param(run(fwd_hooks=NAME), TypeError, ("fwd_hooks must be a list of (name, fn) pairs", "str"),
                     id="fwd_hooks-a-name"),
        pytest.param(run(fwd_hooks=3), TypeError, ("fwd_hooks must be a list", "int"), id="fwd_hooks-int"),
        pytest.param(run(fwd_hooks=keep), TypeError, ("fwd_hooks must be a list", "function"),
                     id="fwd_hooks-a-function"),
        pytest.param(run(fwd_hooks=[(NAME, keep, "fwd")]), TypeError, ("fwd_hooks[0]", "not a (name, fn) pair"),
                     id="spec-of-three"),
        pytest.param(run(fwd_hooks=[keep]), TypeError, ("fwd_hooks[0]", "not a (name, fn) pair"),
                     id="spec-a-bare-function"),
        pytest.param(run(fwd_hooks=[(3, keep)]), TypeError, ("fwd_hooks[0]", "hook name must be a str", "int"),
                     id="spec-name-int"),
        pytest.param(run(fwd_hooks=[(NAME, None)]), TypeError, ("fwd_hooks[0]", "not callable", "NoneType"),
                     id="fn-none"),
        pytest.param(run(fwd_hooks=[(NAME, "zero")]), TypeError, ("not callable", "fn(tensor, hook)"),
                     id="fn-a-string"),
        pytest.param(run(fwd_hooks=[(NAME, lambda t, h: None)]), TypeError,
                     ("cannot be called as fn(tensor, hook=point)", "(t, h)", "named 'hook'"), id="fn-hook-misnamed"),
        pytest.param(run(fwd_hooks=[(NAME, lambda t: None)]), TypeError, ("cannot be called", "(t)"),
                     id="fn-one-parameter"),
        pytest.param(run(fwd_hooks=[(NAME, three_args)]), TypeError, ("three_args", "cannot be called"),
                     id="fn-three-parameters"),
        pytest.param(run(bwd_hooks=[(NAME, lambda g: None)]), TypeError, ("bwd_hooks[0]", "cannot be called"),
                     id="bwd-fn-one-parameter"),
        # a bad second spec: the first, valid one must not stay attached (even when hooks are kept globally)
        pytest.param(run(fwd_hooks=[(NAME, keep), (NAME, None)], reset_hooks_end=False), TypeError,
                     ("fwd_hooks[1]", "not callable"), id="second-spec-bad-nothing-attached"),
        pytest.param(run(fwd_hooks=[(NAME, keep)], bwd_hooks=[("vision.hook_embedd", keep)]), KeyError,
                     ("no hook point named", "vision.hook_embed"), id="bwd-name-misspelt"),
        pytest.param(run(fwd_hooks=[(lambda n: n.endswith("hook_nothing"), keep)]), ValueError,
                     ("matched no hook point",), id="predicate-matches-nothing"),
        pytest.param(run(fwd_hooks=[(lambda n: n.endswith, keep)]), TypeError,
                     ("must return True or False",), id="predicate-returns-a-method"),
        pytest.param(run(fwd_hooks=[(NAME, keep)], reset_hooks_end="no"), TypeError,
                     ("reset_hooks_end must be True or False", "'no'"), id="reset_hooks_end-str"),
        # names_filter
        pytest.param(cache(names_filter=3), TypeError, ("names_filter must be", "int"), id="names_filter-int"),
        pytest.param(cache(names_filter=[NAME, 3]), TypeError, ("names_filter holds int", "only hook names"),
                     id="names_filter-list-with-int"),
        pytest.param(cache(names_filter={NAME: True}), TypeError, ("names_filter must be", "dict"),
                     id="names_filter-dict"),
        pytest.param(cache(names_filter=[]), ValueError, ("empty list",), id="names_filter-empty"),
        pytest.param(cache(names_filter=lambda n: n.startswith), TypeError, ("names_filter returned",),
                     id="names_filter-predicate-returns-method"),
        pytest.param(cache(names_filter="vision.blocks.0.attn.hook_patern"), KeyError,
                     ("hook_patern", "vision.blocks.0.attn.hook_pattern"), id="names_filter-misspelt"),
        pytest.param(cache(names_filter=NAME, device="gpu0"), ValueError, ("device='gpu0'", "'cpu'"),
                     id="cache-device-unknown"),
        # add_hook, remove_hooks, hooks()
        pytest.param(model_call("add_hook", NAME, keep, "forward"), ValueError, ("'fwd'", "'bwd'", "'forward'"),
                     id="add_hook-dir-forward"),
        pytest.param(model_call("add_hook", NAME, lambda t, h: None), TypeError,
                     ("hook on 'vision.hook_embed'", "cannot be called"), id="add_hook-fn-misnamed"),
        pytest.param(model_call("add_hook", NAME, 0.5), TypeError, ("not callable", "float"),
                     id="add_hook-fn-float"),
        pytest.param(model_call("add_hook", 7, keep), TypeError, ("hook name must be a str", "int"),
                     id="add_hook-name-int"),
        pytest.param(model_call("add_hook", "lm.hook_embed", keep), KeyError, ("no hook point named 'lm.hook_embed'",),
                     id="add_hook-name-of-other-family"),
        pytest.param(point_call("add_hook", keep, "both"), ValueError, ("'fwd'", "'bwd'"), id="point-dir-both"),
        pytest.param(point_call("remove_hooks", "all"), ValueError, ("'both'", "'all'"), id="remove_hooks-dir"),
        pytest.param(hooks_block(fwd_hooks={NAME: keep}), TypeError, ("fwd_hooks is a dict",),
                     id="hooks-block-dict"),
        pytest.param(model_call("generate", family="llava", fwd_hooks={"lm.hook_embed": keep}), TypeError,
                     ("fwd_hooks is a dict",), id="generate-fwd_hooks-dict"),
        pytest.param(run(family="instructblip-t5", fwd_hooks=[("qformer.hook_query_tokens", lambda t, *, h: None)]),
                     TypeError, ("cannot be called",), id="fn-keyword-only-misnamed"),
    ]


@pytest.mark.parametrize("call,error,words", rows())
def test_bad_hook_use(families, call, error, words):
    expect_error(lambda: call(families), error, *words)


def test_hook_returning_wrong_things_is_named(families):
    fam = families["blip"]
    with torch.no_grad():
        expect_error(lambda: fam.model.run_with_hooks(**fam.inputs, fwd_hooks=[(NAME, lambda t, hook: [t])]),
                     TypeError, "hook on 'vision.hook_embed' returned list", "return a Tensor or None")
        expect_error(lambda: fam.model.run_with_hooks(**fam.inputs, fwd_hooks=[(NAME, lambda t, hook: t[:, :1])]),
                     ValueError, "vision.hook_embed", "same shape and dtype")


def test_incl_bwd_without_gradients(families):
    fam = families["blip"]
    with torch.no_grad():
        expect_error(lambda: fam.model.run_with_cache(**fam.inputs, names_filter=NAME, incl_bwd=True),
                     RuntimeError, "incl_bwd=True", "torch.no_grad()")


def test_standalone_hook_point_checks_its_hooks():
    point = HookPoint()
    expect_error(lambda: point.add_hook(lambda x: x), TypeError, "cannot be called as fn(tensor, hook=point)")
    assert not point.has_hooks
