"""Whole-model cases: one inference forward, or one training step (forward, backward, AdamW), of a named EIT
model on each path, timed side by side through eit_fast.timing, with a modelled H100 floor per step.

Paths (the same initial weights for all):
  reference      the plain-PyTorch model, eager
  sdpa_pad8      the reference with attention through PyTorch SDPA on heads zero-padded to a multiple of 8
  compile        torch.compile of the reference
  fused          every fused path that can run here, always taken (impl="fused" where all can run)
  fused_compile  torch.compile of that
  auto           impl="auto": each fused path measured against the reference per case, the faster kept

The modelled floor (eit_fast.perf_model, labelled modelled everywhere) is max(FLOPs / matrix rate, bytes /
bandwidth) on an H100 with: FLOPs every matmul and conv of the step (torch's FlopCounterMode: forward, and
for training the backward too); bytes the input read once, every parameter read once per pass (forward, and
backward), the residual stream written and read once per block per pass, the logits written and, for
training, the gradients written and AdamW's seven fp32 accesses per parameter. bf16 autocast counts
activations at 2 bytes and tensor-core FLOPs at 990 TFLOP/s; fp32 counts 4 bytes and the 67 TFLOP/s of fp32
FMA (PyTorch's default fp32 matmul is not TF32).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import autotune, timing
from ..configs import get_config
from ..factory import create_model
from ..perf_model import H100, DeviceLimits, Work, modelled_time
from ..patching import fuse_what_runs
from .rivals import use_sdpa_pad8

MODELS = ("eit_cifar", "eit_mini", "eit_tiny")
PATHS = ("reference", "sdpa_pad8", "compile", "fused", "fused_compile", "auto")
MODES = ("infer", "train")
DTYPES = ("fp32", "bf16")
# Batch per model on a GPU and on the CPU (224 px models are minutes per step at batch 64 on 2 cores).
BATCH = {"eit_cifar": {"cuda": 256, "cpu": 256}, "eit_mini": {"cuda": 64, "cpu": 8},
         "eit_tiny": {"cuda": 64, "cpu": 8}}
AMP = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class Case:
    model: str
    batch: int
    mode: str
    dtype: str


@dataclass
class Row:
    """One path of one case: measured, or skipped with the reason."""
    model: str
    batch: int
    mode: str
    dtype: str
    path: str
    status: str                       # "measured" | "skipped"
    median_ms: Optional[float] = None
    iqr_ms: Optional[float] = None
    images_per_s: Optional[float] = None
    vs_reference: Optional[float] = None
    peak_mib: Optional[float] = None
    floor_ms: Optional[float] = None  # modelled, H100
    floor_bound: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# --- the modelled floor ---------------------------------------------------------------------------------------

def modelled_floor(case: Case, limits: DeviceLimits = H100):
    """The modelled time of one step on `limits` (see the module docstring); never a measurement."""
    cfg = get_config(case.model)
    with torch.device("meta"):
        model = create_model(case.model, impl="reference").train(case.mode == "train")
        x = torch.empty(case.batch, cfg.in_chans, *cfg.img_hw)
    with FlopCounterMode(display=False) as counter:
        if case.mode == "train":
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    flops = counter.get_total_flops()
    act = 2 if case.dtype == "bf16" else 4
    params = sum(p.numel() for p in model.parameters())
    passes = 2 if case.mode == "train" else 1
    stream = case.batch * cfg.num_tokens * cfg.embed_dim * act * 2 * cfg.depth * passes
    moved = case.batch * cfg.in_chans * math.prod(cfg.img_hw) * 4 + params * 4 * passes + stream + \
        case.batch * cfg.num_classes * 4
    if case.mode == "train":
        moved += params * 4 + params * 4 * 7  # gradients written; AdamW reads p, g, m, v and writes p, m, v
    work = Work(bytes=moved, mma_flops=flops, precision="bf16") if case.dtype == "bf16" else \
        Work(bytes=moved, fma_flops=flops)
    return modelled_time(work, limits)


# --- the paths ------------------------------------------------------------------------------------------------

def build_paths(case: Case, paths, device: torch.device, autocast) -> dict:
    """{path: (model or None, note or the reason it is skipped)} with one set of initial weights."""
    torch.manual_seed(0)
    ref = create_model(case.model, impl="reference").to(device)
    out = {}
    for path in paths:
        model = copy.deepcopy(ref)
        note = ""
        if path == "sdpa_pad8":
            use_sdpa_pad8(model)
        elif path in ("fused", "fused_compile"):
            taken, left = fuse_what_runs(model)
            if not taken:
                out[path] = (None, "no fused path can run here (" + "; ".join(left) + ")")
                continue
            note = "fused " + ", ".join(taken) + (f"; not fused: {'; '.join(x.split(' (')[0] for x in left)}"
                                                  if left else "")
        elif path == "auto":
            from ..patching import patch
            patch(model, strict=False, model_name=case.model)
            if model.impl == "reference":
                out[path] = (model, "no fused path can run here: auto is the reference")
                continue
            x = _example(case, device)
            autotune.unpin()
            autotune.prepare(model, x, train=case.mode == "train", evaluate=case.mode == "infer",
                             autocast=autocast)
            note = _auto_note(case)
        if path in ("compile", "fused_compile"):
            model = torch.compile(model)
        out[path] = (model, note)
    return out


def _auto_note(case: Case) -> str:
    made = [c for c in autotune.export()["choices"].values()
            if f"|batch={case.batch}" in c["case"] and ("train" in c["case"]) == (case.mode == "train")]
    fused = sorted({c["path"] for c in made if c["impl"] == "fused"})
    n_fused = sum(c["impl"] == "fused" for c in made)
    if not made:
        what = "auto: nothing measured"
    elif fused:
        what = f"auto fused {', '.join(fused)} in {n_fused} of {len(made)} cases"
    else:
        what = f"auto kept the reference in all {len(made)} cases"
    return what + " (measured eagerly)"


def _example(case: Case, device):
    cfg = get_config(case.model)
    gen = torch.Generator().manual_seed(1)
    return torch.randn(case.batch, cfg.in_chans, *cfg.img_hw, generator=gen).to(device)


def step_fn(model, case: Case, device, autocast) -> Callable[[], object]:
    x = _example(case, device)
    cfg = get_config(case.model)
    if case.mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast():
                return model(x)
        return infer
    model.train()
    y = torch.randint(0, cfg.num_classes, (case.batch,), generator=torch.Generator().manual_seed(2)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)

    def train():
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return train


# --- running a case -------------------------------------------------------------------------------------------

def _autocast(device, dtype: str):
    amp = AMP[dtype]
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext


def run_case(case: Case, paths, device: torch.device, iters: int, warmup: int = 2) -> list[Row]:
    """Every path of one case, interleaved; a path that fails to build or run is a skipped row saying why."""
    autocast = _autocast(device, case.dtype)
    floor = modelled_floor(case)
    rows, fns = {}, {}
    base = dict(model=case.model, batch=case.batch, mode=case.mode, dtype=case.dtype, floor_ms=floor.seconds * 1e3,
                floor_bound=floor.bound)
    if case.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return [Row(**base, path=p, status="skipped", note="this GPU has no bf16") for p in paths]
    for path, (model, note) in build_paths(case, paths, device, autocast).items():
        if model is None:
            rows[path] = Row(**base, path=path, status="skipped", note=note)
            continue
        fn = step_fn(model, case, device, autocast)
        try:
            fn()  # the first call compiles (torch.compile) and shows a path that cannot run at all
        except Exception as e:  # noqa: BLE001 - reported as a skipped row, the other paths still run
            rows[path] = Row(**base, path=path, status="skipped", note=f"failed: {type(e).__name__}: {e}"[:300])
            continue
        rows[path] = Row(**base, path=path, status="measured", note=note)
        fns[path] = fn
    if fns:
        times = timing.side_by_side(fns, device, warmup=warmup, iters=iters)
        for path, t in times.items():
            r = rows[path]
            r.median_ms, r.iqr_ms = t.median_s * 1e3, t.iqr_s * 1e3
            r.images_per_s = case.batch / t.median_s
            r.peak_mib = None if t.peak_bytes is None else t.peak_bytes / 2**20
        ref = rows.get("reference")
        for r in rows.values():
            if r.median_ms and ref is not None and ref.median_ms:
                r.vs_reference = ref.median_ms / r.median_ms
    return [rows[p] for p in paths if p in rows]


@dataclass
class Plan:
    models: list
    modes: list
    dtypes: list
    paths: list
    batch: Optional[int] = None
    iters: int = 10
    budget_s: Optional[float] = None
    cases: list = field(default_factory=list)

    def build(self, device: torch.device) -> list[Case]:
        kind = "cuda" if device.type == "cuda" else "cpu"
        return [Case(m, self.batch or BATCH[m][kind], mode, dt)
                for m in self.models for dt in self.dtypes for mode in self.modes]


def run(plan: Plan, device: torch.device, on_row: Callable[[Row], None] = lambda r: None) -> list[Row]:
    """Run the plan's cases in order, calling on_row as each row is ready; with a budget, the cases that
    would start after it are reported skipped."""
    start = time.perf_counter()
    rows = []
    for case in plan.build(device):
        if plan.budget_s is not None and time.perf_counter() - start > plan.budget_s:
            new = [Row(case.model, case.batch, case.mode, case.dtype, p, "skipped", note="time budget spent")
                   for p in plan.paths]
        else:
            new = run_case(case, plan.paths, device, plan.iters)
        for r in new:
            on_row(r)
        rows += new
    return rows
