"""`--recipe cifar` scales with the run's length: warm-up as a capped share, regularisation by budget."""
import math

import pytest

from eit_fast import train
from eit_fast.train_args import LONG_EPOCHS, SHORT_EPOCHS, PerBudget, by_budget, model_overrides, parse_args

REG = ("mixup", "cutmix", "drop", "attn_drop", "drop_path", "lr")


def recipe(*argv):
    return parse_args(["--recipe", "cifar", *argv])[0]


@pytest.mark.parametrize("epochs, warmup", [(1, 0.05), (10, 0.5), (100, 5.0), (200, 10.0), (300, 10.0),
                                            (1000, 10.0)])
def test_warmup_is_five_percent_capped_at_ten_epochs(epochs, warmup):
    assert recipe("--epochs", str(epochs)).warmup_epochs == pytest.approx(warmup)


def test_a_ten_epoch_run_is_not_all_warmup():
    """The old recipe warmed up for 10 epochs whatever the length; a 10-epoch run never left its warm-up."""
    a = recipe("--epochs", "10")
    assert a.warmup_epochs / a.epochs == pytest.approx(0.05)


def test_regularisation_short_and_long_ends():
    short, long = recipe("--epochs", "10"), recipe("--epochs", "300")
    assert [getattr(short, k) for k in REG] == [0.0, 0.0, 0.0, 0.0, 0.0, 2e-3]  # measured on 5k images
    assert [getattr(long, k) for k in REG] == [0.8, 1.0, 0.2, 0.15, 0.2, 1e-3]  # the previous recipe's
    assert [getattr(recipe("--epochs", "3"), k) for k in REG] == [getattr(short, k) for k in REG]
    assert [getattr(recipe("--epochs", "900"), k) for k in REG] == [getattr(long, k) for k in REG]
    assert short.init == long.init == "timm"


def test_regularisation_grows_log_linearly_in_between():
    values = [recipe("--epochs", str(e)).mixup for e in (10, 20, 50, 100, 200, 300)]
    assert values == sorted(values) and len(set(values)) == 6
    mid = round(math.sqrt(SHORT_EPOCHS * LONG_EPOCHS))  # the geometric middle: halfway
    assert recipe("--epochs", str(mid)).mixup == pytest.approx(0.4, abs=0.01)


def test_explicit_settings_beat_the_budget_rule(tmp_path):
    a = recipe("--epochs", "10", "--mixup", "0.8", "--drop-path", "0.3", "--warmup-epochs", "2")
    assert (a.mixup, a.drop_path, a.warmup_epochs) == (0.8, 0.3, 2.0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("recipe: cifar\nepochs: 300\ncutmix: 0.0\n")
    a = parse_args(["--config", str(cfg)])[0]
    assert (a.cutmix, a.mixup) == (0.0, 0.8)


def test_the_rule_reaches_the_model_and_the_checkpoint(tmp_path):
    args, explicit = parse_args(["--recipe", "cifar", "--epochs", "10"])
    assert model_overrides(args, explicit) == {"drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0,
                                               "init": "timm"}
    out = tmp_path / "run"
    assert train.main(["--recipe", "cifar", "--model", "eit_micro", "--epochs", "1", "--synthetic-size", "64",
                       "--batch-size", "32", "--output", str(out), "--no-progress"]) == 0
    from eit_fast.checkpoint import read_file
    state = read_file(sorted(out.glob("checkpoint-*.pt"))[-1])
    saved = state["config"]["args"]
    assert (saved["warmup_epochs"], saved["mixup"], saved["drop_path"], saved["lr"]) == (0.05, 0.0, 0.0, 2e-3)
    assert state["config"]["model_config"]["init"] == "timm"
    assert not any(isinstance(v, PerBudget) for v in saved.values())  # resolved before it is recorded


def test_by_budget_describes_itself():
    rule = by_budget(0.1, 0.2)
    assert (rule.rule(SHORT_EPOCHS), rule.rule(LONG_EPOCHS)) == (0.1, 0.2)
    assert repr(rule) == f"0.1 up to {SHORT_EPOCHS} epochs, 0.2 from {LONG_EPOCHS}, log-linear between"
