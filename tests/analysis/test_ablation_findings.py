"""The ablation findings, from hand-made runs whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from analysis.ablations import findings, paired, phase12_table, share_vs_gain, summary

ACC = {  # policy -> final accuracy at k = 1 (seed 0; seeds 1, 2 add +0.001, +0.002)
    "FULL": 0.80,
    "FO": 0.68,
    "no_attention_curvature": 0.81,
    "once_differentiable_attention": 0.675,
    "no_attention_param_curvature": 0.675,
    "frozen_softmax_stats": 0.64,
    "no_attention_score_curvature": 0.80,
    "no_attention_value_curvature": 0.81,
}


def runs(backends=("reference", "triton_fused")) -> pd.DataFrame:
    rows = []
    for backend in backends:
        for policy, acc in ACC.items():
            for seed in range(3):
                rows.append(
                    dict(
                        backend=backend,
                        mode=policy,
                        inner_steps=1,
                        seed=seed,
                        status="OK",
                        final_acc=acc + 0.001 * seed * (1 + (policy == "FULL")),
                        attn_curvature_share=0.5 if policy != "FO" else 0.4,
                    )
                )
    return pd.DataFrame(rows)


def test_paired_differences_and_their_clarity():
    d = paired(runs(), "FULL", "FO").set_index("backend").loc["reference"]
    assert np.isclose(d["mean"], 0.121) and d["n"] == 3 and d["clear"]
    assert paired(runs(), "FULL", "absent").empty


def test_findings_say_what_the_data_say():
    text = "\n".join(findings(runs()))
    assert "Every backend (reference, triton_fused) gives the same final accuracy" in text
    assert "reference, k=1: FULL − FO = +0.1210 ± 0.0010 (beyond 2 SE)" in text
    assert "without attention's own curvature the gain is +0.1300 ± 0.0000 (107% of FULL's)" in text
    assert "triton_fused, k=1" not in text  # identical backends are reported once
    assert "give identical final accuracies in every cell" in text
    short = " ".join(summary(runs()))
    # FULL - no_attention_curvature = -0.009 +- 0.001 over 3 seeds: beyond 2 SE, below 0
    assert "so attention's own curvature costs accuracy here" in short
    assert "harms training against FO at k = 1: -0.0400" in short
    assert "What these data do not show" in short


def test_the_summary_attributes_only_a_gain_the_seeds_show():
    def short(**acc):
        table = runs()
        for policy, (base, per_seed) in acc.items():
            rows = table["mode"] == policy
            table.loc[rows, "final_acc"] = base + per_seed * table.loc[rows, "seed"]
        return " ".join(summary(table))

    # no_attention_curvature equal to FULL in every seed: no SE, nothing shown to need it;
    # once_differentiable_attention loses FULL's gain beyond 2 SE.
    keeps = short(no_attention_curvature=(0.80, 0.002))
    assert "(zero in each of 3 seeds), not distinguishable" in keeps
    assert "these seeds show no part of FULL's gain that needs" in keeps
    assert "FULL keeps a gain this policy loses (FULL − once_differentiable_attention" in keeps
    # FULL no better than FO: nothing to attribute, and no claim about what carries it.
    none = short(FULL=(0.68, 0.0), FO=(0.68, 0.0), no_attention_curvature=(0.68, 0.0))
    assert "FULL's own gain over FO is not beyond 2 SE: there is no gain to attribute" in none
    assert "FULL keeps a gain" not in none and "points at" not in none
    # FULL behind FO and ahead of no_attention_curvature, both beyond 2 SE: no "gain"
    behind = short(FULL=(0.60, 0.002), no_attention_curvature=(0.50, 0.001))
    assert "and FULL is behind FO beyond 2 SE: there is no gain to attribute" in behind
    assert "part of this gain" not in behind


def test_float_rounding_of_equal_accuracies_is_no_difference():
    table = runs()
    table.loc[table["mode"] == "FULL", "final_acc"] = 0.1 + 0.2  # 0.30000000000000004
    table.loc[table["mode"] == "no_attention_curvature", "final_acc"] = 0.3
    table.loc[table["mode"] == "FO", "final_acc"] = 0.2
    d = paired(table, "FULL", "no_attention_curvature")
    assert not d["clear"].any()
    assert "(zero in each of 3 seeds), not distinguishable from zero" in " ".join(summary(table))


def test_the_frozen_statistics_verdict_follows_the_sign_and_the_spread():
    def verdict(acc):
        table = runs()
        frozen = table["mode"] == "frozen_softmax_stats"
        table.loc[frozen, "final_acc"] = acc + 0.001 * table.loc[frozen, "seed"]
        return " ".join(summary(table))

    assert "still beats FO at k = 1: +0.0200" in verdict(0.70)
    assert "is not clearly different from FO at k = 1" in verdict(0.68)
    assert "harms training against FO at k = 1" in verdict(0.64)


def test_findings_name_what_is_missing():
    lacking = runs()[lambda r: r["mode"] != "no_attention_curvature"]
    assert findings(lacking) == [
        "The ablation findings need FULL, FO and no_attention_curvature runs; this grid lacks "
        "no_attention_curvature."
    ]
    assert summary(lacking) == []


def test_share_against_gain_and_the_completed_table():
    points, fit = share_vs_gain(runs(backends=("reference",)))
    # Identical policies count once: no_attention_param_curvature is
    # once_differentiable_attention's runs, no_attention_value_curvature
    # no_attention_curvature's.
    assert len(points) == 3 * (len(ACC) - 3) and fit["n"] == len(points)
    assert fit["same_as"] == {
        "once_differentiable_attention": "no_attention_param_curvature",
        "no_attention_value_curvature": "no_attention_curvature",
    }
    spread = runs()
    spread["attn_curvature_share"] += 0.01 * spread["seed"]  # a slope to fit; equal runs stay so
    (slope,) = [line for line in findings(spread) if "has slope" in line]
    assert "no_attention_value_curvature counted once with no_attention_curvature" in slope
    table = phase12_table(runs()).set_index(["backend", "policy"])
    assert set(table.index.get_level_values("backend")) == {"reference", "triton_fused"}
    full, without = ("reference", "FULL"), ("triton_fused", "no_attention_curvature")
    assert table.loc[full, "beyond 2 SE?"] == "yes"
    assert table.loc[full, "gain over FO"] == "+0.1210 ± 0.0010"
    assert table.loc[without, "attention curvature trained with"] == "none"
    # +0.13 in every seed: a standard error of zero is not called "beyond 2 SE"
    assert table.loc[without, "beyond 2 SE?"] == "the same in each of 3 seeds"


def test_a_fit_without_points_is_empty_not_a_crash():
    """k = 0 alone, or no FO run: no (share, gain) point; the report still builds."""
    k0 = runs(backends=("reference",)).assign(inner_steps=0)
    no_fo = runs(backends=("reference",))[lambda r: r["mode"] != "FO"]
    for table in (k0, no_fo):
        points, fit = share_vs_gain(table)
        assert points.empty and fit["n"] == 0 and fit["same_as"] == {}
        assert fit["slope"] != fit["slope"]
        findings(table)


def test_runs_of_k0_are_no_evidence_for_the_slope_or_the_summary():
    """At k = 0 every policy is the same run: share and gain 0 in every seed, which would
    add degrees of freedom without spread and shrink the slope's standard error."""
    base = runs(backends=("reference",))
    rng = np.random.default_rng(0)
    base["attn_curvature_share"] = rng.uniform(0.3, 0.6, len(base))
    k0 = base.assign(inner_steps=0, final_acc=0.5, attn_curvature_share=0.0)
    points, fit = share_vs_gain(pd.concat([base, k0]))
    assert set(points["inner_steps"]) == {1}
    assert (fit["slope"], fit["se"], fit["n"]) == tuple(
        share_vs_gain(base)[1][c] for c in ("slope", "se", "n")
    )
    short = summary(pd.concat([k0, base]))
    assert short[0].startswith("At k = 1, FULL − FO = +0.1210")
    assert any("At k = 0 no inner step is taken" in s for s in short)
    assert not any("At k = 0 no inner step" in s for s in summary(base))


