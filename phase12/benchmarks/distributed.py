"""Scaling over processes and devices: `python run.py bench distributed`.

    python run.py bench distributed [--processes 2] [--meta-batch 64,256] [--k 20]
                                    [--backends reference,triton_fused,triton_step]
                                    [--outer-steps 300] [--sweep-outer-steps 1000]
                                    [--device auto] [--out DIR]

Two measurements, each against one process (one device) in the same invocation, every
one a fresh subprocess running the commands a user would type:

* meta-batch sharding: `torchrun --nproc-per-node P -m phase12 --mode FULL --k 20
  --meta-batch B --backend BACKEND --json` for P = 1 and P = --processes (one GPU per rank;
  gloo processes on the CPU): the run's mean outer-step time, the speed-up, and whether the
  final losses agree (they must: every rank samples the same global meta-batch);
* a sweep over devices: the same `python -m phase12 sweep` (default: the seed's long confirmation
  grid, 24 runs) with `--devices` listing 1 and P devices: wall time and speed-up.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def _run(cmd: list[str]) -> str:
    """stdout of `cmd` (importing what this process imports); a failure raises with its
    stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        )
    return proc.stdout


def sharding_rows(
    processes: int,
    backends: Sequence[str],
    meta_batches: Sequence[int],
    run_flags: list[str],
    device: str,
) -> list[dict]:
    """One row per (backend, meta-batch, number of processes) from the single-run
    command (`python -m phase12 RUN_FLAGS`) under torchrun with 1 and `processes`."""
    rows = []
    for backend, meta_batch in itertools.product(backends, meta_batches):
        runs = {}
        for nproc in (1, processes):
            launcher = ["-m", "torch.distributed.run", "--standalone"]
            out = _run(
                [sys.executable, *launcher, f"--nproc-per-node={nproc}", "-m", "phase12"]
                + [*run_flags, "--meta-batch", str(meta_batch), "--backend", backend]
                + ["--device", device, "--json", "--no-progress", "--no-save"]
            )
            runs[nproc] = json.loads(out.strip().splitlines()[-1])
        one = runs[1]
        for nproc, run in runs.items():
            rows.append(
                dict(
                    measurement="meta-batch sharding",
                    backend=backend,
                    meta_batch=meta_batch,
                    processes=nproc,
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


def sweep_rows(sweep_flags: list[str], devices: list[str], folder: Path, out: Path) -> list[dict]:
    """The same sweep (`python -m phase12 sweep SWEEP_FLAGS`) on the first device alone
    and on all of `devices`; each sweep's runs.csv is kept in `out`."""
    rows = []
    for used in (devices[:1], devices):
        tag = f"devices{len(used)}"
        start = time.perf_counter()
        _run(
            [sys.executable, "-m", "phase12", "sweep", "--root", str(folder), "--tag", tag]
            + [*sweep_flags, "--devices", ",".join(used), "--no-progress"]
        )
        wall = time.perf_counter() - start
        runs = pd.read_csv(folder / tag / "runs.csv")
        # Per-run times and devices, to see how the cells were spread over the devices.
        runs.to_csv(out / f"sweep_{tag}_runs.csv", index=False)
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
