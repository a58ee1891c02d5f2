"""Small pieces shared by Triton kernels and their autograd.Functions.

Used by this package's attention kernels and by any other fused kernel built beside
them (the engine's fused inner step): interpreter detection, power-of-two block
sizes, the accumulator dtype, a dot with explicit precision and accumulator, and the
move of a vmapped dimension to the front that every `vmap` rule starts with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(x: int, lo: int) -> int:
    """The smallest power of two >= x, and at least `lo` (tl.dot needs 16 on the GPU)."""
    return max(lo, triton.next_power_of_2(x))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in for inputs of `dtype`: float64 stays, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, ACC: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)


def vmapped_to_front(info, in_dims: Sequence[int | None], tensors: Sequence[torch.Tensor]):
    """Vmapped dim of every tensor moved to dim 0 (unbatched ones are expanded)."""
    out = []
    for t, d in zip(tensors, in_dims, strict=True):
        out.append(t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0))
    return out
