"""Issue 9: nothing lost, nothing silently wrong. Each test here failed before its fix."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eit_fast import evaluate, train
from eit_fast.checkpoint import read_file
from eit_fast.configs import ConfigError
from eit_fast.run_folder import LOCK_NAME, RunFolder

from test_checkpoint import flip_middle
from test_train import TINY, NaNAfter, metrics, run, trainer, write_cifar10, write_folder


def checkpoints(out):
    return sorted(p.name for p in Path(out).glob("checkpoint-*.pt"))


# --- data loss ------------------------------------------------------------------------------------------------

def test_a_stop_never_saves_a_diverged_run_nor_rotates_out_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    t = trainer(out, "--log-every", "100", "--keep-last", "1", "--stop-after", "12")
    t.net = NaNAfter(t.model, calls=9)   # NaN from step 10; the next health check would be at step 100
    with pytest.raises(train.TrainError, match="the loss became NaN/inf"):
        t.run()
    assert checkpoints(out) == ["checkpoint-00000008.pt"]
    state = read_file(out / "checkpoint-00000008.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_weights_are_never_written(tmp_path):
    out = tmp_path / "run"
    t = trainer(out, "--stop-after", "3")
    assert t.run() == 0
    with torch.no_grad():
        t.model.head.weight[0, 0] = float("inf")   # finite loss so far, but the state is not
    with pytest.raises(train.TrainError, match=r"not saving a checkpoint at step 3: 1 tensor\(s\) hold NaN/inf "
                                               r"\(e.g. model.head.weight\).*checkpoint-00000003.pt"):
        t._save_checkpoint()


def test_under_ddp_a_rank_with_clean_weights_stops_with_the_one_holding_nan(tmp_path, monkeypatch):
    """The ranks agree before a checkpoint (an all-reduce of the bad-tensor count), so a rank whose own
    weights are finite raises too instead of waiting alone in the next collective."""
    out = tmp_path / "run"
    t = trainer(out, "--stop-after", "3")
    assert t.run() == 0
    reduced = []

    def other_rank_has_one(x):
        reduced.append(x.clone())
        return x + 1
    monkeypatch.setattr(train.distributed, "all_reduce_sum", other_rank_has_one)
    import dataclasses
    t.dist = dataclasses.replace(t.dist, world_size=2)  # rank 0 of 2
    with pytest.raises(train.TrainError, match="not saving a checkpoint at step 3: another rank's weights hold "
                                               "NaN/inf"):
        t._save_checkpoint()
    assert reduced and reduced[0].item() == 0  # this rank's own count: clean


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eit_fast.train", *TINY, "--epochs", "100", "--output", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert run(out) == 2
        assert f"{out} is in use by another run (process {first.pid} holds" in capsys.readouterr().err
        assert train.main(["--resume", str(out), "--no-progress"]) == 2
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        first.kill()   # SIGKILL: no clean-up runs, yet the kernel drops the lock
        first.communicate()
    folder = RunFolder(out)
    folder.open(new_run=False)   # the killed run left no stale lock
    folder.close()


def test_the_lock_dies_with_its_process(tmp_path):
    (tmp_path / LOCK_NAME).touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match="is in use by another run"):
        RunFolder(tmp_path).open(new_run=True)
    holder.kill()
    holder.wait()
    f = RunFolder(tmp_path)
    f.open(new_run=True)
    with pytest.raises(ConfigError, match="is in use by another run"):   # one lock per run, even in-process
        RunFolder(tmp_path).open(new_run=False)
    f.close()


def test_output_problems_are_found_before_the_data_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "build_data", lambda *a, **k: pytest.fail("built the data first"))
    (tmp_path / "file").write_text("x")
    assert run(tmp_path / "file") == 2
    assert f"error: argument --output: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert run(tmp_path / "file" / "sub") == 2
    assert "error: argument --output: cannot create or write the run folder" in capsys.readouterr().err


# --- small things ---------------------------------------------------------------------------------------------

def test_stale_temporary_files_are_cleaned_up_and_metrics_hold_each_epoch_once(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs", "4", "--save-every", "2", "--stop-after", "28") == 0
    assert checkpoints(out) == ["checkpoint-00000016.pt", "checkpoint-00000028.pt"]
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3]
    (out / "checkpoint-00000028.pt").unlink()        # killed mid-write of its checkpoint:
    (out / ".checkpoint-00000028.pt.x1y2.tmp").write_bytes(b"half")   # its temporary is all that is left
    assert train.main(["--resume", str(out), "--no-progress"]) == 0   # redoes epoch 3 from step 16
    assert not list(out.glob(".*.tmp"))
    assert [r["epoch"] for r in metrics(out)] == [1, 2, 3, 4]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--stop-after", "12") == 0
    assert checkpoints(out) == ["checkpoint-00000008.pt", "checkpoint-00000012.pt"]
    flip_middle(out / "checkpoint-00000012.pt")
    capsys.readouterr()
    assert train.main(["--resume", str(out / "checkpoint-00000012.pt"), "--no-progress"]) == 2
    assert "checkpoint-00000012.pt is corrupt: its contents do not match the checksum" in capsys.readouterr().err
    assert train.main(["--resume", str(out), "--no-progress", "--stop-after", "10"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint-00000012.pt is corrupt" in captured.err
    assert "resuming from the previous checkpoint, checkpoint-00000008.pt" in captured.err
    assert "resuming" in captured.out and "checkpoint-00000008.pt at epoch 1 step 8" in captured.out
    assert "checkpoint-00000010.pt" in checkpoints(out)


def test_resume_refuses_other_data_naming_the_difference(tmp_path, capsys):
    data = tmp_path / "d"
    write_folder(data, n=16)
    out = tmp_path / "run"
    assert run(out, "--data", str(data), "--batch-size", "8", "--stop-after", "3") == 0
    (data / "train" / "a" / "0.png").unlink()
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--no-progress"]) == 2
    assert "the data are not those the run was trained on: train set: 32 images in the checkpoint's data, " \
           "31 now" in capsys.readouterr().err
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / "train" / "a" / "0.png")   # same name, other pixels
    assert train.main(["--resume", str(out), "--no-progress"]) == 2
    assert "train set: the same 32 images by count, but files or contents changed" in capsys.readouterr().err
    write_folder(tmp_path / "more", classes=("c",), n=16)
    for split in ("train", "val"):
        (tmp_path / "more" / split / "c").rename(data / split / "c")
    assert train.main(["--resume", str(out), "--no-progress"]) == 2
    assert "train classes: extra ['c']" in capsys.readouterr().err


def test_stop_after_must_lie_ahead_of_the_resumed_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--stop-after", "5") == 0
    assert train.main(["--resume", str(out), "--no-progress", "--stop-after", "5"]) == 2
    assert "argument --stop-after: 5 is not after the checkpoint's step 5" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "typo"), "--no-progress"]) == 2
    assert f"--resume {tmp_path / 'typo'}: no such run folder or checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "run.lock").exists()


def test_signal_is_reported_once_and_only_by_the_trainer_process(capfd, monkeypatch):
    """A forked child (a DataLoader worker) that gets the signal too (a terminal's Ctrl-C reaches the whole
    process group) neither counts as a request of the trainer's nor writes into its signal pipe; the same
    signal twice within a second is one request, a later one the 'stop at once'."""
    from eit_fast import stop
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    with stop.handling(raising=False) as requests:
        exits = []
        monkeypatch.setattr(requests, "_exit_now", exits.append)
        pid = os.fork()
        if pid == 0:  # the "worker"
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        time.sleep(0.5)
        assert requests.stop == 0 and "received signal" not in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10
        while not requests.stop:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        requests._on_signal(signal.SIGINT)   # the same request delivered twice: counted once
        assert exits == []
        requests._first_at -= stop.DUPLICATE_WINDOW_S
        requests._on_signal(signal.SIGINT)
        assert exits == [signal.SIGINT]
    assert requests.stop == signal.SIGINT
    assert capfd.readouterr().err.count("received signal 2 (SIGINT): stopping at the next safe point") == 1
    assert signal.getsignal(signal.SIGINT) is before  # put back


# --- numeric flags and YAML -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--clip-grad", "-1"], "--clip-grad"), (["--clip-grad", "0"], "--clip-grad"),
    (["--smoothing", "1.5"], "--smoothing"), (["--min-lr", "0.01"], "--min-lr"),
    (["--warmup-lr", "1"], "--warmup-lr"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--lr", "nan"], "--lr"), (["--lr", "-0.01"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--eval-batch-size", "0"], "--eval-batch-size"), (["--stop-after", "0"], "--stop-after"),
    (["--synthetic-size", "0"], "--synthetic-size"), (["--epochs", "0"], "--epochs"),
    (["--drop", "1"], "--drop"), (["--drop-path", "-0.1"], "--drop-path"), (["--workers", "-1"], "--workers"),
    (["--mixup-prob", "2"], "--mixup-prob"), (["--mixup", "-1"], "--mixup"), (["--seed", "-1"], "--seed"),
    (["--randaugment", "2,99"], "--randaugment"), (["--ema-decay", "1"], "--ema-decay"),
    (["--accum-steps", "0"], "--accum-steps"), (["--keep-last", "0"], "--keep-last"),
    (["--random-erasing", "1.5"], "--random-erasing"), (["--img-size", "0"], "--img-size"),
    (["--train-subset", "0"], "--train-subset"), (["--lr-scale-batch", "0"], "--lr-scale-batch"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--crop-padding", "-2"], "--crop-padding"),
])
def test_numeric_flags_are_range_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, flag):
    monkeypatch.setattr(train, "build_data", lambda *a, **k: pytest.fail("built the data first"))
    assert train.main([*argv, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {flag}: ") and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_every_numeric_flag_has_a_range():
    from eit_fast.train_args import RANGES
    numeric = {a.dest for a in train.build_parser()._actions if a.type in (int, float)}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("text, message", [
    ("epochs: 1.5\n", "epochs: expected an integer, got 1.5"),
    ('hflip: "no"\n', "hflip: expected true or false, got 'no'"),
    ("cache: bogus\n", "cache: invalid choice 'bogus'"),
    ("amp: fp32\n", "amp: invalid choice 'fp32'"),
    ("recipe: bogus\n", "recipe: invalid choice 'bogus'"),
    ("batch_size: [64]\n", "batch_size: expected a single int"),
    ("lr: -1\n", "argument --lr: must be > 0, got -1.0"),
    ("lr: .nan\n", "argument --lr: must be > 0, got nan"),
    ("seed: null\n", "seed: needs a value"),
])
def test_yaml_values_get_the_command_lines_checks(tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        train.parse_args(["--config", str(cfg)])


def test_yaml_values_convert_as_on_the_command_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 1e-3\nhflip: false\nepochs: 3\ncache: host\nclip_grad: 1\n")
    args, explicit = train.parse_args(["--config", str(cfg)])
    assert (args.lr, args.hflip, args.epochs, args.cache, args.clip_grad) == (1e-3, False, 3, "host", 1.0)
    assert isinstance(args.lr, float) and isinstance(args.clip_grad, float)
    assert {"lr", "hflip", "epochs", "cache", "clip_grad"} <= explicit


# --- crashes with unclear errors ------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path / "run", "--device", "cuda") == 2
    assert "error: argument --device: cuda asked for, but this machine has no usable CUDA GPU" in \
        capsys.readouterr().err
    assert evaluate.main(["--checkpoint", "x.pt", "--data", "synthetic", "--device", "cuda"]) == 2
    assert "error: argument --device: cuda asked for" in capsys.readouterr().err


def test_bad_values_and_batch_sizes_are_errors_not_tracebacks(tmp_path, capsys):
    assert evaluate.main(["--checkpoint", "x.pt", "--data", "synthetic", "--batch-size", "0"]) == 2
    assert "error: argument --batch-size: must be >= 1, got 0" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", "x.pt", "--data", "synthetic", "--device", "tpu:3"]) == 2
    assert "error: argument --device: 'tpu:3' is not a device" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", "x.pt", "--data", "synthetic", "--device", "meta"]) == 2
    assert "error: argument --device: 'meta' is not supported" in capsys.readouterr().err
    assert run(tmp_path / "run", "--batch-size", "512") == 2
    assert "256 training samples over 1 rank(s) give no full batch of 512; lower --batch-size" in \
        capsys.readouterr().err


@pytest.mark.parametrize("meta, message", [
    ({"config": "{not json"}, "metadata entry 'config' is not valid JSON"),
    ({"config": "[1, 2]"}, "metadata entry 'config' should be a JSON dict, found list"),
    ({"config": '{"no_such_field": 1}'}, "its recorded model config is unusable"),
    ({"config": "{}", "classes": '"abc"'}, "metadata entry 'classes' should be a JSON list, found str"),
    ({"config": "{}", "train_args": "3"}, "metadata entry 'train_args' should be a JSON dict, found int"),
])
def test_malformed_export_metadata_is_a_clear_error(tmp_path, capsys, meta, message):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"), metadata=meta)
    assert evaluate.main(["--checkpoint", str(tmp_path / "w.safetensors"), "--data", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# --- evaluation uses the class names stored with the weights ------------------------------------------------

def cifar_as_image_folder(cifar_root, out):
    """The CIFAR pickles' test images as a train/ + val/ ImageFolder tree (folders sort alphabetically)."""
    from eit_fast.data.cifar import read_cifar
    test = read_cifar(cifar_root, "cifar10", train=False)
    for split in ("train", "val"):
        for i, (img, label) in enumerate(zip(test.images, test.labels)):
            d = out / split / test.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")


