"""Curvature policies of the attention op, in float64 on fresh random inputs: the closed
form against independent definitions, the Triton kernels (CPU interpreter) and the
reference backend against the closed form, and the split identity."""

import pytest
import torch

from kernels import CURVATURES, attention
from kernels.reference import (
    attention_backward_reference,
    attention_double_backward_formula,
    attention_double_backward_reference,
)

F64 = torch.float64
POLICIES = [c for c in CURVATURES if c != "exact"]


def inputs(n, m, d=8, dv=8):
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    shapes = [(2, n, d), (2, m, d), (2, m, dv), (2, n, dv), (2, n, d), (2, m, d), (2, m, dv)]
    return [torch.randn(s, generator=g, dtype=F64) for s in shapes]


def close(a, b, tol=1e-11):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def frozen_backward(q, k, v, do, causal, scale):
    """The first-order backward written with the log-sum-exp detached."""
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.exp(s - torch.logsumexp(s, -1, keepdim=True).detach())
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return scale * ds @ k, scale * ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do


@pytest.mark.parametrize("causal", [False, True])
def test_closed_form_equals_each_policys_definition(causal):
    q, k, v, do, uq, uk, uv = inputs(5, 7)
    args = (q, k, v, do, uq, uk, uv, causal, 0.4)
    exact = attention_double_backward_reference(*args)
    close(attention_double_backward_formula(*args), exact)
    zero = [torch.zeros_like(t) for t in (q, k, v)]
    # none: no derivative in q, k, v; in do, the Jacobian of the backward applied to u.
    _, pullback = torch.func.vjp(
        lambda d: attention_backward_reference(q, k, v, d, causal, 0.4), do
    )
    close(attention_double_backward_formula(*args, "none"), (*zero, pullback((uq, uk, uv))[0]))
    # score: the (q, k) x (q, k) blocks; value: the (q, k) x v blocks and v x (q, k).
    from_qk = attention_double_backward_reference(q, k, v, do, uq, uk, zero[2], causal, 0.4)
    from_v = attention_double_backward_reference(q, k, v, do, zero[0], zero[1], uv, causal, 0.4)
    close(attention_double_backward_formula(*args, "score"), (*from_qk[:2], zero[2], exact[3]))
    close(attention_double_backward_formula(*args, "value"), (*from_v[:2], exact[2], exact[3]))
    # frozen softmax statistics: the backward differentiated with the log-sum-exp constant.
    _, pullback = torch.func.vjp(lambda *a: frozen_backward(*a, causal, 0.4), q, k, v, do)
    close(attention_double_backward_formula(*args, "frozen_softmax_stats"), pullback((uq, uk, uv)))
    close(attention_double_backward_formula(*args, "once_differentiable"), (*zero, 0 * do))


def second_order(backend, curvature, q, k, v, do, u, causal):
    """(gq, gk, gv, gdo) of <u, grad of <do, attention>>, through autograd."""
    q, k, v, do = (t.clone().requires_grad_() for t in (q, k, v, do))
    o = attention(q, k, v, backend=backend, causal=causal, curvature=curvature)
    first = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    if not any(f.requires_grad for f in first):
        return [torch.zeros_like(t) for t in (q, k, v, do)]
    got = torch.autograd.grad(first, (q, k, v, do), u, allow_unused=True)
    return [
        torch.zeros_like(t) if g is None else g for g, t in zip(got, (q, k, v, do), strict=True)
    ]


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("backend", ["triton_fused", "reference"])
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("n,causal", [(1, False), (6, True), (19, False)])  # 1: one-query kernels
def test_every_backend_applies_the_policy_exactly(backend, curvature, n, causal):
    q, k, v, do, uq, uk, uv = inputs(n, 21)
    got = second_order(backend, curvature, q, k, v, do, (uq, uk, uv), causal)
    want = attention_double_backward_formula(q, k, v, do, uq, uk, uv, causal, None, curvature)
    close(got, want)
    # The first derivative is never touched by a policy.
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    o = attention(q_, k_, v_, backend=backend, causal=causal, curvature=curvature)
    first = torch.autograd.grad(o, (q_, k_, v_), do)
    close(first, attention_backward_reference(q, k, v, do, causal))


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("atomic_rows", [False, True], ids=["row_pass", "atomic_rows"])
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("causal", [False, True])
def test_both_tiled_structures_apply_the_policy_exactly(
    curvature, atomic_rows, causal, monkeypatch
):
    """The row-side gradients by a row pass or by atomics (kernels.launch.LaunchConfig)."""
    from kernels import launch

    tile = launch.LaunchConfig(16, 16, 1, 1, atomic_rows=atomic_rows)
    monkeypatch.setattr(launch, "launch_config", lambda *_: tile)
    q, k, v, do, uq, uk, uv = inputs(19, 21)
    got = second_order("triton_fused", curvature, q, k, v, do, (uq, uk, uv), causal)
    want = attention_double_backward_formula(q, k, v, do, uq, uk, uv, causal, None, curvature)
    close(got, want)


