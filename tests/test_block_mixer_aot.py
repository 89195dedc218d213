"""Static evidence for the fused mixer's Triton kernels, from ahead-of-time compiles (docs/design.md section 4).

The op itself is run on meta tensors of the released models' shapes, with its launches recorded instead of
run (so every kernel is specialised exactly as the JIT would specialise it at that call: dtypes,
divisibility, constexprs) and with each tile config forced in turn; then triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32)) gives TTGIR and PTX, which Triton's bundled ptxas assembles with -v for
registers and spills. This runs in a child process without TRITON_INTERPRET (the decorator reads it at
import). Checks, per compiled kernel:

- no warp replication: every MMA layout (`#ttg.nvidia_mma<{versionMajor, warpsPerCTA = [wm, wn],
  instrShape = [16, n, ...]}>`) covers wm*16 rows and wn*n columns; each tensor in it (and each dot operand
  on it) is at least that large, else warps compute copies of the same rows;
- on sm_90 the attention forward and backward (and the projection) run wgmma (MMA v3);
- no 16-bit scalar global load (ld.global.b16/u16/...) in the attention and projection kernels;
- zero spills, shared memory within the architecture's per-block limit, no atomics of any kind;
- occupancy on an H100 SM (65,536 registers, 228 KiB shared memory, 64 warps, 32 blocks), printed.

`python tests/test_block_mixer_aot.py --report` prints the table for sm_90, bf16 autocast, every config.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes one block may use (opt-in maximum)
MODELS = {"eit_tiny": 64, "eit_mini": 64, "eit_base": 64, "eit_cifar": 256}  # released configs, bench batches
ATTENTION_KERNELS = {"mixer_fwd_kernel", "attn_bwd_kernel"}
MMA_KERNELS = ATTENTION_KERNELS | {"proj_residual_kernel"}
ALL_KERNELS = {"layernorm_fwd_kernel", "mixer_fwd_kernel", "proj_residual_kernel", "mixer_grad_kernel",
               "conv_bwd_input_kernel", "conv_bwd_weight_kernel", "attn_bwd_kernel", "layernorm_bwd_kernel"}
SM_REGS, SM_SMEM, SM_WARPS, SM_BLOCKS = 65536, 233472, 64, 32


# --- the child: capture launches, compile, inspect ---------------------------------------------------------

def _capture(models, compute, all_configs, dropout, layers=None):
    """[(kernel, args, kwargs, where)] of every launch the op makes for each layer of `models` (or `layers`)."""
    import torch
    from eit_fast.configs import get_config
    from eit_fast.kernels import dropout as drop_k
    from eit_fast.ops import block_mixer as op
    cd = getattr(torch, compute)
    calls = []

    class Rec:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.k, a, kw, where))

    real_configs, real_use, real_wrap = op.configs, op._use_kernels, op.wrap_triton
    op._use_kernels, op.wrap_triton = (lambda t: True), Rec
    try:
        for name in models:
            cfg = get_config(name)
            B, N, D, H = MODELS[name], cfg.num_tokens, cfg.embed_dim, cfg.num_heads
            gh, gw = cfg.grid_hw
            rate_sets = [(0.0, 0.0, 0.0)]
            if dropout or cfg.attn_drop_rate or cfg.drop_rate:
                rate_sets.append((max(cfg.attn_drop_rate, 0.1), max(cfg.attn_drop_rate, 0.1),
                                  max(cfg.drop_rate, 0.1)))
            for layer, (A, C) in enumerate(cfg.splits):
                if layers is not None and layer not in layers:
                    continue
                hp = op.head_pad(A // H) if A else 8
                xdt = torch.float32 if cd != torch.float32 else cd  # autocast: fp32 residual and LayerNorm
                m = lambda *s, dtype=cd: torch.empty(s, device="meta", dtype=dtype)
                x = m(B, N, D, dtype=xdt)
                w = dict(norm_w=m(D, dtype=xdt), norm_b=m(D, dtype=xdt), conv_w=m(C, 1, 3, 3, dtype=xdt) if C else None,
                         qkv_w=m(3 * A, A, dtype=xdt) if A else None, qkv_b=m(3 * A, dtype=xdt) if A else None,
                         proj_w=m(A, A, dtype=xdt) if A else None, proj_b=m(A, dtype=xdt) if A else None)
                for ps in rate_sets:
                    space = {k: real_configs(k, cd, N, hp, ps[0] > 0) for k in ("attn_fwd", "attn_bwd", "proj")}
                    for i in range(max(map(len, space.values())) if all_configs else 1):
                        pick = {k: v[min(i, len(v) - 1)] for k, v in space.items()}
                        op.configs = lambda kind, *a, _p=pick: [_p[kind]]
                        where = dict(model=name, layer=layer, conv=C, attn=A, head=A // H if A else 0, hp=hp,
                                     rates=ps, configs={k: op.config_name(v) for k, v in pick.items()})
                        outs = op.forward_impl(x, w["norm_w"], w["norm_b"], w["conv_w"], w["qkv_w"], w["qkv_b"],
                                               w["proj_w"], w["proj_b"], m(B, dtype=torch.float32),
                                               m(1, dtype=torch.int64), gh, gw, H, 1e-6, *ps, cd)
                        op.backward_impl(m(B, N, D, dtype=xdt), x, w["norm_w"], w["conv_w"], w["qkv_w"],
                                         w["proj_w"], *outs[1:], m(B, dtype=torch.float32),
                                         m(1, dtype=torch.int64), gh, gw, H, *ps, cd)
        where = dict(model="masks")
        drop_k.launch_keep_mask(torch.empty(1000, dtype=torch.int8, device="meta"),
                                torch.empty(1, dtype=torch.int64, device="meta"), 0, 0.1, wrap=Rec)
    finally:
        op.configs, op._use_kernels, op.wrap_triton = real_configs, real_use, real_wrap
    return calls


def _mma_layouts(ttgir):
    """{alias: (version, warpsPerCTA, instrShape)} of the MMA layouts TTGIR defines."""
    out = {}
    for alias, body in re.findall(r"^(#\w+) = #ttg\.nvidia_mma<\{([^}]*)\}>", ttgir, re.M):
        ver = int(re.search(r"versionMajor = (\d+)", body).group(1))
        warps = [int(v) for v in re.search(r"warpsPerCTA = \[([\d, ]+)\]", body).group(1).split(",")]
        instr = [int(v) for v in re.search(r"instrShape = \[([\d, ]+)\]", body).group(1).split(",")]
        out[alias] = (ver, warps, instr)
    return out


def _replication(ttgir):
    """[(tensor shape, layout, rows x cols one MMA covers)] of tensors smaller than their MMA layout covers."""
    layouts = _mma_layouts(ttgir)
    bad = []
    for shape, enc in re.findall(r"tensor<([\dx]+)x\w+, (#[\w.]+|#ttg\.dot_op<\{[^}]*\}>)>", ttgir):
        dims = [int(d) for d in shape.split("x")]
        op_idx = None
        if enc.startswith("#ttg.dot_op"):
            op_idx = int(re.search(r"opIdx = (\d)", enc).group(1))
            enc = re.search(r"parent = (#\w+)", enc).group(1)
        if enc not in layouts or len(dims) != 2 or 1 in dims:  # a broadcast row or column, not MMA work
            continue
        ver, (wm, wn), instr = layouts[enc]
        rows, cols = wm * 16, wn * (instr[1] if ver == 3 else 8)
        ok = {None: dims[0] >= rows and dims[1] >= cols, 0: dims[0] >= rows, 1: dims[1] >= cols}[op_idx]
        if not ok:
            bad.append((shape, enc, f"{rows}x{cols}"))
    return sorted(set(bad))


def _occupancy(regs, warps, smem):
    regs = -(-regs // 8) * 8  # allocated per thread in units of 8
    return min(SM_REGS // (regs * 32 * warps), SM_SMEM // (smem + 1024), SM_WARPS // warps, SM_BLOCKS)


def _compile_all(archs, models, computes, all_configs, dropout, kernels=None, layers=None):
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    rows, seen = [], {}
    for compute in computes:
        for k, args, kwargs, where in _capture(models, compute, all_configs, dropout, layers):
            if kernels is not None and k.fn.__name__ not in kernels:
                continue
            for arch in archs:
                target = GPUTarget("cuda", arch, 32)
                backend = make_backend(target)
                binder = create_function_from_signature(k.signature, k.params, backend)
                bound, spec, opts = binder(*args, **kwargs)
                options, sig, constexprs, attrs = k._pack_args(backend, kwargs, bound, spec, opts)
                key = (k.fn.__name__, arch, str(sig), str(sorted(constexprs.items())), str(attrs),
                       options.num_warps, options.num_stages)
                if key in seen:
                    seen[key]["uses"].append(where)
                    continue
                compiled = triton.compile(ASTSource(k, sig, constexprs, attrs), target=target,
                                          options=options.__dict__)
                ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
                with tempfile.TemporaryDirectory() as d:
                    with open(os.path.join(d, "k.ptx"), "w") as f:
                        f.write(ptx)
                    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
                    # the flags Triton's own make_cubin passes, so the registers are the JIT's
                    fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
                    r = subprocess.run([get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                                        f"--gpu-name={gpu}", os.path.join(d, "k.ptx"), "-o",
                                        os.path.join(d, "k.cubin")], capture_output=True, text=True)
                info = r.stderr
                regs = max([int(v) for v in re.findall(r"Used (\d+) registers", info)] or [-1])
                spills = [int(t) for t in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
                consts = {str(k.arg_names[p[0]]): v for p, v in constexprs.items()
                          if k.arg_names[p[0]].isupper() and v is not None and k.arg_names[p[0]] != "DOT_F32"}
                loads = {}
                for ld in re.findall(r"\bld\.global[.\w]*", ptx):
                    loads[ld] = loads.get(ld, 0) + 1
                layouts = _mma_layouts(ttgir)
                row = dict(kernel=k.fn.__name__, arch=arch, compute=compute, ptxas_rc=r.returncode,
                           ptxas=info[-400:] if r.returncode else "", registers=regs,
                           spill_bytes=sum(spills) if spills else -1, smem=compiled.metadata.shared,
                           num_warps=options.num_warps, num_stages=options.num_stages, constexprs=consts,
                           mma=sorted({f"v{v} warps{w} instr{i}" for v, w, i in layouts.values()}),
                           mma_versions=sorted({v for v, _, _ in layouts.values()}),
                           replicated=_replication(ttgir), wgmma=ptx.count("wgmma.mma_async"),
                           mma_sync=ptx.count("mma.sync"), cp_async=len(re.findall(r"\bcp\.async\.", ptx)),
                           tma=ptx.count("cp.async.bulk.tensor"), ex2=ptx.count("ex2.approx"), loads=loads,
                           scalar16=sum(n for ld, n in loads.items() if re.search(r"\.(b16|u16|s16|f16|bf16)$", ld)),
                           atomics=len(re.findall(r"\b(?:atom|red)\.", ptx)),
                           occupancy=_occupancy(regs, options.num_warps, compiled.metadata.shared),
                           uses=[where])
                seen[key] = row
                rows.append(row)
    return rows


def _spawn(archs, models, computes, all_configs, dropout, timeout=3000):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps(dict(archs=archs, models=models, computes=computes, all_configs=all_configs, dropout=dropout))
    r = subprocess.run([sys.executable, __file__, "--json", spec], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


# --- the checks ------------------------------------------------------------------------------------------

def _where(r):
    u = r["uses"][0]
    return f"{r['kernel']} sm_{r['arch']} {r['compute']} {r['constexprs']} (first use: {u})"


def _check_resources(rows, archs, no_spill_archs=(90,)):
    """Every row: assembled, within the architecture's shared memory, no atomics, no replication; zero spills
    on `no_spill_archs`. The configs are tuned for sm_90; on sm_80/86/89 (mma.sync, no wgmma) some 16-bit
    attention tiles spill (printed, see docs/design.md section 7.3)."""
    assert rows and {r["arch"] for r in rows} == set(archs)
    for r in rows:
        assert r["ptxas_rc"] == 0, f"{_where(r)}: ptxas failed: {r['ptxas']}"
        assert r["registers"] > 0 and r["spill_bytes"] >= 0, _where(r)
        if r["arch"] in no_spill_archs:
            assert r["spill_bytes"] == 0, f"{_where(r)}: {r['spill_bytes']} bytes of spills"
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], f"{_where(r)}: {r['smem']} bytes of shared memory"
        assert r["atomics"] == 0, f"{_where(r)}: {r['atomics']} atomic instructions"
        assert not r["replicated"], f"{_where(r)}: tensors smaller than their MMA layout: {r['replicated']}"
        assert r["occupancy"] >= 1, _where(r)
    assert {r["kernel"] for r in rows} == ALL_KERNELS | {"keep_mask_kernel"}


def _check_hopper(rows):
    """bf16 on sm_90: wgmma in the attention and projection kernels, vector loads of every 16-bit operand."""
    for r in rows:
        if r["arch"] != 90 or r["compute"] == "float32":
            continue
        if r["kernel"] in MMA_KERNELS and (r["kernel"] != "mixer_fwd_kernel" or r["constexprs"].get("HAS_ATTN")):
            assert r["wgmma"] > 0 and r["mma_sync"] == 0 and r["mma_versions"] == [3], \
                f"{_where(r)}: MMA {r['mma']}, {r['wgmma']} wgmma, {r['mma_sync']} mma.sync"
        if r["kernel"] in MMA_KERNELS:
            assert r["scalar16"] == 0, f"{_where(r)}: 16-bit scalar global loads {r['loads']}"


@pytest.fixture(scope="module")
def released_bf16_sm90():
    return _spawn([90], list(MODELS), ["bfloat16"], all_configs=False, dropout=False)


def test_released_configs_bf16_sm90_static_checks(released_bf16_sm90):
    """eit_tiny (224 px), eit_mini, eit_base, eit_cifar under bf16 autocast, each layer, the first config:
    no replicated warps, wgmma, no 16-bit scalar loads, no spills, no atomics."""
    rows = released_bf16_sm90
    _check_resources(rows, [90])
    _check_hopper(rows)
    hps = {u["hp"] for r in rows for u in r["uses"] if r["kernel"] == "attn_bwd_kernel"}
    assert hps == {8, 16, 24, 32, 40}, hps  # every padded head size of the released models was compiled


def test_the_checks_can_fail():
    """The TTGIR reading flags a 64-row tile on 8 warps along M (the old forward's P.V), and passes 4 warps; the
    occupancy arithmetic is bound by registers, warps or shared memory as an H100 SM is."""
    ttgir = ("#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = "
             "[16, 64, 16]}>\n#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], "
             "instrShape = [16, 64, 16]}>\n  %0 = ... : tensor<64x64xf32, #mma>\n  %1 = ... : tensor<64x64xf32, "
             "#mma1>\n  %2 = ... : tensor<64x16xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>>\n")
    assert _replication(ttgir) == [("64x16", "#mma", "128x64"), ("64x64", "#mma", "128x64")]
    # registers bound (255 -> 256 x 128 threads: 2 blocks), registers and warps (64: 8 blocks = 32 warps),
    # warps (32: 16 blocks = 64 warps), shared memory (100,000 B + 1 KiB reserved: 2 blocks)
    assert [_occupancy(255, 4, 40960), _occupancy(64, 4, 0), _occupancy(32, 4, 0), _occupancy(32, 4, 100000)] \
        == [2, 8, 16, 2]


@pytest.mark.slow
def test_every_shipped_config_compiles_for_sm80_86_89_90():
    """Every candidate config of every kernel, fp32 / fp16 / bf16, dropout on and off, at the released
    models' shapes: compiles within 99 KB of shared memory on sm_86/sm_89, no replication, no atomics, and on
    sm_90 with zero spills and the Hopper checks. The spills left on sm_80/86/89 are printed."""
    rows = _spawn([80, 86, 89, 90], list(MODELS), ["float32", "float16", "bfloat16"], all_configs=True,
                  dropout=True, timeout=6 * 3600)
    _check_resources(rows, [80, 86, 89, 90])
    _check_hopper(rows)
    spilled = sorted({f"{r['kernel']} sm_{r['arch']} {r['compute']} hp{r['constexprs'].get('HP', '-')}: "
                      f"{r['spill_bytes']} B" for r in rows if r["spill_bytes"]})
    print(f"spills outside sm_90 ({len(spilled)} kernel variants):", *spilled, sep="\n  ")


def _report(rows):
    print(f"{'kernel':<22}{'cfg':<10}{'hp':>3}{'mma':<34}{'wgmma':>6}{'regs':>5}{'spill':>6}{'smem':>7}{'occ':>4}"
          f"{'cp.async':>9}  loads (16-bit scalar)  used by")
    for r in rows:
        c = r["constexprs"]
        cfg = (f"m{c['BLOCK_M']}n{c['BLOCK_N']}" if "BLOCK_M" in c and "BLOCK_N" in c else "") + \
            f"w{r['num_warps']}s{r['num_stages']}"
        hp = c.get("HP", "")
        loads = ",".join(f"{k.removeprefix('ld.global.')}:{v}" for k, v in sorted(r["loads"].items()))
        users = sorted({f"{u['model']}/{u.get('layer', '')}" for u in r["uses"]})
        print(f"{r['kernel']:<22}{cfg:<10}{hp!s:>3}{';'.join(r['mma']) or '-':<34}{r['wgmma']:>6}{r['registers']:>5}"
              f"{r['spill_bytes']:>6}{r['smem']:>7}{r['occupancy']:>4}{r['cp_async']:>9}  {loads} ({r['scalar16']})  "
              f"{' '.join(users[:4])}{' ...' if len(users) > 4 else ''}")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        _report(_compile_all([90], list(MODELS), ["bfloat16"], all_configs=True, dropout=False))
    else:
        spec = json.loads(sys.argv[2])
        print(json.dumps(_compile_all(spec["archs"], spec["models"], spec["computes"], spec["all_configs"],
                                      spec["dropout"])))