def test_evaluate_maps_another_class_order_through_the_stored_names(tmp_path, capsys):
    names = [f"{chr(ord('z') - i)}{i}" for i in range(10)]   # z0, y1, ...: not in sorted order
    write_cifar10(tmp_path / "cifar", names=names, per_batch=60)
    out = tmp_path / "run"
    assert run(out, "--data", str(tmp_path / "cifar"), "--epochs", "1") == 0
    rec = metrics(out)[-1]
    cifar_as_image_folder(tmp_path / "cifar", tmp_path / "tree")
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "final.safetensors"), "--data", str(tmp_path / "tree")]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {rec['val_top1']:.2f}%" in printed and f"loss {rec['val_loss']:.4f}" in printed
    (tmp_path / "tree" / "val" / "z0").rename(tmp_path / "tree" / "val" / "zz")
    (tmp_path / "tree" / "train" / "z0").rename(tmp_path / "tree" / "train" / "zz")
    assert evaluate.main(["--checkpoint", str(out / "final.safetensors"), "--data", str(tmp_path / "tree")]) == 2
    assert "its classes are not the ones the weights were trained on (missing ['z0'], extra ['zz'])" in \
        capsys.readouterr().err


def test_train_and_val_class_mismatch_names_the_classes(tmp_path, capsys):
    write_folder(tmp_path / "d")
    (tmp_path / "d" / "val" / "b").rename(tmp_path / "d" / "val" / "q")
    assert run(tmp_path / "run", "--data", str(tmp_path / "d")) == 2
    assert "(missing ['b'], extra ['q'])" in capsys.readouterr().err


