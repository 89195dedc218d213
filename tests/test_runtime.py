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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the fused block_mixer can run too")
def test_auto_takes_the_stem_under_measurement_on_cpu_and_says_why_not_the_mixer():
    model = create_model("eit_cifar", impl="auto")
    assert model.impl == "auto"
    assert type(model.patch_embed).__name__ == "AutoFusedPatchEmbed"
    sel = eit_fast.info()["last_selection"]
    assert sel["model"] == "eit_cifar" and sel["requested"] == "auto" and sel["chosen"] == "auto"
    assert sel["fused"] == ["patch_projection"]
    assert sel["reason"].startswith("auto: patch_projection measured against the reference per case")
    assert "not fused: block_mixer: no CUDA GPU" in sel["reason"]


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
    stem = d["fast_paths"]["patch_projection"]
    assert stem["available"] and stem["reason"].startswith("eit_fast._C built with")  # the CPU kernel runs anywhere
    mixer = d["fast_paths"]["block_mixer"]
    assert mixer["reason"] and mixer["available"] == torch.cuda.is_available()
    r = subprocess.run([sys.executable, "-m", "eit_fast.info"], capture_output=True, text=True)
    assert r.returncode == 0 and "patch_projection  usable: eit_fast._C built with" in r.stdout
    if not torch.cuda.is_available():
        assert "block_mixer       not usable:" in r.stdout
    assert "RuntimeWarning" not in r.stderr


BROKEN_KERNEL = r"""
import sys, importlib.abc
class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "eit_fast.kernels.attention":
            raise ImportError("cannot import name 'tl_new_thing' from 'triton.language'")
sys.meta_path.insert(0, Broken())
import eit_fast
print(eit_fast.info()["fast_paths"]["block_mixer"])
"""


def test_an_import_error_inside_the_kernels_is_reported_as_what_it_is():
    r = subprocess.run([sys.executable, "-c", BROKEN_KERNEL], capture_output=True, text=True)
    assert r.returncode != 0 and "tl_new_thing" in r.stderr and "not installed" not in r.stdout, r.stdout
