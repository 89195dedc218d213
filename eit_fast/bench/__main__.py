"""`python -m eit_fast.bench`: whole-model inference and training-step benchmarks on every path, with the
modelled H100 floor, written as markdown, CSV and a plot (eit_fast.bench.whole_model says what each path
and figure is)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..fileio import WriteError
from . import report
from .whole_model import DTYPES, MODELS, MODES, PATHS, Plan, run

QUICK = dict(models=["eit_cifar"], dtypes=["fp32"], iters=5, cpu_batch=64)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eit_fast.bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="eit_cifar only, fp32, every path and mode, batch 64 on the CPU: under 5 minutes on 2 cores")
    p.add_argument("--models", nargs="+", choices=MODELS, help=f"default: all ({', '.join(MODELS)})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="fp32 and/or bf16 autocast (default: both)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--batch", type=int, help="one batch size for every model (default: per model and device)")
    p.add_argument("--iters", type=int, help="timed runs per path (default 10; --quick 5)")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cpu or cuda[:N]")
    p.add_argument("--output", default="runs/bench", help="folder for bench.md, bench.csv and bench.png")
    p.add_argument("--budget-s", type=float, help="start no new case after this many seconds")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.batch is not None and a.batch < 1 or a.iters is not None and a.iters < 1:
        p.error("--batch and --iters must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {a.device}: no CUDA GPU is visible", file=sys.stderr)
        return 2
    batch = a.batch or (QUICK["cpu_batch"] if a.quick and device.type == "cpu" else None)
    plan = Plan(models=a.models or (QUICK["models"] if a.quick else list(MODELS)), modes=a.modes,
                dtypes=a.dtypes or (QUICK["dtypes"] if a.quick else list(DTYPES)), paths=a.paths, batch=batch,
                iters=a.iters or (QUICK["iters"] if a.quick else 10), budget_s=a.budget_s)
    out = Path(a.output)
    rows = []
    for h in report.header(device):
        print(h, flush=True)

    def on_row(r):
        rows.append(r)
        step = f"{r.median_ms:9.1f} ms  {r.images_per_s:8.0f} img/s" if r.status == "measured" else "  skipped"
        vs = f"  {r.vs_reference:.2f}x reference" if r.vs_reference else ""
        print(f"{r.model:<10}b{r.batch:<4} {r.mode:<5} {r.dtype:<4} {r.path:<14}{step}{vs}  floor "
              f"{r.floor_ms:.3f} ms (modelled)" + (f"  [{r.note}]" if r.note else ""), flush=True)
        report.write(rows, device, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        run(plan, device, on_row)
        files = report.write(rows, device, out)
        why = None if a.no_plot else report.plot(rows, device, out / "bench.png")
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(report.markdown(rows, device))
    print(f"wrote {files['markdown']}, {files['csv']}" + ("" if a.no_plot or why else f", {out / 'bench.png'}"))
    if why:
        print(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
