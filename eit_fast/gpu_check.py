"""`python -m eit_fast.gpu_check`: everything a GPU can tell us, in one command and a fixed time budget.

For whoever holds a GPU for a few minutes (a lent machine with no network, its own torch and triton):
  1. build    pip install --no-build-isolation --no-deps --no-index -e . with every core, for this GPU's
              architecture only (the shortest build), unless --no-build;
  2. tests    every `cuda`-marked test (parity of both fast paths in fp32/fp16/bf16, the whole model),
              most informative files first;
  3. racecheck  compute-sanitizer's racecheck on the fused stem, where the tool accepts the device;
  4. bench    `python -m eit_fast.bench` (whole-model, every path) and the kernel benchmarks in bench/, in
              the time that is left.
Each phase gets a share of --budget-s (default 330 s, so one 6-minute call holds it with the machine's
start) and is cut off when its share runs out. The report (gpu_check.md, gpu_check.csv, the logs) is
rewritten under --output after every phase, so a call stopped at its limit still returns what ran.

Without a GPU it runs what it can (the environment, the extension as built, the CPU half of the bench) and
says for each CUDA part that it was skipped and why.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import machine
from .fileio import WriteError, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
# Phase: share of the budget. Tests first: parity on real hardware is what no CPU check can give.
SHARES = {"build": 0.30, "tests": 0.30, "racecheck": 0.07, "bench": 0.33}
TEST_FILES = ["tests/test_patch_projection.py", "tests/test_block_mixer_interp.py", "tests/test_block_mixer.py",
              "tests/test_stem_cuda.py", "tests/test_whole_model_parity.py", "tests/test_model.py", "tests/test_train.py"]
BENCH_FILES = ["bench/test_block_mixer.py", "bench/test_patch_projection.py"]


class Report:
    def __init__(self, out: Path):
        self.out, self.rows, self.started = out, [], time.perf_counter()

    def add(self, phase: str, status: str, seconds: float, detail: str):
        self.rows.append((phase, status, round(seconds, 1), detail))
        print(f"[{phase}] {status} ({seconds:.0f} s): {detail}", flush=True)
        self.write()

    def write(self):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        v = machine.versions()
        lines = ["# eit_fast GPU check", "",
                 f"- device: {machine.device_name(dev) if dev.type == 'cuda' else 'no GPU: ' + machine.cpu_summary()}",
                 f"- software: eit_fast {v['eit_fast']}, torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}",
                 f"- elapsed: {time.perf_counter() - self.started:.0f} s", "",
                 "| phase | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {p} | {s} | {t} | {d.replace('|', '/')} |" for p, s, t, d in self.rows]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["phase", "status", "seconds", "detail"])
        w.writerows(self.rows)
        try:
            atomic_write_text(self.out / "gpu_check.md", "\n".join(lines) + "\n", what="GPU check report")
            atomic_write_text(self.out / "gpu_check.csv", buf.getvalue(), what="GPU check CSV")
        except WriteError as e:
            print(f"warning: {e}", file=sys.stderr)


def _run(cmd: list[str], timeout: float, log: Path, env=None) -> tuple[int | None, str]:
    """(return code or None on timeout, the output's tail); the whole output goes to `log`."""
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        text, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = None
    try:
        atomic_write_text(log, text, what="GPU check log")
    except WriteError as e:
        print(f"warning: {e}", file=sys.stderr)
    return rc, text[-1500:]


def _arch() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def phase_build(rep: Report, budget: float, args):
    t0 = time.perf_counter()
    if args.no_build:
        return rep.add("build", "skipped", 0, "--no-build: the installed eit_fast._C is used")
    arch = _arch()
    if arch is None:
        return rep.add("build", "skipped", 0, "no GPU: the installed eit_fast._C is used (a build here would "
                                               "only repeat the CPU one)")
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 4), "TORCH_CUDA_ARCH_LIST": arch}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    rc, tail = _run(cmd, budget, rep.out / "build.log", env)
    status = "ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})"
    rep.add("build", status, time.perf_counter() - t0, f"arch {arch}, {env['MAX_JOBS']} jobs; log build.log"
            + ("" if rc == 0 else f"; tail: {tail[-400:]}"))


def _pytest_summary(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR")) or " passed" in ln
             or " failed" in ln or " skipped" in ln]
    return "; ".join(lines[-6:]) or text[-300:]


