"""`run.py bench ...`: flags checked before any work, tables and CSVs written."""

import os

import pandas as pd
import pytest
import torch
from support import exit_code

from phase12 import cli


def test_bench_step_writes_tables_and_plot(tmp_path):
    out = tmp_path / "bench"
    args = [
        "bench",
        "step",
        "--device",
        "cpu",
        "--modes",
        "FO_STRICT",
        "--k",
        "1,2",
        "--backends",
        "reference",
        "--meta-batch",
        "2",
        "--seq-len",
        "8",
        "--reps",
        "1",
        "--warmup",
        "1",
        "--scaling",
        "--scaling-k",
        "1,2",
        "--scaling-meta-batch",
        "2,4",
        "--scaling-seq-len",
        "8,16",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    step = pd.read_csv(out / "step.csv")
    assert list(step["mode"]) == ["FO_STRICT"] * 2 and (step["median_step_ms"] > 0).all()
    scaling = pd.read_csv(out / "scaling.csv")
    # FULL and FO_STRICT at every axis value; the axes cross at k 2, B 2, T 8, timed once.
    assert len(scaling) == 2 * (1 + 1 + 1 + 1)
    assert not scaling.duplicated(["mode", "k", "meta_batch", "seq_len"]).any()
    assert set(scaling.loc[scaling["meta_batch"] == 4, "k"]) == {2}  # the largest --k, not 20
    assert (out / "scaling.png").stat().st_size > 10_000


def test_bench_tiles_refuses_bad_cells_and_needs_cuda(capsys):
    assert cli.main(["bench", "tiles", "--cells", "fp32:4096:64:backward"]) == 2
    assert "bad cell 'fp32:4096:64:backward'" in capsys.readouterr().err
    assert cli.main(["bench", "tiles", "--cells", "fp32:0:64:bwd"]) == 2
    assert "bad cell 'fp32:0:64:bwd'" in capsys.readouterr().err
    assert cli.main(["bench", "tiles", "--cells", "fp32:64:64:bwd,fp32:064:64:bwd"]) == 2
    assert "cell 'fp32:064:64:bwd' given twice" in capsys.readouterr().err
    assert cli.main(["bench", "tiles", "--candidates", "32x32x4x1,32x32x4x1"]) == 2
    assert "candidate '32x32x4x1' given twice" in capsys.readouterr().err
    assert (
        cli.main(["bench", "tiles", "--cells", "bf16:1024:64:bwd", "--candidates", "32x32x4"]) == 2
    )
    assert "bad candidate '32x32x4'" in capsys.readouterr().err
    assert cli.main(["bench", "tiles", "--candidates", "24x32x4x1"]) == 2
    assert "powers of two >= 16" in capsys.readouterr().err
    assert cli.main(["bench", "tiles", "--cells", "bf16:1024:64:bwd"]) == 2
    assert "error: the tile sweep needs a CUDA device" in capsys.readouterr().err


def test_bench_attention_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the message shown without CUDA")
    assert cli.main(["bench", "attention"]) == 2
    assert "error: the attention benchmark needs a CUDA device" in capsys.readouterr().err


def test_bench_attention_refuses_unknown_names_and_empty_sizes(capsys):
    assert exit_code("bench", "attention", "--passes", "fwd,backward") == 2
    assert "invalid choice 'backward'" in capsys.readouterr().err
    assert exit_code("bench", "attention", "--providers", "fused,flash") == 2
    assert "invalid choice 'flash'" in capsys.readouterr().err
    assert exit_code("bench", "attention", "--n", "128,0") == 2
    assert "--n: '128,0': 0 is not a positive integer" in capsys.readouterr().err
    assert exit_code("bench", "attention", "--d", "-1") == 2
    assert "--d: '-1': -1 is not a positive integer" in capsys.readouterr().err


def test_bench_step_refuses_bad_grids_before_any_work(tmp_path, capsys):
    out = ["--device", "cpu", "--backends", "reference", "--out", str(tmp_path / "b")]
    assert exit_code("bench", "step", "--k", "-1", *out) == 2
    assert "error: --k must be >= 0" in capsys.readouterr().err
    assert exit_code("bench", "step", "--modes", "XX", *out) == 2
    assert "invalid choice 'XX'" in capsys.readouterr().err
    assert exit_code("bench", "step", "--execution", "fast", *out) == 2
    assert "invalid choice 'fast'" in capsys.readouterr().err
    assert exit_code("bench", "step", "--breakdown", *out) == 2
    assert "--breakdown profiles GPU kernels; it needs --device cuda" in capsys.readouterr().err
    assert exit_code("bench", "step", "--execution", "eager,graph", *out) == 2
    assert (
        "--execution graph replays CUDA graphs; it needs --device cuda" in capsys.readouterr().err
    )
    assert exit_code("bench", "step", "--reps", "1000000000", "--warmup", "1000000000", *out) == 2
    assert "--warmup and --reps: outer_steps 3000000000 needs" in capsys.readouterr().err
    assert exit_code("bench", "step", "--scaling", "--scaling-k", "-1", *out) == 2
    assert "--scaling-k -1: inner_steps must be >= 0" in capsys.readouterr().err
    assert exit_code("bench", "step", "--modes", "FULL", "--k", str(10**17), *out) == 2
    assert f"--k {10**17}, FULL, reference, float32: this run needs at least" in (
        capsys.readouterr().err
    )
    # Each cell is checked as it will run (FO at k 1 keeps one copy a task, not FULL k 20's).
    huge = ["--modes", "FO", "--k", "1", "--meta-batch", str(10**9)]
    assert exit_code("bench", "step", *huge, *out) == 2
    err = capsys.readouterr().err
    assert "--k 1, FO, reference, float32: this run needs at least" in err
    assert f"for {4 + 10**9} copies of the parameters" in err
    assert exit_code("bench", "step", "--scaling-seq-len", "64", *out) == 2  # was ignored
    assert "--scaling-seq-len sets an axis of the scaling table; add --scaling" in (
        capsys.readouterr().err
    )
    assert exit_code("bench", "step", "--seq-len", "3", *out) == 2  # a flag to fix it with
    assert "--signal-positions must be in 1..seq_len-1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    short = ["--seq-len", "3", "--signal-positions", "2", "--k", "1", "--modes", "FO"]
    assert exit_code("bench", "step", *short, "--reps", "1", "--warmup", "0", *out) == 0


def test_bench_step_leaves_out_the_cells_beyond_a_backends_limits(tmp_path, capsys, interpreter):
    """Said on stderr before any work; a table with no cell left is refused."""
    out = ["--device", "cpu", "--out", str(tmp_path / "b"), "--reps", "1", "--warmup", "0"]
    small = ["--meta-batch", "1", "--seq-len", "4", "--dim", "4", "--signal-positions", "1"]
    grid = ["--modes", "FO", "--ablations", "frozen_softmax_stats", "--k", "1", *small]
    wide = ["--backends", "triton_step", "--dim", "128"]
    assert exit_code("bench", "step", *grid, *wide, *out) == 2
    err = capsys.readouterr().err
    assert "no cell of the table can run here: triton_step: the fused inner step" in err
    assert not (tmp_path / "b").exists()
    assert exit_code("bench", "step", *grid, "--backends", "reference,triton_step", *out) == 0
    err = capsys.readouterr().err
    assert "note: cells left out, beyond their backend's limits: triton_step: its kernels" in err
    rows = pd.read_csv(tmp_path / "b" / "step.csv")
    assert list(zip(rows.backend, rows.ablation, strict=True)) == [
        ("reference", "none"),
        ("reference", "frozen_softmax_stats"),
        ("triton_step", "none"),
    ]


def test_bench_help_reaches_the_named_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "attention", "--help"])
    assert e.value.code == 0 and "--cuda-graph" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    assert "step,attention,tiles,distributed" in capsys.readouterr().out


