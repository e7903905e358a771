"""Per-rank memory of distributed runs: phase peaks recorded on every rank, one CSV per rank, and their summary.

Every rank records the same metrics as single-process training (``tensor_peak``,
``tensor_increase``; ``alloc_peak``, ``alloc_increase``, ``reserved_peak`` on CUDA) for
the phases forward, backward and optimizer of each step, as seen by that rank:

* rpc: the master's forward is the remote forward plus the loss; a shard's forward is
  its own forward, its backward runs from the end of its forward to its optimizer step
  (its part of the distributed backward happens in there);
* pipeline: forward until the stage's first backward microbatch, backward until the
  optimizer step (under 1F1B, later forwards fall in "backward": the steady state);
* ddp: as single process, per replica.

Rank 0 gathers the records and writes ``memory.csv`` (its own rows) and
``memory.rank<R>.csv`` for every other rank R: each the single-process layout with two
leading columns, ``rank`` and ``role``. Nothing needs a shared filesystem.

:class:`RankMemory` differs from :class:`memtrain.memory.MemoryTracker` in one way: the
tensor counter's dispatch mode is thread-local, and a shard's work runs on RPC and
autograd threads, so the mode is entered with :meth:`RankMemory.counting` on whichever
thread does the work, while one counter and one set of phase records serve them all.

:func:`summarize_ranks` reads a run directory's per-rank files back (for ``memtrain
compare``): per rank the peak of every phase and of the whole step, then the mean and
the max over ranks — the per-node numbers of the paper's tables IV and V.
"""

from __future__ import annotations

import contextlib
import csv
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memtrain.memory.report import records_csv
from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode, module_tensors
from memtrain.memory.tracker import PHASES, PhaseRecord
from memtrain.rundir import atomic_write_text

MAIN_FILE = "memory.csv"
_RANK_FILE = re.compile(r"memory\.rank(\d+)\.csv$")


def memory_file(run_dir: Path, rank: int) -> Path:
    """``memory.csv`` for rank 0 (what single-process tools read), ``memory.rank<R>.csv`` for the others."""
    return Path(run_dir) / (MAIN_FILE if rank == 0 else f"memory.rank{rank}.csv")


class RankMemory:
    """Phase records of one rank, from any number of threads."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.counter = LiveTensorBytes()
        self.records: list[PhaseRecord] = []
        self._lock = threading.Lock()
        self._step: int | None = None
        self._phase: str | None = None
        self._start = 0
        self._cuda_start = 0

    @property
    def active(self) -> bool:
        return self._step is not None

    def start_step(self, step: int, *objs) -> None:
        """Begin step ``step``; ``objs`` (modules, optimizers, batches) hold tensors that exist already."""
        self.end_step()
        with self._lock:
            self.counter.track_all(module_tensors(*objs))
            self._step = step
            self._start = self.counter.current
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self._cuda_start = torch.cuda.memory_allocated(self.device)

    def begin(self, phase: str) -> None:
        """End the current phase (if any) and begin ``phase``."""
        with self._lock:
            if self._step is None:
                return
            self._end_phase()
            self._phase = phase
            self.counter.reset_peak()
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)

    def end_step(self) -> None:
        with self._lock:
            self._end_phase()
            self._step = None

    def track(self, *tensors) -> None:
        """Count tensors that arrived from another process (they were not made by an operator here)."""
        if self._step is not None:
            self.counter.track_all(t for t in tensors if isinstance(t, torch.Tensor))

    def counting(self) -> contextlib.AbstractContextManager:
        """Count the operator outputs of this thread while a step is being recorded."""
        return TensorBytesMode(self.counter) if self._step is not None else contextlib.nullcontext()

    def _end_phase(self) -> None:
        if self._phase is None or self._step is None:
            return
        metrics = {"tensor_peak": self.counter.peak, "tensor_increase": self.counter.peak - self._start}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            metrics.update(alloc_peak=peak, alloc_increase=peak - self._cuda_start, reserved_peak=torch.cuda.max_memory_reserved(self.device))
        self.records.append(PhaseRecord(self._step, self._phase, metrics))
        self._phase = None


class NoMemory:
    """``--no-memory``: the same calls, recording nothing."""

    records: list[PhaseRecord] = []  # noqa: RUF012  (always empty)
    active = False

    def start_step(self, step: int, *objs) -> None: ...
    def begin(self, phase: str) -> None: ...
    def end_step(self) -> None: ...
    def track(self, *tensors) -> None: ...

    def counting(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def rank_memory(device, track: bool) -> RankMemory | NoMemory:
    return RankMemory(device) if track else NoMemory()


# --------------------------------------------------------------------------- files


@dataclass
class RankRecords:
    """One rank's phase records, as gathered to rank 0."""

    rank: int
    role: str
    records: list[PhaseRecord] = field(default_factory=list)