def phase_tests(rep: Report, budget: float, args):
    t0 = time.perf_counter()
    files = [f for f in TEST_FILES if (ROOT / f).is_file()]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={rep.out / 'cuda-tests.xml'}", *files]
    rc, tail = _run(cmd, budget, rep.out / "cuda-tests.log")
    if not torch.cuda.is_available():
        return rep.add("tests", "skipped", time.perf_counter() - t0,
                       f"no GPU: every cuda-marked test skips ({_pytest_summary(tail)})")
    status = "passed" if rc == 0 else "timed out" if rc is None else "failures"
    rep.add("tests", status, time.perf_counter() - t0, _pytest_summary(tail) + "; log cuda-tests.log")


RACE = """
import torch, eit_fast.ops.patch_projection as op
x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(40, 3, 16, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
b = torch.randn(40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
op.patch_projection(x, w, b, 4, 8, 3).float().sum().backward()
torch.cuda.synchronize()
print("ran")
"""


def phase_racecheck(rep: Report, budget: float, args):
    t0 = time.perf_counter()
    tool = shutil.which("compute-sanitizer")
    if not torch.cuda.is_available():
        return rep.add("racecheck", "skipped", 0, "no GPU")
    if tool is None:
        return rep.add("racecheck", "skipped", 0, "compute-sanitizer is not on PATH")
    rc, tail = _run([tool, "--tool", "racecheck", "--error-exitcode", "9", sys.executable, "-c", RACE], budget,
                    rep.out / "racecheck.log")
    if rc == 0 and "ran" in tail:
        status, detail = "no races", "stem forward + backward (bf16) under racecheck"
    elif "not supported" in tail.lower() or "error 999" in tail.lower():
        status, detail = "skipped", "compute-sanitizer refuses this device: " + tail[-200:]
    else:
        status, detail = "timed out" if rc is None else f"races or errors (rc {rc})", tail[-400:]
    rep.add("racecheck", status, time.perf_counter() - t0, detail + "; log racecheck.log")


def phase_bench(rep: Report, budget: float, args):
    t0 = time.perf_counter()
    gpu = torch.cuda.is_available()
    # Most informative first: the 224 px models in bf16 on a GPU; the quick CPU set without one.
    cmd = [sys.executable, "-m", "eit_fast.bench", "--output", str(rep.out / "bench"), "--budget-s",
           str(int(budget * 0.6))]
    cmd += ["--models", "eit_tiny", "eit_mini", "eit_cifar", "--dtypes", "bf16", "fp32", "--iters", "20"] if gpu \
        else ["--quick", "--paths", "reference", "fused", "auto", "--modes", "infer"]
    rc, tail = _run(cmd, budget * 0.75, rep.out / "bench.log")
    rep.add("bench", "ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})",
            time.perf_counter() - t0, "whole model: bench/bench.md, bench/bench.csv; log bench.log")
    left = budget - (time.perf_counter() - t0)
    if not gpu:
        return rep.add("bench-kernels", "skipped", 0, "no GPU: the kernel benchmarks' CUDA cases need one")
    t1 = time.perf_counter()
    files = [f for f in BENCH_FILES if (ROOT / f).is_file()]
    rc, tail = _run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                     f"--benchmark-json={rep.out / 'kernels.json'}", *files], left, rep.out / "kernels.log")
    rep.add("bench-kernels", "ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})",
            time.perf_counter() - t1, "kernels.json; log kernels.log")


PHASES = {"build": phase_build, "tests": phase_tests, "racecheck": phase_racecheck, "bench": phase_bench}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eit_fast.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=330.0, help="total time for all phases (default 330)")
    p.add_argument("--output", default=os.environ.get("OUT") or "runs/gpu_check",
                   help="report folder (default $OUT, else runs/gpu_check)")
    p.add_argument("--no-build", action="store_true", help="use the installed extension")
    p.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    args = p.parse_args(argv)
    if args.budget_s < 30:
        p.error("--budget-s must be at least 30")
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create the report folder {out}: {e.strerror}", file=sys.stderr)
        return 2
    rep = Report(out)
    start = time.perf_counter()
    print(f"eit_fast GPU check: budget {args.budget_s:.0f} s "
          f"({', '.join(f'{k} {v:.0%}' for k, v in SHARES.items())}); report in {out}", flush=True)
    total = args.budget_s / sum(SHARES[n] for n in args.phases)  # the chosen phases share the whole budget
    for i, name in enumerate(args.phases):
        spent = time.perf_counter() - start
        allowed_before = sum(SHARES[n] for n in args.phases[:i]) * total
        budget = SHARES[name] * total + max(0.0, allowed_before - spent)  # plus what earlier phases left
        PHASES[name](rep, max(10.0, min(budget, args.budget_s - spent)), args)
    rep.write()
    print(f"report: {out / 'gpu_check.md'}", flush=True)
    return 0 if all(s in ("ok", "passed", "no races", "skipped") for _, s, _, _ in rep.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
