"""eit_fast::patch_projection (conv + max-pool stem in one op) against F.conv2d + F.max_pool2d: outputs and
every gradient, both EIT stems, odd and non-square sizes, ties, NaN, gradcheck, opcheck, bad input, the CPU
micro-kernels (AVX2 always, AVX-512 where the CPU has it), channels_last input read without a copy, and the
drop-in module. The same cases on a GPU: tests/test_stem_cuda.py."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import eit_fast
from eit_fast.modules import fused_patch
from eit_fast.modules.fused_patch import FusedPatchEmbed
from eit_fast.ops import patch_projection as op

pytestmark = pytest.mark.skipif(not op.loaded(), reason=f"eit_fast._C not built: {op.load_error()}")

# (B, H, W, D, k, stride, pool): the two stems (16/4/3 at 224 and others, 3/1/4 at 32), odd sizes, batch 1,
# D off every tile multiple, pool 1, 1x1 kernels, windows reaching the padded border.
CASES = [
    (2, 32, 32, 37, 3, 1, 4), (1, 35, 29, 21, 3, 1, 4), (3, 17, 31, 5, 3, 1, 4),
    (1, 64, 64, 19, 16, 4, 3), (2, 61, 47, 33, 16, 4, 3), (1, 40, 52, 7, 16, 4, 3),
    (2, 9, 13, 17, 1, 1, 2), (1, 12, 10, 3, 5, 2, 1), (1, 27, 27, 250, 3, 1, 4),
]


def reference(x, w, b, stride, pool):
    return F.max_pool2d(F.conv2d(x, w, b, stride, w.shape[-1] // 2), pool, pool).flatten(2).transpose(1, 2)


def fused(x, w, b, stride, pool):
    return op.patch_projection(x, w, b, stride, w.shape[-1] // 2, pool)


def rel(a, ref):
    assert not torch.isnan(a).any()
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run_both(x, w, b, stride, pool, grad_x=True):
    outs, grads = [], []
    g = None
    for fn in (reference, fused):
        xi, wi, bi = (t.detach().clone().requires_grad_(t is not x or grad_x) for t in (x, w, b))
        out = fn(xi, wi, bi, stride, pool)
        g = torch.randn_like(out) if g is None else g
        out.backward(g)
        outs.append(out.detach())
        grads.append([t.grad for t in (xi, wi, bi)])
    return outs, grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_D{}_k{}s{}p{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_conv_then_maxpool(case, dtype):
    B, H, W, D, k, s, p = case
    x, w, b = torch.randn(B, 3, H, W, dtype=dtype), torch.randn(D, 3, k, k, dtype=dtype), torch.randn(D, dtype=dtype)
    (ref, out), (gref, gout) = run_both(x, w, b, s, p)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.shape == ref.shape == (B, ((H + 2 * (k // 2) - k) // s + 1) // p * (((W + 2 * (k // 2) - k) // s + 1) // p), D)
    assert rel(out, ref) < tol
    for got, want, name in zip(gout, gref, ("x", "weight", "bias")):
        assert rel(got, want) < tol, name


@pytest.fixture(params=["avx2", "avx512", "generic"])
def cpu_isa(request, monkeypatch):
    """Forces a CPU micro-kernel (EIT_FAST_CPU_ISA); skips, saying why, where the CPU lacks it."""
    monkeypatch.setenv("EIT_FAST_CPU_ISA", request.param)
    try:
        got = torch.ops.eit_fast.patch_projection_cpu_isa()
    except RuntimeError as e:
        pytest.skip(f"this CPU cannot run the {request.param} micro-kernel: {e}")
    assert got == request.param
    return got


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_D{}_k{}s{}p{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_micro_kernel_matches(case, dtype, cpu_isa):
    B, H, W, D, k, s, p = case
    x, w, b = torch.randn(B, 3, H, W), torch.randn(D, 3, k, k) * (2 / (3 * k * k)) ** 0.5, torch.randn(D)
    if dtype == torch.float32:
        (ref, out), (gref, gout) = run_both(x, w, b, s, p)
        assert rel(out, ref) < 1e-5 and all(rel(a, r) < 1e-5 for a, r in zip(gout, gref))
        return
    ref64 = reference(x.double(), w.double(), b.double(), s, p)
    ref16, out16 = reference(x.bfloat16(), w.bfloat16(), b.bfloat16(), s, p), fused(x.bfloat16(), w.bfloat16(), b.bfloat16(), s, p)
    assert out16.dtype == torch.bfloat16 and rel(out16, ref64) <= 2 * rel(ref16, ref64) + 1e-3


def test_cpu_micro_kernel_choice(monkeypatch):
    monkeypatch.delenv("EIT_FAST_CPU_ISA", raising=False)
    best = torch.ops.eit_fast.patch_projection_cpu_isa()
    assert best in ("avx512", "avx2", "generic")
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if " avx512f" in flags:
        assert best == "avx512"
    elif " avx2" in flags and " fma" in flags:
        assert best == "avx2"
    monkeypatch.setenv("EIT_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="must be avx512, avx2, generic or auto"):
        torch.ops.eit_fast.patch_projection_cpu_isa()


def copies_of(fn, shape):
    """aten copies (clone, copy_, contiguous) of a tensor of `shape` made while fn() runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events()
            if e.name in ("aten::clone", "aten::copy_", "aten::contiguous", "aten::_to_copy")
            and any(list(sh) == list(shape) for sh in e.input_shapes)]


