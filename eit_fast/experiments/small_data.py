"""`python -m eit_fast.experiments.small_data`: EIT vs its ViT twin vs ResNet-18 on seeded subsets of a data set.

Each arm (a model plus options) is trained on each subset by `python -m eit_fast.train` with one recipe and one
budget (the same epochs for every subset), in its own run folder OUTPUT/runs/ARM-N, and evaluated on the data
set's whole validation split (CIFAR-10: the 10,000 test images). The subsets are the trainer's
`--train-subset N` under one seed: the same images for every arm, and nested (the 5k subset is the first half
of the 10k one). A finished run is never redone; an interrupted one resumes from its last checkpoint.

Writes OUTPUT/results.csv, OUTPUT/results.md and OUTPUT/results.png (top-1 against training images, one
line per arm). OUTPUT/experiment.json records the settings: rerunning in the same folder must use the same
recipe, budget, seed and data, and may add arms or subsets.

Stopping: SIGTERM / SIGINT / SIGUSR1 go to the running arm once (it stops with a checkpoint, or saves one),
and the experiment stops after it. The runs die with the experiment however it ends (even killed with
SIGKILL, they get SIGTERM and stop with a checkpoint), and a rerun that finds a run still held by such a
process waits for it (--no-wait refuses instead), so a killed experiment resumes with the same command.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import stop
from ..configs import ConfigError
from ..data.arrays import DataError
from ..fileio import WriteError, atomic_write, atomic_write_text, write_error
from ..run_folder import LOCK_NAME, holder_of, wait_until_free

# name -> (model, train flags). The first three are the issue's comparison; the other two the seed papers'
# techniques (docs/design.md section 1.6) on top of it.
ARMS = {
    "eit": ("eit_cifar", {}),
    "vit": ("vit_cifar", {}),
    "resnet": ("resnet18_cifar", {}),
    "vit_impulse": ("vit_cifar", {"attn_init": "impulse"}),
    "eit_cls4": ("eit_cifar", {"num_cls_tokens": 4}),
}
DEFAULT_ARMS = ("eit", "vit", "resnet")
DEFAULT_SUBSETS = (5000, 10000, 50000)
# Settings every run of one experiment folder shares (checked on a rerun).
SHARED = ("recipe", "epochs", "seed", "amp", "impl", "batch_size", "data")
TABLE_COLUMNS = ("arm", "model", "options", "train_images", "epochs", "top1", "top5", "ema_top1", "params",
                 "macs", "train_s", "median_epoch_s", "images_per_s", "status")


class ExperimentError(RuntimeError):
    """The experiment cannot go on (a run failed, or the folder holds another experiment)."""


@dataclass(frozen=True)
class Arm:
    name: str
    model: str
    options: dict = field(default_factory=dict)

    def train_flags(self) -> list[str]:
        out = []
        for key, value in self.options.items():
            out += [f"--{key.replace('_', '-')}", str(value)]
        return out

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) or "-"


def parse_arm(spec: str) -> Arm:
    """NAME=MODEL[,FLAG=VALUE...], FLAG a train flag without its dashes: vit_torch=vit_cifar,init=torch."""
    name, sep, rest = spec.partition("=")
    parts = rest.split(",") if sep else []
    if not name or not parts or not parts[0] or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"--arm expects NAME=MODEL[,FLAG=VALUE...] (e.g. vit_torch=vit_cifar,init=torch) with a "
                          f"name of letters, digits, - and _; got {spec!r}")
    options = {}
    for item in parts[1:]:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--arm {spec!r}: {item!r} is not FLAG=VALUE")
        options[key.strip().lstrip("-").replace("-", "_")] = value.strip()
    return Arm(name, parts[0].strip(), options)


def select_arms(names: list[str], extra: list[str]) -> list[Arm]:
    arms = []
    for n in names:
        if n not in ARMS:
            raise ConfigError(f"unknown arm {n!r}; built in: {', '.join(ARMS)} (add others with --arm)")
        arms.append(Arm(n, ARMS[n][0], dict(ARMS[n][1])))
    for spec in extra:
        arm = parse_arm(spec)
        if arm.name in ARMS or any(a.name == arm.name for a in arms):
            raise ConfigError(f"--arm {spec!r}: the name {arm.name!r} is taken; choose another")
        arms.append(arm)
    if not arms:
        raise ConfigError("no arms to run")
    return arms


# --- data ----------------------------------------------------------------------------------------------------

def _has_splits(p: Path) -> bool:
    from ..data.cifar import find_cifar
    return (p / "train").is_dir() or find_cifar(p) is not None


def count_classes(data: Path) -> int:
    """Classes of the data folder (for the head's size in the cost count); the trainer reads them itself."""
    from ..data.build import split_folders
    from ..data.cifar import find_cifar
    kind = find_cifar(data)
    if kind is not None:
        return 10 if kind == "cifar10" else 100
    return sum(1 for d in split_folders(data)[0].iterdir() if d.is_dir())


def resolve_data(path: str, extract_to: str | None) -> Path:
    """A data folder for the trainer: `path` itself, or the folder with train/ inside an extracted archive."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--data {p}: no such folder or archive")
    if p.is_dir():
        return p
    if not tarfile.is_tarfile(p):
        raise ConfigError(f"--data {p}: neither a folder nor a tar archive")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    base = Path(extract_to) if extract_to else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "eit_fast" / "data"
    target = base / f"{p.name.split('.')[0]}-{digest}"
    if not target.is_dir():  # extracted next to its place, then renamed: a kill never leaves half a tree
        try:
            base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=base))
        except OSError as e:
            raise write_error(target, e, what="extracted data folder") from e
        try:
            with tarfile.open(p) as tar:
                tar.extractall(tmp, filter="data")
            try:
                tmp.rename(target)
            except OSError:  # another process finished first
                if not target.is_dir():
                    raise
        except tarfile.TarError as e:
            raise ConfigError(f"--data {p}: cannot extract it to {base}: {e}") from e
        except OSError as e:
            raise write_error(target, e, what="extracted data folder", size_hint=_unpacked_size(p)) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for cand in [target, *sorted(x for x in target.iterdir() if x.is_dir())]:
        if _has_splits(cand):
            return cand
    raise ConfigError(f"--data {p}: the archive holds no train/ folder (or CIFAR python batches) at its top "
                      f"or one level down")


def _unpacked_size(archive: Path) -> int | None:
    try:
        with tarfile.open(archive) as tar:
            return sum(m.size for m in tar.getmembers())
    except (tarfile.TarError, OSError):
        return None


# --- runs ----------------------------------------------------------------------------------------------------

def run_dir(out: Path, arm: Arm, n: int) -> Path:
    return out / "runs" / f"{arm.name}-{n}"


def read_metrics(folder: Path) -> list[dict]:
    f = folder / "metrics.jsonl"
    if not f.is_file():
        return []
    records = []
    for line in f.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill; the resume rewrites it
    return records


def is_finished(folder: Path, epochs: int) -> bool:
    records = read_metrics(folder)
    return (folder / "final.safetensors").is_file() and any(
        r.get("epoch") == epochs and "val_top1" in r for r in records)


def train_command(arm: Arm, n: int, s: argparse.Namespace, data: Path, folder: Path) -> list[str]:
    """The `python -m eit_fast.train` line of one run; a half-done run resumes instead."""
    cmd = [sys.executable, "-m", "eit_fast.train"]
    if any(folder.glob("checkpoint-*.pt")):
        return cmd + ["--resume", str(folder), "--no-progress"]
    cmd += ["--recipe", s.recipe, "--model", arm.model, "--data", str(data), "--train-subset", str(n),
            "--epochs", str(s.epochs), "--seed", str(s.seed), "--eval-every", str(s.epochs), "--impl", s.impl,
            "--output", str(folder), "--no-progress"]
    if s.amp:
        cmd += ["--amp", s.amp]
    if s.batch_size:
        cmd += ["--batch-size", str(s.batch_size)]
    return cmd + arm.train_flags()


def arm_overrides(arm: Arm, s: argparse.Namespace, data: Path) -> dict:
    """The model overrides the trainer will build the arm with, typed and checked now, so a bad option fails
    before hours of other arms' training."""
    from ..factory import named_config
    from ..train_args import model_overrides, parse_args
    argv = train_command(arm, 1, s, data, Path(os.devnull))[3:]
    try:
        args, explicit = parse_args(argv)
    except SystemExit:
        raise ConfigError(f"arm {arm.name!r}: the trainer refuses its flags {arm.train_flags()}") from None
    overrides = model_overrides(args, explicit)
    named_config(arm.model, **overrides)  # a bad model option names itself here
    return overrides


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the child's own watch of its parent (stop.PARENT_ENV)
        return None


class Runs:
    """Runs one training at a time and routes this process's signals.

    While a run goes on, SIGINT, SIGTERM and SIGUSR1 are forwarded to it once (it has its own session, so a
    terminal's Ctrl-C does not reach it a second time: the trainer would take that for 'stop at once, without
    saving'). Otherwise SIGINT/SIGTERM stop this process at once (stop.Stopped) and SIGUSR1 is ignored.
    A run dies with this process however it ends: the kernel sends it SIGTERM (PR_SET_PDEATHSIG), and it
    watches its parent too (stop.PARENT_ENV), so it stops with a checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stop_signal = 0  # the first SIGINT/SIGTERM received
        self._first_at = 0.0
        self._prctl = _libc_prctl()
        self._previous = {}

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        first = signum != signal.SIGUSR1 and not self.stop_signal
        if first:
            self.stop_signal, self._first_at = signum, time.monotonic()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)
        elif first:
            raise stop.Stopped(signum)
        elif signum != signal.SIGUSR1 and time.monotonic() - self._first_at >= stop.DUPLICATE_WINDOW_S:
            os._exit(128 + signum)  # a second request while this process stops alone: at once

    def run(self, cmd: list[str]) -> int:
        """Run one training to its end; its exit code."""
        parent, prctl = os.getpid(), self._prctl

        def die_with_parent():  # in the child, before exec: only a plain C call (no locks, no imports)
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # the parent ended before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

        env = dict(os.environ, **{stop.PARENT_ENV: str(parent)})
        self.child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent, env=env)
        try:
            return self.child.wait()
        finally:
            self.child = None


# --- cost ----------------------------------------------------------------------------------------------------

def model_cost(arm: Arm, overrides: dict, num_classes: int) -> tuple[int, int]:
    """(parameters, multiply-accumulates of one forward pass), counted on a meta-device model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..factory import create_trainable, named_config
    # The init does not change the architecture (and the impulse fit cannot run on meta tensors).
    fields = {k: v for k, v in overrides.items() if k not in ("init", "attn_init", "impulse_window")}
    cfg = named_config(arm.model, **fields)
    h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    with torch.device("meta"):
        model = create_trainable(arm.model, impl="reference", num_classes=num_classes, **fields).eval()
        x = torch.empty(1, cfg.in_chans, h, w)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


# --- results -------------------------------------------------------------------------------------------------

def collect(out: Path, arms: list[Arm], subsets: list[int], s: argparse.Namespace, costs: dict) -> list[dict]:
    rows = []
    for n in subsets:
        for arm in arms:
            folder = run_dir(out, arm, n)
            records = read_metrics(folder)
            last = next((r for r in reversed(records) if "val_top1" in r and r.get("epoch") == s.epochs), None)
            params, macs = costs[arm.name]
            row = dict(arm=arm.name, model=arm.model, options=arm.describe(), train_images=n, epochs=s.epochs,
                       top1=None, top5=None, ema_top1=None, params=params, macs=macs, train_s=None,
                       median_epoch_s=None, images_per_s=None, status="not run")
            if records:
                row["status"] = "partial"
            if last is not None and is_finished(folder, s.epochs):
                times = [r.get("epoch_time_s", 0.0) for r in records]
                train_s = sum(times)
                # The median epoch shows the speed even when something else shared the machine for a while.
                row.update(top1=last["val_top1"], top5=last["val_top5"], ema_top1=last.get("ema_val_top1"),
                           train_s=round(train_s, 1), median_epoch_s=round(statistics.median(times), 1),
                           images_per_s=round(n * s.epochs / train_s, 1), status="done")
            rows.append(row)
    return rows


def write_tables(out: Path, rows: list[dict], s: argparse.Namespace):
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=TABLE_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue(), what="results table")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"Recipe `{s.recipe}`, {s.epochs} epochs for every subset, seed {s.seed}, amp {s.amp or 'default'}; "
             f"top-1 on the whole validation split ({s.data_path}).", "",
             "| arm | model | options | train images | top-1 (%) | EMA top-1 (%) | params (M) | MACs (M) | "
             "train time (s) | median epoch (s) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['model']} | {r['options']} | {r['train_images']:,} | "
                     f"{fmt(r['top1'], '.2f')} | {fmt(r['ema_top1'], '.2f')} | {r['params'] / 1e6:.2f} | "
                     f"{r['macs'] / 1e6:.0f} | {fmt(r['train_s'], '.0f')} | {fmt(r['median_epoch_s'], '.1f')} | "
                     f"{r['status']} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n", what="results table")


