"""The robustness map's table and findings, from hand-made runs whose answers are known."""

import pandas as pd

from analysis.robustness import findings, regimes, robustness_table

ACC = {"FULL": 0.80, "FO": 0.70, "no_attention_curvature": 0.78}


def runs() -> pd.DataFrame:
    rows = []
    for dtype, error, status in (
        ("float32", 1e-7, "OK"),
        ("bfloat16", 0.5, "OK"),  # beyond bfloat16's tolerance
        ("float16", None, "NONFINITE"),
        ("autocast_bfloat16", 1e-3, "OK"),  # FULL gains 0.02 more than in float32
    ):
        for mode, acc in ACC.items():
            for seed in range(3):
                rows.append(
                    dict(
                        backend="triton_fused",
                        inner_steps=1,
                        seq_len=32,
                        dim=64,
                        dtype=dtype,
                        mode=mode,
                        seed=seed,
                        status=status,
                        nonfinite_step=1 if status != "OK" else None,
                        final_acc=acc
                        + 0.001 * seed * (mode == "FULL")
                        + 0.02 * (mode == "FULL" and dtype == "autocast_bfloat16"),
                        float64_meta_grad_error=error,
                        mean_outer_step_time_s=0.002 if dtype == "float32" else 0.003,
                        peak_cuda_mem_bytes=2**20,
                        device_runners=1,
                        device_name="GPU",
                    )
                )
    return pd.DataFrame(rows)


def test_regimes_are_counted_over_the_columns_a_runs_csv_has():
    assert regimes(runs().drop(columns="dim")) == 4  # an older runs.csv: no dim
    assert regimes(runs()[runs()["dtype"] == "float32"].drop(columns="dim")) == 1
    assert regimes(runs().drop(columns=["seq_len", "dim", "dtype"])) == 1


def test_each_regime_says_whether_full_works_and_what_it_gains():
    assert regimes(runs()) == 4
    table = robustness_table(runs()).set_index("precision")
    assert table.loc["float32", "FULL works?"] == "yes"
    assert table.loc["bfloat16", "FULL works?"].startswith("no: float64 error 5.0e-01 >")
    assert table.loc["float16", "FULL works?"] == "no: 3 of 3 seeds NONFINITE at step 1"
    assert table.loc["float16", "FULL − FO"] == "no finished seed pairs"
    assert table.loc["float16", "FULL − FO beyond 2 SE"] is None  # not measured, not "no"
    assert table.loc["float32", "FULL − FO"] == "+0.1010 ± 0.0010 (beyond 2 SE)"
    assert table.loc["float32", "needs attention's curvature"].startswith("+0.0210")
    assert table.loc["bfloat16", "step ms"] == "3.00 (1.50x fp32)"
    assert table.loc["float16", "non-finite runs"] == "9 of 9"


def test_a_seed_without_its_float64_error_is_not_a_pass():
    """max() over seeds skips a blank: one seed's error alone must not pass the regime."""
    blank = runs()
    first_full = blank.index[(blank["dtype"] == "float32") & (blank["mode"] == "FULL")][0]
    blank.loc[first_full, "float64_meta_grad_error"] = None
    table = robustness_table(blank).set_index("precision")
    assert table.loc["float32", "FULL works?"] == "no: float64 error missing in 1 of 3 seeds"


def test_step_times_from_a_shared_device_are_not_compared_with_float32():
    shared = runs()
    shared.loc[shared["dtype"] == "bfloat16", "device_runners"] = 2
    shared.loc[shared["dtype"] == "float16", "device_runners"] = float("nan")  # never ran
    table = robustness_table(shared).set_index("precision")
    assert table.loc["bfloat16", "step ms"] == "3.00 (device shared by 2 runners)"
    assert table.loc["autocast_bfloat16", "step ms"] == "3.00 (1.50x fp32)"  # not shared
    assert table.loc["float16", "step ms"] == "n/a"  # no OK run, as before
    assert table.loc["bfloat16", "peak MiB"] == "1.00 (1.00x fp32)"  # memory is per process

    float32_shared = runs()
    float32_shared.loc[float32_shared["dtype"] == "float32", "device_runners"] = 2
    table = robustness_table(float32_shared).set_index("precision")
    assert table.loc["bfloat16", "step ms"] == "3.00 (fp32 timed on a shared device)"

    fo_shared = runs()
    fo_shared.loc[fo_shared["mode"] != "FULL", "device_runners"] = 3  # FULL's times are its own
    table = robustness_table(fo_shared).set_index("precision")
    assert table.loc["bfloat16", "step ms"] == "3.00 (1.50x fp32)"


