"""Summary math on a hand-made CSV; figures and report produced from CSVs alone."""

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis.report as report_module
from analysis.figures import mean_curves
from analysis.report import (
    batched_seed_lines,
    build_report,
    load_histories,
    shared_device_lines,
    timing_table,
)
from analysis.summary import full_minus_fo, load_runs, summarize
from phase12.schema import METRICS, RUN_COLUMNS


def hand_made_runs() -> pd.DataFrame:
    rows = []
    acc = {
        ("FULL", 1): (0.80, 0.82),
        ("FO", 1): (0.70, 0.74),
        ("FO_STRICT", 1): (0.70, 0.74),
        ("FULL", 5): (0.90, 0.91),
        ("FO", 5): (0.905, 0.90),
        ("FO_STRICT", 5): (0.905, 0.90),
    }
    for backend in ("reference", "triton_fused"):
        for (mode, k), values in acc.items():
            for seed, a in enumerate(values):
                rows.append(
                    dict(
                        run_id=f"{backend}_{mode}_k{k}_seed{seed}",
                        backend=backend,
                        mode=mode,
                        inner_steps=k,
                        seed=seed,
                        meta_batch=16,
                        outer_lr=1e-3,
                        outer_steps=10,
                        inner_lr=0.4,
                        seq_len=32,
                        dim=64,
                        num_signal_positions=4,
                        dtype="float32",
                        final_acc=a,
                        final_loss=1 - a,
                        attn_grad_norm_q=3.0,
                        attn_grad_norm_k=4.0,
                        attn_grad_norm_v=12.0,
                        attn_grad_norm=13.0,
                        rel_diff_probe=0.5,
                        mean_outer_step_time_s=0.001 * k,
                        peak_cuda_mem_bytes=2**20 * k,
                        wall_time_total_s=1.0,
                        device_runners=1,
                        status="OK",
                        device_name="test",
                        torch_version="x",
                    )
                )
    rows.append(dict(rows[0], run_id="broken", seed=9, final_acc=0.0, status="ERROR"))
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def edit_first(runs: pd.DataFrame, **values) -> pd.DataFrame:
    """`runs` with the first row's `values` replaced (a hand edit)."""
    runs = runs.copy()
    for column, value in values.items():
        runs[column] = runs[column].astype(object)
        runs.loc[0, column] = value
    return runs


def test_summary_means_and_stds():
    s = summarize(hand_made_runs()).set_index(["backend", "mode", "inner_steps"])
    cell = s.loc[("reference", "FULL", 1)]
    assert cell["n_seeds"] == 2  # the ERROR row is left out
    assert cell["final_acc_mean"] == pytest.approx(0.81)
    assert cell["final_acc_std"] == pytest.approx(np.std([0.80, 0.82], ddof=1))
    assert cell["mean_outer_step_time_s_mean"] == pytest.approx(0.001)
    assert s.loc[("triton_fused", "FO", 5), "final_acc_mean"] == pytest.approx(0.9025)


def test_step_times_of_a_shared_device_are_flagged_and_not_compared_with_the_seed():
    runs = hand_made_runs()
    runs["inner_steps"] = runs["inner_steps"].replace(5, 20)  # the seed timed k = 20
    alone = timing_table(summarize(runs), "cuda").set_index(["backend", "mode", "k"])
    assert alone.loc[("reference", "FULL", 20), "speed-up vs seed"] > 0
    assert set(alone["runners on device"]) == {"1"}
    assert shared_device_lines(summarize(runs)) == []

    shared_seed = (runs["backend"] == "reference") & (runs["seed"] == 1)
    runs.loc[shared_seed, "device_runners"] = 2  # one seed of the cell is enough
    summary = summarize(runs)
    t = timing_table(summary, "cuda").set_index(["backend", "mode", "k"])
    assert t.loc[("reference", "FULL", 20), "runners on device"] == "2"
    assert np.isnan(t.loc[("reference", "FULL", 20), "speed-up vs seed"])
    assert t.loc[("triton_fused", "FULL", 20), "speed-up vs seed"] > 0
    (line, _) = shared_device_lines(summary)
    assert line.startswith("6 of 12 cells were timed on a device that up to 2 sweep runners")


def test_times_of_seeds_trained_as_one_batch_are_named_as_their_share():
    runs = hand_made_runs()
    assert batched_seed_lines(summarize(runs)) == []
    runs.loc[runs["backend"] == "reference", "seeds_batched"] = 2
    summary = summarize(runs)
    t = timing_table(summary, "cuda").set_index(["backend", "mode", "k"])
    assert t.loc[("reference", "FULL", 1), "seeds a batch"] == "2"
    assert t.loc[("triton_fused", "FULL", 1), "seeds a batch"] == ""  # not recorded
    (_, line) = batched_seed_lines(summary)
    assert line.startswith("In 6 of 12 cells the seeds trained as one batch")
    assert "a throughput per seed, not one step's latency" in line


