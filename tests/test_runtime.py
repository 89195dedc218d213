import json
import subprocess
import sys

import pytest
import torch

import eit_fast
from eit_fast import ImplError, create_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fused block_mixer can run here")
def test_fused_refuses_with_a_reason():
    with pytest.raises(ImplError, match=r"impl='fused' was requested but the fused block_mixer cannot run: "
                                        r"no CUDA GPU"):
        create_model("eit_cifar", impl="fused")


def test_auto_falls_back_to_reference_and_says_so():
    model = create_model("eit_cifar", impl="auto")
    assert model.impl == "reference"
    sel = eit_fast.info()["last_selection"]
    assert sel["model"] == "eit_cifar" and sel["requested"] == "auto" and sel["chosen"] == "reference"
    assert sel["fused"] == []
    assert sel["reason"].startswith("auto: no fused path is available, using the reference model; not fused: ")


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("EIT_FAST_IMPL", "fused")
    with pytest.raises(ImplError):
        create_model("eit_cifar")
    assert create_model("eit_cifar", impl="reference").impl == "reference"
    monkeypatch.setenv("EIT_FAST_IMPL", "fastest")
    with pytest.raises(ImplError, match=r"EIT_FAST_IMPL='fastest' is not one of"):
        create_model("eit_cifar")


def test_unknown_impl():
    with pytest.raises(ImplError, match=r"impl must be one of \('reference', 'fused', 'auto'\), got 'triton'"):
        create_model("eit_cifar", impl="triton")


def test_info_cli():
    r = subprocess.run([sys.executable, "-m", "eit_fast.info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d["fast_paths"]) == {"block_mixer", "patch_projection"}
    assert all(not p["available"] and p["reason"] for p in d["fast_paths"].values())
    r = subprocess.run([sys.executable, "-m", "eit_fast.info"], capture_output=True, text=True)
    assert r.returncode == 0 and "block_mixer       not usable:" in r.stdout
    assert "RuntimeWarning" not in r.stderr
