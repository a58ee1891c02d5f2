"""Fused attention as autograd.Functions that compose with torch.func.

Three Functions, each the backward of the one before:

    FusedAttention               (q, k, v)                   -> (o, stats)        1 Triton kernel
    FusedAttentionBackward       (q, k, v, o, stats, do)     -> (dq, dk, dv)      1-2 Triton kernels
    FusedAttentionDoubleBackward (q, k, v, o, stats, do, u*) -> (gq, gk, gv, gdo) 2 Triton kernels

(The backward is one kernel where dQ is summed with atomics: kernels.launch.LaunchConfig.)

Each also takes the non-tensor arguments `causal`, `scale`, `precision` (the Triton dot
precision of float32 operands, kernels.launch), `curvature` (what attention's own
second derivative contributes, kernels.reference.CURVATURES: the double-backward
kernels' switches; "once_differentiable" makes the backward's own backward zero) and
`ops` ("triton", or "reference": the same Functions on PyTorch ops, which is how the
reference backend applies a curvature policy), and hands them to the next.

Because FusedAttention.backward is itself an autograd.Function call, the first
backward records a graph and second-order gradients (grad of grad, MAML's
meta-gradient) go through the fused double-backward kernels, exactly. The third
Function's backward (order three and above) recomputes through the PyTorch-ops closed
form with `torch.func.vjp`: exact to any order, just not fused.

`stats` are the softmax statistics the forward saves: the log-sum-exp (..., N) for the
Triton kernels, the softmax P itself (..., N, M) for the PyTorch ops, which materialise
it anyway and so need not recompute it. `o` and `stats` enter the two backward
Functions only as saved tensors: the closed-form gradients of kernels/triton_kernels.py
are total derivatives with respect to q, k, v and do, so they get no gradient of their
own.

Triton (kernels.launch) is imported when a kernel first runs (`_launch`), so the
PyTorch-ops path (the reference backend's curvature policies) needs no Triton.

Every Function has:
* `setup_context` (required by torch.func),
* a `vmap` rule that moves the vmapped dimension to the front, where the launchers
  fold it into the batch*head axis: a vmapped call is one kernel launch,
* a `jvp` rule (forward-mode AD) through the reference ops: exact, not fused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kernels.common import vmapped_to_front
from kernels.reference import (
    attention_backward_formula,
    attention_backward_reference,
    attention_double_backward_formula,
    attention_logsumexp_reference,
    attention_reference,
    attention_with_softmax_formula,
)


def _reference_jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence):
    tangents = [
        torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents, strict=True)
    ]
    return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]


def _forward_mode_needs_exact(curvature: str) -> None:
    if curvature != "exact":  # the policies are defined for reverse mode
        raise NotImplementedError(
            f"forward-mode AD of attention's backward under curvature {curvature!r} is not "
            "implemented; use reverse mode (grad, vjp)"
        )


def _without_autocast(fn: Callable) -> Callable:
    """Run `fn` with torch.autocast off: the Functions' PyTorch ops keep the dtypes the
    formulas choose (float32 compute for half inputs), as the kernels do."""

    def run(q, *args):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args)

    return run


def _launch():
    """kernels.launch, imported when a kernel first runs (it imports Triton)."""
    from kernels import launch

    return launch


@_without_autocast
def _forward(q, k, v, causal, scale, precision, ops):
    if ops == "triton":
        return _launch().attention_forward(q, k, v, causal, scale, precision)
    return attention_with_softmax_formula(q, k, v, causal, scale)


@_without_autocast
def _backward(q, k, v, o, stats, do, causal, scale, precision, ops):
    if ops == "triton":
        return _launch().attention_backward(q, k, v, o, stats, do, causal, scale, precision)
    return attention_backward_formula(q, k, v, stats, do, scale)


@_without_autocast
def _double_backward(q, k, v, o, stats, do, uq, uk, uv, causal, scale, precision, curvature, ops):
    if ops == "triton":
        return _launch().attention_double_backward(
            q, k, v, o, stats, do, uq, uk, uv, causal, scale, precision, curvature=curvature
        )
    return attention_double_backward_formula(
        q, k, v, do, uq, uk, uv, causal, scale, curvature, p=stats
    )


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, causal: bool, scale: float, precision: str, curvature: str, ops: str):
        return _forward(q, k, v, causal, scale, precision, ops)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, precision, curvature, ops = inputs
        o, stats = output
        ctx.args = causal, scale, precision, curvature, ops
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the statistics' gradient
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, do, _dstats):
        if do is None:  # the output does not reach the loss
            return (None,) * 8
        q, k, v, o, stats = ctx.saved_tensors
        dq, dk, dv = FusedAttentionBackward.apply(q, k, v, o, stats, do, *ctx.args)
        return dq, dk, dv, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v = ctx.saved_tensors
        c, s = ctx.args[:2]
        t_o = _reference_jvp(
            lambda q_, k_, v_: attention_reference(q_, k_, v_, c, s), (q, k, v), (tq, tk, tv)
        )
        return t_o, None  # stats is marked non-differentiable

    @staticmethod
    def vmap(info, in_dims, q, k, v, *args):
        q, k, v = vmapped_to_front(info, in_dims[:3], (q, k, v))
        return FusedAttention.apply(q, k, v, *args), (0, 0)


class FusedAttentionBackward(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, o, stats, do, causal, scale, precision, curvature, ops):
        return _backward(q, k, v, o, stats, do, causal, scale, precision, ops)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, stats, do, *args = inputs
        ctx.args = tuple(args)
        ctx.save_for_backward(q, k, v, o, stats, do)
        ctx.save_for_forward(q, k, v, do)

    @staticmethod
    def backward(ctx, uq, uk, uv):
        nones = (None,) * 5
        if ctx.args[3] == "once_differentiable":  # the backward is a constant
            return None, None, None, None, None, None, *nones
        q, k, v, o, stats, do = ctx.saved_tensors
        gq, gk, gv, gdo = FusedAttentionDoubleBackward.apply(
            q, k, v, o, stats, do, uq, uk, uv, *ctx.args
        )
        if ctx.args[3] == "none":  # gq = gk = gv = 0: nothing to accumulate
            gq = gk = gv = None
        return gq, gk, gv, None, None, gdo, *nones

    @staticmethod
    def jvp(ctx, tq, tk, tv, _to, _tstats, tdo, *_):
        _forward_mode_needs_exact(ctx.args[3])
        q, k, v, do = ctx.saved_tensors
        c, s = ctx.args[:2]
        return _reference_jvp(
            lambda *a: attention_backward_reference(*a, c, s), (q, k, v, do), (tq, tk, tv, tdo)
        )

    @staticmethod
    def vmap(info, in_dims, q, k, v, o, stats, do, *args):
        q, k, v, o, stats, do = vmapped_to_front(info, in_dims[:6], (q, k, v, o, stats, do))
        return FusedAttentionBackward.apply(q, k, v, o, stats, do, *args), (0, 0, 0)


class FusedAttentionDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, o, stats, do, uq, uk, uv, causal, scale, precision, curvature, ops):
        return _double_backward(
            q, k, v, o, stats, do, uq, uk, uv, causal, scale, precision, curvature, ops
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _o, stats, do, uq, uk, uv, causal, scale, _precision, curvature, ops = inputs
        ctx.causal, ctx.scale, ctx.curvature, ctx.ops = causal, scale, curvature, ops
        ctx.save_for_backward(q, k, v, do, uq, uk, uv, stats)
        ctx.save_for_forward(q, k, v, do, uq, uk, uv, stats)

    @staticmethod
    def _reference(ctx) -> tuple[Callable, tuple]:
        """The closed form as a function of (q, k, v, do, uq, uk, uv), and those saved
        tensors. Frozen softmax statistics stay frozen at third order: L is a constant."""
        *tensors, stats = ctx.saved_tensors
        c, s, curvature = ctx.causal, ctx.scale, ctx.curvature
        lse = None
        if curvature == "frozen_softmax_stats":
            q, k = tensors[:2]
            lse = stats if ctx.ops == "triton" else attention_logsumexp_reference(q, k, c, s)
        fn = lambda *a: attention_double_backward_formula(*a, c, s, curvature, lse)  # noqa: E731
        return fn, tuple(tensors)

    @staticmethod
    def backward(ctx, gq_bar, gk_bar, gv_bar, gdo_bar):
        # Third order: the exact VJP of the double backward, through the closed form.
        fn, tensors = FusedAttentionDoubleBackward._reference(ctx)
        _, pullback = torch.func.vjp(fn, *tensors)
        q, k, v, do, uq, uk, uv = pullback((gq_bar, gk_bar, gv_bar, gdo_bar))
        return q, k, v, None, None, do, uq, uk, uv, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _to, _tstats, tdo, tuq, tuk, tuv, *_):
        _forward_mode_needs_exact(ctx.curvature)
        fn, tensors = FusedAttentionDoubleBackward._reference(ctx)
        return _reference_jvp(fn, tensors, (tq, tk, tv, tdo, tuq, tuk, tuv))

    @staticmethod
    def vmap(info, in_dims, q, k, v, o, stats, do, uq, uk, uv, *args):
        tensors = vmapped_to_front(info, in_dims[:9], (q, k, v, o, stats, do, uq, uk, uv))
        out = FusedAttentionDoubleBackward.apply(*tensors, *args)
        return out, (0, 0, 0, 0)
