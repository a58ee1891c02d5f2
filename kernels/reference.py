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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gq, gk, gv, gdo) under a curvature policy (CURVATURES), from the closed form of
    the fused kernels written with full N x M matrices in PyTorch ops (differentiable).

    With curvature "exact" it equals `attention_double_backward_reference`.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}")
    scale = default_scale(q.shape[-1]) if scale is None else scale
    dtype, cd = q.dtype, _compute_dtype(q.dtype)
    q, k, v, do, uq, uk, uv = (t.to(cd) for t in (q, k, v, do, uq, uk, uv))
    if curvature == "once_differentiable":
        zeros = [torch.zeros_like(t) for t in (q, k, v, do)]
        return tuple(z.to(dtype) for z in zeros)
    p = torch.softmax(_scores(q, k, causal, scale), dim=-1)
    dp = do @ v.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)
    w = scale * (uq @ k.transpose(-1, -2) + q @ uk.transpose(-1, -2))
    r = do @ uv.transpose(-1, -2)
    rho_w = (p * w).sum(-1, keepdim=True)
    score = curvature in ("exact", "score", "frozen_softmax_stats")
    value = curvature in ("exact", "value", "frozen_softmax_stats")
    g_p = torch.zeros_like(p)
    if value:
        g_p = g_p + r
    if score:
        g_p = g_p + (dp - delta) * w - rho_w * dp
    if curvature != "frozen_softmax_stats":  # the log-sum-exp's derivative
        g_p = g_p - (p * g_p).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    g_s = p * g_p
    g_dp = p * (w - rho_w)
    gq = scale * g_s @ k
    gk = scale * g_s.transpose(-1, -2) @ q
    if score:
        gq = gq + scale * ds @ uk
        gk = gk + scale * ds.transpose(-1, -2) @ uq
    gv = g_dp.transpose(-1, -2) @ do if value else torch.zeros_like(v)
    gdo = g_dp @ v + p @ uv
    return tuple(t.to(dtype) for t in (gq, gk, gv, gdo))
