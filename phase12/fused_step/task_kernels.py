"""Triton kernels for one MAML inner step of the Phase 12 model: the support-loss
gradient in one launch, and its Hessian-vector product (the inner step's backward,
second-order MAML) in another. One program per task, for large meta-batches
(example_kernels.py spreads a small one over one program per example).

The model (phase12/model.py), for one task with n examples X_i (T, D), labels y_i,
scale s = 1/sqrt(D) and parameters Wq, Wk, Wv (D, D), Wc (C, D), bc (C):

    q_i = Wq x_i0                         Q  = X0 Wq^T            (n, D)
    u_i = s Wk^T q_i                      U  = s Q Wk             scores s_it = x_it . u_i
    p_i = softmax_t(x_it . u_i)           (the attention row; k_t . q_i s = x_it . u_i)
    xbar_i = sum_t p_it x_it              h_i = Wv xbar_i = sum_t p_it v_it
    z_i = Wc h_i + bc                     L = mean_i [logsumexp(z_i) - z_i,y_i]

Keys and values are never formed: k_t . q = x_t . (Wk^T q) and sum_t p_t Wv x_t =
Wv xbar, so an example costs a few matrix-vector products plus two passes over its
T x D inputs instead of three T x D x D projections.

Gradient (the first kernel):

    G    = (softmax(Z) - onehot(y)) / n          dbc = sum_i G_i      dWc = G^T H
    dH   = G Wc          dXbar = dH Wv           dWv = dH^T Xbar
    dp_it = x_it . dxbar_i,   delta_i = sum_t p_it dp_it = dxbar_i . xbar_i
    ds_it = p_it (dp_it - delta_i)               dU_i = sum_t ds_it x_it
    dQ   = s dU Wk^T                             dWk = s Q^T dU      dWq = dQ^T X0

Hessian-vector product (the second kernel): the tangent of every line above along a
direction V = (Vq, Vk, Vv, Vc, vb) of the parameters (forward over reverse; the
Hessian is symmetric, so this is also the VJP of the gradient with cotangent V).
Primes are tangents:

    Q' = X0 Vq^T,   U' = s (Q' Wk + Q Vk),   s'_it = x_it . u'_i
    p'_it = p_it (s'_it - c_i),   c_i = sum_t p_it s'_it = xbar_i . u'_i
    xbar'_i = sum_t p'_it x_it = sum_t p_it s'_it x_it - c_i xbar_i
    H' = Xbar' Wv^T + Xbar Vv^T,  Z' = H' Wc^T + H Vc^T + vb
    G' = pi * (Z' - rowsum(pi * Z')) / n   (pi = softmax(Z))
    dH' = G' Wc + G Vc,   dXbar' = dH' Wv + dH Vv
    delta'_i = dxbar'_i . xbar_i + dxbar_i . xbar'_i,   dp'_it = x_it . dxbar'_i
    ds'_it = p'_it (dp_it - delta_i) + p_it (dp'_it - delta'_i)
    dU'_i = sum_t ds'_it x_it
    (dbc)' = sum_i G'_i   (dWc)' = G'^T H + G^T H'   (dWv)' = dH'^T Xbar + dH^T Xbar'
    (dQ)' = s (dU' Wk^T + dU Vk^T)   (dWk)' = s (Q'^T dU + Q^T dU')   (dWq)' = (dQ)'^T X0

The sums over t run over key blocks of BLOCK_T positions: the first pass keeps an
online softmax (running max m, sum l, as in flash attention) and the sums that need
p; the second rebuilds p = exp(x . u - lse) block by block. Row i < n and class c < C
are masked; a padding row has G = 0 and contributes nothing.

Precision: every tensor is read into the accumulator dtype ACC (float32, float64 in
the interpreter) and all arithmetic runs in it. OPERAND (ACC itself, or bfloat16 or
float16 under torch.autocast) is what the kernels round the data, parameters and
directions to before they compute with them: the rounding autocast applies to a
matmul's inputs. The SGD update W - lr dL/dW and the alpha V term take W and V as they
are (float32 master weights); intermediate results stay in ACC (autocast would round
each matmul's output too).

Saved attention: with SAVE, the gradient kernel also writes each example's attention
weights p_it and centred score gradient dp_it - delta_i (ds_it = p_it (dp_it - delta_i))
to P and DPC, (B, n, T) in ACC; with SAVED, the HVP kernel at the same parameters reads
them back instead of recomputing them. Its first pass then accumulates xbar from p (no
online softmax, no U: one reduction over D a position instead of two), its second reads
p and dp - delta (two reductions instead of four): second-order MAML's backward reuses
what its forward computed.

Layout: X (B, n, T, D) and y (B, n) with a task stride each; every parameter and
tangent (B, rows, cols) row-major with its own task stride, which is 0 when all tasks share
it (the meta-parameters at the first inner step), so nothing is copied per task.
Outputs are contiguous (B, ...) arrays.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_kernels import dot
from phase12.fused_step.operands import load_matrix, load_vector, rounded, store_matrix


@triton.jit
def _load_query_tokens(x_task, offs_n, offs_d, N, T, D, OPERAND: tl.constexpr, ACC: tl.constexpr):
    """X0: position 0 of every example, (BLOCK_N, BLOCK_D), rounded to OPERAND."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    x0 = tl.load(
        x_task + offs_n[:, None].to(tl.int64) * T * D + offs_d[None, :], mask=mask, other=0.0
    )
    return rounded(x0, OPERAND, ACC)


