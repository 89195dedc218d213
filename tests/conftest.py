import pytest
import torch

from eit_fast import autotune
from eit_fast.timing import Timing


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decode caches and auto's choices go to temporary folders, not the user's ~/.cache (auto's: one per test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    monkeypatch.setenv("EIT_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("autotune")))  # one per test
    monkeypatch.delenv("EIT_FAST_AUTOTUNE", raising=False)


def fused_wins(fns, device, warmup=1, iters=1, **_):
    """A timer for tests (timing never goes in tests): the fused path is always twice as fast."""
    return {name: Timing(1.0 if name == "fused" else 2.0, 0.0, 1.0 if name == "fused" else 2.0, [], None, "test")
            for name in fns}


@pytest.fixture(autouse=True)
def _deterministic_auto():
    """impl="auto" decides the same way in every test: a fresh book and a timer where fused wins. Tests of
    the choice logic inject their own timer."""
    autotune.reset()
    with autotune.use_timer(fused_wins):
        yield
    autotune.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