def test_a_gain_the_same_in_every_seed_counts_as_holding():
    same = runs()
    full = same["mode"] == "FULL"
    same.loc[full, "final_acc"] = same.loc[full, "final_acc"] - 0.001 * same.loc[full, "seed"]
    table = robustness_table(same).set_index("precision")
    assert table.loc["float32", "FULL − FO"].endswith("(the same in each of 3 seeds)")
    assert "holds (positive, beyond 2 SE) in" in " ".join(findings(robustness_table(same)))
    assert table.loc["float32", "FULL − FO beyond 2 SE"]


def test_times_of_runs_on_several_devices_are_not_averaged():
    mixed = runs()
    mixed.loc[mixed["seed"] == 1, "device_name"] = "another device"
    table = robustness_table(mixed)
    assert set(table["step ms"]) == set(table["peak MiB"]) == {"n/a (several devices)"}


def test_findings_name_where_full_works_and_where_its_gain_holds():
    sentence, against = findings(robustness_table(runs()))
    assert "FULL works in 2 of 4 regimes; not in T=32 D=64 bfloat16, T=32 D=64 float16" in sentence
    assert "in 2 (T=32 D=64 autocast_bfloat16, T=32 D=64 float32)" in sentence
    assert against == (
        "triton_fused, k=1, autocast_bfloat16 against float32 at the same T, D: FULL − FO "
        "moves by +0.0200 to +0.0200; the verdict differs in 0 of 1 regimes."
    )


def test_a_regime_without_fo_runs_is_not_measured_not_a_verdict():
    no_fo = runs()
    lost = (no_fo["dtype"] == "autocast_bfloat16") & (no_fo["mode"] == "FO")
    no_fo.loc[lost, "status"] = "NONFINITE"  # FULL works there; its gain cannot be paired
    sentence, *against = findings(robustness_table(no_fo))
    assert "holds (positive, beyond 2 SE) in 1 (T=32 D=64 float32) and is not shown in 0" in (
        sentence
    )
    assert (
        "it is not measured in 1 (T=32 D=64 autocast_bfloat16: no finished FO run to pair"
        in sentence
    )
    assert against == []  # no "moves by +nan to +nan"


def test_cells_beyond_a_backends_limits_are_shown_as_not_supported(tmp_path):
    from analysis.figures import gain_heatmap

    step = runs().assign(backend="triton_step", dim=128)  # beyond its kernels' D <= 64
    step = step.assign(status="UNSUPPORTED", final_acc=None, float64_meta_grad_error=None)
    table = robustness_table(pd.concat([runs(), step]))
    unsupported = table[table["FULL works?"] == "not supported"]
    assert set(unsupported["backend"]) == {"triton_step"} and len(unsupported) == 4
    assert "(4 more not supported)" in [s for s in findings(table) if "triton_step" in s][0]
    assert gain_heatmap(table, tmp_path / "map.png").exists()
    # triton_step runs FULL and FO at D = 64 but has no switch for the ablation
    step = runs().assign(backend="triton_step")
    step.loc[step["mode"] == "no_attention_curvature", "status"] = "UNSUPPORTED"
    table = robustness_table(step).set_index("precision")
    assert table.loc["float32", "FULL works?"] == "yes"
    assert table.loc["float32", "needs attention's curvature"] == "not supported"


def test_findings_say_how_far_the_backends_agree():
    other = runs().assign(backend="reference")
    other.loc[other["mode"] == "FULL", "final_acc"] += 0.001  # FULL − FO 0.001 larger
    sentence = findings(robustness_table(pd.concat([runs(), other])))[-1]
    assert sentence == (
        "Across backends (reference, triton_fused), in the 2 regimes FULL works on more than "
        "one: their FULL − FO are at most 0.0010 apart (median 0.0010); the verdict differs "
        "in 0 of 2."
    )
    full_only = pd.concat([runs(), other])[lambda r: r["mode"] == "FULL"]
    assert not any(s.startswith("Across") for s in findings(robustness_table(full_only)))


def test_a_cell_whose_runs_raised_gets_no_verdict_and_no_full_runs_no_findings():
    table = runs()
    bad = (table["dtype"] == "bfloat16") & (table["mode"] == "FULL")
    table.loc[bad, "status"], table.loc[bad, "error"] = "ERROR", "ValueError: too wide"
    rows = robustness_table(table).set_index("precision")
    assert rows.loc["bfloat16", "FULL works?"] == "run error: ValueError: too wide"
    sentence = findings(robustness_table(table))[0]
    assert "(1 more ended in ERROR: no verdict)" in sentence and " bfloat16" not in sentence
    assert findings(robustness_table(table[table["mode"] == "FO"])) == []
