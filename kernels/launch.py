"""Launchers for the Triton attention kernels: shapes, block sizes, allocation.

Each launcher takes tensors of shape (..., rows, cols) with identical leading
dims, flattens the leading dims into one batch*head axis, makes every operand
contiguous (so non-contiguous inputs are accepted at the cost of one copy; the
one-query kernels read K and V through their strides instead, wherever their columns
are adjacent) and launches a 1-D grid: tiles of the flash-style kernels, or, for one
query per example (N = 1), one program per example on the one-query kernels (forward,
backward and double backward one launch each). Nothing here is differentiable:
`kernels.fused` wraps these functions in autograd.Functions.

Accumulation is float32 for fp16/bf16/fp32 inputs and float64 for float64 inputs;
the log-sum-exp and the other row statistics are returned in that dtype. Every
launcher takes `precision`, Triton's input_precision for the dots of float32 operands
(FLOAT32_PRECISIONS; 16-bit operands use the tensor cores as they are, float64 is
exact): "tf32x3", the default, has float32 accuracy on the tensor cores; "ieee" is
plain float32 FMA arithmetic, several times slower (measurements in docs/benchmarks.md).

The tiled launchers also take `tile`, a LaunchConfig that replaces the table's choice
for their kernel family (the block-size sweep, `run.py bench tiles`, passes it). Where
its `atomic_rows` is set, the backward passes sum the row-side gradients into zeroed
accumulators (accumulator dtype) with atomics and cast them to the input dtype after.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.common import accumulator_dtype, interpreter_enabled, pow2
from kernels.reference import curvature_switches
from kernels.triton_kernels import (
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_bwd_row_kernel,
    attention_dbwd_cols_kernel,
    attention_dbwd_row_kernel,
    attention_dbwd_rows_kernel,
    attention_fwd_kernel,
    attention_fwd_row_kernel,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Triton dot precisions for float32 operands. "tf32x3" splits each operand into TF32
# parts and sums three tensor-core products (float32 accuracy on the tensor cores);
# the first is the default.
FLOAT32_PRECISIONS = ("tf32x3", "ieee")
MAX_HEAD_DIM = 128
# Key blocks of the one-query kernels (N = 1) hold at most this many elements per
# operand (64 keys at D = 64): the double backward keeps four such blocks in registers.
ROW_BLOCK_ELEMENTS = 4096


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes (queries x keys) and CUDA launch knobs for one kernel family;
    `atomic_rows` (backward passes): the column-parallel kernel sums the row-side
    gradients (dQ; gQ, gdO) with atomics instead of a row-parallel pass over the tiles
    (kernels.triton_kernels)."""

    block_n: int
    block_m: int
    num_warps: int = 4
    num_stages: int = 2
    atomic_rows: bool = False


# Tiles (block_n x block_m, warps, stages) by (kernel family, operands, D > 64), picked
# by block-size sweeps (the measurements behind each entry: docs/benchmarks.md, "Block
# sizes" and the twelfth and thirteenth sessions). Operands are "16bit" (fp16, bf16),
# "tf32x3" (float32 with tf32x3 dots) or "ieee" (float32 FMA dots). tf32x3 (three
# products per tile) wants narrower tiles than 16-bit in the backward passes; 16-bit at
# D <= 64 gains from a third pipeline stage in the forward and backward. At
# D = 128 one stage (no software pipelining) keeps the float32 double backward in
# shared memory and registers; 64 x 64 float32 double-backward tiles do not fit there.
# The ieee double backward takes 16-row tiles: at 32 x 32 its column kernel spills.
# Atomic row gradients pay off where the column kernel has registers to spare for them:
# the backward at D <= 64, the double backward at D <= 64 except with tf32x3.
_TILES = {
    ("fwd", "16bit", False): LaunchConfig(128, 64, 8, 3),
    ("bwd", "16bit", False): LaunchConfig(64, 64, 4, 3, atomic_rows=True),
    ("dbwd", "16bit", False): LaunchConfig(64, 64, 4, 2, atomic_rows=True),
    ("fwd", "16bit", True): LaunchConfig(64, 32, 4, 2),
    ("bwd", "16bit", True): LaunchConfig(64, 64, 4, 2),
    ("dbwd", "16bit", True): LaunchConfig(64, 64, 4, 1),
    ("fwd", "tf32x3", False): LaunchConfig(128, 64, 8, 2),
    ("bwd", "tf32x3", False): LaunchConfig(64, 32, 4, 1, atomic_rows=True),
    ("dbwd", "tf32x3", False): LaunchConfig(64, 32, 4, 2),
    ("fwd", "tf32x3", True): LaunchConfig(128, 64, 8, 1),
    ("bwd", "tf32x3", True): LaunchConfig(32, 32, 4, 1),
    ("dbwd", "tf32x3", True): LaunchConfig(16, 32, 4, 1),
    ("fwd", "ieee", False): LaunchConfig(64, 64, 4, 1),
    ("bwd", "ieee", False): LaunchConfig(64, 32, 4, 1, atomic_rows=True),
    ("dbwd", "ieee", False): LaunchConfig(16, 32, 4, 1, atomic_rows=True),
    ("fwd", "ieee", True): LaunchConfig(32, 64, 4, 2),
    ("bwd", "ieee", True): LaunchConfig(32, 32, 4, 1),
    ("dbwd", "ieee", True): LaunchConfig(16, 16, 4, 1),
}


