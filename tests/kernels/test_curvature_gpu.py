"""Curvature policies on the compiled kernels: float32 (tf32x3 dots) against the float64
closed form, one-query and tiled kernels, causal and not (CUDA only)."""

import pytest
import torch

from kernels import CURVATURES, attention
from kernels.reference import attention_double_backward_formula

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("n,m,causal", [(1, 32, False), (1, 300, False), (64, 200, True)])
def test_compiled_policies_match_the_float64_closed_form(curvature, n, m, causal):
    g = torch.Generator("cuda").manual_seed(0)
    shapes = [(4, n, 64), (4, m, 64), (4, m, 64), (4, n, 64), (4, n, 64), (4, m, 64), (4, m, 64)]
    q, k, v, do, uq, uk, uv = (torch.randn(s, generator=g, device="cuda") for s in shapes)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, do)]
    o = attention(*leaves[:3], backend="triton_fused", causal=causal, curvature=curvature)
    first = torch.autograd.grad(o, leaves[:3], leaves[3], create_graph=True)
    got = torch.autograd.grad(first, leaves, (uq, uk, uv), allow_unused=True)
    want = attention_double_backward_formula(
        *(t.double() for t in (q, k, v, do, uq, uk, uv)), causal, None, curvature
    )
    for a, b in zip(got, want, strict=True):
        a = torch.zeros_like(b) if a is None else a.double()
        if not b.abs().max() > 0:  # a part the policy drops: exactly zero
            assert not a.abs().max() > 0
            continue
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