def test_distributed_benchmark_on_cpu(tmp_path):
    """`bench distributed` with 2 gloo processes and 2 CPU sweep workers (tiny sizes)."""
    args = ["--device", "cpu", "--meta-batch", "4", "--k", "1", "--outer-steps", "3"]
    args += ["--sweep-outer-steps", "2", "--sweep-k", "1", "--sweep-seeds", "0"]
    assert (
        exit_code("bench", "distributed", *args, "--sweep-modes", "FULL,FO", "--out", str(tmp_path))
        == 0
    )
    df = pd.read_csv(tmp_path / "distributed.csv")
    sharding = df[df.measurement == "meta-batch sharding"]
    assert sorted(sharding.processes) == [1, 2] and sharding.losses_agree.all()
    assert (sharding.backend == "reference").all()  # the CPU default
    sweep = df[df.measurement == "sweep"]
    assert sorted(sweep.processes) == [1, 2] and (sweep.runs_ok == 2).all()
    assert (df.speedup > 0).all()


def test_distributed_benchmark_refuses_bad_input(capsys):
    assert exit_code("bench", "distributed", "--device", "cpu", "--meta-batch", "5") == 2
    assert "does not divide over 2 processes" in capsys.readouterr().err
    assert exit_code("bench", "distributed", "--device", "cpu", "--backends", "flash") == 2
    assert "invalid choice 'flash'" in capsys.readouterr().err
    for flags, message in [
        (["--k", "-1"], "error: --k must be >= 0"),
        (["--meta-batch", "0"], "error: --meta-batch must be positive"),
        (["--sweep-outer-steps", "0"], "error: --sweep-outer-steps must be positive"),
        (["--sweep-seeds", "-1"], "error: --sweep-seeds must be in 0..2**32-1"),
        (["--k", str(10**14), "--no-sweep"], "this run needs at least"),  # not a child's traceback
    ]:
        assert exit_code("bench", "distributed", "--device", "cpu", *flags) == 2
        assert message in capsys.readouterr().err