def test_runs_of_older_versions_have_no_runner_count_and_keep_their_speed_up(tmp_path):
    runs = hand_made_runs().drop(columns="device_runners")
    runs["inner_steps"] = runs["inner_steps"].replace(5, 20)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    summary = summarize(load_runs(tmp_path))
    t = timing_table(summary, "cuda").set_index(["backend", "mode", "k"])
    assert set(t["runners on device"]) == {""}
    assert t.loc[("reference", "FULL", 20), "speed-up vs seed"] > 0
    assert shared_device_lines(summary) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: r.drop(columns="final_acc"), "has no final_acc column"),
        (
            lambda r: r.assign(inner_steps=["abc"] + list(r["inner_steps"][1:])),
            "column inner_steps",
        ),
        (lambda r: r.assign(final_acc=["x"] + list(r["final_acc"][1:])), "column final_acc"),
        (lambda r: r.assign(outer_steps=[999] + list(r["outer_steps"][1:])), "several outer_steps"),
        (lambda r: r.assign(outer_lr=[1.0] + list(r["outer_lr"][1:])), "several outer_lr"),
        (lambda r: edit_first(r, num_signal_positions=8), "several num_signal_positions"),
        (lambda r: edit_first(r, status="DONE"), "has a status not one of OK, NONFINITE"),
        (
            lambda r: edit_first(
                r, run_id="reference_no_attention_curvature_k1_seed0", ablation=float("nan")
            ),
            "line 2: the run has no ablation but its run_id names one",
        ),
        (
            lambda r: edit_first(r, final_acc=float("nan")),
            "line 2: the run is OK but has no final_acc",
        ),
        (lambda r: edit_first(r, final_loss=float("inf")), "negative or infinite final_loss"),
        (lambda r: edit_first(r, final_loss=-5.0), "negative or infinite final_loss"),
        (lambda r: edit_first(r, mean_outer_step_time_s=float("inf")), "infinite mean_outer_st"),
        (lambda r: edit_first(r, inner_steps=-1), "has a inner_steps not a whole number >= 0"),
        (lambda r: edit_first(r, seed=0.5), "has a seed not a whole number >= 0"),
        (lambda r: edit_first(r, mode="FULL "), "line 2: the run has a mode not one of FULL, FO,"),
        (lambda r: edit_first(r, dtype="float8"), "has a dtype not one of float64, float32"),
        (lambda r: edit_first(r, ablation="no_curvature"), "has a ablation not one of none,"),
        (
            lambda r: edit_first(r, mode="FO", ablation="no_attention_curvature"),
            "line 2: the run is an ablation of FULL but not FULL",
        ),
        (lambda r: edit_first(r, dim=float("nan")), "line 2: the run has no dim"),
        (lambda r: edit_first(r, seq_len=-8), "has a seq_len not a whole number >= 2"),
        (lambda r: edit_first(r, dim="abc"), "line 2: the run has text in its numeric column dim"),
        (lambda r: edit_first(r, backend="Reference"), "has a backend not one of reference,"),
        (lambda r: edit_first(r, float64_meta_grad_error="abc"), "column float64_meta_grad"),
        (lambda r: edit_first(r, float64_meta_grad_error=-1.0), "has a negative float64_meta"),
        (lambda r: edit_first(r, dim=0), "has a dim not a whole number >= 1"),
        (lambda r: edit_first(r, loss_scale=0.0), "has a loss_scale other than its precision"),
        (lambda r: edit_first(r, loss_scale=1024.0), "has a loss_scale other than its precision"),
        (lambda r: edit_first(r, attn_curvature_share="abc"), "column attn_curvature_share"),
        (lambda r: edit_first(r, device_runners="abc"), "column device_runners"),
        (lambda r: edit_first(r, device_runners=0), "has a device_runners not > 0"),
        (lambda r: edit_first(r, loss_scale="abc"), "column loss_scale"),
        (lambda r: edit_first(r, seed=float("nan")), "line 2: the run has no seed"),
        (lambda r: edit_first(r, meta_batch=float("nan")), "line 2: the run has no meta_batch"),
        (lambda r: r.drop(columns="device_name"), "has no device_name column"),
        (lambda r: edit_first(r, final_acc=1.5), "final_acc outside 0..1"),
        (lambda r: edit_first(r, wall_time_total_s=-1.0), "negative or infinite wall_time_total_s"),
        (lambda r: edit_first(r, peak_cuda_mem_bytes=-1), "negative or infinite peak_cuda_mem"),
        (lambda r: edit_first(r, run_id="renamed", seed=1), "lines 2, 3: runs of one .mode, "),
        (lambda r: edit_first(r, run_id=float("nan")), "line 2: the run has no run_id"),
        (  # before its meta JSON is looked for
            lambda r: edit_first(r.drop(columns="dim"), run_id=float("nan")),
            "line 2: the run has no run_id",
        ),
        (
            lambda r: edit_first(r, run_id="reference_FULL_k1_seed1"),
            "lines 2, 3: one run twice; keep one",
        ),
        (  # a blank ablation is "none": the same cell as the row after it
            lambda r: edit_first(r, run_id="blank", seed=1, ablation=float("nan")),
            "lines 2, 3: runs of one .mode, backend, inner_steps, seed, ablation",
        ),
    ],
)
def test_a_runs_csv_the_analysis_would_misread_is_refused(tmp_path, damage, message):
    damage(hand_made_runs()).to_csv(tmp_path / "runs.csv", index=False)
    with pytest.raises(ValueError, match=message):
        load_runs(tmp_path)


def test_a_runs_csv_of_a_header_alone_holds_no_runs_yet(tmp_path):
    hand_made_runs().iloc[:0].to_csv(tmp_path / "runs.csv", index=False)
    assert load_runs(tmp_path).empty
    with pytest.raises(ValueError, match="holds no runs yet: run the sweep first"):
        build_report(tmp_path)


def test_a_runs_csv_without_dim_takes_each_runs_width_from_its_meta_json(tmp_path):
    from analysis.robustness import regimes

    runs = hand_made_runs().drop(columns="dim")  # as versions before D was in the row
    runs.to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "meta").mkdir()
    for i, run_id in enumerate(runs["run_id"]):
        config = {"config": {"dim": 64 if i % 2 else 32}}
        (tmp_path / "meta" / f"{run_id}.json").write_text(json.dumps(config))
    assert sorted(load_runs(tmp_path)["dim"].unique()) == [32, 64]
    assert regimes(load_runs(tmp_path)) == 2  # a map, not one regime averaged over D
    (tmp_path / "meta" / f"{runs.run_id[3]}.json").unlink()
    with pytest.raises(ValueError, match=f"no dim column and .*{runs.run_id[3]}.json cannot"):
        load_runs(tmp_path)


