"""`python -m eit_fast.train`: the Trainer (set-up, loop, checkpoints) and the CLI entry point.

The settings and their checks are in train_args.py; the run folder (lock, checkpoint files, metrics) in
run_folder.py. See train_args.DESCRIPTION (the --help text) for what a run does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import distributed, run_choices
from .checkpoint import CheckpointError, find_nonfinite, load_state_dict_checked, read_file, save_safetensors
from .configs import ConfigError
from .data.arrays import DataError
from .data.augment import MixupConfig
from .data.build import DataSpec, build_data
from .data.fingerprint import fingerprint_difference
from .data.loader import AugmentConfig
from .data.sampling import derive_seed
from .ema import EMA
from .evaluate import EvaluationStopped, autocast, evaluate
from .factory import create_trainable, named_config
from .fileio import WriteError
from .optim import make_optimizer, make_scheduler
from .run_folder import RunFolder, list_checkpoints  # noqa: F401  (list_checkpoints: part of this module's API)
from .runtime import ImplError
from . import stop as stopping
from .train_args import RECIPES, RESUME_OVERRIDABLE, build_parser, check_args, default_output, model_overrides, \
    parse_args, parse_randaugment  # noqa: F401  (RECIPES, build_parser: part of this module's API)

class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss or weights)."""


