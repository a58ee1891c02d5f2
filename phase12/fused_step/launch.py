"""Launchers for the fused inner-step kernels of the Phase 12 model: shapes, block
sizes, allocation, and the choice between two kernel sets.

    support_step(params, x, y, lr)            -> (W - lr dL/dW for each W)
    support_step_and_attention(params, x, y, lr)
                                              -> (that, (p, dp - delta))
    support_loss_and_grad(params, x, y)       -> (loss, accuracy, dL/dW for each W)
                                                 (dL/dW in float32 for half inputs)
    support_hvp(params, x, y, v, alpha, beta[, attention])
                                              -> alpha v + beta (d^2L/dW^2) v

`attention` is what support_step_and_attention saved at the same params, x, y and
operand: each example's attention weights p and centred score gradients dp - delta,
(..., n, T) in the accumulator dtype. support_hvp reads them instead of recomputing
them, which is what second-order MAML's backward does with its forward's
(task_kernels.py, "Saved attention"). Only the task kernels save and read them; with the
example kernels reading was slower than recomputing (docs/benchmarks.md, "Twenty-third
session"), and `attention` is None.

Up to EXAMPLE_KERNELS_MAX examples in all (tasks x n), each call is two launches of
example_kernels.py (one program per task and example, then one per task and weight);
above it, one launch of task_kernels.py (one program per task). The first fills the
GPU when the meta-batch is small, the second reads each task's weights once.

`params` and `v` are tuples (Wq, Wk, Wv, Wc, bc) of shapes (..., D, D) x 3, (..., C, D),
(..., C); x (..., n, T, D) and y (..., n) int64 labels in [0, C) (not checked: that
would read the device), all with the same leading (task) dims, which become one grid
axis. A parameter expanded over the tasks (the shared meta-parameters: stride 0) is
read in place when its leading dims flatten without a copy (one leading dim; a stride-0
dim after a strided one is copied). L is the model's mean cross-entropy over the n
examples of a task. Nothing here is differentiable: phase12/fused_step/functions.py
wraps these in autograd.Functions.

Dtypes: float32, bfloat16 and float16 run on CUDA, all arithmetic in float32 (dots in
tf32x3, float32 accuracy on the tensor cores, as the attention kernels use, except
where `dot_precision` says), outputs in the inputs' dtype; float64 only in the
interpreter (TRITON_INTERPRET=1), where the tests run. Each launcher also takes
`operand`: None, or bfloat16 / float16 for float32 inputs (torch.autocast's dtype), the
dtype the kernels round x, W and V to before computing with them; W - lr dL/dW and the
alpha v term use W and v as they are (task_kernels.py, "Precision").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import accumulator_dtype, interpreter_enabled, pow2
from phase12.fused_step.example_kernels import (
    WEIGHTS,
    example_grad_kernel,
    example_hvp_kernel,
    weight_kernel,
)
from phase12.fused_step.task_kernels import task_grad_kernel, task_hvp_kernel

PARAM_TAILS = (2, 2, 2, 2, 1)  # trailing (per-task) dims of Wq, Wk, Wv, Wc, bc
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OPERAND_DTYPES = (torch.bfloat16, torch.float16)

TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
# Limits: a task program keeps a dozen (examples x D) blocks and several D x D weights
# on chip; at D = 128 that is more shared memory than an H100 or H200 has.
MAX_DIM = 64
MAX_EXAMPLES = 64
MAX_CLASSES = 16  # one 16-wide block of classes
# The kernel sets' crossover, in examples (tasks x n): docs/benchmarks.md, "Tenth session".
EXAMPLE_KERNELS_MAX = 512
# Elements of the (positions x D) block one example program walks per loop iteration,
# and of the (examples x positions x D) block a task program walks ("Eleventh session").
EXAMPLE_BLOCK_ELEMENTS = 4096
TASK_BLOCK_ELEMENTS = 8192
# Warps per program, the fastest measured: task programs by input dtype (autocast runs
# have float32 inputs; "Ninth session" to "Eleventh session"), example and weight
# programs ("Tenth session").
TASK_WARPS = {torch.float64: 8, torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}
EXAMPLE_WARPS = 4
WEIGHT_WARPS = 4
WEIGHT_ROWS = 16  # examples per dot of the weight kernel


def check_shapes(examples: int, seq_len: int, dim: int, num_classes: int) -> None:
    """Raise ValueError if the fused kernels cannot hold a task of these sizes."""
    sizes = dict(examples=examples, seq_len=seq_len, dim=dim, num_classes=num_classes)
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be >= 1; got {size}")
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
    if x.dim() < 3:
        raise ValueError(f"x must have shape (..., n, T, D); got {tuple(x.shape)}")
    lead = x.shape[:-3]
    if y.shape != x.shape[:-2]:
        raise ValueError(
            f"y must have shape {tuple(x.shape[:-2])} (x's (..., n)); got {tuple(y.shape)}"
        )
    if y.dtype != torch.int64 or y.device != x.device:
        raise ValueError(
            f"y must hold int64 class labels on x's device; got {y.dtype} on {y.device}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the fused inner step supports {SUPPORTED_DTYPES}; got {x.dtype}")
    if x.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"the fused inner step runs on CUDA, or on the CPU in Triton's interpreter "
            f"(TRITON_INTERPRET=1); got x on {x.device}"
        )
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


def dot_precision(acc: torch.dtype, rows: int) -> str:
    """Triton's `input_precision` for dots over `rows`-row blocks: tf32x3 (each float32
    operand split into TF32 high and low parts, three tensor-core products) for float32,
    except 64-row blocks, where Triton 3.6's tf32x3 code makes an illegal memory access
    in the task kernels on an H200 ("Tenth session"): plain float32 FMA ("ieee") there
    and for float64."""
    return "tf32x3" if acc == torch.float32 and rows <= 32 else "ieee"


def use_example_kernels(tasks: int, n: int) -> bool:
    """Whether a call over `tasks` tasks of `n` examples runs the example kernels."""
    return tasks * n <= EXAMPLE_KERNELS_MAX


def _meta(n: int, t: int, d: int, c: int, dtype: torch.dtype, operand, per_example: bool):
    """Compile-time settings of the example or task kernels."""
    acc = accumulator_dtype(dtype)
    block_d = pow2(d, 16)
    meta = dict(
        BLOCK_D=block_d, BLOCK_C=pow2(c, 16), OPERAND=TL_DTYPES[operand or acc], ACC=TL_DTYPES[acc]
    )
    if per_example:
        block_t = EXAMPLE_BLOCK_ELEMENTS // block_d
        meta.update(num_warps=EXAMPLE_WARPS)
    else:
        block_n = pow2(n, 16)
        block_t = TASK_BLOCK_ELEMENTS // (block_n * block_d)
        meta.update(
            BLOCK_N=block_n, PRECISION=dot_precision(acc, block_n), num_warps=TASK_WARPS[dtype]
        )
    block_t = max(1, min(triton.next_power_of_2(t), block_t))
    if interpreter_enabled():
        block_t = 2  # several position blocks and a tail even at test sizes
    return dict(meta, BLOCK_T=block_t)


def _scalars(n: int, d: int) -> tuple[float, float]:
    return d**-0.5, 1.0 / n


def _outputs(params, batch: int, dtype: torch.dtype | None = None):
    """Empty (batch, ...) arrays shaped like `params`, in their dtype or `dtype`."""
    return [
        torch.empty(batch, *p.shape[1:], dtype=dtype or p.dtype, device=p.device) for p in params
    ]


def _launch_examples(example_kernel, args, x3, n, rows, meta, outs, *, base=None, alpha=0.0,
                     beta=1.0, metrics=None):  # fmt: skip
    """example_kernel[(tasks, n)](FACTORS, ROWSUMS, *args) into fresh workspaces, then
    weight_kernel[(tasks, 4)]: outs = alpha base + beta (the sums over the examples), or
    beta times the sums when base is None; and, when `metrics` = (loss, accuracy) is
    given, each task's mean loss and accuracy into them."""
    batch, acc = x3.shape[0], accumulator_dtype(x3.dtype)
    factors = torch.empty(
        batch, WEIGHTS.value, 2, rows, meta["BLOCK_D"], dtype=acc, device=x3.device
    )
    rowsums = torch.empty(batch, n, meta["BLOCK_C"] + 2, dtype=acc, device=x3.device)
    example_kernel[(batch, n)](factors, rowsums, *args, **meta)
    read = outs if base is None else base  # not read without HAS_BASE
    loss, accuracy = (rowsums, rowsums) if metrics is None else metrics  # not written then
    weight_kernel[(batch, WEIGHTS.value)](
        factors, rowsums, *read, *outs, loss, accuracy,
        *(p.stride(0) for p in read), n, rows, outs[0].shape[-1], outs[3].shape[-2], 1.0 / n,
        alpha, beta,
        HAS_BASE=base is not None, HAS_LOSS=metrics is not None, BLOCK_R=WEIGHT_ROWS,
        BLOCK_D=meta["BLOCK_D"], BLOCK_C=meta["BLOCK_C"],
        PRECISION=dot_precision(acc, WEIGHT_ROWS), ACC=meta["ACC"], num_warps=WEIGHT_WARPS,
    )  # fmt: skip


