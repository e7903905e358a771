"""Writing and printing memory records: memory.csv, memory_blocks.csv and the end-of-run tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from memtrain.memory.tensor import CATEGORIES
from memtrain.memory.tracker import MIB, PHASES, PhaseRecord
from memtrain.rundir import atomic_write_text

# Columns of memory.csv, in this order (others, if a backend adds some, follow sorted).
METRIC_ORDER = (
    "tensor_peak",
    "tensor_increase",
    *(f"tensor_peak_{c}" for c in CATEGORIES),
    "alloc_peak",
    "alloc_increase",
    "reserved_peak",
    "active_peak",
    "alloc_retries",
    "ooms",
    "nvml_used_peak",
    "nvml_used_increase",
    "nvml_process_peak",
    "nvml_samples",
    "process_peak",
    "process_increase",
)
# Metrics that count events or samples, not bytes: written as integers, not MiB.
COUNTS = ("alloc_retries", "ooms", "nvml_samples")
# The end-of-run table: peaks and increases (the breakdown gets its own table).
SUMMARY_METRICS = (
    "tensor_peak",
    "tensor_increase",
    "alloc_peak",
    "alloc_increase",
    "reserved_peak",
    "active_peak",
    "nvml_used_peak",
    "nvml_process_peak",
    "process_peak",
    "process_increase",
)


def column(metric: str) -> str:
    """CSV column name of a metric: ``<metric>_mib`` for bytes, the bare name for counts."""
    return metric if metric in COUNTS else f"{metric}_mib"


def cell(metric: str, value: int | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if metric in COUNTS else f"{value / MIB:.2f}"


def _metrics(records: list[PhaseRecord]) -> list[str]:
    seen = {k for r in records for k in r.metrics}
    return [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER))


def records_csv(records: list[PhaseRecord], extra: dict[str, object] | None = None) -> str:
    """One row per (step, phase); memory columns in MiB, named ``<metric>_mib``."""
    metrics = _metrics(records)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = extra or {}
    writer.writerow([*extra, "step", "phase", *(column(m) for m in metrics)])
    for r in records:
        writer.writerow([*extra.values(), r.step, r.phase, *(cell(m, r.metrics.get(m)) for m in metrics)])
    return buf.getvalue()


def write_records(path: Path, records: list[PhaseRecord], extra: dict[str, object] | None = None, earlier_rows: list[str] = ()) -> None:
    """Write ``records`` as CSV; ``earlier_rows`` (same columns, e.g. from a resumed run) go first."""
    header, *rows = records_csv(records, extra).splitlines()
    atomic_write_text(path, "\n".join([header, *earlier_rows, *rows]) + "\n")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return lines


def format_summary(summary: dict[str, dict[str, int]], title: str, notes: list[str] = ()) -> str:
    """Fixed-width tables: per phase, each backend's peak and increase (MiB), then what the tensor peak is made of."""
    if not summary:
        return f"{title}: no steps recorded"
    phases = [p for p in PHASES if p in summary] + [p for p in summary if p not in PHASES]
    metrics = [m for m in SUMMARY_METRICS if any(m in row for row in summary.values())]
    rows = [[p, *(f"{summary[p][m] / MIB:,.1f}" if m in summary[p] else "-" for m in metrics)] for p in phases]
    lines = [title, *_table(["phase", *(f"{m} MiB" for m in metrics)], rows)]
    cats = [c for c in CATEGORIES if any(f"tensor_peak_{c}" in row for row in summary.values())]
    if cats:
        rows = [[p, *(f"{summary[p].get(f'tensor_peak_{c}', 0) / MIB:,.1f}" for c in cats)] for p in phases]
        lines += ["", "tensor_peak made of (MiB)", *_table(["phase", *(c.replace("_", " ") for c in cats)], rows)]
    lines += list(notes)
    return "\n".join(lines)


def blocks_csv(rows: list[dict[str, object]]) -> str:
    """memory_blocks.csv: one row per block — parameter bytes and activation bytes held at the end of the forward."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["block", "parameters_mib", "activations_held_mib"])
    for r in rows:
        writer.writerow([r["block"], f"{r['parameters'] / MIB:.2f}", f"{r['activations_held'] / MIB:.2f}"])
    return buf.getvalue()


def format_blocks(rows: list[dict[str, object]], title: str = "activations held after the forward, per block", top: int | None = None) -> str:
    """A table of the blocks holding the most activation memory (all of them without ``top``), with their share."""
    total = sum(int(r["activations_held"]) for r in rows) or 1
    shown = sorted(rows, key=lambda r: -int(r["activations_held"]))[:top] if top else rows
    table = [
        [str(r["block"]), f"{int(r['parameters']) / MIB:,.1f}", f"{int(r['activations_held']) / MIB:,.1f}", f"{100 * int(r['activations_held']) / total:.0f} %"]
        for r in shown
    ]
    return "\n".join([title, *_table(["block", "parameters MiB", "activations MiB", "share"], table)])