def operand_class(dtype: torch.dtype, precision: str = "tf32x3") -> str:
    """The tile table's operand key: '16bit', 'tf32x3' or 'ieee' (float64 counts as ieee)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "ieee" if precision == "ieee" or dtype == torch.float64 else "tf32x3"


def launch_config(
    kind: str, n: int, m: int, d: int, dtype: torch.dtype, precision: str = "tf32x3"
) -> LaunchConfig:
    """Block sizes for kernel family `kind` ('fwd', 'bwd', 'dbwd') at this shape, dtype
    and float32 dot precision.

    Tiles never exceed the (power-of-two rounded) problem size. (N = 1 does not come
    here: it runs the one-query kernels.)
    """
    tile = _TILES[kind, operand_class(dtype, precision), d > 64]
    if interpreter_enabled():
        # The interpreter runs one program at a time in numpy: small tiles keep the
        # tests fast and exercise the tail masks (in the table's structure).
        return replace(tile, block_n=16, block_m=16, num_warps=1, num_stages=1)
    block_n = min(tile.block_n, pow2(n, 16))
    block_m = min(tile.block_m, pow2(m, 16))
    if (block_n, block_m) == (tile.block_n, tile.block_m):
        return tile
    # A problem smaller than the tile:
    return replace(tile, block_n=block_n, block_m=block_m, num_warps=4)


def uses_row_kernels(n: int) -> bool:
    """One query per example runs on the one-query kernels (one program per example)."""
    return n == 1


def _row_meta(q: torch.Tensor, m: int, dv: int, causal: bool) -> dict:
    block_d, block_dv = pow2(q.shape[-1], 16), pow2(dv, 16)
    block_m = min(pow2(m, 16), max(16, ROW_BLOCK_ELEMENTS // max(block_d, block_dv)))
    if interpreter_enabled():
        block_m = 16  # several key blocks even at test sizes: exercises the loops and tails
    return dict(
        CAUSAL=causal,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        num_warps=4 if block_m * max(block_d, block_dv) >= 4096 else 2,
    )


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _empty(bh: int, like: torch.Tensor) -> torch.Tensor:
    """A contiguous (bh, rows, cols) output shaped like `like`'s last two dims."""
    return torch.empty(bh, *like.shape[-2:], dtype=like.dtype, device=like.device)