# --- images ---------------------------------------------------------------------------------------------------

def grey16(path):
    ramp = (np.arange(32 * 32, dtype=np.uint32) * 64).reshape(32, 32).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(path)
    return ramp


def test_16_bit_greyscale_is_scaled_on_both_paths(tmp_path):
    from eit_fast.data.folder import decode_images
    from eit_fast.data.loader import _SeededItems
    ramp = grey16(tmp_path / "g.png")
    expected = np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8)
    cached = decode_images([tmp_path / "g.png"])[0]
    assert all(torch.equal(cached[c], torch.from_numpy(expected)) for c in range(3))
    assert int(cached.max()) == 255 and float(cached.float().mean()) < 200   # clipping gave 255 almost everywhere
    img = _SeededItems([tmp_path / "g.png"], torch.zeros(1), None)._image(0)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 0], expected)


def test_an_image_over_the_pixel_limit_is_named_on_the_dataloader_path(tmp_path, monkeypatch):
    from eit_fast.data.arrays import DataError
    from eit_fast.data.loader import _SeededItems
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 64x64 is then over twice the limit: an error
    with pytest.raises(DataError, match=f"cannot read image {tmp_path / 'big.png'}: DecompressionBombError"):
        _SeededItems([tmp_path / "big.png"], torch.zeros(1), None)._image(0)


def test_the_command_line_modules_print_no_traceback_for_mistakes(tmp_path):
    for argv, message in [
        (["eit_fast.train", "--lr", "-0.01"], "error: argument --lr: must be > 0, got -0.01"),
        (["eit_fast.train", "--img-size", "7", "--output", str(tmp_path / "r")], "error: synthetic data: "),
        (["eit_fast.train", "--drop", "0.5", "--model", "nope"], "error: "),
        (["eit_fast.evaluate", "--checkpoint", str(tmp_path), "--data", "synthetic"],
         "is a folder without best.pt, final.safetensors or checkpoint-*.pt: not a run folder"),
    ]:
        r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
