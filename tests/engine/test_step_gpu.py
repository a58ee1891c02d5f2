"""Whole-step CUDA graph replay against eager execution (CUDA only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phase12.config import RunConfig
from phase12.step import capture
from phase12.train import build_step

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("backend", ["reference", "triton_fused", "triton_step"])
@pytest.mark.parametrize("mode", ["FULL", "FO_STRICT"])
def test_graph_replay_equals_eager(mode, backend):
    cfg = RunConfig(
        device="cuda", mode=mode, backend=backend, inner_steps=5, outer_steps=40, seed=3
    )
    device = torch.device("cuda")
    eager = build_step([cfg], device)
    for _ in range(cfg.outer_steps):
        eager()
    graphed = build_step([cfg], device)
    graph = capture(graphed)
    for _ in range(cfg.outer_steps):
        graph.replay()
    torch.cuda.synchronize()
    # Same tasks (same generator stream), same arithmetic: float32 rounding only.
    torch.testing.assert_close(graphed.history, eager.history, rtol=1e-4, atol=1e-5)
    for name, p in eager.params.items():
        torch.testing.assert_close(graphed.params[name], p, rtol=1e-4, atol=1e-6)
    assert int(graphed.counter) == cfg.outer_steps


@pytest.mark.parametrize("backend", ["triton_fused", "triton_step"])
def test_seed_batched_graph_replay_equals_eager(backend):
    cfg = RunConfig(device="cuda", backend=backend, inner_steps=3, outer_steps=20)
    configs = [cfg.replace(seed=s) for s in (0, 1)]
    device = torch.device("cuda")
    eager = build_step(configs, device)
    for _ in range(cfg.outer_steps):
        eager()
    graphed = build_step(configs, device)
    graph = capture(graphed)
    for _ in range(cfg.outer_steps):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graphed.history, eager.history, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_capture_on_a_device_that_is_not_the_current_one():
    """A sweep worker's device need not be the current device (graphs capture on the
    current device's stream unless told otherwise)."""
    cfg = RunConfig(device="cuda:1", inner_steps=2, outer_steps=5)
    assert torch.cuda.current_device() == 0
    eager = build_step([cfg], torch.device("cuda:1"))
    for _ in range(cfg.outer_steps):
        eager()
    graphed = build_step([cfg], torch.device("cuda:1"))
    graph = capture(graphed)
    for _ in range(cfg.outer_steps):
        graph.replay()
    torch.cuda.synchronize(1)
    torch.testing.assert_close(graphed.history, eager.history, rtol=1e-4, atol=1e-5)


def test_first_run_of_a_fresh_process_on_an_explicit_device():
    """Memory statistics are read before anything else touches CUDA in a new process."""
    code = (
        "from phase12.config import RunConfig; from phase12.train import run_experiment;"
        "r = run_experiment(RunConfig(device='cuda:0', inner_steps=2, outer_steps=3));"
        "print(r.status, r.row['cuda_graph'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["OK", "True"]


@pytest.mark.parametrize(
    "flags,backend,note",
    [
        ([], "triton_step", None),
        (["--ablation", "frozen_softmax_stats"], "triton_fused", "triton_step: its kernels"),
        (["--dtype", "autocast_bfloat16"], "triton_fused", "compute in float32, not in"),
    ],
)
def test_a_run_that_names_no_backend_takes_the_fastest_on_a_gpu(flags, backend, note):
    argv = ["--k", "2", "--outer-steps", "3", "--no-save", "--no-progress", "--json", *flags]
    proc = subprocess.run(
        [sys.executable, "run.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert (row["backend"], row["status"], row["device"]) == (backend, "OK", "cuda")
    said = [line for line in proc.stderr.splitlines() if line.startswith("note: running on")]
    assert said == ([] if note is None else [said[0]]) and (note is None or note in said[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_torchrun_on_two_gpus_equals_one_gpu_with_graphs(tmp_path):
    """NCCL all-reduce inside the captured step: 2 ranks give the 1-process run."""
    args = ["--k", "3", "--meta-batch", "8", "--outer-steps", "20", "--no-progress"]
    args += ["--cuda-graph", "on", "--json", "--no-save", "--backend", "reference"]
    runs = {}
    for ranks in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        proc = subprocess.run(
            [sys.executable, *launcher, "-m", "phase12", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[ranks] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[2]["world_size"] == 2 and runs[2]["cuda_graph"] is True
    assert runs[2]["final_loss"] == pytest.approx(runs[1]["final_loss"], rel=1e-5)


def test_failed_capture_falls_back_to_fresh_eager_state(monkeypatch):
    """A capture that fails after touching the state (as a real failure can) leaves none of it."""
    import phase12.train as train
    from phase12.distributed import SINGLE_PROCESS

    def failing_capture(step, warmup=1):
        step()  # parameters, Adam and the task generators move on
        raise RuntimeError("capture refused")

    monkeypatch.setattr(train, "capture", failing_capture)
    cfg = RunConfig(device="cuda", inner_steps=2, outer_steps=3)
    device = torch.device("cuda")
    state, run_step, graphed = train.prepare_step([cfg], device, SINGLE_PROCESS)
    assert not graphed and run_step is state and int(state.counter) == 0
    fresh = build_step([cfg], device)
    for name, p in fresh.params.items():
        torch.testing.assert_close(state.params[name], p, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_sweep_on_two_gpus_uses_both_with_graphs_and_matches_one_gpu(tmp_path, monkeypatch):
    """The first device runs in a thread of the sweep's process, the second in a worker."""
    import pandas as pd

    import phase12.runners as runners
    from phase12.grid import SweepSpec
    from phase12.sweep import run_sweep

    serve = runners._serve

    class OneGroup:  # the queue as this process's thread sees it: one group, then the end
        def __init__(self, tasks):
            self.tasks, self.taken = tasks, False

        def get(self):
            taken, self.taken = self.taken, True
            return None if taken else self.tasks.get()

    def serve_one_group(runner, device, device_runners, tasks, results):
        # This process's thread takes one group and stops, so the worker process must run
        # the rest (with tiny cells the thread could finish everything before the worker
        # has imported torch). The worker, a fresh process, runs the unpatched function.
        serve(runner, device, device_runners, OneGroup(tasks), results)

    monkeypatch.setattr(runners, "_serve", serve_one_group)
    spec = SweepSpec(
        base=RunConfig(device="cuda", outer_steps=10),
        modes=("FULL", "FO"),
        inner_steps=(1, 2),
        seeds=(0, 1),
    )
    runs = {}
    for devices in (("cuda:0",), ("cuda:0", "cuda:1")):
        folder = tmp_path / str(len(devices))
        counts = run_sweep(spec, folder, progress=False, devices=devices)
        assert counts == {"skipped": 0, "OK": 8}  # 2 modes x 2 k x 2 seeds
        df = pd.read_csv(folder / "runs.csv").set_index("run_id")
        assert df.cuda_graph.all() and not df.index.duplicated().any()
        used = {json.loads((folder / "meta" / f"{r}.json").read_text())["device"] for r in df.index}
        assert used == set(devices)  # the metadata names the device each run ran on
        runs[len(devices)] = df
    pd.testing.assert_series_equal(
        runs[2].final_loss.sort_index(), runs[1].final_loss.sort_index(), rtol=1e-5
    )