def plot(out: Path, rows: list[dict]) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot (pip install matplotlib); the tables are written", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = sorted((r["train_images"], r["top1"]) for r in rows if r["arm"] == arm and r["top1"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("training images")
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(out / "results.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120), what="plot")
    finally:
        plt.close(fig)
    return out / "results.png"


# --- the experiment ------------------------------------------------------------------------------------------

def load_or_record_settings(out: Path, s: argparse.Namespace, arms: list[Arm]):
    """Refuse a folder holding an experiment with other shared settings or another arm of the same name."""
    path = out / "experiment.json"
    mine = {k: getattr(s, k) for k in SHARED}
    known = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            theirs, known = saved["settings"], saved["arms"]
        except (ValueError, KeyError, TypeError) as e:
            raise ExperimentError(f"{path} is unreadable ({e}); move it away to start over") from e
        diff = sorted(k for k in SHARED if theirs.get(k) != mine[k])
        if diff:
            raise ExperimentError(f"{out} holds an experiment with other settings: " + ", ".join(
                f"{k}={theirs.get(k)!r} (now {mine[k]!r})" for k in diff) + "; use another --output")
        for arm in arms:
            if arm.name in known and known[arm.name] != asdict(arm):
                raise ExperimentError(f"{out}: arm {arm.name!r} was run as {known[arm.name]}, now {asdict(arm)}; "
                                      f"give the new one another name")
    known.update({a.name: asdict(a) for a in arms})
    atomic_write_text(path, json.dumps({"settings": mine, "arms": known}, indent=1), what="experiment settings")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eit_fast.experiments.small_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", required=True, help="data folder (train/ and test/ ImageFolder trees, or CIFAR "
                   "python batches) or a .tar(.gz) of one, e.g. ../shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--output", required=True, help="experiment folder (runs, tables, plot); rerun to resume")
    p.add_argument("--subsets", type=int, nargs="+", default=list(DEFAULT_SUBSETS), help="training images")
    p.add_argument("--arms", nargs="*", default=list(DEFAULT_ARMS), help=f"built-in arms: {', '.join(ARMS)}")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=MODEL[,FLAG=VALUE...]",
                   help="an extra arm: a model and train flags, e.g. eit_torch=eit_cifar,init=torch")
    p.add_argument("--recipe", default="cifar", help="the trainer's recipe, the same for every arm")
    p.add_argument("--epochs", type=int, default=10, help="the budget: epochs over each subset")
    p.add_argument("--seed", type=int, default=0, help="chooses the subsets, the init and the data order")
    p.add_argument("--amp", help="autocast dtype for every run (default: the trainer's, bf16 on CUDA, none on "
                                 "the CPU; bf16 on a CPU with AVX512-BF16 is about 2x faster)")
    p.add_argument("--impl", default="auto", choices=["reference", "fused", "auto"])
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--extract-to", help="where an archive is extracted (default ~/.cache/eit_fast/data)")
    p.add_argument("--no-wait", action="store_true",
                   help="refuse a run that another process still holds (a run of an earlier, killed experiment "
                        "finishing its checkpoint), instead of waiting for it")
    p.add_argument("--dry-run", action="store_true", help="print the train commands and stop (writes nothing)")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables and plot from the runs finished so far, training nothing")
    return p