def test_bench_step_times_the_maps_shapes_and_precisions(tmp_path, capsys):
    out = ["--out", str(tmp_path / "b"), "--device", "cpu", "--reps", "1", "--warmup", "1"]
    grid = ["--modes", "FULL", "--k", "1", "--backends", "reference", "--meta-batch", "2"]
    grid += ["--seq-len", "6", "--dim", "8", "--dtypes", "float32,bfloat16,autocast_float16"]
    assert exit_code("bench", "step", *grid, *out) == 0
    rows = pd.read_csv(tmp_path / "b" / "step.csv")
    assert list(rows["dtype"]) == ["float32", "bfloat16", "autocast_float16"]
    assert set(rows["dim"]) == {8} and set(rows["seq_len"]) == {6}
    capsys.readouterr()
    grid = ["--backends", "triton_step", "--dtypes", "bfloat16", "--k", "1", "--dim", "128"]
    assert exit_code("bench", "step", *grid, *out) == 2
    assert "supports D <= 64; got D = 128 (use backend triton_fused)" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_step_breakdown_splits_the_graph_step(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "step", "--device", "cuda", "--modes", "FULL", "--k", "2", "--breakdown"]
    args += ["--backends", "reference,triton_step", "--reps", "3", "--out", str(out)]
    assert cli.main(args) == 0
    parts = pd.read_csv(out / "breakdown.csv")
    assert list(parts.backend) == ["reference", "triton_step"]
    # Launching kernel by kernel from Python costs more than replaying them in a graph, and
    # an eager step is mostly host time (GPU work is profiled on eager steps).
    assert (parts.host_ms > 0).all() and (parts.gpu_ms > 0).all() and (parts.gpu_ops > 10).all()
    assert (parts.gpu_ms < parts.eager_ms).all()


@pytest.mark.gpu
def test_bench_attention_records_a_cell_a_provider_has_no_kernel_for(tmp_path):
    args = ["bench", "attention", "--n", "128", "--d", "64,256", "--dtypes", "fp32"]
    args += ["--providers", "fused,sdpa_math", "--passes", "fwd", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    cells = pd.read_csv(tmp_path / "attention.csv").set_index(["provider", "d"])["status"]
    assert cells[("fused", 256)].startswith("ERROR: triton_fused supports head dims 1..128")
    assert (cells.drop(("fused", 256)) == "OK").all() and len(cells) == 4


def test_bench_tiles_hands_its_flags_to_the_sweep(monkeypatch, tmp_path, capsys):
    from phase12.benchmarks import tiles
    from phase12.cli import bench

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tiles, "sweep", lambda *a: seen.setdefault("args", a))
    out = tmp_path / "t"
    argv = ["bench", "tiles", "--cells", "bf16:1024:64:dbwd", "--candidates", "32x32x4x1"]
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels cannot run on this "CUDA"
        assert cli.main([*argv, "--out", str(out)]) == 2
        assert "the tile sweep cannot run here: the Triton kernels cannot run on CUDA with " in (
            capsys.readouterr().err
        )
    monkeypatch.setattr(bench, "check_backend", lambda *a: None)
    assert cli.main([*argv, "--both-structures", "--out", str(out)]) == 0
    cells, csv = [("bf16", 1024, 64, "dbwd")], out / "tiles.csv"
    assert seen.pop("args") == (cells, csv, [(32, 32, 4, 1)], True)
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert seen["args"][3] is False


@pytest.mark.parametrize("what", ["step", "distributed"])
def test_benchmarks_refuse_an_out_they_cannot_write_before_any_work(tmp_path, capsys, what):
    (tmp_path / "file").write_text("")
    flags = ["--device", "cpu", "--backends", "reference", "--out", str(tmp_path / "file")]
    assert exit_code("bench", what, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write to")
