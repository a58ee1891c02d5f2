"""Meta-batch data parallelism on 2 gloo processes equals one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.multiprocessing as mp
from support import TINY

from phase12.distributed import init_world
from phase12.train import build_step

ROOT = Path(__file__).resolve().parents[2]
CFG = TINY.replace(dtype="float64", meta_batch=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(world=None):
    step = build_step([CFG], torch.device("cpu"), *([world] if world else []))
    for _ in range(CFG.outer_steps):
        step()
    return {n: p.detach() for n, p in step.params.items()}, step.history


def _rank(rank: int, size: int, port: int, out: str):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    world = init_world(torch.device("cpu"))
    params, history = train(world)
    torch.save({"params": params, "history": history}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_run(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    params, history = train()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, p in params.items():  # Adam stepped identically on every rank
            torch.testing.assert_close(got["params"][name], p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["history"], history, rtol=1e-12, atol=1e-14)


def torchrun(args, out):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "phase12",
        *args,
        "--out",
        str(out),
    ]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_torchrun_command_line(tmp_path):
    args = [
        "--k",
        "2",
        "--meta-batch",
        "4",
        "--outer-steps",
        "3",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = torchrun(args, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("status OK") == 1  # only rank 0 prints
    from phase12 import cli

    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    two = pd.read_csv(tmp_path / "two" / "runs.csv")
    one = pd.read_csv(tmp_path / "one" / "runs.csv")
    assert len(two) == 1 and two.loc[0, "world_size"] == 2 and one.loc[0, "world_size"] == 1
    h2 = pd.read_csv(tmp_path / "two" / "history" / "reference_FULL_k2_seed0.csv.gz")
    h1 = pd.read_csv(tmp_path / "one" / "history" / "reference_FULL_k2_seed0.csv.gz")
    pd.testing.assert_frame_equal(h2, h1, rtol=1e-5)


def test_indivisible_meta_batch_is_refused(tmp_path):
    proc = torchrun(["--meta-batch", "5", "--device", "cpu"], tmp_path / "x")
    assert proc.returncode != 0
    assert proc.stderr.count("error: --meta-batch 5 does not divide over 2 ranks") == 1
    assert not (tmp_path / "x").exists()
