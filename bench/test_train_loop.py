"""How much of the model's time the training loop keeps: eit_fast.train's loop against a bare loop.

The bare loop is forward, backward and AdamW step on one batch already in memory. The trainer's loop adds
what a real run does: sampling, crop/flip, Mixup/CutMix and label smoothing, the scheduler, the EMA and the
loss bookkeeping (`--recipe cifar`). Run: `python -m pytest bench/test_train_loop.py`; the ratio is printed
and stored in the benchmark's extra_info.
"""
import pytest
import torch
import torch.nn.functional as F

import eit_fast
from eit_fast import distributed, train

BATCH, STEPS = 64, 4
MODEL = "eit_cifar"
_times = {}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    # --impl reference: the same model as the bare loop's, so the ratio is the loop's cost alone
    args, explicit = train.parse_args(["--recipe", "cifar", "--model", MODEL, "--impl", "reference",
                                       "--batch-size", str(BATCH),
                                       "--synthetic-size", str(BATCH * STEPS * 2), "--epochs", "100",
                                       "--no-progress", "--log-every", "1000", "--output", str(out)])
    return train.Trainer(args, explicit, distributed.setup("cpu"))


def test_bare_loop(benchmark):
    torch.manual_seed(0)
    model = eit_fast.create_model(MODEL).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def steps():
        for _ in range(STEPS):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    steps()  # warm-up
    benchmark.pedantic(steps, rounds=5, iterations=1)
    _times["bare"] = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = BATCH * STEPS / _times["bare"]


def test_trainer_loop(benchmark, trainer):
    def steps():
        trainer.batch, trainer.step = 0, 0
        trainer.args.stop_after = STEPS
        assert trainer._train_epoch() is False and trainer.step == STEPS

    steps()  # warm-up
    benchmark.pedantic(steps, rounds=5, iterations=1)
    _times["trainer"] = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = BATCH * STEPS / _times["trainer"]
    if "bare" in _times:
        ratio = _times["bare"] / _times["trainer"]
        benchmark.extra_info["fraction_of_bare_loop"] = ratio
        print(f"\ntrainer loop: {ratio:.1%} of the bare loop's images/s "
              f"({BATCH * STEPS / _times['trainer']:.1f} vs {BATCH * STEPS / _times['bare']:.1f})")
