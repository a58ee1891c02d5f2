"""Attention benchmark: fused Triton vs the reference ops vs torch SDPA (CUDA only).

    python run.py bench attention [--n 128,512,...] [--d 64,128] [--dtypes bf16,fp32,fp32-ieee]
                                  [--passes fwd,fwd_bwd,dbwd] [--cuda-graph] [--out DIR]

For each (dtype, D, N = M) and each provider, the median time (triton.testing.do_bench)
and the peak memory above the inputs of three passes:

    fwd      o = attn(q, k, v)
    fwd_bwd  o, then dq, dk, dv = vjp(o, do)
    dbwd     o, dq/dk/dv with create_graph, then backward of sum(dq^2 + dk^2 + dv^2)
             (a gradient-penalty style grad-of-grad)

Providers: `fused` (kernels.fused_attention; dtype `fp32-ieee` runs it with
float32_precision="ieee"), `reference` (kernels.reference: PyTorch
ops, float32 compute), `sdpa_math` (SDPA's math backend; the only SDPA backend with a
double backward), `sdpa_flash`, `sdpa_cudnn` (first order only, bf16/fp16 only).
Out-of-memory cells are recorded as OOM, and cells a provider has no kernel for (the
fused op's D > 128, say) as ERROR with its message. B*H = 32 (B = 4, H = 8).

Eager times include the host's cost of issuing the kernels: a pass that takes less GPU
time than its Python and autograd overhead measures the host. `--cuda-graph` also times
each pass replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`, column
`ms_graph`): the GPU time alone, which is what the engine's captured outer step sees.
"""

from __future__ import annotations

import functools

import pandas as pd
import torch

from kernels import fused_attention
from kernels.reference import attention_reference

# Operand types by name; "fp32-ieee" is float32 whose fused dots are plain FMA
# ("ieee") instead of the default tf32x3 (the other providers are the same as fp32).
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp32-ieee": torch.float32,
}
PASSES = ("fwd", "fwd_bwd", "dbwd")
PROVIDERS = ("fused", "reference", "sdpa_math", "sdpa_flash", "sdpa_cudnn")


def float32_precision(dtype_name: str) -> str:
    return "ieee" if dtype_name == "fp32-ieee" else "tf32x3"


def fused(dtype_name: str):
    """fused_attention with the dot precision that `dtype_name` asks for."""
    return functools.partial(fused_attention, float32_precision=float32_precision(dtype_name))


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa_math": SDPBackend.MATH,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend_name]

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fn


def provider(name: str, dtype_name: str):
    if name == "fused":
        return fused(dtype_name)
    if name == "reference":
        return attention_reference
    return _sdpa(name)


def make_pass(fn, pass_name: str, q, k, v, do):
    if pass_name == "fwd":
        return lambda: fn(q, k, v)
    if pass_name == "fwd_bwd":
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)

    def dbwd():
        grads = torch.autograd.grad(fn(q, k, v), (q, k, v), do, create_graph=True)
        return torch.autograd.grad(sum(g.float().square().sum() for g in grads), (q, k, v))

    return dbwd


def applicable(name: str, pass_name: str, dtype: torch.dtype) -> bool:
    if name in ("sdpa_flash", "sdpa_cudnn"):
        return pass_name != "dbwd" and dtype != torch.float32
    return True


def measure(fn, pass_name, q, k, v, do, cuda_graph: bool = False) -> dict:
    """ms (median, eager), peak_bytes (above the inputs) and, with `cuda_graph`,
    ms_graph (median of graph replays) of one pass."""
    import triton

    run = make_pass(fn, pass_name, q, k, v, do)
    run()  # compile / warm up, and fail fast (OOM) before timing
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    out = dict(ms=triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median"))
    out["peak_bytes"] = peak
    if cuda_graph:
        out["ms_graph"] = triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median")
    return out


def bench(
    ns, ds, dtypes, providers, passes=PASSES, cuda_graph=False, batch=4, heads=8
) -> pd.DataFrame:
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    for dname in dtypes:
        dtype = DTYPES[dname]
        for d in ds:
            for n in ns:
                try:
                    q, k, v, do = (
                        torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, generator=gen)
                        for _ in range(4)
                    )
                except torch.OutOfMemoryError:  # the inputs alone: every cell of the shape OOM
                    q = k = v = do = None
                for t in (q, k, v):
                    if t is not None:
                        t.requires_grad_()
                for name in providers:
                    fn = provider(name, dname)
                    for pass_name in passes:
                        if not applicable(name, pass_name, dtype):
                            continue
                        row = dict(
                            dtype=dname, d=d, n=n, provider=name, pass_=pass_name, bh=batch * heads
                        )
                        nan = float("nan")
                        row.update(ms=nan, peak_bytes=nan, ms_graph=nan)
                        try:
                            if q is None:
                                raise torch.OutOfMemoryError("the inputs do not fit")
                            row.update(measure(fn, pass_name, q, k, v, do, cuda_graph))
                            row.update(status="OK")
                        except torch.OutOfMemoryError:
                            row.update(status="OOM")
                        except (RuntimeError, ValueError) as e:  # no kernel for this shape
                            row.update(status=f"ERROR: {str(e).splitlines()[0][:80]}")
                        torch.cuda.empty_cache()
                        rows.append(row)
                        graph = f" (graph {row['ms_graph']:.3f} ms)" if cuda_graph else ""
                        print(
                            f"{dname} D={d} N={n:6d} {name:10s} {pass_name:7s} "
                            f"{row['ms']:9.3f} ms{graph} {row['peak_bytes'] / 2**20:10.1f} MiB "
                            f"{row['status']}",
                            flush=True,
                        )
                del q, k, v, do
    return pd.DataFrame(rows).rename(columns={"pass_": "pass"})
