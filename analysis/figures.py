"""Seaborn figures of a sweep (PNG). Each function takes tidy DataFrames and a path."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

MODE_ORDER = ["FULL", "FO", "FO_STRICT"]
# FO_STRICT equals FO by construction: dashed, so the line under it stays visible.
MODE_DASHES = {"FULL": "", "FO": "", "FO_STRICT": (4, 2)}
sns.set_theme(style="whitegrid", context="notebook")


def _order(modes) -> tuple[list[str], dict]:
    """Modes first in their usual order, then curvature ablations (policies) by name; and
    their dashes (FO_STRICT dashed: it lies on FO)."""
    present = set(modes)
    order = [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))
    return order, {m: MODE_DASHES.get(m, (1, 1) if m not in MODE_ORDER else "") for m in order}


def _save(grid, path: Path, title: str) -> Path:
    grid.figure.suptitle(title, y=1.03)
    grid.figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def metric_vs_inner_steps(runs: pd.DataFrame, metric: str, label: str, path: Path) -> Path:
    """One panel per backend, one line per mode (or curvature ablation), mean with +-1 std
    error bars over seeds."""
    ok = runs[runs["status"] == "OK"]
    order, dashes = _order(ok["mode"])
    grid = sns.relplot(
        data=ok,
        x="inner_steps",
        y=metric,
        hue="mode",
        style="mode",
        hue_order=order,
        style_order=order,
        col="backend",
        kind="line",
        markers=True,
        dashes=dashes,
        errorbar="sd",
        err_style="bars",
        height=3.6,
        aspect=1.15,
    )
    grid.set(xlabel="inner steps k", ylabel=label, xticks=sorted(ok["inner_steps"].unique()))
    grid.set_titles("backend: {col_name}")
    sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.9))
    return _save(grid, path, f"{label} vs inner steps (mean ± std over seeds)")


def mean_curves(histories: pd.DataFrame, window: int) -> pd.DataFrame:
    """Each run's loss and accuracy as a rolling mean over `window` steps, then averaged
    over seeds and backends at each step (over the runs that reached it): one row per
    (mode, inner_steps, step). `histories` is tidy: backend, mode, inner_steps, seed,
    step, loss, acc."""
    h = histories.sort_values("step")
    keys = ["backend", "mode", "inner_steps", "seed"]
    rolled = h.groupby(keys)[["loss", "acc"]].transform(
        lambda s: s.rolling(window, min_periods=1).mean()
    )
    # The mean by pandas in one pass; seaborn's estimator would aggregate every step of
    # every line apart (seconds for a long run).
    by_step = h[["mode", "inner_steps", "step"]].join(rolled)
    return by_step.groupby(["mode", "inner_steps", "step"], as_index=False).mean()


def training_curves(histories: pd.DataFrame, path: Path, window: int = 20) -> Path:
    """Query loss and accuracy vs outer step: rows = metric, columns = k, one line per mode
    (mean_curves of `histories`)."""
    curves = mean_curves(histories, window)
    tidy = curves.melt(id_vars=["mode", "inner_steps", "step"], var_name="metric")
    tidy["metric"] = tidy["metric"].map({"loss": "query loss", "acc": "query accuracy"})
    order, dashes = _order(tidy["mode"])
    grid = sns.relplot(
        data=tidy,
        x="step",
        y="value",
        hue="mode",
        hue_order=order,
        style="mode",
        style_order=order,
        dashes=dashes,
        row="metric",
        col="inner_steps",
        kind="line",
        estimator=None,
        facet_kws=dict(sharey="row"),
        height=2.8,
        aspect=1.2,
    )
    grid.set_titles("{row_name}, k = {col_name}")
    grid.set(xlabel="outer step")
    grid.set_ylabels("")
    sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.9))
    return _save(
        grid,
        path,
        f"Training curves (rolling mean over {window} steps; seeds and backends averaged)",
    )


def share_curves(histories: pd.DataFrame, path: Path) -> Path:
    """attn_curvature_share at the probes (the history's sparse probe columns) against the
    outer steps done before each (as analysis.ablations.share_during_training counts): one
    panel per k, one line per mode or ablation, mean ± std over seeds."""
    h = histories.dropna(subset=["attn_curvature_share"])
    # A probe follows its step's update: step s is probed after s + 1 outer steps.
    h = h.assign(steps_done=h["step"] + 1)
    order, dashes = _order(h["mode"])
    grid = sns.relplot(
        data=h,
        x="steps_done",
        y="attn_curvature_share",
        hue="mode",
        hue_order=order,
        style="mode",
        style_order=order,
        dashes=dashes,
        markers=True,
        col="inner_steps",
        kind="line",
        errorbar="sd",
        height=3.0,
        aspect=1.1,
    )
    grid.set_titles("k = {col_name}")
    grid.set(xlabel="outer steps done", ylabel="attention-curvature share")
    sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.9))
    return _save(
        grid,
        path,
        "‖g_FULL − g_no_attention_curvature‖ / ‖g_FULL‖ on the held-out task during training",
    )


TEXT_CELLS = ("fails", "error", "not supported", "no FO")  # cells without a gain


def _map_label(works: str, gain: float) -> str:
    """A heat-map cell's text: the gain where FULL works, else why there is none."""
    if works == "yes":
        return "no FO" if gain != gain else f"{gain:+.3f}"
    if works == "not supported":
        return works
    return "error" if works.startswith("run error") else "fails"


def gain_heatmap(table: pd.DataFrame, path: Path) -> Path:
    """FULL − FO (seed-paired mean final accuracy) over the map: one heat map per
    (backend, k), backends down and k across, regimes T x D down and precisions across
    in each; "fails" where FULL did not work (analysis.robustness.robustness_table),
    blank where it did not run."""
    backends, ks = list(dict.fromkeys(table["backend"])), list(dict.fromkeys(table["k"]))
    fig, grid_axes = plt.subplots(
        len(backends),
        len(ks),
        figsize=(2.0 + 1.3 * table["precision"].nunique() * len(ks), 0.6 + 3.4 * len(backends)),
        squeeze=False,
    )
    panels = list(table.groupby(["backend", "k"]))
    panel_axes = [grid_axes[backends.index(b)][ks.index(k)] for (b, k), _ in panels]
    for ax in set(grid_axes.flat) - set(panel_axes):  # a (backend, k) that was not run
        ax.axis("off")
    precisions = list(dict.fromkeys(table["precision"]))
    # One colour scale for every panel: the same colour is the same gain everywhere.
    span = table["gain"].where(table["FULL works?"] == "yes").abs().max()
    span = span if span > 0 else 1.0
    for ax, ((backend, k), t) in zip(panel_axes, panels, strict=True):
        t = t.sort_values(["T", "D"])
        t = t.assign(regime="T=" + t["T"].astype(str) + " D=" + t["D"].astype(str))
        works = t["FULL works?"] == "yes"
        t = t.assign(
            gain=t["gain"].where(works),
            label=[_map_label(w, g) for w, g in zip(t["FULL works?"], t["gain"], strict=True)],
        )
        rows = list(dict.fromkeys(t["regime"]))
        columns = [p for p in precisions if p in set(t["precision"])]
        grid = t.pivot(index="regime", columns="precision", values="gain")
        labels = t.pivot(index="regime", columns="precision", values="label")
        sns.heatmap(
            grid.reindex(index=rows, columns=columns).astype(float),
            annot=labels.reindex(index=rows, columns=columns).fillna(""),
            fmt="",
            center=0,
            vmin=-span,
            vmax=span,
            cmap="RdBu",
            cbar=False,
            ax=ax,
            linewidths=0.5,
        )
        shown = labels.reindex(index=rows, columns=columns)
        for i, j in zip(*shown.isin(TEXT_CELLS).to_numpy().nonzero(), strict=True):
            # NaN cells get no annotation from seaborn
            ax.text(j + 0.5, i + 0.5, shown.iat[i, j], ha="center", va="center", color="0.4")
        ax.grid(False)
        ax.set_title(f"{backend}, k = {k}")
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.suptitle("FULL − FO final accuracy over the map (fails: FULL did not work)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def full_minus_fo_gap(gaps: pd.DataFrame, path: Path) -> Path:
    """FULL - FO final accuracy vs k per backend, error bars = std of the seed-paired gap."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    # Backends that agree exactly would hide each other: solid vs dashed, hollow markers.
    styles = [dict(marker="o", ls="-"), dict(marker="s", ls="--", mfc="none", ms=9)]
    for i, (backend, g) in enumerate(gaps.groupby("backend")):
        ax.errorbar(
            g["inner_steps"],
            g["gap_mean"],
            yerr=g["gap_std"].fillna(0),
            label=backend,
            capsize=3,
            **styles[i % len(styles)],
        )
    ax.axhline(0, color="grey", lw=1)
    ax.set(
        xlabel="inner steps k",
        ylabel="FULL − FO final accuracy",
        title="Second-order advantage vs inner steps",
        xticks=sorted(gaps["inner_steps"]),
    )
    ax.legend(title="backend")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def scaling_plot(df: pd.DataFrame, base: dict[str, int], path: Path) -> Path:
    """Step time and peak memory against k, meta-batch and T (one varied at a time).

    `df` has the columns of the step benchmark (phase12.benchmarks.step.measure); `base`
    gives the values {"k", "meta_batch", "seq_len"} at which the two other axes stay.
    """
    parts = []
    for axis in base:
        keep = pd.Series(True, index=df.index)
        for other, value in base.items():
            if other != axis:
                keep &= df[other] == value
        parts.append(df[keep].assign(axis=axis, x=df[axis]))
    tidy = (
        pd.concat(parts)
        .melt(
            id_vars=["axis", "x", "backend", "mode"],
            value_vars=["median_step_ms", "peak_mem_mib"],
            var_name="measure",
            value_name="y",
        )
        .dropna(subset=["y"])
    )
    tidy["measure"] = tidy["measure"].map(
        {"median_step_ms": "median step (ms)", "peak_mem_mib": "peak memory (MiB)"}
    )
    grid = sns.relplot(
        data=tidy,
        x="x",
        y="y",
        hue="backend",
        style="mode",
        row="measure",
        col="axis",
        kind="line",
        markers=True,
        height=3,
        aspect=1.2,
        facet_kws=dict(sharex=False, sharey=False),
    )
    grid.set(xscale="log", yscale="log")
    for (_, axis), ax in grid.axes_dict.items():
        ax.set_xticks(sorted(tidy.loc[tidy["axis"] == axis, "x"].unique()))  # the measured values
        # 1-2-5 ticks: a panel whose values stay inside one decade still gets labels
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        for ticks in (ax.xaxis, ax.yaxis):
            ticks.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.minorticks_off()
    grid.set_titles("{row_name} vs {col_name}")
    grid.set_xlabels("")
    grid.set_ylabels("")
    sns.move_legend(grid, "upper left", bbox_to_anchor=(1.0, 0.9))
    return _save(grid, path, f"Outer-step cost on {df['device_name'].iloc[0]}")


def attention_plot(df: pd.DataFrame, path: Path) -> Path:
    """Median time against N per provider: one panel per (dtype, pass)."""
    ok = df[df.status == "OK"]
    grid = sns.relplot(
        data=ok,
        x="n",
        y="ms",
        hue="provider",
        style="provider",
        col="pass",
        row="dtype",
        kind="line",
        marker="o",
        facet_kws=dict(sharey=False),
        height=3,
        aspect=1.2,
    )
    grid.set(xscale="log", yscale="log", xlabel="N = M", ylabel="median time (ms)")
    return _save(grid, path, "Attention, B*H = 32 (D = 64 and 128 pooled per line)")


def fit_segments(points: pd.DataFrame, slope: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The within-k fit as a segment per k: `slope` through that k's mean (share, gain),
    across its shares (none for a NaN slope)."""
    if slope != slope:
        return []
    segments = []
    for _, at_k in points.groupby("inner_steps"):
        share, gain = at_k["attn_curvature_share"], at_k["gain"]
        xs = share.agg(["min", "max"]).to_numpy()
        segments.append((xs, gain.mean() + slope * (xs - share.mean())))
    return segments


def gain_vs_share(points: pd.DataFrame, fit: dict, path: Path) -> Path:
    """Per run: gain over FO against the attention-curvature share, one colour per
    policy, one marker per k; the fit of analysis.ablations.share_vs_gain as a line per k
    (one slope, through each k's mean point, across that k's shares)."""
    order, _ = _order(points["mode"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.scatterplot(
        data=points,
        x="attn_curvature_share",
        y="gain",
        hue="mode",
        hue_order=order,
        style="inner_steps",
        ax=ax,
    )
    for xs, ys in fit_segments(points, fit["slope"]):
        ax.plot(xs, ys, color="grey", lw=1)
    if fit["same_as"]:
        ax.text(
            0.0,
            -0.2,
            "; ".join(
                f"{m}: drawn as {kept} (equal runs)" for m, kept in sorted(fit["same_as"].items())
            ),
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(
        xlabel="attention-curvature share ‖g_FULL − g_no_attention_curvature‖ / ‖g_FULL‖",
        ylabel="final accuracy − FO (same k, seed)",
        title=f"Gain over FO against the share (slope {fit['slope']:+.3f} ± {fit['se']:.3f})",
    )
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
