"""Every Triton kernel config the fused mixer ships compiles ahead of time for sm_80 and sm_90, with zero
register spills and shared memory within the hardware's per-block limit (DESIGN.md section 3).

The launchers are run with a recording `wrap` on CPU tensors of the real shapes, so each kernel is
specialised exactly as the JIT would specialise it at that call (dtypes, divisibility, constexprs); then
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) gives PTX, which Triton's bundled ptxas
assembles with -v to report registers and spills. This runs in a child process without TRITON_INTERPRET
(the decorator reads it at import). `python tests/test_block_mixer_aot.py --report` prints the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (opt-in maximum)
DTYPES = ("float32", "float16", "bfloat16")


def _capture(dtype_name, worst_only):
    """(kernel, args, kwargs) of every launch the mixer makes for the shipped shapes and switches."""
    import torch
    from eit_fast.kernels import attention, dropout, dwconv, mixer
    dtype = getattr(torch, dtype_name)
    calls = []

    class Rec:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append((self.k, a, kw))

    # (C, H, head size): head sizes 4, 20, 33 give BLOCK_D 16, 32, 64; (C, 0, 0) is conv only.
    shapes = [(0, 10, 33)] if worst_only else [(290, 10, 4), (130, 10, 20), (0, 10, 33), (50, 10, 33), (60, 0, 0)]
    rates = [(0.1, 0.1, 0.1)] if worst_only else [(0.0, 0.0, 0.0), (0.1, 0.1, 0.1)]
    B, grid = 2, (19, 19)
    N = 1 + grid[0] * grid[1]
    for C, H, hd in shapes:
        if worst_only:
            C = 50
        A = H * hd
        D = C + A
        # The residual stream and LayerNorm output are fp32 under autocast; a model cast to fp16/bf16 as a
        # whole passes them in its dtype: two of the shapes cover that.
        xdt = dtype if hd in (0, 20) else torch.float32
        x = torch.randn(B, N, D, dtype=xdt)
        y = torch.randn(B, N, D, dtype=xdt)[..., :C] if C else None
        w = torch.randn(C, 1, 3, 3, dtype=xdt) if C else None
        qkv = torch.randn(B, N, 3 * A, dtype=dtype) if A else None
        pw, pb = (torch.randn(A, A, dtype=dtype), torch.randn(A)) if A else (None, None)
        o = torch.empty(B, N, A, dtype=dtype)
        lse = torch.empty(B, H, N)
        seed = torch.zeros(1, dtype=torch.int64)
        for ps in rates:
            mixer.launch_mixer_forward(x, y, w, qkv, pw, pb, torch.ones(B), seed, torch.empty_like(x), o, lse,
                                       grid, max(H, 1), *ps, wrap=Rec)
            g = torch.randn(B, N, D, dtype=xdt)
            gz = torch.empty_like(g)
            mixer.launch_mixer_grad(g, torch.ones(B), seed, gz, C, ps[1], ps[2], wrap=Rec)
            if C:
                dwconv.launch_conv_backward(gz[..., :C], y, w, torch.empty(B, N, C, dtype=xdt), grid, wrap=Rec)
            if A:
                attention.launch_attention_backward(qkv, o, torch.randn(B, N, A, dtype=dtype), lse, seed,
                                                    torch.empty_like(qkv), H, ps[0], wrap=Rec)
    dropout.launch_keep_mask(torch.empty(1000, dtype=torch.int8), torch.zeros(1, dtype=torch.int64), 0, 0.1,
                             wrap=Rec)
    return calls


def _compile_all(archs, worst_only):
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    rows, seen = [], set()
    for dtype_name in DTYPES:
        for k, args, kwargs in _capture(dtype_name, worst_only):
            for arch in archs:
                target = GPUTarget("cuda", arch, 32)
                backend = make_backend(target)
                binder = create_function_from_signature(k.signature, k.params, backend)
                bound, spec, opts = binder(*args, **kwargs)
                options, sig, constexprs, attrs = k._pack_args(backend, kwargs, bound, spec, opts)
                key = (k.fn.__name__, arch, str(sig), str(sorted(constexprs.items())), str(attrs),
                       options.num_warps)
                if key in seen:
                    continue
                seen.add(key)
                compiled = triton.compile(ASTSource(k, sig, constexprs, attrs), target=target,
                                          options=options.__dict__)
                with tempfile.TemporaryDirectory() as d:
                    with open(os.path.join(d, "k.ptx"), "w") as f:
                        f.write(compiled.asm["ptx"])
                    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
                    r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", os.path.join(d, "k.ptx"),
                                        "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
                info = r.stderr
                regs = [int(s.split()[0]) for s in info.split("Used ")[1:]]
                spills = [int(t) for t in __import__("re").findall(r"(\d+) bytes spill (?:stores|loads)", info)]
                consts = {str(k.arg_names[p[0]]): v for p, v in constexprs.items()
                          if k.arg_names[p[0]].isupper() and not isinstance(v, type(None))}
                rows.append(dict(kernel=k.fn.__name__, arch=arch, dtype=dtype_name, ptxas_rc=r.returncode,
                                 ptxas=info[-400:] if r.returncode else "", registers=max(regs or [-1]),
                                 spill_bytes=sum(spills) if spills else -1, smem=compiled.metadata.shared,
                                 num_warps=options.num_warps, constexprs=consts))
    return rows


def _spawn(archs, worst_only):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__, "--json", ",".join(map(str, archs)), str(int(worst_only))],
                       env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1])


def _check(rows, archs):
    assert rows and {r["arch"] for r in rows} == set(archs)
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']}"
        assert r["ptxas_rc"] == 0, f"{where}: ptxas failed: {r['ptxas']}"
        assert r["registers"] > 0 and r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} bytes of spills"
        assert r["smem"] <= SMEM_LIMIT[r["arch"]], f"{where}: {r['smem']} bytes of shared memory"
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"mixer_fwd_kernel", "proj_residual_kernel", "mixer_grad_kernel", "conv_bwd_input_kernel",
                       "conv_bwd_weight_kernel", "attn_bwd_delta_kernel", "attn_bwd_dkdv_kernel",
                       "attn_bwd_dq_kernel", "keep_mask_kernel"}, kernels


def test_worst_case_configs_compile_for_sm80_and_sm90_without_spills():
    """Each kernel at its heaviest switches (dropout on, head size 33 -> BLOCK_D 64, both branches), every
    dtype, both architectures."""
    _check(_spawn((80, 90), worst_only=True), (80, 90))


@pytest.mark.slow
def test_every_shipped_config_compiles_for_sm80_and_sm90_without_spills():
    _check(_spawn((80, 90), worst_only=False), (80, 90))


def _report():
    rows = _compile_all((90,), worst_only=False)
    print(f"{'kernel':<24}{'dtype':<10}{'warps':>6}{'regs':>6}{'spill':>7}{'smem':>8}  constexprs")
    for r in rows:
        c = {k: v for k, v in r["constexprs"].items() if k not in ("DOT_F32",)}
        print(f"{r['kernel']:<24}{r['dtype']:<10}{r['num_warps']:>6}{r['registers']:>6}{r['spill_bytes']:>7}"
              f"{r['smem']:>8}  {c}")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        _report()
    else:
        archs = tuple(int(a) for a in sys.argv[2].split(","))
        print(json.dumps(_compile_all(archs, bool(int(sys.argv[3])))))