def test_channels_last_input_is_read_as_it_is():
    x = torch.randn(2, 3, 48, 44).to(memory_format=torch.channels_last)
    w, b = torch.randn(20, 3, 16, 16) * 0.05, torch.randn(20)
    assert not x.is_contiguous()
    assert copies_of(lambda: fused(x, w, b, 4, 3), x.shape) == []
    (ref, out), (gref, gout) = run_both(x, w, b, 4, 3)
    assert rel(out, ref) < 1e-5 and all(rel(a, r) < 1e-5 for a, r in zip(gout, gref))
    assert gout[0].is_contiguous(memory_format=torch.channels_last)  # dx in the input's memory format


def test_random_sizes_beyond_the_named_ones():
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        k, s, p = [(3, 1, 4), (16, 4, 3), (7, 2, 2)][int(torch.randint(0, 3, (1,), generator=gen))]
        H, W = (int(v) for v in torch.randint(k + p * s, 80, (2,), generator=gen))
        D = int(torch.randint(1, 70, (1,), generator=gen))
        x, w, b = torch.randn(2, 3, H, W, dtype=torch.float64), torch.randn(D, 3, k, k, dtype=torch.float64), \
            torch.randn(D, dtype=torch.float64)
        (ref, out), (gref, gout) = run_both(x, w, b, s, p)
        assert rel(out, ref) < 1e-12 and all(rel(a, r) < 1e-12 for a, r in zip(gout, gref)), (H, W, D, k, s, p)


def test_non_contiguous_input():
    base = torch.randn(2, 40, 37, 6)[..., ::2].permute(0, 3, 1, 2)  # (2, 3, 40, 37), strided
    assert not base.is_contiguous()
    w, b = torch.randn(9, 3, 3, 3), torch.randn(9)
    (ref, out), (gref, gout) = run_both(base, w, b, 1, 4)
    assert rel(out, ref) < 1e-5 and all(rel(a, r) < 1e-5 for a, r in zip(gout, gref))
    cl = torch.randn(2, 3, 33, 33).to(memory_format=torch.channels_last)
    (ref, out), _ = run_both(cl, w, b, 1, 4)
    assert rel(out, ref) < 1e-5


# (channels, kernel, stride, pool, dtype): the gather schedule (fp64) and the direct one (fp32, C * stride^2 = 8)
TIE_CASES = [(3, 3, 1, 4, torch.float64), (2, 4, 2, 3, torch.float32)]


