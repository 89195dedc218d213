"""python -m eit_fast.train: the default run, exact resume, DDP, signals, failures, bad data."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eit_fast import train
from eit_fast.checkpoint import read_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic-size", "256", "--batch-size", "32", "--epochs", "2", "--no-progress", "--log-every", "1",
        "--eval-batch-size", "256"]


def run(out, *args, capsys=None):
    code = train.main([*TINY, "--output", str(out), *args])
    return code


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_default_run_cli_learns(tmp_path):
    """The README's main job, on a smaller budget: the real CLI, accuracy well above chance (10%)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "eit_fast.train", "--synthetic-size", "4096", "--epochs", "3",
                        "--output", str(out), "--no-progress"], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("done: eit_micro on synthetic, 3 epochs")
    top1 = metrics(out)[-1]["val_top1"]
    assert top1 > 30.0, r.stdout
    assert f"val top-1 {top1:.2f}%" in last
    assert (out / "final.safetensors").is_file() and (out / "final_ema.safetensors").is_file()


def test_metrics_checkpoints_and_retention(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs", "3", "--keep-last", "2") == 0
    recs = metrics(out)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    for key in ("train_loss", "train_top1", "val_top1", "val_top5", "ema_val_top1", "lr", "images_per_s",
                "peak_mem_mib", "epoch_time_s"):
        assert all(key in r for r in recs), key
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-00000016.pt",
                                                                   "checkpoint-00000024.pt"]
    best = read_file(out / "best.pt")
    assert best["train_state"]["best"]["top1"] == max(r["val_top1"] for r in recs)
    assert not list(out.glob(".*.tmp"))
    final = read_file(out / "checkpoint-00000024.pt")
    for key in ("model", "model_ema", "optimizer", "lr_scheduler", "scaler", "config", "train_state"):
        assert key in final
    assert final["train_state"]["rng"][0]["cpu"].dtype == torch.uint8


