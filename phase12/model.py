"""The Phase 12 model as a pure function of a parameter pytree.

One attention head over a sequence x (T, D); token 0 queries:

    q = x[0] Wq^T,  k = x Wk^T,  v = x Wv^T           (no biases)
    h = softmax(q k^T / sqrt(D)) v                    (through the chosen backend)
    logits = h Wc^T + bc

Parameters are a plain dict of tensors, initialised like torch.nn.Linear
(uniform in +-1/sqrt(fan_in)). Nothing is mutated: `apply` is a pure function, so
torch.func.grad and vmap see the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import attention
from phase12.config import ATTENTION_PARAMS

Params = dict[str, torch.Tensor]
__all__ = ["ATTENTION_PARAMS", "Params", "apply", "cross_entropy", "init_params", "loss"]


def init_params(
    dim: int,
    num_classes: int,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Fresh parameters drawn on the CPU from `generator` (so a seed means the same
    initial model on every device), then moved to `device`."""
    bound = 1.0 / math.sqrt(dim)  # every layer's fan_in is D

    def uniform(*shape: int) -> torch.Tensor:
        u = torch.rand(*shape, generator=generator, dtype=torch.float64)
        return ((2 * u - 1) * bound).to(device=device, dtype=dtype)

    return {
        "Wq": uniform(dim, dim),
        "Wk": uniform(dim, dim),
        "Wv": uniform(dim, dim),
        "Wc": uniform(num_classes, dim),
        "bc": uniform(num_classes),
    }


def apply(
    params: Params,
    x: torch.Tensor,
    attention_backend: str = "reference",
    curvature: str = "exact",
) -> torch.Tensor:
    """Logits (..., C) for sequences x (..., T, D), attention through `attention_backend`
    (kernels.attention's `backend`) with its second derivative under `curvature`
    (kernels.CURVATURES). Differentiable to any order."""
    q = F.linear(x[..., :1, :], params["Wq"])  # (..., 1, D): only token 0 queries
    # k and v (..., T, D) from one GEMM against [Wk; Wv]: two views of its output, which
    # the fused kernels read through their strides.
    k, v = F.linear(x, torch.cat([params["Wk"], params["Wv"]])).chunk(2, dim=-1)
    # (..., 1, D); the leading dims act as batch
    h = attention(q, k, v, backend=attention_backend, curvature=curvature)
    # squeeze, not h[..., 0, :]: a select's backward allocates zeros and scatters into
    # them (two kernels per use); squeeze's backward is a view. A matmul and an add, not
    # F.linear: under vmap F.linear's bias goes through addmm's decomposition, which
    # multiplies it by beta = 1 (one more op in the forward and in each backward). The
    # bias in the matmul's dtype, as F.linear has it under autocast (a no-op otherwise).
    logits = h.squeeze(-2) @ params["Wc"].mT
    return logits + params["bc"].to(logits.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (n, C) against integer labels (n,): a scalar.

    F.cross_entropy's value, written as log_softmax + gather: under vmap + grad,
    F.cross_entropy runs nll_loss's decomposition (ignore-index masks, 0-d counts and
    divisions): ~250 extra ops (each a kernel on CUDA) in a FULL k = 20 outer step (14%
    of its compute ops on the CPU; 30% of FO's).
    """
    return -F.log_softmax(logits, -1).gather(-1, labels[..., None]).mean()


def loss(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    attention_backend: str = "reference",
    curvature: str = "exact",
) -> torch.Tensor:
    """Mean cross-entropy of the model on (x (n, T, D), y (n,)): a scalar."""
    return cross_entropy(apply(params, x, attention_backend, curvature), y)
