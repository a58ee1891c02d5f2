"""Flash-style Triton kernels for attention: forward, backward and double backward.

The math (checked in float64) is in docs/attention-double-backward.md; the names
below follow it. One (batch*head) slice, scale s:

    S = s Q K^T,  P = softmax_rows(S) = exp(S - LSE),  O = P V
    backward:         dP = dO V^T,  Delta = rowsum(dO * O),  dS = P * (dP - Delta)
                      dV = P^T dO,  dQ = s dS K,  dK = s dS^T Q
    double backward:  W = s (uQ K^T + Q uK^T),  R = dO uV^T,  rho_W = rowsum(P * W)
                      G_dP = P * (W - rho_W)
                      G_P  = R + (dP - Delta) * W - rho_W * dP,  rho_G = rowsum(P * G_P)
                      G_S  = P * (G_P - rho_G)
                      gQ = s G_S K + s dS uK     gdO = G_dP V + P uV     (row side)
                      gK = s G_S^T Q + s dS^T uQ gV  = G_dP^T dO          (column side)

The column-side gradients (dK, dV; gK, gV) are computed by column-parallel kernels, one
program per key tile. The row-side ones (dQ; gQ, gdO) are sums over key tiles: either a
row-parallel pass computes them (deterministic: each row's sum in a fixed order), or,
with ATOMIC_ROWS, the column-parallel kernel, which already holds every tile they need,
adds its part into a zeroed float32 (float64) accumulator with atomics: one pass over
the N x M tiles fewer, in an order that varies from run to run (so do the last bits of
the sums). The launchers' tile table chooses per kernel family, operands and D.

Nothing of size N x M is ever written to memory: every N x M tile is rebuilt from
Q, K (and V, dO, uQ, uK, uV) and the per-row statistics LSE, Delta, rho_W, rho_G.

Two savings per tile element, as in Triton's fused-attention tutorial: exponents are base
2 in float32, with log2(e) folded into the scale (_log2e), and only the tiles that hold a
masked key (the partial last key tile; causal, the tiles across the diagonal) apply the
key mask: each kernel walks its tiles in two loops, with and without it (MASK). The
backward passes need no mask for padding rows: their LSE loads as +inf, so their P is 0
(the forward computes those rows and does not store them).

Layout: every tensor is a contiguous (BH, rows, cols) array (the launchers make it
so). Programs are numbered along one grid axis, tile-major within a (batch*head)
slice, so neighbouring programs share K/V in L2 and BH is not limited to 65535.

Causal masking is top-left aligned, as in torch's scaled_dot_product_attention:
query i sees keys j <= i (for any N, M).

One query per example (N = 1, the Phase 12 model) has its own three kernels at the end
of the file: tl.dot needs at least 16 rows, so a tiled kernel would compute 16 rows to
keep one. The one-query kernels give each example one program that walks its keys and
writes every product as a broadcast and a sum; the row statistics are scalars in
registers, so forward, backward and double backward are one launch each, with no
separate Delta computation.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------
# Small building blocks shared by every kernel
# ---------------------------------------------------------------------------


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """tl.dot with an explicit input precision and accumulator dtype (also used by the
    engine's fused inner-step kernels)."""
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _program_tile(n, BLOCK: tl.constexpr):
    """(batch*head index, first row of this program's tile) for a 1-D grid."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(n, BLOCK)
    return pid // tiles, (pid % tiles) * BLOCK


@triton.jit
def _load(ptr, bh, offs_r, offs_c, n_r, n_c):
    """Tile [offs_r, offs_c] of slice bh of a contiguous (BH, n_r, n_c) array; zeros outside."""
    return _load_rows(ptr + bh.to(tl.int64) * n_r * n_c, offs_r, offs_c, n_r, n_c, n_c)


@triton.jit
def _load_strided(ptr, bh, offs_r, offs_c, n_r, n_c, stride_bh, stride_r):
    """Tile [offs_r, offs_c] of slice bh of a (BH, n_r, n_c) array whose columns are
    adjacent, with the given slice and row strides (in elements); zeros outside."""
    return _load_rows(ptr + bh.to(tl.int64) * stride_bh, offs_r, offs_c, n_r, n_c, stride_r)


@triton.jit
def _load_rows(base, offs_r, offs_c, n_r, n_c, stride_r):
    """Tile [offs_r, offs_c] of the (n_r, n_c) slice at `base`, rows `stride_r` apart."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :], mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, bh, offs_r, offs_c, n_r, n_c):
    base = ptr + bh.to(tl.int64) * n_r * n_c
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.store(base + offs_r[:, None] * n_c + offs_c[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate(ptr, value, bh, offs_r, offs_c, n_r, n_c):
    """Atomically add a tile into slice bh of a contiguous (BH, n_r, n_c) accumulator."""
    base = ptr + bh.to(tl.int64) * n_r * n_c
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tl.atomic_add(base + offs_r[:, None] * n_c + offs_c[None, :], value, mask=mask, sem="relaxed")


@triton.jit
def _load_row(ptr, bh, offs, n):
    return tl.load(ptr + bh.to(tl.int64) * n + offs, mask=offs < n, other=0.0)


@triton.jit
def _store_row(ptr, value, bh, offs, n):
    tl.store(ptr + bh.to(tl.int64) * n + offs, value, mask=offs < n)


@triton.jit
def _scale(scale_hi, scale_lo, ACC: tl.constexpr):
    """The softmax scale in the accumulator dtype, from the float32 pair the launchers
    split it into (Triton passes Python floats as float32: a float64 kernel would
    otherwise compute with a rounded scale)."""
    return tl.full([], scale_hi, ACC) + tl.full([], scale_lo, ACC)


@triton.jit
def _log2e(ACC: tl.constexpr):
    """Exponent units per natural-log unit: log2(e) in float32, where an exponential is
    then one ex2 (tl.exp multiplies by log2(e) per element itself); 1 in float64, which
    has no fast ex2, so its exponents stay those of the float64 reference."""
    if ACC == tl.float64:
        return tl.full([], 1.0, ACC)
    return tl.full([], 1.4426950408889634, ACC)


@triton.jit
def _exp(x, ACC: tl.constexpr):
    """e^(x / _log2e(ACC)): 2^x in float32, e^x in float64."""
    if ACC == tl.float64:
        return tl.exp(x)
    return tl.exp2(x)


@triton.jit
def _load_lse(ptr, bh, offs, n, ACC: tl.constexpr):
    """LSE of rows offs in exponent units (times _log2e); +inf past n, so that P = 0 there.

    LSE stays in natural units in memory, as the one-query kernels and the
    frozen-statistics formula (kernels.fused) read it; the conversion back costs the
    float32 backward passes a rounding of the exponent (docs/benchmarks.md)."""
    lse = tl.load(ptr + bh.to(tl.int64) * n + offs, mask=offs < n, other=float("inf"))
    return lse * _log2e(ACC)


@triton.jit
def _key_mask(offs_n, offs_m, M, CAUSAL: tl.constexpr):
    mask = offs_m[None, :] < M
    if CAUSAL:
        mask = mask & (offs_m[None, :] <= offs_n[:, None])
    return mask


@triton.jit
def _key_tiles(start_n, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(unmasked_end, key_end) for the query tile at start_n: keys [0, unmasked_end) are
    whole tiles every row of it sees (no mask); [unmasked_end, key_end) need the mask;
    keys from key_end on are hidden from every row."""
    unmasked_end = (M // BLOCK_M) * BLOCK_M
    key_end = M
    if CAUSAL:  # query i sees keys j <= i
        # a key tile needs no mask iff its last key, start_m + BLOCK_M - 1, is <= start_n
        unmasked_end = tl.minimum(unmasked_end, ((start_n + 1) // BLOCK_M) * BLOCK_M)
        key_end = tl.minimum(M, start_n + BLOCK_N)
    return unmasked_end, key_end


@triton.jit
def _query_tiles(start_m, N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(query_start, masked_end) for the key tile at start_m: query tiles before
    query_start see none of its keys; [query_start, masked_end) need the mask (all of
    them if this key tile is the partial last one; causal, those across its diagonal);
    [masked_end, N) do not."""
    query_start = 0
    masked_end = 0
    if CAUSAL:  # rows above this key tile's diagonal see none of its keys
        query_start = (start_m // BLOCK_N) * BLOCK_N
        # the first query tile whose first row sees this tile's last key, start_m + BLOCK_M - 1
        masked_end = tl.minimum(tl.cdiv(start_m + BLOCK_M - 1, BLOCK_N) * BLOCK_N, N)
    masked_end = tl.where(start_m + BLOCK_M > M, N, masked_end)
    return query_start, masked_end


@triton.jit
def _scores(q, k, offs_n, offs_m, M, qk_scale,
            CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, MASK: tl.constexpr):
    """S tile in exponent units (qk_scale = s * _log2e); with MASK, -inf at masked keys
    (padding; causal, j > i). Tiles without any (_key_tiles, _query_tiles) skip it."""
    s = dot(q, tl.trans(k), PRECISION, ACC) * qk_scale
    if MASK:
        s = tl.where(_key_mask(offs_n, offs_m, M, CAUSAL), s, float("-inf"))
    return s


@triton.jit
def _probs(q, k, lse, offs_n, offs_m, M, qk_scale,
           CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, MASK: tl.constexpr):
    """P tile = exp(S - LSE), lse in exponent units (_load_lse: +inf on padding rows,
    whose P is then 0); P = 0 at masked keys."""
    s = _scores(q, k, offs_n, offs_m, M, qk_scale, CAUSAL, PRECISION, ACC, MASK=MASK)
    return _exp(s - lse[:, None], ACC)


@triton.jit
def _second_order_tile(q, k, v, do, uq, uk, uv, lse, offs_n, offs_m, M, scale, qk_scale,
                       CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, MASK: tl.constexpr):
    """P, dP, W and R for one (query tile, key tile) pair of the double backward."""
    p = _probs(q, k, lse, offs_n, offs_m, M, qk_scale, CAUSAL, PRECISION, ACC, MASK=MASK)
    dp = dot(do, tl.trans(v), PRECISION, ACC)
    w = (dot(uq, tl.trans(k), PRECISION, ACC) + dot(q, tl.trans(uk), PRECISION, ACC)) * scale
    r = dot(do, tl.trans(uv), PRECISION, ACC)
    return p, dp, w, r


@triton.jit
def _second_order_grads(p, dp, w, r, delta, rho_w, rho_g, SCORE: tl.constexpr, VALUE: tl.constexpr):
    """dS, G_dP and G_S of one tile, from P, dP, W, R and the row statistics; G_S keeps
    the score part ((dP - Delta) W - rho_W dP) if SCORE, the value part (R) if VALUE.
    rho_G is the row sum of P times the kept parts (zero with frozen softmax statistics)."""
    ds = p * (dp - delta[:, None])
    g_dp = p * (w - rho_w[:, None])
    g_p = -rho_g[:, None] + tl.zeros_like(p)
    if VALUE:
        g_p += r
    if SCORE:
        g_p += (dp - delta[:, None]) * w - rho_w[:, None] * dp
    return ds, g_dp, p * g_p


@triton.jit
def _add_row_side(gq, gdo, p, ds, g_dp, g_s, k, v, uk, uv,
                  SCORE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """gQ / s += G_S K (+ dS uK if SCORE) and gdO += G_dP V + P uV, one key tile's parts."""
    gq += dot(g_s.to(k.dtype), k, PRECISION, ACC)
    if SCORE:
        gq += dot(ds.to(uk.dtype), uk, PRECISION, ACC)
    gdo += dot(g_dp.to(v.dtype), v, PRECISION, ACC) + dot(p.to(uv.dtype), uv, PRECISION, ACC)
    return gq, gdo


# ---------------------------------------------------------------------------
# Forward: O and LSE, online softmax over key tiles (row-parallel)
# ---------------------------------------------------------------------------


@triton.jit
def _fwd_tile(m_i, l_i, acc, q, K, V, bh, offs_n, start_m, offs_d, offs_dv, M, D, DV, qk_scale,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
              PRECISION: tl.constexpr, ACC: tl.constexpr, MASK: tl.constexpr):
    """The online-softmax update of (running max, running sum, unnormalised P V) by one key tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k = _load(K, bh, offs_m, offs_d, M, D)
    v = _load(V, bh, offs_m, offs_dv, M, DV)
    s = _scores(q, k, offs_n, offs_m, M, qk_scale, CAUSAL, PRECISION, ACC, MASK=MASK)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = _exp(m_i - m_new, ACC)
    p = _exp(s - m_new[:, None], ACC)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, ACC)
    return m_new, l_i, acc


@triton.jit
def attention_fwd_kernel(Q, K, V, O, LSE, N, M, D, DV, scale_hi, scale_lo,
                         CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         PRECISION: tl.constexpr, ACC: tl.constexpr):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, start_n = _program_tile(N, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load(Q, bh, offs_n, offs_d, N, D)
    qk_scale = scale * _log2e(ACC)

    m_i = tl.full([BLOCK_N], float("-inf"), ACC)  # running row max of S (exponent units)
    l_i = tl.zeros([BLOCK_N], ACC)                # running sum of _exp(S - m_i)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], ACC)      # running (unnormalised) P V
    # The first tile makes m_i finite, so exp(m_i - m_new) never sees -inf - -inf: an
    # unmasked tile has no masked key, and key 0 is visible to every row (also causal).
    unmasked_end, key_end = _key_tiles(start_n, M, BLOCK_N, BLOCK_M, CAUSAL)
    for start_m in range(0, unmasked_end, BLOCK_M):
        m_i, l_i, acc = _fwd_tile(m_i, l_i, acc, q, K, V, bh, offs_n, start_m, offs_d, offs_dv,
                                  M, D, DV, qk_scale, CAUSAL, BLOCK_M, PRECISION, ACC, MASK=False)
    for start_m in range(unmasked_end, key_end, BLOCK_M):
        m_i, l_i, acc = _fwd_tile(m_i, l_i, acc, q, K, V, bh, offs_n, start_m, offs_d, offs_dv,
                                  M, D, DV, qk_scale, CAUSAL, BLOCK_M, PRECISION, ACC, MASK=True)

    _store(O, acc / l_i[:, None], bh, offs_n, offs_dv, N, DV)
    _store_row(LSE, m_i / _log2e(ACC) + tl.log(l_i), bh, offs_n, N)


# ---------------------------------------------------------------------------
# Backward: dK, dV (column-parallel) and dQ (row-parallel, or summed by atomics)
# ---------------------------------------------------------------------------


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, bh, start_n, offs_m, offs_d, offs_dv,
               N, M, D, DV, scale, qk_scale,
               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr, ATOMIC_ROWS: tl.constexpr, MASK: tl.constexpr):
    """dK / s += dS^T Q and dV += P^T dO over one query tile; with ATOMIC_ROWS, DQ += s dS K."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    q = _load(Q, bh, offs_n, offs_d, N, D)
    do = _load(DO, bh, offs_n, offs_dv, N, DV)
    lse = _load_lse(LSE, bh, offs_n, N, ACC)
    delta = _load_row(DELTA, bh, offs_n, N)
    p = _probs(q, k, lse, offs_n, offs_m, M, qk_scale, CAUSAL, PRECISION, ACC, MASK=MASK)
    dp = dot(do, tl.trans(v), PRECISION, ACC)
    ds = p * (dp - delta[:, None])
    dv += dot(tl.trans(p).to(do.dtype), do, PRECISION, ACC)
    dk += dot(tl.trans(ds).to(q.dtype), q, PRECISION, ACC)
    if ATOMIC_ROWS:
        _accumulate(DQ, dot(ds.to(k.dtype), k, PRECISION, ACC) * scale, bh, offs_n, offs_d, N, D)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DVo, DQ, N, M, D, DV, scale_hi, scale_lo,
                              CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              PRECISION: tl.constexpr, ACC: tl.constexpr, ATOMIC_ROWS: tl.constexpr):
    """dK and dV of one key tile; with ATOMIC_ROWS also this key tile's part of dQ, added
    into the zeroed accumulator DQ (otherwise DQ is not touched)."""
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, start_m = _program_tile(M, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load(K, bh, offs_m, offs_d, M, D)
    v = _load(V, bh, offs_m, offs_dv, M, DV)
    qk_scale = scale * _log2e(ACC)

    dk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    query_start, masked_end = _query_tiles(start_m, N, M, BLOCK_N, BLOCK_M, CAUSAL)
    for start_n in range(query_start, masked_end, BLOCK_N):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, bh, start_n, offs_m, offs_d, offs_dv,
                            N, M, D, DV, scale, qk_scale, CAUSAL, BLOCK_N, PRECISION, ACC, ATOMIC_ROWS, MASK=True)
    for start_n in range(masked_end, N, BLOCK_N):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, bh, start_n, offs_m, offs_d, offs_dv,
                            N, M, D, DV, scale, qk_scale, CAUSAL, BLOCK_N, PRECISION, ACC, ATOMIC_ROWS, MASK=False)
    _store(DK, dk * scale, bh, offs_m, offs_d, M, D)
    _store(DVo, dv, bh, offs_m, offs_dv, M, DV)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, bh, offs_n, start_m, offs_d, offs_dv, M, D, DV, qk_scale,
             CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
             PRECISION: tl.constexpr, ACC: tl.constexpr, MASK: tl.constexpr):
    """dQ / s += dS K over one key tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k = _load(K, bh, offs_m, offs_d, M, D)
    v = _load(V, bh, offs_m, offs_dv, M, DV)
    p = _probs(q, k, lse, offs_n, offs_m, M, qk_scale, CAUSAL, PRECISION, ACC, MASK=MASK)
    dp = dot(do, tl.trans(v), PRECISION, ACC)
    ds = p * (dp - delta[:, None])
    return dq + dot(ds.to(k.dtype), k, PRECISION, ACC)


@triton.jit
def attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, N, M, D, DV, scale_hi, scale_lo,
                            CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                            PRECISION: tl.constexpr, ACC: tl.constexpr):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, start_n = _program_tile(N, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load(Q, bh, offs_n, offs_d, N, D)
    do = _load(DO, bh, offs_n, offs_dv, N, DV)
    lse = _load_lse(LSE, bh, offs_n, N, ACC)
    delta = _load_row(DELTA, bh, offs_n, N)
    qk_scale = scale * _log2e(ACC)

    dq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    unmasked_end, key_end = _key_tiles(start_n, M, BLOCK_N, BLOCK_M, CAUSAL)
    for start_m in range(0, unmasked_end, BLOCK_M):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, bh, offs_n, start_m, offs_d, offs_dv, M, D, DV,
                      qk_scale, CAUSAL, BLOCK_M, PRECISION, ACC, MASK=False)
    for start_m in range(unmasked_end, key_end, BLOCK_M):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, bh, offs_n, start_m, offs_d, offs_dv, M, D, DV,
                      qk_scale, CAUSAL, BLOCK_M, PRECISION, ACC, MASK=True)
    _store(DQ, dq * scale, bh, offs_n, offs_d, N, D)


# ---------------------------------------------------------------------------
# Double backward: row statistics + gQ, gdO (row-parallel), then gK, gV (column-parallel);
# or row statistics alone, then gK, gV with gQ, gdO summed by atomics (ATOMIC_ROWS)
# ---------------------------------------------------------------------------


@triton.jit
def _key_side(K, V, UK, UV, bh, offs_m, offs_d, offs_dv, M, D, DV):
    """k, v, uk, uv of one key tile."""
    k = _load(K, bh, offs_m, offs_d, M, D)
    v = _load(V, bh, offs_m, offs_dv, M, DV)
    uk = _load(UK, bh, offs_m, offs_d, M, D)
    uv = _load(UV, bh, offs_m, offs_dv, M, DV)
    return k, v, uk, uv


@triton.jit
def _row_stats_tile(rho_w, rho_g, q, do, uq, lse, delta, K, V, UK, UV, bh, offs_n, start_m, offs_d,
                    offs_dv, M, D, DV, scale, qk_scale,
                    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    PRECISION: tl.constexpr, ACC: tl.constexpr, SCORE: tl.constexpr, VALUE: tl.constexpr, MASK: tl.constexpr):
    """rho_W += rowsum(P W) and rho_G += rowsum(P R) (if VALUE) + rowsum(P (dP - Delta) W)
    (if SCORE) over one key tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k, v, uk, uv = _key_side(K, V, UK, UV, bh, offs_m, offs_d, offs_dv, M, D, DV)
    p, dp, w, r = _second_order_tile(q, k, v, do, uq, uk, uv, lse, offs_n, offs_m, M, scale, qk_scale,
                                     CAUSAL, PRECISION, ACC, MASK=MASK)
    rho_w += tl.sum(p * w, 1)
    if VALUE:
        rho_g += tl.sum(p * r, 1)
    if SCORE:
        rho_g += tl.sum(p * (dp - delta[:, None]) * w, 1)
    return rho_w, rho_g


@triton.jit
def _row_grads_tile(gq, gdo, q, do, uq, lse, delta, rho_w, rho_g, K, V, UK, UV, bh, offs_n, start_m,
                    offs_d, offs_dv, M, D, DV, scale, qk_scale,
                    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    PRECISION: tl.constexpr, ACC: tl.constexpr, SCORE: tl.constexpr, VALUE: tl.constexpr, MASK: tl.constexpr):
    """gQ / s and gdO over one key tile (_add_row_side)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k, v, uk, uv = _key_side(K, V, UK, UV, bh, offs_m, offs_d, offs_dv, M, D, DV)
    p, dp, w, r = _second_order_tile(q, k, v, do, uq, uk, uv, lse, offs_n, offs_m, M, scale, qk_scale,
                                     CAUSAL, PRECISION, ACC, MASK=MASK)
    ds, g_dp, g_s = _second_order_grads(p, dp, w, r, delta, rho_w, rho_g, SCORE, VALUE)
    return _add_row_side(gq, gdo, p, ds, g_dp, g_s, k, v, uk, uv, SCORE, PRECISION, ACC)


@triton.jit
def attention_dbwd_rows_kernel(Q, K, V, DO, UQ, UK, UV, LSE, DELTA, GQ, GDO, RHO_W, RHO_G,
                               N, M, D, DV, scale_hi, scale_lo,
                               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                               PRECISION: tl.constexpr, ACC: tl.constexpr,
                               SCORE: tl.constexpr, VALUE: tl.constexpr, FROZEN_STATS: tl.constexpr,
                               ATOMIC_ROWS: tl.constexpr):
    """rho_W, rho_G and (unless ATOMIC_ROWS: the column kernel sums them) gQ, gdO of one
    query tile."""
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, start_n = _program_tile(N, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load(Q, bh, offs_n, offs_d, N, D)
    uq = _load(UQ, bh, offs_n, offs_d, N, D)
    do = _load(DO, bh, offs_n, offs_dv, N, DV)
    lse = _load_lse(LSE, bh, offs_n, N, ACC)
    delta = _load_row(DELTA, bh, offs_n, N)
    qk_scale = scale * _log2e(ACC)
    unmasked_end, key_end = _key_tiles(start_n, M, BLOCK_N, BLOCK_M, CAUSAL)

    # Pass 1 over keys: rho_W = rowsum(P W) and
    # rho_G = rowsum(P R) + rowsum(P (dP - Delta) W) - rho_W Delta.
    rho_w = tl.zeros([BLOCK_N], ACC)
    rho_g = tl.zeros([BLOCK_N], ACC)
    for start_m in range(0, unmasked_end, BLOCK_M):
        rho_w, rho_g = _row_stats_tile(rho_w, rho_g, q, do, uq, lse, delta, K, V, UK, UV, bh, offs_n,
                                       start_m, offs_d, offs_dv, M, D, DV, scale, qk_scale,
                                       CAUSAL, BLOCK_M, PRECISION, ACC, SCORE, VALUE, MASK=False)
    for start_m in range(unmasked_end, key_end, BLOCK_M):
        rho_w, rho_g = _row_stats_tile(rho_w, rho_g, q, do, uq, lse, delta, K, V, UK, UV, bh, offs_n,
                                       start_m, offs_d, offs_dv, M, D, DV, scale, qk_scale,
                                       CAUSAL, BLOCK_M, PRECISION, ACC, SCORE, VALUE, MASK=True)
    if SCORE:
        rho_g -= rho_w * delta
    if FROZEN_STATS:  # the log-sum-exp is a constant: no rho_G term
        rho_g = tl.zeros_like(rho_g)
    _store_row(RHO_W, rho_w, bh, offs_n, N)
    _store_row(RHO_G, rho_g, bh, offs_n, N)
    if not ATOMIC_ROWS:  # Pass 2 over keys: gQ = s G_S K + s dS uK and gdO = G_dP V + P uV.
        gq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        gdo = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
        for start_m in range(0, unmasked_end, BLOCK_M):
            gq, gdo = _row_grads_tile(gq, gdo, q, do, uq, lse, delta, rho_w, rho_g, K, V, UK, UV, bh,
                                      offs_n, start_m, offs_d, offs_dv, M, D, DV, scale, qk_scale,
                                      CAUSAL, BLOCK_M, PRECISION, ACC, SCORE, VALUE, MASK=False)
        for start_m in range(unmasked_end, key_end, BLOCK_M):
            gq, gdo = _row_grads_tile(gq, gdo, q, do, uq, lse, delta, rho_w, rho_g, K, V, UK, UV, bh,
                                      offs_n, start_m, offs_d, offs_dv, M, D, DV, scale, qk_scale,
                                      CAUSAL, BLOCK_M, PRECISION, ACC, SCORE, VALUE, MASK=True)
        _store(GQ, gq * scale, bh, offs_n, offs_d, N, D)
        _store(GDO, gdo, bh, offs_n, offs_dv, N, DV)


@triton.jit
def _col_grads_tile(gk, gv, k, v, uk, uv, Q, DO, UQ, LSE, DELTA, RHO_W, RHO_G, GQ, GDO, bh, start_n,
                    offs_m, offs_d, offs_dv, N, M, D, DV, scale, qk_scale,
                    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                    ACC: tl.constexpr, SCORE: tl.constexpr, VALUE: tl.constexpr, ATOMIC_ROWS: tl.constexpr, MASK: tl.constexpr):
    """gK / s += G_S^T Q (+ dS^T uQ if SCORE) and gV += G_dP^T dO (if VALUE) over one query
    tile; with ATOMIC_ROWS, GQ and GDO += this tile pair's parts of gQ and gdO."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    q = _load(Q, bh, offs_n, offs_d, N, D)
    uq = _load(UQ, bh, offs_n, offs_d, N, D)
    do = _load(DO, bh, offs_n, offs_dv, N, DV)
    lse = _load_lse(LSE, bh, offs_n, N, ACC)
    delta = _load_row(DELTA, bh, offs_n, N)
    rho_w = _load_row(RHO_W, bh, offs_n, N)
    rho_g = _load_row(RHO_G, bh, offs_n, N)
    p, dp, w, r = _second_order_tile(q, k, v, do, uq, uk, uv, lse, offs_n, offs_m, M, scale, qk_scale,
                                     CAUSAL, PRECISION, ACC, MASK=MASK)
    ds, g_dp, g_s = _second_order_grads(p, dp, w, r, delta, rho_w, rho_g, SCORE, VALUE)
    gk += dot(tl.trans(g_s).to(q.dtype), q, PRECISION, ACC)
    if SCORE:
        gk += dot(tl.trans(ds).to(uq.dtype), uq, PRECISION, ACC)
    if VALUE:
        gv += dot(tl.trans(g_dp).to(do.dtype), do, PRECISION, ACC)
    if ATOMIC_ROWS:
        gq, gdo = _add_row_side(tl.zeros([BLOCK_N, BLOCK_D], ACC), tl.zeros([BLOCK_N, BLOCK_DV], ACC),
                                p, ds, g_dp, g_s, k, v, uk, uv, SCORE, PRECISION, ACC)
        _accumulate(GQ, gq * scale, bh, offs_n, offs_d, N, D)
        _accumulate(GDO, gdo, bh, offs_n, offs_dv, N, DV)
    return gk, gv


@triton.jit
def attention_dbwd_cols_kernel(Q, K, V, DO, UQ, UK, UV, LSE, DELTA, RHO_W, RHO_G, GK, GV, GQ, GDO,
                               N, M, D, DV, scale_hi, scale_lo,
                               CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                               PRECISION: tl.constexpr, ACC: tl.constexpr,
                               SCORE: tl.constexpr, VALUE: tl.constexpr,
                               ATOMIC_ROWS: tl.constexpr):
    """gK and gV of one key tile; with ATOMIC_ROWS also this key tile's parts of gQ and gdO,
    added into the zeroed accumulators GQ and GDO (otherwise they are not touched)."""
    scale = _scale(scale_hi, scale_lo, ACC)
    bh, start_m = _program_tile(M, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v, uk, uv = _key_side(K, V, UK, UV, bh, offs_m, offs_d, offs_dv, M, D, DV)
    qk_scale = scale * _log2e(ACC)

    gk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    gv = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    query_start, masked_end = _query_tiles(start_m, N, M, BLOCK_N, BLOCK_M, CAUSAL)
    for start_n in range(query_start, masked_end, BLOCK_N):
        gk, gv = _col_grads_tile(gk, gv, k, v, uk, uv, Q, DO, UQ, LSE, DELTA, RHO_W, RHO_G, GQ, GDO, bh,
                                 start_n, offs_m, offs_d, offs_dv, N, M, D, DV, scale, qk_scale,
                                 CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, ACC, SCORE, VALUE, ATOMIC_ROWS,
                                 MASK=True)
    for start_n in range(masked_end, N, BLOCK_N):
        gk, gv = _col_grads_tile(gk, gv, k, v, uk, uv, Q, DO, UQ, LSE, DELTA, RHO_W, RHO_G, GQ, GDO, bh,
                                 start_n, offs_m, offs_d, offs_dv, N, M, D, DV, scale, qk_scale,
                                 CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, ACC, SCORE, VALUE, ATOMIC_ROWS,
                                 MASK=False)
    _store(GK, gk * scale, bh, offs_m, offs_d, M, D)
    _store(GV, gv, bh, offs_m, offs_dv, M, DV)


# ---------------------------------------------------------------------------
# One query per example (N = 1): one program per (batch*head) slice, keys in blocks
# ---------------------------------------------------------------------------
# With one query, the N x M tiles above are single rows: S, P, dP, W, R are vectors over
# a block of keys, q-side operands are vectors over D, and every matrix product is a
# broadcast multiply and a sum. A program walks its keys in BLOCK_M blocks; the row
# statistics (LSE, Delta, rho_W, rho_G) are scalars it keeps in registers. Causal
# (top-left aligned): the query sees key 0 only. K and V are read through their slice and
# row strides (SK, SV: a pair each), so views such as the halves of one fused K|V
# projection need no copy.


@triton.jit
def _row_scores(q, k, offs_m, key_end, scale):
    """s_j = scale q . k_j for a block of keys (BLOCK_M,); -inf from key_end on."""
    s = tl.sum(q[None, :] * k, 1) * scale
    return tl.where(offs_m < key_end, s, float("-inf"))


@triton.jit
def _row_block(q, do, uq, K, V, UK, UV, bh, lse, offs_m, offs_d, offs_dv, M, D, DV, SK_B, SK_R,
               SV_B, SV_R, key_end, scale, ACC: tl.constexpr):
    """k, uk and P, dP, W, R of one key block of the double backward."""
    k = _load_strided(K, bh, offs_m, offs_d, M, D, SK_B, SK_R).to(ACC)
    uk = _load(UK, bh, offs_m, offs_d, M, D).to(ACC)
    v = _load_strided(V, bh, offs_m, offs_dv, M, DV, SV_B, SV_R).to(ACC)
    uv = _load(UV, bh, offs_m, offs_dv, M, DV).to(ACC)
    p = tl.exp(_row_scores(q, k, offs_m, key_end, scale) - lse)
    dp = tl.sum(do[None, :] * v, 1)                                           # dP = dO V^T
    w = (tl.sum(uq[None, :] * k, 1) + tl.sum(q[None, :] * uk, 1)) * scale    # W = s (uQ K^T + Q uK^T)
    r = tl.sum(do[None, :] * uv, 1)                                           # R = dO uV^T
    return k, uk, v, uv, p, dp, w, r


@triton.jit
def attention_fwd_row_kernel(Q, K, V, O, LSE, M, D, DV, SK_B, SK_R, SV_B, SV_R,
                             scale_hi, scale_lo,
                             CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_row(Q, bh, offs_d, D).to(ACC)
    key_end = 1 if CAUSAL else M
    m_i = tl.full([], float("-inf"), ACC)   # running max of S
    l_i = tl.zeros([], ACC)                 # running sum of exp(S - m_i)
    acc = tl.zeros([BLOCK_DV], ACC)         # running (unnormalised) P V
    for start_m in range(0, key_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        k = _load_strided(K, bh, offs_m, offs_d, M, D, SK_B, SK_R).to(ACC)
        v = _load_strided(V, bh, offs_m, offs_dv, M, DV, SV_B, SV_R).to(ACC)
        s = _row_scores(q, k, offs_m, key_end, scale)
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite from the first block (key 0)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    _store_row(O, (acc / l_i).to(O.dtype.element_ty), bh, offs_dv, DV)
    tl.store(LSE + bh, m_i + tl.log(l_i))


@triton.jit
def attention_bwd_row_kernel(Q, K, V, O, DO, LSE, DQ, DK, DVo, M, D, DV, SK_B, SK_R, SV_B, SV_R,
                             scale_hi, scale_lo,
                             CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_row(Q, bh, offs_d, D).to(ACC)
    do = _load_row(DO, bh, offs_dv, DV).to(ACC)
    lse = tl.load(LSE + bh)
    delta = tl.sum(do * _load_row(O, bh, offs_dv, DV).to(ACC), 0)   # Delta = dO . O
    key_end = 1 if CAUSAL else M
    dq = tl.zeros([BLOCK_D], ACC)
    for start_m in range(0, M, BLOCK_M):  # every key block: masked keys get dK = dV = 0
        offs_m = start_m + tl.arange(0, BLOCK_M)
        k = _load_strided(K, bh, offs_m, offs_d, M, D, SK_B, SK_R).to(ACC)
        v = _load_strided(V, bh, offs_m, offs_dv, M, DV, SV_B, SV_R).to(ACC)
        p = tl.exp(_row_scores(q, k, offs_m, key_end, scale) - lse)
        ds = p * (tl.sum(do[None, :] * v, 1) - delta)                        # dS = P (dP - Delta)
        dq += tl.sum(ds[:, None] * k, 0)
        _store(DK, ds[:, None] * q[None, :] * scale, bh, offs_m, offs_d, M, D)   # s dS^T Q
        _store(DVo, p[:, None] * do[None, :], bh, offs_m, offs_dv, M, DV)        # P^T dO
    _store_row(DQ, (dq * scale).to(DQ.dtype.element_ty), bh, offs_d, D)       # s dS K


@triton.jit
def attention_dbwd_row_kernel(Q, K, V, O, DO, UQ, UK, UV, LSE, GQ, GK, GV, GDO, M, D, DV, SK_B, SK_R, SV_B, SV_R,
                             scale_hi, scale_lo,
                              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
                              SCORE: tl.constexpr, VALUE: tl.constexpr, FROZEN_STATS: tl.constexpr):
    scale = _scale(scale_hi, scale_lo, ACC)
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_row(Q, bh, offs_d, D).to(ACC)
    uq = _load_row(UQ, bh, offs_d, D).to(ACC)
    do = _load_row(DO, bh, offs_dv, DV).to(ACC)
    lse = tl.load(LSE + bh)
    delta = tl.sum(do * _load_row(O, bh, offs_dv, DV).to(ACC), 0)   # Delta = dO . O
    key_end = 1 if CAUSAL else M

    # Pass 1: rho_W = sum P W and rho_G = sum P (R + (dP - Delta) W) - rho_W Delta
    #                                   = sum P R + sum P dP W - 2 Delta rho_W.
    rho_w = tl.zeros([], ACC)
    p_r = tl.zeros([], ACC)
    p_dp_w = tl.zeros([], ACC)
    for start_m in range(0, key_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        k, uk, v, uv, p, dp, w, r = _row_block(q, do, uq, K, V, UK, UV, bh, lse, offs_m, offs_d,
                                               offs_dv, M, D, DV, SK_B, SK_R, SV_B, SV_R,
                                               key_end, scale, ACC)
        rho_w += tl.sum(p * w, 0)
        p_r += tl.sum(p * r, 0)
        p_dp_w += tl.sum(p * dp * w, 0)
    # Only the kept parts of G_P enter rho_G; with frozen softmax statistics it is zero.
    rho_g = tl.zeros([], ACC)
    if VALUE:
        rho_g += p_r
    if SCORE:
        rho_g += p_dp_w - 2 * delta * rho_w
    if FROZEN_STATS:
        rho_g = tl.zeros([], ACC)

    # Pass 2, every key block (masked keys get gK = gV = 0): gK, gV per block; gQ, gdO summed.
    gq = tl.zeros([BLOCK_D], ACC)
    gdo = tl.zeros([BLOCK_DV], ACC)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        k, uk, v, uv, p, dp, w, r = _row_block(q, do, uq, K, V, UK, UV, bh, lse, offs_m, offs_d,
                                               offs_dv, M, D, DV, SK_B, SK_R, SV_B, SV_R,
                                               key_end, scale, ACC)
        ds = p * (dp - delta)
        g_dp = p * (w - rho_w)
        g_p = -rho_g + tl.zeros_like(p)                                       # the kept parts of G_P
        if VALUE:
            g_p += r
        if SCORE:
            g_p += (dp - delta) * w - rho_w * dp
        g_s = p * g_p
        gq += tl.sum(g_s[:, None] * k, 0)                                     # s G_S K (+ s dS uK)
        gdo += tl.sum(g_dp[:, None] * v, 0) + tl.sum(p[:, None] * uv, 0)      # G_dP V + P uV
        g_k = g_s[:, None] * q[None, :]                                       # s G_S^T Q (+ s dS^T uQ)
        if SCORE:
            gq += tl.sum(ds[:, None] * uk, 0)
            g_k += ds[:, None] * uq[None, :]
        _store(GK, g_k * scale, bh, offs_m, offs_d, M, D)
        g_v = g_dp[:, None] * do[None, :]                                     # G_dP^T dO
        if not VALUE:
            g_v = tl.zeros_like(g_v)
        _store(GV, g_v, bh, offs_m, offs_dv, M, DV)
    _store_row(GQ, (gq * scale).to(GQ.dtype.element_ty), bh, offs_d, D)
    _store_row(GDO, gdo.to(GDO.dtype.element_ty), bh, offs_dv, DV)