@pytest.mark.parametrize("extra, stop", [
    ([], 5),                                                          # mid-epoch 1
    (["--accum-steps", "2", "--mixup", "0.8", "--cutmix", "1.0", "--clip-grad", "1.0"], 4),  # epoch boundary
    (["--cache", "none", "--workers", "2"], 5),                       # DataLoader workers, mid-epoch 1
])
def test_resume_is_exact(tmp_path, extra, stop):
    if "--cache" in extra:
        pytest.importorskip("torchvision")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, *extra) == 0
    assert run(split, *extra, "--stop-after", str(stop)) == 0
    assert [p.name for p in split.glob("checkpoint-*.pt")] == [f"checkpoint-{stop:08d}.pt"]
    assert not (split / "final.safetensors").exists()
    assert train.main(["--resume", str(split), "--no-progress"]) == 0
    assert same_weights(straight / "final.safetensors", split / "final.safetensors")
    assert same_weights(straight / "final_ema.safetensors", split / "final_ema.safetensors")
    a, b = metrics(straight), metrics(split)
    assert [r["val_top1"] for r in a] == [r["val_top1"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_evaluate_cli_reproduces_the_final_validation(tmp_path, capsys):
    from eit_fast import evaluate
    out = tmp_path / "run"
    assert run(out, "--seed", "3") == 0
    rec = metrics(out)[-1]
    capsys.readouterr()
    for argv in (["--checkpoint", str(out / "final.safetensors")],
                 ["--checkpoint", str(out / "final_ema.safetensors")],
                 ["--checkpoint", str(out / "checkpoint-00000016.pt"), "--ema"]):
        assert evaluate.main([*argv, "--data", "synthetic", "--device", "cpu"]) == 0
        top1 = rec["ema_val_top1"] if "ema" in " ".join(argv) else rec["val_top1"]
        assert f"top-1 {top1:.2f}%" in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", str(out / "final.safetensors"), "--data", str(tmp_path / "nope")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_model_option_flags_reach_the_model_and_its_exports(tmp_path, capsys):
    """--init/--num-cls-tokens/--q-rank/... build that model; evaluate rebuilds it from the export."""
    from eit_fast import evaluate
    out = tmp_path / "run"
    assert run(out, "--epochs", "1", "--init", "timm", "--num-cls-tokens", "2", "--q-rank", "8",
               "--v-rank", "16", "--impl", "reference") == 0
    cfg = read_file(out / "checkpoint-00000008.pt")["config"]["model_config"]
    assert (cfg["init"], cfg["num_cls_tokens"], cfg["q_rank"], cfg["k_rank"], cfg["v_rank"]) == \
        ("timm", 2, 8, None, 16)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "final.safetensors"), "--data", "synthetic",
                          "--device", "cpu"]) == 0
    assert f"top-1 {metrics(out)[-1]['val_top1']:.2f}%" in capsys.readouterr().out
    assert run(tmp_path / "imp", "--epochs", "1", "--attn-init", "impulse", "--impulse-window", "5") == 0
    cfg = read_file(tmp_path / "imp" / "checkpoint-00000008.pt")["config"]["model_config"]
    assert (cfg["attn_init"], cfg["impulse_window"]) == ("impulse", 5)
    for bad in (["--num-cls-tokens", "0"], ["--q-rank", "-1"], ["--init", "xavier"]):
        try:
            code = run(tmp_path / "bad", *bad)
        except SystemExit as e:  # argparse's own choice check exits
            code = e.code
        assert code == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_resume_refuses_changed_settings_and_reused_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--stop-after", "3") == 0
    assert train.main(["--resume", str(out), "--lr", "0.1"]) == 2
    assert "these flags differ from it: ['lr']" in capsys.readouterr().err
    assert run(out) == 2
    assert f"{out} already holds checkpoints of a run" in capsys.readouterr().err


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(out, "--stop-after", "3") == 0
    good = out / "checkpoint-00000003.pt"
    before = good.read_bytes()
    real_save = torch.save

    def dies_mid_write(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:   # the file is half-written when the process dies
            fh.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", str(out), "--no-progress", "--stop-after", "5"])
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp")) == ["checkpoint-00000003.pt"]
    assert train.main(["--resume", str(out), "--no-progress"]) == 0


def test_bf16_autocast_training_on_cpu(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--amp", "bf16") == 0
    recs = metrics(out)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in recs)
    assert read_file(out / "checkpoint-00000016.pt")["config"]["args"]["amp"] == "bf16"


class NaNAfter(torch.nn.Module):
    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x):
        self.calls -= 1
        out = self.model(x)
        return out * float("nan") if self.calls < 0 else out


def trainer(out, *args):
    a, explicit = train.parse_args([*TINY, "--output", str(out), *args])
    from eit_fast import distributed
    return train.Trainer(a, explicit, distributed.setup("cpu"))


def test_nan_loss_stops_the_run_with_a_clear_message(tmp_path):
    t = trainer(tmp_path / "run")
    t.net = NaNAfter(t.model, calls=11)
    with pytest.raises(train.TrainError, match=r"the loss became NaN/inf at or before step 12 \(epoch 2\)"):
        t.run()
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*.pt")] == ["checkpoint-00000008.pt"]


def test_fp16_scaler_skips_bad_steps_then_gives_up(tmp_path):
    t = trainer(tmp_path / "run", "--amp", "fp16", "--epochs", "30", "--eval-every", "100", "--batch-size", "8",
                "--synthetic-size", "64")
    t.net = NaNAfter(t.model, calls=2)
    with pytest.raises(train.TrainError, match="fp16 loss scale fell below 1"):
        t.run()
    assert t.step > 10  # the scaler skipped steps (halving its scale) before the run gave up
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_sigterm_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eit_fast.train", *TINY, "--epochs", "100", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # let it reach epoch 2
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "received signal 15" in stderr and "checkpoint saved" in stdout
    ckpt = sorted(out.glob("checkpoint-*.pt"))[-1]
    step = read_file(ckpt)["train_state"]["step"]
    assert step > 8 and step % 8  # saved mid-epoch, where the signal came
    assert train.main(["--resume", str(out), "--no-progress", "--stop-after", str(step + 2)]) == 0
    assert read_file(sorted(out.glob("checkpoint-*.pt"))[-1])["train_state"]["step"] == step + 2


