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

With `--breakdown` (CUDA) each eager cell also runs `reps` steps under torch.profiler,
and `breakdown` splits a step's time into the GPU's work (kernels, copies, memsets),
the gaps between dependent kernels inside the graph (graph time - GPU work) and what
launching one by one from Python adds (eager time - graph time).
"""

from __future__ import annotations

import gc
import statistics
import time

import pandas as pd
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from phase12.backends import device_for
from phase12.config import RunConfig
from phase12.provenance import device_name
from phase12.schema import SEED_SHAPES, SEED_STEP_S
from phase12.step import capture
from phase12.train import build_step


def gpu_work(run, reps: int) -> tuple[float, float]:
    """(seconds of GPU activity, number of GPU activities) per call of `run`, over `reps`
    calls under torch.profiler: kernels, copies and memsets, summed as if serial."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in gpu) / 1e6 / reps, len(gpu) / reps


def time_steps(
    config: RunConfig, graph: bool, warmup: int, reps: int, profile_gpu: bool = False
) -> dict:
    """Median seconds per outer step (`median_s`) and peak CUDA bytes (`peak_bytes`, None
    on the CPU) for `config`; with `profile_gpu` (CUDA, eager) also `gpu_work`'s
    (`gpu_s`, `gpu_ops`) per step."""
    device = device_for(config)
    profile_gpu = profile_gpu and device.type == "cuda" and not graph
    # History rows for every call (capture's own calls are undone by restore()).
    steps = warmup + reps * (2 if profile_gpu else 1)
    state = build_step([config.replace(outer_steps=steps)], device)
    if device.type != "cuda":
        for _ in range(warmup):
            state()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            state()
            times.append(time.perf_counter() - t)
        return dict(median_s=statistics.median(times), peak_bytes=None)
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
    out = dict(
        median_s=statistics.median(times),
        peak_bytes=torch.cuda.max_memory_allocated(device) - mem_before,
    )
    if profile_gpu:
        out["gpu_s"], out["gpu_ops"] = gpu_work(run, reps)
    return out


def measure(cells, warmup: int, reps: int, profile_gpu: bool = False) -> pd.DataFrame:
    """One row per (config, execution) cell: median step time, peak memory, seed ratio;
    with `profile_gpu`, eager CUDA cells also get `gpu_ms` and `gpu_ops` per step."""
    rows = []
    for cfg, execution in cells:
        device = device_for(cfg)
        timed = time_steps(cfg, execution == "graph", warmup, reps, profile_gpu)
        median, peak = timed["median_s"], timed["peak_bytes"]
        seed = SEED_STEP_S.get((device.type, cfg.backend, cfg.mode))
        at_seed_shapes = all(getattr(cfg, k) == v for k, v in SEED_SHAPES.items())
        seed = seed if cfg.inner_steps == 20 and at_seed_shapes else None
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
        if "gpu_s" in timed:
            rows[-1].update(gpu_ms=timed["gpu_s"] * 1e3, gpu_ops=timed["gpu_ops"])
        r = rows[-1]
        print(
            f"{execution:5s} {cfg.backend:12s} {cfg.policy:9s} k={cfg.inner_steps:2d} "
            f"B={cfg.meta_batch:4d} T={cfg.seq_len:4d} D={cfg.dim:3d} {cfg.dtype:17s} "
            f"{r['median_step_ms']:9.2f} ms"
            + (f"  seed {r['seed_step_ms']:.0f} ms ({r['speedup_vs_seed']:.1f}x)" if seed else ""),
            flush=True,
        )
    return pd.DataFrame(rows)


CELL_KEYS = [
    "device_name", "backend", "mode", "ablation", "k", "meta_batch", "seq_len", "dim", "dtype",
]  # fmt: skip


def breakdown(steps: pd.DataFrame) -> pd.DataFrame:
    """Per cell measured both eager (with `gpu_ms`) and in a graph: the graph step's time
    split into GPU work and in-graph gaps, and the host time eager execution adds.

    Columns: CELL_KEYS, graph_ms, gpu_ms, gap_ms (graph - GPU work), host_ms (eager -
    graph), eager_ms, gpu_ops (GPU activities per step). Raises ValueError when no cell
    has both."""
    missing = ValueError("a breakdown needs cells timed eager (profiled) and in a graph")
    if "gpu_ms" not in steps:
        raise missing
    eager = steps[(steps.execution == "eager") & steps.gpu_ms.notna()]
    graph = steps[steps.execution == "graph"]
    both = eager.merge(graph, on=CELL_KEYS, suffixes=("_eager", "_graph"), validate="one_to_one")
    if both.empty:
        raise missing
    out = both[CELL_KEYS].assign(
        graph_ms=both.median_step_ms_graph,
        gpu_ms=both.gpu_ms_eager,
        gap_ms=both.median_step_ms_graph - both.gpu_ms_eager,
        host_ms=both.median_step_ms_eager - both.median_step_ms_graph,
        eager_ms=both.median_step_ms_eager,
        gpu_ops=both.gpu_ops_eager,
    )
    return out.reset_index(drop=True)


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


SCALING_FIELDS = {"k": "inner_steps", "meta_batch": "meta_batch", "seq_len": "seq_len"}


def scaling_cells(base: RunConfig, backends, execution: str, axes: dict[str, list[int]]) -> list:
    """How cost grows: FULL and FO_STRICT with one of k, meta-batch, T (SCALING_FIELDS'
    keys) varied at a time, each cell once (the axes cross at `base`)."""
    cells = (
        (base.replace(backend=b, mode=m, **{SCALING_FIELDS[axis]: v}), execution)
        for axis, values in axes.items()
        for v in values
        for b in backends
        for m in ("FULL", "FO_STRICT")
    )
    return list(dict.fromkeys(cells))
