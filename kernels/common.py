"""Small pieces shared by Triton kernels' launchers and their autograd.Functions.

Used by this package's attention op and by any other fused kernel built beside it (the
engine's fused inner step): interpreter detection, power-of-two block sizes, the
accumulator dtype, and the move of a vmapped dimension to the front that every `vmap`
rule starts with. Nothing here imports Triton: the reference backend's autograd.Functions
use it on machines without Triton. (The kernels' shared `dot` is in
kernels.triton_kernels.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(x: int, lo: int) -> int:
    """The smallest power of two >= x, and at least `lo` (tl.dot needs 16 on the GPU)."""
    return max(lo, 1 << max(x - 1, 0).bit_length())


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in for inputs of `dtype`: float64 stays, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def vmapped_to_front(
    info, in_dims: Sequence[int | None], tensors: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Vmapped dim of every tensor moved to dim 0 (unbatched ones are expanded; None, an
    optional argument left out, stays None)."""
    out = []
    for t, d in zip(tensors, in_dims, strict=True):
        if t is not None:
            t = t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
        out.append(t)
    return out