@pytest.mark.parametrize("C, k, s, p, dtype", TIE_CASES, ids=["gather", "direct"])
def test_ties_go_to_the_first_maximum_in_window_order(C, k, s, p, dtype, cpu_isa):
    # Small integers: every conv value is exact, so equal windows tie exactly in both implementations and
    # the gradients show which window position won.
    x = torch.randint(0, 2, (2, C, 1, 1)).to(dtype).expand(2, C, 21, 19).contiguous()  # constant images
    x[:, :, ::5] = 0  # some structure; most windows still hold equal values
    w = torch.randint(-2, 3, (6, C, k, k)).to(dtype)
    b = torch.randint(-2, 3, (6,)).to(dtype)
    (ref, out), (gref, gout) = run_both(x, w, b, s, p)
    _, argmax = torch.ops.eit_fast.patch_projection(x, w, b, s, k // 2, p)
    conv = F.conv2d(x, w, b, s, k // 2)
    Hp, Wp = conv.shape[2] // p, conv.shape[3] // p
    conv = conv[:, :, :Hp * p, :Wp * p].unfold(2, p, p).unfold(3, p, p).flatten(-2)
    ties = (conv == conv.max(-1, keepdim=True).values).sum(-1) > 1
    assert ties.float().mean() > 0.5  # the case really is about ties
    assert torch.equal(out, ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(gout, gref):  # a gradient routed to another window would be off by O(1)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    first = (conv == conv.max(-1, keepdim=True).values).int().argmax(-1)  # first maximum, row-major
    assert torch.equal(argmax.long(), first.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("k, s, p", [(3, 1, 4), (16, 4, 3)], ids=["gather", "direct"])
def test_nan_propagates_like_max_pool(k, s, p, cpu_isa):
    x, w, b = torch.randn(2, 3, 24 * s, 24 * s), torch.randn(5, 3, k, k) * 0.1, torch.randn(5)
    x[0, 1, 5 * s, 7 * s] = float("nan")
    x[1, 0, 20 * s, 3 * s] = float("nan")
    (ref, out), (gref, gout) = run_both(x, w, b, s, p)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    for got, want in zip(gout, gref):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_non_finite_values_give_the_reference_nan_pattern_in_gradients():
    # The reference multiplies zero gradients by the input too: 0 * inf = NaN reaches every dW entry that
    # reads an inf pixel. (Non-finite weights are left out: there even PyTorch's conv kernels disagree on
    # whether zero padding times inf is NaN.)
    x, w, b = torch.randn(2, 3, 26, 23, dtype=torch.float64), torch.randn(5, 3, 3, 3, dtype=torch.float64), \
        torch.randn(5, dtype=torch.float64)
    x[1, 2, 25, 22] = float("inf")  # in the corner the pool windows cut off
    x[0, 0, 3, 4] = float("-inf")
    (ref, out), (gref, gout) = run_both(x, w, b, 1, 4)
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert torch.isnan(gref[1][:, 2, 2, 2]).all()  # read only at a conv position the pool cuts off
    for got, want in zip(gout, gref):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_non_finite_weights_give_the_fp64_reference_pattern():
    # The direct schedule skips cell rows that lie wholly in the zero padding; with an inf weight 0 * inf is NaN
    # there, so it must not skip. PyTorch's own fp64 conv multiplies the padding (oneDNN's fp32 conv does not).
    x, w, b = torch.randn(1, 3, 40, 44), torch.randn(8, 3, 16, 16) * 0.05, torch.randn(8)
    w[2, 1, 0, 0] = float("inf")
    ref = reference(x.double(), w.double(), b.double(), 4, 3)
    out = fused(x, w, b, 4, 3)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(torch.isinf(out), torch.isinf(ref))


# (B, C, H, W, D, k, stride, padding, pool) for the direct schedule beyond the model's stems: padding that is not
# a multiple of the stride or is zero, two and one kernel cell rows, 2 and 8 channels, pool cut-offs.
DIRECT_CASES = [
    (1, 2, 23, 19, 13, 4, 2, 1, 2), (2, 3, 50, 37, 40, 8, 4, 3, 3), (1, 3, 44, 45, 70, 16, 4, 0, 2),
    (1, 8, 15, 17, 9, 1, 1, 0, 3), (2, 3, 29, 33, 17, 16, 4, 5, 1),
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: "B{}_C{}_{}x{}_D{}_k{}s{}pad{}p{}".format(*c))
def test_direct_schedule_matches(case, cpu_isa):
    B, C, H, W, D, k, s, pad, p = case
    x, w, b = torch.randn(B, C, H, W), torch.randn(D, C, k, k) * (2 / (C * k * k)) ** 0.5, torch.randn(D)
    expected = "gather" if cpu_isa == "generic" else "direct"
    assert torch.ops.eit_fast.patch_projection_cpu_schedule(C, k, s, torch.float32) == expected
    ref = F.max_pool2d(F.conv2d(x, w, b, s, pad), p, p).flatten(2).transpose(1, 2)
    for xin in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out, _ = torch.ops.eit_fast.patch_projection(xin, w, b, s, pad, p)
        assert out.shape == ref.shape and rel(out, ref) < 1e-5


def test_cpu_schedule_choice(cpu_isa):
    schedule = torch.ops.eit_fast.patch_projection_cpu_schedule
    vector = "gather" if cpu_isa == "generic" else "direct"
    assert schedule(3, 16, 4, torch.float32) == schedule(3, 16, 4, torch.bfloat16) == vector  # the 224 px stem
    assert schedule(3, 16, 4, torch.float64) == "gather"  # no fp64 vector kernel
    assert schedule(3, 3, 1, torch.float32) == "gather"  # the 32 px stem: 3 values per cell
    assert schedule(3, 6, 4, torch.float32) == "gather"  # k not a multiple of the stride
    with pytest.raises(RuntimeError, match="need channels, kernel and stride >= 1"):
        schedule(3, 16, 0, torch.float32)


def test_a_large_batch_is_cut_into_groups_of_images():
    # 224 px cells take about 690 KB an image, so 98 images make two groups within the 64 MB bound.
    x, w, b = torch.randn(98, 3, 224, 224), torch.randn(4, 3, 16, 16) * 0.05, torch.randn(4)
    out = fused(x, w, b, 4, 3)
    assert rel(out, reference(x, w, b, 4, 3)) < 1e-5


def test_cpu_ops_run_on_every_thread():
    # at::parallel_for runs serially in a library built without OpenMP, with nothing to show for it but time.
    if (__import__("os").cpu_count() or 1) < 2:
        pytest.skip("one CPU")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.eit_fast.cpu_parallel_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bfloat16_no_worse_than_pytorch_in_bfloat16():
    x, w, b = torch.randn(2, 3, 48, 40), torch.randn(24, 3, 16, 16) * 0.05, torch.randn(24)
    (ref64, _), (gref64, _) = run_both(x.double(), w.double(), b.double(), 4, 3)
    torch.manual_seed(1)
    (ref16, out16), (g16, gout16) = run_both(x.bfloat16(), w.bfloat16(), b.bfloat16(), 4, 3)
    assert out16.dtype == torch.bfloat16
    assert rel(out16, ref64) <= 2 * rel(ref16, ref64) + 1e-3
    # Gradients routed through an argmax can pick another window on near-ties in bf16; compare weight/bias.
    for i in (1, 2):
        assert rel(gout16[i], gref64[i]) <= 2 * rel(g16[i], gref64[i]) + 1e-2


def test_only_the_needed_gradients_are_computed():
    x, w, b = torch.randn(1, 3, 20, 20), torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    fused(x, w, b, 1, 4).sum().backward()
    assert x.grad is None and w.grad is not None and b.grad is not None


def test_gradcheck_fp64():
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: op.patch_projection(*a, 1, 1, 2), (x, w, b))
    x2 = torch.randn(1, 3, 21, 18, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: op.patch_projection(*a, 2, 4, 3), (x2, w2, b[:3].detach().requires_grad_()))


def test_opcheck():
    for args in [(torch.randn(2, 3, 13, 12), torch.randn(7, 3, 3, 3), torch.randn(7), 1, 1, 4),
                 (torch.randn(1, 3, 30, 26, requires_grad=True), torch.randn(5, 3, 16, 16, requires_grad=True),
                  torch.randn(5, requires_grad=True), 4, 8, 3)]:
        torch.library.opcheck(torch.ops.eit_fast.patch_projection.default, args)


def test_cuda_path_traces_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    with FakeTensorMode():
        x = torch.empty(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(250, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(250, device="cuda", dtype=torch.bfloat16)
        out = torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3)
        g = make_fx(lambda *a: torch.ops.eit_fast.patch_projection(*a, 4, 8, 3)[0])(x, w, b)
    assert out[0].shape == (4, 361, 250) and out[1].dtype == torch.uint8 and out[0].device.type == "cuda"
    assert "eit_fast.patch_projection" in str(g.graph)


@pytest.mark.slow
def test_torch_compile_fullgraph_on_cpu():
    ref = eit_fast.create_model("eit_cifar").patch_embed
    stem = FusedPatchEmbed.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 3, 32, 32)
    out = torch.compile(stem, fullgraph=True)(x)
    out.sum().backward()
    want = ref(x)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stem.eit_p.conv.weight.grad, ref.eit_p.conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_both_cpu_and_cuda_kernels_are_registered():
    assert op.has_kernel("cpu")
    if not eit_fast._C.with_cuda:
        pytest.fail(f"this install was built without the CUDA kernels: {eit_fast._C.build_note}")
    assert op.has_kernel("cuda")
    for name in ("patch_projection", "patch_projection_backward_weight", "patch_projection_backward_input"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eit_fast::{name}", key), (name, key)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(3, 32, 32), torch.randn(4, 3, 3, 3), torch.randn(4), 1, 1, 4), "4-D image batch"),
    ((torch.randn(1, 4, 32, 32), torch.randn(4, 3, 3, 3), torch.randn(4), 1, 1, 4), "expects 3 input channels"),
    ((torch.randn(1, 3, 32, 32), torch.randn(4, 3, 3, 2), torch.randn(4), 1, 1, 4), "square kernel"),
    ((torch.randn(1, 3, 32, 32), torch.randn(4, 3, 3, 3), torch.randn(5), 1, 1, 4), "bias must be"),
    ((torch.randn(1, 3, 32, 32), torch.randn(4, 3, 3, 3).double(), torch.randn(4), 1, 1, 4), "share a dtype"),
    ((torch.randn(1, 3, 32, 32), torch.randn(4, 3, 3, 3), torch.randn(4), 1, 1, 17), "at most 16"),
    ((torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4), 1, 1, 7), "smaller than the 7x7 pool"),
    ((torch.randn(1, 3, 4, 4), torch.randn(4, 3, 16, 16), torch.randn(4), 4, 2, 1), "smaller than the 16x16 kernel"),
    ((torch.randn(1, 3, 32, 32), torch.randn(4, 3, 3, 3), torch.randn(4), 0, 1, 4), "stride >= 1"),
    ((torch.randn(1, 3, 32, 32).half(), torch.randn(4, 3, 3, 3).half(), torch.randn(4).half(), 1, 1, 4),
     "CPU kernel takes torch.float32, torch.bfloat16, torch.float64, not torch.float16"),
])
def test_bad_input_is_refused_clearly(args, message):
    with pytest.raises(RuntimeError, match=message):
        op.patch_projection(*args)


# --- the drop-in module -----------------------------------------------------------------------------------

def test_create_model_fused_uses_the_fused_stem_with_the_same_parameters():
    ref = eit_fast.create_model("eit_cifar", impl="reference").eval()
    model = eit_fast.create_model("eit_cifar", impl="auto").eval()
    assert isinstance(model.patch_embed, FusedPatchEmbed) and not isinstance(ref.patch_embed, FusedPatchEmbed)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fused_patch.swap(model, auto=True) == 0  # already fused (the measured variant)
    assert fused_patch.swap(model) == 1 and type(model.patch_embed) is FusedPatchEmbed
    assert fused_patch.unswap(model) == 1 and type(model.patch_embed).__name__ == "EITPatchEmbed"
    assert list(model.state_dict()) == list(ref.state_dict())


def test_patch_swaps_in_place_and_trains_like_the_reference():
    ref = eit_fast.create_model("eit_cifar", impl="reference", drop_rate=0.0, attn_drop_rate=0.0,
                                drop_path_rate=0.0)
    model = copy.deepcopy(ref)
    eit_fast.patch(model)
    assert isinstance(model.patch_embed, FusedPatchEmbed)
    x, y = torch.randn(8, 3, ref.cfg.img_size, ref.cfg.img_size), torch.randint(0, ref.cfg.num_classes, (8,))
    losses = []
    for m in (ref, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        run = []
        for _ in range(3):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    torch.testing.assert_close(model.patch_embed.eit_p.conv.weight, ref.patch_embed.eit_p.conv.weight,
                               rtol=1e-4, atol=1e-6)


def test_module_takes_any_image_size_including_non_square():
    ref = eit_fast.create_model("eit_mini", impl="reference").patch_embed
    stem = FusedPatchEmbed.from_reference(ref)
    assert stem.eit_p is ref.eit_p
    for H, W in [(224, 224), (97, 150), (61, 33)]:
        x = torch.randn(1, 3, H, W)
        out = stem(x)
        assert out.shape[1] == stem.grid(H, W)[0] * stem.grid(H, W)[1]
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)


def test_autocast_and_fallback():
    ref = eit_fast.create_model("eit_cifar", impl="reference").patch_embed
    stem = FusedPatchEmbed.from_reference(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = stem(x), ref(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_patch._warned.clear()
        half = FusedPatchEmbed.from_reference(eit_fast.create_model("eit_cifar").patch_embed.half())
        half(x.half())
    assert any("not torch.float16; running the reference conv + max-pool instead" in str(w.message) for w in caught)


def test_provider_refuses_the_vit_stem_with_a_reason():
    vit = eit_fast.create_model("vit_cifar", impl="reference")
    v = fused_patch.applies_to(vit)
    assert not v.applies and not v.unsupported and "not EIT's conv + max-pool" in v.reason
    eit = eit_fast.create_model("eit_cifar", impl="reference")
    assert fused_patch.applies_to(eit).applies
    eit.patch_embed.eit_p.pool.ceil_mode = True
    v = fused_patch.applies_to(eit)
    assert not v.applies and v.unsupported and "ceil_mode" in v.reason
    with pytest.raises(ValueError, match="cannot fuse this stem"):
        FusedPatchEmbed.from_reference(eit.patch_embed)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 32, 32, 250, 3, 1, 4), (2, 224, 224, 250, 16, 4, 3), (1, 61, 47, 33, 16, 4, 3)])
def test_cuda_matches_the_reference(case, dtype):
    B, H, W, D, k, s, p = case
    x = torch.randn(B, 3, H, W, device="cuda")
    w, b = torch.randn(D, 3, k, k, device="cuda") * (2 / (3 * k * k)) ** 0.5, torch.randn(D, device="cuda")
    (ref64, _), (gref64, _) = run_both(x.double(), w.double(), b.double(), s, p)
    (refl, outl), (gl, goutl) = run_both(x.to(dtype), w.to(dtype), b.to(dtype), s, p)
    assert outl.dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel(outl, ref64) <= 2 * rel(refl, ref64) + floor
    for i in (1, 2) if dtype != torch.float32 else (0, 1, 2):
        assert rel(goutl[i], gref64[i]) <= 2 * rel(gl[i], gref64[i]) + floor * 10
