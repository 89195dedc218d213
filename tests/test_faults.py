"""Issue 17: machine faults lose nothing. A full disk (and the other write errors) is one `error:` line naming
the file, the cause and the last good checkpoint; a stop request is honoured within a grace period wherever
the run is; an experiment's runs die with it; `evaluate --checkpoint` takes a run folder.

Time bounds here are generous (a loaded 2-core machine) and only ever upper bounds on how long a stop takes
where the work it cuts short would take much longer: they are never speed figures."""
import errno
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eit_fast import evaluate, fileio, stop, train
from eit_fast.checkpoint import read_file
from eit_fast.fileio import WriteError, append_line, atomic_write, atomic_write_text

from test_checkpoint import flip_middle
from test_train import TINY, metrics, same_weights, write_folder

FAST = ["--impl", "reference", "--eval-batch-size", "10", "--keep-last", "10"]  # 10 evaluation batches


def run(out, *args):
    return train.main([*TINY, *FAST, "--output", str(out), *args])


def resume(out, *args):
    return train.main(["--resume", str(out), "--no-progress", *args])


def error_line(err: str) -> str:
    """The one `error:` line of a command's stderr (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_same_run(a, b):
    assert same_weights(a / "final.safetensors", b / "final.safetensors")
    assert same_weights(a / "final_ema.safetensors", b / "final_ema.safetensors")
    ra, rb = metrics(a), metrics(b)
    for key in ("epoch", "train_loss", "val_top1", "val_loss", "ema_val_top1"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run(out) == 0
    return out


# --- injected faults ------------------------------------------------------------------------------------------

def _target(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


def fail_fsync(monkeypatch, name_part: str, err: int, times: int | None = None) -> list:
    """os.fsync fails with `err` for files whose name holds `name_part` (where a full disk, a quota or a dying
    disk shows itself for data already handed to the kernel). Returns the list of hits."""
    real, hits = os.fsync, []

    def fsync(fd):
        if name_part in _target(fd) and (times is None or len(hits) < times):
            hits.append(_target(fd))
            raise OSError(err, os.strerror(err))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return hits


def fail_create(monkeypatch, folder, err: int) -> list:
    """Creating a file in `folder` fails with `err` (a read-only remount, say)."""
    real, hits, folder = os.open, [], str(folder)

    def open_(path, flags, *a, **k):
        if flags & os.O_CREAT and os.path.dirname(os.path.abspath(os.fspath(path))) == folder:
            hits.append(path)
            raise OSError(err, os.strerror(err), os.fspath(path))
        return real(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", open_)
    return hits


CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
          errno.EIO: "an I/O error", errno.EROFS: "the file system is read-only"}


@pytest.mark.parametrize("err", list(CAUSES))
def test_a_write_fault_is_one_line_naming_the_file_the_cause_and_the_last_good_one(tmp_path, err):
    path = tmp_path / "out" / "model.pt"
    atomic_write_text(path, "old")

    def dies(tmp):
        Path(tmp).write_text("half of the new")
        raise OSError(err, os.strerror(err))
    with pytest.raises(WriteError) as info:
        atomic_write(path, dies, what="checkpoint", size_hint=3 * 2**20, last_good="/runs/x/checkpoint-8.pt")
    msg = str(info.value)
    assert msg.startswith(f"could not write the checkpoint {path}: {CAUSES[err]}")
    assert msg.endswith("; the last good one, /runs/x/checkpoint-8.pt, is intact; nothing half-written was left "
                        "behind") and "\n" not in msg
    if err in (errno.ENOSPC, errno.EDQUOT):
        assert " free, 3.0 MiB needed)" in msg
    assert info.value.errno == err and isinstance(info.value, OSError) and info.value.path == path
    assert path.read_text() == "old" and os.listdir(path.parent) == ["model.pt"]


@pytest.mark.parametrize("stage", ["fsync", "rename", "create"])
def test_faults_at_each_stage_leave_the_old_file_and_no_temporary(tmp_path, monkeypatch, stage):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    if stage == "fsync":
        fail_fsync(monkeypatch, "metrics.json", errno.EIO)
    elif stage == "rename":
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    else:
        fail_create(monkeypatch, tmp_path, errno.EROFS)
    with pytest.raises(WriteError, match=f"could not write the file {path}: "):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_torch_and_safetensors_words_for_a_full_disk_are_understood(tmp_path, monkeypatch):
    """torch.save reports a short write as 'unexpected pos' (no errno); safetensors keeps the errno in its
    message only."""
    from safetensors import SafetensorError
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 4096))

    def torch_full(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 56128 vs 56016")

    def safetensors_full(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    for writer in (torch_full, safetensors_full):
        with pytest.raises(WriteError, match=r"no space left on the device \(4.0 KiB free, 1.0 MiB needed\)"):
            atomic_write(tmp_path / "x.pt", writer, size_hint=2**20)
    assert os.listdir(tmp_path) == []


def test_other_errors_pass_unchanged(tmp_path):
    def bug(tmp):
        raise RuntimeError("a bug, not the disk")
    with pytest.raises(RuntimeError, match="a bug, not the disk") as info:
        atomic_write(tmp_path / "x", bug)
    assert not isinstance(info.value, WriteError) and os.listdir(tmp_path) == []
    (tmp_path / "folder").mkdir()
    with pytest.raises(WriteError, match="the path is a folder"):
        atomic_write_text(tmp_path / "folder", "x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="a part of the path is a file, not a folder"):
        atomic_write_text(tmp_path / "file" / "sub" / "y", "x")


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a", "x")
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644  # not mkstemp's 0600
        os.chmod(tmp_path / "a", 0o640)
        atomic_write_text(tmp_path / "a", "y")
        assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640  # a replaced file keeps its own
    finally:
        os.umask(old)


def test_append_line_never_leaves_half_a_record(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_line(log, '{"epoch": 1}')
    before = log.read_bytes()
    real_write = os.write

    def short_then_full(fd, data):
        if _target(fd) == "metrics.jsonl":
            real_write(fd, bytes(data[:5]))  # part of the record reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(WriteError, match=f"could not write the metrics file {log}: no space left on the device.*"
                                         f"the last good one, ckpt-8, is intact"):
        append_line(log, '{"epoch": 2}', what="metrics file", last_good="ckpt-8")
    monkeypatch.undo()
    assert log.read_bytes() == before
    log.write_bytes(before + b'{"epo')  # a crash cut the last record short
    append_line(log, '{"epoch": 2}')
    assert log.read_text().splitlines() == ['{"epoch": 1}', '{"epo', '{"epoch": 2}']


def test_an_exit_at_once_removes_the_writes_under_way_and_only_those(tmp_path):
    atomic_write_text(tmp_path / "done", "x")
    seen = []

    def interrupted(tmp):
        Path(tmp).write_text("half")
        seen.append(fileio.abandon_writes())   # what a second stop signal does before os._exit
        assert not os.path.exists(tmp)
        raise KeyboardInterrupt                # (here os._exit ends the process)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "busy", interrupted)
    assert seen == [[tmp_path / "busy"]] and os.listdir(tmp_path) == ["done"]
    assert fileio.abandon_writes() == []


def test_a_write_error_survives_pickling(tmp_path):
    e = fileio.write_error(tmp_path / "x", OSError(errno.EIO, "io"), what="plot", last_good="y")
    back = pickle.loads(pickle.dumps(e))
    assert (str(back), back.errno, back.path, back.last_good) == (str(e), errno.EIO, tmp_path / "x", "y")


# --- the trainer and the other commands under write faults ---------------------------------------------------

def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_resume_is_exact(tmp_path, capsys, monkeypatch, straight):
    out = tmp_path / "run"
    hits = fail_fsync(monkeypatch, "checkpoint-00000016.pt", errno.ENOSPC)
    assert run(out) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write the checkpoint {out / 'checkpoint-00000016.pt'}: no space "
                           f"left on the device (") and "MiB needed)" in line
    assert line.endswith(f"the last good one, {out / 'checkpoint-00000008.pt'}, is intact; nothing half-written "
                         f"was left behind")
    assert hits and not list(out.glob(".*.tmp")) and not (out / "checkpoint-00000016.pt").exists()
    assert read_file(out / "checkpoint-00000008.pt")["train_state"]["step"] == 8  # loadable
    monkeypatch.undo()
    assert resume(out) == 0
    assert_same_run(straight, out)


def test_a_full_quota_while_writing_metrics(tmp_path, capsys, monkeypatch, straight):
    out = tmp_path / "run"
    assert run(out, "--stop-after", "12") == 0
    before = (out / "metrics.jsonl").read_bytes()
    fail_fsync(monkeypatch, "metrics.jsonl", errno.EDQUOT)
    capsys.readouterr()
    assert resume(out) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write the metrics file {out / 'metrics.jsonl'}: the disk quota is "
                           f"exceeded (") and f"the last good one, {out / 'checkpoint-00000012.pt'}, is intact" in line
    assert (out / "metrics.jsonl").read_bytes() == before  # no half record
    monkeypatch.undo()
    assert resume(out) == 0
    assert_same_run(straight, out)


def test_a_read_only_run_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run(out, "--stop-after", "12") == 0
    fail_create(monkeypatch, out, errno.EROFS)   # remounted read-only while the run was away
    capsys.readouterr()
    assert resume(out) == 2
    assert f"error: argument --output: cannot create or write the run folder {out}: Read-only file system" in \
        error_line(capsys.readouterr().err)
    monkeypatch.undo()
    fail_fsync(monkeypatch, "final.safetensors", errno.EROFS)  # ... and while it runs: at the final export
    assert resume(out) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: could not write the weights file {out / 'final.safetensors'}: the file system is read-only; the "
        f"last good one, {out / 'checkpoint-00000016.pt'}, is intact; nothing half-written was left behind")
    assert not list(out.glob(".*.tmp")) and not (out / "final.safetensors").exists()


def test_an_unwritable_decode_cache_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from eit_fast.data.folder import decode_folder
    write_folder(tmp_path / "tree")
    cache = tmp_path / "cache"
    cache.mkdir()
    fail_create(monkeypatch, cache, errno.EROFS)
    with pytest.warns(UserWarning, match=f"could not write the image cache {re.escape(str(cache))}/imagefolder-.*: "
                                         f"the file system is read-only.*; going on without the cache"):
        images = decode_folder(tmp_path / "tree" / "train", cache_dir=cache).images
    monkeypatch.undo()
    assert images.shape == (8, 3, 32, 32) and os.listdir(cache) == []
    assert torch.equal(decode_folder(tmp_path / "tree" / "train", cache_dir=cache).images, images)
    assert len(os.listdir(cache)) == 1  # written once the disk takes it


def test_the_experiment_and_the_analysis_say_a_write_error_in_one_line(tmp_path, capsys, monkeypatch):
    from eit_fast import analyze
    from eit_fast.experiments import small_data as sd
    write_folder(tmp_path / "data")
    fail_fsync(monkeypatch, "experiment.json", errno.ENOSPC)
    assert sd.main(["--data", str(tmp_path / "data"), "--output", str(tmp_path / "exp"), "--arms",
                    "--arm", "m=eit_micro"]) == 2
    assert error_line(capsys.readouterr().err).startswith(
        f"error: could not write the experiment settings {tmp_path / 'exp' / 'experiment.json'}: no space left")
    fail_fsync(monkeypatch, "analysis.png", errno.EIO)
    assert analyze.main(["eit_micro", "--images", "4", "--batch-size", "4", "--output", str(tmp_path / "an")]) == 2
    assert error_line(capsys.readouterr().err).startswith(
        f"error: could not write the analysis plot {tmp_path / 'an' / 'analysis.png'}: an I/O error")
    assert not [p for p in (tmp_path / "an").iterdir() if p.suffix == ".tmp"]


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MiB tmpfs: room for one epoch's checkpoint and best.pt of eit_micro (6 MiB each), not a third."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine refuses a tmpfs mount: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_real_full_disk(tmp_path, small_disk):
    out = small_disk / "run"
    r = subprocess.run([sys.executable, "-m", "eit_fast.train", *TINY, *FAST, "--keep-last", "1", "--output",
                        str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    line = error_line(r.stderr)
    assert f"error: could not write the checkpoint {out}/" in line and ": no space left on the device (" in line
    assert re.search(r"\(\d+\.\d (KiB|MiB) free, 5\.\d MiB needed\); the last good one, "
                     + re.escape(str(out / "checkpoint-00000008.pt")), line), line
    assert not list(out.glob(".*.tmp"))
    # The free space named is the disk's real one once the temporary file is gone (not the 0 of the moment of
    # failure: torch.save's writer kept the deleted file open until its frames were dropped).
    value, unit = re.search(r"\((\d+\.\d) (KiB|MiB) free", line).groups()
    reported = float(value) * (1024 if unit == "KiB" else 2**20)
    assert abs(reported - shutil.disk_usage(out).free) <= 64 * 1024, (line, shutil.disk_usage(out).free)
    shutil.copytree(out, tmp_path / "roomy")
    assert resume(tmp_path / "roomy") == 0   # the last good checkpoint resumes where there is room
    assert [x["epoch"] for x in metrics(tmp_path / "roomy")] == [1, 2]


def test_a_closed_standard_output_does_not_end_the_run(tmp_path):
    """`train ... | head -1`, or a `| tee` that a Ctrl-C ended first: the run goes on to its end."""
    p = subprocess.Popen([sys.executable, "-m", "eit_fast.train", *TINY, *FAST, "--epochs", "1", "--output",
                          str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    assert p.stdout.readline().startswith("eit_micro (reference")
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=600) == 0, err
    assert "note: standard output is closed; the run goes on" in err and "Traceback" not in err
    assert (tmp_path / "run" / "final.safetensors").is_file()


# --- evaluate --checkpoint RUN_DIR ----------------------------------------------------------------------------

def test_evaluate_takes_a_run_folder(tmp_path, capsys, straight):
    folder = tmp_path / "run"
    shutil.copytree(straight, folder)
    best = read_file(folder / "best.pt")["train_state"]["best"]
    rec = next(r for r in metrics(folder) if r["epoch"] == best["epoch"])

    def evaluated(*extra):
        capsys.readouterr()
        assert evaluate.main(["--checkpoint", str(folder), "--data", "synthetic", *extra]) == 0
        return capsys.readouterr()
    shown = evaluated().out
    assert f"{folder} is a run folder: evaluating best.pt, the checkpoint of the best validation top-1 " \
           f"({best['top1']:.2f}% at epoch {best['epoch']})" in shown
    assert f"top-1 {rec['val_top1']:.2f}%" in shown
    assert f"top-1 {rec['ema_val_top1']:.2f}%" in evaluated("--ema").out
    from eit_fast import analyze   # the analysis takes the same folder the same way
    assert analyze.main([str(folder), "--images", "4", "--batch-size", "4", "--output", str(tmp_path / "an")]) == 0
    assert f"{folder} is a run folder: analysing best.pt" in capsys.readouterr().out
    flip_middle(folder / "best.pt")
    got = evaluated()
    assert "best.pt is corrupt" in got.err and "evaluating final.safetensors, the weights at the end" in got.out
    assert f"top-1 {metrics(folder)[-1]['val_top1']:.2f}%" in got.out
    assert "evaluating final_ema.safetensors" in evaluated("--ema").out
    for f in ("best.pt", "final.safetensors", "final_ema.safetensors", "checkpoint-00000016.pt"):
        (folder / f).unlink()
    assert "evaluating checkpoint-00000008.pt, the newest readable checkpoint" in evaluated().out
    (folder / "checkpoint-00000008.pt").unlink()
    assert evaluate.main(["--checkpoint", str(folder), "--data", "synthetic"]) == 2
    assert "is a folder without best.pt, final.safetensors or checkpoint-*.pt" in error_line(capsys.readouterr().err)


# --- stop requests, in process (exact resumes) -----------------------------------------------------------------

def signal_at(monkeypatch, kind: str, count: int, sig: int) -> dict:
    """Send `sig` to this process during the count-th training step ("train") or evaluation batch ("eval"),
    and wait there until the stop watcher has seen it, so the phase the request meets is certain."""
    real, seen = F.cross_entropy, {"train": 0, "eval": 0}

    def hook(*a, **k):
        which = "train" if torch.is_grad_enabled() else "eval"
        seen[which] += 1
        if which == kind and seen[which] == count:
            requests = stop.current()
            os.kill(os.getpid(), sig)
            deadline = time.monotonic() + 30
            while not (requests.save if sig == signal.SIGUSR1 else requests.stop):
                assert time.monotonic() < deadline, "the watcher never saw the signal"
                time.sleep(0.01)
        return real(*a, **k)
    monkeypatch.setattr(F, "cross_entropy", hook)
    return seen


def test_sigterm_in_a_step_stops_after_it_and_the_resume_is_exact(tmp_path, capfd, monkeypatch, straight):
    out = tmp_path / "run"
    signal_at(monkeypatch, "train", 11, signal.SIGTERM)
    assert run(out) == 128 + signal.SIGTERM
    got = capfd.readouterr()
    assert "received signal 15 (SIGTERM): stopping at the next safe point with a checkpoint" in got.err
    assert "stopped at step 11 (signal 15); checkpoint saved" in got.out
    assert read_file(out / "checkpoint-00000011.pt")["train_state"]["batch"] == 3
    monkeypatch.undo()
    assert resume(out) == 0
    assert_same_run(straight, out)


def test_sigterm_in_evaluation_aborts_it_and_the_resume_redoes_it_exactly(tmp_path, capfd, monkeypatch,
                                                                          straight):
    out = tmp_path / "run"
    seen = signal_at(monkeypatch, "eval", 3, signal.SIGTERM)
    assert run(out) == 128 + signal.SIGTERM
    assert seen["eval"] == 3  # aborted right after the batch it came in, of 10
    assert "stopped in the evaluation of epoch 1 (signal 15); checkpoint saved at the end of its training " \
           "(step 8)" in capfd.readouterr().out
    ts = read_file(out / "checkpoint-00000008.pt")["train_state"]
    assert (ts["epoch"], ts["batch"], ts["step"]) == (0, 8, 8)  # the epoch trained, not yet evaluated
    assert not (out / "metrics.jsonl").exists()
    monkeypatch.undo()
    assert resume(out) == 0
    assert_same_run(straight, out)   # the evaluation was re-run: each epoch once, the same numbers
    assert metrics(out)[0]["images_per_s"] > 0 and metrics(out)[0]["epoch_time_s"] > 0.01


def test_sigusr1_saves_a_checkpoint_and_goes_on(tmp_path, capfd, monkeypatch, straight):
    out = tmp_path / "run"
    signal_at(monkeypatch, "train", 5, signal.SIGUSR1)
    assert run(out) == 0
    assert "checkpoint saved at step 5 (SIGUSR1); going on" in capfd.readouterr().out
    assert_same_run(straight, out)   # saving changed nothing
    monkeypatch.undo()
    assert resume(out / "checkpoint-00000005.pt") == 0
    assert_same_run(straight, out)   # and it resumes exactly


def test_batches_every_rank_has():
    from eit_fast.data.loader import TensorLoader
    images = torch.zeros(101, 3, 8, 8, dtype=torch.uint8)

    def loader(rank, world, train=False):
        return TensorLoader(images, torch.zeros(101, dtype=torch.int64), batch_size=10, train=train,
                            num_classes=2, device="cpu", rank=rank, world_size=world)
    assert [len(loader(r, 2)) for r in (0, 1)] == [5, 6]   # 50 and 51 images
    assert [loader(r, 2).batches_on_every_rank() for r in (0, 1)] == [5, 5]
    assert loader(0, 1).batches_on_every_rank() == 11 and loader(1, 2, train=True).batches_on_every_rank() == 5


# --- stop requests, from outside, with time bounds -------------------------------------------------------------

HARNESS = textwrap.dedent('''
    """python HARNESS PHASE DELAY PROGRESS [train args]: eit_fast.train with one phase slowed by DELAY s per
    step / evaluation batch / decoded image, a line in PROGRESS as each begins."""
    import os, sys, time
    import torch
    import torch.nn.functional as F
    from eit_fast import train
    from eit_fast.data import folder
    phase, delay, progress = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    rank = os.environ.get("RANK", "0")
    seen = {"train": 0, "eval": 0, "decode": 0}

    def mark(kind):
        seen[kind] += 1
        with open(progress, "a") as f:
            f.write(f"{rank} {kind} {seen[kind]}\\n")
        if kind == phase:
            time.sleep(delay)
    real_loss, real_decode = F.cross_entropy, folder._decode_one

    def loss(*a, **k):
        mark("train" if torch.is_grad_enabled() else "eval")
        return real_loss(*a, **k)

    def decode(*a, **k):
        mark("decode")
        return real_decode(*a, **k)
    F.cross_entropy, folder._decode_one = loss, decode
    sys.exit(train.main(sys.argv[4:]))
''')


class Slowed:
    """eit_fast.train in a subprocess with one phase slowed down; its output in files, its progress readable."""

    def __init__(self, tmp_path, phase, delay, args, torchrun=False, env=None):
        (tmp_path / "harness.py").write_text(HARNESS)
        self.progress, self.out_file, self.err_file = (tmp_path / n for n in ("progress", "stdout", "stderr"))
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:0"] if torchrun else [sys.executable]
        self.proc = subprocess.Popen([*head, str(tmp_path / "harness.py"), phase, str(delay), str(self.progress),
                                      *args], stdout=open(self.out_file, "w"), stderr=open(self.err_file, "w"),
                                     cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                                     start_new_session=True)  # a job of its own, as a scheduler sees it

    def wait_for(self, line, timeout=300):
        deadline = time.monotonic() + timeout
        while not (self.progress.is_file() and line in self.progress.read_text().splitlines()):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"never reached {line!r}: " + self.output()
            time.sleep(0.05)

    def wait_for_text(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def signal_and_time_exit(self, sig=signal.SIGTERM, timeout=300) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - t0

    def output(self) -> str:
        return self.out_file.read_text() + self.err_file.read_text()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("phase", ["train", "eval", "decode"])
def test_sigterm_exits_in_time_wherever_the_run_is(tmp_path, monkeypatch, phase):
    """A step of 2 s, an evaluation of 10 x 2 s batches (twice: model and EMA), or decoding 32 images at 1 s
    each: SIGTERM in the middle exits with a resumable checkpoint (nothing to save, in decoding) well before
    the phase would have ended."""
    out, data = tmp_path / "run", []
    cache = tmp_path / "xdg" / "eit_fast"
    if phase == "decode":
        write_folder(tmp_path / "tree", n=16)
        data = ["--data", str(tmp_path / "tree"), "--batch-size", "8"]
    run_args = [*TINY, *FAST, *data, "--output", str(out)]
    delay = {"train": 2.0, "eval": 2.0, "decode": 1.0}[phase]
    p = Slowed(tmp_path, phase, delay, run_args, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    try:
        p.wait_for(f"0 {phase} {3 if phase == 'train' else 2}")
        seconds = p.signal_and_time_exit()
    finally:
        p.kill()
    text = p.output()
    assert p.proc.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and seconds < {"train": 60, "eval": 25, "decode": 15}[phase], (seconds, text)
    if phase == "decode":
        assert "stopped by signal 15 (SIGTERM) during set-up (reading, decoding, caching): nothing to save" in text
        assert os.listdir(out) == ["run.lock"]
        assert not list(cache.glob("imagefolder-*")) and not list(cache.glob(".*.tmp"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert train.main([*run_args, "--epochs", "1"]) == 0  # then it runs, and fills the cache
        assert list(cache.glob("imagefolder-*.safetensors"))
        return
    ckpts = sorted(out.glob("checkpoint-*.pt"))
    ts = read_file(ckpts[-1])["train_state"]
    if phase == "train":
        assert ts["step"] in (3, 4)  # the step it came in (or the next, if the signal came late)
    else:
        assert (ts["epoch"], ts["batch"], ts["step"]) == (0, 8, 8)
        assert max(int(x.split()[2]) for x in p.progress.read_text().splitlines() if " eval " in x) <= 4
    assert resume(out) == 0


def test_sigterm_to_the_whole_job_stops_it_with_a_checkpoint(tmp_path):
    """SLURM's scancel signals every process of the job, DataLoader workers too: they leave the request to the
    trainer (torch's own workers die of SIGTERM, and the trainer then failed on its next batch)."""
    pytest.importorskip("torchvision")
    out = tmp_path / "run"
    p = Slowed(tmp_path, "train", 1.0, [*TINY, *FAST, "--cache", "none", "--workers", "2", "--output", str(out)])
    try:
        p.wait_for("0 train 3")
        t0 = time.monotonic()
        os.killpg(p.proc.pid, signal.SIGTERM)
        p.proc.wait(timeout=300)
        seconds = time.monotonic() - t0
    finally:
        p.kill()
    text = p.output()
    assert p.proc.returncode == 128 + signal.SIGTERM and "Traceback" not in text and seconds < 60, (seconds, text)
    assert read_file(sorted(out.glob("checkpoint-*.pt"))[-1])["train_state"]["step"] in (3, 4)


def test_a_second_sigterm_exits_at_once_saying_what_was_not_saved(tmp_path):
    """SIGUSR1 saves and goes on; then SIGTERM, and a second one before the (5 s) step ends."""
    out = tmp_path / "run"
    p = Slowed(tmp_path, "train", 5.0, [*TINY, *FAST, "--output", str(out)])
    try:
        p.wait_for("0 train 2")
        p.proc.send_signal(signal.SIGUSR1)
        p.wait_for("0 train 3")
        assert "checkpoint saved at step 2 (SIGUSR1); going on" in p.output()
        p.proc.send_signal(signal.SIGTERM)
        p.wait_for_text("received signal 15 (SIGTERM): stopping at the next safe point")
        time.sleep(1.5)
        seconds = p.signal_and_time_exit()
    finally:
        p.kill()
    text = p.output()
    assert p.proc.returncode == 128 + signal.SIGTERM and seconds < 3, (seconds, text)
    assert f"received signal 15 (SIGTERM) again: stopping now without saving; not saved: nothing, " \
           f"{out / 'checkpoint-00000002.pt'} holds step 2" in text
    assert sorted(f.name for f in out.iterdir() if f.suffix in (".pt", ".tmp", ".safetensors")) == \
        ["checkpoint-00000002.pt"]
    assert read_file(out / "checkpoint-00000002.pt")["train_state"]["step"] == 2


def test_torchrun_ranks_stop_together_in_evaluation_and_resume_exactly(tmp_path):
    """Two gloo ranks, 101 validation images (50 and 51: unequal batch counts), SIGTERM to torchrun while both
    evaluate: they abandon it together, one checkpoint holds both ranks' state, and the resumed run ends with
    the weights and numbers of a straight one."""
    args = ["--synthetic-size", "404", "--batch-size", "32", "--epochs", "1", "--no-progress", "--log-every",
            "1", "--eval-batch-size", "10", "--impl", "reference"]
    out = tmp_path / "run"
    p = Slowed(tmp_path, "eval", 1.0, [*args, "--output", str(out)], torchrun=True)
    try:
        p.wait_for("0 eval 2")
        seconds = p.signal_and_time_exit()
    finally:
        p.kill()
    text = p.output()
    assert "eit_fast/" not in text, text  # no traceback of ours (torchrun prints its own)
    assert seconds < 40, text
    assert text.count("stopped in the evaluation of epoch 1 (signal 15)") == 1, text  # rank 0 says it
    ts = read_file(out / "checkpoint-00000006.pt")["train_state"]
    assert (ts["epoch"], ts["batch"], len(ts["rng"])) == (0, 6, 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:0", "-m", "eit_fast.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in ([*torchrun, "--resume", str(out), "--no-progress"],
                [*torchrun, *args, "--output", str(tmp_path / "straight")]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert same_weights(out / "final.safetensors", tmp_path / "straight" / "final.safetensors")
    assert [r["val_top1"] for r in metrics(out)] == [r["val_top1"] for r in metrics(tmp_path / "straight")]


# --- the experiment runner -------------------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # a zombie
    except FileNotFoundError:
        return True


def experiment_cmd(data, out, *extra):
    return [sys.executable, "-m", "eit_fast.experiments.small_data", "--data", str(data), "--output", str(out),
            "--subsets", "16", "--batch-size", "8", "--impl", "reference", "--arms", "--arm", "micro=eit_micro",
            *extra]


def test_a_killed_runner_takes_its_run_with_it_and_a_rerun_resumes(tmp_path):
    """kill -9 of the experiment: its run gets SIGTERM from the kernel (or sees its parent gone) and stops with a
    checkpoint within seconds; the same command then resumes it."""
    from test_small_data import make_tree
    data, out = make_tree(tmp_path / "data"), tmp_path / "exp"
    cmd = experiment_cmd(data, out, "--epochs", "12")
    log = tmp_path / "runner.log"
    runner = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    folder = out / "runs" / "micro-16"
    try:
        deadline = time.monotonic() + 300
        while not (folder / "metrics.jsonl").is_file():   # an epoch trained
            assert runner.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        child = int((folder / "run.lock").read_text())
        runner.kill()   # SIGKILL: no clean-up of its own
        runner.wait()
        t0 = time.monotonic()
        while not _gone(child):
            assert time.monotonic() - t0 < 60, "the run outlived its experiment: " + log.read_text()
            time.sleep(0.1)
    finally:
        runner.kill()
    text = log.read_text()
    assert "received signal 15 (SIGTERM): stopping at the next safe point" in text, text
    assert "checkpoint saved. Continue with" in text and list(folder.glob("checkpoint-*.pt"))
    assert not (folder / "final.safetensors").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"--resume {folder}" in r.stdout and "| micro | eit_micro | - | 16 |" in r.stdout


def hold_lock(lock: Path) -> subprocess.Popen:
    """A process holding a run folder's lock as a run does (its pid in the file), until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); "
                               "print('locked', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_rerun_waits_for_a_run_still_held_or_refuses_with_no_wait(tmp_path):
    from test_small_data import make_tree
    data, out = make_tree(tmp_path / "data"), tmp_path / "exp"
    folder = out / "runs" / "micro-16"
    folder.mkdir(parents=True)
    holder = hold_lock(folder / "run.lock")
    try:
        r = subprocess.run(experiment_cmd(data, out, "--epochs", "1", "--no-wait"), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 1, r.stderr
        assert f"{folder} is in use by process {holder.pid} (it holds {folder / 'run.lock'}); --no-wait" in r.stderr
        assert "runs failed: micro/16 (in use by another process, and --no-wait)" in r.stderr
        log = tmp_path / "runner.log"
        runner = subprocess.Popen(experiment_cmd(data, out, "--epochs", "1"), stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while f"[micro / 16] waiting for process {holder.pid}, which holds {folder / 'run.lock'}" not in \
                log.read_text():
            assert runner.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1)
        assert runner.poll() is None and not list(folder.glob("checkpoint-*"))  # it waits, training nothing
    finally:
        holder.kill()
        holder.wait()
    assert runner.wait(timeout=600) == 0, log.read_text()
    assert "| micro | eit_micro | - | 16 |" in log.read_text()


def test_a_run_stops_when_the_process_that_started_it_is_gone(tmp_path):
    """The fallback where PR_SET_PDEATHSIG is missing: a run told to (stop.PARENT_ENV) watches its parent."""
    log = tmp_path / "child.log"
    child = textwrap.dedent("""
        import sys, time
        from eit_fast import stop
        with stop.handling(raising=False) as requests:
            print("ready", flush=True)
            while not requests.stop:
                time.sleep(0.05)
        print("stopping on", requests.stop, flush=True)
    """)
    parent = textwrap.dedent("""
        import os, subprocess, sys, time
        log = open(sys.argv[2], "w")
        p = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "EIT_FAST_STOP_WITH_PARENT": str(os.getpid())})
        print(p.pid, flush=True)
        while "ready" not in open(sys.argv[2]).read():
            time.sleep(0.05)
        os._exit(0)   # gone without a word to its child (no PR_SET_PDEATHSIG was set)
    """)
    r = subprocess.run([sys.executable, "-c", parent, child, str(log)], capture_output=True, text=True, timeout=120)
    pid = int(r.stdout.split()[0])
    t0 = time.monotonic()
    while not _gone(pid):
        assert time.monotonic() - t0 < 30, log.read_text()
        time.sleep(0.05)
    text = log.read_text()
    assert "is gone: stopping as on SIGTERM" in text and "stopping on 15" in text, text
