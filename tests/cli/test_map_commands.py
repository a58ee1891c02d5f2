"""The robustness map from the command line: shape and precision axes of a sweep, the
map report, and cells beyond a backend's limits recorded as such."""

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
    # A runs.csv of a version that kept D in the meta JSON alone: the same map.
    runs.drop(columns="dim").to_csv(tmp_path / "m" / "runs.csv", index=False)
    assert exit_code("report", "--root", str(tmp_path), "--tag", "m") == 0
    assert (tmp_path / "m" / "report.md").read_text() == report


def test_cells_beyond_a_backends_limits_are_recorded_as_unsupported_and_mapped(tmp_path):
    """triton_fused's kernels hold D <= 128: its D = 130 cells are recorded, not run, and
    the map shows them; resuming keeps them; reference runs every cell."""
    args = ["sweep", "--root", str(tmp_path), "--tag", "u", "--backends", "reference,triton_fused"]
    args += ["--modes", "FULL,FO", "--dims", "8,130", "--k", "1", "--seeds", "0", *SIZES]
    assert exit_code(*args) == 0
    runs = pd.read_csv(tmp_path / "u" / "runs.csv")
    unsupported = runs[runs["status"] == "UNSUPPORTED"]
    assert set(zip(unsupported["backend"], unsupported["dim"], strict=True)) == {
        ("triton_fused", 130)
    }
    assert len(unsupported) == 2 and (runs["status"] != "UNSUPPORTED").sum() == 6
    assert unsupported["error"].str.contains("head dims up to 128; got D = 130").all()
    assert exit_code(*args) == 0  # resumed: nothing to run, nothing recorded twice
    assert len(pd.read_csv(tmp_path / "u" / "runs.csv")) == 8
    assert exit_code("report", "--root", str(tmp_path), "--tag", "u") == 0
    report = (tmp_path / "u" / "report.md").read_text()
    assert "| triton_fused | 1 | 32 | 130 | float32 | not supported |" in report
    assert "FULL works in 1 of 1 regimes (1 more not supported)" in report


def test_a_grid_no_cell_of_which_can_run_is_refused_before_any_work(tmp_path, capsys):
    args = ["sweep", "--root", str(tmp_path), "--tag", "w", "--backends", "triton_fused"]
    args += ["--dims", "200", "--k", "1", "--seeds", "0", *SIZES]
    assert exit_code(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: no cell of the grid can run: triton_fused: its attention kernels take head "
        "dims up to 128; got D = 200 (use reference)"
    ]
    assert not (tmp_path / "w" / "runs.csv").exists()