# --- the run -------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args: argparse.Namespace, explicit: set[str], dist: distributed.DistInfo):
        self.dist, self.device = dist, dist.device
        self.resume_state, self.ckpt_path = None, None
        resume = Path(args.resume) if args.resume else None
        if resume is not None and not resume.exists():
            raise CheckpointError(f"--resume {resume}: no such run folder or checkpoint file")
        # The folder is checked and locked before anything else: a bad --output costs no data building.
        self.folder = RunFolder(resume if resume is None or resume.is_dir() else resume.parent) if resume \
            else RunFolder(args.output)
        try:
            if dist.is_main:
                self.folder.open(new_run=resume is None)
            self._setup(args, explicit)
        except BaseException:
            self.folder.close()
            raise

    def _setup(self, args: argparse.Namespace, explicit: set[str]):
        dist = self.dist
        if args.resume:
            args = self._load_resume(args, explicit)
        self.args = args
        self._validate()
        self.amp = args.amp or ("bf16" if self.device.type == "cuda" else "none")
        torch.manual_seed(args.seed)  # the same initial weights on every rank; dropout is reseeded below

        aug = AugmentConfig(
            crop_padding=args.crop_padding, hflip=args.hflip, repeats=args.repeated_aug,
            mixup=MixupConfig(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing),
            randaugment=parse_randaugment(args.randaugment), random_erasing=args.random_erasing)
        overrides = model_overrides(args, explicit)
        img_size = named_config(args.model, **overrides).img_size  # a bad model setting fails before the data
        spec = DataSpec(data=args.data, img_size=img_size, batch_size=args.batch_size,
                        eval_batch_size=args.eval_batch_size, aug=aug, cache=args.cache, workers=args.workers,
                        synthetic_size=args.synthetic_size, train_subset=args.train_subset)
        if not dist.is_main:
            distributed.barrier()  # rank 0 decodes first and fills the decode cache; the others read it
        self.data = build_data(spec, device=self.device, seed=args.seed, rank=dist.rank,
                               world_size=dist.world_size)
        if dist.is_main:
            distributed.barrier()
        if self.resume_state is not None and self.resume_state.get("data_fingerprint") is not None:
            diff = fingerprint_difference(self.resume_state["data_fingerprint"], self.data.fingerprint)
            if diff:
                raise DataError(f"--resume {self.ckpt_path}: the data are not those the run was trained on: "
                                f"{diff}. Resume on the same data, or start a new run.")

        self.model = create_trainable(args.model, impl=args.impl, num_classes=len(self.data.classes),
                                  **overrides).to(self.device)
        # The implementation choices (impl="auto"), made now on rank 0 at the training shape and pinned on
        # every rank, or the checkpoint's when resuming: before the EMA copy, DDP and torch.compile.
        saved = self.resume_state.get("impl_choices") if self.resume_state is not None else None
        self.impl_choices = run_choices.settle(
            self.model, (args.batch_size, self.model.cfg.in_chans, *_pair(img_size)), self.device,
            lambda: autocast(self.device, self.amp), dist, saved=saved, folder=self.folder.path)
        self.ema = EMA(self.model, args.ema_decay) if args.ema_decay > 0 else None

        self.accum = args.accum_steps
        self.steps_per_epoch = len(self.data.train) // self.accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.data.train)} batches per epoch cannot fill one step of "
                             f"--accum-steps {self.accum}")
        self.total_steps = self.steps_per_epoch * args.epochs
        self.global_batch = args.batch_size * self.accum * dist.world_size
        self.lr = args.lr * (self.global_batch / args.lr_scale_batch if args.lr_scale_batch else 1.0)
        self.optimizer = make_optimizer(self.model, self.lr, args.weight_decay)
        warmup = int(round(args.warmup_epochs * self.steps_per_epoch))
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, warmup, args.warmup_lr, args.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

        self.net = self.model
        if dist.enabled:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda"
                                               else None)
        if args.compile:
            self.net = torch.compile(self.net)

        self.epoch, self.batch, self.step, self.best = 0, 0, 0, None
        # Per-epoch sums kept on the device (no sync per step): loss x images, correct top-1; images on the host.
        self.epoch_stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.epoch_images = 0
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.signal = None
        self.safe_points = stopping.SafePoints(dist.enabled)  # on every rank: under DDP it makes a group
        self.saved = (None, 0)                  # the newest checkpoint of this run and its step
        self.epoch_train_s, self._clock = 0.0, None  # training time of this epoch, across resumes
        self._timed_from = 0                    # images of this epoch trained before its time was kept
        if self.resume_state is not None:
            self._restore(self.resume_state)
            self.resume_state = None
        else:
            torch.manual_seed(derive_seed(args.seed, 1, dist.rank))  # dropout masks differ across ranks
        self.output = self.folder.path
        self.tb = None

    # --- set-up helpers --------------------------------------------------------------------------------------
    def _validate(self):
        a = self.args
        check_args(a)  # parse_args checked the command line; a resume merges in the saved settings
        if a.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{torch.cuda.get_device_name(self.device)} has no bf16; use --amp fp16")

    def _load_resume(self, args, explicit) -> argparse.Namespace:
        path = Path(args.resume)
        if path.is_dir():  # the newest checkpoint that verifies; rank 0 decides for all
            state = None
            if self.dist.is_main:
                path, state = self.folder.newest_readable()
            path = Path(distributed.broadcast_object(str(path)))
            state = state if state is not None else read_file(path)
        else:
            state = read_file(path)
        if not isinstance(state, dict) or "train_state" not in state:
            raise CheckpointError(f"--resume {path}: not an eit_fast training checkpoint (no train_state)")
        saved = dict(state["config"]["args"])
        for key in RESUME_OVERRIDABLE:  # settings of this invocation, not of the run
            saved[key] = getattr(args, key)
        changed = sorted(k for k in explicit - RESUME_OVERRIDABLE if getattr(args, k) != saved.get(k))
        if changed:
            raise ConfigError(f"--resume continues the saved run exactly; these flags differ from it: {changed}. "
                             f"Start a new run (another --output) to change them.")
        saved["resume"] = str(path)
        saved["output"] = str(path.parent)
        self.resume_state, self.ckpt_path = state, path
        return argparse.Namespace(**saved)

    def _restore(self, state):
        ts = state["train_state"]
        load_state_dict_checked(self.model, state["model"], str(self.ckpt_path))
        if self.ema is not None:
            load_state_dict_checked(self.ema.module, state["model_ema"], f"{self.ckpt_path} (EMA)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step, self.best = ts["epoch"], ts["batch"], ts["step"], ts["best"]
        self.epoch_stats.copy_(ts["epoch_stats"])
        self.epoch_images = ts["epoch_images"]
        self.epoch_train_s = ts.get("epoch_train_s", 0.0)
        if "epoch_train_s" not in ts:  # an older checkpoint: time only the rest of the epoch
            self._timed_from = self.epoch_images
        self.saved = (self.ckpt_path, self.step)
        rngs = ts["rng"]
        if len(rngs) != self.dist.world_size:
            raise CheckpointError(f"the checkpoint was written by {len(rngs)} rank(s), this run has "
                                  f"{self.dist.world_size}: an exact resume needs the same number")
        rng = rngs[self.dist.rank]
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.args.stop_after is not None and self.args.stop_after <= self.step:
            raise ConfigError(f"argument --stop-after: {self.args.stop_after} is not after the checkpoint's step "
                              f"{self.step}")
        if self.dist.is_main:
            self.folder.drop_metrics_after(self.epoch)  # epochs after the checkpoint are redone

    # --- main loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        a, main = self.args, self.dist.is_main
        if main:
            if a.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
                self.tb = SummaryWriter(str(self.output / "tensorboard"))
            self._print(f"{a.model} ({self.model.impl}, {sum(p.numel() for p in self.model.parameters()):,} "
                        f"params) on {self.data.description}")
            self._print(f"{self.dist.world_size} x {self.device.type}, amp {self.amp}, global batch "
                        f"{self.global_batch}, peak lr {self.lr:.2e}, {a.epochs} epochs x {self.steps_per_epoch} "
                        f"steps; output {self.output}"
                        + (f"; resuming {self.ckpt_path} at epoch {self.epoch} step {self.step}"
                           if self.ckpt_path else ""))
            if self.model.impl != "reference":
                self._print(f"impl {a.impl}: {run_choices.describe(self.impl_choices)} "
                            f"({self.output / run_choices.FILE})")
        with stopping.handling(raising=False) as requests:  # from here on, a stop saves a checkpoint first
            requests.quiet, requests.unsaved = not main, self._unsaved
            try:
                return self._run()
            finally:
                if self.tb is not None:
                    self.tb.close()
                self.folder.close()

    def _run(self) -> int:
        a = self.args
        start = time.perf_counter()
        last_eval = None
        while self.epoch < a.epochs:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._clock = t0
            finished = self._train_epoch()
            self._tick()
            self._clock = None
            if not finished:
                self._check_health()  # the stop may come between health checks: never save a diverged state
                self._save_checkpoint()
                reason = f"signal {self.signal}" if self.signal else f"--stop-after {a.stop_after}"
                self._print(f"stopped at step {self.step} ({reason}); checkpoint saved. Continue with: "
                            f"python -m eit_fast.train --resume {self.output}")
                return 128 + self.signal if self.signal else 0
            try:
                record = self._end_epoch(self.epoch_train_s, self._timed_from)
            except EvaluationStopped:  # the epoch's training is complete: save it; a resume evaluates again
                self._save_checkpoint()
                self._print(f"stopped in the evaluation of epoch {self.epoch + 1} (signal {self.signal}); "
                            f"checkpoint saved at the end of its training (step {self.step}), the resumed run "
                            f"evaluates it again. Continue with: python -m eit_fast.train --resume {self.output}")
                return 128 + self.signal
            last_eval = record
            self.epoch, self.batch = self.epoch + 1, 0
            self.epoch_stats.zero_()
            self.epoch_images = 0
            self.epoch_train_s, self._timed_from = 0.0, 0
            if self.epoch % a.save_every == 0 or self.epoch == a.epochs:
                self._save_checkpoint(record)
        if self.dist.is_main:
            meta = {"model": a.model, "config": json.dumps(self.model.cfg.to_dict()),
                    "classes": json.dumps(self.data.classes), "train_args": json.dumps(vars(a))}
            save_safetensors(self.output / "final.safetensors", self.model, meta, last_good=self.saved[0])
            if self.ema is not None:
                save_safetensors(self.output / "final_ema.safetensors", self.ema.module, meta,
                                 last_good=self.saved[0])
        summary = f"done: {a.model} on {a.data}, {a.epochs} epochs, {self.step} steps in " \
                  f"{time.perf_counter() - start:.0f} s"
        if last_eval is not None:
            summary += f"; val top-1 {last_eval['val_top1']:.2f}% top-5 {last_eval['val_top5']:.2f}%"
            if "ema_val_top1" in last_eval:
                summary += f" (EMA {last_eval['ema_val_top1']:.2f}%)"
            summary += f"; best {self.best['top1']:.2f}% at epoch {self.best['epoch']}"
        self._print(summary + f"; weights {self.output / 'final.safetensors'}")
        return 0

    def _train_epoch(self) -> bool:
        """One epoch from self.batch on. False if it stopped early (signal or --stop-after)."""
        a = self.args
        self.net.train()
        n_batches = self.steps_per_epoch * self.accum
        bar = None
        if self.dist.is_main and a.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch // self.accum,
                       desc=f"epoch {self.epoch + 1}/{a.epochs}", dynamic_ncols=True, leave=False)
        batches = self.data.train.batches(self.epoch, self.batch)
        try:
            for b in range(self.batch, n_batches):
                batch = next(batches)
                last_micro = (b + 1) % self.accum == 0
                sync = contextlib.nullcontext() if last_micro or not self.dist.enabled else self.net.no_sync()
                with sync:
                    with autocast(self.device, self.amp):
                        logits = self.net(batch.images)
                    loss = F.cross_entropy(logits.float(), batch.target)
                    self.scaler.scale(loss / self.accum).backward()
                n = batch.labels.shape[0]
                self.epoch_images += n
                with torch.no_grad():
                    correct = (logits.argmax(-1) == batch.labels).sum()
                    self.epoch_stats += torch.stack([loss.detach().double() * n, correct.double()])
                    self.bad |= ~torch.isfinite(loss.detach())
                if not last_micro:
                    continue
                self._optimizer_step()
                self.batch = b + 1
                if bar is not None:
                    bar.update(1)
                log_now = self.step % a.log_every == 0
                if log_now:
                    self._check_health()
                    if bar is not None:
                        bar.set_postfix(loss=f"{self.epoch_stats[0].item() / self.epoch_images:.4f}",
                                        lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self._stop_now():
                    return False
        finally:
            if bar is not None:
                bar.close()
        self._check_health()
        return True

    def _optimizer_step(self):
        if self.args.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)

    def _check_health(self):
        """Stop on a non-finite loss: a host sync, so only at log points and epoch ends."""
        if self.amp == "fp16":
            # The scaler skips steps whose gradients overflow; a scale driven below 1 means it cannot recover.
            self.bad.zero_()
            if self.scaler.get_scale() < 1.0:
                raise TrainError(f"fp16 loss scale fell below 1 by step {self.step}: the loss or gradients are "
                                 f"not finite even unscaled; try --amp bf16, a lower --lr or --clip-grad")
            return
        bad = self.bad.clone()
        if self.dist.enabled:
            bad = distributed.all_reduce_sum(bad.int())
        if bad.item():
            raise TrainError(f"the loss became NaN/inf at or before step {self.step} (epoch {self.epoch + 1}); "
                             f"nothing was saved after that. Try a lower --lr, --clip-grad 1.0 or --amp none, "
                             f"and resume from the last checkpoint in {self.output}")

    def _stop_now(self) -> bool:
        a = self.args
        if a.stop_after is not None and self.step >= a.stop_after:
            return True
        return self._safe_point()

    def _safe_point(self) -> bool:
        """Act on the stop requests all ranks agree on (eit_fast.stop): True to stop; a SIGUSR1 saves a
        checkpoint here and goes on. Called after every step and evaluation batch, on every rank."""
        d = self.safe_points.poll()
        if d.stop:
            self.signal = d.stop
            return True
        if d.save:
            self._save_checkpoint()
            self._print(f"checkpoint saved at step {self.step} (SIGUSR1); going on")
        return False

    def _tick(self):
        """Add the training time since the last tick to the epoch's (kept in checkpoints, so that a resumed
        epoch reports its whole time and speed)."""
        if self._clock is not None:
            now = time.perf_counter()
            self.epoch_train_s += now - self._clock
            self._clock = now

    def _unsaved(self) -> str:
        """What an exit without saving would lose now (read by the stop watcher thread)."""
        path, step = self.saved
        if self.step == step:
            return f"nothing, {path} holds step {step}" if path else "nothing (no step trained yet)"
        since = f"since {path} (step {step})" if path else "of this run (no checkpoint written yet)"
        return f"{self.step - step} training step(s) {since}"

    def _end_epoch(self, train_time: float, images_before: int) -> dict:
        a = self.args
        loss_sum, correct = distributed.all_reduce_sum(self.epoch_stats.clone()).tolist()
        seen = self.epoch_images * self.dist.world_size  # every rank runs the same number of batches
        images = (self.epoch_images - images_before) * self.dist.world_size
        record = {"epoch": self.epoch + 1, "step": self.step,
                  "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen,
                  "lr": self.scheduler.get_last_lr()[0], "images_per_s": images / train_time,
                  "epoch_time_s": train_time}
        if (self.epoch + 1) % a.eval_every == 0 or self.epoch + 1 == a.epochs:
            r = evaluate(self.model, self.data.val, self.device, self.amp, stop=self._safe_point)
            record.update(val_loss=r["loss"], val_top1=r["top1"], val_top5=r["top5"], eval_time_s=r["seconds"])
            if self.ema is not None:
                r = evaluate(self.ema.module, self.data.val, self.device, self.amp, stop=self._safe_point)
                record.update(ema_val_loss=r["loss"], ema_val_top1=r["top1"], ema_val_top5=r["top5"])
            if self.best is None or record["val_top1"] > self.best["top1"]:
                self.best = {"top1": record["val_top1"], "epoch": self.epoch + 1}
                record["best"] = True
        record["peak_mem_mib"] = peak_memory_mib(self.device)
        if self.dist.is_main:
            self.folder.append_metrics(record)
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "best"):
                        self.tb.add_scalar(k, v, self.epoch + 1)
            line = (f"epoch {self.epoch + 1}/{a.epochs}  loss {record['train_loss']:.4f}  "
                    f"train top-1 {record['train_top1']:.2f}%  ")
            if "val_top1" in record:
                line += f"val top-1 {record['val_top1']:.2f}% top-5 {record['val_top5']:.2f}%  "
                if "ema_val_top1" in record:
                    line += f"EMA {record['ema_val_top1']:.2f}%  "
            line += f"{record['images_per_s']:.0f} img/s  {train_time:.0f} s"
            self._print(line)
        return record

    # --- checkpoints ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, record: dict | None = None):
        self._refuse_nonfinite()
        self._tick()
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rngs = distributed.all_gather_objects(rng)
        if not self.dist.is_main:
            self._share_write_outcome(None)  # rank 0 writes; every rank stops on its failure
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "config": {"args": vars(self.args), "model_config": self.model.cfg.to_dict(),
                       "classes": self.data.classes},
            "train_state": {"epoch": self.epoch, "batch": self.batch, "step": self.step, "best": self.best,
                            "epoch_stats": self.epoch_stats.cpu(), "epoch_images": self.epoch_images,
                            "epoch_train_s": self.epoch_train_s, "rng": rngs},
            "data_fingerprint": self.data.fingerprint,
            "impl_choices": self.impl_choices,
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        try:
            path = self.folder.save_checkpoint(state, self.step, best=bool(record and record.get("best")),
                                               keep_last=self.args.keep_last)
        except WriteError as e:
            self._share_write_outcome(e)
            raise
        self._share_write_outcome(None)
        self.saved = (path, self.step)

    def _share_write_outcome(self, error: WriteError | None):
        """Under DDP rank 0 tells the others whether its write worked, so that all ranks stop together on a
        full disk instead of the others waiting for it in the next collective."""
        if not self.dist.enabled:
            return
        message = distributed.broadcast_object(str(error) if error is not None else None)
        if message is not None and error is None:
            raise WriteError(message, self.output, None)

    def _refuse_nonfinite(self):
        """Never save NaN/inf weights. Every rank checks and the ranks agree, so under DDP they all stop here
        together: rank 0 alone raising would leave the others waiting in the next collective."""
        weights = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.ema is not None:
            weights["model_ema"] = self.ema.module.state_dict()
        bad = find_nonfinite(weights)
        if self.dist.enabled:
            anywhere = distributed.all_reduce_sum(torch.tensor([float(len(bad))], device=self.device)).item()
        else:
            anywhere = len(bad)
        if not anywhere:
            return
        last = self.folder.checkpoints() if self.dist.is_main else []
        where = f"{len(bad)} tensor(s) hold NaN/inf (e.g. {', '.join(bad[:3])})" if bad else \
            "another rank's weights hold NaN/inf"
        raise TrainError(f"not saving a checkpoint at step {self.step}: {where}. Try a lower --lr, --clip-grad "
                         f"1.0 or --amp none" + (f", and resume from the last good checkpoint, {last[-1]}"
                                                 if last else ""))

    # --- misc ------------------------------------------------------------------------------------------------
    def _print(self, msg: str):
        if self.dist.is_main:
            try:
                print(msg, flush=True)
            except BrokenPipeError:  # stdout's reader ended (`| head`, a `| tee` stopped by Ctrl-C): go on
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                print(f"note: standard output is closed; the run goes on (its record: "
                      f"{self.output / 'metrics.jsonl'})", file=sys.stderr, flush=True)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> int:
    try:
        args, explicit = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Installed before any work: a stop during set-up (reading a checkpoint, decoding the data, building a
    # cache) ends it at once, with nothing to save; Trainer.run switches to stopping at a safe point. A stop
    # can arrive anywhere in set-up, also in the clean-up of an error: hence the outer handler.
    with stopping.handling(raising=True):
        try:
            return _main(args, explicit)
        except stopping.Stopped as e:
            return stopping.report_stopped(e, "during set-up (reading, decoding, caching)")


def _main(args: argparse.Namespace, explicit: set[str]) -> int:
    try:
        dist = distributed.setup(args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if not args.output and not args.resume:
            args.output = distributed.broadcast_object(default_output(args.model))
        return Trainer(args, explicit, dist).run()
    except TrainError as e:  # the run failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataError, ConfigError, CheckpointError, ImplError, WriteError) as e:  # it could not start, or a
        print(f"error: {e}", file=sys.stderr)                                       # write failed
        return 2
    except RuntimeError as e:
        if not (dist.enabled and distributed.peer_lost(e)):
            raise
        print(f"error: another rank of this run is gone (crashed, killed, or stopped alone): "
              f"{distributed.short_reason(e)}; {_last_checkpoint_note(args)}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()


def _last_checkpoint_note(args: argparse.Namespace) -> str:
    folder = Path(args.resume or args.output or ".")
    folder = folder if folder.is_dir() else folder.parent
    last = list_checkpoints(folder)
    return f"the last checkpoint is {last[-1]}, nothing after it was saved" if last else \
        f"{folder} holds no checkpoint yet"


if __name__ == "__main__":
    sys.exit(main())
