"""Launchers for the fused inner-step kernels of the Phase 12 model
(phase12/fused_step/triton_kernels.py): shapes, block sizes, allocation.

    support_step(params, x, y, lr)            -> (W - lr dL/dW for each W)          1 launch
    support_loss_and_grad(params, x, y)       -> (loss, accuracy, dL/dW for each W) 1 launch
                                                 (dL/dW in float32 for half inputs)
    support_hvp(params, x, y, v, alpha, beta) -> alpha v + beta (d^2L/dW^2) v       1 launch

`params` and `v` are tuples (Wq, Wk, Wv, Wc, bc) of shapes (..., D, D) x 3, (..., C, D),
(..., C); x (..., n, T, D) and y (..., n) int64, all with the same leading (task) dims,
which become one grid axis (one program per task). A leading dim of stride 0 (the
shared meta-parameters, expanded over the tasks) is read in place, not copied. L is the
model's mean cross-entropy over the n examples of a task. Nothing here is
differentiable: phase12/fused_step/functions.py wraps these in autograd.Functions.

Dtypes: float32, bfloat16 and float16 run on CUDA, all arithmetic in float32 (dots in
plain float32, `input_precision="ieee"`), outputs in the inputs' dtype; float64 only in
the interpreter (TRITON_INTERPRET=1), where the tests run. Each launcher also takes
`operand`: None, or bfloat16 / float16 for float32 inputs (torch.autocast's dtype), the
dtype the kernels round x, W and V to before computing with them; W - lr dL/dW and the
alpha v term use W and v as they are (triton_kernels.py, "Precision").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import interpreter_enabled, pow2
from phase12.fused_step.triton_kernels import support_grad_kernel, support_hvp_kernel

PARAM_TAILS = (2, 2, 2, 2, 1)  # trailing (per-task) dims of Wq, Wk, Wv, Wc, bc
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OPERAND_DTYPES = (torch.bfloat16, torch.float16)

TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
# Limits of one program per task: the kernels keep a dozen (examples x D) blocks and
# several D x D weights in registers. At D = 128 the compiled kernels need 330 KB of
# shared memory (an H200 has 227 KB), so D stops at 64; n = 64 at D = 64 compiles.
MAX_DIM = 64
MAX_EXAMPLES = 64
MAX_CLASSES = 16  # one 16-wide block of classes (tested: C = 5, 7)
# Elements of one (examples x positions x D) block of X walked per loop iteration.
BLOCK_ELEMENTS = 4096
PRECISION = "ieee"
# Warps per program, by input dtype: for float32 the fastest of 2, 4, 8, 16; 16-bit inputs
# run fastest at 4 (docs/benchmarks.md, "Ninth session"). Autocast runs have float32
# inputs and keep 8 (they cost float32's time plus 1-12%; 4 was not timed for them).
NUM_WARPS = {torch.float64: 8, torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}


def check_shapes(examples: int, seq_len: int, dim: int, num_classes: int) -> None:
    """Raise ValueError if the fused kernels cannot hold a task of these sizes."""
    if dim > MAX_DIM:
        raise ValueError(
            f"the fused inner step supports D <= {MAX_DIM}; got D = {dim} "
            f"(use backend {'triton_fused' if dim <= 128 else 'reference'})"
        )
    if examples > MAX_EXAMPLES:
        raise ValueError(
            f"the fused inner step supports up to {MAX_EXAMPLES} examples per task; got {examples} "
            "(use backend triton_fused)"
        )
    if num_classes > MAX_CLASSES:
        raise ValueError(
            f"the fused inner step supports up to {MAX_CLASSES} classes; got {num_classes} "
            "(use backend triton_fused)"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1; got {seq_len}")


def _per_task(t: torch.Tensor, tail: int) -> torch.Tensor:
    """t (..., *tail) as (B, *tail) with row-major tail dims; the task dim's stride is
    kept (0 for an expanded tensor) when that needs no copy."""
    t = t.reshape(-1, *t.shape[t.dim() - tail :])
    inner = t[0] if t.shape[0] else t
    if not inner.is_contiguous():
        t = t.contiguous()
    return t


def _prepare(x: torch.Tensor, y: torch.Tensor, operand: torch.dtype | None, *groups):
    """Check x, y, the operand dtype and each group of five parameter-shaped tensors
    (params, v); return (leading dims, (n, T, D, C), x, y, groups) with every tensor as a
    (B, ...) array."""
    lead = x.shape[:-3]
    if y.shape != x.shape[:-2]:
        raise ValueError(
            f"y must have shape {tuple(x.shape[:-2])} (x's (..., n)); got {tuple(y.shape)}"
        )
    if y.dtype != torch.int64:
        raise ValueError(f"y must hold int64 class labels; got {y.dtype}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the fused inner step supports {SUPPORTED_DTYPES}; got {x.dtype}")
    if x.dtype == torch.float64 and not interpreter_enabled():
        raise ValueError("float64 runs only in Triton's interpreter (TRITON_INTERPRET=1)")
    if operand is not None and (x.dtype != torch.float32 or operand not in OPERAND_DTYPES):
        raise ValueError(
            f"operand rounds float32 inputs to one of {OPERAND_DTYPES}; got {operand} for {x.dtype}"
        )
    n, t, d = x.shape[-3:]
    c = groups[0][3].shape[-2]
    expected = ((d, d), (d, d), (d, d), (c, d), (c,))
    for group in groups:
        for p, shape in zip(group, expected, strict=True):
            if p.shape != (*lead, *shape):
                raise ValueError(
                    f"expected a parameter-shaped tensor of shape {(*lead, *shape)} (x's leading "
                    f"dims, then {shape}); got {tuple(p.shape)}"
                )
            if p.dtype != x.dtype or p.device != x.device:
                raise ValueError("every parameter-shaped tensor must have x's dtype and device")
    check_shapes(n, t, d, c)
    flat = [[_per_task(p, tail) for p, tail in zip(g, PARAM_TAILS, strict=True)] for g in groups]
    return lead, (n, t, d, c), _per_task(x, 3), _per_task(y, 1), flat


def _meta(n: int, t: int, d: int, c: int, dtype: torch.dtype, operand: torch.dtype | None) -> dict:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    block_n, block_d = pow2(n, 16), pow2(d, 16)
    block_t = max(1, min(triton.next_power_of_2(t), BLOCK_ELEMENTS // (block_n * block_d)))
    if interpreter_enabled():
        block_t = 2  # several position blocks and a tail even at test sizes
    return dict(
        BLOCK_N=block_n,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_C=pow2(c, 16),
        PRECISION=PRECISION,
        OPERAND=TL_DTYPES[operand or acc],
        ACC=TL_DTYPES[acc],
        num_warps=NUM_WARPS[dtype],
    )


def _scalars(n: int, d: int) -> tuple[float, float]:
    return d**-0.5, 1.0 / n


def _outputs(params, batch: int, dtype: torch.dtype | None = None):
    """Empty (batch, ...) arrays shaped like `params`, in their dtype or `dtype`."""
    return [
        torch.empty(batch, *p.shape[1:], dtype=dtype or p.dtype, device=p.device) for p in params
    ]


def _grad_launch(params, x, y, lr: float, update: bool, operand):
    lead, (n, t, d, c), x3, y1, (ps,) = _prepare(x, y, operand, params)
    batch = x3.shape[0]
    # Gradients (not steps) stay in the accumulator's float32 for half parameters: their
    # backward multiplies them by the (loss-scaled) incoming gradient, which float16's
    # subnormals would spoil first.
    outs = _outputs(ps, batch, None if update else torch.promote_types(x.dtype, torch.float32))
    loss = torch.empty(batch, dtype=x.dtype, device=x.device)
    accuracy = torch.empty_like(loss)
    if batch:
        support_grad_kernel[(batch,)](
            x3, y1, *ps, *outs, loss, accuracy,
            x3.stride(0), y1.stride(0), *(p.stride(0) for p in ps),
            n, t, d, c, *_scalars(n, d), lr,
            UPDATE=update, **_meta(n, t, d, c, x.dtype, operand),
        )  # fmt: skip
    outs = tuple(o.view(*lead, *o.shape[1:]) for o in outs)
    return outs, loss.view(lead), accuracy.view(lead)


def support_step(
    params, x: torch.Tensor, y: torch.Tensor, lr: float, operand: torch.dtype | None = None
) -> tuple[torch.Tensor, ...]:
    """One SGD step on the support loss of each task: W - lr dL/dW, for each W."""
    return _grad_launch(params, x, y, lr, True, operand)[0]


def support_loss_and_grad(params, x: torch.Tensor, y: torch.Tensor, operand=None):
    """(loss (...), accuracy (...), (dL/dW for each W)) of each task."""
    grads, loss, accuracy = _grad_launch(params, x, y, 0.0, False, operand)
    return loss, accuracy, grads


def support_hvp(
    params, x: torch.Tensor, y: torch.Tensor, v, alpha: float, beta: float, operand=None
):
    """alpha v + beta H v for each task, H the Hessian of its support loss at `params`."""
    lead, (n, t, d, c), x3, y1, (ps, vs) = _prepare(x, y, operand, params, v)
    batch = x3.shape[0]
    outs = _outputs(ps, batch)
    if batch:
        support_hvp_kernel[(batch,)](
            x3, y1, *ps, *vs, *outs,
            x3.stride(0), y1.stride(0), *(p.stride(0) for p in ps), *(w.stride(0) for w in vs),
            n, t, d, c, *_scalars(n, d), alpha, beta,
            **_meta(n, t, d, c, x.dtype, operand),
        )  # fmt: skip
    return tuple(o.view(*lead, *o.shape[1:]) for o in outs)