def test_runs_whose_meta_jsons_record_other_settings_are_refused(tmp_path):
    """Settings that are in no column (noise, shots, ...) are compared in the meta JSONs."""
    runs = hand_made_runs()
    runs.to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "meta").mkdir()
    meta = lambda run_id: tmp_path / "meta" / f"{run_id}.json"  # noqa: E731
    for r in runs.itertuples():  # the grid axes and the device may differ
        config = {"mode": r.mode, "seed": r.seed, "device": f"cuda:{r.seed}", "noise_std": 0.5}
        meta(r.run_id).write_text(json.dumps({"config": config}))
    meta(runs.run_id[5]).unlink()  # older versions wrote none for some runs
    meta(runs.run_id[6]).write_text(
        json.dumps({"config": {"mode": runs["mode"][6]}})
    )  # nor every key
    assert len(load_runs(tmp_path)) == len(runs)
    meta(runs.run_id[6]).write_text(json.dumps({"config": {"inner_steps": 20}}))  # its row: 5
    with pytest.raises(ValueError, match="records inner_steps 20 but its row in .* 5; fix"):
        build_report(tmp_path)
    meta(runs.run_id[6]).write_text(json.dumps({"config": {"inner_steps": 5.0}}))  # the same
    assert len(load_runs(tmp_path)) == len(runs)
    outer_lr = runs["outer_lr"][6]  # a setting column, not a grid axis: compared too
    meta(runs.run_id[6]).write_text(json.dumps({"config": {"outer_lr": outer_lr * 10}}))
    with pytest.raises(ValueError, match=f"records outer_lr {outer_lr * 10} but its row in"):
        build_report(tmp_path)
    meta(runs.run_id[6]).write_text(json.dumps({"config": {"outer_lr": outer_lr}}))
    assert len(load_runs(tmp_path)) == len(runs)
    meta(runs.run_id[7]).write_text(json.dumps({"config": {"noise_std": 0.3}}))
    first, seventh = meta(runs.run_id[0]), meta(runs.run_id[7])
    with pytest.raises(ValueError, match=f"{first} and {seventh} record runs of several noise_std"):
        build_report(tmp_path)
    meta(runs.run_id[7]).write_text("{")
    with pytest.raises(ValueError, match=f"{seventh} cannot be read .*settings are unknown"):
        build_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta", "runs.csv"]


def seed_setting_folder(folder: Path, **changes) -> pd.DataFrame:
    """hand_made_runs at the seed's setting (k 10 and 20, 1000 steps, on the CPU), with
    meta JSONs and histories, `changes` applied to every meta JSON's config."""
    from phase12.schema import SEED_SETTING

    runs = hand_made_runs()
    runs["inner_steps"] = runs["inner_steps"].replace({1: 10, 5: 20})
    runs["outer_steps"], runs["device"] = 1000, "cpu"
    runs.to_csv(folder / "runs.csv", index=False)
    (folder / "meta").mkdir()
    (folder / "history").mkdir()
    for r in runs.itertuples():
        config = {**SEED_SETTING, "device": "cpu", **changes}
        (folder / "meta" / f"{r.run_id}.json").write_text(json.dumps({"config": config}))
        if r.status == "OK":
            history(1.0, steps=1000).to_csv(folder / "history" / f"{r.run_id}.csv.gz", index=False)
    return runs


@pytest.mark.parametrize(
    "changes, at_seed, timed",
    [
        ({}, True, True),
        ({"noise_std": 5.0}, False, True),  # a step time depends on the shapes alone
        ({"num_classes": 3}, False, False),
        ({"shots": None}, False, False),  # as if older versions had not recorded it
    ],
)
def test_the_report_compares_with_the_seed_only_at_the_seeds_setting(
    tmp_path, changes, at_seed, timed
):
    seed_setting_folder(tmp_path, **changes)
    if changes.get("shots", 0) is None:
        for meta in (tmp_path / "meta").iterdir():
            config = json.loads(meta.read_text())["config"]
            del config["shots"]
            meta.write_text(json.dumps({"config": config}))
    report = build_report(tmp_path).read_text()
    assert ("Against the seed, reference k=10" in report) == at_seed
    assert ("0.9385 / 0.9350" in report) == at_seed  # the seed's long-run column
    assert ("The seed's column is blank" in report) != at_seed
    why = {  # only what differs from the seed's setting
        "noise_std": "(noise_std 5.0 here, 0.5 there)",
        "num_classes": "(num_classes 3 here, 5 there)",
        "shots": "(shots unrecorded here, 16 there)",
    }
    for name in changes:
        assert f"these runs are not at the seed's setting {why[name]}, so" in report
    # the seed's CPU step (1.34 s at k 20), not its CUDA one (0.974 s)
    assert ("| 1340.00 |" in report) == timed and "| 974.00 |" not in report


