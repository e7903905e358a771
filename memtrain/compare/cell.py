"""One cell of a comparison: one strategy combination at one size, in its own process.

The cell trains the fit's step (:class:`memtrain.memory.step.TrainStep`) on phantom
radiographs for one warm-up step (left out) and ``steps`` measured ones, with every
memory backend of the device, and returns a JSON-able dict. Failures are results, not
crashes: an out-of-memory error becomes ``status="oom"`` with the phase it happened in
(``setup`` before the first step), a combination the plan rejects ``rejected``, any
other exception ``error`` with its first line.
"""

from __future__ import annotations

import resource
import statistics
import time
import traceback
import warnings

import torch

from memtrain.compare.environment import device_environment
from memtrain.config import ModelConfig
from memtrain.data.datasets import PhantomDataset
from memtrain.errors import MemtrainError
from memtrain.memory.allocator import fix_mmap_threshold
from memtrain.memory.step import TrainStep
from memtrain.memory.tracker import MemoryTracker
from memtrain.strategies import Environment, Plan

WARMUP_STEPS = 1


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's 'can't allocate memory'."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text or "out of memory" in text.lower())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:300]}" if text else exc.__class__.__name__


def _limit_address_space(extra: int) -> None:
    """CPU stand-in for a device budget: the process may map only ``extra`` bytes more than it has now."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, hard))


def run_cell(spec: dict) -> dict:
    """Run the cell described by ``spec`` (strategies, size, batch_size, encoder, loss, steps, device, lr, cpu_memory_limit)."""
    result: dict = {"strategies": spec["strategies"], "size": spec["size"], "batch_size": spec["batch_size"], "status": "ok", "phase": "", "reason": ""}
    tracker = None
    try:
        env = Environment.detect(spec.get("device", "auto"))
        if env.device == "cpu":
            fix_mmap_threshold()  # a measurement: the same resident memory from run to run (memtrain.memory.allocator)
        result["device"] = env.device
        result["environment"] = device_environment(env.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = Plan.resolve(spec["strategies"], env)
        result["plan"] = plan.label
        result["warnings"] = sorted({" ".join(str(w.message).split()) for w in caught})
        device = torch.device("cuda", torch.cuda.current_device()) if env.device == "cuda" else torch.device("cpu")
        # Up to 4 distinct phantoms, repeated to the batch size (memory does not depend on pixel values).
        pairs = [PhantomDataset(seed=0, first=i, count=1, size=spec["size"])[0] for i in range(min(4, spec["batch_size"]))]
        xs, ys = zip(*(pairs[i % len(pairs)] for i in range(spec["batch_size"])))
        if spec.get("cpu_memory_limit") and device.type == "cpu":
            _limit_address_space(int(spec["cpu_memory_limit"]))
        tracker = MemoryTracker(device)
        result["backends"] = tracker.backend_names
        with plan.session():
            torch.manual_seed(0)
            train = TrainStep(
                plan, model_cfg=ModelConfig(encoder=spec.get("encoder", "resnet34")), loss=spec.get("loss", "msssim"), device=device, lr=spec.get("lr", 1e-3)
            )
            x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
            times, losses = [], []
            for step in range(WARMUP_STEPS + spec["steps"]):
                t0 = time.perf_counter()
                loss = train(tracker, x, y, step=step)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
                losses.append(float(loss))
        measured = times[WARMUP_STEPS:]
        result["step_time_s"] = statistics.median(measured)
        result["step_times_s"] = measured
        result["loss"] = losses[-1]
        result["phases"] = tracker.summary(WARMUP_STEPS)
        result["blocks"] = tracker.block_summary(WARMUP_STEPS)
    except MemtrainError as e:
        result["status"], result["reason"] = "rejected", str(e)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        if is_oom(e):
            result["status"] = "oom"
            result["phase"] = (tracker.last_phase if tracker is not None else None) or "setup"
            result["reason"] = _first_line(e)
        else:
            result["status"], result["reason"] = "error", _first_line(e)
            result["traceback"] = traceback.format_exc()[-4000:]
        if tracker is not None and tracker.records:
            result["phases"] = tracker.summary(0)
    finally:
        if tracker is not None:
            tracker.close()
            result["notes"] = tracker.notes
    return result
