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