def test_full_minus_fo_pairs_seeds():
    g = full_minus_fo(hand_made_runs()).set_index(["backend", "inner_steps"])
    k1 = g.loc[("reference", 1)]
    assert k1["gap_mean"] == pytest.approx(0.09)  # (0.10 + 0.08) / 2
    assert k1["gap_std"] == pytest.approx(np.std([0.10, 0.08], ddof=1))
    assert k1["spread"] == pytest.approx(np.std([0.70, 0.74], ddof=1))
    assert bool(k1["exceeds_spread"])
    k5 = g.loc[("reference", 5)]
    assert k5["gap_mean"] == pytest.approx(0.0025) and not bool(k5["exceeds_spread"])
    # A seed that finished in one mode only is not in the pair, nor in its spread.
    rows = [
        dict(backend="reference", inner_steps=1, seed=seed, mode=mode, final_acc=acc)
        for mode, accs in {"FULL": [0.90, 0.91, 0.70], "FO": [0.88, 0.89, None]}.items()
        for seed, acc in enumerate(accs)
    ]
    runs = pd.DataFrame(rows).assign(status=lambda d: d["final_acc"].map(
        lambda a: "OK" if a == a else "ERROR"
    ))  # fmt: skip
    (gap,) = full_minus_fo(runs).itertuples()
    assert gap.n_seeds == 2 and gap.spread == pytest.approx(np.std([0.90, 0.91], ddof=1))
    assert gap.exceeds_spread


def test_a_report_of_runs_on_several_devices_has_no_speed_table(tmp_path):
    runs = hand_made_runs()
    runs.loc[runs["seed"] == 1, "device_name"] = "NVIDIA H200"
    write_folder(tmp_path, runs)
    text = build_report(tmp_path).read_text()
    speed = text.split("## Speed and memory")[1].split("##")[0]
    assert "ran on several devices (NVIDIA H200, test)" in speed and "step ms" not in speed


def write_folder(folder, runs):
    """`runs` as a results folder: runs.csv and a 10-step history for every OK run."""
    runs.to_csv(folder / "runs.csv", index=False)
    (folder / "history").mkdir()
    for r in runs[runs.status == "OK"].itertuples():
        steps = np.arange(10)
        pd.DataFrame(
            {
                "step": steps,
                "loss": 1.5 - 0.05 * steps,
                "acc": 0.3 + 0.05 * steps,
                "attn_grad_norm_q": 1.0,
                "attn_grad_norm_k": 1.0,
                "attn_grad_norm_v": 1.0,
            }
        ).to_csv(folder / "history" / f"{r.run_id}.csv", index=False)


def test_report_and_figures_from_csvs(tmp_path):
    write_folder(tmp_path, hand_made_runs())
    pd.DataFrame(
        [{"check": "seed_determinism", "status": "PASS", "value": 0.0, "details": ""}]
    ).to_csv(tmp_path / "risk_checks.csv", index=False)
    path = build_report(tmp_path)
    text = path.read_text()
    assert "| reference | 1 | 0.8100 ± 0.0141 (2 of 3 seeds; ERROR 1) | 0.7200 ± 0.0283 |" in text
    # k 1: +0.08 and +0.10 against FO; k 5: -0.005 and +0.01.
    k1, k5 = "reference, k=1: ", "reference, k=5: "
    assert text.split(k1)[1].split("\n")[0] == (
        "FULL is ahead by 0.0900 accuracy (mean of 2 seed-paired differences, std 0.0141), "
        "beyond two standard errors of that mean (0.0200), and it exceeds the seed-to-seed "
        "spread of the paired seeds' accuracies (0.0283)."
    )
    assert text.split(k5)[1].split("\n")[0] == (
        "FULL − FO = +0.0025 accuracy (mean of 2 seed-paired differences, std 0.0106), within "
        "two standard errors of that mean (0.0150): not distinguishable from zero with these "
        "seeds; it is within the seed-to-seed spread of the paired seeds' accuracies (0.0071)."
    )
    assert "Two standard errors is a loose bar with few seeds" in text
    assert "seed_determinism" in text and "ERROR 1" in text
    for name in (
        "acc_vs_inner_steps",
        "attn_grad_norm_vs_inner_steps",
        "full_minus_fo_gap",
        "training_curves",
    ):
        png = tmp_path / "figures" / f"{name}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"figures/{name}.png" in text
    assert (tmp_path / "summary.csv").exists()


