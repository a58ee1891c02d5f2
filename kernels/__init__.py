"""Attention backends: `reference` (PyTorch ops) and `triton_fused` (Triton kernels).

    from kernels import attention
    o = attention(q, k, v, backend="triton_fused")   # q (..., N, D), k (..., M, D), v (..., M, Dv)

Both backends are differentiable to any order and compose with torch.func
(`grad`, `grad(grad)`, `vmap`, `jvp`) and with `torch.autograd.grad(create_graph=True)`.
`triton_fused` runs fused Triton kernels for the forward, the backward and the
double backward; orders above two and forward-mode AD go through the reference ops.

`curvature` (CURVATURES) says what attention's own second derivative contributes when
its backward is differentiated: "exact" (the default), or an ablation of it ("none",
"score", "value", "frozen_softmax_stats", "once_differentiable"; see
kernels.reference.CURVATURES). Every backend applies it exactly: the fused kernels
through switches of the double-backward kernels, the reference through the same
autograd.Functions on PyTorch ops.

The Triton kernels are imported lazily: importing this package needs no Triton,
and TRITON_INTERPRET=1 (the CPU interpreter) is read when they are first used.
"""

from __future__ import annotations

import torch

from kernels.common import interpreter_enabled
from kernels.reference import CURVATURES, attention_reference, default_scale

__all__ = [
    "ATTENTION_BACKENDS",
    "CURVATURES",
    "BackendUnavailable",
    "attention",
    "check_backend",
    "fused_attention",
]

ATTENTION_BACKENDS = ("reference", "triton_fused")


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run here (the message says why and what to do)."""


def check_backend(backend: str, device: torch.device | str) -> None:
    """Raise ValueError for an unknown backend, BackendUnavailable if it cannot run on `device`."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}"
        )
    if backend == "reference":
        return
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            f"the Triton kernels need Triton, which failed to import ({e}); "
            "install triton or use the reference backend"
        ) from e
    if device.type == "cuda":
        if interpreter_enabled():
            raise BackendUnavailable(
                "the Triton kernels cannot run on CUDA with TRITON_INTERPRET=1 set; "
                "unset it to run the compiled kernels"
            )
        return
    if device.type == "cpu":
        if not interpreter_enabled():
            raise BackendUnavailable(
                "the Triton kernels run on the CPU only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 (slow, for testing), or use a CUDA device or the reference "
                "backend"
            )
        return
    raise BackendUnavailable(f"the Triton kernels do not support device type {device.type!r}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_backend("triton_fused", q.device)  # before the launcher, which imports Triton
    from kernels.launch import MAX_HEAD_DIM, SUPPORTED_DTYPES

    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"attention expects q (..., N, D), k (..., M, D), v (..., M, Dv) with the same "
            f"number of dims; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            f"q, k, v must have identical leading (batch, head) dims, no broadcasting; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"shape mismatch: need q (..., N, D), k (..., M, D), v (..., M, Dv); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"triton_fused supports one common dtype out of {SUPPORTED_DTYPES}; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    d, dv = q.shape[-1], v.shape[-1]
    if not (1 <= d <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM):
        raise ValueError(
            f"triton_fused supports head dims 1..{MAX_HEAD_DIM}; got D={d}, Dv={dv} "
            "(use backend 'reference' for larger heads)"
        )
    if q.shape[-2] < 1 or k.shape[-2] < 1:
        raise ValueError(
            f"attention needs N >= 1 queries and M >= 1 keys; got N={q.shape[-2]}, M={k.shape[-2]}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    float32_precision: str = "tf32x3",
    curvature: str = "exact",
) -> torch.Tensor:
    """Fused Triton attention, softmax(scale q k^T) v, differentiable to any order.

    q (..., N, D), k (..., M, D), v (..., M, Dv); D, Dv <= 128; fp16, bf16, fp32
    (fp64 too). `causal` is top-left aligned (query i sees keys j <= i). Returns
    (..., N, Dv) in the input dtype. `float32_precision` is the dot precision of
    float32 inputs in every pass: "tf32x3" (float32 accuracy on the tensor cores) or
    "ieee" (plain float32 FMA, several times slower). `curvature`: see the module
    docstring.
    """
    _check_inputs(q, k, v)
    _check_curvature(curvature)
    from kernels.fused import FusedAttention
    from kernels.launch import FLOAT32_PRECISIONS

    if float32_precision not in FLOAT32_PRECISIONS:
        raise ValueError(
            f"float32_precision must be one of {FLOAT32_PRECISIONS}; got {float32_precision!r}"
        )
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    args = bool(causal), scale, float32_precision, curvature, "triton"
    return FusedAttention.apply(q, k, v, *args)[0]


def _check_curvature(curvature: str) -> None:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "reference",
    causal: bool = False,
    scale: float | None = None,
    float32_precision: str = "tf32x3",
    curvature: str = "exact",
) -> torch.Tensor:
    """Attention through the named backend; see the module docstring.
    `float32_precision` is triton_fused's (see fused_attention); the reference computes
    float32 with PyTorch's matmuls as configured (torch.backends.cuda.matmul)."""
    if backend == "reference":
        if curvature == "exact":
            # Half inputs are computed in float32, as the kernels do, under autocast too.
            with torch.autocast(q.device.type, enabled=False):
                return attention_reference(q, k, v, causal, scale)
        _check_curvature(curvature)
        from kernels.fused import FusedAttention

        scale = default_scale(q.shape[-1]) if scale is None else float(scale)
        args = bool(causal), scale, float32_precision, curvature, "reference"
        return FusedAttention.apply(q, k, v, *args)[0]
    if backend == "triton_fused":
        return fused_attention(q, k, v, causal, scale, float32_precision, curvature)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
