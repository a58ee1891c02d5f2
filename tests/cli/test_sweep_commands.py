"""`run.py sweep / report / pipeline`: bad grids refused before any work; the pipeline
writes everything."""

import json
import os
import re
import shutil

import pandas as pd
import pytest
from support import exit_code

from phase12 import cli
from phase12.io import FolderLock


def sweep_cli(root, *grid: str) -> int:
    args = ["sweep", "--root", str(root), "--tag", "t", *grid]
    return exit_code(*args, "--device", "cpu", "--backends", "reference")


def test_old_runs_csv_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "runs.csv").write_text("backend,mode\nreference,FULL\n")
    code = sweep_cli(tmp_path, "--k", "1")
    assert code == 2 and "other columns" in capsys.readouterr().err
    assert not (tmp_path / "t" / "history").exists()


def test_an_errors_csv_of_other_columns_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "errors.csv").write_text("a,b\n")
    code = sweep_cli(tmp_path, "--k", "1", "--seeds", "0", "--outer-steps", "2")
    err = capsys.readouterr().err
    assert code == 2 and "errors.csv has other columns" in err and "Traceback" not in err
    assert not (tmp_path / "t" / "runs.csv").exists()


def test_sweep_cli_rejects_bad_grid(tmp_path, capsys):
    code = sweep_cli(tmp_path, "--k", "1,-2")
    assert code == 2 and "--k must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    code = sweep_cli(tmp_path, "--modes", "FULL,SOMETHING")
    assert code == 2 and "--modes: invalid choice 'SOMETHING'" in capsys.readouterr().err


def test_report_cli_needs_a_sweep(tmp_path, capsys):
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "none"]) == 2
    assert "run the sweep first" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    with FolderLock(tmp_path / "busy"):  # a run still writing its first row
        assert cli.main(["report", "--root", str(tmp_path), "--tag", "busy"]) == 2
    assert "being written by pid" in capsys.readouterr().err


def test_pipeline_command_writes_everything(tmp_path, capsys):
    args = [
        "pipeline",
        "--root",
        str(tmp_path),
        "--tag",
        "p",
        "--device",
        "cpu",
        "--backends",
        "reference",
        "--modes",
        "FULL,FO",
        "--k",
        "1",
        "--seeds",
        "0,1",
        "--outer-steps",
        "3",
        "--meta-batch",
        "2",
        "--seq-len",
        "8",
        "--no-gradgradcheck",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert re.search(
        r"pipeline: sweep [\d.]+ s, risk checks [\d.]+ s, report [\d.]+ s", capsys.readouterr().out
    )
    folder = tmp_path / "p"
    assert len(pd.read_csv(folder / "runs.csv")) == 4
    risk = pd.read_csv(folder / "risk_checks.csv").set_index("check")["status"]
    assert risk["seed_determinism"] == "PASS" and risk["nonfinite_guard"] == "PASS"
    assert "## Risk checks" in (folder / "report.md").read_text()
    assert "Unfinished" not in (folder / "report.md").read_text()
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "p"]) == 0


def in_folder(root, tag: str) -> list[str]:
    """The flags of a sweep folder ROOT/TAG on the CPU."""
    return ["--root", str(root), "--tag", tag, "--device", "cpu", "--no-progress"]


def risk_in(root, tag: str) -> list[str]:
    """The risk command on ROOT/TAG on the CPU (no progress bars, no grid to take)."""
    return ["risk", "--root", str(root), "--tag", tag, "--device", "cpu", "--no-gradgradcheck"]


# One seed of reference at k 1, two outer steps of meta-batch 2: a grid for the CPU.
SMALL = ["--backends", "reference", "--k", "1", "--seeds", "0"]
SMALL += ["--outer-steps", "2", "--meta-batch", "2"]
RISK_SMALL = ["--backends", "reference", "--outer-steps", "2", "--meta-batch", "2"]


def test_the_report_of_a_sweep_stopped_part_way_says_so(tmp_path, capsys):
    sweep = ["sweep", *in_folder(tmp_path, "t"), *SMALL, "--modes", "FULL,FO", "--seq-lens", "8"]
    assert cli.main(sweep) == 0
    runs_csv = tmp_path / "t" / "runs.csv"
    header, first, _ = runs_csv.read_text().splitlines(keepends=True)
    runs_csv.write_text(header + first)  # as if stopped after the first run
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "t"]) == 0
    text = (tmp_path / "t" / "report.md").read_text()
    assert "**Unfinished: 1 of the 2 grid points that sweep.json records" in text
    assert cli.main(sweep) == 0  # runs the missing one
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "t"]) == 0
    assert "Unfinished" not in (tmp_path / "t" / "report.md").read_text()


