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
Out-of-memory cells are recorded as OOM. B*H = 32 (B = 4, H = 8).

Eager times include the host's cost of issuing the kernels: a pass that takes less GPU
time than its Python and autograd overhead measures the host. `--cuda-graph` also times
each pass replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`, column
`ms_graph`): the GPU time alone, which is what the engine's captured outer step sees.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from analysis.report import markdown_table
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
                q, k, v, do = (
                    torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, generator=gen)
                    for _ in range(4)
                )
                for t in (q, k, v):
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
                            row.update(measure(fn, pass_name, q, k, v, do, cuda_graph))
                            row.update(status="OK")
                        except torch.OutOfMemoryError:
                            row.update(status="OOM")
                        except RuntimeError as e:  # e.g. no kernel for this shape/dtype
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


def table(df: pd.DataFrame) -> str:
    """Markdown: one row per (dtype, D, N, pass), providers side by side (ms, MiB, and
    the graph-replay ms in brackets where measured)."""
    df = df.copy()
    df["cell"] = [
        s if s != "OK" else f"{ms:.3f} ms / {b / 2**20:.0f} MiB" + (f" [{g:.3f}]" if g == g else "")
        for s, ms, b, g in zip(
            df["status"], df["ms"], df["peak_bytes"], df["ms_graph"], strict=True
        )
    ]
    wide = df.pivot_table(
        index=["dtype", "d", "pass", "n"], columns="provider", values="cell", aggfunc="first"
    ).reset_index()
    key = ["dtype", "d", "pass", "n"]

    def ms_of(provider: str, column: str = "ms") -> pd.Series:
        return df[df.provider == provider].set_index(key)[column]

    ratios = {
        "math/fused": ms_of("sdpa_math") / ms_of("fused"),
        "fused/flash": ms_of("fused") / ms_of("sdpa_flash"),
        "fused/flash [graph]": ms_of("fused", "ms_graph") / ms_of("sdpa_flash", "ms_graph"),
    }
    for name, ratio in ratios.items():
        if ratio.notna().any():
            text = ratio.rename(name).map(lambda x: f"{x:.2f}x" if x == x else "-")
            wide = wide.join(text, on=key)
    return markdown_table(wide)


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
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--passes", default=",".join(PASSES), help="comma-separated passes")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time every pass replayed from a CUDA graph (GPU time without the host's)",
    )
    p.add_argument("--out", type=Path, default=Path("out/bench_attention"))
    args = p.parse_args(argv)
    unknown = [
        x
        for given, known in ((args.providers, PROVIDERS), (args.passes, PASSES))
        for x in given.split(",")
        if x not in known
    ] + [x for x in args.dtypes.split(",") if x not in DTYPES]
    if unknown:
        print(
            f"error: unknown {', '.join(map(repr, unknown))}; providers are {PROVIDERS}, "
            f"passes {PASSES}, dtypes {tuple(DTYPES)}",
            file=sys.stderr,
        )
        return 2
    if not torch.cuda.is_available():
        print("error: the attention benchmark needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    df = bench(
        [int(x) for x in args.n.split(",")],
        [int(x) for x in args.d.split(",")],
        args.dtypes.split(","),
        args.providers.split(","),
        args.passes.split(","),
        args.cuda_graph,
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