def test_the_results_table_says_not_supported_where_a_backend_could_not_run_a_policy():
    from analysis.report import results_table

    runs = hand_made_runs()
    step = runs[runs["backend"] == runs["backend"].iloc[0]].assign(backend="triton_step")
    step.loc[step["mode"] == "FO_STRICT", "status"] = "UNSUPPORTED"
    both = pd.concat([runs, step])
    table = results_table(summarize(both), both, at_seed=True).set_index("backend")
    assert (table.loc["triton_step", "FO_STRICT acc"] == "not supported").all()
    assert not table.loc["triton_step", "FULL acc"].eq("not supported").any()
    none = both.assign(status="UNSUPPORTED")  # no OK run at all: every cell says why
    table = results_table(summarize(none), none, at_seed=True).set_index(["backend", "k"])
    assert (table.filter(like=" acc") == "not supported").all().all() and len(table) == 6
    failed = runs.assign(status=["ERROR", "NONFINITE"] * (len(runs) // 2) + ["ERROR"])
    table = results_table(summarize(failed), failed, at_seed=True).set_index(["backend", "k"])
    assert table.loc[("reference", 1), "FULL acc"] == "no seed finished (NONFINITE 1, ERROR 2)"
    some = runs.copy()  # reference FULL k1: seeds 0 and 1 OK, seed 9 ERROR
    some.loc[(some["run_id"] == "reference_FULL_k1_seed1"), "status"] = "NONFINITE"
    table = results_table(summarize(some), some, at_seed=True).set_index(["backend", "k"])
    assert table.loc[("reference", 1), "FULL acc"] == "0.8000 (1 of 3 seeds; NONFINITE 1, ERROR 1)"
    assert table.loc[("reference", 5), "FULL acc"] == "0.9050 ± 0.0071"  # every seed OK


def test_the_results_table_claims_no_spread_from_one_seed():
    from analysis.report import results_table

    runs = hand_made_runs()
    one = runs[runs["seed"] == runs["seed"].min()]
    cells = results_table(summarize(one), one, at_seed=True).filter(like=" acc").stack()
    assert len(cells) and cells.str.endswith("(1 seed)").all(), cells.tolist()
    finished = runs[runs["status"] == "OK"]
    assert (
        not results_table(summarize(finished), finished, at_seed=True)["FULL acc"]
        .str.contains("seed")
        .any()
    )


def test_the_results_tables_full_minus_fo_is_paired_by_seed():
    from analysis.report import results_table

    runs = hand_made_runs()
    failed = (runs["mode"] == "FULL") & (runs["inner_steps"] == 1) & (runs["seed"] == 1)
    runs.loc[failed, ["status", "final_acc"]] = ["NONFINITE", float("nan")]
    table = results_table(summarize(runs), runs, at_seed=True).set_index(["backend", "k"])
    # Seed 0 alone: FULL 0.80 - FO 0.70, not FULL's 0.80 against FO's two-seed 0.72.
    assert (table.loc[(slice(None), 1), "FULL − FO"] == "+0.1000 (1 seed)").all()
    assert (table.loc[(slice(None), 5), "FULL − FO"] == "+0.0025 ± 0.0106").all()  # -0.005, +0.01
    full5 = runs[(runs["mode"] == "FULL") & (runs["inner_steps"] == 5) & (runs["seed"] == 0)]
    extra = full5.assign(seed=7)
    more = pd.concat([runs, extra.assign(run_id=extra["run_id"] + "_7")])  # FULL-only seed
    table = results_table(summarize(more), more, at_seed=True).set_index(["backend", "k"])
    assert (table.loc[(slice(None), 5), "FULL − FO"] == "+0.0025 ± 0.0106 (2 seeds paired)").all()


def test_the_results_tables_columns_keep_their_order_where_a_cell_lacks_a_mode():
    from analysis.report import results_table

    runs = hand_made_runs()
    runs = runs[~((runs["inner_steps"] == 1) & (runs["mode"] != "FULL"))]  # k 1: FULL only
    table = results_table(summarize(runs), runs, at_seed=True)
    assert list(table.columns) == [
        "backend", "k", "FULL acc", "FO acc", "FO_STRICT acc", "FULL − FO",
        "seed FULL / FO (long run)",
    ]  # fmt: skip
    k1 = table.set_index(["backend", "k"]).xs(1, level="k")
    assert (k1["FO acc"] == "not run").all() and k1["FULL − FO"].isna().all()


def test_the_interpretation_says_why_a_cell_has_no_full_minus_fo():
    from analysis.report import interpretation

    def sentences(runs):
        return interpretation(runs, summarize(runs), full_minus_fo(runs), at_seed=False)

    runs = hand_made_runs()
    reference = runs[runs["backend"] == "reference"]
    k1, k5 = (reference[reference["inner_steps"] == k] for k in (1, 5))
    never = pd.concat([k1[k1["mode"] == "FULL"], k5])  # k 1: no FO run at all
    assert "reference, k=1: no FULL − FO comparison, since it has no FO run." in sentences(never)
    failed = k1.copy()  # k 1: FO ran, and none of it finished
    failed.loc[failed["mode"] == "FO", "status"] = "ERROR"
    text = sentences(failed)
    assert "reference, k=1: no FULL − FO comparison, since no FO run finished OK." in text
    unpaired = k1[
        ((k1["mode"] == "FULL") & (k1["seed"] == 0)) | ((k1["mode"] == "FO") & (k1["seed"] == 1))
    ]
    assert (
        "reference, k=1: no FULL − FO comparison, since no seed has both a FULL and an FO run "
        "that finished OK." in sentences(unpaired)
    )
    assert sentences(runs[runs["mode"] == "FO_STRICT"])[0] == (
        "reference, k=1: no FULL − FO comparison, since it has no FULL or FO run."
    )
    unsupported = k1.copy()  # the backend cannot hold FULL there: say so, not "failed"
    unsupported.loc[unsupported["mode"] == "FULL", "status"] = "UNSUPPORTED"
    assert (
        "reference, k=1: no FULL − FO comparison, since FULL is beyond reference's limits "
        "(not supported)." in sentences(unsupported)
    )
    # Cells in (backend, k) order, those without a comparison among them.
    cells = [s.split(":")[0] for s in sentences(pd.concat([failed, k5])) if ", k=" in s[:20]]
    assert cells == ["reference, k=1", "reference, k=5"]
    # FULL beyond a backend's limits in one cell: not counted as a FULL cell that failed.
    beyond = pd.concat([k1, unsupported.assign(inner_steps=5)])
    text = " ".join(sentences(beyond))
    assert "present in the one FULL cell:" in text and "no run that finished" not in text
    both = k1.assign(
        status=lambda d: d["status"].where(~d["mode"].isin(["FULL", "FO"]), "UNSUPPORTED")
    )
    assert "since FULL and FO are beyond reference's limits (not supported)." in sentences(both)[0]
    # Differences that cancel are not a tie: only identical accuracies are.
    cancel = k5.copy()
    cancel.loc[cancel["mode"] == "FO", "final_acc"] = [0.91, 0.90]  # FULL 0.90, 0.91
    assert "FULL − FO = +0.0000 accuracy (mean of 2" in sentences(cancel)[0]
    same = k5.copy()
    same.loc[same["mode"] == "FO", "final_acc"] = [0.90, 0.91]
    assert sentences(same)[0] == "reference, k=5: FULL and FO tie exactly in each of 2 seeds."
    one = " ".join(sentences(k1[(k1["mode"] == "FULL") & (k1["seed"] == 0)]))
    assert "Second-order signal is present in the one FULL cell: rel_diff_probe" in one
    assert "‖g_FULL‖) is 0.500." in one
    failed_full = k1.assign(status=lambda d: d["status"].where(d["mode"] != "FULL", "ERROR"))
    text = " ".join(sentences(pd.concat([failed_full, k5])))
    assert "present in the one FULL cell that finished: " in text
    assert "1 FULL cell has no run that finished OK." in text
    assert "The 1 run took 1 s" in one


def test_the_interpretation_claims_only_what_its_numbers_show():
    from analysis.report import interpretation

    def sentences(runs):
        return " ".join(interpretation(runs, summarize(runs), full_minus_fo(runs), at_seed=True))

    runs = hand_made_runs()
    text = sentences(runs)
    assert "Backends agree" in text and "present in every FULL cell" in text
    fused = runs["backend"] == "triton_fused"
    runs.loc[fused, "final_acc"] = 1 - runs.loc[fused, "final_acc"]
    runs.loc[fused & (runs["mode"] == "FULL"), "rel_diff_probe"] = float("nan")
    text = sentences(runs)
    assert "Backends DIFFER" in text and "OUTSIDE the spread" in text
    assert "zero or unmeasured in 2 of 4 FULL cells (triton_fused k 1, triton_fused k 5)" in text


def history(loss: float, steps: int = 10) -> pd.DataFrame:
    """A whole history of a hand-made run (outer_steps 10), its loss constant."""
    return pd.DataFrame({"step": range(steps), **dict.fromkeys(METRICS, 0.0), "loss": loss})


def test_histories_are_read_compressed_and_from_older_folders_plain(tmp_path):
    """The engine writes RUN.csv.gz; a folder written before that holds RUN.csv."""
    runs = hand_made_runs()
    ok = runs[runs.status == "OK"]
    (tmp_path / "history").mkdir()
    for i, r in enumerate(ok.itertuples()):
        name = f"{r.run_id}.csv.gz" if i % 2 else f"{r.run_id}.csv"
        history(float(i)).to_csv(tmp_path / "history" / name, index=False)
    histories = load_histories(tmp_path, runs)
    assert len(histories) == 10 * len(ok)
    assert sorted(histories.loc[histories.step == 1, "loss"]) == list(range(len(ok)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.assign(acc=["abc"] + [0.5] * 9), "has text where numbers belong"),
        (lambda h: h.assign(step=5), "does not count its steps 0, 1, 2"),
        (
            lambda h: h.assign(loss=[float("nan")] + [1.0] * 9),
            "has a metric that is not a finite number",
        ),
        (lambda h: h.assign(acc=7.0), "has an accuracy outside 0..1"),
        (
            lambda h: h.assign(attn_curvature_share=[float("nan")] * 9 + ["abc"]),
            "has text where numbers belong",
        ),
        (
            lambda h: h.assign(rel_diff_probe=[float("nan")] * 9 + [-0.5]),
            "has a negative probe",
        ),
    ],
)
def test_an_ok_runs_history_of_wrong_values_is_named(tmp_path, edit, message):
    runs = hand_made_runs()
    ok = runs[runs.status == "OK"]
    (tmp_path / "history").mkdir()
    for r in ok.itertuples():
        history(1.0).to_csv(tmp_path / "history" / f"{r.run_id}.csv.gz", index=False)
    assert len(load_histories(tmp_path, runs)) == 10 * len(ok)
    damaged = ok.run_id.iloc[2]
    edit(history(1.0)).to_csv(tmp_path / "history" / f"{damaged}.csv.gz", index=False)
    with pytest.raises(ValueError, match=f"{damaged}.csv.gz of an OK run {message}"):
        load_histories(tmp_path, runs)


def test_a_probe_that_overflowed_in_the_runs_precision_is_read_not_refused(tmp_path):
    """A bfloat16 run can stay finite while a relative norm of its probes overflows."""
    runs = edit_first(hand_made_runs(), softmax_stats_curvature_share=float("inf"))
    runs.to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "history").mkdir()
    for r in runs[runs.status == "OK"].itertuples():
        h = history(1.0).assign(softmax_stats_curvature_share=[float("nan")] * 9 + [float("inf")])
        h.to_csv(tmp_path / "history" / f"{r.run_id}.csv.gz", index=False)
    assert build_report(tmp_path).exists()


