"""Measure the headroom model on a CUDA GPU: real steps against their fake-tensor estimates (`memtrain calibrate`).

For each plan family and small size, one real training step (after a warm-up) runs with the
``tensor``, ``cuda`` and ``nvml`` backends, and its estimate is made the way `memtrain plan`
makes it. Per run and phase: the estimate ``E``, the allocator's allocated, active and
reserved peaks, and NVML's device-used peak. The model (:class:`HeadroomModel`) takes

* ``workspace_phase`` = the largest ``(alloc_peak − E) / pixels`` (allocations that are not
  tensors of the step, e.g. cuDNN workspaces, grow with the image);
* ``fraction`` = the largest ``(reserved_peak − alloc_peak) / alloc_peak`` (the caching
  allocator's rounding and fragmentation);
* ``fixed`` = the largest ``nvml_used_peak − reserved_peak`` (CUDA context, cuBLAS/cuDNN
  handles: memory the allocator never sees), or 1 GiB where NVML is missing;

and checks that ``needed`` bounds every run's reserved and NVML peaks.
"""

from __future__ import annotations

import gc
import math

import torch

from memtrain.memory.estimate import measure_step
from memtrain.memory.headroom import PHASE_NAMES, HeadroomModel
from memtrain.memory.planner import estimate_memory
from memtrain.memory.tracker import MIB
from memtrain.strategies import Environment

DEFAULT_STRATEGIES = ("none", "amp", "checkpoint:full", "amp,checkpoint:blocks", "amp,checkpoint:full")
DEFAULT_SIZES = (256, 384, 512)


def measure(combos, sizes, *, batch_size: int = 1, encoder: str = "resnet34", steps: int = 2, progress=None) -> list[dict]:
    """One row per (combination, size): the estimate and the measured peaks per phase (bytes)."""
    env = Environment.detect("cuda")
    rows = []
    for combo in combos:
        for size in sizes:
            estimate, how = estimate_memory(combo, size=size, batch_size=batch_size, encoder=encoder, env=env)
            gc.collect()
            torch.cuda.empty_cache()
            real = measure_step(combo, size=size, batch_size=batch_size, encoder=encoder, fake=False, steps=steps, env=env, blocks=False)
            row = {"strategies": combo, "size": size, "batch_size": batch_size, "estimate_how": how, "phases": {}}
            for p in PHASE_NAMES:
                m = real.phases.get(p, {})
                row["phases"][p] = {
                    "estimate": estimate.peak(p),
                    **{k: m[k] for k in ("tensor_peak", "alloc_peak", "active_peak", "reserved_peak", "nvml_used_peak") if k in m},
                }
            rows.append(row)
            if progress is not None:
                step = max(row["phases"].values(), key=lambda v: v.get("reserved_peak", 0))
                progress(f"{combo} at {size}: estimate {step['estimate'] / MIB:,.0f} MiB, reserved {step.get('reserved_peak', 0) / MIB:,.0f} MiB")
    return rows


def fit(rows: list[dict], *, source: str) -> tuple[HeadroomModel, list[str]]:
    """The headroom model from :func:`measure`'s rows, and notes (what was missing, whether it bounds every run)."""
    notes = []
    workspace = dict.fromkeys(PHASE_NAMES, 0.0)
    fraction, fixed, have_nvml = 0.0, 0, False
    for r in rows:
        pixels = r["batch_size"] * r["size"] ** 2
        for p, m in r["phases"].items():
            if "alloc_peak" in m:
                workspace[p] = max(workspace[p], (m["alloc_peak"] - m["estimate"]) / pixels)
                fraction = max(fraction, (m["reserved_peak"] - m["alloc_peak"]) / max(1, m["alloc_peak"]))
            if "nvml_used_peak" in m:
                have_nvml = True
                fixed = max(fixed, m["nvml_used_peak"] - m["reserved_peak"])
    if not have_nvml:
        fixed = 2**30
        notes.append("NVML unavailable: the fixed part stays 1 GiB (not measured)")
    model = HeadroomModel(
        device="cuda", fraction=round(fraction, 4), fixed=int(fixed), workspace={p: math.ceil(v) for p, v in workspace.items()}, source=source
    )
    misses = []
    for r in rows:
        pixels = r["batch_size"] * r["size"] ** 2
        bound = max(m["estimate"] + math.ceil(model.workspace[p] * pixels) for p, m in r["phases"].items())
        needed = model.needed_for(bound)
        real = max(max(m.get("reserved_peak", 0), m.get("nvml_used_peak", 0)) for m in r["phases"].values())
        if needed < real:
            misses.append(f"{r['strategies']} at {r['size']}: needed {needed / MIB:,.0f} MiB < measured {real / MIB:,.0f} MiB")
    notes.append("the model bounds every run's reserved and NVML peaks" if not misses else "does NOT bound: " + "; ".join(misses))
    return model, notes


def markdown(rows: list[dict], model: HeadroomModel, notes: list[str], header: str) -> str:
    lines = [header, "", f"model: {model.describe()}", *(f"- {n}" for n in notes), ""]
    lines.append("| strategies | size | phase | estimate MiB | tensor MiB | alloc MiB | active MiB | reserved MiB | NVML used MiB |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for p, m in r["phases"].items():
            cells = [
                f"{m[k] / MIB:,.1f}" if k in m else "-" for k in ("estimate", "tensor_peak", "alloc_peak", "active_peak", "reserved_peak", "nvml_used_peak")
            ]
            lines.append(f"| {r['strategies']} | {r['size']} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