def _flat_keys(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """K or V for the one-query kernels, (BH, M, cols), with its slice and row strides:
    a view where one exists with adjacent columns and 32-bit row offsets (a half of
    one fused K|V projection, a broadcast batch), a contiguous copy otherwise."""
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x3.stride(-1) != 1 or x3.stride(-2) * x3.shape[-2] >= 2**31:
        x3 = x3.contiguous()
    return x3, x3.stride(0), x3.stride(1)


def _tile(
    q: torch.Tensor, v: torch.Tensor, kind: str, precision: str, tile: LaunchConfig | None
) -> LaunchConfig:
    """`tile`, or the table's choice for kernel family `kind` at this shape."""
    (n, d), m = q.shape[-2:], v.shape[-2]
    return tile or launch_config(kind, n, m, d, q.dtype, precision)


def _meta(
    q: torch.Tensor, v: torch.Tensor, cfg: LaunchConfig, causal: bool, precision: str
) -> dict:
    """The tiled kernels' shared meta-parameters and launch options (the structure,
    `cfg.atomic_rows`, is passed by the launchers to the kernels that take it)."""
    d, dv = q.shape[-1], v.shape[-1]
    float32 = q.dtype == torch.float32
    return dict(
        CAUSAL=causal,
        BLOCK_N=cfg.block_n,
        BLOCK_M=cfg.block_m,
        BLOCK_D=pow2(d, 16),
        BLOCK_DV=pow2(dv, 16),
        # input_precision matters only for float32 operands; "tf32" is the default
        # for the others and is ignored by them.
        PRECISION=precision if float32 else "ieee" if q.dtype == torch.float64 else "tf32",
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _scale_parts(scale: float) -> tuple[float, float]:
    """`scale` as (hi, lo): hi is float32, and hi + lo is `scale` to 2^-48 even once lo
    is rounded to float32. Triton passes Python floats to kernels as float32; the
    kernels add the two in their accumulator dtype (exact in float64)."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, scale - hi


def _accumulator(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like x in the accumulator dtype, for the kernels' atomic sums."""
    return torch.zeros(x.shape, dtype=accumulator_dtype(x.dtype), device=x.device)


def _grid(batch: int, rows: int, block: int) -> tuple[int]:
    return (batch * triton.cdiv(rows, block),)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    precision: str,
    tile: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """O (..., N, Dv) in q's dtype and LSE (..., N) in the accumulator dtype."""
    lead, (n, d), (m, dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
    q3 = _flat(q)
    bh = q3.shape[0]
    o = torch.empty(bh, n, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(bh, n, dtype=accumulator_dtype(q.dtype), device=q.device)
    if not o.numel():  # an empty batch: nothing to launch
        pass
    elif uses_row_kernels(n):
        (k3, *sk), (v3, *sv) = _flat_keys(k), _flat_keys(v)
        attention_fwd_row_kernel[(bh,)](
            *(q3, k3, v3, o, lse, m, d, dv, *sk, *sv, *_scale_parts(scale)),
            **_row_meta(q, m, dv, causal),
        )
    else:
        k3, v3 = _flat(k), _flat(v)
        meta = _meta(q, v, _tile(q, v, "fwd", precision, tile), causal, precision)
        attention_fwd_kernel[_grid(bh, n, meta["BLOCK_N"])](
            q3, k3, v3, o, lse, n, m, d, dv, *_scale_parts(scale), **meta
        )
    return o.view(*lead, n, dv), lse.view(*lead, n)


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """Delta = rowsum(dO * O), one value per query row, in the accumulator dtype."""
    acc = accumulator_dtype(o.dtype)
    return _flat_rows((do.to(acc) * o.to(acc)).sum(-1))


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
    precision: str,
    tile: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the input dtype, from Q, K, V, O, LSE and dO."""
    (n, d), (m, dv) = q.shape[-2:], v.shape[-2:]
    do = do.to(q.dtype)
    q3, do3, lse2 = _flat(q), _flat(do), _flat_rows(lse)
    bh = q3.shape[0]
    dq, dk, dvv = (_empty(bh, x) for x in (q, k, v))
    if not dq.numel():  # an empty batch: nothing to launch
        pass
    elif uses_row_kernels(n):
        (k3, *sk), (v3, *sv) = _flat_keys(k), _flat_keys(v)
        attention_bwd_row_kernel[(bh,)](
            *(q3, k3, v3, _flat(o), do3, lse2, dq, dk, dvv),
            *(m, d, dv, *sk, *sv, *_scale_parts(scale)),
            **_row_meta(q, m, dv, causal),
        )
    else:
        k3, v3 = _flat(k), _flat(v)
        delta = _delta(o, do)
        cfg = _tile(q, v, "bwd", precision, tile)
        meta, args = _meta(q, v, cfg, causal, precision), (n, m, d, dv, *_scale_parts(scale))
        if cfg.atomic_rows:
            dq = _accumulator(q3)
        attention_bwd_dkdv_kernel[_grid(bh, m, meta["BLOCK_M"])](
            q3, k3, v3, do3, lse2, delta, dk, dvv, dq, *args, **meta,
            ATOMIC_ROWS=cfg.atomic_rows,
        )  # fmt: skip
        if cfg.atomic_rows:
            dq = dq.to(q.dtype)
        else:
            attention_bwd_dq_kernel[_grid(bh, n, meta["BLOCK_N"])](
                q3, k3, v3, do3, lse2, delta, dq, *args, **meta
            )
    return dq.view(q.shape), dk.view(k.shape), dvv.view(v.shape)


def attention_double_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    uq: torch.Tensor,
    uk: torch.Tensor,
    uv: torch.Tensor,
    causal: bool,
    scale: float,
    precision: str,
    tile: LaunchConfig | None = None,
    curvature: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gQ, gK, gV, gdO): gradients of <uQ,dQ> + <uK,dK> + <uV,dV> w.r.t. Q, K, V, dO, under
    a curvature policy ("exact", "none", "score", "value" or "frozen_softmax_stats";
    kernels.reference.CURVATURES)."""
    switches = curvature_switches(curvature)
    (n, d), (m, dv) = q.shape[-2:], v.shape[-2:]
    dt = q.dtype
    do, uq, uk, uv = do.to(dt), uq.to(dt), uk.to(dt), uv.to(dt)
    q3, do3, uq3, uk3, uv3 = _flat(q), _flat(do), _flat(uq), _flat(uk), _flat(uv)
    lse2, bh = _flat_rows(lse), q3.shape[0]
    gq, gk, gv, gdo = (_empty(bh, x) for x in (q, k, v, do))
    if not gq.numel():  # an empty batch: nothing to launch
        pass
    elif uses_row_kernels(n):
        (k3, *sk), (v3, *sv) = _flat_keys(k), _flat_keys(v)
        attention_dbwd_row_kernel[(bh,)](
            *(q3, k3, v3, _flat(o), do3, uq3, uk3, uv3, lse2, gq, gk, gv, gdo),
            *(m, d, dv, *sk, *sv, *_scale_parts(scale)),
            **_row_meta(q, m, dv, causal),
            **switches,
        )
    else:
        k3, v3 = _flat(k), _flat(v)
        delta = _delta(o, do)
        rho_w, rho_g = torch.empty_like(lse2), torch.empty_like(lse2)
        cfg = _tile(q, v, "dbwd", precision, tile)
        meta, args = _meta(q, v, cfg, causal, precision), (n, m, d, dv, *_scale_parts(scale))
        if cfg.atomic_rows:
            gq, gdo = _accumulator(q3), _accumulator(do3)
        attention_dbwd_rows_kernel[_grid(bh, n, meta["BLOCK_N"])](
            q3, k3, v3, do3, uq3, uk3, uv3, lse2, delta, gq, gdo, rho_w, rho_g, *args,
            **meta, **switches, ATOMIC_ROWS=cfg.atomic_rows,
        )  # fmt: skip
        attention_dbwd_cols_kernel[_grid(bh, m, meta["BLOCK_M"])](
            q3, k3, v3, do3, uq3, uk3, uv3, lse2, delta, rho_w, rho_g, gk, gv, gq, gdo, *args,
            **meta, SCORE=switches["SCORE"], VALUE=switches["VALUE"], ATOMIC_ROWS=cfg.atomic_rows,
        )  # fmt: skip
        if cfg.atomic_rows:
            gq, gdo = gq.to(dt), gdo.to(dt)
    return gq.view(q.shape), gk.view(k.shape), gv.view(v.shape), gdo.view(q.shape[:-1] + (dv,))
