"""Attention in plain PyTorch ops: the ground truth, differentiable to any order.

These functions are the independent reference every fused path is tested against,
and the fused op falls back to them (exactly, through autograd) for derivatives of
order three and above and for forward-mode AD. They materialise the N x M score
matrix, so their memory is quadratic in the sequence length.

Shapes follow the fused op: q (..., N, D), k (..., M, D), v (..., M, Dv).
Low-precision inputs (fp16, bf16) are computed in float32 and cast back, like the
fused kernels, which accumulate in float32.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention_reference",
    "attention_backward_reference",
    "attention_double_backward_reference",
    "attention_logsumexp_reference",
    "default_scale",
]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    s = scale * (q @ k.transpose(-1, -2))
    if causal:
        # Top-left aligned, as torch.nn.functional.scaled_dot_product_attention:
        # query i sees keys j <= i.
        n, m = s.shape[-2], s.shape[-1]
        keep = torch.ones(n, m, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v, in PyTorch ops. Returns (..., N, Dv)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    cd = _compute_dtype(dtype)
    if cd != dtype:
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
    out = torch.softmax(_scores(q, k, causal, scale), dim=-1) @ v
    return out if cd == dtype else out.to(dtype)


def attention_logsumexp_reference(
    q: torch.Tensor, k: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Per-row log-sum-exp of the scaled scores, (..., N), in the compute dtype."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    cd = _compute_dtype(q.dtype)
    return torch.logsumexp(_scores(q.to(cd), k.to(cd), causal, scale), dim=-1)


def attention_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) = the VJP of `attention_reference` at cotangent `do`.

    Built with `torch.func.vjp`, so it is itself differentiable (any order) and
    composes with every torch.func transform.
    """
    _, pullback = torch.func.vjp(
        lambda q_, k_, v_: attention_reference(q_, k_, v_, causal, scale), q, k, v
    )
    return pullback(do)


def attention_double_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    uq: torch.Tensor,
    uk: torch.Tensor,
    uv: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gq, gk, gv, gdo): the VJP of `attention_backward_reference` at (uq, uk, uv).

    That is, the gradients of <uq, dq> + <uk, dk> + <uv, dv> with respect to
    q, k, v and do. Differentiable to any order.
    """
    _, pullback = torch.func.vjp(
        lambda q_, k_, v_, do_: attention_backward_reference(q_, k_, v_, do_, causal, scale),
        q,
        k,
        v,
        do,
    )
    return pullback((uq, uk, uv))


CURVATURES = (
    "exact",
    "none",
    "score",
    "value",
    "frozen_softmax_stats",
    "once_differentiable",
)
"""What attention's own second derivative contributes when its backward is differentiated
(docs/attention-double-backward.md, "Curvature policies"). For the gradient of
<uq, dq> + <uk, dk> + <uv, dv> (the double backward):

* exact                 all of it;
* none                  gq = gk = gv = 0: the backward is linear in dO with attention's
                        Jacobian a constant (gdO, its derivative in dO, is kept);
* score                 only the score path: the Hessian blocks in (q, k) x (q, k);
* value                 only the value path: the blocks (q, k) x v and v x (q, k)
                        (v x v is zero); score + value = exact - none, exactly;
