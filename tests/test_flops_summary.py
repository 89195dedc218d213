import subprocess
import sys

import pytest

from eit_fast import count_macs, get_config

# docs/design.md section 1.3: authors' convention (ptflops: no attention matmuls), and with the attention matmuls.
AUTHORS_G = {"eit_mini": 1.730, "eit_tiny": 3.833, "eit_base": 6.507, "eit_large": 9.998}
TOTAL_G = {"eit_mini": 1.93, "eit_tiny": 4.21, "eit_base": 7.07, "eit_large": 10.77}


@pytest.mark.parametrize("name", sorted(AUTHORS_G))
def test_macs_both_conventions(name):
    macs = count_macs(get_config(name))
    assert round(macs.authors / 1e9, 3) == AUTHORS_G[name]
    assert round(macs.total / 1e9, 2) == TOTAL_G[name]


def test_macs_closed_form_mini():
    cfg = get_config("eit_mini")
    N, D, g = cfg.num_tokens, cfg.embed_dim, cfg.grid_size
    stem = cfg.conv_grid ** 2 * D * 3 * 16 * 16
    blocks = sum(N * 4 * a * a + g * g * 9 * c + N * 8 * D * D for a, c in cfg.splits)
    attn = sum(2 * N * N * a for a, _ in cfg.splits)
    macs = count_macs(cfg)
    assert macs.authors == stem + blocks + D * 1000
    assert macs.attn_matmul == attn


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_summary_cli_prints_the_published_figures():
    r = run_module("eit_fast.summary", "eit_mini", "eit_tiny", "eit_base", "eit_large")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("== ")[1:]
    assert [b.split(" ==")[0] for b in blocks] == ["eit_mini", "eit_tiny", "eit_base", "eit_large"]
    for block, params, g in zip(blocks, ["3,512,750", "8,927,230", "15,972,280", "25,305,592"],
                                ["1.73", "3.83", "6.51", "10.00"]):
        assert f"params            {params}" in block
        assert f"MACs, authors' convention (no attention matmuls) {g:>6} G" in block
        assert "tokens            362 (361 patches + CLS)" in block
    assert "layer  0: ( 50, 200)  head size 5" in blocks[0]
    assert "layer 11: (464,   0)  head size 29" in blocks[3]


def test_summary_cli_defaults_to_every_model_and_rejects_unknown():
    r = run_module("eit_fast.summary")
    assert r.returncode == 0 and r.stdout.count("== ") == 11
    r = run_module("eit_fast.summary", "eit_huge")
    assert r.returncode == 2 and "unknown model 'eit_huge'" in r.stderr
