"""Sweeps and dataset means sharded over two gloo processes (torchrun) equal one process's."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hooked_vlm import analysis, distributed, metrics, patching
from hooked_vlm.models.base import HookedVLM
from hooked_vlm.tiny import build_llava, random_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow  # ~8 s on 2 cores: three fresh interpreters (torchrun and its two workers)
def test_two_processes_equal_one(tmp_path, monkeypatch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(EXAMPLES / "distributed_sweep.py"), "--pairs", "5", "--out", str(tmp_path / "two"),
                          "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "5 pairs on 2 process(es)" in run.stdout

    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module("distributed_sweep")
    assert example.main(["--pairs", "5", "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    sys.modules.pop("distributed_sweep", None)
    one, two = (torch.load(tmp_path / name / "scores.pt") for name in ("one", "two"))
    assert one["heads"].shape[0] == 5
    assert torch.equal(one["heads"], two["heads"])  # each pair swept alone, in order: bit for bit
    torch.testing.assert_close(two["mean_image_token"], one["mean_image_token"], atol=1e-7, rtol=0)


def test_sweep_dataset_stacks_the_single_sweeps():
    hf, processor = build_llava(seed=4)
    model = HookedVLM.from_hf(hf, processor=processor)
    prompts = ["USER: <image>\nwhat? ASSISTANT:", "USER: <image>\ncolour? ASSISTANT:"]
    examples = []
    for i, prompt in enumerate(prompts):
        clean, corrupt = (processor(images=random_image(seed=2 * i + k), text=prompt, return_tensors="pt")
                          for k in range(2))
        examples.append((clean, corrupt, metrics.logit_diff(7, 9)))
    stacked = patching.sweep_dataset(patching.patch_resid, model, examples, tower="lm", progress=False)
    for i, example in enumerate(examples):  # prompts of different lengths: the shorter one padded with NaN
        single = patching.patch_resid(model, *example, tower="lm", progress=False)
        assert torch.equal(stacked[i, :, :single.shape[1]], single)
        assert stacked[i, :, single.shape[1]:].isnan().all()
    assert stacked.shape[-1] > min(e[0]["input_ids"].shape[1] for e in examples)
    with pytest.raises(RuntimeError, match="torchrun"):
        patching.sweep_dataset(patching.patch_resid, model, examples, tower="lm", distributed=True)
    with pytest.raises(RuntimeError, match="torchrun"):
        analysis.mean_activation(model, [examples[0][0]], ["projector.hook_out"], distributed=True)
    assert distributed.world_size() == 1 and list(distributed.shard(3)) == [0, 1, 2]
