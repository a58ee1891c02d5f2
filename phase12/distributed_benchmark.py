"""Scaling over processes and devices: `python run.py bench distributed`.

    python run.py bench distributed [--processes 2] [--meta-batch 64,256] [--k 20]
                                    [--backends reference,triton_fused,triton_step]
                                    [--outer-steps 300] [--sweep-outer-steps 1000]
                                    [--device auto] [--out DIR]

Two measurements, each against one process (one device) in the same invocation, every
one a fresh subprocess running the commands a user would type:

* meta-batch sharding: `torchrun --nproc-per-node P run.py --mode FULL --k 20
  --meta-batch B --backend BACKEND --json` for P = 1 and P = --processes (one GPU per rank; gloo
  processes on the CPU): the run's mean outer-step time, the speed-up, and whether the
  final losses agree (they must: every rank samples the same global meta-batch);
* a sweep over devices: the same `run.py sweep` (default: the seed's long confirmation
  grid, 24 runs) with `--devices` listing 1 and P devices: wall time and speed-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from phase12.config import ConfigError, resolve_device
from phase12.experiment import device_name
from phase12.model import BACKENDS

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str:
    """stdout of `cmd` run from the repository root; a failure raises with its stderr."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        )
    return proc.stdout


def sharding_rows(args, device: str) -> list[dict]:
    """One row per (meta-batch, number of processes) from the single-run command."""
    rows = []
    for backend, meta_batch in itertools.product(args.backends, args.meta_batch):
        runs = {}
        for processes in (1, args.processes):
            launcher = ["-m", "torch.distributed.run", "--standalone"]
            out = _run(
                [sys.executable, *launcher, f"--nproc-per-node={processes}", "run.py"]
                + ["--mode", args.mode, "--k", str(args.k), "--meta-batch", str(meta_batch)]
                + ["--backend", backend]
                + ["--outer-steps", str(args.outer_steps), "--device", device]
                + ["--json", "--no-progress"]
            )
            runs[processes] = json.loads(out.strip().splitlines()[-1])
        one = runs[1]
        for processes, run in runs.items():
            rows.append(
                dict(
                    measurement="meta-batch sharding",
                    backend=backend,
                    meta_batch=meta_batch,
                    processes=processes,
                    step_ms=run["mean_outer_step_time_s"] * 1e3,
                    speedup=one["mean_outer_step_time_s"] / run["mean_outer_step_time_s"],
                    cuda_graph=run["cuda_graph"],
                    final_loss=run["final_loss"],
                    # Every rank samples the same global meta-batch: the loss must not change.
                    losses_agree=math.isclose(run["final_loss"], one["final_loss"], rel_tol=1e-5),
                )
            )
            print(_line(rows[-1]), flush=True)
    return rows


def sweep_rows(args, devices: list[str], folder: Path) -> list[dict]:
    """The same sweep on the first device alone and on all of `devices`."""
    rows = []
    for used in (devices[:1], devices):
        tag = f"devices{len(used)}"
        start = time.perf_counter()
        _run(
            [sys.executable, "run.py", "sweep", "--root", str(folder), "--tag", tag]
            + ["--modes", args.sweep_modes, "--backends", args.sweep_backends]
            + ["--k", args.sweep_k, "--seeds", args.sweep_seeds]
            + ["--outer-steps", str(args.sweep_outer_steps), "--devices", ",".join(used)]
            + ["--no-progress"]
        )
        wall = time.perf_counter() - start
        runs = pd.read_csv(folder / tag / "runs.csv")
        # Per-run times and devices, to see how the cells were spread over the devices.
        runs.to_csv(args.out / f"sweep_{tag}_runs.csv", index=False)
        rows.append(
            dict(
                measurement="sweep",
                processes=len(used),
                wall_s=wall,
                speedup=rows[0]["wall_s"] / wall if rows else 1.0,
                runs=len(runs),
                runs_ok=int((runs.status == "OK").sum()),
            )
        )
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv: list[str] | None = None) -> int:
    from run import ArgumentParser

    p = ArgumentParser(
        prog="run.py bench distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--processes", type=int, default=2, help="processes / devices (default 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cuda or cpu")
    p.add_argument("--mode", default="FULL")
    p.add_argument("--k", type=int, default=20)
    p.add_argument(
        "--backends",
        default=None,
        help="backends of the sharded runs (default: reference,triton_fused,triton_step on "
        "CUDA, reference on the CPU)",
    )
    p.add_argument("--meta-batch", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    p.add_argument("--outer-steps", type=int, default=300, help="steps of each sharded run")
    p.add_argument("--sweep-modes", default="FULL,FO,FO_STRICT")
    p.add_argument("--sweep-backends", default=None, help="default: reference,triton_fused on CUDA")
    p.add_argument("--sweep-k", default="10,20")
    p.add_argument("--sweep-seeds", default="0,1")
    p.add_argument("--sweep-outer-steps", type=int, default=1000)
    p.add_argument("--no-sweep", action="store_true", help="only the meta-batch sharding")
    p.add_argument("--out", type=Path, default=Path("out/bench_distributed"))
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if args.processes < 2:
            raise ConfigError("--processes must be at least 2")
        if device.type == "cuda" and torch.cuda.device_count() < args.processes:
            raise ConfigError(
                f"--processes {args.processes} needs as many GPUs; "
                f"{torch.cuda.device_count()} visible"
            )
        for meta_batch in args.meta_batch:
            if meta_batch % args.processes:
                raise ConfigError(
                    f"--meta-batch {meta_batch} does not divide over {args.processes} processes"
                )
        cuda = device.type == "cuda"
        if args.sweep_backends is None:
            args.sweep_backends = "reference,triton_fused" if cuda else "reference"
        default = "reference,triton_fused,triton_step" if cuda else "reference"
        args.backends = (args.backends or default).split(",")
        for backend in args.backends:
            if backend not in BACKENDS:
                raise ConfigError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    devices = [f"cuda:{i}" for i in range(args.processes)] if cuda else ["cpu"] * args.processes

    args.out.mkdir(parents=True, exist_ok=True)
    rows = sharding_rows(args, "cuda" if cuda else "cpu")
    if not args.no_sweep:
        with tempfile.TemporaryDirectory() as folder:
            rows += sweep_rows(args, devices, Path(folder))
    df = pd.DataFrame(rows)
    df.insert(0, "device_name", device_name(device))
    df.to_csv(args.out / "distributed.csv", index=False)
    for _, part in df.groupby("measurement", sort=False):
        table = part.dropna(axis=1, how="all").convert_dtypes()
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"written to {args.out / 'distributed.csv'}")
    return 0
