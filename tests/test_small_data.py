"""python -m eit_fast.experiments.small_data: arms, data archives, resume, tables; and the ResNet baseline."""
import csv
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eit_fast import train
from eit_fast.checkpoint import read_file
from eit_fast.configs import ConfigError
from eit_fast.experiments import small_data as sd
from eit_fast.factory import create_trainable, model_from_config
from eit_fast.runtime import ImplError

torchvision = pytest.importorskip("torchvision")


def make_tree(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """A tiny ImageFolder data set of 32 px PNGs in 2 classes, told apart by brightness."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, (name, base) in enumerate((("dark", 40), ("light", 200))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i}.png")
    return root


def experiment(tmp_path, data, *extra):
    return subprocess.run([sys.executable, "-m", "eit_fast.experiments.small_data", "--data", str(data),
                           "--output", str(tmp_path / "exp"), "--subsets", "8", "16", "--epochs", "1",
                           "--batch-size", "8", "--arms", "--arm", "micro=eit_micro", *extra],
                          capture_output=True, text=True, timeout=600)


# --- the ResNet-18 baseline ----------------------------------------------------------------------------------

def test_resnet18_cifar_is_torchvisions_with_a_32px_stem():
    m = create_trainable("resnet18_cifar", num_classes=7)
    ref = torchvision.models.resnet18(num_classes=7)
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(m.maxpool, torch.nn.Identity)
    # Only the stem differs from torchvision's: 3*64*3*3 weights instead of 3*64*7*7.
    n, n_ref = (sum(p.numel() for p in x.parameters()) for x in (m, ref))
    assert n_ref - n == 3 * 64 * (49 - 9)
    feats = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    assert feats(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)  # stages at 32, 16, 8, 4 px
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert m.impl == "reference" and model_from_config(m.cfg.to_dict()).fc.out_features == 7


def test_resnet18_cifar_refuses_eit_options_and_fused():
    with pytest.raises(ConfigError, match=r"torchvision baseline.*\['num_cls_tokens'\]"):
        create_trainable("resnet18_cifar", num_cls_tokens=2)
    with pytest.raises(ImplError, match="no fused implementation"):
        create_trainable("resnet18_cifar", impl="fused")
def test_train_refuses_eit_flags_for_the_baseline(tmp_path, capsys):
    assert train.main(["--model", "resnet18_cifar", "--init", "timm", "--output", str(tmp_path / "r")]) == 2
    assert "the EIT option(s) ['init'] do not apply" in capsys.readouterr().err


def test_the_recipes_eit_settings_skip_the_baseline():
    """`--recipe cifar` sets EIT drop rates and init; a ResNet trained under it takes none of them (so every arm
    of the experiment can share the recipe), while an EIT takes them all."""
    from eit_fast.train_args import model_overrides, parse_args
    args, explicit = parse_args(["--recipe", "cifar", "--model", "resnet18_cifar"])
    assert model_overrides(args, explicit) == {}
    args, explicit = parse_args(["--recipe", "cifar", "--model", "eit_cifar"])
    assert {"drop_rate", "attn_drop_rate", "drop_path_rate", "init"} <= set(model_overrides(args, explicit))


def test_resnet18_cifar_trains_and_evaluates_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--model", "resnet18_cifar", "--synthetic-size", "64", "--batch-size", "32",
                       "--epochs", "1", "--no-progress", "--output", str(out)]) == 0
    assert read_file(sorted(out.glob("checkpoint-*.pt"))[-1])["config"]["model_config"]["baseline"] == \
        "resnet18_cifar"
    from eit_fast import evaluate
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "final.safetensors"), "--data", "synthetic"]) == 0
    val = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"]
    assert f"{val:.2f}%" in capsys.readouterr().out  # the same weights, rebuilt from the recorded config


# --- arms and data -------------------------------------------------------------------------------------------

def test_parse_arm_and_bad_arms():
    arm = sd.parse_arm("vit_t=vit_cifar,init=torch,--q-rank=8")
    assert arm == sd.Arm("vit_t", "vit_cifar", {"init": "torch", "q_rank": "8"})
    assert arm.train_flags() == ["--init", "torch", "--q-rank", "8"]
    for bad in ("novalue", "x=", "x=eit_cifar,init", "a b=eit_cifar"):
        with pytest.raises(ConfigError, match="--arm"):
            sd.parse_arm(bad)
    with pytest.raises(ConfigError, match="unknown arm 'vitt'"):
        sd.select_arms(["vitt"], [])
    with pytest.raises(ConfigError, match="name 'eit' is taken"):
        sd.select_arms(["eit"], ["eit=eit_cifar,init=torch"])
    assert [a.name for a in sd.select_arms(list(sd.DEFAULT_ARMS), [])] == ["eit", "vit", "resnet"]


@pytest.mark.parametrize("argv, msg", [
    (["--arm", "x=eit_cifar,q_rank=0"], "q-rank"),
    (["--arm", "x=nosuch"], "unknown model 'nosuch'"),
    (["--arm", "x=eit_cifar,bogus=1"], "trainer refuses"),
    (["--arm", "x=resnet18_cifar,num_cls_tokens=2"], "do not apply"),
    (["--arms"], "no arms to run"),
    (["--subsets", "0"], "must be positive"),
    (["--epochs", "0"], "must be positive"),
])
def test_bad_input_fails_before_any_training(tmp_path, capsys, argv, msg):
    data = make_tree(tmp_path / "data", n_train=1, n_test=1)
    assert sd.main(["--data", str(data), "--output", str(tmp_path / "exp"), "--arms", *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_missing_data_is_named(tmp_path, capsys):
    assert sd.main(["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "exp")]) == 2
    assert "no such folder or archive" in capsys.readouterr().err


def test_data_from_an_archive_is_extracted_once(tmp_path):
    make_tree(tmp_path / "src" / "mydata", n_train=2, n_test=1)
    tgz = tmp_path / "mydata.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "mydata", arcname="mydata")
    root = sd.resolve_data(str(tgz), str(tmp_path / "x"))
    assert root.name == "mydata" and (root / "train" / "dark" / "0.png").is_file()
    assert sd.resolve_data(str(tgz), str(tmp_path / "x")) == root
    assert [p.name for p in (tmp_path / "x").iterdir()] == [root.parent.name]  # no temporary folder left
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="neither a folder nor a tar archive"):
        sd.resolve_data(str(tmp_path / "junk.tar.gz"), None)
    with pytest.raises(ConfigError, match="no such folder"):
        sd.resolve_data(str(tmp_path / "absent"), None)


def test_dry_run_prints_the_same_subset_and_recipe_for_every_arm(tmp_path):
    data = make_tree(tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "eit_fast.experiments.small_data", "--data", str(data),
                        "--output", str(tmp_path / "exp"), "--subsets", "5000", "--arms", "eit", "vit", "resnet",
                        "vit_impulse", "eit_cls4", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    for line, extra in zip(lines, ("", "", "", " --attn-init impulse", " --num-cls-tokens 4")):
        assert "--recipe cifar" in line and "--train-subset 5000 --epochs 10 --seed 0" in line
        assert line.endswith("--no-progress" + extra), line
    assert not (tmp_path / "exp").exists()  # a dry run writes nothing


def test_subsets_are_nested_and_the_same_for_every_arm():
    """The trainer's --train-subset under one seed: the arm does not enter it, and 5k lies inside 10k."""
    from eit_fast.data.build import subset_indices
    small, large = subset_indices(50_000, 5_000, 0), subset_indices(50_000, 10_000, 0)
    assert set(small.tolist()) < set(large.tolist())
    assert not torch.equal(small, subset_indices(50_000, 5_000, 1))


def test_model_cost_counts_params_and_macs(tmp_path):
    from eit_fast import count_macs, get_config
    data = make_tree(tmp_path / "data", n_train=1, n_test=1)
    s = sd.build_parser().parse_args(["--data", str(data), "--output", str(tmp_path / "exp")])

    def cost(arm):
        return sd.model_cost(arm, sd.arm_overrides(arm, s, data), 10)
    p, macs = cost(sd.Arm("eit", "eit_cifar"))
    assert p == sum(x.numel() for x in create_trainable("eit_cifar").parameters())
    assert macs == count_macs(get_config("eit_cifar")).total
    p, macs = cost(sd.Arm("r", "resnet18_cifar"))
    assert p == 11_173_962 and 0.55e9 < macs < 0.56e9  # ResNet-18 at 32 px: 0.56 GMACs, as usually quoted
    # Options arrive typed as the trainer reads them: a float rate, an int rank, an init (ignored here).
    p, _ = cost(sd.parse_arm("x=eit_cifar,drop=0.1,q_rank=32,init=torch"))
    assert p == sum(x.numel() for x in create_trainable("eit_cifar", q_rank=32).parameters())


# --- the whole experiment --------------------------------------------------------------------------------------

def test_experiment_runs_resumes_and_keeps_finished_arms(tmp_path):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "exp"
    # A run of arm "micro" on 16 images was interrupted after one step: the experiment resumes it.
    half = out / "runs" / "micro-16"
    assert train.main(["--recipe", "cifar", "--model", "eit_micro", "--data", str(data), "--train-subset", "16",
                       "--epochs", "1", "--seed", "0", "--eval-every", "1", "--impl", "auto", "--batch-size", "8",
                       "--output", str(half), "--no-progress", "--stop-after", "1"]) == 0
    r = experiment(tmp_path, data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"--resume {half}" in r.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(x["arm"], x["train_images"], x["status"]) for x in rows] == [("micro", "8", "done"),
                                                                         ("micro", "16", "done")]
    for x in rows:
        assert 0 <= float(x["top1"]) <= 100 and int(x["params"]) > 0 and int(x["macs"]) > 0
    assert "| micro | eit_micro | - | 16 |" in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0
    fp = [read_file(sorted((out / "runs" / f"micro-{n}").glob("checkpoint-*.pt"))[-1])["data_fingerprint"]
          for n in (8, 16)]
    assert fp[0]["val"] == fp[1]["val"]

    finals = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/final.safetensors")}
    r = experiment(tmp_path, data, "--arm", "micro2=eit_micro,init=torch")  # adds an arm, keeps the rest
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("finished earlier: kept") == 2
    assert all(p.stat().st_mtime_ns == t for p, t in finals.items())
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 4

    r = experiment(tmp_path, data, "--report-only", "--subsets", "8", "16", "32")  # trains nothing
    assert r.returncode == 0 and "finished earlier" not in r.stdout
    assert [x["status"] for x in csv.DictReader(open(out / "results.csv"))] == ["done", "done", "not run"]
    assert not (out / "runs" / "micro-32").exists()

    r = experiment(tmp_path, data, "--seed", "1")
    assert r.returncode == 1 and "other settings: seed=0 (now 1)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "eit_fast.experiments.small_data", "--data", str(data),
                        "--output", str(out), "--subsets", "8", "--epochs", "1", "--batch-size", "8", "--arms",
                        "--arm", "micro=eit_micro,init=timm"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "arm 'micro' was run as" in r.stderr


def test_a_failed_arm_is_reported_and_the_others_still_run(tmp_path):
    data = make_tree(tmp_path / "data")
    r = experiment(tmp_path, data, "--subsets", "8", "999")  # 999 > the 24 training images
    assert r.returncode == 1
    assert "runs failed: micro/999" in r.stderr and "--train-subset 999 must be between 1 and the 24" in r.stderr
    rows = {x["train_images"]: x["status"] for x in csv.DictReader(open(tmp_path / "exp" / "results.csv"))}
    assert rows == {"8": "done", "999": "not run"}


def test_sigterm_stops_the_running_arm_with_a_checkpoint_and_a_rerun_finishes_it(tmp_path):
    data = make_tree(tmp_path / "data")
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "eit_fast.experiments.small_data", "--data", str(data), "--output", str(out),
           "--subsets", "16", "--epochs", "15", "--batch-size", "8", "--arms", "--arm", "micro=eit_micro"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "micro-16" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and p.poll() is None:
        assert time.time() < deadline, "the run never started"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err
    assert "rerun the same command to resume" in err
    assert list((out / "runs" / "micro-16").glob("checkpoint-*.pt"))
    assert not (out / "runs" / "micro-16" / "final.safetensors").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "--resume" in r.stdout and "| micro | eit_micro | - | 16 |" in r.stdout


def test_two_experiments_in_one_folder_at_once_are_refused(tmp_path):
    from eit_fast.run_folder import RunFolder
    data = make_tree(tmp_path / "data")
    held = RunFolder(tmp_path / "exp")
    held.open(new_run=False)
    try:
        r = experiment(tmp_path, data)
    finally:
        held.close()
    assert r.returncode == 2 and "in use by another run" in r.stderr