def test_a_sweep_at_settings_that_hold_only_together_is_reported(tmp_path):
    """The grid check rebuilds the sweep's configs from all its settings at the grid's
    shape, as the sweep checked them: 2 signal positions in sequences of 4 (the default 4
    do not fit), 35 in sequences of 40 (not in the default 32)."""
    small = ["--backends", "reference", "--modes", "FO", "--k", "1", "--seeds", "0"]
    small += ["--outer-steps", "2", "--meta-batch", "2", "--metric-window", "1"]
    for tag, (t, positions) in {"short": ("4", "2"), "long": ("40", "35")}.items():
        shape = ["--seq-lens", t, "--dims", "8", "--signal-positions", positions]
        assert cli.main(["sweep", *in_folder(tmp_path, tag), *small, *shape]) == 0
        assert cli.main(["report", "--root", str(tmp_path), "--tag", tag]) == 0


def test_an_empty_runs_csv_is_no_runs_to_risk_and_report(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "runs.csv").write_bytes(b"")  # created, then killed before its header
    assert cli.main([*risk_in(tmp_path, "t"), *RISK_SMALL, "--seq-lens", "8"]) == 0
    checks = pd.read_csv(tmp_path / "t" / "risk_checks.csv").set_index("check")
    assert checks.loc["nonfinite_guard", "status"] == "SKIP"
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "t"]) == 2
    assert "holds no runs yet" in capsys.readouterr().err


def test_risk_takes_no_flags_it_would_ignore(tmp_path, capsys):
    """Its checks run at k 5 and one seed in this process: --k, --seeds, --modes,
    --ablations and the workers' flags were accepted and ignored."""
    base = risk_in(tmp_path, "t")
    for flag, value in [("--k", "20"), ("--seeds", "7"), ("--modes", "FO"), ("--devices", "cpu")]:
        with pytest.raises(SystemExit) as stop:
            cli.main([*base, flag, value])
        assert stop.value.code == 2
        assert f"unrecognized arguments: {flag} {value}" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert cli.main([*base, "--dtypes", "float64,float32"]) == 2  # only the first was checked
    assert "--dtypes: the risk checks run at one dtype at a time" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_risk_checks_at_another_setting_stop_the_report_until_written_again(tmp_path, capsys):
    # The risk command first, into a new folder, at a noise the sweep then does not use:
    # the report would have shown those checks beside the sweep's runs.
    folder, small = in_folder(tmp_path, "t"), [*SMALL, "--seq-lens", "8"]
    risk = [*risk_in(tmp_path, "t"), *RISK_SMALL, "--seq-lens", "8"]
    assert cli.main([*risk, "--noise-std", "0.1"]) == 0
    assert "is a new folder (is --tag a sweep's?); the flags' settings" in capsys.readouterr().out
    assert cli.main(["sweep", *folder, *small]) == 0
    capsys.readouterr()
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "risk_checks.csv holds checks at another setting" in err[0]
    assert "noise_std 0.1 there, 0.5 in the runs" in err[0]
    assert not (tmp_path / "t" / "report.md").exists()
    assert cli.main(risk) == 0  # again, at the sweep's settings
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "t"]) == 0
    text = (tmp_path / "t" / "report.md").read_text()
    assert "Checked at T 8, D 64, float32, with the other settings the runs record." in text


def test_a_map_report_compares_risk_checks_with_its_runs_rows_too(tmp_path, capsys):
    # Runs without meta JSONs (older versions wrote none for some): their rows still
    # record the outer learning rate, which the risk checks must share.
    folder, small = in_folder(tmp_path, "m"), [*SMALL, "--dims", "8", "--modes", "FULL,FO"]
    risk = [*risk_in(tmp_path, "m"), *RISK_SMALL, "--dims", "8", "--seq-lens", "8"]
    assert cli.main([*risk, "--outer-lr", "0.002"]) == 0
    assert cli.main(["sweep", *folder, *small, "--seq-lens", "8,16"]) == 0
    shutil.rmtree(tmp_path / "m" / "meta")
    capsys.readouterr()
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "m"]) == 2
    assert "outer_lr 0.002 there, 0.001 in the runs" in capsys.readouterr().err
    assert cli.main(risk) == 0
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "m"]) == 0
    text = (tmp_path / "m" / "report.md").read_text()
    assert "Checked at T 8, D 8, float32 (the runs' other 1 regime(s) of T, D and" in text


