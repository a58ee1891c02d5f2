"""Outer-step benchmark: median time and peak memory of one meta-update.

    python run.py bench step [--modes FULL,FO,FO_STRICT] [--k 1,5,10,20]
                             [--backends reference,triton_fused,triton_step] [--device auto]
                             [--out DIR]

Each cell builds a fresh run (Phase 12 defaults unless overridden), runs `--warmup`
outer steps, then times `--reps` steps one by one (CUDA events on GPU, a host clock
on CPU) and reports the median. The seed project's measured step times
(shared/docs/anchor-baselines.md, H200 and this 2-core CPU) are printed beside ours.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from phase12.config import ConfigError, RunConfig
from phase12.experiment import build_step, device_name
from phase12.step import capture

# Seed project, mean outer-step seconds at k = 20 (anchor-baselines.md).
SEED_STEP_S = {
    ("cuda", "reference", "FULL"): 0.974,
    ("cuda", "reference", "FO"): 0.493,
    ("cuda", "triton_fused", "FULL"): 1.024,
    ("cuda", "triton_fused", "FO"): 0.559,
    ("cpu", "reference", "FULL"): 1.34,
}


def time_steps(config: RunConfig, graph: bool, warmup: int, reps: int) -> tuple[float, int | None]:
    """(median seconds per outer step, peak CUDA bytes or None) for `config`."""
    device = config.validate()
    # History rows for every timed call (capture's own calls are undone by restore()).
    state = build_step([config.replace(outer_steps=warmup + reps)], device)
    if device.type != "cuda":
        for _ in range(warmup):
            state()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            state()
            times.append(time.perf_counter() - t)
        return statistics.median(times), None
    gc.collect()  # drop the previous cell's state before measuring this one's peak
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    mem_before = torch.cuda.memory_allocated(device)
    run = capture(state).replay if graph else state
    for _ in range(warmup):
        run()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) / 1e3 for s, e in events]
    return statistics.median(times), torch.cuda.max_memory_allocated(device) - mem_before


def measure(cells, warmup: int, reps: int) -> pd.DataFrame:
    """One row per (config, execution) cell: median step time, peak memory, seed ratio."""
    rows = []
    for cfg, execution in cells:
        device = cfg.validate()
        median, peak = time_steps(cfg, execution == "graph", warmup, reps)
        seed = SEED_STEP_S.get((device.type, cfg.backend, cfg.mode))
        seed = (
            seed if cfg.inner_steps == 20 and cfg.meta_batch == 16 and cfg.seq_len == 32 else None
        )
        rows.append(
            dict(
                device_name=device_name(device),
                backend=cfg.backend,
                mode=cfg.mode,
                k=cfg.inner_steps,
                execution=execution,
                meta_batch=cfg.meta_batch,
                seq_len=cfg.seq_len,
                median_step_ms=median * 1e3,
                peak_mem_mib=None if peak is None else peak / 2**20,
                seed_step_ms=None if seed is None else seed * 1e3,
                speedup_vs_seed=None if seed is None else seed / median,
            )
        )
        r = rows[-1]
        print(
            f"{execution:5s} {cfg.backend:12s} {cfg.mode:9s} k={cfg.inner_steps:2d} "
            f"B={cfg.meta_batch:4d} T={cfg.seq_len:4d} {r['median_step_ms']:9.2f} ms"
            + (f"  seed {r['seed_step_ms']:.0f} ms ({r['speedup_vs_seed']:.1f}x)" if seed else ""),
            flush=True,
        )
    return pd.DataFrame(rows)


def step_cells(base: RunConfig, modes, ks, backends, executions) -> list:
    """The main table: modes x k x backends x executions at the base shape."""
    return [
        (base.replace(backend=b, mode=m, inner_steps=k), x)
        for x in executions
        for b in backends
        for m in modes
        for k in ks
    ]


def scaling_cells(base: RunConfig, backends, execution: str, axes: dict[str, list[int]]) -> list:
    """How cost grows: FULL and FO_STRICT with one of k, meta-batch, T varied at a time."""
    field = {"k": "inner_steps", "meta_batch": "meta_batch", "seq_len": "seq_len"}
    return [
        (base.replace(backend=b, mode=m, **{field[axis]: v}), execution)
        for axis, values in axes.items()
        for v in values
        for b in backends
        for m in ("FULL", "FO_STRICT")
    ]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="run.py bench step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--modes", default="FULL,FO,FO_STRICT")
    p.add_argument("--k", default="1,5,10,20", help="comma-separated inner steps")
    p.add_argument("--backends", default="reference,triton_fused,triton_step")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--execution",
        default=None,
        help="eager and/or graph (default: eager,graph on CUDA, eager on CPU)",
    )
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also the scaling table: FULL and FO_STRICT against k, meta-batch and T",
    )
    p.add_argument("--scaling-k", default="1,5,10,20,40")
    p.add_argument("--scaling-meta-batch", default="16,64,256,1024")
    p.add_argument("--scaling-seq-len", default="32,128,512,1024,4096")
    p.add_argument("--out", type=Path, default=Path("out/bench_step"))
    args = p.parse_args(argv)
    base = RunConfig(device=args.device, meta_batch=args.meta_batch, seq_len=args.seq_len)
    try:
        for backend in args.backends.split(","):
            base.replace(backend=backend).validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = base.validate().type == "cuda"
    executions = (args.execution or ("eager,graph" if cuda else "eager")).split(",")
    backends = args.backends.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    df = measure(
        step_cells(base, args.modes.split(","), _ints(args.k), backends, executions),
        args.warmup,
        args.reps,
    )
    df.to_csv(args.out / "step.csv", index=False)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.scaling:
        from analysis.figures import scaling_plot

        axes = {
            "k": _ints(args.scaling_k),
            "meta_batch": _ints(args.scaling_meta_batch),
            "seq_len": _ints(args.scaling_seq_len),
        }
        cells = scaling_cells(base, backends, "graph" if cuda else "eager", axes)
        scaling = measure(cells, args.warmup, args.reps)
        scaling.to_csv(args.out / "scaling.csv", index=False)
        scaling_plot(scaling, base, args.out / "scaling.png")
        print(scaling.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0
