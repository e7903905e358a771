"""Writing and printing memory records: memory.csv and the end-of-run table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from memtrain.memory.tracker import MIB, PHASES, PhaseRecord
from memtrain.rundir import atomic_write_text

METRIC_ORDER = ("tensor_peak", "tensor_increase", "alloc_peak", "alloc_increase", "reserved_peak")


def _metrics(records: list[PhaseRecord]) -> list[str]:
    seen = {k for r in records for k in r.metrics}
    return [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER))


def records_csv(records: list[PhaseRecord], extra: dict[str, object] | None = None) -> str:
    """One row per (step, phase); memory columns in MiB, named ``<metric>_mib``."""
    metrics = _metrics(records)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = extra or {}
    writer.writerow([*extra, "step", "phase", *(f"{m}_mib" for m in metrics)])
    for r in records:
        writer.writerow([*extra.values(), r.step, r.phase, *(f"{r.metrics[m] / MIB:.2f}" if m in r.metrics else "" for m in metrics)])
    return buf.getvalue()


def write_records(path: Path, records: list[PhaseRecord], extra: dict[str, object] | None = None, earlier_rows: list[str] = ()) -> None:
    """Write ``records`` as CSV; ``earlier_rows`` (same columns, e.g. from a resumed run) go first."""
    header, *rows = records_csv(records, extra).splitlines()
    atomic_write_text(path, "\n".join([header, *earlier_rows, *rows]) + "\n")


def format_summary(summary: dict[str, dict[str, int]], title: str) -> str:
    """A small fixed-width table: one row per phase, one column per metric (MiB)."""
    if not summary:
        return f"{title}: no steps recorded"
    metrics = [m for m in METRIC_ORDER if any(m in row for row in summary.values())]
    phases = [p for p in PHASES if p in summary] + [p for p in summary if p not in PHASES]
    header = ["phase", *(f"{m} MiB" for m in metrics)]
    rows = [[p, *(f"{summary[p][m] / MIB:,.1f}" if m in summary[p] else "-" for m in metrics)] for p in phases]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)