def test_yaml_config_and_recipes(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("recipe: cifar\nbatch_size: 64\nepochs: 7\n")
    args, _ = train.parse_args(["--config", str(cfg), "--epochs", "9"])
    assert (args.model, args.batch_size, args.epochs, args.mixup) == ("eit_cifar", 64, 9, 0.0)  # short run
    args, _ = train.parse_args(["--recipe", "deit"])
    assert (args.model, args.lr_scale_batch, args.randaugment, args.repeated_aug, args.amp, args.ema_decay) == \
           ("eit_mini", 512, "2,9", 3, "fp16", 0.99996)
    cfg.write_text("batch-size: 64\nlearning_rate: 1\n")
    with pytest.raises(train.ConfigError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        train.parse_args(["--config", str(cfg)])


def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for act in train.build_parser()._actions:
        if act.option_strings and act.dest != "help":
            assert act.help, f"{act.option_strings} has no help"
            assert act.option_strings[0] in text


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "absent", "data folder not found: {root}/absent"),
    (lambda root: (root / "d" / "train").mkdir(parents=True) or root / "d",
     "{root}/d: has train/ but no val/ or test/ folder"),
    (lambda root: [(root / "d" / s).mkdir(parents=True) for s in ("train", "val")] and root / "d",
     "{root}/d/train has no class sub-folders"),
])
def test_bad_data_errors(tmp_path, capsys, make, message):
    data = make(tmp_path)
    assert run(tmp_path / "run", "--data", str(data)) == 2
    assert message.format(root=tmp_path) in capsys.readouterr().err


def write_folder(root, classes=("a", "b"), n=4, size=32):
    from PIL import Image
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), (i * 40, 0, 0)).save(d / f"{i}.png")


def test_empty_class_and_unreadable_image_are_named(tmp_path, capsys):
    write_folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "c").mkdir()
    assert run(tmp_path / "r1", "--data", str(tmp_path / "d")) == 2
    assert str(tmp_path / "d" / "train" / "c") in capsys.readouterr().err
    (tmp_path / "d" / "train" / "c").rmdir()
    (tmp_path / "d" / "train" / "a" / "1.png").write_bytes(b"not a png")
    assert run(tmp_path / "r2", "--data", str(tmp_path / "d")) == 2  # found while decoding into the cache
    assert str(tmp_path / "d" / "train" / "a" / "1.png") in capsys.readouterr().err
    pytest.importorskip("torchvision")
    assert run(tmp_path / "r3", "--data", str(tmp_path / "d"), "--cache", "none", "--workers", "1",
               "--batch-size", "2") == 2                                  # found by a DataLoader worker
    assert f"cannot read image {tmp_path / 'd' / 'train' / 'a' / '1.png'}" in capsys.readouterr().err


def test_image_folder_trains_and_evaluates(tmp_path, capsys):
    write_folder(tmp_path / "d", n=16)
    out = tmp_path / "run"
    assert run(out, "--data", str(tmp_path / "d"), "--batch-size", "8") == 0
    from eit_fast import evaluate
    capsys.readouterr()
    ckpt = sorted(out.glob("checkpoint-*.pt"))[-1]
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "d"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {metrics(out)[-1]['val_top1']:.2f}%" in printed and "images/s" in printed
    assert f"{tmp_path / 'd' / 'val'}: " in printed and " train / " not in printed  # names what it evaluates


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from eit_fast import distributed, train
    args, explicit = train.parse_args(sys.argv[1:])
    info = distributed.setup("cpu")
    t = train.Trainer(args, explicit, info)
    assert t.run() == 0
    torch.save({"model": t.model.state_dict(), "ema": t.ema.module.state_dict(), "step": t.step},
               f"{args.output}/rank{info.rank}.pt")
    distributed.cleanup()
""")


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", str(script), *TINY,
                        "--output", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert a["step"] == b["step"] == 8  # 256 images / 2 ranks / 32 per batch = 4 steps per epoch
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert r.stdout.count("epoch 2/2") == 1  # only rank 0 prints
    assert (out / "final.safetensors").is_file() and sorted(p.name for p in out.glob("checkpoint-*")) == \
           ["checkpoint-00000004.pt", "checkpoint-00000008.pt"]


def test_torchrun_module_entry_point(tmp_path):
    """The README's form, torchrun -m eit_fast.train (torchrun is torch.distributed.run)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
                        "-m", "eit_fast.train", *TINY, "--epochs", "1", "--output", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 x cpu" in r.stdout and r.stdout.count("done: eit_micro") == 1
    rec = metrics(out)[0]
    assert rec["step"] == 4 and 0 <= rec["val_top1"] <= 100