def earlier_rows(path: Path, before_step: int) -> list[str]:
    """Rows of an existing per-rank file for steps before ``before_step`` (a resumed run keeps them)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if not lines or "step" not in lines[0].split(","):
        return []
    col = lines[0].split(",").index("step")
    return [ln for ln in lines[1:] if ln and int(ln.split(",")[col]) < before_step]


def write_rank_files(run_dir: Path, ranks: list[RankRecords], kept: dict[int, list[str]] | None = None) -> list[Path]:
    """Write one CSV per rank (atomically); ``kept`` are earlier rows per rank from a resumed run."""
    kept = kept or {}
    written = []
    for rr in ranks:
        if not rr.records:
            continue  # nothing new: an existing file stays as it is
        header, *new = records_csv(rr.records, {"rank": rr.rank, "role": rr.role}).splitlines()
        path = memory_file(run_dir, rr.rank)
        atomic_write_text(path, "\n".join([header, *kept.get(rr.rank, []), *new]) + "\n")
        written.append(path)
    return written


# --------------------------------------------------------------------------- summary


@dataclass
class RankPeaks:
    """Peaks (MiB) of one rank, max over the steps after the warm-up: per phase, and of the whole step."""

    rank: int
    role: str
    phases: dict[str, float]
    step: float
    steps: int


def rank_files(run_dir: str | Path) -> dict[int, Path]:
    """The per-rank memory files of a run directory, by rank (a single-process run has only rank 0)."""
    run_dir = Path(run_dir)
    files = {}
    if (run_dir / MAIN_FILE).exists():
        files[0] = run_dir / MAIN_FILE
    for p in run_dir.glob("memory.rank*.csv"):
        m = _RANK_FILE.search(p.name)
        if m:
            files[int(m.group(1))] = p
    return dict(sorted(files.items()))


def rank_peaks(run_dir: str | Path, *, metric: str = "tensor_peak", skip_steps: int = 1) -> list[RankPeaks]:
    """Per-rank phase peaks of ``metric`` (MiB), leaving out each rank's first ``skip_steps`` steps (all kept if that is all there is)."""
    column = f"{metric}_mib"
    out = []
    for rank, path in rank_files(run_dir).items():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(column)]
        if not rows:
            continue
        steps = sorted({int(r["step"]) for r in rows})
        keep = set(steps[skip_steps:]) or set(steps)
        phases: dict[str, float] = {}
        for r in rows:
            if int(r["step"]) in keep:
                phases[r["phase"]] = max(phases.get(r["phase"], 0.0), float(r[column]))
        ordered = {p: phases[p] for p in PHASES if p in phases} | {p: v for p, v in phases.items() if p not in PHASES}
        role = rows[0].get("role") or ("single" if rank == 0 else "")
        out.append(RankPeaks(rank, role, ordered, max(ordered.values()), len(keep)))
    return out


def summarize_ranks(run_dir: str | Path, *, metric: str = "tensor_peak", skip_steps: int = 1) -> dict:
    """``{"ranks": [RankPeaks...], "mean": {...}, "max": {...}}``; mean and max are over ranks, per phase and for ``"step"``."""
    ranks = rank_peaks(run_dir, metric=metric, skip_steps=skip_steps)
    keys = [p for p in PHASES if any(p in r.phases for r in ranks)] + ["step"]

    def values(key):
        return [r.step if key == "step" else r.phases.get(key, 0.0) for r in ranks]

    return {
        "metric": metric,
        "ranks": ranks,
        "mean": {k: sum(values(k)) / len(ranks) for k in keys} if ranks else {},
        "max": {k: max(values(k)) for k in keys} if ranks else {},
    }


def format_rank_table(summary: dict) -> str:
    """Fixed-width table: one row per rank, then mean and max (MiB)."""
    ranks = summary["ranks"]
    if not ranks:
        return "no memory records"
    keys = list(summary["max"])
    header = ["rank", "role", *(f"{k} MiB" for k in keys)]
    rows = [[str(r.rank), r.role, *(f"{(r.step if k == 'step' else r.phases.get(k, 0.0)):,.1f}" for k in keys)] for r in ranks]
    rows.append(["mean", "", *(f"{summary['mean'][k]:,.1f}" for k in keys)])
    rows.append(["max", "", *(f"{summary['max'][k]:,.1f}" for k in keys)])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    return f"peak {summary['metric']} per rank (max over steps after warm-up)\n" + "\n".join(lines)
