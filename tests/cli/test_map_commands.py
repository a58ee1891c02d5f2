"""The robustness map from the command line: shape and precision axes of a sweep, the
map report, and the precision a backend cannot run refused before any work."""

import pandas as pd
from support import exit_code

SIZES = ["--meta-batch", "2", "--shots", "3", "--queries", "3", "--signal-positions", "2"]
SIZES += ["--metric-window", "2", "--device", "cpu", "--no-progress", "--outer-steps", "3"]


def test_a_sweep_over_shapes_and_precisions_and_its_map_report(tmp_path):
    grid = ["--modes", "FULL,FO", "--k", "1", "--seeds", "0,1", "--seq-lens", "6,8"]
    grid += ["--dims", "8", "--dtypes", "float32,autocast_bfloat16"]
    assert exit_code("sweep", "--root", str(tmp_path), "--tag", "m", *grid, *SIZES) == 0
    runs = pd.read_csv(tmp_path / "m" / "runs.csv")
    assert len(runs) == 16 and runs["run_id"].is_unique
    assert set(zip(runs["seq_len"], runs["dim"], runs["dtype"], strict=True)) == {
        (t, 8, p) for t in (6, 8) for p in ("float32", "autocast_bfloat16")
    }
    assert exit_code("report", "--root", str(tmp_path), "--tag", "m") == 0
    report = (tmp_path / "m" / "report.md").read_text()
    assert report.startswith("# Phase 12 robustness map: m")
    assert report.count("| reference | 1 |") == 4  # one row per regime
    assert (tmp_path / "m" / "figures" / "gain_heatmap.png").exists()


def test_a_precision_the_backend_cannot_run_is_refused_before_any_work(tmp_path, capsys):
    args = ["sweep", "--root", str(tmp_path), "--tag", "x", "--backends", "triton_step"]
    args += ["--dtypes", "float32,bfloat16", "--k", "1", "--seeds", "0", *SIZES]
    assert exit_code(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not bfloat16; use reference or triton_fused" in err[0]
    assert not (tmp_path / "x" / "runs.csv").exists()


def test_a_width_the_fused_kernels_cannot_hold_is_refused(tmp_path, capsys):
    args = ["sweep", "--root", str(tmp_path), "--tag", "w", "--backends", "triton_fused"]
    args += ["--dims", "64,200", "--k", "1", "--seeds", "0", *SIZES]
    assert exit_code(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --backends triton_fused cannot run here: its attention kernels take head "
        "dims up to 128; got D = 200 (use reference)"
    ]