def _grad_launch(params, x, y, lr: float, update: bool, operand, save: bool = False):
    lead, (n, t, d, c), x3, y1, (ps,) = _prepare(x, y, operand, params)
    batch, acc = x3.shape[0], accumulator_dtype(x.dtype)
    # Gradients (not steps) stay in the accumulator's float32 for half parameters: their
    # backward multiplies them by the (loss-scaled) incoming gradient, which float16's
    # subnormals would spoil first.
    outs = _outputs(ps, batch, None if update else acc)
    loss = torch.empty(batch, dtype=x.dtype, device=x.device)
    accuracy = torch.empty(batch, dtype=x.dtype, device=x.device)
    per_example = use_example_kernels(batch, n)
    save = save and not per_example
    if save:
        attention = [torch.empty(batch, n, t, dtype=acc, device=x.device) for _ in range(2)]
    else:
        attention = [loss, loss]  # not written: any tensor stands in for the pointers
    meta = _meta(n, t, d, c, x.dtype, operand, per_example)
    strides = (x3.stride(0), y1.stride(0), *(p.stride(0) for p in ps))
    if batch and per_example:
        args = (x3, y1, *ps, *strides, n, t, d, c, *_scalars(n, d))
        step = dict(base=ps, alpha=1.0, beta=-lr) if update else {}
        _launch_examples(example_grad_kernel, args, x3, n, n, meta, outs,
                         metrics=(loss, accuracy), **step)  # fmt: skip
    elif batch:
        task_grad_kernel[(batch,)](
            x3, y1, *ps, *outs, loss, accuracy, *attention, *strides, n, t, d, c,
            *_scalars(n, d), lr, UPDATE=update, SAVE=save, **meta,
        )  # fmt: skip
    outs = tuple(o.view(*lead, *o.shape[1:]) for o in outs)
    saved = tuple(a.view(*lead, n, t) for a in attention) if save else None
    return outs, loss.view(lead), accuracy.view(lead), saved


