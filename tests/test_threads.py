"""Thread isolation: hooks added for a call (run_with_hooks, run_with_cache, hooks(), generate(fwd_hooks=...)) and
per-call state (resume, recorded tower outputs) belong to the thread that made the call, while other
threads call the same model at the same time; permanent and global hooks stay visible to every thread.

Every test makes the calls overlap for sure: a hook waits, inside the forward, until the other threads are inside
theirs (a barrier) or done (an event). Each concurrent result must equal the same call run alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hooked_vlm import HookedVLM, interventions, metrics, patching
from hooked_vlm.tiny import build_llava, random_image

WAIT = 30.0  # seconds; a thread that never arrives fails the test instead of hanging it
PROMPTS = ["USER: <image>\nwhat is in the picture? ASSISTANT:",
           "USER: <image>\nwhat colour is the large object on the left of the picture, and why? ASSISTANT:"]


@pytest.fixture(scope="module")
def llava():
    hf, processor = build_llava(seed=7)
    model = HookedVLM.from_hf(hf, processor=processor)
    short, long = (dict(processor(images=random_image(seed=s), text=p, return_tensors="pt"))
                   for s, p in zip((0, 1), PROMPTS))
    assert short["input_ids"].shape[1] != long["input_ids"].shape[1]
    return model, short, long


def run_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread, all at once; their results in order (an exception in one is re-raised)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * WAIT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def meeting(n: int):
    """A hook (returning None: it changes nothing) that holds each thread at its first call until `n` threads are
    inside a forward; later calls pass."""
    barrier, arrived = threading.Barrier(n, timeout=WAIT), set()

    def meet(tensor: torch.Tensor, hook: Any) -> None:
        if threading.get_ident() not in arrived:
            arrived.add(threading.get_ident())
            barrier.wait()

    return meet


def assert_same_cache(cache, alone) -> None:
    assert cache.keys() == alone.keys()
    for name in alone.keys():
        torch.testing.assert_close(cache[name], alone[name], msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(cache.positions.input_ids, alone.positions.input_ids)
    assert cache.tower_outputs.keys() == alone.tower_outputs.keys()
    for name, out in alone.tower_outputs.items():
        torch.testing.assert_close(cache.tower_outputs[name], out)


MLP_OUT = lambda name: name.endswith("hook_mlp_out")  # noqa: E731


def zero(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
    return torch.zeros_like(tensor)


@torch.no_grad()
def test_plain_forward_is_unhooked_while_another_thread_is_inside_run_with_hooks(llava):
    model, short, _ = llava
    clean = model(**short)
    ablated = model.run_with_hooks(**short, fwd_hooks=[(MLP_OUT, zero)])
    assert not torch.allclose(clean, ablated)
    inside, done = threading.Event(), threading.Event()
    owner: list[int] = []

    def hold(tensor: torch.Tensor, hook: Any) -> None:
        # only in the thread that added it: stay inside run_with_hooks until the plain forward is done
        if threading.get_ident() == owner[0]:
            inside.set()
            done.wait(WAIT)

    def hooked() -> torch.Tensor:
        owner.append(threading.get_ident())
        return model.run_with_hooks(**short, fwd_hooks=[("lm.blocks.0.hook_resid_pre", hold), (MLP_OUT, zero)])

    def plain() -> torch.Tensor:
        try:
            assert inside.wait(WAIT), "the hooked thread never entered its forward"
            return model(**short)
        finally:
            done.set()

    got_hooked, got_plain = run_threads(hooked, plain)
    torch.testing.assert_close(got_plain, clean)
    torch.testing.assert_close(got_hooked, ablated)


@torch.no_grad()
def test_caches_of_prompts_of_different_lengths_in_two_threads(llava):
    model, short, long = llava
    alone = [model.run_with_cache(**x, tower_outputs=True) for x in (short, long)]
    meet = meeting(2)

    def cached(inputs: dict) -> tuple:
        # both threads meet inside the language model: each has set its positions and recorded its vision output
        with model.hooks([("lm.blocks.0.hook_resid_pre", meet)]):
            return model.run_with_cache(**inputs, tower_outputs=True)

    for (out, cache), (out_alone, cache_alone) in zip(run_threads(lambda: cached(short), lambda: cached(long)), alone):
        torch.testing.assert_close(out, out_alone)
        assert_same_cache(cache, cache_alone)


@torch.no_grad()
def test_resume_in_one_thread_leaves_another_threads_forward_whole(llava):
    """`resume` (start the LM at block 1 from a given stream, the vision tower's output given) is per thread."""
    model, short, long = llava
    _, cache = model.run_with_cache(**long, tower_outputs=True)
    clean = model(**short)
    with model.resume("lm", 1, cache["lm.blocks.1.hook_resid_pre"], given={"vision": cache.tower_outputs["vision"]}):
        resumed = model(**long)
    torch.testing.assert_close(resumed, model(**long))  # resuming from a run's own stream gives that run back
    inside, done = threading.Event(), threading.Event()

    def resuming() -> torch.Tensor:
        def hold(tensor: torch.Tensor, hook: Any) -> None:
            inside.set()
            done.wait(WAIT)

        with model.resume("lm", 1, cache["lm.blocks.1.hook_resid_pre"],
                          given={"vision": cache.tower_outputs["vision"]}):
            return model.run_with_hooks(**long, fwd_hooks=[("lm.blocks.1.hook_resid_pre", hold)])

    def plain() -> tuple:
        try:
            assert inside.wait(WAIT), "the resuming thread never entered its forward"
            return model.run_with_cache(**short, names_filter="vision.hook_embed", tower_outputs=True)
        finally:
            done.set()

    got_resumed, (got_plain, plain_cache) = run_threads(resuming, plain)
    torch.testing.assert_close(got_resumed, resumed)
    torch.testing.assert_close(got_plain, clean)
    assert set(plain_cache.tower_outputs) == set(model.towers())  # nothing given here: every tower ran


@torch.no_grad()
def test_generate_patching_and_caches_at_once(llava):
    """Four threads on one model: generation with a knockout (reads the tower's per-step position offset), a
    head-patching sweep (resume-based), an ablated forward and a cache, each equal to the same call alone."""
    model, short, long = llava
    corrupt = dict(model.processor(images=random_image(seed=5), text=PROMPTS[0], return_tensors="pt"))
    T = short["input_ids"].shape[1]
    knockout = interventions.attention_knockout(model, [T, T + 1, T + 2], [T - 1], layers=[0, 1])
    metric = metrics.logit_diff(5, 9)

    def generate(meet=None) -> torch.Tensor:
        extra = [("lm.hook_embed", meet)] if meet else []
        return model.generate(**short, max_new_tokens=4, fwd_hooks=knockout + extra)

    def sweep(meet=None) -> torch.Tensor:
        with model.hooks([("lm.hook_embed", meet)] if meet else []):
            return patching.patch_heads(model, short, corrupt, metric, tower="lm", progress=False)

    def ablated(meet=None) -> torch.Tensor:
        return model.run_with_hooks(**long, fwd_hooks=[(MLP_OUT, zero)] + ([("lm.hook_embed", meet)] if meet else []))

    def cached(meet=None) -> tuple:
        with model.hooks([("lm.hook_embed", meet)] if meet else []):
            return model.run_with_cache(**long, names_filter=lambda n: n.startswith("lm."), tower_outputs=True)

    calls = (generate, sweep, ablated, cached)
    alone = [call() for call in calls]
    meet = meeting(len(calls))
    together = run_threads(*(lambda c=call: c(meet) for call in calls))
    assert torch.equal(together[0], alone[0])
    torch.testing.assert_close(together[1], alone[1], equal_nan=True)
    torch.testing.assert_close(together[2], alone[2])
    torch.testing.assert_close(together[3][0], alone[3][0])
    assert_same_cache(together[3][1], alone[3][1])


@torch.no_grad()
def test_global_and_permanent_hooks_reach_every_thread(llava):
    """TransformerLens semantics kept: `add_hook` outside a block and permanent hooks are seen by all threads;
    reset_hooks in one thread leaves another thread's scoped hooks alone."""
    model, short, _ = llava
    ablated = model.run_with_hooks(**short, fwd_hooks=[(MLP_OUT, zero)])
    model.add_hook(MLP_OUT, zero)
    try:
        (got,) = run_threads(lambda: model(**short))
        torch.testing.assert_close(got, ablated)
    finally:
        model.reset_hooks()
    # reset_hooks_end=False attaches globally (as documented): the other thread sees them too, until reset
    model.run_with_hooks(**short, fwd_hooks=[(MLP_OUT, zero)], reset_hooks_end=False)
    try:
        (got,) = run_threads(lambda: model(**short))
        torch.testing.assert_close(got, ablated)
    finally:
        model.reset_hooks()
    torch.testing.assert_close(model(**short), model.run_with_hooks(**short, fwd_hooks=[]))

    inside, reset = threading.Event(), threading.Event()

    def scoped() -> torch.Tensor:
        def hold(tensor: torch.Tensor, hook: Any) -> None:
            inside.set()
            reset.wait(WAIT)

        return model.run_with_hooks(**short, fwd_hooks=[("lm.hook_embed", hold), (MLP_OUT, zero)])

    def resetter() -> None:
        try:
            assert inside.wait(WAIT)
            model.reset_hooks()
        finally:
            reset.set()

    got, _ = run_threads(scoped, resetter)
    torch.testing.assert_close(got, ablated)


@torch.no_grad()
def test_generation_step_offsets_are_per_thread(llava):
    """While one thread generates, another's forward (whose offset is 0) must not move the first thread's
    `position_offset`, which position-addressed hooks such as attention knockout read at every step."""
    model, short, long = llava
    T = short["input_ids"].shape[1]
    inside, done = threading.Event(), threading.Event()
    seen: list[int] = []

    def hold_at_first_step(tensor: torch.Tensor, hook: Any) -> None:
        if len(seen) == 1:  # the first new token's forward: let the other thread run a whole forward now
            inside.set()
            done.wait(WAIT)

    def record(tensor: torch.Tensor, hook: Any) -> None:
        seen.append(model.lm.position_offset)

    hooks = [("lm.blocks.0.hook_resid_pre", hold_at_first_step), ("lm.blocks.1.hook_resid_pre", record)]

    def plain() -> torch.Tensor:
        try:
            assert inside.wait(WAIT), "the generating thread never reached its first step"
            return model(**long)
        finally:
            done.set()

    tokens, _ = run_threads(lambda: model.generate(**short, max_new_tokens=3, fwd_hooks=hooks), plain)
    assert seen == [0, T, T + 1]
    assert model.lm.position_offset == 0  # this thread's own value: it ran no forward here
