"""`--ablation` for one run, `--ablations` as a sweep axis, and the report's section."""

import pandas as pd
from support import exit_code

SIZES = ["--meta-batch", "2", "--seq-len", "8", "--device", "cpu", "--no-progress"]


def test_an_ablation_of_another_mode_is_refused_in_one_line(tmp_path, capsys):
    args = ["--mode", "FO", "--ablation", "frozen_softmax_stats", *SIZES, "--out", str(tmp_path)]
    assert exit_code(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --ablation frozen_softmax_stats is an ablation of FULL; it does not apply "
        "to mode FO"
    ]


def test_every_ablation_is_listed_in_help(capsys):
    from phase12.config import ABLATIONS

    assert exit_code("--help") == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ABLATIONS)


def test_a_sweep_over_ablations_and_its_report(tmp_path):
    grid = ["--modes", "FULL,FO", "--k", "1", "--seeds", "0,1", "--outer-steps", "2"]
    grid += ["--ablations", "none,no_attention_curvature,once_differentiable_attention"]
    args = ["pipeline", "--root", str(tmp_path), "--tag", "a", *grid, *SIZES]
    assert exit_code(*args, "--backends", "reference", "--no-gradgradcheck") == 0
    runs = pd.read_csv(tmp_path / "a" / "runs.csv")
    assert sorted(runs.run_id.str.replace("reference_", "").str.split("_k").str[0].unique()) == [
        "FO",
        "FULL",
        "no_attention_curvature",
        "once_differentiable_attention",
    ]
    assert set(runs[runs["mode"] == "FO"]["ablation"]) == {"none"} and len(runs) == 8
    assert (runs.attn_curvature_share > 0).all()
    report = (tmp_path / "a" / "report.md").read_text()
    assert (
        "## Curvature ablations" in report
        and "| reference | 1 | no_attention_curvature | 2 |" in report
    )
