"""`python -m eit_fast.train`: train EIT with mixed precision on one GPU, many (torchrun), or the CPU.

With no arguments it trains a small EIT on the built-in procedural data set (a smoke run that finishes in a
few minutes on a laptop CPU). Recipes: `--recipe cifar` (our small-data recipe for eit_cifar), `--recipe
deit` (the authors' ImageNet recipe, DeiT's). Settings come from, lowest to highest: the built-in defaults,
the recipe, a YAML `--config` file, the command line.

Checkpoints are written atomically and hold everything a resume needs (model, EMA, optimizer, scheduler,
grad scaler, every rank's RNG state, epoch and position within it): `--resume RUN_DIR` continues exactly.
SIGTERM / SIGINT saves a checkpoint and exits.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import CheckpointError, atomic_save, read_file, save_safetensors
from .configs import ConfigError, get_config, list_models
from .data.arrays import DataError
from .data.augment import MixupConfig
from .data.build import DataSpec, build_data
from .data.loader import AugmentConfig
from .data.sampling import derive_seed
from .ema import EMA
from .evaluate import AMP_DTYPES, autocast, evaluate
from .factory import create_model
from .optim import make_optimizer, make_scheduler
from .runtime import ImplError

# --- settings ------------------------------------------------------------------------------------------------

RECIPES = {
    # Our small-data recipe for 32 px images (the authors published none): DeiT's regularisation, lr 1e-3 at
    # batch 128, 10 warm-up epochs.
    "cifar": dict(model="eit_cifar", epochs=300, batch_size=128, lr=1e-3, lr_scale_batch=128,
                  warmup_epochs=10, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05, mixup=0.8, cutmix=1.0,
                  smoothing=0.1, crop_padding=4, ema_decay=0.9999),
    # DESIGN.md 1.5: the authors' ImageNet recipe (DeiT's, nearly verbatim). torchvision's RandAugment has
    # no magnitude noise, so "rand-m9-mstd0.5" becomes 2 ops at magnitude 9.
    "deit": dict(model="eit_mini", epochs=300, batch_size=256, lr=1e-3, lr_scale_batch=512, warmup_epochs=5,
                 warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05, randaugment="2,9", random_erasing=0.25,
                 mixup=0.8, cutmix=1.0, smoothing=0.1, crop_padding=0, repeated_aug=3, ema_decay=0.99996,
                 amp="fp16", drop_path=0.1, workers=10),
}

# Settings of one invocation rather than of the run: a resume takes them from its own command line.
RESUME_OVERRIDABLE = {"workers", "log_every", "progress", "tensorboard", "stop_after", "keep_last",
                      "save_every", "device", "compile", "resume", "config"}


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, an unusable setting)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eit_fast.train", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML file of settings (keys are these flags' names, e.g. batch_size: 256)")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="named set of defaults; flags still override it")
    g.add_argument("--output", help="run folder for checkpoints and metrics (default: runs/MODEL-TIMESTAMP)")
    g.add_argument("--resume", help="continue a run: its folder (latest checkpoint) or a checkpoint file")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, augmentation and init")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), "
                                                    "cpu, cuda, cuda:N")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="eit_micro", help=f"named config: {', '.join(list_models())}")
    g.add_argument("--impl", default="auto", choices=["reference", "fused", "auto"],
                   help="fused kernels or the reference model (auto: fused when available)")
    g.add_argument("--img-size", type=int, help="override the model's image size")
    g.add_argument("--drop", type=float, help="dropout rate (default: the model config's)")
    g.add_argument("--attn-drop", type=float, help="attention dropout rate (default: the model config's)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the model config's)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (built-in procedural images, a smoke default), a CIFAR-10/100 python "
                        "folder, or a folder with train/ and val/ (or test/) ImageFolder trees")
    g.add_argument("--synthetic-size", type=int, default=8000, help="training images of the synthetic set (plus a quarter as many for validation)")
    g.add_argument("--train-subset", type=int, help="train on a fixed random subset of this many images")
    g.add_argument("--cache", default="auto", choices=["auto", "device", "host", "none"],
                   help="decode images once into a uint8 tensor kept on the device/host (auto: for images up "
                        "to 64 px, on the GPU when it fits); none: DataLoader workers")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank (large images)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4, help="epochs of the run (sets the schedule's length)")
    g.add_argument("--batch-size", type=int, default=128, help="images per rank per micro-batch")
    g.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (see --lr-scale-batch)")
    g.add_argument("--lr-scale-batch", type=int,
                   help="if set, the peak lr is lr * global_batch / this (DeiT: 512)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, per step")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the first step")
    g.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW; none on norms, biases, tokens")
    g.add_argument("--clip-grad", type=float, help="max global gradient norm (default: no clipping)")
    g.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype; fp16 adds a GradScaler "
                                                              "(default: bf16 on CUDA, none on the CPU)")
    g.add_argument("--ema-decay", type=float, default=0.99, help="EMA of the weights, updated per step (decay warmed up as in timm); 0 turns it off")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-padding", type=int, default=4, help="random crop after zero-padding (cached path)")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flip")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="chance a batch is mixed")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="chance of CutMix when both are on")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--randaugment", help="'N,M': RandAugment with N ops at magnitude M (DataLoader path)")
    g.add_argument("--random-erasing", type=float, default=0.0, help="probability (DataLoader path)")
    g.add_argument("--repeated-aug", type=int, default=1, help="DeiT's repeated augmentation count")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept besides best.pt")
    g.add_argument("--save-every", type=int, default=1, help="save a checkpoint every N epochs")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--stop-after", type=int, help="stop after this optimizer step, saving a checkpoint "
                                                  "(to split a run across jobs)")
    g.add_argument("--log-every", type=int, default=20,
                   help="steps between progress updates and loss health checks (each is a host sync)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs (needs tensorboard)")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations the user set on the command line."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {act.dest for act in parser._actions if given & set(act.option_strings)}


def load_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    dests = {act.dest for act in parser._actions}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; see python -m eit_fast.train --help")
    return values


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    recipe = dict(RECIPES[first.recipe]) if first.recipe else {}
    yaml_values = load_yaml(first.config, parser) if first.config else {}
    if "recipe" in yaml_values and not first.recipe:
        recipe = dict(RECIPES[yaml_values["recipe"]])
    parser.set_defaults(**recipe)
    parser.set_defaults(**yaml_values)
    return parser.parse_args(argv), explicit_flags(parser, argv) | set(yaml_values)


# --- the run -------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args: argparse.Namespace, explicit: set[str], dist: distributed.DistInfo):
        self.dist, self.device = dist, dist.device
        self.resume_state, self.ckpt_path = None, None
        if args.resume:
            args = self._load_resume(args, explicit)
        self.args = args
        self._validate()
        self.amp = args.amp or ("bf16" if self.device.type == "cuda" else "none")
        torch.manual_seed(args.seed)  # the same initial weights on every rank; dropout is reseeded below

        aug = AugmentConfig(
            crop_padding=args.crop_padding, hflip=args.hflip, repeats=args.repeated_aug,
            mixup=MixupConfig(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing),
            randaugment=_parse_randaugment(args.randaugment), random_erasing=args.random_erasing)
        img_size = args.img_size or get_config(args.model).img_size
        spec = DataSpec(data=args.data, img_size=img_size, batch_size=args.batch_size,
                        eval_batch_size=args.eval_batch_size, aug=aug, cache=args.cache, workers=args.workers,
                        synthetic_size=args.synthetic_size, train_subset=args.train_subset)
        if not dist.is_main:
            distributed.barrier()  # rank 0 decodes first and fills the decode cache; the others read it
        self.data = build_data(spec, device=self.device, seed=args.seed, rank=dist.rank,
                               world_size=dist.world_size)
        if dist.is_main:
            distributed.barrier()

        overrides = {k: v for k, v in dict(img_size=args.img_size, drop_rate=args.drop,
                                           attn_drop_rate=args.attn_drop,
                                           drop_path_rate=args.drop_path).items() if v is not None}
        self.model = create_model(args.model, impl=args.impl, num_classes=len(self.data.classes),
                                  **overrides).to(self.device)
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
        if self.resume_state is not None:
            self._restore(self.resume_state)
            self.resume_state = None
        else:
            torch.manual_seed(derive_seed(args.seed, 1, dist.rank))  # dropout masks differ across ranks
        self.output = Path(args.output)
        self.tb = None

    # --- set-up helpers --------------------------------------------------------------------------------------
    def _validate(self):
        a = self.args
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "save_every", "eval_every",
                     "repeated_aug"):
            if getattr(a, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
        if a.keep_last < 1:
            raise ConfigError(f"--keep-last must be at least 1, got {a.keep_last}")
        if not 0 <= a.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {a.ema_decay}")
        if a.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{torch.cuda.get_device_name(self.device)} has no bf16; use --amp fp16")
        if not a.resume and list_checkpoints(Path(a.output)):
            raise ConfigError(f"{a.output} already holds checkpoints of a run: continue it with --resume "
                              f"{a.output}, or choose another --output")

    def _load_resume(self, args, explicit) -> argparse.Namespace:
        path = Path(args.resume)
        if path.is_dir():
            ckpts = list_checkpoints(path)
            if not ckpts:
                raise CheckpointError(f"--resume {path}: the folder holds no checkpoint-*.pt")
            path = ckpts[-1]
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
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step, self.best = ts["epoch"], ts["batch"], ts["step"], ts["best"]
        self.epoch_stats.copy_(ts["epoch_stats"])
        self.epoch_images = ts["epoch_images"]
        rngs = ts["rng"]
        if len(rngs) != self.dist.world_size:
            raise CheckpointError(f"the checkpoint was written by {len(rngs)} rank(s), this run has "
                                  f"{self.dist.world_size}: an exact resume needs the same number")
        rng = rngs[self.dist.rank]
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # --- main loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        a, main = self.args, self.dist.is_main
        if main:
            self.output.mkdir(parents=True, exist_ok=True)
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
        previous = self._install_signal_handlers()
        try:
            return self._run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.close()

    def _run(self) -> int:
        a = self.args
        start = time.perf_counter()
        last_eval = None
        while self.epoch < a.epochs:
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            images_before = self.epoch_images
            finished = self._train_epoch()
            train_time = time.perf_counter() - t0
            if not finished:
                self._save_checkpoint()
                reason = f"signal {self.signal}" if self.signal else f"--stop-after {a.stop_after}"
                self._print(f"stopped at step {self.step} ({reason}); checkpoint saved. Continue with: "
                            f"python -m eit_fast.train --resume {self.output}")
                return 128 + self.signal if self.signal else 0
            record = self._end_epoch(train_time, images_before)
            last_eval = record
            self.epoch, self.batch = self.epoch + 1, 0
            self.epoch_stats.zero_()
            self.epoch_images = 0
            if self.epoch % a.save_every == 0 or self.epoch == a.epochs:
                self._save_checkpoint(record)
        if self.dist.is_main:
            meta = {"model": a.model, "config": json.dumps(self.model.cfg.to_dict()),
                    "classes": json.dumps(self.data.classes), "train_args": json.dumps(vars(a))}
            save_safetensors(self.output / "final.safetensors", self.model, meta)
            if self.ema is not None:
                save_safetensors(self.output / "final_ema.safetensors", self.ema.module, meta)
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
                if self._stop_now(log_now):
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

    def _stop_now(self, log_now: bool) -> bool:
        a = self.args
        if a.stop_after is not None and self.step >= a.stop_after:
            return True
        if not self.dist.enabled:
            return self.signal is not None
        if not log_now:  # ranks agree on a signal only at log points, so they all stop at the same step
            return False
        flag = torch.tensor([1.0 if self.signal else 0.0], device=self.device)
        return distributed.all_reduce_sum(flag).item() > 0

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
            r = evaluate(self.model, self.data.val, self.device, self.amp)
            record.update(val_loss=r["loss"], val_top1=r["top1"], val_top5=r["top5"], eval_time_s=r["seconds"])
            if self.ema is not None:
                r = evaluate(self.ema.module, self.data.val, self.device, self.amp)
                record.update(ema_val_loss=r["loss"], ema_val_top1=r["top1"], ema_val_top5=r["top5"])
            if self.best is None or record["val_top1"] > self.best["top1"]:
                self.best = {"top1": record["val_top1"], "epoch": self.epoch + 1}
                record["best"] = True
        record["peak_mem_mib"] = peak_memory_mib(self.device)
        if self.dist.is_main:
            with open(self.output / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
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
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        rngs = distributed.all_gather_objects(rng)
        if not self.dist.is_main:
            return
        state = {
            "format": "eit_fast", "format_version": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "config": {"args": vars(self.args), "model_config": self.model.cfg.to_dict(),
                       "classes": self.data.classes},
            "train_state": {"epoch": self.epoch, "batch": self.batch, "step": self.step, "best": self.best,
                            "epoch_stats": self.epoch_stats.cpu(), "epoch_images": self.epoch_images,
                            "rng": rngs},
        }
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        path = self.output / f"checkpoint-{self.step:08d}.pt"
        atomic_save(lambda tmp: torch.save(state, tmp), path)
        if record is not None and record.get("best"):
            atomic_save(lambda tmp: torch.save(state, tmp), self.output / "best.pt")
        for old in list_checkpoints(self.output)[:-self.args.keep_last]:
            old.unlink()

    # --- misc ------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self.signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.signal = signum
            if self.dist.is_main:
                print(f"\nreceived signal {signum}: saving a checkpoint at the next step", file=sys.stderr,
                      flush=True)
        previous = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, handler)
        return previous

    def _print(self, msg: str):
        if self.dist.is_main:
            print(msg, flush=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-STEP.pt files, oldest first (temporary files of an interrupted write are not matched)."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pt")
             if (m := re.fullmatch(r"checkpoint-(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _parse_randaugment(spec: str | None) -> tuple[int, int] | None:
    if spec in (None, "", "none"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", str(spec))
    if not m:
        raise ConfigError(f"--randaugment expects 'N,M' (ops, magnitude), e.g. 2,9; got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def default_output(model: str) -> str:
    return os.path.join("runs", f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv=None) -> int:
    try:
        args, explicit = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist = distributed.setup(args.device)
    try:
        if not args.output and not args.resume:
            args.output = distributed.broadcast_object(default_output(args.model))
        return Trainer(args, explicit, dist).run()
    except TrainError as e:  # the run failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataError, ConfigError, CheckpointError, ImplError) as e:  # it could not start
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