def support_step(
    params, x: torch.Tensor, y: torch.Tensor, lr: float, operand: torch.dtype | None = None
) -> tuple[torch.Tensor, ...]:
    """One SGD step on the support loss of each task: W - lr dL/dW, for each W."""
    return _grad_launch(params, x, y, lr, True, operand)[0]


def support_step_and_attention(
    params, x: torch.Tensor, y: torch.Tensor, lr: float, operand: torch.dtype | None = None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor] | None]:
    """support_step's result, and the (p, dp - delta) that support_hvp reads back (None
    where the example kernels run)."""
    steps, _, _, attention = _grad_launch(params, x, y, lr, True, operand, save=True)
    return steps, attention


def support_loss_and_grad(params, x: torch.Tensor, y: torch.Tensor, operand=None):
    """(loss (...), accuracy (...), (dL/dW for each W)) of each task."""
    grads, loss, accuracy, _ = _grad_launch(params, x, y, 0.0, False, operand)
    return loss, accuracy, grads


def _saved_attention(attention, x: torch.Tensor, x3: torch.Tensor):
    """`attention` checked against x and flattened to two contiguous (B, n, T) arrays."""
    shape, dtype = tuple(x.shape[:-1]), accumulator_dtype(x.dtype)
    for a in attention:
        if tuple(a.shape) != shape or a.dtype != dtype or a.device != x.device:
            raise ValueError(
                f"saved attention must be {dtype} of shape {shape} (x's (..., n, T)) on "
                f"{x.device}; got {a.dtype} of shape {tuple(a.shape)} on {a.device}"
            )
    return [a.reshape(x3.shape[:3]).contiguous() for a in attention]


def support_hvp(
    params,
    x: torch.Tensor,
    y: torch.Tensor,
    v,
    alpha: float,
    beta: float,
    operand=None,
    attention: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """alpha v + beta H v for each task, H the Hessian of its support loss at `params`;
    with `attention` (support_step_and_attention's at the same params, x, y and operand)
    read instead of recomputed."""
    lead, (n, t, d, c), x3, y1, (ps, vs) = _prepare(x, y, operand, params, v)
    batch = x3.shape[0]
    per_example = use_example_kernels(batch, n)
    saved = attention is not None
    if saved and per_example:
        raise ValueError(
            "saved attention is read only by the task kernels; these sizes run the example "
            "kernels, for which support_step_and_attention saves none (pass attention=None)"
        )
    rows = _saved_attention(attention, x, x3) if saved else [x3, x3]  # x3: not read
    outs = _outputs(ps, batch)
    meta = _meta(n, t, d, c, x.dtype, operand, per_example)
    strides = (x3.stride(0), y1.stride(0), *(p.stride(0) for p in ps), *(w.stride(0) for w in vs))
    if batch and per_example:
        args = (x3, y1, *ps, *vs, *strides, n, t, d, c, *_scalars(n, d))
        _launch_examples(example_hvp_kernel, args, x3, n, 2 * n, meta, outs, base=vs,
                         alpha=alpha, beta=beta)  # fmt: skip
    elif batch:
        task_hvp_kernel[(batch,)](
            x3, y1, *ps, *vs, *rows, *outs, *strides, n, t, d, c, *_scalars(n, d), alpha, beta,
            SAVED=saved, **meta,
        )  # fmt: skip
    return tuple(o.view(*lead, *o.shape[1:]) for o in outs)