def write_cifar10(root, per_batch=40, names=None):
    """The CIFAR-10 python layout (data_batch_1..5, test_batch, batches.meta) with random pixels."""
    import pickle
    import numpy as np
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, per_batch)]}
        (d / name).write_bytes(pickle.dumps(batch))
    names = names or [f"c{i}" for i in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_cifar_pickles_train_on_both_loaders(tmp_path, capsys, cache):
    pytest.importorskip("torchvision")
    write_cifar10(tmp_path / "cifar")
    out = tmp_path / "run"
    assert run(out, "--data", str(tmp_path / "cifar"), "--cache", cache, "--train-subset", "128",
               "--workers", "2") == 0
    printed = capsys.readouterr().out
    assert "128 train / 40 val images" in printed
    assert ("uint8 cache" in printed) == (cache == "auto") and ("DataLoader workers" in printed) == (cache == "none")
    assert read_file(out / "checkpoint-00000008.pt")["config"]["classes"] == [f"c{i}" for i in range(10)]


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_gpu(tmp_path, amp):
    out = tmp_path / "run"
    assert run(out, "--device", "cuda", "--amp", amp) == 0
    rec = metrics(out)[-1]
    assert rec["peak_mem_mib"] > 0 and torch.isfinite(torch.tensor(rec["train_loss"]))


CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.slow
def test_eit_cifar_learns_real_cifar10(tmp_path):
    """A smaller version of the CIFAR-10 run in the README: eit_cifar on 5,000 training images."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} is absent")
    import tarfile
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(tmp_path, filter="data")
    out = tmp_path / "run"
    # The recipe's short-budget settings (no dropout, no Mixup/CutMix, timm init); bf16 halves the CPU time.
    code = train.main(["--recipe", "cifar", "--data", str(tmp_path / "cifar10"), "--train-subset", "5000",
                       "--epochs", "2", "--eval-every", "2", "--batch-size", "64", "--amp", "bf16",
                       "--eval-batch-size", "500", "--ema-decay", "0", "--output", str(out), "--no-progress"])
    assert code == 0
    rec = metrics(out)[-1]
    assert rec["val_top1"] > 20.0, rec  # twice chance (10 classes), after 156 steps


SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def test_the_step_loop_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Between log points the loop never pulls a value to the host (a GPU sync). On the CPU we count every
    read-back the package's own code makes during 15 steps; the end-of-epoch health check is the only one."""
    t = trainer(tmp_path / "run", "--log-every", "1000", "--epochs", "1", "--synthetic-size", "512",
                "--mixup", "0.8", "--cutmix", "1.0", "--clip-grad", "1.0")
    package = str(Path(train.__file__).parent)
    reads = []
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(package):
                reads.append(f"{_name} in {caller.co_name}")
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    assert t._train_epoch() is True and t.step == 16
    assert reads == ["item in _check_health"]


@pytest.mark.cuda
def test_no_host_sync_between_log_points_on_gpu(tmp_path):
    t = trainer(tmp_path / "run", "--device", "cuda", "--amp", "bf16", "--log-every", "1000", "--epochs", "3",
                "--mixup", "0.8", "--cutmix", "1.0", "--clip-grad", "1.0")
    t.args.stop_after = 4
    assert t._train_epoch() is False  # warm-up: lazy initialisation may sync
    t.args.stop_after = 12
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert t._train_epoch() is False and t.step == 12
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    if importlib.util.find_spec("tensorboard") is None:
        assert run(out, "--tensorboard") == 2
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
        return
    assert run(out, "--tensorboard") == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_compiled_training_tracks_eager(tmp_path):
    """--compile trains the same model: the losses follow the eager run's closely (not bit for bit)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ["--epochs", "1", "--ema-decay", "0", "--drop-path", "0"]  # no dropout: inductor has its own RNG
    assert run(eager, *common) == 0
    assert run(compiled, *common, "--compile") == 0
    a, b = metrics(eager)[0], metrics(compiled)[0]
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 * a["train_loss"]
