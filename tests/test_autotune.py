"""impl="auto" by measurement (eit_fast.autotune): the choice logic, its cache, pinning and the run's agreement.

Timing never goes in tests: every measurement here goes through an injected timer that says how long each
path "took", so each case's expected choice is known in advance.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eit_fast
from eit_fast import autotune, create_model
from eit_fast.timing import Timing

ROOT = Path(__file__).resolve().parents[1]


def timer(fused_s, reference_s, fused_peak=None, reference_peak=None, calls=None):
    """A timer that reports the given seconds (and peaks); it runs each callable once, as a real one would."""
    def t(fns, device, warmup=1, iters=1, **_):
        if calls is not None:
            calls.append(sorted(fns))
        for fn in fns.values():
            fn()
        return {"fused": Timing(fused_s, 0.0, fused_s, [fused_s], fused_peak, "test"),
                "reference": Timing(reference_s, 0.0, reference_s, [reference_s], reference_peak, "test")}
    return t


def stem_model(**kw):
    return create_model("eit_cifar", impl="auto", **kw).eval()


def images(b=2):
    return torch.randn(b, 3, 32, 32)


def run(model, b=2):
    with torch.no_grad():
        return model(images(b))


def used():
    return eit_fast.info()["last_selection"]["choices"]


# --- the choice ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fused_s,reference_s,expected", [(1.0, 1.3, "fused"), (1.3, 1.0, "reference"),
                                                          (1.0, 5.0, "fused"), (5.0, 1.0, "reference")])
def test_the_measured_faster_path_is_kept(fused_s, reference_s, expected):
    model = stem_model()
    with autotune.use_timer(timer(fused_s, reference_s)):
        run(model)
    (c,) = used()
    assert c["impl"] == expected and c["how"] == "measured" and c["path"] == "patch_projection"
    assert c["fused_s"] == fused_s and c["reference_s"] == reference_s
    assert "eval" in c["case"] and "batch=2" in c["case"] and "float32" in c["case"]


@pytest.mark.parametrize("fused_peak,reference_peak,expected", [(10, 20, "fused"), (20, 10, "reference"),
                                                                (10, 10, "reference"), (None, 10, "reference")])
def test_a_tie_goes_to_the_lower_peak_memory_else_the_reference(fused_peak, reference_peak, expected):
    model = stem_model()
    with autotune.use_timer(timer(1.0, 1.04, fused_peak, reference_peak)):
        run(model)
    (c,) = used()
    assert c["impl"] == expected and "tie" in c["note"]


def test_the_chosen_path_really_runs(monkeypatch, tmp_path):
    from eit_fast.modules.fused_patch import AutoFusedPatchEmbed
    from eit_fast.ops import patch_projection as op
    calls = []
    real = op.patch_projection
    monkeypatch.setattr(op, "patch_projection", lambda *a: calls.append(1) or real(*a))
    model = stem_model()
    with autotune.use_timer(timer(2.0, 1.0)):
        run(model)
    n = len(calls)  # the trial ran the fused op; the real forward after it must not
    run(model)
    assert len(calls) == n and isinstance(model.patch_embed, AutoFusedPatchEmbed)
    autotune.reset()
    monkeypatch.setenv("EIT_FAST_CACHE_DIR", str(tmp_path))  # a machine that has not measured yet
    with autotune.use_timer(timer(1.0, 2.0)):
        run(model)
    n = len(calls)
    run(model)
    assert len(calls) == n + 1


def test_each_case_is_measured_once_and_cases_differ_by_shape_dtype_and_mode():
    calls = []
    model = stem_model()
    with autotune.use_timer(timer(1.0, 2.0, calls=calls)):
        run(model, 2)
        run(model, 2)
        run(model, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model(images(2))
        model.train()
        model(images(2)).sum().backward()
    cases = [c["case"] for c in used()]
    assert len(calls) == 4 and len(set(cases)) == 4
    assert any("autocast:bfloat16" in c for c in cases) and any("train+grad" in c for c in cases)


def test_measuring_leaves_no_trace():
    """RNG states, gradients and outputs are as if no measurement had happened."""
    torch.manual_seed(1)
    model = create_model("eit_cifar", impl="auto").train()
    ref = create_model("eit_cifar", impl="reference").train()
    ref.load_state_dict(model.state_dict())
    x = images(4)
    for m in (model, ref):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    torch.manual_seed(7)
    with autotune.use_timer(timer(1.0, 2.0)):
        out = model(x)
    after_model = torch.get_rng_state()
    torch.manual_seed(7)
    expected = ref(x)
    assert torch.equal(after_model, torch.get_rng_state())  # the trial drew nothing from the RNG
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # the same dropout masks
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.5))


def test_a_failing_fused_trial_keeps_the_reference(monkeypatch):
    from eit_fast.modules import fused_patch

    def boom(self, image):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(fused_patch.AutoFusedPatchEmbed, "_fused_forward", staticmethod(boom))
    model = stem_model()
    with autotune.use_timer(timer(1.0, 2.0)):
        out = run(model)
    (c,) = used()
    assert c["impl"] == "reference" and c["how"] == "error" and "out of memory" in c["note"]
    ref = create_model("eit_cifar").eval()
    ref.load_state_dict(model.state_dict())
    assert out.shape == (2, 10)


def test_an_input_without_a_kernel_is_not_measured():
    model = stem_model().half()  # the CPU kernel has no fp16
    calls = []
    with autotune.use_timer(timer(1.0, 2.0, calls=calls)):
        with torch.no_grad():
            model(images().half())
    (c,) = used()
    assert c["impl"] == "reference" and c["how"] == "no kernel" and "float16" in c["note"] and not calls


# --- the cache ---------------------------------------------------------------------------------------------

def test_choices_are_cached_on_disk_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EIT_FAST_CACHE_DIR", str(tmp_path / "cache"))
    with autotune.use_timer(timer(1.0, 2.0)):
        run(stem_model())
    path = autotune.cache_file()
    assert path.parent == tmp_path / "cache" and path.is_file()
    d = json.loads(path.read_text())
    assert d["format"] == "eit_fast.autotune" and d["fingerprint"]["torch"] == torch.__version__
    assert [c["impl"] for c in d["choices"].values()] == ["fused"]
    autotune.reset()  # a new process: the choice comes from the disk, unmeasured
    calls = []
    with autotune.use_timer(timer(2.0, 1.0, calls=calls)):
        run(stem_model())
    (c,) = used()
    assert c["impl"] == "fused" and c["how"] == "cached" and not calls
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "eit_fast.autotune", "version": 1,
                                                                 "fingerprint": {"torch": "0.0"}, "choices": {}}),
                                     json.dumps([1, 2]), ""])
def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, content):
    monkeypatch.setenv("EIT_FAST_CACHE_DIR", str(tmp_path))
    path = autotune.cache_file()
    path.write_text(content)
    with autotune.use_timer(timer(1.0, 2.0)):
        run(stem_model())
    (c,) = used()
    assert c["how"] == "measured"
    d = json.loads(path.read_text())
    assert d["fingerprint"] == json.loads(json.dumps(autotune.fingerprint())) and len(d["choices"]) == 1


def test_the_cache_key_names_the_machine_and_the_kernels():
    fp = autotune.fingerprint()
    for key in ("cpu", "cpu_isa", "threads", "gpus", "torch", "triton", "extension", "kernel_sources"):
        assert key in fp
    assert fp["extension"] is not None  # the built eit_fast._C is hashed


def test_an_unwritable_cache_warns_and_keeps_the_choice_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("EIT_FAST_CACHE_DIR", str(blocker / "cache"))  # a folder under a file
    with pytest.warns(RuntimeWarning, match="auto-selection cache .* kept in memory only"):
        with autotune.use_timer(timer(1.0, 2.0)):
            run(stem_model())
    assert used()[0]["impl"] == "fused"


def test_autotune_off_uses_the_cache_else_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("EIT_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EIT_FAST_AUTOTUNE", "0")
    calls = []
    with autotune.use_timer(timer(1.0, 2.0, calls=calls)):
        run(stem_model())
    (c,) = used()
    assert c["impl"] == "reference" and c["how"] == "autotune off" and not calls
    monkeypatch.setenv("EIT_FAST_AUTOTUNE", "1")
    autotune.reset()
    with autotune.use_timer(timer(1.0, 2.0)):
        run(stem_model())
    monkeypatch.setenv("EIT_FAST_AUTOTUNE", "0")
    autotune.reset()
    run(stem_model())
    (c,) = used()
    assert c["impl"] == "fused" and c["how"] == "cached"
    # impl="fused" means fused, measured or not
    model = create_model("eit_cifar", impl="fused").eval() if torch.cuda.is_available() else None
    assert model is None or type(model.patch_embed).__name__ == "FusedPatchEmbed"


# --- pinning: one choice per run ----------------------------------------------------------------------------

def test_pinned_choices_measure_nothing_and_reuse_the_nearest_batch():
    model = stem_model()
    with autotune.use_timer(timer(1.0, 2.0)):
        run(model, 8)
    saved = autotune.export()
    autotune.reset()
    autotune.pin(saved)
    calls = []
    with autotune.use_timer(timer(2.0, 1.0, calls=calls)):
        run(model, 8)
        run(model, 3)  # a partial last batch
        model.train()
        model(images(8))  # a mode with no comparable case
    assert not calls
    by_batch = {c["case"].rsplit("=", 1)[1] + c["case"].split("|")[3]: c for c in used()}
    assert by_batch["8eval"]["impl"] == "fused" and by_batch["8eval"]["how"] == "pinned"
    assert by_batch["3eval"]["impl"] == "fused" and by_batch["3eval"]["how"] == "nearest"
    assert by_batch["8train+grad"]["impl"] == "reference" and by_batch["8train+grad"]["how"] == "pinned"


def test_prepare_measures_train_and_eval_without_a_trace():
    model = create_model("eit_cifar", impl="auto")
    torch.manual_seed(3)
    x = images(4)
    rng = torch.get_rng_state()
    with autotune.use_timer(timer(1.0, 2.0)):
        choices = autotune.prepare(model, x)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(p.grad is None for p in model.parameters())
    modes = sorted(c["case"].split("|")[3] for c in choices["choices"].values())
    assert modes == ["eval", "train+grad"]


def test_pin_refuses_what_is_not_an_export():
    with pytest.raises(ValueError, match="not an eit_fast.autotune export"):
        autotune.pin({"choices": {}})


def test_kernel_configs_are_picked_once_and_pinned():
    times = {"a": 2.0, "b": 1.0, "c": 3.0}
    seen = []
    assert autotune.pick("op", "k1", ["a", "b", "c"], lambda o: seen.append(o) or times[o]) == "b"
    assert autotune.pick("op", "k1", ["a", "b", "c"], lambda o: seen.append(o) or times[o]) == "b"
    assert seen == ["a", "b", "c"]
    saved = autotune.export()
    assert saved["configs"] == {"op|k1": "b"}
    autotune.reset()
    autotune.pin(saved)
    assert autotune.pick("op", "k1", ["a", "b"], lambda o: 1 / 0) == "b"
    assert autotune.pick("op", "k2", ["a", "b"], lambda o: 1 / 0) == "a"  # pinned: never measures


def test_info_shows_each_choice_with_its_times():
    with autotune.use_timer(timer(0.001, 0.003)):
        run(stem_model())
    text = eit_fast.runtime.format_info(eit_fast.info())
    assert "auto choices:" in text and "fused 1.00 ms vs reference 3.00 ms" in text


def test_the_info_command_lists_the_cached_choices(tmp_path):
    with autotune.use_timer(timer(0.002, 0.004)):
        run(stem_model())
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-m", "eit_fast.info"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "(1 cached choices for this machine)" in r.stdout and "cached auto choices:" in r.stdout
    assert "fused 2.00 ms vs reference 4.00 ms" in r.stdout


def test_torch_compile_uses_the_eager_choice():
    model = stem_model()
    x = images(2)
    with autotune.use_timer(timer(1.0, 2.0)):
        expected = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_torch_export_with_dynamic_shapes_uses_the_choice_made_for_every_case():
    from torch.export import Dim, export
    model = create_model("eit_micro", impl="auto", dynamic_img_size=True).eval()
    with autotune.use_timer(timer(1.0, 2.0)), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    ep = export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
    assert any("eit_fast.patch_projection" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(torch.randn(3, 3, 32, 32)).shape, torch.Size([3, 10]))


# --- a training run -----------------------------------------------------------------------------------------

def train(tmp_path, *extra):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "eit_fast.train", "--model", "eit_micro", "--synthetic-size", "64",
           "--batch-size", "16", "--epochs", "1", "--no-progress", "--output", str(out), *extra]
    env = {**os.environ, "EIT_FAST_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_a_training_run_records_its_choices_and_a_resume_pins_them(tmp_path):
    out, r = train(tmp_path, "--stop-after", "2")
    recorded = json.loads((out / "impl_choices.json").read_text())
    cases = list(recorded["choices"].values())
    assert {c["case"].split("|")[3] for c in cases} == {"train+grad", "eval"}
    assert all("batch=16" in c["case"] and c["path"] == "patch_projection" for c in cases)
    assert "impl auto: patch_projection fused in" in r.stdout
    ckpt = torch.load(sorted(out.glob("checkpoint-*.pt"))[-1], weights_only=False)
    assert ckpt["impl_choices"] == recorded
    # The resumed run uses the recorded choices (flipped here to prove it reads them, not a new measurement).
    flipped = json.loads(json.dumps(recorded))
    for c in flipped["choices"].values():
        c["impl"] = "reference" if c["impl"] == "fused" else "fused"
    ckpt["impl_choices"] = flipped
    from eit_fast.checkpoint import save_checked
    save_checked(ckpt, sorted(out.glob("checkpoint-*.pt"))[-1])
    _, r = train(tmp_path, "--resume", str(out))
    again = json.loads((out / "impl_choices.json").read_text())
    assert {k: v["impl"] for k, v in again["choices"].items()} == \
        {k: v["impl"] for k, v in flipped["choices"].items()}


AGREE = r"""
import json, os, sys
import torch
from eit_fast import autotune, create_model, distributed, run_choices
from eit_fast.timing import Timing
dist = distributed.setup("cpu")
fast, slow = (1.0, 2.0) if dist.rank == 0 else (2.0, 1.0)  # the ranks would disagree if each decided
t = lambda fns, device, **kw: {"fused": Timing(fast, 0, fast, [], None, ""), "reference": Timing(slow, 0, slow, [], None, "")}
model = create_model("eit_cifar", impl="auto")
with autotune.use_timer(t):
    choices = run_choices.settle(model, (4, 3, 32, 32), torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False), dist)
    model.eval()
    with torch.no_grad():
        model(torch.randn(3 if dist.rank == 0 else 1, 3, 32, 32))  # uneven shards: no collective, nearest case
impls = sorted(c["impl"] for c in autotune.export()["choices"].values())
print("RESULT", dist.rank, json.dumps(impls), flush=True)
distributed.cleanup()
"""


def test_torchrun_ranks_take_rank_zeros_choices(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = {**os.environ, "EIT_FAST_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=localhost:0",
                        str(script)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {int(line.split()[1]): json.loads(line.split(None, 2)[2])
               for line in r.stdout.splitlines() if line.startswith("RESULT")}
    assert set(results) == {0, 1}
    assert results[0] == results[1] and "fused" in results[0] and "reference" not in results[0]
