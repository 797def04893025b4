"""Sweeps over streamed data sets, written example by example to a result store that a killed run resumes from:
a rerun gives the uninterrupted run's result, bit for bit, without building or sweeping the stored examples."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from hooked_vlm import HookedVLM, distributed, metrics, patching
from hooked_vlm.patching import results as results_module
from hooked_vlm.result_store import ResultStore
from hooked_vlm.tiny import build_llava, random_image

HERE = Path(__file__).resolve().parent
PROMPTS = ["USER: <image>\nwhat? ASSISTANT:", "USER: <image>\nwhat colour is it today? ASSISTANT:"]
IDS = ["q0", "q1", "q2", "q3"]
ANSWERS = ["red", torch.tensor([3, 4]), None, 7]  # a tensor answer is stored as a tensor
SETTINGS = {"tower": "lm", "hook": "resid_post"}


def build_model() -> HookedVLM:
    hf, processor = build_llava(seed=4)
    return HookedVLM.from_hf(hf, processor=processor)


def build_example(model: HookedVLM, i: int) -> tuple:
    clean, corrupt = (model.processor(images=random_image(seed=2 * i + k), text=PROMPTS[i % 2], return_tensors="pt")
                      for k in range(2))
    return clean, corrupt, metrics.logit_diff(7, 9)


class LazyExamples(Sequence):
    """A data set whose examples are built when indexed, noting which were."""

    def __init__(self, model: HookedVLM, n: int = 4):
        self.model, self.n, self.built = model, n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.built.append(i)
        return build_example(self.model, i)


def killed_run(out: str, stored: int, threads: int) -> None:
    """Sweep into `out`, SIGKILLing this process half way through writing the entry after the first `stored`."""
    torch.set_num_threads(threads)  # as many as the test's process: the same sums in the same order, bit for bit
    model = build_model()
    real_open, writes = builtins.open, []

    def open_then_die(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" not in mode or ".safetensors" not in os.fspath(path):
            return f
        writes.append(path)
        if len(writes) <= stored:
            return f
        write = f.write

        def write_half(data):
            write(bytes(data)[:len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        f.write = write_half
        return f

    builtins.open = open_then_die
    examples = (build_example(model, i) for i in range(4))  # a generator: examples built as the sweep asks
    patching.sweep_results(patching.patch_resid, model, examples, ids=IDS, answers=ANSWERS, out=out, progress=False,
                           **SETTINGS)


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def uninterrupted(model):
    return patching.sweep_results(patching.patch_resid, model, [build_example(model, i) for i in range(4)], ids=IDS,
                                  answers=ANSWERS, progress=False, **SETTINGS)


def assert_same_results(a: patching.SweepResults, b: patching.SweepResults) -> None:
    assert (a.sweep, a.settings, a.ids, a.tokens, a.corruption) == (b.sweep, b.settings, b.ids, b.tokens, b.corruption)
    assert all(torch.equal(x, y) for x, y in zip(a.values, b.values, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.cell_positions, b.cell_positions, strict=True))
    for x, y in zip(a.answers, b.answers, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    for p, q in zip(a.positions, b.positions, strict=True):
        assert torch.equal(p.input_ids, q.input_ids) and torch.equal(p.attention_mask, q.attention_mask)
        assert [[(s.start, s.stop, s.rows.tolist(), s.cols.tolist()) for s in spans] for spans in p.image] == \
               [[(s.start, s.stop, s.rows.tolist(), s.cols.tolist()) for s in spans] for spans in q.image]
        assert p.towers.keys() == q.towers.keys()


def test_a_killed_run_resumes_to_the_uninterrupted_result(model, uninterrupted, tmp_path):
    out = tmp_path / "store"
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_result_store as t; t.killed_run({str(out)!r}, 2, "
    code += f"{torch.get_num_threads()})"
    env = {**os.environ, "HOOKED_VLM_TYPECHECK": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    partial = [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert len(ResultStore(out)) == 2 and len(partial) == 1  # the half-written entry is not one of them
    assert patching.SweepResults.load(out).ids == IDS[:2]

    examples = LazyExamples(model)
    resumed = patching.sweep_results(patching.patch_resid, model, examples, ids=IDS, answers=ANSWERS, out=out,
                                     progress=False, **SETTINGS)
    assert examples.built == [2, 3]  # the stored examples are neither swept nor built
    assert_same_results(resumed, uninterrupted)
    assert_same_results(patching.SweepResults.load(out), uninterrupted)
    assert (out / partial[0]).exists()  # never deleted
    assert resumed.aligned("last").values.shape[:2] == (4, model.tower_info("lm").n_layers)


def test_streamed_examples_and_progress(model, uninterrupted, tmp_path, monkeypatch):
    totals, real = [], results_module.progress_bar

    def progress(total, enabled, desc):
        totals.append((total, desc))
        return real(total, False, desc)

    monkeypatch.setattr(results_module, "progress_bar", progress)
    generator = (build_example(model, i) for i in range(4))
    stacked = patching.sweep_dataset(patching.patch_resid, model, generator, out=tmp_path / "s", **SETTINGS)
    torch.testing.assert_close(stacked, uninterrupted.stacked(), equal_nan=True, atol=0, rtol=0)
    lazy = LazyExamples(model)
    again = patching.sweep_dataset(patching.patch_resid, model, lazy, out=tmp_path / "s", batch_size=5, **SETTINGS)
    assert lazy.built == []  # ids are the indices: all four found without building one; batch_size may change
    torch.testing.assert_close(again, stacked, equal_nan=True, atol=0, rtol=0)
    assert totals == [(None, "patch_resid"), (4, "patch_resid over 4 examples")]
    stored = patching.SweepResults.load(tmp_path / "s")
    assert stored.ids == [0, 1, 2, 3] and stored.answers == [None] * 4 and stored.tokens == uninterrupted.tokens


@pytest.mark.no_typecheck  # the errors a user sees, not the type checker's
def test_a_store_refuses_another_sweep_settings_model_or_folder(model, tmp_path):
    out = tmp_path / "store"
    one = [build_example(model, 0)]
    patching.sweep_dataset(patching.patch_resid, model, one, out=out, progress=False, **SETTINGS)
    with pytest.raises(ValueError, match="made with settings"):
        patching.sweep_dataset(patching.patch_resid, model, one, out=out, progress=False, tower="lm")
    with pytest.raises(ValueError, match="made with sweep"):
        patching.sweep_dataset(patching.patch_heads, model, one, out=out, progress=False, tower="lm")
    hf, processor = build_llava(seed=5)
    with pytest.raises(ValueError, match="made with model"):
        patching.sweep_dataset(patching.patch_resid, HookedVLM.from_hf(hf, processor=processor), one, out=out,
                               progress=False, **SETTINGS)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        patching.sweep_dataset(patching.patch_resid, model, one, out=mine, progress=False, **SETTINGS)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(NotADirectoryError, match="is a file"):
        patching.sweep_dataset(patching.patch_resid, model, one, out=mine / "notes.txt", progress=False, **SETTINGS)
    two = [build_example(model, 0), build_example(model, 1)]
    with pytest.raises(ValueError, match="'a' twice"):
        patching.sweep_results(patching.patch_resid, model, two, ids=["a", "a"], out=tmp_path / "d", **SETTINGS)
    with pytest.raises(TypeError, match="str or int"):
        patching.sweep_results(patching.patch_resid, model, two, ids=[1.5, 2.5], out=tmp_path / "d", **SETTINGS)
    with pytest.raises(ValueError, match="ids has 2 entries but the examples go on"):
        patching.sweep_results(patching.patch_resid, model, iter(two + two[:1]), ids=["a", "b"], progress=False,
                               **SETTINGS)
    with pytest.raises(ValueError, match="no examples"):
        patching.sweep_dataset(patching.patch_resid, model, iter([]), progress=False, **SETTINGS)


def test_a_damaged_entry_is_an_error_naming_it(model, tmp_path):
    out = tmp_path / "store"
    patching.sweep_dataset(patching.patch_resid, model, [build_example(model, 0)], out=out, progress=False, **SETTINGS)
    (entry,) = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    entry.write_bytes(entry.read_bytes()[:-40])  # cut short, as a write the store did not make atomically would be
    with pytest.raises(ValueError, match=entry.name):
        patching.SweepResults.load(out)


def distributed_run(out: str, saved: str) -> None:
    """One torchrun process: resume the store `out` sharded over the group; note what this rank built."""
    distributed.setup()
    torch.set_num_threads(2)  # as in the test's process (conftest), so the sums are the same bit for bit
    model, rank = build_model(), distributed.rank()
    examples = LazyExamples(model)
    results = patching.sweep_results(patching.patch_resid, model, examples, out=out, distributed=True,
                                      progress=False, **SETTINGS)
    torch.save({"built": examples.built, "results": results}, f"{saved}.{rank}")


@pytest.mark.slow  # two torchrun processes: about a minute on two busy cores
def test_distributed_processes_resume_their_own_examples(model, uninterrupted, tmp_path):
    out = tmp_path / "store"
    first_two = (build_example(model, i) for i in range(2))  # a run that stopped after two examples
    patching.sweep_results(patching.patch_resid, model, first_two, out=out, progress=False, **SETTINGS)
    script = tmp_path / "run.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_result_store as t\n"
                      f"t.distributed_run({str(out)!r}, {str(tmp_path / 'saved')!r})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOOKED_VLM_TYPECHECK": "0"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    zero, one = (torch.load(tmp_path / f"saved.{rank}", weights_only=False) for rank in (0, 1))
    assert (zero["built"], one["built"]) == ([2], [3])  # rank r takes examples r, r + 2; 0 and 1 were stored
    assert one["results"] is None
    resumed = zero["results"]
    assert resumed.ids == [0, 1, 2, 3]
    assert all(torch.equal(x, y) for x, y in zip(resumed.values, uninterrupted.values, strict=True))
    assert resumed.tokens == uninterrupted.tokens and len(ResultStore(out)) == 4
