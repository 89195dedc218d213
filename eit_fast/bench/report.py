"""Writing the benchmark's results: a markdown table and a CSV (each rewritten atomically after every row,
so a run cut short still leaves what it measured) and a plot of images/s per path."""
from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path
from typing import Optional

import torch

from .. import machine
from ..fileio import atomic_write, atomic_write_text
from .whole_model import Row

COLUMNS = ["model", "batch", "mode", "dtype", "path", "status", "median_ms", "iqr_ms", "images_per_s",
           "vs_reference", "peak_mib", "floor_ms", "floor_bound", "note"]


def header(device: torch.device) -> list[str]:
    v = machine.versions()
    where = f"GPU {machine.device_name(device)}" if device.type == "cuda" else f"CPU {machine.cpu_summary()}"
    return [f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"device: {where}",
            f"software: eit_fast {v['eit_fast']}, torch {v['torch']}, triton {v['triton']}, python {v['python']}",
            "measured: step time (median and interquartile range of interleaved runs), images/s, peak memory "
            "(" + ("CUDA max allocated" if device.type == "cuda" else "growth of the process's peak RSS") + "); "
            "modelled: `H100 floor` (eit_fast.bench.whole_model docstring), never measured"]


def _fmt(v, digits=1) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}"


def markdown(rows: list[Row], device: torch.device) -> str:
    lines = [f"- {h}" for h in header(device)] + [""]
    lines.append("| model | batch | mode | dtype | path | step ms (median ± IQR) | images/s | vs reference | "
                 "peak MiB | H100 floor ms (modelled) | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r.median_ms:.1f} ± {r.iqr_ms:.1f}" if r.status == "measured" else f"skipped"
        vs = f"{r.vs_reference:.2f}x" if r.vs_reference else ""
        floor = f"{r.floor_ms:.3f} ({r.floor_bound})" if r.floor_ms is not None else ""
        lines.append(f"| {r.model} | {r.batch} | {r.mode} | {r.dtype} | {r.path} | {step} | "
                     f"{_fmt(r.images_per_s, 0)} | {vs} | {_fmt(r.peak_mib)} | {floor} | {r.note} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row], device: torch.device) -> str:
    buf = io.StringIO()
    for h in header(device):
        buf.write(f"# {h}\n")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: v for k, v in r.to_dict().items() if k in COLUMNS})
    return buf.getvalue()


def write(rows: list[Row], device: torch.device, out: Path, stem: str = "bench") -> dict:
    """Write out/stem.md and out/stem.csv; returns their paths."""
    md, cs = out / f"{stem}.md", out / f"{stem}.csv"
    atomic_write_text(md, markdown(rows, device), what="benchmark report")
    atomic_write_text(cs, csv_text(rows, device), what="benchmark CSV")
    return {"markdown": md, "csv": cs}


def plot(rows: list[Row], device: torch.device, path: Path) -> Optional[str]:
    """images/s per path, one group of bars per case; returns why not where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    measured = [r for r in rows if r.status == "measured"]
    if not measured:
        return "nothing measured: no plot"
    cases = list(dict.fromkeys((r.model, r.batch, r.mode, r.dtype) for r in measured))
    paths = list(dict.fromkeys(r.path for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        vals = [next((r.images_per_s for r in measured if (r.model, r.batch, r.mode, r.dtype) == c and r.path == p),
                     0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{m} b{b}\n{mode} {dt}" for m, b, mode, dt in cases], fontsize=8)
    ax.set_ylabel("images/s (measured)")
    ax.set_title(header(device)[1].removeprefix("device: "), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), what="benchmark plot")
    plt.close(fig)
    return None