def test_a_runs_csv_without_a_device_column_gets_no_seed_step_time(tmp_path):
    seed_setting_folder(tmp_path)
    pd.read_csv(tmp_path / "runs.csv").drop(columns="device").to_csv(
        tmp_path / "runs.csv", index=False
    )
    report = build_report(tmp_path).read_text()
    assert "Against the seed, reference k=10" in report and "| 1340.00 |" not in report


def test_an_ok_run_without_a_history_is_named_not_left_out_of_the_curves(tmp_path):
    runs = hand_made_runs()
    ok = runs[runs.status == "OK"]
    (tmp_path / "history").mkdir()
    for r in ok.iloc[1:].itertuples():
        pd.DataFrame({"step": [0], "loss": [1.0]}).to_csv(
            tmp_path / "history" / f"{r.run_id}.csv.gz", index=False
        )
    with pytest.raises(ValueError, match=f"1 OK run.*{ok.run_id.iloc[0]}.csv.gz"):
        load_histories(tmp_path, runs)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    with pytest.raises(ValueError, match="1 OK run"):
        build_report(tmp_path)  # refused before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history", "runs.csv"]


def test_a_report_replaces_the_last_one_whole_or_leaves_it_as_it_was(tmp_path, monkeypatch, capsys):
    runs = hand_made_runs()
    runs.to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "history").mkdir()
    for r in runs[runs.status == "OK"].itertuples():
        history(1.0).to_csv(tmp_path / "history" / f"{r.run_id}.csv.gz", index=False)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "training_curves_k9_ablation.png").write_bytes(b"old")
    (tmp_path / "robustness.csv").write_text("a map's table\n")  # of an earlier grid
    build_report(tmp_path)
    outputs = ["figures", "full_minus_fo.csv", "history", "report.md", "runs.csv", "summary.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == outputs
    assert "training_curves_k9_ablation.png" not in os.listdir(tmp_path / "figures")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    first = next((tmp_path / "history").iterdir())
    history(1.0, steps=3).to_csv(first, index=False)
    with pytest.raises(ValueError, match="holds 3 of 10 steps"):
        build_report(tmp_path)
    first.write_bytes(before[first])
    monkeypatch.setattr(report_module, "training_curves", lambda *a: 1 / 0)  # the last figure
    with pytest.raises(ZeroDivisionError):
        build_report(tmp_path)
    monkeypatch.undo()
    replace = os.replace

    def figures_cannot_move_in(source, target):
        if Path(target) == tmp_path / "figures" and Path(source).parent.name.startswith(".report-"):
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", figures_cannot_move_in)  # after 3 outputs moved in
    with pytest.raises(ValueError, match="could not move .*figures to .*figures .*No space left"):
        build_report(tmp_path)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and not list(tmp_path.glob(".report-*"))

    def and_summary_cannot_move_back(source, target):
        if Path(target) == tmp_path / "summary.csv" and Path(source).parent.name == "last report":
            raise OSError(5, "Input/output error")
        figures_cannot_move_in(source, target)

    monkeypatch.setattr(os, "replace", and_summary_cannot_move_back)
    with pytest.raises(ValueError, match="No space left.*; summary.csv is in .*last report"):
        build_report(tmp_path)
    (kept,) = tmp_path.glob(".report-*/last report/summary.csv")  # not deleted with the rest
    assert kept.read_bytes() == before[tmp_path / "summary.csv"]
    monkeypatch.undo()

    killed = tmp_path / ".report-killed"  # a report killed while building (SIGKILL)
    (killed / "figures").mkdir(parents=True)
    (killed / "figures" / "training_curves.png").write_bytes(b"half")
    build_report(tmp_path)
    assert not killed.exists() and kept.exists()
    assert f"warning: {kept.parent} holds an earlier report's files" in capsys.readouterr().err


def test_a_staging_folder_that_cannot_be_deleted_is_named(tmp_path, monkeypatch, capsys):
    hand_made_runs().to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "history").mkdir()
    for r in hand_made_runs().query("status == 'OK'").itertuples():
        history(1.0).to_csv(tmp_path / "history" / f"{r.run_id}.csv.gz", index=False)
    monkeypatch.setattr(report_module.shutil, "rmtree", lambda *a, **k: None)
    assert build_report(tmp_path).exists()
    (staging,) = tmp_path.glob(".report-*")
    assert capsys.readouterr().err == f"warning: {staging} could not be deleted; delete it\n"