def test_a_cell_without_every_policy_is_left_out_not_a_crash():
    more = runs()[lambda r: r["mode"].isin(["FULL", "FO"])].assign(inner_steps=5)
    text = "\n".join(findings(pd.concat([runs(), more])))
    assert "k=1: FULL − FO" in text and "k=5: FULL − FO" not in text


def test_the_share_during_training_reads_the_first_and_last_probe_of_each_run():
    from analysis.ablations import share_during_training

    rows = []
    for seed, (early, late) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        for step in range(4):
            share = {1: early, 3: late}.get(step)  # probes after steps 2 and 4
            rows.append(
                dict(backend="b", mode="FULL", inner_steps=5, seed=seed, step=step)
                | dict(attn_curvature_share=np.nan if share is None else share)
            )
    table = share_during_training(pd.DataFrame(rows)).iloc[0]
    assert (table["first probe"], table["last probe"]) == (2, 4)
    assert table["share there"] == "0.6000 ± 0.1414"
    assert table["share at the end"] == "0.2000 ± 0.1414"
    assert share_during_training(pd.DataFrame(rows).drop(columns="attn_curvature_share")).empty
    end_only = pd.DataFrame(rows).assign(
        attn_curvature_share=lambda d: d["attn_curvature_share"].where(d["step"] == 3)
    )
    assert share_during_training(end_only).empty  # probe_every 0: first = last, no table


