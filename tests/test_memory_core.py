"""Tensor-byte counting and per-phase tracking (the core of the memory tracker)."""

from __future__ import annotations

import torch
from conftest import phantom_batch, small_unet
from torch._subclasses.fake_tensor import FakeTensorMode

from memtrain.loss import MSSSIMLoss
from memtrain.memory import LiveTensorBytes, MemoryTracker, TensorBytesMode


def test_counts_storages_once_and_releases_them():
    counter = LiveTensorBytes()
    with TensorBytesMode(counter):
        a = torch.empty(1000, dtype=torch.float32)
        assert counter.current == 4000
        view = a[10:20]  # a view shares the storage
        a.add_(1)  # in place: no new storage
        assert counter.current == 4000
        b = a * 2
        assert counter.current == 8000
        del b
        assert counter.current == 4000
    assert counter.peak == 8000
    del a, view
    assert counter.current == 0


def test_counts_fake_tensors_without_allocating():
    counter = LiveTensorBytes()
    with FakeTensorMode(), TensorBytesMode(counter):
        x = torch.empty(4096, 4096)  # 64 MiB that never exist
        y = x + 1
        assert counter.current == 2 * 4096 * 4096 * 4
        del x, y
    assert counter.peak == 2 * 4096 * 4096 * 4


def test_phases_of_a_real_training_step():
    model = small_unet()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = phantom_batch(64)
    tracker = MemoryTracker("cpu")
    for step in range(2):
        with tracker.step(model, opt, (x, y), step=step):
            with tracker.phase("forward"):
                loss = MSSSIMLoss()(model(x), y)
            with tracker.phase("backward"):
                loss.backward()
                del loss
            with tracker.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    assert [(r.step, r.phase) for r in tracker.records] == [(s, p) for s in range(2) for p in ("forward", "backward", "optimizer")]
    params = sum(p.numel() * 4 for p in model.parameters())
    fwd0, bwd0, opt0 = tracker.records[:3]
    # The forward holds the parameters plus saved activations.
    assert fwd0.metrics["tensor_peak"] > params
    assert fwd0.metrics["tensor_increase"] > 0
    # Backward creates one gradient per parameter; the first optimizer step adds Adam's two moments.
    assert bwd0.metrics["tensor_increase"] >= params
    assert opt0.metrics["tensor_increase"] >= 3 * params
    summary = tracker.summary(skip_steps=1)
    assert set(summary) == {"forward", "backward", "optimizer"}
    assert summary["forward"]["tensor_peak"] == tracker.records[3].metrics["tensor_peak"]


def test_fake_tensor_estimate_equals_the_real_step():
    from memtrain.memory.estimate import measure_step

    real = measure_step("none", size=96, encoder="resnet18", fake=False)
    fake = measure_step("none", size=96, encoder="resnet18", fake=True)
    for phase in ("forward", "backward", "optimizer"):
        assert abs(fake.peak(phase) - real.peak(phase)) <= 0.02 * real.peak(phase), phase
    assert real.step_peak == max(real.peak(p) for p in ("forward", "backward", "optimizer"))