def test_risk_on_a_sweeps_folder_takes_its_recorded_settings_and_shape(tmp_path, capsys):
    # The report's hint, `risk --root R --tag T`, works as it stands after any sweep.
    folder, shape = in_folder(tmp_path, "t"), ["--seq-lens", "8,16", "--dims", "8"]
    assert (
        cli.main(["sweep", *folder, *SMALL, "--modes", "FULL", *shape, "--noise-std", "0.25"]) == 0
    )
    assert cli.main(risk_in(tmp_path, "t")) == 0
    setting = json.loads(pd.read_csv(tmp_path / "t" / "risk_checks.csv")["setting"][0])
    assert setting["noise_std"] == 0.25 and setting["outer_steps"] == 2
    assert (setting["seq_len"], setting["dim"]) == (8, 8)  # the grid's first shape
    capsys.readouterr()
    assert cli.main([*risk_in(tmp_path, "t"), "--noise-std", "0.5"]) == 2
    assert "other settings (noise_std 0.25 there, 0.5 now)" in capsys.readouterr().err


def test_risk_on_a_folder_of_single_runs_takes_their_settings_and_shape(tmp_path, capsys):
    run = ["--k", "1", "--outer-steps", "2", "--meta-batch", "2", "--seq-len", "8", "--dim", "8"]
    run += ["--noise-std", "0.25", "--device", "cpu", "--no-progress", "--out"]
    assert cli.main([*run, str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    risk = risk_in(tmp_path, "runs")
    assert cli.main(risk) == 0
    runs_csv, run_id = tmp_path / "runs" / "runs.csv", "reference_FULL_k1_seed0_T8_D8"
    source = f"{runs_csv} (run {run_id}, with its meta JSON)"
    assert f"risk: the settings of {source} where no flag is given" in capsys.readouterr().out

    def checked() -> dict:
        return json.loads(pd.read_csv(tmp_path / "runs" / "risk_checks.csv")["setting"][0])

    assert checked()["noise_std"] == 0.25 and checked()["outer_steps"] == 2
    assert (checked()["seq_len"], checked()["dim"]) == (8, 8)
    assert cli.main([*risk, "--meta-batch", "4"]) == 2
    assert "other settings (meta_batch 2 there, 4 now)" in capsys.readouterr().err
    assert cli.main([*risk, "--seq-lens", "12"]) == 2  # a shape none of the runs has
    assert "holds runs at T 8, D 8, float32, not T 12, D 8, float32" in capsys.readouterr().err
    # Without the meta JSON: the row's settings and shape (the rest at their defaults).
    shutil.rmtree(tmp_path / "runs" / "meta")
    assert cli.main([*risk, "--noise-std", "0.25"]) == 0
    assert f"the settings of {runs_csv} (run {run_id}) where" in capsys.readouterr().out
    assert (checked()["seq_len"], checked()["dim"]) == (8, 8)
    # An integer setting rewritten as 2.0 (a pandas round trip) is still 2.
    runs = pd.read_csv(runs_csv)
    runs.astype({"outer_steps": float}).to_csv(runs_csv, index=False)
    assert cli.main([*risk, "--noise-std", "0.25"]) == 0
    assert checked()["outer_steps"] == 2


def test_risk_on_a_runs_csv_that_is_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "t" / "runs.csv").mkdir(parents=True)
    assert cli.main(risk_in(tmp_path, "t")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder where this program keeps a file" in err[0]


def test_a_broken_link_where_a_file_is_kept_is_named_as_such(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "risk_checks.csv").symlink_to(tmp_path / "gone")
    assert cli.main(risk_in(tmp_path, "t")) == 2
    assert "risk_checks.csv is a broken symbolic link; remove it" in capsys.readouterr().err


def test_an_ablation_report_with_k0_and_end_probes_only(tmp_path):
    """At k = 0 every policy is one computation, and with probes at the end alone there
    is no course of training to draw: neither makes a figure or a sentence of evidence."""
    grid = ["--modes", "FULL,FO", "--k", "0,1", "--seeds", "0,1", "--seq-lens", "8"]
    grid += ["--ablations", "no_attention_curvature,once_differentiable_attention"]
    assert cli.main(["sweep", *in_folder(tmp_path, "t"), *SMALL, *grid]) == 0
    assert cli.main(["report", "--root", str(tmp_path), "--tag", "t"]) == 0
    figures = set(os.listdir(tmp_path / "t" / "figures"))
    assert "training_curves_k1_ablation.png" in figures
    assert "training_curves_k0_ablation.png" not in figures
    assert "attention_share_during_training.png" not in figures
    text = (tmp_path / "t" / "report.md").read_text()
    assert "Over k = 1, FULL − no_attention_curvature" in text
    assert "At k = 0 no inner step is taken" in text
    assert "The attention share during training" not in text