def main(argv=None) -> int:
    s = build_parser().parse_args(argv)
    with Runs() as runs:
        try:
            return _experiment(s, runs)
        except stop.Stopped as e:
            return stop.report_stopped(e, "(no run was going)")


def _experiment(s: argparse.Namespace, runs: Runs) -> int:
    from ..run_folder import RunFolder
    try:
        if s.epochs < 1 or any(n < 1 for n in s.subsets):
            raise ConfigError("--epochs and --subsets must be positive")
        arms = select_arms(s.arms, s.arm)
        subsets = sorted(dict.fromkeys(s.subsets))
        data = resolve_data(s.data, s.extract_to)
        s.data_path = str(data)
        s.data = str(Path(s.data).expanduser().resolve())
        overrides = {arm.name: arm_overrides(arm, s, data) for arm in arms}
        out = Path(s.output)
        if s.dry_run:
            for n in subsets:
                for arm in arms:
                    print(f"[{arm.name} / {n}] " + " ".join(train_command(arm, n, s, data, run_dir(out, arm, n))[1:]))
            return 0
        lock = RunFolder(out)  # one experiment per folder at a time (each run also locks its own)
        lock.open(new_run=False)
    except (ConfigError, DataError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        load_or_record_settings(out, s, arms)
        num_classes = count_classes(data)
        costs = {a.name: model_cost(a, overrides[a.name], num_classes) for a in arms}
        failed = []
        for n in subsets:
            for arm in arms:
                folder = run_dir(out, arm, n)
                if s.report_only:
                    continue
                if not _wait_for(folder, f"[{arm.name} / {n}]", s.no_wait):
                    failed.append(f"{arm.name}/{n} (in use by another process, and --no-wait)")
                    continue
                if is_finished(folder, s.epochs):
                    print(f"[{arm.name} / {n}] finished earlier: kept", flush=True)
                    continue
                cmd = train_command(arm, n, s, data, folder)
                print(f"[{arm.name} / {n}] " + " ".join(cmd[1:]), flush=True)
                folder.parent.mkdir(parents=True, exist_ok=True)
                rc = runs.run(cmd)
                if runs.stop_signal or rc in (130, 143):  # the run stopped with its checkpoint: stop here too
                    print(f"stopped; rerun the same command to resume {folder}", file=sys.stderr)
                    return 128 + (runs.stop_signal or rc - 128)
                if rc != 0:
                    failed.append(f"{arm.name}/{n} (exit {rc}, see its output above)")
                rows = collect(out, arms, subsets, s, costs)
                write_tables(out, rows, s)
                plot(out, rows)
        rows = collect(out, arms, subsets, s, costs)
        write_tables(out, rows, s)
        plot(out, rows)
        print((out / "results.md").read_text())
        if failed:
            raise ExperimentError("runs failed: " + "; ".join(failed))
        return 0
    except (ExperimentError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        lock.close()


def _wait_for(folder: Path, tag: str, no_wait: bool) -> bool:
    """Wait until no process holds the run folder (a run of an earlier experiment, killed, still stopping);
    False if one does and `no_wait`."""
    if no_wait:
        holder = holder_of(folder)
        if holder is not None:
            print(f"{tag} {folder} is in use by process {holder} (it holds {folder / LOCK_NAME}); --no-wait: "
                  f"not waiting for it", file=sys.stderr, flush=True)
            return False
        return True
    wait_until_free(folder, lambda holder: print(
        f"{tag} waiting for process {holder}, which holds {folder / LOCK_NAME} (a run of an earlier experiment "
        f"that was stopped or killed?); --no-wait refuses instead", flush=True))
    return True


if __name__ == "__main__":
    sys.exit(main())
