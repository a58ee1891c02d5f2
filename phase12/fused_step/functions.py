"""The `triton_step` backend: an inner SGD step of the Phase 12 model as fused Triton
kernels, and its backward (second-order MAML) as a fused Hessian-vector product.

    sgd_step(params, x, y, lr, second_order)   phi = params - lr dL_s/dparams
    query_metrics(params, x, y)                (L_q, accuracy), differentiable

Both take `operand`: None, or the dtype (bfloat16, float16) the kernels round float32
inputs to before computing with them, what torch.autocast does to a matmul's inputs
(phase12/fused_step/launch.py). The rounding's derivative is the identity, as a cast's.

With the `reference` and `triton_fused` backends, an inner step is torch.func.grad of
the model: tens of GEMMs and small kernels, and as many again in the outer backward.
Here the model's loss gradient is written out by hand (phase12/fused_step/task_kernels.py
and example_kernels.py) and runs as one or two launches per step for the whole
meta-batch; the backward of the step, v -> v - lr H v (H the support loss's Hessian), is
a Hessian-vector product of as many launches.

Three autograd.Functions, each with `setup_context` and a `vmap` rule that moves the
vmapped dim to the front, where the launchers fold it into the task axis (a vmapped
call is one call of the launcher):

    SGDStep               (x, y, lr, second_order, operand, *W) -> W - lr dL/dW
                                                                  [, p, dp - delta]
    LossAndGradient       (x, y, operand, *W)                   -> (L, acc, *dL/dW)
    HessianVectorProduct  (x, y, alpha, beta, operand, p, dp - delta, *W, *V)
                                                                -> alpha V + beta H V

SGDStep's and LossAndGradient's backwards are HessianVectorProduct calls, so their
second derivatives are the fused kernels too. Where the task kernels run, a second-order
SGDStep also returns the step's attention weights p and centred score gradients
dp - delta (non-differentiable; `sgd_step` drops them) and saves them for its backward,
whose Hessian-vector product reads them instead of recomputing them (launch.py); other
HVPs get None for both. HessianVectorProduct's own backward (third order) is exact
through the reference model and torch.func, which recompute p from W. Forward-mode AD
is not implemented (torch raises a clear error).
"""

from __future__ import annotations

import torch

from kernels.common import vmapped_to_front
from phase12.config import PARAMS  # the kernels' argument order
from phase12.fused_step.launch import (
    support_hvp,
    support_loss_and_grad,
    support_step,
    support_step_and_attention,
)
from phase12.model import Params, loss

NUM_PARAMS = len(PARAMS)


def _rounded(t: torch.Tensor, operand: torch.dtype | None) -> torch.Tensor:
    return t if operand is None else t.to(operand).to(t.dtype)


def _hvp_reference(x, y, alpha: float, beta: float, operand, params, v):
    """alpha v + beta H v through the reference model, H taken at the rounded x and
    params along the rounded v (as the kernel); any leading task dims."""
    lead = x.shape[:-3]

    def one_task(x, y, params, v):
        x = _rounded(x, operand)

        def grad(p):
            return torch.func.grad(loss)(dict(zip(PARAMS, p, strict=True)), x, y)

        params_r, v_r = (tuple(_rounded(t, operand) for t in ts) for ts in (params, v))
        _, hv = torch.func.jvp(grad, (params_r,), (v_r,))
        return tuple(alpha * vi + beta * hv[n] for vi, n in zip(v, PARAMS, strict=True))

    out = torch.func.vmap(one_task)(
        x.reshape(-1, *x.shape[-3:]),
        y.reshape(-1, y.shape[-1]),
        tuple(p.reshape(-1, *p.shape[len(lead) :]) for p in params),
        tuple(w.reshape(-1, *w.shape[len(lead) :]) for w in v),
    )
    return tuple(o.reshape(*lead, *o.shape[1:]) for o in out)


class HessianVectorProduct(torch.autograd.Function):
    @staticmethod
    def forward(x, y, alpha: float, beta: float, operand, p, dp_centred, *params_and_v):
        params, v = params_and_v[:NUM_PARAMS], params_and_v[NUM_PARAMS:]
        attention = None if p is None else (p, dp_centred)
        return support_hvp(params, x, y, v, alpha, beta, operand, attention)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, alpha, beta, operand, _, _, *params_and_v = inputs
        ctx.alpha, ctx.beta, ctx.operand = alpha, beta, operand
        ctx.save_for_backward(x, y, *params_and_v)

    @staticmethod
    def backward(ctx, *w):
        # Third order: the exact VJP of alpha v + beta H v, through the reference model.
        x, y, *params_and_v = ctx.saved_tensors
        params, v = params_and_v[:NUM_PARAMS], params_and_v[NUM_PARAMS:]
        _, pullback = torch.func.vjp(
            lambda p, u: _hvp_reference(x, y, ctx.alpha, ctx.beta, ctx.operand, p, u),
            tuple(params),
            tuple(v),
        )
        g_params, g_v = pullback(tuple(w))
        return (None,) * 7 + (*g_params, *g_v)  # x, y, alpha, beta, operand, p, dp: none

    @staticmethod
    def vmap(info, in_dims, x, y, alpha, beta, operand, *tensors):  # tensors: p, dp, *W, *V
        x, y, *tensors = vmapped_to_front(info, (*in_dims[:2], *in_dims[5:]), (x, y, *tensors))
        return HessianVectorProduct.apply(x, y, alpha, beta, operand, *tensors), (0,) * NUM_PARAMS


