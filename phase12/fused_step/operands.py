"""How the fused inner-step kernels read and write their operands: masked loads into the
accumulator dtype ACC, masked stores, and the rounding to OPERAND that torch.autocast
applies to a matmul's inputs. Shared by task_kernels.py and example_kernels.py."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_matrix(ptr, offs_r, offs_c, R, C, ACC: tl.constexpr):
    """Block [offs_r, offs_c] of a row-major (R, C) matrix at ptr; zeros outside."""
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    return tl.load(ptr + offs_r[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def load_vector(ptr, offs, R, ACC: tl.constexpr):
    """Elements offs of a length-R vector at ptr; zeros outside."""
    return tl.load(ptr + offs, mask=offs < R, other=0.0).to(ACC)


@triton.jit
def store_matrix(ptr, value, offs_r, offs_c, R, C):
    """value to block [offs_r, offs_c] of a row-major (R, C) matrix at ptr, in its dtype."""
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    tl.store(ptr + offs_r[:, None] * C + offs_c[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def rounded(x, OPERAND: tl.constexpr, ACC: tl.constexpr):
    """x rounded to nearest (ties to even) in OPERAND, held in ACC (x itself when OPERAND
    is ACC)."""
    if OPERAND == tl.bfloat16:  # by hand: Triton's interpreter truncates to bfloat16
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN stays NaN (the carry would turn some into 0 or inf): a non-finite step
        # must show as non-finite.
        return tl.where(x == x, bits.to(tl.float32, bitcast=True).to(ACC), x)
    return x.to(OPERAND).to(ACC)