* frozen_softmax_stats  exact, with the log-sum-exp (row max and normaliser) a constant;
* once_differentiable   no derivative of the backward at all (gdO too is zero).
"""


def curvature_switches(curvature: str) -> dict[str, bool]:
    """Which parts of the double backward a policy keeps (the kernels' constexprs):
    SCORE and VALUE paths, FROZEN_STATS (no derivative of the log-sum-exp). ValueError
    for "once_differentiable" (no double backward at all) and unknown names."""
    if curvature not in CURVATURES or curvature == "once_differentiable":
        raise ValueError(f"the double backward takes {CURVATURES[:-1]}; got {curvature!r}")
    return dict(
        SCORE=curvature in ("exact", "score", "frozen_softmax_stats"),
        VALUE=curvature in ("exact", "value", "frozen_softmax_stats"),
        FROZEN_STATS=curvature == "frozen_softmax_stats",
    )


def attention_with_softmax_formula(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, P): the output and the softmax P (..., N, M) in the compute dtype, the
    statistics the reference ops save for the backward in place of the log-sum-exp."""
    dtype, cd = q.dtype, _compute_dtype(q.dtype)
    p = torch.softmax(_scores(q.to(cd), k.to(cd), causal, scale), dim=-1)
    return (p @ v.to(cd)).to(dtype), p


def _softmax_vjp(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P * (g - rowsum(P * g)): the VJP at g of the softmax whose output is P. One kernel,
    the one autograd runs for softmax; differentiable in g and P."""
    return torch._softmax_backward_data(g, p, -1, p.dtype)


def _matmul_add(c, a, b, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """beta * c + alpha * (a @ b) in one kernel: baddbmm over the flattened leading dims,
    which c (..., N, M), a (..., N, K) and b (..., K, M) share."""
    flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
    return torch.baddbmm(flat(c), flat(a), flat(b), alpha=alpha, beta=beta).view(c.shape)


def attention_backward_formula(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor,
    do: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's softmax P (a constant), in PyTorch ops:
    dS = P (dP - rowsum(P dP)) with dP = dO V^T."""
    dtype, cd = q.dtype, _compute_dtype(q.dtype)
    q, k, v, do = (t.to(cd) for t in (q, k, v, do))
    ds = scale * _softmax_vjp(do @ v.transpose(-1, -2), p)
    dq, dk, dv = ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def attention_double_backward_formula(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    uq: torch.Tensor,
    uk: torch.Tensor,
    uv: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    curvature: str = "exact",
    lse: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gq, gk, gv, gdo) under a curvature policy (CURVATURES), from the closed form of
    the fused kernels (docs/attention-double-backward.md) written with full N x M
    matrices in PyTorch ops.

    Differentiable in every tensor argument, with P = softmax(S) recomputed from q, k,
    or P = exp(S - lse) when `lse` (a constant: the frozen statistics) is given. `p`, the
    forward's softmax, saves recomputing it where the result is not differentiated
    again (P is then a constant).

    With curvature "exact" it equals `attention_double_backward_reference`.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    dtype, cd = q.dtype, _compute_dtype(q.dtype)
    if curvature == "once_differentiable":
        return tuple(torch.zeros_like(t) for t in (q, k, v, do))
    switches = curvature_switches(curvature)
    q, k, v, do = (t.to(cd) for t in (q, k, v, do))
    # The incoming gradients often arrive strided (vmap's layout): each is used twice by
    # the matmuls below, which would copy it each time; copy it once.
    uq, uk, uv = (t.to(cd).contiguous() for t in (uq, uk, uv))
    if p is None:
        s = _scores(q, k, causal, scale)
        p = torch.softmax(s, dim=-1) if lse is None else torch.exp(s - lse[..., None])
    w = _matmul_add(scale * (uq @ k.transpose(-1, -2)), q, uk.transpose(-1, -2), alpha=scale)
    g_dp = _softmax_vjp(w, p)
    gdo = _matmul_add(g_dp @ v, p, uv)
    score, value = switches["SCORE"], switches["VALUE"]
    if not (score or value):  # "none": only the derivative in dO
        zeros = (torch.zeros_like(t) for t in (q, k, v))
        return tuple(t.to(dtype) for t in (*zeros, gdo))
    g_p = do @ uv.transpose(-1, -2) if value else None  # G_P = R (the value path) ...
    if score:  # ... + (dP - Delta) W - rho_W dP (the score path)
        dp = do @ v.transpose(-1, -2)
        rows = lambda x: (p * x).sum(-1, keepdim=True)  # noqa: E731
        dp_centered = dp - rows(dp)
        g_p = dp_centered * w if g_p is None else torch.addcmul(g_p, dp_centered, w)
        g_p = torch.addcmul(g_p, rows(w), dp, value=-1)
    # G_S / s: with the log-sum-exp's derivative (the softmax's VJP), or without it
    # (frozen). The scale s is applied once, with the last matmul.
    g_s = p * g_p if switches["FROZEN_STATS"] else _softmax_vjp(g_p, p)
    gq, gk = g_s @ k, g_s.transpose(-1, -2) @ q
    if score:
        ds = _softmax_vjp(dp, p)  # dS / s
        gq = _matmul_add(gq, ds, uk, alpha=scale, beta=scale)
        gk = _matmul_add(gk, ds.transpose(-1, -2), uq, alpha=scale, beta=scale)
    else:
        gq, gk = scale * gq, scale * gk
    gv = g_dp.transpose(-1, -2) @ do if value else torch.zeros_like(v)
    return tuple(t.to(dtype) for t in (gq, gk, gv, gdo))
