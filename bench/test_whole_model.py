"""Whole-model speed: an inference forward and a training step (forward, backward, AdamW) of eit_cifar and
eit_mini on every path of `python -m eit_fast.bench` (eit_fast/bench/whole_model.py says what each is).

Run: `python -m pytest bench/test_whole_model.py`. On a GPU the cases are the bench's (bf16 autocast, batch
256 / 64); on the CPU fp32 at batch 32 (eit_cifar) and 4 (eit_mini), so the file runs in minutes. A path
that cannot run here (no fused path on this machine) skips with the reason. The modelled H100 floor of each
case is stored in extra_info["h100_floor_ms_modelled"].
"""
import pytest
import torch

from eit_fast.bench.whole_model import PATHS, Case, build_paths, modelled_floor, step_fn, _autocast

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CASES = {"eit_cifar": 256 if CUDA else 32, "eit_mini": 64 if CUDA else 4}
DTYPE = "bf16" if CUDA else "fp32"
_built = {}


def _path(model, mode, path):
    key = (model, mode)
    if key not in _built:
        case = Case(model, CASES[model], mode, DTYPE)
        _built[key] = (case, build_paths(case, PATHS, DEVICE, _autocast(DEVICE, DTYPE)))
    case, paths = _built[key]
    return case, paths[path]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("model", list(CASES))
def test_whole_model(benchmark, model, mode, path):
    case, (net, note) = _path(model, mode, path)
    if net is None:
        pytest.skip(note)
    fn = step_fn(net, case, DEVICE, _autocast(DEVICE, DTYPE))
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def run():
        out = fn()
        sync()
        return out

    run()  # warm-up (and compilation)
    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(case=vars(case), path=path, note=note,
                                images_per_s=case.batch / benchmark.stats.stats.median,
                                h100_floor_ms_modelled=modelled_floor(case).seconds * 1e3)