class SGDStep(torch.autograd.Function):
    @staticmethod
    def forward(x, y, lr: float, second_order: bool, operand, *params):
        if not second_order:
            return support_step(params, x, y, lr, operand)
        steps, attention = support_step_and_attention(params, x, y, lr, operand)
        return *steps, *(attention or ())

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, lr, second_order, operand, *params = inputs
        ctx.lr, ctx.second_order, ctx.operand = lr, second_order, operand
        attention = output[NUM_PARAMS:]  # (p, dp - delta) or nothing
        ctx.mark_non_differentiable(*attention)
        ctx.save_for_backward(x, y, *params, *attention)

    @staticmethod
    def backward(ctx, *grads):
        nones = (None,) * 5  # x, y, lr, second_order, operand: no gradient
        v = grads[:NUM_PARAMS]  # the attention outputs have none
        if not ctx.second_order:  # FO: the inner gradient is a constant, the step's Jacobian I
            return *nones, *v
        x, y, *saved = ctx.saved_tensors
        params, attention = saved[:NUM_PARAMS], saved[NUM_PARAMS:]
        p, dp_centred = attention if attention else (None, None)
        hv = HessianVectorProduct.apply(x, y, 1.0, -ctx.lr, ctx.operand, p, dp_centred, *params, *v)
        return *nones, *hv

    @staticmethod
    def vmap(info, in_dims, x, y, lr, second_order, operand, *params):
        x, y, *params = vmapped_to_front(info, (*in_dims[:2], *in_dims[5:]), (x, y, *params))
        out = SGDStep.apply(x, y, lr, second_order, operand, *params)
        return out, (0,) * len(out)


class LossAndGradient(torch.autograd.Function):
    @staticmethod
    def forward(x, y, operand, *params):
        loss_, accuracy, grads = support_loss_and_grad(params, x, y, operand)
        return loss_, accuracy, *grads

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, operand, *params = inputs
        ctx.operand = operand
        _, accuracy, *grads = output
        ctx.mark_non_differentiable(accuracy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y, *params, *grads)

    @staticmethod
    def backward(ctx, d_loss, _d_accuracy, *d_grads):
        x, y, *saved = ctx.saved_tensors
        params, grads = saved[:NUM_PARAMS], saved[NUM_PARAMS:]
        if d_loss is None:
            out = [torch.zeros_like(p) for p in params]
        else:  # d(loss)/dW = grads (float32 for half params); d_loss is per task, (...)
            out = [
                (d_loss.reshape(*d_loss.shape, *(1,) * (g.dim() - d_loss.dim())) * g).to(p.dtype)
                for g, p in zip(grads, params, strict=True)
            ]
        if any(d is not None for d in d_grads):  # d<d_grads, grads>/dW = H d_grads
            d_grads = [
                torch.zeros_like(p) if d is None else d.to(p.dtype)
                for d, p in zip(d_grads, params, strict=True)
            ]
            hv = HessianVectorProduct.apply(
                x, y, 0.0, 1.0, ctx.operand, None, None, *params, *d_grads
            )
            out = [a + b for a, b in zip(out, hv, strict=True)]
        return None, None, None, *out

    @staticmethod
    def vmap(info, in_dims, x, y, operand, *params):
        x, y, *params = vmapped_to_front(info, (*in_dims[:2], *in_dims[3:]), (x, y, *params))
        return LossAndGradient.apply(x, y, operand, *params), (0,) * (2 + NUM_PARAMS)


def sgd_step(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    *,
    second_order: bool,
    operand: torch.dtype | None = None,
) -> Params:
    """params - lr * grad of the mean cross-entropy on (x (n, T, D), y (n,)), the gradient
    computed with x and params rounded to `operand` if given.

    Differentiable w.r.t. params: exactly (second order: v -> v - lr H v) when
    `second_order`, else with the inner gradient treated as a constant (identity).
    """
    # Unrecorded (FO_STRICT's inner loop): no backward would read saved attention.
    # (torch.func's grad and vjp enable grad inside themselves.)
    second_order = second_order and torch.is_grad_enabled()
    out = SGDStep.apply(x, y, lr, second_order, operand, *(params[n] for n in PARAMS))
    return dict(zip(PARAMS, out[:NUM_PARAMS], strict=True))


def query_metrics(
    params: Params, x: torch.Tensor, y: torch.Tensor, operand: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) of the model on (x (n, T, D), y (n,)), computed with
    x and params rounded to `operand` if given; the loss is differentiable w.r.t. params
    (to second order through the fused kernels)."""
    loss_, accuracy, *_ = LossAndGradient.apply(x, y, operand, *(params[n] for n in PARAMS))
    return loss_, accuracy
