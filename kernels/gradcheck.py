"""Self-check of the fused attention op: gradcheck and gradgradcheck in float64.

    python -m kernels.gradcheck      # prints the versions, then OK or FAILED (exit 0 / 1;
                                     # 2 where the kernels cannot run)

`check(device)` runs torch.autograd.gradcheck and gradgradcheck of `fused_attention`
(causal and not, shapes with uneven N, M, D, Dv; N = 1 too, the one-query kernels the
Phase 12 model runs) on the kernels of `device`: the compiled kernels on CUDA, Triton's
interpreter on the CPU (TRITON_INTERPRET=1 must be set before Triton is first imported,
so a CUDA process checks its compiled kernels and the CPU check runs in a process of its
own).
"""

from __future__ import annotations

import sys

import torch

from kernels import BackendUnavailable, check_backend, fused_attention


def check(device: torch.device | str) -> bool:
    """True when first and second derivatives of the op match finite differences."""
    g = torch.Generator(device=device).manual_seed(0)
    q, one_query, k, v = (
        torch.randn(1, 1, n, d, generator=g, device=device, dtype=torch.float64).requires_grad_()
        for n, d in ((2, 3), (1, 3), (3, 3), (3, 2))
    )
    ok = True
    for queries, causal in ((q, False), (q, True), (one_query, False)):
        fn = lambda *a, causal=causal: fused_attention(*a, causal)  # noqa: E731
        ok &= torch.autograd.gradcheck(fn, (queries, k, v), raise_exception=False)
        ok &= torch.autograd.gradgradcheck(fn, (queries, k, v), raise_exception=False)
    return bool(ok)


def main() -> int:
    from importlib.metadata import version

    from kernels.common import interpreter_enabled

    device = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    try:
        check_backend("triton_fused", device)
    except BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    versions = " ".join(f"{name} {version(name)}" for name in ("torch", "triton", "numpy"))
    print(f"{versions} {device}", flush=True)
    ok = check(device)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