@pytest.mark.parametrize("risk_csv", ["", "x,y\n1,2\n", None])
def test_a_risk_checks_csv_the_risk_command_did_not_write_stops_the_report(tmp_path, risk_csv):
    hand_made_runs().to_csv(tmp_path / "runs.csv", index=False)
    (tmp_path / "history").mkdir()
    for r in hand_made_runs().query("status == 'OK'").itertuples():
        history(1.0).to_csv(tmp_path / "history" / f"{r.run_id}.csv.gz", index=False)
    if risk_csv is None:
        (tmp_path / "risk_checks.csv").mkdir()
    else:
        (tmp_path / "risk_checks.csv").write_text(risk_csv)
    with pytest.raises(ValueError, match="risk_checks.csv is not a risk_checks.csv the risk"):
        build_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_a_folder_the_report_cannot_write_is_a_value_error_naming_it(tmp_path, monkeypatch):
    hand_made_runs().to_csv(tmp_path / "runs.csv", index=False)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # root passes chmod; the OS's answer

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(ValueError, match=f"cannot write the report into {tmp_path} .Permission"):
        build_report(tmp_path)


def test_a_compressed_history_wins_over_a_plain_one_of_the_same_run(tmp_path):
    runs = hand_made_runs().iloc[:1]
    (tmp_path / "history").mkdir()
    run_id = runs.run_id.iloc[0]
    history(2.0).to_csv(tmp_path / "history" / f"{run_id}.csv")
    history(1.0).to_csv(tmp_path / "history" / f"{run_id}.csv.gz", index=False)
    assert load_histories(tmp_path, runs)["loss"].unique().tolist() == [1.0]


def test_mean_curves_average_each_runs_rolling_mean_over_the_runs_that_reached_a_step():
    def run(backend, seed, losses):
        return pd.DataFrame(
            dict(backend=backend, mode="FULL", inner_steps=1, seed=seed, step=range(len(losses)))
            | {"loss": losses, "acc": [1 - x for x in losses]}
        )

    histories = pd.concat(
        [run("reference", 0, [4.0, 2.0, 0.0]), run("triton_fused", 1, [2.0, 0.0])]
    ).sample(frac=1, random_state=0)  # rows in no particular order
    curves = mean_curves(histories, window=2).set_index("step")
    # rolling means: [4, 3, 1] and [2, 1]; step 2 only the first run reached
    assert curves["loss"].tolist() == [3.0, 2.0, 1.0]
    assert curves["acc"].tolist() == pytest.approx([-2.0, -1.0, 0.0])


