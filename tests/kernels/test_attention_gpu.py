"""Compiled Triton kernels on a CUDA device (skipped without one).

float32 (tf32x3 dots by default, ieee on request) must match a float64 reference to 1e-5;
bf16/fp16 to 1e-2. Shapes run from tiny to T = 8192.
"""

import pytest
import torch

from kernels import fused_attention
from kernels.reference import attention_reference

pytestmark = pytest.mark.gpu

SHAPES = [  # (B, H, N, M, D, Dv, causal); N = 1 runs the one-query kernels
    (2, 3, 1, 32, 64, 64, False),
    (1, 2, 1, 7, 16, 16, False),
    (4, 2, 1, 128, 64, 48, False),
    (2, 2, 1, 1000, 64, 64, True),
    (2, 2, 77, 45, 32, 32, True),
    (1, 4, 200, 333, 64, 48, False),
    (2, 2, 128, 128, 128, 128, True),
    (1, 2, 1000, 1000, 64, 64, True),
    (1, 1, 2048, 2048, 128, 128, False),
    (1, 1, 8192, 8192, 64, 64, True),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(a, b):
    """Relative error, absolute where the reference is (near) zero (N = 1 causal: dq = 0)."""
    return ((a.double() - b).norm() / b.norm().clamp_min(1.0)).item()


def first_and_second_order(fn, q, k, v, do, us):
    out = fn(q, k, v)
    g = torch.autograd.grad(out, (q, k, v), do, create_graph=True)
    h = torch.autograd.grad(g, (q, k, v), us)
    return (out, *g, *h)


PRECISIONS = [  # (dtype, float32_precision); ieee only where there are dots (N > 1)
    pytest.param(torch.float32, "tf32x3", id="fp32"),
    pytest.param(torch.float32, "ieee", id="fp32-ieee"),
    pytest.param(torch.bfloat16, "tf32x3", id="bf16"),
    pytest.param(torch.float16, "tf32x3", id="fp16"),
]


@pytest.mark.parametrize("dtype,precision", PRECISIONS)
@pytest.mark.parametrize("b,h,n,m,d,dv,causal", SHAPES)
def test_fused_matches_float64_reference(b, h, n, m, d, dv, causal, dtype, precision):
    if precision == "ieee" and n == 1:
        pytest.skip("the one-query kernels have no dots")
    gen = torch.Generator("cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    shapes = [(b, h, n, d), (b, h, m, d), (b, h, m, dv)]
    q, k, v = (torch.randn(s, device="cuda", generator=gen) for s in shapes)
    do = torch.randn(b, h, n, dv, device="cuda", generator=gen)
    us = [torch.randn(s, device="cuda", generator=gen) for s in shapes]

    def leaves(dt):
        return [t.to(dt).requires_grad_() for t in (q, k, v)]

    got = first_and_second_order(
        lambda *a: fused_attention(*a, causal, float32_precision=precision),
        *leaves(dtype),
        do.to(dtype),
        [u.to(dtype) for u in us],
    )
    want = first_and_second_order(
        lambda *a: attention_reference(*a, causal),
        *leaves(torch.float64),
        do.double(),
        [u.double() for u in us],
    )
    names = ["o", "dq", "dk", "dv", "gq", "gk", "gv"]
    errors = {nm: rel_err(x, y) for nm, x, y in zip(names, got, want, strict=True)}
    assert all(x.dtype == dtype for x in got)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,n,m,d,dv,causal", [s for s in SHAPES if s[2] == 1 and s[5] == s[4]])
def test_one_query_kernels_read_the_halves_of_one_kv_projection(b, h, n, m, d, dv, causal, dtype):
    """K and V as the two halves of one (..., M, 2D) tensor (the model's fused K|V
    projection), read in place by the one-query kernels: three orders against float64."""
    gen = torch.Generator("cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    q = torch.randn(b, h, n, d, device="cuda", generator=gen)
    kv = torch.randn(b, h, m, 2 * d, device="cuda", generator=gen)
    do = torch.randn(b, h, n, d, device="cuda", generator=gen)
    us = [torch.randn(b, h, r, d, device="cuda", generator=gen) for r in (n, m, m)]

    def fn(dt, attend):
        q_, kv_ = (t.to(dt).requires_grad_() for t in (q, kv))
        out = attend(q_, *kv_.chunk(2, dim=-1))
        g = torch.autograd.grad(out, (q_, kv_), do.to(dt), create_graph=True)
        g_qkv = (g[0], *g[1].chunk(2, dim=-1))
        h = torch.autograd.grad(g_qkv, (q_, kv_), [u.to(dt) for u in us])
        return out, *g, *h

    got = fn(dtype, lambda *a: fused_attention(*a, causal))
    want = fn(torch.float64, lambda *a: attention_reference(*a, causal))
    errors = {
        nm: rel_err(x, y) for nm, x, y in zip("o dq dkv gq gkv".split(), got, want, strict=True)
    }
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("n", [1, 40], ids=["one-query", "tiled"])
def test_float64_uses_the_exact_scale(n):
    """Triton passes Python floats as float32; at D = 8 the scale 8 ** -0.5 is not a
    float32, so float64 matches its reference to 1e-12 only with the scale the launchers
    split in two (kernels.launch._scale_parts)."""
    gen = torch.Generator("cuda").manual_seed(torch.randint(0, 2**31, ()).item())
    shapes = [(2, 3, n, 8), (2, 3, 50, 8), (2, 3, 50, 8)]
    q, k, v = (
        torch.randn(s, device="cuda", dtype=torch.float64, generator=gen).requires_grad_()
        for s in shapes
    )
    do = torch.randn(2, 3, n, 8, device="cuda", dtype=torch.float64, generator=gen)
    us = [torch.randn(s, device="cuda", dtype=torch.float64, generator=gen) for s in shapes]
    got = first_and_second_order(lambda *a: fused_attention(*a, True), q, k, v, do, us)
    want = first_and_second_order(lambda *a: attention_reference(*a, True), q, k, v, do, us)
    errors = [rel_err(x, y) for x, y in zip(got, want, strict=True)]
    assert max(errors) < 1e-12, errors


@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
def test_engine_full_meta_gradient_on_cuda(backend):
    from phase12.config import RunConfig
    from phase12.maml import meta_gradient, relative_difference
    from phase12.model import init_params
    from phase12.tasks import sample_tasks

    cfg = RunConfig(device="cuda")
    params = init_params(64, 5, torch.Generator().manual_seed(1), device="cuda")
    tasks = sample_tasks(cfg, torch.Generator("cuda").manual_seed(1), torch.device("cuda"))
    kw = dict(mode="FULL", steps=20, lr=0.4)
    ref = meta_gradient(params, tasks, backend="reference", **kw)
    fused = meta_gradient(params, tasks, backend=backend, **kw)
    p64 = {n: p.double() for n, p in params.items()}
    t64 = type(tasks)(*(t.double() if t.is_floating_point() else t for t in tasks))
    exact = meta_gradient(p64, t64, backend="reference", **kw)
    err_fused = relative_difference(exact, {n: g.double() for n, g in fused.items()}).item()
    err_ref = relative_difference(exact, {n: g.double() for n, g in ref.items()}).item()
    assert relative_difference(ref, fused).item() < 1e-4, (err_fused, err_ref)
    assert err_fused < 1e-4