def third_order(backward, q, k, v, do, u, w):
    """<w, grad of <u, backward(q, k, v, do)>> in (q, k, v, do): the third derivative."""
    q, k, v, do = (t.clone().requires_grad_() for t in (q, k, v, do))
    second = torch.autograd.grad(backward(q, k, v, do), (q, k, v, do), u, create_graph=True)
    return torch.autograd.grad(second, (q, k, v, do), w)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("backend", ["triton_fused", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_frozen_statistics_stay_frozen_at_third_order(backend, causal):
    q, k, v, do, uq, uk, uv = inputs(6, 6)
    w = [torch.randn_like(t) for t in (q, k, v, do)]
    scale = 8**-0.5

    def through_the_op(q, k, v, do):
        o = attention(q, k, v, backend=backend, causal=causal, curvature="frozen_softmax_stats")
        return torch.autograd.grad(o, (q, k, v), do, create_graph=True)

    got = third_order(through_the_op, q, k, v, do, (uq, uk, uv), w)
    want = third_order(lambda *a: frozen_backward(*a, causal, scale), q, k, v, do, (uq, uk, uv), w)
    close(got, want)


@pytest.mark.usefixtures("interpreter")
def test_score_and_value_parts_add_up_to_attentions_own_term():
    q, k, v, do, uq, uk, uv = inputs(1, 13)
    run = {c: second_order("triton_fused", c, q, k, v, do, (uq, uk, uv), False) for c in CURVATURES}
    for i in range(4):
        whole = run["exact"][i] - run["none"][i]
        parts = (run["score"][i] - run["none"][i]) + (run["value"][i] - run["none"][i])
        torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    assert run["exact"][0].abs().max() > 0 and (run["exact"][0] - run["none"][0]).abs().max() > 0


@pytest.mark.usefixtures("interpreter")
def test_the_policy_reaches_the_kernel_under_vmap_and_grad_of_grad(monkeypatch):
    from torch.func import grad, vmap

    from kernels import launch

    seen = []
    original = launch.attention_double_backward

    def recorded(*a, **kw):
        seen.append(kw["curvature"])
        return original(*a, **kw)

    monkeypatch.setattr(launch, "attention_double_backward", recorded)
    q, k, v = (torch.randn(3, 2, s, 8, dtype=F64) for s in (1, 9, 9))

    def inner(q, k, v):
        out = attention(q, k, v, backend="triton_fused", curvature="frozen_softmax_stats")
        return out.square().sum()

    vmap(grad(lambda q, k, v: grad(inner, argnums=(0, 1, 2))(q, k, v)[0].sum()))(q, k, v)
    assert seen == ["frozen_softmax_stats"]


def test_an_unknown_policy_is_refused():
    q, k, v = (torch.randn(1, 2, 8, dtype=F64) for _ in range(3))
    with pytest.raises(ValueError, match="curvature must be one of"):
        attention(q, k, v, backend="reference", curvature="half")


def test_what_a_policy_does_not_define_is_refused():
    from torch.func import grad, jvp

    from kernels import launch

    q, k, v = (torch.randn(1, 2, 8, dtype=F64) for _ in range(3))

    def first(q):
        return grad(lambda q: attention(q, k, v, backend="reference", curvature="none").sum())(q)

    with pytest.raises(NotImplementedError, match="forward-mode AD .* curvature 'none'"):
        jvp(first, (q,), (torch.ones_like(q),))
    with pytest.raises(ValueError, match="the double backward takes"):
        launch.attention_double_backward(q, k, v, q, q[..., 0], q, q, k, v, False, 1.0, "ieee",
                                         curvature="once_differentiable")  # fmt: skip
