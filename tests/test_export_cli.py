"""python -m eit_fast.export on a checkpoint of a tiny `python -m eit_fast.train` run: each format end to
end, --ema, --validate, a run folder or a file, and bad input refused with one `error:` line (exit code 2)
and nothing written."""
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eit_fast import export, train
from eit_fast.checkpoint import read_file
from eit_fast.deploy import formats, load_exported, read_metadata
from eit_fast.evaluate import load_model_for_eval

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--synthetic-size", "256", "--batch-size", "32", "--epochs", "1", "--no-progress", "--log-every", "1",
        "--eval-batch-size", "256", "--impl", "reference"]
SUFFIX = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".torchscript.pt",
          "exported-program": ".pt2"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    with pytest.MonkeyPatch.context() as mp:  # the trainer's caches stay out of ~/.cache
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
        assert train.main([*TINY, "--output", str(out)]) == 0
    assert (out / "best.pt").is_file() and (out / "final.safetensors").is_file()
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy of the run folder, so that a test that writes there cannot affect another."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("run.lock"))
    return dst


def export_cli(capsys, *args):
    code = export.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def reference(path, ema=False):
    model, _, classes = load_model_for_eval(str(path), None, ema)
    return model.eval(), classes


def max_diff(out: str) -> float:
    m = re.search(r"max abs difference ([0-9.e+-]+), relative ([0-9.e+-]+)", out)
    assert m, out
    return float(m.group(2))


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_each_format_end_to_end(fmt, run_copy, capsys):
    target = run_copy / f"model{SUFFIX[fmt]}"
    extra = ["--validate", "synthetic"] if fmt == "onnx" else []  # validation costs one ONNX export only
    code, out, err = export_cli(capsys, run_copy, "--format", fmt, "--output", target, "--batch-size", 5, *extra)
    assert code == 0, err
    assert f"{run_copy} is a run folder: exporting best.pt" in out
    assert f"wrote {target}" in out
    assert max_diff(out) < 1e-4
    if fmt != "onnx":
        assert max_diff(out) == 0.0  # the same PyTorch ops on the same weights
    model, classes = reference(run_copy / "best.pt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    got = load_exported(target, fmt)(x)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    meta = read_metadata(target, fmt)
    assert json.loads(meta["classes"]) == classes and meta["model"] == "eit_micro" and meta["source"] == "best.pt"
    assert json.loads(meta["config"]) == model.cfg.to_dict() and json.loads(meta["input_size"]) == [3, 32, 32]
    assert not list(run_copy.glob(".*.tmp"))
    if fmt == "onnx":
        best_top1 = read_file(run_copy / "best.pt")["train_state"]["best"]["top1"]
        line = next(ln for ln in out.splitlines() if ln.startswith("validated on"))
        assert f"PyTorch top-1 {best_top1:.2f}%, onnx top-1 {best_top1:.2f}%" in line, line
        assert "agree on 100.00% of 100 images" in line


def test_default_output_ema_and_safetensors_round_trip(run_copy, capsys):
    code, out, err = export_cli(capsys, run_copy, "--format", "safetensors", "--ema")
    assert code == 0, err
    target = run_copy / "best_ema.safetensors"
    assert f"wrote {target}" in out
    ema = read_file(run_copy / "best.pt")["model_ema"]
    got = load_file(str(target))
    assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in got)
    # The export is itself a checkpoint export can start from, and evaluate reads it (config, classes, args).
    model, run_args, classes = load_model_for_eval(str(target), None, False)
    assert run_args["synthetic_size"] == 256 and classes == reference(run_copy / "best.pt")[1]
    code, out, err = export_cli(capsys, target, "--format", "torchscript")
    assert code == 0, err
    assert (run_copy / "best_ema.torchscript.pt").is_file()


def _refused(capsys, folder, args, match):
    before = sorted(p.name for p in folder.iterdir())
    code, out, err = export_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(match, lines[0]), err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, no temporary file left


def test_bad_input_is_refused_with_one_line(run_copy, capsys, tmp_path):
    ck = run_copy / "best.pt"
    corrupt = run_copy / "corrupt.pt"
    corrupt.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    (run_copy / "a_folder").mkdir()
    (run_copy / "a_file").write_text("x")
    cases = [
        ([ck, "--format", "tflite"], r"unknown format 'tflite'; choose one of onnx, safetensors"),
        ([corrupt, "--format", "torchscript"], r"corrupt\.pt is not a readable checkpoint"),
        ([run_copy / "missing.pt", "--format", "torchscript"], r"checkpoint not found"),
        ([ck, "--format", "torchscript", "--output", run_copy / "a_folder"], r"is a folder; give a file name"),
        ([ck, "--format", "torchscript", "--output", run_copy / "a_file" / "m.pt"], r"a_file is a file, not a folder"),
        ([run_copy / "final.safetensors", "--format", "safetensors"], r"is the checkpoint itself"),
        ([run_copy / "final.safetensors", "--format", "torchscript", "--ema"], r"has no 'model_ema' entry"),
        ([ck, "--format", "onnx", "--opset", "16"], r"opset 16 is not available: eit_fast exports opset 17"),
        ([ck, "--format", "torchscript", "--batch-size", "0"], r"argument --batch-size"),
        ([ck, "--format", "torchscript", "--validate", tmp_path / "no_data"], r"data folder not found"),
    ]
    for args, match in cases:
        _refused(capsys, run_copy, args, match)


def test_a_missing_runtime_is_named(run_copy, capsys, monkeypatch):
    ck = run_copy / "best.pt"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    _refused(capsys, run_copy, [ck, "--format", "onnx", "--validate", "synthetic"],
             r"running the ONNX export needs onnxruntime: pip install 'eit_fast\[onnx\]'")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    _refused(capsys, run_copy, [ck, "--format", "onnx"], r"ONNX export needs onnxscript: pip install")


def test_a_failed_check_writes_nothing(run_copy, capsys, monkeypatch):
    """An export that does not compute what PyTorch computes never reaches its path (nor replaces a good one)."""
    target = run_copy / "model.torchscript.pt"
    target.write_bytes(b"the previous good export")
    good = formats.FORMATS["torchscript"]

    def wrong(path):
        run = good.load(path)
        return lambda x: run(x) + 1e-2

    monkeypatch.setitem(formats.FORMATS, "torchscript", dataclasses.replace(good, load=wrong))
    _refused(capsys, run_copy, [run_copy / "best.pt", "--format", "torchscript", "--output", target],
             r"the torchscript export differs from PyTorch: relative error .* > 0\.0001.*nothing was written")
    assert target.read_bytes() == b"the previous good export"


def test_sigterm_during_the_export_leaves_nothing(run_copy):
    """A scheduler's SIGTERM while the ONNX graph is being made: the process stops at once, saying so, and
    neither the output nor a temporary file is left."""
    pytest.importorskip("onnxscript")
    target = run_copy / "stopped.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "eit_fast.export", str(run_copy), "--format", "onnx",
                             "--output", str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    first = proc.stdout.readline()  # printed just before the checkpoint is read and the export starts
    assert "is a run folder: exporting best.pt" in first, first
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (first + out, err)
    assert "stopped by signal 15 (SIGTERM) before the export was written" in err, err
    assert "wrote" not in out and not target.exists() and not list(run_copy.glob(".*.tmp"))
