"""The fused inner step with one program per example: the same gradient and
Hessian-vector product as task_kernels.py (whose docstring derives them), for small
meta-batches, where one program per task leaves most of the GPU idle (16 tasks: 16
programs on 132 SMs). Each is two launches:

    example_grad_kernel / example_hvp_kernel   one program per (task, example): the
        example's rows of Q, U, Xbar, H, G, dH, dU, dQ (and their tangents) as
        vectors, with matrix-vector products instead of dots, and the factors of the
        weight gradients, which are sums over the examples of outer products
        (dWq = dQ^T X0 = sum_i dq_i x0_i^T)
    weight_kernel                              one program per (task, weight): those sums
        as dots over the examples, in a fixed order (deterministic), and the epilogue
        (dL/dW, W - lr dL/dW, or alpha V + beta H V)

Each example program reads the task's weights itself, so for large meta-batches the
per-task kernels are faster (launch.py picks; docs/benchmarks.md, "Tenth session").

The factors go to a float32 (float64 in the interpreter) workspace FACTORS of shape
(B, 4, 2, R, BLOCK_D): for weight w (Wq, Wk, Wv, Wc) the rows of A and B with
dW_w = A^T B = sum_r a_r b_r^T. The gradient has R = n rows (a, b) = (dq, x0),
(s q, du), (dh, xbar), (g, h); the HVP R = 2n, two products per weight:
(dq', x0) and zeros, (s q', du) and (s q, du'), (dh', xbar) and (dh, xbar'),
(g', h) and (g, h'). ROWSUMS (B, n, BLOCK_C + 2) holds g (or g') and the example's
negative log-likelihood and correctness (0 or 1): their sums over the examples are dbc
(or dbc'), and n times the loss and the accuracy (scaled once, as the task kernels do,
so that the accuracy is k / n as they compute it).

Precision and layout are task_kernels.py's: arithmetic in ACC, data, parameters and
directions rounded to OPERAND before use, W - lr dL/dW and alpha V from W and V as they
are; inputs with a task stride each (0 for shared parameters); outputs and workspaces
contiguous (B, ...) arrays.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_kernels import dot
from phase12.fused_step.operands import load_matrix, load_vector, rounded, store_matrix

WEIGHTS = tl.constexpr(4)  # Wq, Wk, Wv, Wc: gradients that are sums of outer products


@triton.jit
def _load_operand(ptr, offs_r, offs_c, R, C, OPERAND: tl.constexpr, ACC: tl.constexpr):
    """A parameter or direction block as the kernels compute with it: rounded to OPERAND.
    Loaded where it is used, and again after the passes over the positions rather than
    held in registers across them."""
    return rounded(load_matrix(ptr, offs_r, offs_c, R, C, ACC), OPERAND, ACC)


@triton.jit
def _mv(w, v):
    """W v for a (R, K) block W and a (K,) vector v: (R,)."""
    return tl.sum(w * v[None, :], 1)


@triton.jit
def _vm(v, w):
    """W^T v (the row vector v W) for a (R,) vector v and a (R, K) block W: (K,)."""
    return tl.sum(w * v[:, None], 0)


@triton.jit
def _load_positions(x_row, t0, offs_t, offs_d, T, D, OPERAND: tl.constexpr, ACC: tl.constexpr):
    """Positions t0 .. t0 + BLOCK_T of one example: (BLOCK_T, BLOCK_D), rounded to
    OPERAND, and the mask of the positions that exist (BLOCK_T,)."""
    t = t0 + offs_t
    mask = (t[:, None] < T) & (offs_d[None, :] < D)
    x = tl.load(x_row + t[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    return rounded(x, OPERAND, ACC), t < T


@triton.jit
def _attention_pass(
    x_row,
    u,
    u_t,
    offs_t,
    offs_d,
    T,
    D,
    TANGENT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """First pass over one example's positions: lse, xbar = sum_t p_t x_t and, with
    TANGENT, a = sum_t p_t s'_t x_t (s'_t = x_t . u')."""
    m = tl.full([1], float("-inf"), ACC)
    l = tl.zeros([1], ACC)
    xbar = tl.zeros([BLOCK_D], ACC)
    a = tl.zeros([BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        x, valid = _load_positions(x_row, t0, offs_t, offs_d, T, D, OPERAND, ACC)
        s = tl.where(valid, tl.sum(x * u[None, :], 1), float("-inf"))
        # Position 0 is in the first block, so m is finite from then on.
        m_new = tl.maximum(m, tl.max(s, 0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(s - m_new)  # (BLOCK_T,), 0 at missing positions
        l = l * rescale + tl.sum(e, 0)
        xbar = xbar * rescale + tl.sum(e[:, None] * x, 0)
        if TANGENT:
            s_t = tl.sum(x * u_t[None, :], 1)
            a = a * rescale + tl.sum((e * s_t)[:, None] * x, 0)
        m = m_new
    return xbar / l, m + tl.log(l), a / l


@triton.jit
def _class_gradient(h, wc, bc, y, offs_c, C, inv_n, ACC: tl.constexpr):
    """Logits z = Wc h + bc (-inf in padding classes), pi = softmax(z), the one-hot
    label and g = dL/dz = (pi - onehot) / n."""
    z = tl.where(offs_c < C, _mv(wc, h) + bc, float("-inf"))
    e = tl.exp(z - tl.max(z, 0))
    pi = e / tl.sum(e, 0)
    onehot = offs_c == y
    return z, pi, onehot, (pi - onehot.to(ACC)) * inv_n


@triton.jit
def _store_product(factors, w, row, a, offs_a, b, offs_b, ROWS, BLOCK_D: tl.constexpr):
    """Row `row` of weight w's factors A and B, a and b (a_row b_row^T is one term of
    dW_w), in one task's workspace."""
    ptr = factors + (w * 2 * ROWS + row) * BLOCK_D
    tl.store(ptr + offs_a, a.to(factors.dtype.element_ty))
    tl.store(ptr + ROWS * BLOCK_D + offs_b, b.to(factors.dtype.element_ty))


@triton.jit
def example_grad_kernel(
    FACTORS,
    ROWSUMS,  # outputs: workspaces
    X,
    Y,
    WQ,
    WK,
    WV,
    WC,
    BC,  # inputs
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per (task, example): the example's gradient factors and row sums."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    tl.static_assert(BLOCK_C <= BLOCK_D)  # g is stored in a BLOCK_D-wide factor row
    factors = FACTORS + b * (WEIGHTS * 2 * N * BLOCK_D)

    x_row = X + b * stride_x + i * T * D
    x0 = rounded(load_vector(x_row, offs_d, D, ACC), OPERAND, ACC)
    y = tl.load(Y + b * stride_y + i)
    wq = _load_operand(WQ + b * stride_wq, offs_d, offs_d, D, D, OPERAND, ACC)
    wk = _load_operand(WK + b * stride_wk, offs_d, offs_d, D, D, OPERAND, ACC)
    q = _mv(wq, x0)  # q = Wq x0
    u = _vm(q, wk) * scale  # u = s Wk^T q

    xbar, lse, _ = _attention_pass(
        x_row, u, u, offs_t, offs_d, T, D, False, BLOCK_T, BLOCK_D, OPERAND, ACC
    )

    wv = _load_operand(WV + b * stride_wv, offs_d, offs_d, D, D, OPERAND, ACC)
    wc = _load_operand(WC + b * stride_wc, offs_c, offs_d, C, D, OPERAND, ACC)
    bc = rounded(load_vector(BC + b * stride_bc, offs_c, C, ACC), OPERAND, ACC)
    h = _mv(wv, xbar)  # h = Wv xbar
    z, _, onehot, g = _class_gradient(h, wc, bc, y, offs_c, C, inv_n, ACC)
    z_max = tl.max(z, 0)
    nll = z_max + tl.log(tl.sum(tl.exp(z - z_max), 0)) - tl.sum(tl.where(onehot, z, 0.0), 0)
    correct = (tl.argmax(z, 0) == y).to(ACC)

    dh = _vm(g, wc)  # dh = Wc^T g
    dxbar = _vm(dh, wv)  # dxbar = Wv^T dh
    delta = tl.sum(dxbar * xbar, 0)

    # Second pass: du = sum_t p_t (dp_t - delta) x_t.
    du = tl.zeros([BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        x, valid = _load_positions(x_row, t0, offs_t, offs_d, T, D, OPERAND, ACC)
        p = tl.where(valid, tl.exp(tl.sum(x * u[None, :], 1) - lse), 0.0)
        dp = tl.sum(x * dxbar[None, :], 1)
        du += tl.sum((p * (dp - delta))[:, None] * x, 0)
    wk = _load_operand(WK + b * stride_wk, offs_d, offs_d, D, D, OPERAND, ACC)
    dq = _mv(wk, du) * scale  # dq = s Wk du

    _store_product(factors, 0, i, dq, offs_d, x0, offs_d, N, BLOCK_D)
    _store_product(factors, 1, i, q * scale, offs_d, du, offs_d, N, BLOCK_D)
    _store_product(factors, 2, i, dh, offs_d, xbar, offs_d, N, BLOCK_D)
    _store_product(factors, 3, i, g, offs_c, h, offs_d, N, BLOCK_D)  # g: read back as C columns
    rowsums = ROWSUMS + (b * N + i) * (BLOCK_C + 2)
    tl.store(rowsums + offs_c, g.to(ROWSUMS.dtype.element_ty))
    tl.store(rowsums + BLOCK_C, nll.to(ROWSUMS.dtype.element_ty))
    tl.store(rowsums + BLOCK_C + 1, correct.to(ROWSUMS.dtype.element_ty))


@triton.jit
def example_hvp_kernel(
    FACTORS,
    ROWSUMS,  # outputs: workspaces
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    OPERAND: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per (task, example): the factors and row sums of the example's share of H V."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    tl.static_assert(BLOCK_C <= BLOCK_D)  # g is stored in a BLOCK_D-wide factor row
    rows = 2 * N
    factors = FACTORS + b * (WEIGHTS * 2 * rows * BLOCK_D)

    x_row = X + b * stride_x + i * T * D
    x0 = rounded(load_vector(x_row, offs_d, D, ACC), OPERAND, ACC)
    y = tl.load(Y + b * stride_y + i)
    wq = _load_operand(WQ + b * stride_wq, offs_d, offs_d, D, D, OPERAND, ACC)
    wk = _load_operand(WK + b * stride_wk, offs_d, offs_d, D, D, OPERAND, ACC)
    vq = _load_operand(VQ + b * stride_vq, offs_d, offs_d, D, D, OPERAND, ACC)
    vk = _load_operand(VK + b * stride_vk, offs_d, offs_d, D, D, OPERAND, ACC)
    q = _mv(wq, x0)
    q_t = _mv(vq, x0)  # q' = Vq x0
    u = _vm(q, wk) * scale
    u_t = (_vm(q_t, wk) + _vm(q, vk)) * scale

    xbar, lse, a = _attention_pass(
        x_row, u, u_t, offs_t, offs_d, T, D, True, BLOCK_T, BLOCK_D, OPERAND, ACC
    )
    c = tl.sum(xbar * u_t, 0)  # c = sum_t p_t s'_t
    xbar_t = a - c * xbar

    wv = _load_operand(WV + b * stride_wv, offs_d, offs_d, D, D, OPERAND, ACC)
    wc = _load_operand(WC + b * stride_wc, offs_c, offs_d, C, D, OPERAND, ACC)
    bc = rounded(load_vector(BC + b * stride_bc, offs_c, C, ACC), OPERAND, ACC)
    vv = _load_operand(VV + b * stride_vv, offs_d, offs_d, D, D, OPERAND, ACC)
    vc = _load_operand(VC + b * stride_vc, offs_c, offs_d, C, D, OPERAND, ACC)
    vb = rounded(load_vector(VB + b * stride_vb, offs_c, C, ACC), OPERAND, ACC)
    h = _mv(wv, xbar)
    h_t = _mv(wv, xbar_t) + _mv(vv, xbar)
    _, pi, _, g = _class_gradient(h, wc, bc, y, offs_c, C, inv_n, ACC)
    z_t = _mv(wc, h_t) + _mv(vc, h) + vb
    g_t = pi * (z_t - tl.sum(pi * z_t, 0)) * inv_n
    dh = _vm(g, wc)
    dxbar = _vm(dh, wv)
    delta = tl.sum(dxbar * xbar, 0)
    dh_t = _vm(g_t, wc) + _vm(g, vc)
    dxbar_t = _vm(dh_t, wv) + _vm(dh, vv)
    delta_t = tl.sum(dxbar_t * xbar + dxbar * xbar_t, 0)

    du = tl.zeros([BLOCK_D], ACC)
    du_t = tl.zeros([BLOCK_D], ACC)
    for t0 in range(0, T, BLOCK_T):
        x, valid = _load_positions(x_row, t0, offs_t, offs_d, T, D, OPERAND, ACC)
        p = tl.where(valid, tl.exp(tl.sum(x * u[None, :], 1) - lse), 0.0)
        p_t = p * (tl.sum(x * u_t[None, :], 1) - c)
        dp_delta = tl.sum(x * dxbar[None, :], 1) - delta
        dp_t = tl.sum(x * dxbar_t[None, :], 1)
        du += tl.sum((p * dp_delta)[:, None] * x, 0)
        du_t += tl.sum((p_t * dp_delta + p * (dp_t - delta_t))[:, None] * x, 0)
    wk = _load_operand(WK + b * stride_wk, offs_d, offs_d, D, D, OPERAND, ACC)
    vk = _load_operand(VK + b * stride_vk, offs_d, offs_d, D, D, OPERAND, ACC)
    dq_t = (_mv(wk, du_t) + _mv(vk, du)) * scale  # dq' = s (Wk du' + Vk du)

    zero = tl.zeros([BLOCK_D], ACC)
    j = N + i  # the row of each weight's second product
    _store_product(factors, 0, i, dq_t, offs_d, x0, offs_d, rows, BLOCK_D)
    _store_product(factors, 0, j, zero, offs_d, zero, offs_d, rows, BLOCK_D)
    _store_product(factors, 1, i, q_t * scale, offs_d, du, offs_d, rows, BLOCK_D)
    _store_product(factors, 1, j, q * scale, offs_d, du_t, offs_d, rows, BLOCK_D)
    _store_product(factors, 2, i, dh_t, offs_d, xbar, offs_d, rows, BLOCK_D)
    _store_product(factors, 2, j, dh, offs_d, xbar_t, offs_d, rows, BLOCK_D)
    _store_product(factors, 3, i, g_t, offs_c, h, offs_d, rows, BLOCK_D)
    _store_product(factors, 3, j, g, offs_c, h_t, offs_d, rows, BLOCK_D)
    tl.store(ROWSUMS + (b * N + i) * (BLOCK_C + 2) + offs_c, g_t.to(ROWSUMS.dtype.element_ty))


@triton.jit
def _store_weight(
    total,
    base,
    out,
    w,
    k,
    R,
    D,
    alpha,
    beta,
    HAS_BASE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """If w == k: alpha base + beta total (or beta total) to the row-major (R, D) out."""
    if w == k:
        offs = tl.arange(0, BLOCK_D)
        result = beta * total
        if HAS_BASE:
            result += alpha * load_matrix(base, offs, offs, R, D, ACC)
        store_matrix(out, result, offs, offs, R, D)


@triton.jit
def weight_kernel(
    FACTORS,
    ROWSUMS,  # inputs: workspaces of the example kernels
    BASE_Q,
    BASE_K,
    BASE_V,
    BASE_C,
    BASE_B,  # inputs: the base the sums are added to (W or V), if HAS_BASE
    OQ,
    OK,
    OV,
    OC,
    OB,
    LOSS,
    ACCURACY,  # outputs
    stride_base_q,
    stride_base_k,
    stride_base_v,
    stride_base_c,
    stride_base_b,
    N,
    ROWS,
    D,
    C,
    inv_n,
    alpha,
    beta,
    HAS_BASE: tl.constexpr,  # out = alpha * base + beta * sum, else beta * sum
    HAS_LOSS: tl.constexpr,  # also the loss and accuracy (the gradient's row sums)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per (task, weight w): dW_w = A_w^T B_w over the ROWS workspace rows, in blocks of
    BLOCK_R rows in order; weight 3 (Wc) also sums the row sums (bc, loss, accuracy)."""
    b = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    a_cols = tl.where(w == 3, C, D)  # Wc's A factor (g) has C columns
    factors = FACTORS + (b * WEIGHTS + w) * (2 * ROWS * BLOCK_D)
    total = tl.zeros([BLOCK_D, BLOCK_D], ACC)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + offs_r
        mask = (r[:, None] < ROWS) & (offs_d[None, :] < D)
        a_mask = (r[:, None] < ROWS) & (offs_d[None, :] < a_cols)
        ptrs = factors + r[:, None] * BLOCK_D + offs_d[None, :]
        a_rows = tl.load(ptrs, mask=a_mask, other=0.0).to(ACC)
        b_rows = tl.load(ptrs + ROWS * BLOCK_D, mask=mask, other=0.0).to(ACC)
        total += dot(tl.trans(a_rows), b_rows, PRECISION, ACC)

    # Each weight has its own base and output; program w stores weight w.
    bq, bk, bv = BASE_Q + b * stride_base_q, BASE_K + b * stride_base_k, BASE_V + b * stride_base_v
    bc = BASE_C + b * stride_base_c
    _store_weight(total, bq, OQ + b * D * D, w, 0, D, D, alpha, beta, HAS_BASE, BLOCK_D, ACC)
    _store_weight(total, bk, OK + b * D * D, w, 1, D, D, alpha, beta, HAS_BASE, BLOCK_D, ACC)
    _store_weight(total, bv, OV + b * D * D, w, 2, D, D, alpha, beta, HAS_BASE, BLOCK_D, ACC)
    _store_weight(total, bc, OC + b * C * D, w, 3, C, D, alpha, beta, HAS_BASE, BLOCK_D, ACC)

    if w == 3:  # the row sums: dbc (or dbc'), and the loss and accuracy
        sums = tl.zeros([BLOCK_C], ACC)
        loss = tl.zeros([1], ACC)
        accuracy = tl.zeros([1], ACC)
        for i in range(0, N):
            row = ROWSUMS + (b * N + i) * (BLOCK_C + 2)
            sums += tl.load(row + offs_c).to(ACC)
            if HAS_LOSS:
                loss += tl.load(row + BLOCK_C + tl.arange(0, 1)).to(ACC)
                accuracy += tl.load(row + BLOCK_C + 1 + tl.arange(0, 1)).to(ACC)
        bias = beta * sums
        if HAS_BASE:
            bias += alpha * load_vector(BASE_B + b * stride_base_b, offs_c, C, ACC)
        tl.store(OB + b * C + offs_c, bias.to(OB.dtype.element_ty), mask=offs_c < C)
        if HAS_LOSS:
            tl.store(LOSS + b + tl.arange(0, 1), (loss * inv_n).to(LOSS.dtype.element_ty))
            accuracy = accuracy * inv_n
            tl.store(ACCURACY + b + tl.arange(0, 1), accuracy.to(ACCURACY.dtype.element_ty))