@triton.jit
def _load_block(
    x_task, t0, offs_n, offs_t, offs_d, N, T, D, OPERAND: tl.constexpr, ACC: tl.constexpr
):
    """Positions t0 .. t0 + BLOCK_T of every example: (BLOCK_N, BLOCK_T, BLOCK_D), rounded
    to OPERAND, and the mask of the positions that exist (BLOCK_T,)."""
    t = t0 + offs_t
    row = offs_n[:, None, None].to(tl.int64) * T * D  # n T D may pass 2^31
    ptrs = x_task + row + t[None, :, None] * D + offs_d[None, None, :]
    mask = (offs_n[:, None, None] < N) & (t[None, :, None] < T) & (offs_d[None, None, :] < D)
    return rounded(tl.load(ptrs, mask=mask, other=0.0), OPERAND, ACC), t < T


@triton.jit
def _position_offsets(offs_n, t, N, T):
    """Offsets of positions t of every example in a task's (n, T) slice, and their mask."""
    offsets = offs_n[:, None].to(tl.int64) * T + t[None, :]
    return offsets, (offs_n[:, None] < N) & (t[None, :] < T)


@triton.jit
def _saved_pass(
    x_task,
    p_task,
    u_t,
    offs_n,
    offs_t,
    offs_d,
    N,
    T,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """_attention_pass's xbar and a from the saved attention weights p (no softmax)."""
    xbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    a = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        x, _ = _load_block(x_task, t0, offs_n, offs_t, offs_d, N, T, D, OPERAND, ACC)
        at, mask = _position_offsets(offs_n, t0 + offs_t, N, T)
        p = tl.load(p_task + at, mask=mask, other=0.0).to(ACC)
        xbar += tl.sum(p[:, :, None] * x, 1)
        a += tl.sum((p * tl.sum(x * u_t[:, None, :], 2))[:, :, None] * x, 1)
    return xbar, a


@triton.jit
def _attention_pass(
    x_task,
    u,
    u_t,
    offs_n,
    offs_t,
    offs_d,
    N,
    T,
    D,
    TANGENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """First pass over the positions: lse_i, xbar_i = sum_t p_it x_it and, with
    TANGENT, a_i = sum_t p_it s'_it x_it (s'_it = x_it . u'_i)."""
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    l = tl.zeros([BLOCK_N], ACC)
    xbar = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    a = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        x, valid = _load_block(x_task, t0, offs_n, offs_t, offs_d, N, T, D, OPERAND, ACC)
        s = tl.where(valid[None, :], tl.sum(x * u[:, None, :], 2), float("-inf"))
        # Position 0 is in the first block, so m is finite from then on.
        m_new = tl.maximum(m, tl.max(s, 1))
        rescale = tl.exp(m - m_new)
        e = tl.exp(s - m_new[:, None])  # (BLOCK_N, BLOCK_T), 0 at missing positions
        l = l * rescale + tl.sum(e, 1)
        xbar = xbar * rescale[:, None] + tl.sum(e[:, :, None] * x, 1)
        if TANGENT:
            s_t = tl.sum(x * u_t[:, None, :], 2)
            a = a * rescale[:, None] + tl.sum((e * s_t)[:, :, None] * x, 1)
        m = m_new
    return xbar / l[:, None], m + tl.log(l), a / l[:, None]


@triton.jit
def _class_gradient(
    h, wc, bc, y, rows, offs_c, C, inv_n, PRECISION: tl.constexpr, ACC: tl.constexpr
):
    """Logits Z = H Wc^T + bc (-inf in padding classes), pi = softmax(Z), the one-hot
    labels, and G = dL/dZ = (pi - onehot) / n (zero in padding rows)."""
    z = dot(h, tl.trans(wc), PRECISION, ACC) + bc[None, :]
    z = tl.where(offs_c[None, :] < C, z, float("-inf"))
    e = tl.exp(z - tl.max(z, 1)[:, None])
    pi = e / tl.sum(e, 1)[:, None]
    onehot = offs_c[None, :] == y[:, None]
    g = tl.where(rows[:, None], (pi - onehot.to(ACC)) * inv_n, 0.0)
    return z, pi, onehot, g


@triton.jit
def _head_backward(g, wc, wv, xbar, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dH = G Wc, dXbar = dH Wv and delta_i = dxbar_i . xbar_i (the softmax backward's
    row term). Apart from _class_gradient so that the HVP kernel computes it next to its
    tangents dH', dXbar', delta'."""
    dh = dot(g, wc, PRECISION, ACC)
    dxbar = dot(dh, wv, PRECISION, ACC)
    return dh, dxbar, tl.sum(dxbar * xbar, 1)


@triton.jit
def task_grad_kernel(
    X,
    Y,
    WQ,
    WK,
    WV,
    WC,
    BC,  # inputs
    OQ,
    OK,
    OV,
    OC,
    OB,
    LOSS,
    ACCURACY,
    P,
    DPC,  # outputs (P and DPC written only with SAVE)
    stride_x,
    stride_y,
    stride_wq,
    stride_wk,
    stride_wv,
    stride_wc,
    stride_bc,
    N,
    T,
    D,
    C,
    scale,
    inv_n,
    lr,
    UPDATE: tl.constexpr,  # write W - lr dL/dW (an SGD step) instead of dL/dW
    SAVE: tl.constexpr,  # write the attention weights and centred score gradients
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per task: the support loss, accuracy and gradient (or SGD step) of the model."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    rows = offs_n < N
    x_task = X + b * stride_x
    wq_ptr, wk_ptr, wv_ptr = WQ + b * stride_wq, WK + b * stride_wk, WV + b * stride_wv
    wc_ptr, bc_ptr = WC + b * stride_wc, BC + b * stride_bc

    x0 = _load_query_tokens(x_task, offs_n, offs_d, N, T, D, OPERAND, ACC)
    y = tl.load(Y + b * stride_y + offs_n, mask=rows, other=0)
    wq = load_matrix(wq_ptr, offs_d, offs_d, D, D, ACC)  # as they are, for the update
    wk = load_matrix(wk_ptr, offs_d, offs_d, D, D, ACC)
    wq_r, wk_r = rounded(wq, OPERAND, ACC), rounded(wk, OPERAND, ACC)  # to compute with
    q = dot(x0, tl.trans(wq_r), PRECISION, ACC)  # Q = X0 Wq^T
    u = dot(q, wk_r, PRECISION, ACC) * scale  # U = s Q Wk

    xbar, lse, _ = _attention_pass(
        x_task, u, u, offs_n, offs_t, offs_d, N, T, D, False, BLOCK_N, BLOCK_T, BLOCK_D, OPERAND,
        ACC,
    )  # fmt: skip

    wv = load_matrix(wv_ptr, offs_d, offs_d, D, D, ACC)
    wc = load_matrix(wc_ptr, offs_c, offs_d, C, D, ACC)
    bc = load_vector(bc_ptr, offs_c, C, ACC)
    wv_r, wc_r = rounded(wv, OPERAND, ACC), rounded(wc, OPERAND, ACC)
    h = dot(xbar, tl.trans(wv_r), PRECISION, ACC)  # H = Xbar Wv^T
    z, _, onehot, g = _class_gradient(
        h, wc_r, rounded(bc, OPERAND, ACC), y, rows, offs_c, C, inv_n, PRECISION, ACC
    )

    z_max = tl.max(z, 1)
    nll = (
        z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), 1)) - tl.sum(tl.where(onehot, z, 0.0), 1)
    )
    tl.store(LOSS + b, (tl.sum(tl.where(rows, nll, 0.0)) * inv_n).to(LOSS.dtype.element_ty))
    correct = (tl.argmax(z, 1) == y) & rows
    tl.store(ACCURACY + b, (tl.sum(correct.to(ACC)) * inv_n).to(ACCURACY.dtype.element_ty))

    dh, dxbar, delta = _head_backward(g, wc_r, wv_r, xbar, PRECISION, ACC)
    g_wc = dot(tl.trans(g), h, PRECISION, ACC)
    g_bc = tl.sum(g, 0)
    g_wv = dot(tl.trans(dh), xbar, PRECISION, ACC)
    if UPDATE:
        g_wc = wc - lr * g_wc
        g_bc = bc - lr * g_bc
        g_wv = wv - lr * g_wv
    store_matrix(OC + b * C * D, g_wc, offs_c, offs_d, C, D)
    tl.store(OB + b * C + offs_c, g_bc.to(OB.dtype.element_ty), mask=offs_c < C)
    store_matrix(OV + b * D * D, g_wv, offs_d, offs_d, D, D)

    # Second pass: dU_i = sum_t p_it (dp_it - delta_i) x_it.
    du = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    task_offset = b * N * T  # this task's slice of P and DPC
    for t0 in range(0, T, BLOCK_T):
        x, valid = _load_block(x_task, t0, offs_n, offs_t, offs_d, N, T, D, OPERAND, ACC)
        p = tl.where(valid[None, :], tl.exp(tl.sum(x * u[:, None, :], 2) - lse[:, None]), 0.0)
        dp_centred = tl.sum(x * dxbar[:, None, :], 2) - delta[:, None]
        du += tl.sum((p * dp_centred)[:, :, None] * x, 1)
        if SAVE:
            at, mask = _position_offsets(offs_n, t0 + offs_t, N, T)
            tl.store(P + task_offset + at, p.to(P.dtype.element_ty), mask=mask)
            tl.store(DPC + task_offset + at, dp_centred.to(DPC.dtype.element_ty), mask=mask)

    dq = dot(du, tl.trans(wk_r), PRECISION, ACC) * scale  # dQ = s dU Wk^T
    g_wk = dot(tl.trans(q), du, PRECISION, ACC) * scale  # dWk = s Q^T dU
    g_wq = dot(tl.trans(dq), x0, PRECISION, ACC)  # dWq = dQ^T X0
    if UPDATE:
        g_wk = wk - lr * g_wk
        g_wq = wq - lr * g_wq
    store_matrix(OK + b * D * D, g_wk, offs_d, offs_d, D, D)
    store_matrix(OQ + b * D * D, g_wq, offs_d, offs_d, D, D)


@triton.jit
def task_hvp_kernel(
    X,
    Y,
    WQ,
    WK,
    WV,
    WC,
    BC,
    VQ,
    VK,
    VV,
    VC,
    VB,  # inputs: parameters, direction V
    P,
    DPC,  # inputs read only with SAVED: the gradient kernel's P and DPC at these parameters
    OQ,
    OK,
    OV,
    OC,
    OB,  # outputs: alpha V + beta H V
    stride_x,
    stride_y,
    stride_wq,
    stride_wk,
    stride_wv,
    stride_wc,
    stride_bc,
    stride_vq,
    stride_vk,
    stride_vv,
    stride_vc,
    stride_vb,
    N,
    T,
    D,
    C,
    scale,
    inv_n,
    alpha,
    beta,
    SAVED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per task: alpha V + beta (d^2 L / dW^2) V for the support loss L."""
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    rows = offs_n < N
    x_task = X + b * stride_x

    x0 = _load_query_tokens(x_task, offs_n, offs_d, N, T, D, OPERAND, ACC)
    y = tl.load(Y + b * stride_y + offs_n, mask=rows, other=0)
    # W is only computed with (rounded); V also enters alpha V as it is.
    wq = rounded(load_matrix(WQ + b * stride_wq, offs_d, offs_d, D, D, ACC), OPERAND, ACC)
    wk = rounded(load_matrix(WK + b * stride_wk, offs_d, offs_d, D, D, ACC), OPERAND, ACC)
    vq = load_matrix(VQ + b * stride_vq, offs_d, offs_d, D, D, ACC)
    vk = load_matrix(VK + b * stride_vk, offs_d, offs_d, D, D, ACC)
    vq_r, vk_r = rounded(vq, OPERAND, ACC), rounded(vk, OPERAND, ACC)
    q = dot(x0, tl.trans(wq), PRECISION, ACC)
    q_t = dot(x0, tl.trans(vq_r), PRECISION, ACC)  # Q' = X0 Vq^T
    u_t = (dot(q_t, wk, PRECISION, ACC) + dot(q, vk_r, PRECISION, ACC)) * scale
    task_offset = b * N * T  # this task's slice of P and DPC

    if SAVED:
        xbar, a = _saved_pass(
            x_task, P + task_offset, u_t, offs_n, offs_t, offs_d, N, T, D, BLOCK_N, BLOCK_T,
            BLOCK_D, OPERAND, ACC,
        )  # fmt: skip
    else:
        u = dot(q, wk, PRECISION, ACC) * scale
        xbar, lse, a = _attention_pass(
            x_task, u, u_t, offs_n, offs_t, offs_d, N, T, D, True, BLOCK_N, BLOCK_T, BLOCK_D,
            OPERAND, ACC,
        )  # fmt: skip
    c = tl.sum(xbar * u_t, 1)  # c_i = sum_t p_it s'_it
    xbar_t = a - c[:, None] * xbar

    wv = rounded(load_matrix(WV + b * stride_wv, offs_d, offs_d, D, D, ACC), OPERAND, ACC)
    wc = rounded(load_matrix(WC + b * stride_wc, offs_c, offs_d, C, D, ACC), OPERAND, ACC)
    bc = rounded(load_vector(BC + b * stride_bc, offs_c, C, ACC), OPERAND, ACC)
    vv = load_matrix(VV + b * stride_vv, offs_d, offs_d, D, D, ACC)
    vc = load_matrix(VC + b * stride_vc, offs_c, offs_d, C, D, ACC)
    vb = load_vector(VB + b * stride_vb, offs_c, C, ACC)
    vv_r, vc_r = rounded(vv, OPERAND, ACC), rounded(vc, OPERAND, ACC)
    h = dot(xbar, tl.trans(wv), PRECISION, ACC)
    h_t = dot(xbar_t, tl.trans(wv), PRECISION, ACC) + dot(xbar, tl.trans(vv_r), PRECISION, ACC)
    _, pi, _, g = _class_gradient(h, wc, bc, y, rows, offs_c, C, inv_n, PRECISION, ACC)
    z_t = dot(h_t, tl.trans(wc), PRECISION, ACC) + dot(h, tl.trans(vc_r), PRECISION, ACC)
    z_t += rounded(vb, OPERAND, ACC)[None, :]
    g_t = tl.where(rows[:, None], pi * (z_t - tl.sum(pi * z_t, 1)[:, None]) * inv_n, 0.0)
    dh, dxbar, delta = _head_backward(g, wc, wv, xbar, PRECISION, ACC)
    dh_t = dot(g_t, wc, PRECISION, ACC) + dot(g, vc_r, PRECISION, ACC)
    dxbar_t = dot(dh_t, wv, PRECISION, ACC) + dot(dh, vv_r, PRECISION, ACC)
    delta_t = tl.sum(dxbar_t * xbar + dxbar * xbar_t, 1)

    h_wc = dot(tl.trans(g_t), h, PRECISION, ACC) + dot(tl.trans(g), h_t, PRECISION, ACC)
    h_bc = tl.sum(g_t, 0)
    h_wv = dot(tl.trans(dh_t), xbar, PRECISION, ACC) + dot(tl.trans(dh), xbar_t, PRECISION, ACC)
    store_matrix(OC + b * C * D, alpha * vc + beta * h_wc, offs_c, offs_d, C, D)
    tl.store(
        OB + b * C + offs_c, (alpha * vb + beta * h_bc).to(OB.dtype.element_ty), mask=offs_c < C
    )
    store_matrix(OV + b * D * D, alpha * vv + beta * h_wv, offs_d, offs_d, D, D)

    du = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    du_t = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        x, valid = _load_block(x_task, t0, offs_n, offs_t, offs_d, N, T, D, OPERAND, ACC)
        if SAVED:
            at, mask = _position_offsets(offs_n, t0 + offs_t, N, T)
            p = tl.load(P + task_offset + at, mask=mask, other=0.0).to(ACC)
            dp_centred = tl.load(DPC + task_offset + at, mask=mask, other=0.0).to(ACC)
        else:
            p = tl.where(valid[None, :], tl.exp(tl.sum(x * u[:, None, :], 2) - lse[:, None]), 0.0)
            dp_centred = tl.sum(x * dxbar[:, None, :], 2) - delta[:, None]
        p_t = p * (tl.sum(x * u_t[:, None, :], 2) - c[:, None])
        dp_t = tl.sum(x * dxbar_t[:, None, :], 2)
        du += tl.sum((p * dp_centred)[:, :, None] * x, 1)
        du_t += tl.sum((p_t * dp_centred + p * (dp_t - delta_t[:, None]))[:, :, None] * x, 1)

    dq_t = (
        dot(du_t, tl.trans(wk), PRECISION, ACC) + dot(du, tl.trans(vk_r), PRECISION, ACC)
    ) * scale
    h_wk = (dot(tl.trans(q_t), du, PRECISION, ACC) + dot(tl.trans(q), du_t, PRECISION, ACC)) * scale
    h_wq = dot(tl.trans(dq_t), x0, PRECISION, ACC)
    store_matrix(OK + b * D * D, alpha * vk + beta * h_wk, offs_d, offs_d, D, D)
    store_matrix(OQ + b * D * D, alpha * vq + beta * h_wq, offs_d, offs_d, D, D)
