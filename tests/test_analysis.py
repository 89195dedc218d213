"""eit_fast.analysis / python -m eit_fast.analyze: measures with known answers, hooks, the CLI."""
import json
import math

import pytest
import torch

from eit_fast import create_model
from eit_fast.analysis import analyze, attention_distance, high_frequency_share
from eit_fast.analyze import main
from eit_fast.checkpoint import save_checkpoint


def one_hot_attention(grid, targets, n=1, heads=1):
    """Attention (1, heads, N, N) putting all mass of query i on token targets[i] (prefix rows uniform)."""
    N = n + grid[0] * grid[1]
    a = torch.full((1, heads, N, N), 1.0 / N)
    for i, t in enumerate(targets):
        a[0, :, n + i] = 0
        a[0, :, n + i, n + t] = 1
    return a


def test_self_attention_has_distance_zero():
    grid = (5, 7)
    a = one_hot_attention(grid, range(35), n=2, heads=3)
    assert torch.equal(attention_distance(a, grid, 2), torch.zeros(1, 3, dtype=torch.float64))


def test_known_distances():
    grid = (4, 6)
    right = [r * 6 + min(c + 1, 5) for r in range(4) for c in range(6)]  # one token right, edge stays
    want = (4 * 5) / 24                                                 # 20 of 24 queries move by 1
    assert math.isclose(attention_distance(one_hot_attention(grid, right), grid, 1).item(), want)
    diag = [min(r + 1, 3) * 6 + min(c + 1, 5) for r in range(4) for c in range(6)]
    moved = sum(1 for r in range(3) for c in range(5))                  # both steps: sqrt 2
    edge = 24 - moved - 1                                               # one step on the last row/col
    assert math.isclose(attention_distance(one_hot_attention(grid, diag), grid, 1).item(),
                        (moved * math.sqrt(2) + edge) / 24)
    # uniform attention over the patch keys, CLS key mass dropped and renormalised
    a = torch.full((1, 1, 25, 25), 1.0 / 25)
    d = torch.cdist(*(2 * [torch.tensor([[i // 6, i % 6] for i in range(24)]).double()])).mean()
    assert math.isclose(attention_distance(a, grid, 1).item(), d.item())
    with pytest.raises(ValueError, match="does not match"):
        attention_distance(a, (5, 5), 1)


def test_high_frequency_share_known_maps():
    assert high_frequency_share(torch.full((2, 3, 8, 8), 4.2)) == 0.0
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1
    assert math.isclose(high_frequency_share(checker[None, None]), 1.0)
    slow = torch.cos(2 * math.pi * torch.arange(8) / 8).expand(8, 8)  # 1/8 cycle per token: below 0.25
    assert high_frequency_share(slow) < 1e-12
    mix = 1 + checker                                                 # DC and checkerboard, equal energy
    assert math.isclose(high_frequency_share(mix), 0.5)
    assert high_frequency_share(torch.zeros(8, 8)) == 0.0


def test_analyze_hooks_match_and_leave_forward_untouched():
    model = create_model("eit_micro", num_cls_tokens=2).eval()
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    r = analyze(model, [x[:2], x[2:]])
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert not model.blocks[0].attn._forward_pre_hooks and not model.blocks[0]._forward_hooks
    assert r["images"] == 3 and r["token_stride_px"] == 4 and r["grid"] == [8, 8]
    # the first layer's head distances, recomputed from its input
    y = model.blocks[0].norm1(model._pos_embed(model.patch_embed(x), (8, 8)))[..., model.blocks[0].conv_dim:]
    want = attention_distance(model.blocks[0].attn.attention_map(y), (8, 8), 2).mean(0) * 4
    assert r["layers"][0]["head_distance_px"] == pytest.approx(want.tolist(), rel=1e-9)
    e = r["layers"][0]
    px = torch.tensor(e["head_distance_px"], dtype=torch.float64)
    assert e["diversity_std_px"] == pytest.approx(px.std(unbiased=False).item())
    assert all(0 <= layer["high_freq_share"] <= 1 for layer in r["layers"])


def test_impulse_heads_attend_at_their_shift_distance():
    torch.manual_seed(0)
    model = create_model("vit_cifar", attn_init="impulse", depth=1)
    # on the pseudo-input, a head's distance follows its shift's length (0, 1 or sqrt 2 tokens): about 40% of
    # each row's mass sits on the shifted token, the rest spreads, so the order is what is exact
    from eit_fast.models.impulse import pseudo_input
    P = pseudo_input((8, 8), 250).float()[None]
    cls = torch.zeros(1, 1, 250)
    d = attention_distance(model.blocks[0].attn.attention_map(torch.cat([cls, P], 1)), (8, 8), 1)[0]
    want = torch.tensor([math.hypot(*s) for s in model.impulse_shifts[0]], dtype=torch.float64)
    assert len(set(want.tolist())) > 1, want  # seed 0 draws shifts of more than one length
    for i in range(len(d)):
        for j in range(len(d)):
            if want[i] < want[j]:
                assert d[i] < d[j], (d, want)
    uniform = attention_distance(torch.full((1, 1, 65, 65), 1 / 65), (8, 8), 1).item()
    assert d.max() < uniform


def test_cli_on_a_checkpoint_and_a_named_config(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = create_model("eit_micro", num_cls_tokens=2)
    ckpt = tmp_path / "run.pt"
    save_checkpoint(ckpt, model, config={"model_config": model.cfg.to_dict(), "args": {"seed": 0}})
    out = tmp_path / "out"
    rc = main([str(ckpt), "vit_cifar", "--set", "depth=2", "--data", "synthetic", "--images", "8",
               "--batch-size", "4", "--output", str(out), "--label", "eit", "--label", "vit"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "analysis.json").read_text())
    assert set(r) == {"eit", "vit"} and r["eit"]["images"] == 8 and r["eit"]["num_prefix_tokens"] == 2
    assert len(r["vit"]["layers"]) == 2 and r["vit"]["token_stride_px"] == 4
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, word", [
    (["nope_model"], "neither a file nor a named config"),
    (["eit_micro", "--set", "depth"], "KEY=VALUE"),
    (["eit_micro", "--set", "no_such=1"], "no_such"),
    (["eit_micro", "--label", "a", "--label", "b"], "label"),
    (["eit_micro", "--cutoff", "0.9"], "cutoff"),
])
def test_cli_bad_input(tmp_path, capsys, args, word):
    assert main(args + ["--output", str(tmp_path / "o"), "--images", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and word in err, err


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import builtins
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from eit_fast.analysis import plot
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot({}, tmp_path / "x.png")


def test_images_are_spread_over_the_split():
    """Class folders are sorted, so the first images are one class: the analysis strides over the split."""
    from types import SimpleNamespace

    from eit_fast.analyze import spread_batches

    class Loader:
        num_samples = 100

        def batches(self, epoch):
            for start in range(0, 100, 32):
                ids = torch.arange(start, min(start + 32, 100), dtype=torch.float32)
                yield SimpleNamespace(images=ids[:, None, None, None].expand(-1, 3, 2, 2))

    got = torch.cat([x[:, 0, 0, 0] for x in spread_batches(Loader(), 10, 4)])
    assert got.tolist() == [float(i) for i in range(0, 100, 10)]
    assert [len(x) for x in spread_batches(Loader(), 10, 4)] == [4, 4, 2]
    assert len(torch.cat(list(spread_batches(Loader(), 500, 64)))) == 100  # asks for more than there are
