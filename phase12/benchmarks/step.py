"""Outer-step benchmark: median time and peak memory of one meta-update.

    python run.py bench step [--modes FULL,FO,FO_STRICT] [--k 1,5,10,20]
                             [--backends reference,triton_fused,triton_step] [--device auto]
                             [--out DIR]

Each cell builds a fresh run (Phase 12 defaults unless overridden), runs `warmup`
outer steps, then times `reps` steps one by one and reports the median: CUDA events
around each step on the GPU (the step writes its metrics into a history of exactly
warmup + reps rows, so the step count must be fixed: no adaptive repetition), a host
clock on the CPU. The seed project's measured step times (docs/anchor-baselines.md,
an H200 and a 2-core CPU) are printed beside ours.
"""

from __future__ import annotations

import gc
import statistics
import time

import pandas as pd
import torch

from phase12.backends import device_for
from phase12.config import RunConfig
from phase12.provenance import device_name
from phase12.schema import SEED_STEP_S
from phase12.step import capture
from phase12.train import build_step


def time_steps(config: RunConfig, graph: bool, warmup: int, reps: int) -> tuple[float, int | None]:
    """(median seconds per outer step, peak CUDA bytes or None) for `config`."""
    device = device_for(config)
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
        device = device_for(cfg)
        median, peak = time_steps(cfg, execution == "graph", warmup, reps)
        seed = SEED_STEP_S.get((device.type, cfg.backend, cfg.mode))
        seed = (
            seed
            if (cfg.inner_steps, cfg.meta_batch, cfg.seq_len, cfg.dim, cfg.dtype)
            == (20, 16, 32, 64, "float32")
            else None
        )
        rows.append(
            dict(
                device_name=device_name(device),
                backend=cfg.backend,
                mode=cfg.mode,
                ablation=cfg.ablation,
                k=cfg.inner_steps,
                execution=execution,
                meta_batch=cfg.meta_batch,
                seq_len=cfg.seq_len,
                dim=cfg.dim,
                dtype=cfg.dtype,
                median_step_ms=median * 1e3,
                peak_mem_mib=None if peak is None else peak / 2**20,
                seed_step_ms=None if seed is None else seed * 1e3,
                speedup_vs_seed=None if seed is None else seed / median,
            )
        )
        r = rows[-1]
        print(
            f"{execution:5s} {cfg.backend:12s} {cfg.policy:9s} k={cfg.inner_steps:2d} "
            f"B={cfg.meta_batch:4d} T={cfg.seq_len:4d} D={cfg.dim:3d} {cfg.dtype:17s} "
            f"{r['median_step_ms']:9.2f} ms"
            + (f"  seed {r['seed_step_ms']:.0f} ms ({r['speedup_vs_seed']:.1f}x)" if seed else ""),
            flush=True,
        )
    return pd.DataFrame(rows)


def step_cells(
    base: RunConfig, modes, ks, backends, executions, ablations=(), dtypes=("float32",)
) -> list:
    """The main table: (modes and FULL's ablations) x k x backends x precisions x
    executions at the base shape."""
    policies = [(m, "none") for m in modes] + [("FULL", a) for a in ablations if a != "none"]
    return [
        (base.replace(backend=b, mode=m, ablation=a, inner_steps=k, dtype=d), x)
        for x in executions
        for b in backends
        for d in dtypes
        for m, a in policies
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
