"""The fused token mixer's Triton kernels, run under TRITON_INTERPRET=1 on the CPU, against the reference.

The interpreter must be switched on before the kernel modules are imported and stays on for the process,
so the cases run in a child process (this file run as a script) and the rest of the suite keeps compiled
code. The fast cases share one child; each slow case gets its own. Each case reports relative errors
||fused - ref|| / ||ref|| (NaN never passes) against a float64 reference built from the reference modules.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

# name -> (case function, kwargs); shapes break every block multiple: N = 1, 2, 46 (5x9 grid), 50, 65, 197.
OP_CASES = {
    "eit_cifar_l0": dict(B=2, grid=(8, 8), C=200, H=10, hd=5),
    "eit_cifar_l3": dict(B=2, grid=(8, 8), C=50, H=10, hd=20),
    "n1_hd2": dict(B=2, grid=(0, 0), C=0, H=2, hd=2),
    "n2_hd3": dict(B=1, grid=(1, 1), C=3, H=2, hd=3),
    "n46_nonsquare_hd5": dict(B=2, grid=(5, 9), C=8, H=3, hd=5),
    "n50_hd17_noncontig": dict(B=1, grid=(7, 7), C=5, H=1, hd=17, noncontig=True),
    "n197_vit_hd33": dict(B=1, grid=(14, 14), C=0, H=1, hd=33),
    "n50_conv_only": dict(B=2, grid=(7, 7), C=7, H=1, hd=0),
    "n65_hd2_noncontig": dict(B=1, grid=(8, 8), C=6, H=2, hd=2, noncontig=True),
    "n26_hd4_one_query_slab": dict(B=2, grid=(5, 5), C=6, H=2, hd=4),
}
SLOW_OP_CASES = {
    "eit_cifar_l1": dict(B=2, grid=(8, 8), C=150, H=10, hd=10),
    "eit_cifar_l2": dict(B=2, grid=(8, 8), C=100, H=10, hd=15),
    "eit_cifar_l4": dict(B=2, grid=(8, 8), C=0, H=10, hd=25),
    "eit_mini_l1": dict(B=1, grid=(19, 19), C=150, H=10, hd=10),
    "n197_conv_hd33_b3": dict(B=3, grid=(14, 14), C=13, H=2, hd=33, noncontig=True),
}
HALF_CASES = {
    "half_n50_hd17": dict(B=2, grid=(7, 7), C=5, H=1, hd=17),
    "half_eit_cifar_l0": dict(B=1, grid=(8, 8), C=200, H=10, hd=5),
}
DROPOUT_CASES = {
    "dropout_n65": dict(B=2, grid=(8, 8), C=24, H=3, hd=8, ps=(0.15, 0.15, 0.2)),
    "dropout_n2_attn_only": dict(B=2, grid=(1, 1), C=0, H=2, hd=3, ps=(0.5, 0.0, 0.3)),
}
# every shipped 16-bit config, fp16 (N = 65: one query slab for BLOCK_M 128, several for 64; head 20 -> HP 24)
CONFIG_CASES = {"configs_n65_hd20": dict(B=1, grid=(8, 8), C=6, H=2, hd=20),
                "configs_dropout_n65_hd12": dict(B=1, grid=(8, 8), C=6, H=2, hd=12, ps=(0.15, 0.1, 0.2))}
SLOW_CONFIG_CASES = {"configs_n65_hd33": dict(B=1, grid=(8, 8), C=0, H=1, hd=33)}
MODEL_CASES = {"model_eit_micro": dict(name="eit_micro", B=2)}
SLOW_MODEL_CASES = {
    "model_eit_cifar": dict(name="eit_cifar", B=2),
    "model_eit_cifar_48px": dict(name="eit_cifar", B=1, img_size=48),
    "model_vit_cifar": dict(name="vit_cifar", B=1),
    "model_eit_micro_heads3_80px": dict(name="eit_micro", B=1, img_size=80, num_heads=3),
}
DEVICE = "cpu"  # the cases' device: cpu in the interpreter child; "cuda" for the in-process GPU tests below
FAST = ["poison"] + list(OP_CASES) + list(HALF_CASES) + list(DROPOUT_CASES) + list(CONFIG_CASES) + list(MODEL_CASES)


# --- the child process -------------------------------------------------------------------------------------

def _rel(a, b):
    import torch
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(B, grid, C, H, hd, dtype, noncontig=False, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    A = H * hd
    N, D = 1 + grid[0] * grid[1], C + H * hd
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std)
    t = dict(x=r(B, N, D) * 2 + 0.5, norm_w=1 + r(D, std=0.3), norm_b=r(D, std=0.3), conv_w=r(C, 1, 3, 3, std=1 / 3),
             qkv_w=r(3 * A, A, std=max(A, 1) ** -0.5), qkv_b=r(3 * A, std=0.1), proj_w=r(A, A, std=max(A, 1) ** -0.5),
             proj_b=r(A, std=0.1), G=r(B, N, D))
    t["scale"] = torch.rand(B, generator=g, dtype=torch.float64) * 2
    t["scale"][0] = 0.0 if B > 1 else 1.25  # a dropped sample
    t = {k: v.to(DEVICE) for k, v in t.items()}
    low = {k: v.to(dtype) for k, v in t.items()}
    if noncontig:  # same values, other strides: x (B, D, N)^T
        low["x"] = low["x"].transpose(1, 2).contiguous().transpose(1, 2)
    return t, low, N, D, A


LEAVES = ("x", "norm_w", "norm_b", "conv_w", "qkv_w", "qkv_b", "proj_w", "proj_b")


def _fused(low, N, D, C, A, H, grid, ps=(0.0, 0.0, 0.0), seed_value=1234, noncontig=False):
    import torch
    from eit_fast.ops.block_mixer import block_mixer
    leaves = {k: low[k].detach().clone().requires_grad_() if k != "x" else low[k].detach().requires_grad_()
              for k in LEAVES}
    seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
    lv = lambda k, on: leaves[k] if on else None
    out = block_mixer(leaves["x"], leaves["norm_w"], leaves["norm_b"], lv("conv_w", C), lv("qkv_w", A),
                      lv("qkv_b", A), lv("proj_w", A), lv("proj_b", A), low["scale"].float(), seed, grid[0], grid[1],
                      H, 1e-6, *ps, low["x"].dtype)[0]
    (out.float() * low["G"].float()).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}, seed


def _reference(t, C, A, H, grid, masks=None, ps=(0.0, 0.0, 0.0), dtype=None):
    """x + scale * mix(LayerNorm1(x)) through the reference modules (float64 unless dtype), with dropout masks
    applied by hand when given."""
    import torch
    import torch.nn.functional as F
    from eit_fast.models.eit import Attention, ConvBranch
    dtype = dtype or torch.float64
    leaves = {k: t[k].to(dtype).detach().requires_grad_() for k in LEAVES}
    x = leaves["x"]
    B, N, D = x.shape
    y = F.layer_norm(x, (D,), leaves["norm_w"], leaves["norm_b"], 1e-6)
    parts = []
    if C:
        conv = ConvBranch(C).to(dtype)
        del conv.conv1.weight
        conv.conv1.weight = leaves["conv_w"]
        z = conv(y[..., :C], grid)
        if masks is not None and "conv" in masks:
            z = torch.cat([z[:, :1], z[:, 1:] * masks["conv"][:, 1:].to(dtype) / (1 - ps[1])], 1)
        parts.append(z)
    if A:
        attn = Attention(A, H).to(dtype)
        for name in ("qkv", "proj"):
            lin = getattr(attn, name)
            del lin.weight, lin.bias
            lin.weight, lin.bias = leaves[f"{name}_w"], leaves[f"{name}_b"]
        if masks is None:
            parts.append(attn(y[..., C:]))
        else:  # Attention.forward with the kernels' masks in place of nn.Dropout
            qkv = attn.qkv(y[..., C:]).reshape(B, N, 3, H, A // H).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            p = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
            if "attn" in masks:
                p = p * masks["attn"].to(dtype) / (1 - ps[0])
            o = attn.proj((p @ v).transpose(1, 2).reshape(B, N, A))
            if "proj" in masks:
                o = o * masks["proj"].to(dtype) / (1 - ps[2])
            parts.append(o)
    out = x + t["scale"].to(dtype)[:, None, None] * torch.cat(parts, -1)
    (out * t["G"].to(dtype)).sum().backward()
    return out, {k: v.grad for k, v in leaves.items()}


def _compare(out, grads, ref_out, ref_grads, C, A):
    keys = ["x", "norm_w", "norm_b"] + (["conv_w"] if C else []) + (["qkv_w", "qkv_b", "proj_w", "proj_b"] if A
                                                                     else [])
    res = {"out": _rel(out, ref_out)}
    for k in keys:
        res["grad_" + k] = _rel(grads[k], ref_grads[k])
    return res


def case_op(B, grid, C, H, hd, noncontig=False):
    import torch
    t, low, N, D, A = _inputs(B, grid, C, H, hd, torch.float32, noncontig)
    out, grads, _ = _fused(low, N, D, C, A, H, grid, noncontig=noncontig)
    ref_out, ref_grads = _reference(t, C, A, H, grid)
    return {"errors": _compare(out, grads, ref_out, ref_grads, C, A), "tol": 1e-5}


def case_half(B, grid, C, H, hd, dtype="float16", noncontig=False):
    """fp16 (bf16: GPU only) kernels vs float64, against twice the error of the reference modules run in that
    dtype, + 1e-3."""
    import torch
    dtype = getattr(torch, dtype)
    t, low, N, D, A = _inputs(B, grid, C, H, hd, dtype, noncontig)
    t = {k: v.to(dtype).double() for k, v in t.items()}  # the reference sees the same rounded inputs
    out, grads, _ = _fused(low, N, D, C, A, H, grid)
    ref_out, ref_grads = _reference(t, C, A, H, grid)
    half_out, half_grads = _reference(t, C, A, H, grid, dtype=dtype)
    fused = _compare(out, grads, ref_out, ref_grads, C, A)
    torch_half = _compare(half_out, half_grads, ref_out, ref_grads, C, A)
    return {"errors": fused, "limits": {k: 2 * v + 1e-3 for k, v in torch_half.items()}}


def case_dropout(B, grid, C, H, hd, ps):
    import torch
    from eit_fast.ops.block_mixer import dropout_masks
    t, low, N, D, A = _inputs(B, grid, C, H, hd, torch.float32)
    out, grads, seed = _fused(low, N, D, C, A, H, grid, ps=ps)
    masks = dropout_masks(seed, B, N, C, A, H, *ps)
    ref_out, ref_grads = _reference(t, C, A, H, grid, masks=masks, ps=ps)
    res = {"errors": _compare(out, grads, ref_out, ref_grads, C, A), "tol": 1e-5}
    rates = dict(zip(("attn", "conv", "proj"), ps))
    res["keep_rate"] = {k: [float(m.float().mean()), 1 - rates[k], m.numel()] for k, m in masks.items()}
    res["masks"] = sorted(masks)
    # the mask really is what the kernel applied: another seed gives another output
    out2, _, _ = _fused(low, N, D, C, A, H, grid, ps=ps, seed_value=99)
    res["other_seed_differs"] = _rel(out2, out) > 1e-3
    return res


def _launch_all(low, grid, C, H, hd, ps, seed, cfgs, nan):
    """Every launcher of the op in order, on NaN-poisoned outputs from `nan(*shape, dtype)`: the forward's
    outputs and every gradient, with the tile configs `cfgs` (kind -> config)."""
    import torch
    from eit_fast.kernels import attention, dwconv, layernorm, mixer
    from eit_fast.ops import block_mixer as op
    x, dt = low["x"], low["x"].dtype
    B, N, D = x.shape
    M, A = B * N, D - C
    HP, AP, CP = op.head_pad(hd), op.head_pad(A), op.head_pad(C)
    dot = attention.dot_options(dt)
    r = {}
    r["y_conv"], r["y_attn"] = nan(M, CP, dtype=dt), nan(M, AP, dtype=dt)
    r["mean"], r["rstd"] = nan(M, dtype=torch.float32), nan(M, dtype=torch.float32)
    layernorm.launch_layernorm_forward(x, low["norm_w"], low["norm_b"], r["y_conv"], r["y_attn"], r["mean"], r["rstd"],
                                       C, 1e-6)
    wq, bq = op.pad_qkv(low["qkv_w"], low["qkv_b"], H, HP, AP)
    qkv = torch.addmm(bq, r["y_attn"], wq.t()).view(B, N, 3, H, HP)
    r["out"], r["o"], r["lse"] = nan(B, N, D, dtype=dt), nan(B, N, H, HP, dtype=dt), nan(B, H, N, dtype=torch.float32)
    bits = torch.full(attention.bits_shape(B, H, N), -7, dtype=torch.int32, device=DEVICE)
    cw = dwconv.tap_major(low["conv_w"], CP)
    mixer.launch_mixer_forward(x, r["y_conv"], cw, qkv, r["o"], r["lse"], bits, low["scale"].float(), seed, r["out"], C,
                               grid, hd, ps[0], ps[1], cfgs["attn_fwd"], op.CONV_TILE, dot)
    wp = op.pad_proj(low["proj_w"], H, HP).contiguous()
    mixer.launch_projection(r["o"], wp, low["proj_b"], x, low["scale"].float(), seed, r["out"], ps[2], cfgs["proj"],
                            dot)
    g = low["G"]
    r["gz_conv"], r["ga"] = nan(M, CP, dtype=dt), nan(M, A, dtype=dt)
    r["dproj_b"] = mixer.launch_mixer_grad(g, low["scale"].float(), seed, r["gz_conv"], r["ga"], C, ps[1], ps[2])
    r["dy_conv"] = nan(M, CP, dtype=dt)
    if C:
        r["dconv_w"] = dwconv.launch_conv_backward(r["gz_conv"].view(B, N, CP), r["y_conv"].view(B, N, CP), cw,
                                                   r["dy_conv"].view(B, N, CP), C, grid)
    do = (r["ga"] @ wp).view(B, N, H, HP)
    r["dqkv"] = nan(B, N, 3, H, HP, dtype=dt)
    r["dqkv_b"] = attention.launch_attention_backward(qkv, r["o"], do, r["lse"], bits, r["dqkv"], hd, ps[0],
                                                      cfgs["attn_bwd"])
    r["bits"] = bits
    d2 = r["dqkv"].view(M, -1)
    r["dx"] = nan(B, N, D, dtype=dt)
    r["dnorm_w"], r["dnorm_b"] = layernorm.launch_layernorm_backward(x, low["norm_w"], r["mean"], r["rstd"],
                                                                     r["dy_conv"], d2 @ wq, g, r["dx"], C)
    return r


def case_poison():
    """Every launcher fills every element of NaN-poisoned outputs, with the values the op returns."""
    import torch
    from eit_fast.ops import block_mixer as op
    B, grid, C, H, hd = 2, (5, 9), 37, 3, 5
    t, low, N, D, A = _inputs(B, grid, C, H, hd, torch.float32)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    ps = (0.1, 0.2, 0.3)
    cfgs = {k: op.configs(k, torch.float32, N, op.head_pad(hd))[0] for k in ("attn_fwd", "attn_bwd", "proj")}
    r = _launch_all(low, grid, C, H, hd, ps, seed, cfgs,
                    lambda *s, dtype: torch.full(s, float("nan"), dtype=dtype, device=DEVICE))
    out, y_conv, y_attn, mean, rstd, qkv, o, lse, bits = op.block_mixer(
        low["x"], low["norm_w"], low["norm_b"], low["conv_w"], low["qkv_w"], low["qkv_b"], low["proj_w"],
        low["proj_b"], low["scale"].float(), seed, *grid, H, 1e-6, *ps, torch.float32)
    grads = op.block_mixer_backward(low["G"], low["x"], low["norm_w"], low["conv_w"], low["qkv_w"], low["proj_w"],
                                    y_conv, y_attn, mean, rstd, qkv, o, lse, bits, low["scale"].float(), seed, *grid, H,
                                    *ps, torch.float32)
    r["gz_conv"], r["dy_conv"] = r["gz_conv"][:, :C], r["dy_conv"][:, :C]  # their row padding is never read
    res = {"finite": {k: bool(torch.isfinite(v).all()) for k, v in r.items() if k != "bits"}}
    mine = dict(out=out, y_conv=y_conv, y_attn=y_attn, mean=mean, rstd=rstd, o=o, lse=lse,
                **dict(zip(("dx", "dnorm_w", "dnorm_b", "dconv_w", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b"), grads)))
    res["errors"] = {k: _rel(r[k], mine[k]) for k in ("out", "y_conv", "y_attn", "mean", "rstd", "o", "lse", "dx",
                                                       "dnorm_w", "dnorm_b", "dproj_b")}
    res["errors"]["dconv_w"] = _rel(r["dconv_w"].reshape(-1), mine["dconv_w"].reshape(-1))
    # the keep bits are the keep mask: every word written, bit for bit what dropout_masks generates
    m = op.dropout_masks(seed, B, N, C, A, H, *ps)["attn"].reshape(B * H, N, N)
    m = torch.nn.functional.pad(m, (0, 32 * r["bits"].shape[-1] - N)).reshape(B * H, N, -1, 32).long()
    words = (m << torch.arange(32)).sum(-1)
    res["errors"]["bits"] = float((words != r["bits"].long() % 2 ** 32).any())
    res["errors"]["bits_op"] = float((bits != r["bits"]).any())
    res["tol"] = 0.0  # the same kernels on the same inputs: bit for bit
    return res


def case_configs(B, grid, C, H, hd, ps=(0.0, 0.0, 0.0)):
    """Every shipped 16-bit tile config (not only the interpreter's first) computes the same function: fp16
    launches against the float64 reference (with the kernels' dropout masks when ps has rates), at twice the
    error of the fp16 reference modules + 1e-3."""
    import torch
    from eit_fast.ops import block_mixer as op
    t, low, N, D, A = _inputs(B, grid, C, H, hd, torch.float16)
    t = {k: v.to(torch.float16).double() for k, v in t.items()}
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    masks = op.dropout_masks(seed, B, N, C, A, H, *ps) if any(ps) else None
    ref_out, ref_grads = _reference(t, C, A, H, grid, masks=masks, ps=ps)
    half_out, half_grads = _reference(t, C, A, H, grid, masks=masks, ps=ps, dtype=torch.float16)
    limit = {"out": 2 * _rel(half_out, ref_out) + 1e-3, "dx": 2 * _rel(half_grads["x"], ref_grads["x"]) + 1e-3}
    kinds = ("attn_fwd", "attn_bwd", "proj")
    space = {k: op.configs(k, torch.float16, N, op.head_pad(hd), ps[0] > 0) for k in kinds}
    res = {"errors": {}, "limits": {}}
    for i in range(max(len(v) for v in space.values())):  # each config once, the others at their first
        cfgs = {k: space[k][min(i, len(space[k]) - 1)] for k in kinds}
        r = _launch_all(low, grid, C, H, hd, ps, seed, cfgs,
                        lambda *s, dtype: torch.full(s, float("nan"), dtype=dtype, device=DEVICE))
        name = "+".join(op.config_name(c) for c in cfgs.values())
        res["errors"][f"out {name}"] = _rel(r["out"], ref_out)
        res["errors"][f"dx {name}"] = _rel(r["dx"], ref_grads["x"])
        res["limits"][f"out {name}"], res["limits"][f"dx {name}"] = limit["out"], limit["dx"]
    return res


def case_model(name, B, **overrides):
    """create_model(impl="fused") vs impl="reference", same weights, fp32, eval mode: logits and every
    parameter gradient."""
    import torch
    from eit_fast import create_model
    ref = create_model(name, impl="reference", **overrides).to(DEVICE).eval()
    fused = create_model(name, impl="fused", **overrides).to(DEVICE).eval()
    fused.load_state_dict(ref.state_dict())
    n_fused = sum(type(b).__name__ == "FusedBlock" for b in fused.blocks)
    with torch.no_grad():  # the authors' init is tiny (std 0.01): give the mixers real work to do
        for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
            p_ref.normal_(0, 0.05)
            p_fused.copy_(p_ref)
    img = ref.cfg.img_size
    x = torch.randn(B, 3, img, img, device=DEVICE)
    res = {"fused_blocks": [n_fused, len(fused.blocks)], "errors": {}, "tol": 1e-5}
    outs = []
    for m in (ref, fused):
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
    res["errors"]["logits"] = _rel(outs[1], outs[0])
    named = dict(fused.named_parameters())
    for k, p in ref.named_parameters():
        res["errors"]["grad_" + k] = _rel(named[k].grad, p.grad)
    return res


def case_train(name="eit_micro", B=4, steps=3):
    """A few AdamW steps (train mode, drop-path on) with fused and reference blocks: the same losses."""
    import torch
    from eit_fast import create_model
    losses = {}
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        model = create_model(name, impl=impl, drop_path_rate=0.1).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        losses[impl] = []
        for _ in range(steps):
            x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
            x, y = x.to(DEVICE), y.to(DEVICE)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(float(loss))
    return {"losses": losses}


def _run_case(name):
    for table, fn in ((OP_CASES, case_op), (SLOW_OP_CASES, case_op), (HALF_CASES, case_half),
                      (DROPOUT_CASES, case_dropout), (CONFIG_CASES, case_configs), (SLOW_CONFIG_CASES, case_configs),
                      (MODEL_CASES, case_model), (SLOW_MODEL_CASES, case_model)):
        if name in table:
            return fn(**table[name])
    return {"poison": case_poison, "train": case_train}[name]()


def _child(names):
    results = {}
    for name in names:
        try:
            results[name] = _run_case(name)
        except Exception:
            results[name] = {"exception": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


# --- the pytest side -------------------------------------------------------------------------------------

def _spawn(names, timeout=1500):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, __file__, *names], env=env, capture_output=True, text=True,
                       timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, f"interpreter child failed (rc {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def fast_results():
    return _spawn(FAST)


def _check(res):
    assert "exception" not in res, res.get("exception")
    assert res.get("fused_blocks", [1, 1])[0] == res.get("fused_blocks", [1, 1])[1] > 0, res
    limits = res.get("limits") or {k: res["tol"] for k in res["errors"]}
    bad = {k: (v, limits[k]) for k, v in res["errors"].items() if not v <= limits[k]}
    assert not bad, f"errors over their limits (error, limit): {bad}"
    assert res["errors"], "no errors measured"


@pytest.mark.parametrize("name", list(OP_CASES) + list(HALF_CASES) + list(CONFIG_CASES) + list(MODEL_CASES))
def test_parity(fast_results, name):
    _check(fast_results[name])


@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_dropout_matches_reference_with_the_kernel_masks(fast_results, name):
    res = fast_results[name]
    _check(res)
    expect = {"attn", "conv", "proj"} & {k for k, p in zip(("attn", "conv", "proj"), DROPOUT_CASES[name]["ps"])
                                         if p > 0}
    if not DROPOUT_CASES[name]["C"]:
        expect.discard("conv")
    assert set(res["masks"]) == expect
    for got, want, n in res["keep_rate"].values():  # within 5 standard deviations of a Bernoulli mean
        assert abs(got - want) <= 5 * (want * (1 - want) / n) ** 0.5, res["keep_rate"]
    assert res["other_seed_differs"]


def test_poisoned_outputs_are_fully_written(fast_results):
    res = fast_results["poison"]
    assert "exception" not in res, res.get("exception")
    assert all(res["finite"].values()), res["finite"]
    _check(res)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_OP_CASES) + list(SLOW_CONFIG_CASES) + list(SLOW_MODEL_CASES))
def test_parity_slow(name):
    _check(_spawn([name])[name])


@pytest.mark.slow
def test_training_tracks_reference_losses():
    res = _spawn(["train"])["train"]
    assert "exception" not in res, res.get("exception")
    ref, fused = res["losses"]["reference"], res["losses"]["fused"]
    assert len(ref) == len(fused) == 3 and all(l == l for l in ref + fused)
    for a, b in zip(ref, fused):
        assert abs(a - b) <= 1e-5 * abs(a), res["losses"]


# --- the same cases on a GPU, compiled (in this process: no interpreter), bf16 included --------------------

GPU_CASES = ["poison"] + list(OP_CASES) + list(SLOW_OP_CASES) + list(HALF_CASES) + list(DROPOUT_CASES) + \
    list(CONFIG_CASES) + list(SLOW_CONFIG_CASES) + list(MODEL_CASES) + list(SLOW_MODEL_CASES)


@pytest.fixture
def on_gpu():
    """The cases on "cuda", with TF32 off (the fp32 cases' bar is IEEE fp32)."""
    import torch
    global DEVICE
    DEVICE = "cuda"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        DEVICE = "cpu"
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.cuda
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_parity(on_gpu, name):
    _check(_run_case(name))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(OP_CASES) + list(SLOW_OP_CASES))
def test_gpu_parity_bf16(on_gpu, name):
    """bf16 (the interpreter cannot run it: its bf16 dot and fp32 -> bf16 cast are wrong) on every op case."""
    _check(case_half(**OP_CASES.get(name, SLOW_OP_CASES.get(name)), dtype="bfloat16"))


@pytest.mark.cuda
def test_gpu_training_tracks_reference_losses(on_gpu):
    res = case_train()
    ref, fused = res["losses"]["reference"], res["losses"]["fused"]
    for a, b in zip(ref, fused):
        assert abs(a - b) <= 1e-5 * abs(a), res["losses"]


if __name__ == "__main__":
    _child(sys.argv[1:])
