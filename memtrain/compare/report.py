"""A comparison's outputs: compare.csv, compare.json, compare.md (with the environment) and compare.png.

Every row is one (strategies, size) cell. ``forward_peak_mib``, ``backward_peak_mib``
and ``step_peak_mib`` (the largest of the forward, backward and optimizer phases) come
from the backend named in ``backend``: ``cuda`` (the allocator's ``alloc_peak``) on a
GPU, else ``tensor`` (live tensor bytes); the other backends' peaks are in their own
columns (``tensor_*``, ``reserved_*``, ``nvml_used_*``, and on CPU ``process_*``: the process's peak resident memory). Ratios divide by the ``none``
row of the same size; the Markdown table shows them as reductions, 1 − ratio, in %.
"""

from __future__ import annotations

import csv
import io
import json

from memtrain.compare import torchrun
from memtrain.memory.tracker import MIB
from memtrain.rundir import atomic_write_bytes, atomic_write_text

PHASE_COLUMNS = ("forward", "backward", "optimizer")
COLUMNS = (
    "strategies",
    "plan",
    "size",
    "batch_size",
    "status",
    "phase",
    "backend",
    "forward_peak_mib",
    "backward_peak_mib",
    "optimizer_peak_mib",
    "step_peak_mib",
    "forward_ratio",
    "backward_ratio",
    "step_ratio",
    "step_time_s",
    "time_ratio",
    "loss",
    "tensor_forward_peak_mib",
    "tensor_backward_peak_mib",
    "tensor_step_peak_mib",
    "reserved_step_peak_mib",
    "nvml_used_step_peak_mib",
    "process_step_peak_mib",
    "alloc_retries",
    "ooms",
    "device",
    "reason",
    *torchrun.COLUMNS,
)
# (column prefix, tracker metric) of the backends reported beside the main one.
EXTRA = (("tensor", "tensor_peak"), ("reserved", "reserved_peak"), ("nvml_used", "nvml_used_peak"), ("process", "process_peak"))


def _mib(v) -> float | None:
    return None if v is None else round(v / MIB, 2)


def _row(result: dict) -> dict:
    phases = result.get("phases") or {}
    backend = "cuda" if any("alloc_peak" in m for m in phases.values()) else "tensor"
    metric = "alloc_peak" if backend == "cuda" else "tensor_peak"
    row = dict.fromkeys(COLUMNS)
    row.update({k: result.get(k) for k in ("strategies", "plan", "size", "batch_size", "status", "phase", "device", "reason", "loss")})
    row["phase"] = row["phase"] or ""
    row["reason"] = row["reason"] or ""
    row.update({k: result.get(k) for k in torchrun.COLUMNS})
    if result.get("status") == "ok":
        row["backend"] = backend
        for p in PHASE_COLUMNS:
            row[f"{p}_peak_mib"] = _mib(phases.get(p, {}).get(metric))
        row["step_peak_mib"] = _mib(max(phases[p][metric] for p in PHASE_COLUMNS if metric in phases.get(p, {})))
        row["step_time_s"] = round(result["step_time_s"], 4)
        for prefix, m in EXTRA:
            values = {p: phases.get(p, {}).get(m) for p in PHASE_COLUMNS}
            if any(v is not None for v in values.values()):
                if prefix == "tensor":
                    row["tensor_forward_peak_mib"] = _mib(values["forward"])
                    row["tensor_backward_peak_mib"] = _mib(values["backward"])
                row[f"{prefix}_step_peak_mib"] = _mib(max(v for v in values.values() if v is not None))
        for count in ("alloc_retries", "ooms"):
            if any(count in m for m in phases.values()):
                row[count] = sum(int(m.get(count, 0)) for m in phases.values())
        if row["loss"] is not None:
            row["loss"] = round(row["loss"], 6)
    return row


def finalize(results: list[dict]) -> list[dict]:
    """Rows with the main backend's peaks and the ratios to the ``none`` row of the same size."""
    rows = [_row(r) for r in results]
    base = {r["size"]: r for r in rows if r["strategies"] == "none" and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["size"])
        if r["status"] != "ok" or b is None:
            continue
        for key, col in (
            ("forward_ratio", "forward_peak_mib"),
            ("backward_ratio", "backward_peak_mib"),
            ("step_ratio", "step_peak_mib"),
            ("time_ratio", "step_time_s"),
        ):
            if r[col] is not None and b[col]:
                r[key] = round(r[col] / b[col], 4)
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})
    return buf.getvalue()


def _fmt(v, spec: str = ",.0f") -> str:
    return "–" if v is None else format(v, spec)


def _reduction(ratio) -> str:
    return "–" if ratio is None else f"{100 * (1 - ratio):.1f} %"


