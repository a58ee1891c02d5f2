"""Attention benchmark: fused Triton vs the reference ops vs torch SDPA (CUDA only).

    python run.py bench attention [--n 128,512,...] [--d 64,128] [--dtypes bf16,fp32] [--out DIR]

For each (dtype, D, N = M) and each provider, the median time (triton.testing.do_bench)
and the peak memory above the inputs of three passes:

    fwd      o = attn(q, k, v)
    fwd_bwd  o, then dq, dk, dv = vjp(o, do)
    dbwd     o, dq/dk/dv with create_graph, then backward of sum(dq^2 + dk^2 + dv^2)
             (a gradient-penalty style grad-of-grad)

Providers: `fused` (kernels.fused_attention), `reference` (kernels.reference: PyTorch
ops, float32 compute), `sdpa_math` (SDPA's math backend; the only SDPA backend with a
double backward), `sdpa_flash`, `sdpa_cudnn` (first order only, bf16/fp16 only).
Out-of-memory cells are recorded as OOM. B*H = 32 (B = 4, H = 8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from kernels import fused_attention
from kernels.reference import attention_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "fwd_bwd", "dbwd")


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


def provider(name: str):
    if name == "fused":
        return fused_attention
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


def measure(fn, pass_name, q, k, v, do) -> tuple[float, int]:
    """(median ms, peak bytes above the inputs) of one pass."""
    import triton

    run = make_pass(fn, pass_name, q, k, v, do)
    run()  # compile / warm up, and fail fast (OOM) before timing
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
    return ms, peak


def bench(ns, ds, dtypes, providers, batch=4, heads=8, causal=False) -> pd.DataFrame:
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    for dname in dtypes:
        dtype = DTYPES[dname]
        for d in ds:
            for n in ns:
                q, k, v, do = (
                    torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, generator=gen)
                    for _ in range(4)
                )
                for t in (q, k, v):
                    t.requires_grad_()
                for name in providers:
                    fn = provider(name)
                    for pass_name in PASSES:
                        if not applicable(name, pass_name, dtype):
                            continue
                        row = dict(
                            dtype=dname, d=d, n=n, provider=name, pass_=pass_name, bh=batch * heads
                        )
                        try:
                            ms, peak = measure(fn, pass_name, q, k, v, do)
                            row.update(ms=ms, peak_bytes=peak, status="OK")
                        except torch.OutOfMemoryError:
                            row.update(ms=float("nan"), peak_bytes=float("nan"), status="OOM")
                        except RuntimeError as e:  # e.g. no kernel for this shape/dtype
                            row.update(
                                ms=float("nan"),
                                peak_bytes=float("nan"),
                                status=f"ERROR: {str(e).splitlines()[0][:80]}",
                            )
                        torch.cuda.empty_cache()
                        rows.append(row)
                        print(
                            f"{dname} D={d} N={n:6d} {name:10s} {pass_name:7s} "
                            f"{row['ms']:9.3f} ms {row['peak_bytes'] / 2**20:10.1f} MiB "
                            f"{row['status']}",
                            flush=True,
                        )
                del q, k, v, do
    return pd.DataFrame(rows).rename(columns={"pass_": "pass"})


def table(df: pd.DataFrame) -> str:
    """Markdown: one row per (dtype, D, N, pass), providers side by side (ms, MiB)."""
    df = df.copy()
    df["cell"] = [
        s if s != "OK" else f"{ms:.3f} ms / {b / 2**20:.0f} MiB"
        for s, ms, b in zip(df["status"], df["ms"], df["peak_bytes"], strict=True)
    ]
    wide = df.pivot_table(
        index=["dtype", "d", "pass", "n"], columns="provider", values="cell", aggfunc="first"
    ).reset_index()
    fused = df[df.provider == "fused"].set_index(["dtype", "d", "pass", "n"])["ms"]
    math_ = df[df.provider == "sdpa_math"].set_index(["dtype", "d", "pass", "n"])["ms"]
    ratio = (math_ / fused).rename("math/fused")
    wide = wide.join(
        ratio.map(lambda x: f"{x:.1f}x" if x == x else "-"), on=["dtype", "d", "pass", "n"]
    )
    return wide.to_markdown(index=False) if hasattr(wide, "to_markdown") else wide.to_string()


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    ok = df[df.status == "OK"]
    grid = sns.relplot(
        data=ok,
        x="n",
        y="ms",
        hue="provider",
        style="provider",
        col="pass",
        row="dtype",
        kind="line",
        marker="o",
        facet_kws=dict(sharey=False),
        height=3,
        aspect=1.2,
    )
    grid.set(xscale="log", yscale="log", xlabel="N = M", ylabel="median time (ms)")
    grid.figure.suptitle("Attention, B*H = 32 (D = 64 and 128 pooled per line)", y=1.02)
    grid.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="run.py bench attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", default="128,512,1024,2048,4096,8192,16384", help="comma-separated N = M")
    p.add_argument("--d", default="64,128", help="comma-separated head dims")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument("--providers", default="fused,reference,sdpa_math,sdpa_flash,sdpa_cudnn")
    p.add_argument("--out", type=Path, default=Path("out/bench_attention"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the attention benchmark needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    df = bench(
        [int(x) for x in args.n.split(",")],
        [int(x) for x in args.d.split(",")],
        args.dtypes.split(","),
        args.providers.split(","),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    df.insert(0, "device_name", torch.cuda.get_device_name())
    df.to_csv(args.out / "attention.csv", index=False)
    plot(df, args.out / "attention.png")
    print(table(df))
    print(
        f"{torch.cuda.get_device_name()}: {len(df)} cells in {time.time() - t0:.0f} s, "
        f"written to {args.out}"
    )
    return 0
