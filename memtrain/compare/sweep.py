"""A comparison sweep: every (strategy combination, size) cell in a fresh subprocess.

A fresh process per cell means one cell's allocator cache, fragmentation, CUDA context
state or out-of-memory error cannot touch the next. The parent never initialises CUDA
(it would hold a context on the GPU the cells measure). A cell that runs past
``cell_timeout`` is killed and recorded as ``error``; a cell killed by SIGKILL that
memtrain did not kill (the kernel's OOM killer) as ``oom``. The outputs are rewritten
after every cell, so an interrupted sweep keeps the cells it finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import memtrain
from memtrain.compare.environment import host_environment
from memtrain.compare.report import finalize, write_outputs
from memtrain.compare.torchrun import is_distributed, needs_launcher, run_torchrun_cell
from memtrain.config import check_size
from memtrain.errors import ConfigError, MemtrainError
from memtrain.strategies import Environment, Plan, Stage

DEFAULT_CELL_TIMEOUT_S = 1800


@dataclass
class Sweep:
    """What to compare and how."""

    combos: list[str]
    sizes: list[int]
    out: Path
    steps: int = 3
    batch_size: int = 1
    encoder: str = "resnet34"
    loss: str = "msssim"
    device: str = "auto"
    lr: float = 1e-3
    cell_timeout: float = DEFAULT_CELL_TIMEOUT_S
    cpu_memory_limit: int | None = None
    launcher: str | None = None  # "torchrun": placement combinations run as torchrun jobs (memtrain.compare.torchrun)
    nproc_per_node: int = 1
    rows: list[dict] = field(default_factory=list)

    def spec(self, combo: str, size: int) -> dict:
        return {
            "strategies": combo,
            "size": size,
            "batch_size": self.batch_size,
            "encoder": self.encoder,
            "loss": self.loss,
            "steps": self.steps,
            "device": self.device,
            "lr": self.lr,
            "cpu_memory_limit": self.cpu_memory_limit,
        }


def parse_sizes(text: str, flag: str = "--sizes") -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            size = int(part)
        except ValueError:
            raise ConfigError(f"{flag} {text}: expected comma-separated image sides in pixels, e.g. 512,1024,2048") from None
        sizes.append(check_size(size, flag))
    if not sizes:
        raise ConfigError(f"{flag} {text!r}: expected at least one size, e.g. 512,1024,2048")
    return list(dict.fromkeys(sizes))


def precheck(combo: str, device: str) -> str | None:
    """Why ``combo`` is rejected here, judged without touching CUDA (None: let the cell decide)."""
    target = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = Plan.resolve(combo, Environment(device=target, native_bf16=True))
    except MemtrainError as e:
        return str(e)
    placed = [s.name for s in plan.strategies if s.stage == Stage.PLACEMENT]
    if placed:
        return f"{placed[0]} runs several processes launched with torchrun; memtrain compare's cells are single processes"
    return None


def _package_root() -> str:
    return str(Path(memtrain.__file__).resolve().parents[1])


def cell_env() -> dict[str, str]:
    """The environment of a cell's process: this memtrain first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _package_root() + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_killable(cmd: list[str], *, env: dict[str, str], timeout: float, cwd: str | None = None, merge_output: bool = False) -> tuple[int, str] | None:
    """Run ``cmd`` in its own process group; ``(returncode, output)``, or None when it ran past ``timeout`` (the group is killed).

    ``output`` is stderr, or stdout and stderr together with ``merge_output``.
    """
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if merge_output else {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, start_new_session=True, **streams)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return proc.returncode, (stdout if merge_output else stderr) or ""


def run_cell_process(spec: dict, timeout: float) -> dict:
    """Run one cell in a fresh ``python -m memtrain compare --cell`` process; failures come back as results."""
    base = {"strategies": spec["strategies"], "size": spec["size"], "batch_size": spec["batch_size"], "phase": ""}
    with tempfile.TemporaryDirectory(prefix="memtrain-cell-") as tmp:
        out = Path(tmp) / "cell.json"
        cmd = [sys.executable, "-m", "memtrain", "compare", "--cell", json.dumps(spec), "--cell-out", str(out)]
        done = run_killable(cmd, env=cell_env(), timeout=timeout)
        if done is None:
            return base | {"status": "error", "reason": f"timed out after {timeout:g} s (--cell-timeout); killed"}
        returncode, stderr = done
        if out.exists():
            return json.loads(out.read_text())
        if returncode == -signal.SIGKILL:
            return base | {"status": "oom", "reason": "the cell was killed by SIGKILL (the kernel's out-of-memory killer?)"}
        lines = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()]
        return base | {"status": "error", "reason": f"the cell exited with code {returncode}: {lines[-1][:300] if lines else 'no output'}"}


def run_sweep(sweep: Sweep, *, log=print) -> list[dict]:
    """Run every cell (sizes outer, combinations inner), writing the outputs after each; returns the rows."""
    host = host_environment()
    results: list[dict] = []
    total = len(sweep.sizes) * len(sweep.combos)
    n = 0
    for size in sweep.sizes:
        for combo in sweep.combos:
            n += 1
            t0 = time.perf_counter()
            distributed = is_distributed(combo)
            reason = (None if sweep.launcher else needs_launcher(combo)) if distributed else precheck(combo, sweep.device)
            if distributed and reason is None:
                result = run_torchrun_cell(sweep.spec(combo, size), sweep.nproc_per_node, sweep.cell_timeout)
            elif reason is not None:
                result = {"strategies": combo, "size": size, "batch_size": sweep.batch_size, "status": "rejected", "phase": "", "reason": reason}
            else:
                result = run_cell_process(sweep.spec(combo, size), sweep.cell_timeout)
            results.append(result)
            sweep.rows = finalize(results)
            write_outputs(sweep, host, results)
            log(f"[{n}/{total}] {combo} @ {size}: {_describe(sweep.rows[-1])} ({time.perf_counter() - t0:.0f} s)")
    return sweep.rows


def _describe(row: dict) -> str:
    if row["status"] == "ok":
        return (
            f"ok, forward {row['forward_peak_mib']:,.0f} MiB, backward {row['backward_peak_mib']:,.0f} MiB ({row['backend']}), {row['step_time_s']:.2f} s/step"
        )
    if row["status"] == "oom":
        return f"out of memory in {row['phase'] or 'an unknown phase'}"
    return f"{row['status']}: {row['reason']}"