def to_markdown(sweep, host: dict, device: dict, rows: list[dict]) -> str:
    backends = sorted({r["backend"] for r in rows if r["backend"]})
    lines = [
        f"# memtrain compare: U-Net {sweep.encoder}, loss {sweep.loss}, batch {sweep.batch_size}, {sweep.steps} measured step(s) after 1 warm-up step",
        "",
        "| | |",
        "|---|---|",
        f"| device | {device.get('device', '?')} |",
        f"| driver | {device.get('driver', '?')} |",
        f"| CUDA | {device.get('cuda', '?')} (torch built with {host['cuda_build']}) |",
        f"| torch | {host['torch']} |",
        f"| segmentation-models-pytorch | {host['segmentation_models_pytorch']} |",
        f"| pytorch-msssim / lightning / memtrain | {host['pytorch_msssim']} / {host['lightning']} / {host['memtrain']} |",
        f"| CPU | {host['cpu']} |",
        f"| Python / OS | {host['python']} / {host['os']} |",
        f"| memory backend of the peaks | {', '.join(backends) or '–'} ({_backend_words(backends)}) |",
        "",
        "Peaks in MiB; reductions relative to `none` at the same size (positive = less memory; a negative one is an increase);"
        " time: median seconds per step and its ratio to `none`.",
        "",
        "| strategies | size | status | forward peak | backward peak | step peak | forward reduction | backward reduction | step time (s) | time vs none | loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"| {r['strategies']} | {r['size']} | ok | {_fmt(r['forward_peak_mib'])} | {_fmt(r['backward_peak_mib'])} | {_fmt(r['step_peak_mib'])} |"
                f" {_reduction(r['forward_ratio'])} | {_reduction(r['backward_ratio'])} | {_fmt(r['step_time_s'], '.2f')} |"
                f" {_fmt(r['time_ratio'], '.2f')} | {_fmt(r['loss'], '.5g')} |"
            )
        else:
            what = f"out of memory in {r['phase']}" if r["status"] == "oom" and r["phase"] else r["status"]
            lines.append(f"| {r['strategies']} | {r['size']} | {what} | – | – | – | – | – | – | – | – |")
    lines += torchrun.markdown_lines(rows)
    notes = [r for r in rows if r["status"] not in ("ok",) and r["reason"]]
    if notes:
        lines += ["", *(f"- `{r['strategies']}` at {r['size']}: {r['status']}: {r['reason']}" for r in notes)]
    return "\n".join(lines) + "\n"


def _backend_words(backends: list[str]) -> str:
    words = {"tensor": "live tensor bytes, dispatch-mode count", "cuda": "CUDA caching allocator, max_memory_allocated"}
    return "; ".join(words.get(b, b) for b in backends) or "no cell succeeded"


def plot_png(sweep, rows: list[dict], device: dict) -> bytes:
    """Grouped bars: forward and backward peak of each combination relative to ``none``, one panel per size."""
    import matplotlib  # lazy (startup): matplotlib loads only when the plot is drawn

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # lazy (startup) too, after choosing the Agg backend above

    sizes = sweep.sizes
    combos = sweep.combos
    fig = Figure(figsize=(max(6.0, 1.1 * len(combos) * len(sizes) + 2), 4.6), dpi=110)
    axes = fig.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
    by_key = {(r["strategies"], r["size"]): r for r in rows}
    ymax = 110.0
    for ax, size in zip(axes, sizes):
        width = 0.38
        for i, combo in enumerate(combos):
            r = by_key.get((combo, size))
            if r is None:
                continue
            if r["status"] == "ok" and r["forward_ratio"] is not None:
                f, b = 100 * r["forward_ratio"], 100 * r["backward_ratio"]
                ymax = max(ymax, f * 1.1, b * 1.1)
                bf = ax.bar(i - width / 2, f, width, color="#1f77b4", label="forward" if i == 0 else None)
                bb = ax.bar(i + width / 2, b, width, color="#ff7f0e", label="backward" if i == 0 else None)
                ax.bar_label(bf, fmt="%.0f", fontsize=7, padding=1)
                ax.bar_label(bb, fmt="%.0f", fontsize=7, padding=1)
            else:
                text = {"oom": "OOM", "rejected": "rejected", "error": "error"}.get(r["status"], "no baseline")
                if r["status"] == "oom" and r["phase"]:
                    text += f"\n({r['phase']})"
                ax.text(i, 4, text, ha="center", va="bottom", fontsize=7, rotation=90, color="#b22222")
        ax.axhline(100, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(combos)), [c.replace(",", ",\n") for c in combos], fontsize=7)
        ax.set_title(f"{size}×{size}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("peak memory, % of 'none'")
    axes[0].set_ylim(0, ymax)
    backends = ", ".join(sorted({r["backend"] for r in rows if r["backend"]})) or "-"
    fig.suptitle(
        f"memtrain compare — U-Net {sweep.encoder}, loss {sweep.loss}, batch {sweep.batch_size}; {device.get('device', '?')}; backend: {backends}", fontsize=9
    )
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(sweep, host: dict, results: list[dict]) -> None:
    rows = finalize(results)
    device = next((r["environment"] for r in results if r.get("environment")), {})
    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep.out / "compare.csv", to_csv(rows))
    doc = {
        "environment": {**host, **device},
        "settings": {
            k: getattr(sweep, k)
            for k in (
                "combos",
                "sizes",
                "steps",
                "batch_size",
                "encoder",
                "loss",
                "device",
                "lr",
                "cell_timeout",
                "cpu_memory_limit",
                "launcher",
                "nproc_per_node",
            )
        },
        "rows": rows,
        "cells": results,
    }
    atomic_write_text(sweep.out / "compare.json", json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(sweep.out / "compare.md", to_markdown(sweep, host, device, rows))
    atomic_write_bytes(sweep.out / "compare.png", plot_png(sweep, rows, device))