def test_scaling_plot_labels_each_panel_with_its_measured_values(tmp_path, monkeypatch):
    import analysis.figures as figures

    base = {"k": 20, "meta_batch": 16, "seq_len": 32}
    axes = {"k": [1, 5, 20, 40], "meta_batch": [16, 256], "seq_len": [32, 512]}
    rows = [
        dict(base, **{axis: value}, mode=mode, backend="triton_step", device_name="GPU",
             median_step_ms=0.1 * value * (2 if mode == "FULL" else 1), peak_mem_mib=12.0 + value)
        for axis, values in axes.items() for value in values for mode in ("FULL", "FO_STRICT")
    ]  # fmt: skip
    grids = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda grid, *a: grids.append(grid) or save(grid, *a))
    path = figures.scaling_plot(pd.DataFrame(rows), base, tmp_path / "scaling.png")
    assert path.stat().st_size > 0
    for (_, axis), ax in grids[0].axes_dict.items():
        assert list(ax.get_xticks()) == axes[axis]
        low, high = ax.get_ylim()
        shown = [y for y in ax.get_yticks() if low <= y <= high]
        assert len(shown) >= 2, f"{axis} panel: y ticks {shown}"  # memory spans 13-52 MiB


HAND_MADE_SETTING = {
    "outer_lr": 1e-3,
    "noise_std": 0.5,
    "seq_len": 32,
    "dim": 64,
    "dtype": "float32",
    "device": "cpu",
}


def risk_checks(*cells: str, guard: str = "ERROR=1, OK=24") -> pd.DataFrame:
    """Two checks and a nonfinite_guard row (counting hand_made_runs' statuses), with
    the setting cells given (one for all rows, or one per row; none: an earlier
    version's file)."""
    rows = [
        {"check": c, "status": "PASS", "value": v, "details": ""}
        for c, v in [("a", True), ("b", 1.2345678e-7)]
    ]
    rows.append({"check": "nonfinite_guard", "status": "WARN", "value": 1, "details": guard})
    table = pd.DataFrame(rows)
    if cells:
        table["setting"] = list(cells) * (len(rows) // len(cells))
    return table


def report_with_risk_checks(folder: Path, table: pd.DataFrame, runs=None) -> str:
    runs = hand_made_runs() if runs is None else runs
    runs.to_csv(folder / "runs.csv", index=False)
    (folder / "history").mkdir()
    for r in runs.query("status == 'OK'").itertuples():
        history(1.0).to_csv(folder / "history" / f"{r.run_id}.csv.gz", index=False)
    table.to_csv(folder / "risk_checks.csv", index=False)
    return build_report(folder).read_text().split("## Risk checks")[1]


def setting(**changes) -> str:
    return json.dumps({**HAND_MADE_SETTING, **changes})


@pytest.mark.parametrize(
    "cells,message",
    [
        ((setting(outer_lr=0.01),), "outer_lr 0.01 there, 0.001 in the runs"),
        ((setting(outer_lr="0.001"),), 'outer_lr "0.001" there, 0.001 in the runs'),
        ((setting(seq_len=64),), "T 64, D 64, float32 there, at none of the runs"),
        ((setting(seq_len="32"),), "its T and D are whole numbers"),
        ((setting(seq_len=[32]),), "a setting is a JSON object of numbers and names"),
        ((setting(outer_lr=[1, 2]),), "a setting is a JSON object of numbers and names"),
        (("[" * 100_000 + "]" * 100_000,), "(RecursionError)"),
        (("not json",), "is not a risk_checks.csv the risk command wrote (JSONDecodeError)"),
        (("",), "is not a risk_checks.csv the risk command wrote"),
        ((setting(), setting(dim=8), setting()), "(rows of several settings)"),
        ((setting(), "", setting()), "is not a risk_checks.csv the risk command wrote"),
    ],
)
def test_risk_checks_of_another_setting_or_unreadable_stop_the_report(tmp_path, cells, message):
    (tmp_path / "report.md").write_text("the last report\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        report_with_risk_checks(tmp_path, risk_checks(*cells))
    assert (tmp_path / "report.md").read_text() == "the last report\n"


def test_risk_checks_without_a_row_stop_the_report(tmp_path):
    with pytest.raises(ValueError, match=re.escape("risk command wrote (no checks)")):
        report_with_risk_checks(tmp_path, risk_checks(setting()).iloc[:0])


def test_risk_checks_say_what_they_did_not_check(tmp_path):
    risk = report_with_risk_checks(tmp_path, risk_checks(setting()))
    assert "| a | PASS | True |" in risk and "| b | PASS | 1.235e-07 |" in risk  # not every digit
    assert "| nonfinite_guard | WARN | 1 |" in risk
    assert "| setting" not in risk and "details |\n" in risk
    assert "Checked at T 32, D 64, float32, with the other settings the runs record." in risk
    assert "nonfinite_guard counted" not in risk and "They ran on" not in risk
    runs = hand_made_runs().assign(device="cuda")
    runs = pd.concat([runs, runs.assign(run_id=runs.run_id + "_T8", seq_len=8)])
    (tmp_path / "later").mkdir()
    risk = report_with_risk_checks(tmp_path / "later", risk_checks(setting()), runs)
    assert "(the runs' other 1 regime(s) of T, D and precision were not)" in risk
    assert "They ran on cpu; the runs on cuda." in risk
    assert "counted the runs when the checks ran (ERROR=1, OK=24); the folder now holds " in risk
    assert "ERROR=2, OK=48: run the risk command again to count them all." in risk
    (tmp_path / "old").mkdir()
    risk = report_with_risk_checks(tmp_path / "old", risk_checks())
    assert "Their setting is not recorded (risk checks of an earlier version)" in risk