def test_the_share_figure_counts_steps_as_the_table_does(tmp_path, monkeypatch):
    """The table's "first probe" 2 is the history's step 1 (probed after its update)."""
    import analysis.figures as figures

    drawn = {}
    real = figures.sns.relplot

    def relplot(data, x, **kw):
        drawn["x"] = sorted(data[x].unique())
        return real(data=data, x=x, **kw)

    monkeypatch.setattr(figures.sns, "relplot", relplot)
    h = pd.DataFrame(
        dict(backend="b", mode="FULL", inner_steps=5, seed=0, step=[0, 1, 2, 3])
        | dict(attn_curvature_share=[np.nan, 0.5, np.nan, 0.1])
    )
    figures.share_curves(h, tmp_path / "f.png")
    assert drawn["x"] == [2, 4]


def test_one_seed_claims_no_standard_error():
    from analysis.ablations import _beyond, _fmt

    one = {"mean": 0.0, "std": float("nan"), "n": 1, "clear": False}
    assert f"{_fmt(one)} ({_beyond(one)})" == "+0.0000 (one seed) (no SE from one seed)"
    two = {"mean": 0.1, "std": 0.01, "n": 2, "clear": True}
    assert _beyond(two) == "beyond 2 SE"


def test_the_figure_draws_the_fit_through_each_ks_mean():
    """One slope within each k: a single pooled line would pass through none of them."""
    from analysis.figures import fit_segments

    rng = np.random.default_rng(1)
    points = pd.DataFrame(
        {
            "inner_steps": np.repeat([1, 5], 6),
            "attn_curvature_share": rng.uniform(0.2, 0.6, 12),
            "gain": np.repeat([0.12, 0.0], 6) + rng.normal(0, 0.002, 12),
        }
    )
    segments = fit_segments(points, slope=0.01)
    assert len(segments) == 2
    for (xs, ys), (_, at_k) in zip(segments, points.groupby("inner_steps"), strict=True):
        mid = at_k["attn_curvature_share"].mean()
        assert np.interp(mid, xs, ys) == pytest.approx(at_k["gain"].mean())
        assert (ys[1] - ys[0]) / (xs[1] - xs[0]) == pytest.approx(0.01)
    assert fit_segments(points, float("nan")) == []
