"""report.md for a sweep folder, rebuilt from its CSVs alone.

    build_report(Path("results/phase12_long_k10k20"))

writes summary.csv, full_minus_fo.csv, figures/*.png and report.md into the folder
(robustness.csv, figures/ and report.md for a map over several shapes and precisions).
Every statement in the interpretation section is computed from the numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.ablations import (
    NO_SPREAD,
    findings,
    one_backend,
    phase12_table,
    share_during_training,
    share_vs_gain,
)
from analysis.ablations import summary as ablation_summary
from analysis.figures import (
    MODE_ORDER,
    full_minus_fo_gap,
    gain_heatmap,
    gain_vs_share,
    metric_vs_inner_steps,
    share_curves,
    training_curves,
)
from analysis.robustness import findings as map_findings
from analysis.robustness import regimes, robustness_table
from analysis.summary import (
    at_seed_setting,
    full_minus_fo,
    gains_over_fo,
    load_runs,
    run_setting,
    summarize,
    timed_devices,
)
from analysis.tables import markdown_table
from phase12.schema import (
    CURVATURE_SHARES,
    HISTORY_DIR,
    HISTORY_SUFFIX,
    METRICS,
    PROBES,
    REGIME_FIELDS,
    RISK_COLUMNS,
    RISK_CSV,
    RUNS_CSV,
    SEED_SETTING,
    SEED_SHAPES,
    SEED_STEP_S,
    STATUS_OK,
    STATUS_UNSUPPORTED,
    STATUSES,
)

# What a report writes into its folder, all of it the report's own: each build replaces
# every one of them, so that nothing of an earlier grid's report (a map's robustness.csv
# beside a plain report, a figure of a k no longer run) stays behind. report.md last: it
# names the others.
OUTPUTS = ("summary.csv", "full_minus_fo.csv", "robustness.csv", "figures", "report.md")

# The seed project's long confirmation run (docs/seed-phase12-README.md):
# mean final accuracy over seeds 0 and 1, 1000 outer steps, as (FULL, FO).
SEED_LONG_RUN_ACC = {
    ("reference", 10): (0.9385, 0.9350),
    ("reference", 20): (0.9389, 0.9408),
    ("triton_fused", 10): (0.9343, 0.9329),
    ("triton_fused", 20): (0.9411, 0.9408),
}


def history_file(folder: Path, run_id: str) -> Path:
    """The history of a run: RUN.csv.gz, or the plain RUN.csv of an older folder."""
    path = folder / HISTORY_DIR / f"{run_id}{HISTORY_SUFFIX}"
    return path if path.exists() else path.with_suffix("")


def load_histories(folder: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """The per-step histories of the OK runs, tidy (HISTORY_COLUMNS plus backend, mode,
    inner_steps, seed). ValueError naming them if some OK run has none: curves averaged
    over fewer seeds than the tables would be wrong without saying so."""
    ok = runs[runs["status"] == "OK"]
    missing = [r for r in ok["run_id"] if not history_file(folder, r).exists()]
    if missing:
        raise ValueError(
            f"{len(missing)} OK run(s) in {folder} have no history file (e.g. "
            f"{HISTORY_DIR}/{missing[0]}{HISTORY_SUFFIX}): the folder is incomplete; "
            "delete their rows from runs.csv and run the sweep again to redo them"
        )
    frames = []
    for row in ok.itertuples():
        path = history_file(folder, row.run_id)
        try:
            h = pd.read_csv(path)
        except (OSError, EOFError, ValueError, zlib.error) as e:  # cut short, not gzip, empty
            raise ValueError(
                f"the history {path} cannot be read ({type(e).__name__}: {e}); delete its "
                "row from runs.csv and run the sweep again to redo the run"
            ) from e
        lacks = [c for c in ("step", *METRICS) if c not in h.columns]  # probes came later
        if len(h) != row.outer_steps or lacks:
            raise ValueError(
                f"the history {path} holds {len(h)} of {row.outer_steps} steps"
                + (f" and lacks {', '.join(lacks)}" if lacks else "")
                + "; delete its row from runs.csv and run the sweep again to redo the run"
            )
        wrong = _wrong_history_values(h)
        if wrong:
            raise ValueError(
                f"the history {path} of an OK run {wrong}; delete its row from runs.csv and "
                "run the sweep again to redo the run"
            )
        h["backend"], h["mode"] = row.backend, row.mode
        h["inner_steps"], h["seed"] = row.inner_steps, row.seed
        frames.append(h)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _wrong_history_values(history: pd.DataFrame) -> str | None:
    """What is wrong with the values of an OK run's whole history, or None: its steps
    must be 0, 1, ..., its metrics finite numbers, its accuracy in 0..1 and its probes
    (blank at the steps not probed) numbers >= 0."""
    values = history[["step", *METRICS]]
    probes = history[[c for c in PROBES if c in history]]
    if not all(pd.api.types.is_numeric_dtype(t) for t in [*values.dtypes, *probes.dtypes]):
        return "has text where numbers belong"
    if (probes < 0).any(axis=None):  # infinite: overflowed in the run's precision
        return "has a negative probe"
    if not (history["step"].to_numpy() == np.arange(len(history))).all():
        return "does not count its steps 0, 1, 2, ..."
    if not np.isfinite(values.to_numpy(float)).all():
        return "has a metric that is not a finite number"
    if not history["acc"].between(0, 1).all():
        return "has an accuracy outside 0..1"
    return None


def _failures(statuses: pd.Series) -> str:
    """The statuses of a cell's runs that did not finish OK, counted: "NONFINITE 1, ERROR 2"."""
    counts = statuses[statuses != STATUS_OK].value_counts()
    return ", ".join(f"{s} {counts[s]}" for s in STATUSES if s in counts)


def _no_result(statuses: pd.Series) -> str | None:
    """Why a mode has no result in a cell, from the statuses of its runs there: "not run",
    "not supported" (beyond the backend's limits) or "no seed finished (...)"; None where
    some run finished OK."""
    if (statuses == STATUS_OK).any():
        return None
    if statuses.empty:
        return "not run"
    if (statuses == STATUS_UNSUPPORTED).all():
        return "not supported"
    return f"no seed finished ({_failures(statuses)})"


def results_table(summary: pd.DataFrame, runs: pd.DataFrame, at_seed: bool) -> pd.DataFrame:
    """Accuracy per (backend, k) of every run in the folder: each mode and curvature
    ablation (mean ± std over its OK seeds, with how many of how many and the others'
    statuses where some did not finish; otherwise why there is none, _no_result) and
    FULL − FO, paired by seed (mean ± std)."""
    rows = []
    policies = [m for m in MODE_ORDER if m in set(runs["mode"])]
    policies += sorted(set(runs["mode"]) - set(MODE_ORDER))
    stats = summary.set_index(["backend", "inner_steps", "mode"])
    gaps = full_minus_fo(runs).set_index(["backend", "inner_steps"])
    for (backend, k), cell in runs.groupby(["backend", "inner_steps"]):
        row = {"backend": backend, "k": k}
        for mode in policies:
            statuses = cell.loc[cell["mode"] == mode, "status"]
            row[f"{mode} acc"] = _no_result(statuses)
            if row[f"{mode} acc"] is None:
                m, s = stats.loc[(backend, k, mode), ["final_acc_mean", "final_acc_std"]]
                ok, failed = (statuses == STATUS_OK).sum(), _failures(statuses)
                seeds = f"{ok} of {len(statuses)} seeds; {failed}" if failed else "1 seed"
                spread = f" ± {s:.4f}" if s == s else ""
                row[f"{mode} acc"] = f"{m:.4f}{spread}" + (
                    f" ({seeds})" if failed or ok == 1 else ""
                )
        if (backend, k) in gaps.index:  # seed-paired: only seeds where both finished OK
            gap, n = gaps.loc[(backend, k)], int(gaps.loc[(backend, k), "n_seeds"])
            finished = cell[cell["mode"].isin(["FULL", "FO"]) & (cell["status"] == STATUS_OK)]
            spread = " (1 seed)" if n == 1 else f" ± {gap['gap_std']:.4f}"
            if n < finished["mode"].value_counts().max() and n > 1:
                spread += f" ({n} seeds paired)"
            row["FULL − FO"] = f"{gap['gap_mean']:+.4f}{spread}"
        seed = SEED_LONG_RUN_ACC.get((backend, k)) if at_seed else None
        row["seed FULL / FO (long run)"] = f"{seed[0]:.4f} / {seed[1]:.4f}" if seed else ""
        rows.append(row)
    columns = ["backend", "k", *(f"{m} acc" for m in policies), "FULL − FO"]
    return pd.DataFrame(rows, columns=[*columns, "seed FULL / FO (long run)"])


def timing_table(summary: pd.DataFrame, seed_device: str | None) -> pd.DataFrame:
    """Step time and peak memory per cell, and the speed-up over the seed's step where it
    was timed: at k = 20 on `seed_device` (the type of device every run used; None where
    the runs are not at the seed's shapes or used several); none for a cell timed on a
    device that several sweep runners shared."""
    t = summary[
        [
            "backend",
            "mode",
            "inner_steps",
            "mean_outer_step_time_s_mean",
            "peak_cuda_mem_bytes_mean",
            "device_runners",
            "seeds_batched",
        ]
    ].copy()
    t["step ms"] = t.pop("mean_outer_step_time_s_mean") * 1e3
    t["peak MiB"] = t.pop("peak_cuda_mem_bytes_mean") / 2**20
    runners = t.pop("device_runners")  # NaN in runs.csv of older versions
    t["runners on device"] = runners.map(lambda n: "" if n != n else str(int(n)))
    t["seeds a batch"] = t.pop("seeds_batched").map(lambda n: "" if n != n else str(int(n)))
    t["seed step ms (k=20)"] = [
        SEED_STEP_S.get((seed_device, b, m), float("nan")) * 1e3 if k == 20 else float("nan")
        for b, m, k in zip(t["backend"], t["mode"], t["inner_steps"], strict=True)
    ]
    t["speed-up vs seed"] = (t["seed step ms (k=20)"] / t["step ms"]).where(~(runners > 1))
    return t.rename(columns={"inner_steps": "k"})


def _speed_lines(runs: pd.DataFrame, summary: pd.DataFrame, seed_device: str | None) -> list[str]:
    """The speed and memory table, or why there is none: runs of several devices (a
    sweep resumed elsewhere), whose times no mean can join."""
    devices = timed_devices(runs)
    if len(devices) > 1:
        return [
            f"The runs ran on several devices ({', '.join(devices)}): their step times and "
            "memory are not averaged together, so there is no speed table. Time each device's "
            "runs in a folder of their own."
        ]
    return [
        markdown_table(timing_table(summary, seed_device), ".2f"),
        "",
        *shared_device_lines(summary),
        "Step time: mean over a run's outer steps after the first. Peak memory: the run's "
        "peak CUDA allocation above what was allocated when it started (the first runs of a "
        "process also pay for cuBLAS workspaces); blank for runs on the CPU, where it is not "
        "measured.",
        *batched_seed_lines(summary),
    ]


def batched_seed_lines(summary: pd.DataFrame) -> list[str]:
    """What the times of cells whose seeds trained as one batch are."""
    batched = summary[summary["seeds_batched"] > 1]
    if batched.empty:
        return []
    return [
        "",
        f"In {len(batched)} of {len(summary)} cells the seeds trained as one batch (`seeds a "
        "batch`): a run's step time is its share, the batch's step time divided by its seeds, "
        "and its peak memory is the batch's. Their speed-up over the seed, which timed one "
        "seed a step, is a throughput per seed, not one step's latency (`sweep "
        "--no-batch-seeds` times every seed alone).",
    ]


def shared_device_lines(summary: pd.DataFrame) -> list[str]:
    """A paragraph on the cells timed while other sweep runners shared the device."""
    shared = summary[summary["device_runners"] > 1]
    if shared.empty:
        return []
    most = int(shared["device_runners"].max())
    return [
        f"{len(shared)} of {len(summary)} cells were timed on a device that up to {most} "
        "sweep runners shared (`--devices` named it more than once): their step times "
        "include the other runners' turns on the device, so they say how fast the sweep "
        "went, not how fast the backend is, and are not compared with the seed.",
        "",
    ]


def _gap_sentence(g) -> str:
    """FULL − FO of one cell (a row of full_minus_fo), judged against two standard errors
    of its seed-paired mean (is it consistent across seeds?) and against the seed-to-seed
    spread of the paired seeds' accuracies (is it large beside the choice of seed?)."""
    cell = f"{g.backend}, k={g.inner_steps}: "
    if g.n_seeds < 2:
        return (
            cell + f"FULL − FO = {g.gap_mean:+.4f} accuracy from one seed; one seed has no "
            "seed-to-seed spread to judge it against."
        )
    if abs(g.gap_mean) <= NO_SPREAD and g.gap_std <= NO_SPREAD:
        return cell + f"FULL and FO tie exactly in each of {g.n_seeds} seeds."
    winner = "FULL" if g.gap_mean > 0 else "FO"
    spread = (
        f"{'exceeds' if g.exceeds_spread else 'is within'} the seed-to-seed spread of the "
        f"paired seeds' accuracies ({g.spread:.4f})"
    )
    if g.gap_std <= NO_SPREAD:  # a standard error of zero: say what the seeds show instead
        return (
            cell + f"{winner} is ahead by {abs(g.gap_mean):.4f} accuracy in each of the "
            f"{g.n_seeds} seeds (the seed-paired differences are all equal, so their standard "
            f"error is zero), and it {spread}."
        )
    two_se = 2 * g.gap_std / g.n_seeds**0.5
    paired = f"(mean of {g.n_seeds} seed-paired differences, std {g.gap_std:.4f})"
    if abs(g.gap_mean) <= two_se:
        return (
            cell + f"FULL − FO = {g.gap_mean:+.4f} accuracy {paired}, within two standard "
            f"errors of that mean ({two_se:.4f}): not distinguishable from zero with these "
            f"seeds; it {spread}."
        )
    return (
        cell + f"{winner} is ahead by {abs(g.gap_mean):.4f} accuracy {paired}, beyond two "
        f"standard errors of that mean ({two_se:.4f}), and it {spread}."
    )


def _gap_sentences(runs: pd.DataFrame, gaps: pd.DataFrame) -> list[str]:
    """FULL − FO per (backend, k) in that order (_gap_sentence), or why a cell has none;
    a word on the bar two standard errors is with few seeds."""

    def reason(backend: str, mode: str, no_result: str) -> str:
        if no_result == "not run":
            return f"it has no {mode} run"
        if no_result == "not supported":
            return f"{mode} is beyond {backend}'s limits (not supported)"
        return f"no {mode} run finished OK"

    sentences, by_cell = [], {(g.backend, g.inner_steps): g for g in gaps.itertuples()}
    for (backend, k), cell in runs.groupby(["backend", "inner_steps"]):
        if (backend, k) in by_cell:
            sentences.append(_gap_sentence(by_cell[(backend, k)]))
            continue
        no_result = {m: _no_result(cell.loc[cell["mode"] == m, "status"]) for m in ("FULL", "FO")}
        reasons = [reason(backend, m, why) for m, why in no_result.items() if why]
        if set(no_result.values()) == {"not run"}:
            reasons = ["it has no FULL or FO run"]
        if set(no_result.values()) == {"not supported"}:
            reasons = [f"FULL and FO are beyond {backend}'s limits (not supported)"]
        why = " and ".join(reasons) or "no seed has both a FULL and an FO run that finished OK"
        sentences.append(f"{backend}, k={k}: no FULL − FO comparison, since {why}.")
    if len(gaps) and (gaps["n_seeds"] >= 2).any():
        sentences.append(
            "Two standard errors is a loose bar with few seeds: for a seed-paired mean it "
            "is about p < 0.3 two-sided with 2 seeds, p < 0.2 with 3 and p < 0.12 with 5."
        )
    return sentences


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (backend, k, policy): the seed-paired gain over FO (mean ± std, seeds) and the
    mean curvature shares measured at the runs' final parameters."""
    gains = gains_over_fo(runs)
    if gains.empty:
        return gains
    ok = runs[runs["status"] == "OK"]
    shares = [c for c in CURVATURE_SHARES if c in ok]
    mean_shares = ok.groupby(["backend", "inner_steps", "mode"])[shares].mean()
    table = gains.join(mean_shares, on=["backend", "inner_steps", "policy"])
    table["gain over FO"] = [
        f"{m:+.4f} ± {s:.4f}" if s == s else f"{m:+.4f} (1 seed)"
        for m, s in zip(table["gap_mean"], table["gap_std"], strict=True)
    ]
    columns = ["backend", "inner_steps", "policy", "n_seeds", "gain over FO", *shares]
    return table[columns].rename(columns={"inner_steps": "k", "n_seeds": "seeds"})


def _second_order_sentence(rd: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Whether the FULL cells that finished (`rd`, summary rows) measured second-order
    signal on the held-out task; the FULL cells that did not finish are counted apart."""
    probe = rd["rel_diff_probe_mean"]
    absent = rd[~(probe > 0)]  # zero, or not measured (NaN)
    ran = runs[(runs["mode"] == "FULL") & (runs["status"] != STATUS_UNSUPPORTED)]
    unfinished = ran.groupby(["backend", "inner_steps"]).ngroups - len(rd)
    finished = " that finished" if unfinished else ""
    name = "rel_diff_probe (‖g_FULL − g_FO‖/‖g_FULL‖)"
    if probe.count() > 1:
        measured = f"{name} ranges {probe.min():.3f}–{probe.max():.3f} over the FULL cells "
        measured += "where it was measured"
    else:
        measured = f"{name} is {probe.max():.3f}" + (" in the other" if len(absent) else "")
    if absent.empty:
        where = "the one FULL cell" if len(rd) == 1 else "every FULL cell"
        sentence = f"Second-order signal is present in {where}{finished}: {measured}."
    else:
        names = ", ".join(f"{r.backend} k {r.inner_steps}" for r in absent.itertuples())
        of = "the one FULL cell" if len(rd) == 1 else f"{len(absent)} of {len(rd)} FULL cells"
        sentence = f"Second-order signal is zero or unmeasured in {of}{finished} ({names})"
        sentence += f"; {measured}." if probe.notna().any() else "."
    if unfinished:
        cells = "1 FULL cell has" if unfinished == 1 else f"{unfinished} FULL cells have"
        sentence += f" {cells} no run that finished OK."
    return sentence


def interpretation(
    runs: pd.DataFrame, summary: pd.DataFrame, gaps: pd.DataFrame, at_seed: bool
) -> list[str]:
    """Sentences computed from the runs; comparisons the grid does not allow are named
    as absent, and nothing is claimed about a spread from one seed. The seed's long run
    is compared with only `at_seed` (the runs are at SEED_SETTING)."""
    ok = runs[runs["status"] == "OK"]
    statuses = runs["status"].value_counts().to_dict()
    status_line = "Run statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    if ok.empty:
        return [f"No run finished OK, so there is nothing to compare. {status_line}."]
    out = _gap_sentences(runs, gaps)
    wide = ok.pivot_table(
        index=["mode", "inner_steps", "seed"], columns="backend", values="final_acc"
    )
    others = [b for b in wide.columns if b != "reference"] if "reference" in wide.columns else []
    for backend in others:
        diff = (wide["reference"] - wide[backend]).abs().max()
        if diff != diff:  # no cell ran on both
            out.append(f"No cell finished OK on both reference and {backend}.")
            continue
        spread = summary["final_acc_std"].max()
        if spread != spread:
            verdict = "Backends compared"
            against = "with one seed per cell there is no seed-to-seed spread to compare it with"
        else:
            verdict = "Backends agree" if diff <= spread else "Backends DIFFER"
            against = (
                f"against a largest seed-to-seed std of {spread:.4f} "
                f"({'within' if diff <= spread else 'OUTSIDE'} the spread)"
            )
        out.append(
            f"{verdict}: the largest |reference − {backend}| final accuracy over "
            f"the cells run on both is {diff:.2e}, {against}."
        )
    if len(wide.columns) == 1:
        out.append(f"One backend ({wide.columns[0]}): no comparison between backends.")
    fo = ok.pivot_table(
        index=["backend", "inner_steps", "seed"], columns="mode", values="final_acc"
    )
    if {"FO", "FO_STRICT"} <= set(fo.columns):
        d = (fo["FO"] - fo["FO_STRICT"]).abs().max()
        out.append(
            f"FO_STRICT against FO: largest |FO − FO_STRICT| final accuracy {d:.2e} (the "
            "same meta-gradient by construction: only rounding can separate them)."
        )
    rd = summary[summary["mode"] == "FULL"]  # the FULL cells with an OK run
    if len(rd):
        out.append(_second_order_sentence(rd, runs))
    for (backend, k), (seed_full, seed_fo) in SEED_LONG_RUN_ACC.items():
        cell = summary[(summary["backend"] == backend) & (summary["inner_steps"] == k)]
        by_mode = cell.set_index("mode")
        if at_seed and {"FULL", "FO"} <= set(by_mode.index) and by_mode["n_seeds"].min() >= 2:
            d_full = by_mode.loc["FULL", "final_acc_mean"] - seed_full
            d_fo = by_mode.loc["FO", "final_acc_mean"] - seed_fo
            spread = by_mode["final_acc_std"].max()
            out.append(
                f"Against the seed, {backend} k={k}: FULL {d_full:+.4f}, FO {d_fo:+.4f} "
                f"({'within' if max(abs(d_full), abs(d_fo)) <= 2 * spread else 'beyond'}"
                f" two seed-to-seed stds, {2 * spread:.4f})."
            )
    ran = runs[runs["status"] != STATUS_UNSUPPORTED]  # those rows record no run
    wall = ran["wall_time_total_s"].sum()
    out.append(
        f"The {len(ran)} run{'s' if len(ran) != 1 else ''} took {wall:.0f} s of run wall "
        "time in all "
        f"({wall / 60:.1f} min, process start-up excluded)."
    )
    out.append(status_line + ".")
    return out


def _read_risk_checks(risk: Path, hint: str) -> tuple[pd.DataFrame, dict | None]:
    """The table of a RISK_CSV and the setting its rows record (None in an earlier
    version's, which has no setting column); ValueError naming the file and the fix for
    one the risk command did not write."""
    try:
        table = pd.read_csv(risk)
        if list(table.columns) not in (RISK_COLUMNS, RISK_COLUMNS[:-1]):
            raise ValueError("other columns")
        if table.empty:
            raise ValueError("no checks")
        settings = table["setting"].unique() if "setting" in table else []
        if len(settings) > 1:
            raise ValueError("rows of several settings")
        checked_at = json.loads(settings[0]) if len(settings) else None
        if checked_at is None:
            return table, None
        if not isinstance(checked_at, dict) or not all(
            isinstance(v, (str, int, float)) for v in checked_at.values()
        ):
            raise ValueError("a setting is a JSON object of numbers and names")
        if not all(type(checked_at.get(n)) is int for n in ("seq_len", "dim")) or not isinstance(
            checked_at.get("dtype"), str
        ):
            raise ValueError("its T and D are whole numbers, its precision a name")
    except (OSError, UnicodeDecodeError, TypeError, ValueError, RecursionError) as e:
        why = str(e) if type(e) is ValueError else type(e).__name__
        raise ValueError(
            f"{risk} is not a risk_checks.csv the risk command wrote ({why}); delete it, or "
            f"write it again: {hint}"
        ) from None
    return table, checked_at


def _number(text):
    """int or float of a text cell that reads as one; any other cell as it is."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _as_json(value) -> str:
    return json.dumps(value.item() if isinstance(value, np.generic) else value)


def _risk_lines(folder: Path, runs: pd.DataFrame, setting: dict) -> list[str]:
    """The report's risk-check section: the folder's RISK_CSV as a table, or how to write
    one. ValueError naming it if it is not one the risk command wrote, or if it records
    checks at another setting than the runs' (`setting`: analysis.summary.run_setting) or
    at a (T, D, precision) none of them ran at. Says what was not checked: the runs' other
    regimes, a device of another type, runs added since (the nonfinite_guard count)."""
    risk = folder / RISK_CSV
    hint = f"python run.py risk --root {folder.parent} --tag {folder.name}"
    lines = ["## Risk checks", ""]
    if not os.path.lexists(risk):
        return lines + [f"None in this folder: `{hint}` writes them.", ""]
    table, checked_at = _read_risk_checks(risk, hint)
    # Values are numbers, counts and booleans in one column, read back as text: numbers
    # shown as numbers, not with every digit.
    shown = table[RISK_COLUMNS[:-1]].assign(value=[_number(v) for v in table["value"]])
    lines += [markdown_table(shown, ".3e"), ""]
    if checked_at is None:
        said = [
            "Their setting is not recorded (risk checks of an earlier version): it may not "
            "be the runs'."
        ]
    else:
        differ = [
            f"{name} {_as_json(checked_at[name])} there, {_as_json(value)} in the runs"
            for name, value in setting.items()
            if name in checked_at and name not in REGIME_FIELDS and checked_at[name] != value
        ]
        regime = tuple(checked_at[name] for name in REGIME_FIELDS)
        if regime not in set(runs[list(REGIME_FIELDS)].itertuples(index=False, name=None)):
            differ.append("T {}, D {}, {} there, at none of the runs".format(*regime))
        if differ:
            raise ValueError(
                f"{risk} holds checks at another setting than the runs' "
                f"({'; '.join(differ)}); write them again with the sweep's flags: {hint} ..."
            )
        others = regimes(runs) - 1
        said = [
            "Checked at T {}, D {}, {}".format(*regime)
            + (
                f" (the runs' other {others} regime(s) of T, D and precision were not)"
                if others
                else ""
            )
            + ", with the other settings the runs record."
        ]
        ran_on = sorted(runs["device"].dropna().astype(str).unique()) if "device" in runs else []
        if "device" in checked_at and ran_on and ran_on != [checked_at["device"]]:
            said.append(f"They ran on {checked_at['device']}; the runs on {', '.join(ran_on)}.")
    guard = table[table["check"] == "nonfinite_guard"]
    if len(guard):
        details = guard["details"].iloc[0]
        skipped = guard["status"].iloc[0] == "SKIP" or not isinstance(details, str)
        then = "no runs" if skipped else details
        now = ", ".join(f"{k}={v}" for k, v in sorted(runs["status"].value_counts().items()))
        if then != now:
            said.append(
                f"nonfinite_guard counted the runs when the checks ran ({then}); the folder "
                f"now holds {now}: run the risk command again to count them all."
            )
    return lines + [" ".join(said), ""]


def _loss_scales(runs: pd.DataFrame) -> str:
    if "loss_scale" not in runs or runs["loss_scale"].isna().all():
        return "not recorded (runs from before the float16 loss scale, which ran unscaled)"
    scales = runs.groupby("dtype")["loss_scale"].unique()
    return "; ".join(f"{d} {', '.join(f'{v:g}' for v in s)}" for d, s in scales.items())


def _map_report(
    folder: Path, runs: pd.DataFrame, out: Path, grid_points: tuple[int, int] | None
) -> None:
    """The report of a sweep over several (T, D, precision) regimes, written into `out`:
    the robustness table, its findings and the heat map of FULL's gain
    (analysis.robustness)."""
    table = robustness_table(runs)
    table.to_csv(out / "robustness.csv", index=False)
    figdir = out / "figures"
    figdir.mkdir()
    figures = [gain_heatmap(table, figdir / "gain_heatmap.png")] if len(table) else []
    values = lambda c: ", ".join(map(str, dict.fromkeys(sorted(runs[c].unique()))))  # noqa: E731
    seeds = int(
        runs.groupby([*REGIME_FIELDS, "backend", "mode", "inner_steps"])["seed"].nunique().min()
    )
    shown = table.drop(columns=["gain", "FULL − FO beyond 2 SE"]) if len(table) else table
    lines = [
        *_title_lines(f"Phase 12 robustness map: {folder.name}", grid_points),
        "## Configuration",
        "",
        f"* grid: T {values('seq_len')}; D {values('dim')}; precisions {values('dtype')}; "
        f"modes and ablations {values('mode')}; backends {values('backend')}; "
        f"k {values('inner_steps')}; seeds {values('seed')}",
        f"* {runs['outer_steps'].iloc[0]} outer steps, meta-batch {runs['meta_batch'].iloc[0]}",
        f"* loss scale by precision: {_loss_scales(runs)}",
        *(
            [f"* in the folder but not summarised by the map: {', '.join(sorted(others))}"]
            if (others := set(runs["mode"]) - {"FULL", "FO", "no_attention_curvature"})
            else []
        ),
        f"* device: {', '.join(sorted(runs['device_name'].astype(str).unique()))}; torch "
        f"{', '.join(sorted(runs['torch_version'].astype(str).unique()))}",
        "* run statuses: "
        + ", ".join(f"{k} {v}" for k, v in runs["status"].value_counts().items()),
        "",
        "## Robustness table",
        "",
        "One row per regime. FULL works: every seed finished and its meta-gradient at the "
        "final parameters is float64's within the precision's tolerance (16 units of "
        "roundoff of its compute dtype). float64 error: the largest over seeds. Stable: "
        "the seed-to-seed std of FULL's final accuracy and the non-finite runs of the "
        "regime (all modes). Practical: FULL's step time (each seed's share: the seeds of a "
        "cell train as one batch) and peak memory (the batch's), with their ratio to "
        "float32's at the same T, D. Gain: FULL − FO, seed-paired; needs attention's "
        "curvature: FULL − no_attention_curvature.",
        "",
        markdown_table(shown, ".2e") if len(shown) else "No FULL runs.",
        "",
        "## Findings",
        "",
        *[f"* {s}" for s in map_findings(table)],
        f"* What these data do not show: other tasks than this synthetic family, other "
        f"k than {values('inner_steps')}, more than {seeds} seeds per cell, other "
        f"backends than {values('backend')}; a difference within 2 SE is not evidence "
        "either way.",
        "",
        *_risk_lines(folder, runs, run_setting(folder, runs)),
        "## Figures",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figures],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _seed_column_note(setting: dict, at_seed: bool) -> str:
    """What the results table's seed column is, or why it is blank: the settings of
    `setting` (run_setting) that differ from the seed's."""
    if at_seed:
        return (
            "The seed's column is its long confirmation run (1000 steps, k = 10, 20); its "
            "`triton_fused` FULL silently dropped the second-order terms through attention."
        )
    differ = "; ".join(
        f"{name} {setting[name] if name in setting else 'unrecorded'} here, {seed} there"
        for name, seed in SEED_SETTING.items()
        if setting.get(name) != seed
    )
    return (
        f"The seed's column is blank: these runs are not at the seed's setting ({differ}), "
        "so its numbers do not compare."
    )


def _plain_figures(
    runs: pd.DataFrame, gaps: pd.DataFrame, histories: pd.DataFrame, ablated: bool, figdir: Path
) -> list[Path]:
    """The figures of a report of one (T, D, precision), drawn into `figdir`."""
    figures = []
    if (runs["status"] == "OK").any():
        figures += [
            metric_vs_inner_steps(
                runs, "final_acc", "final query accuracy", figdir / "acc_vs_inner_steps.png"
            ),
            metric_vs_inner_steps(
                runs,
                "attn_grad_norm",
                "attention meta-gradient norm",
                figdir / "attn_grad_norm_vs_inner_steps.png",
            ),
        ]
    if not gaps.empty:
        figures.append(full_minus_fo_gap(gaps, figdir / "full_minus_fo_gap.png"))
    if len(histories):
        figures.append(training_curves(histories, figdir / "training_curves.png"))
    if ablated:
        points, fit = share_vs_gain(one_backend(runs)[0])
        if len(points):
            figures.append(gain_vs_share(points, fit, figdir / "gain_vs_attention_share.png"))
        if len(share_during_training(histories)):  # probes during training, not the end's alone
            figures.append(share_curves(histories, figdir / "attention_share_during_training.png"))
        adapted = histories[histories["inner_steps"] > 0] if len(histories) else histories
        if len(adapted):  # at the smallest k with an inner step (at 0 every policy is one)
            k = adapted["inner_steps"].min()
            smallest = histories[
                (histories["inner_steps"] == k)
                & histories["mode"].isin(["FULL", "no_attention_curvature", "FO"])
            ]
            if len(smallest):
                path = figdir / f"training_curves_k{k}_ablation.png"
                figures.append(training_curves(smallest, path))
    return figures


def _title_lines(title: str, grid_points: tuple[int, int] | None) -> list[str]:
    """A report's title, where it comes from, and whether the sweep record's grid has
    points with no run yet (`grid_points`: (with a row, recorded))."""
    lines = [f"# {title}", "", "Generated by `python run.py report` from this folder's CSVs.", ""]
    if grid_points is not None and grid_points[0] < grid_points[1]:
        run, recorded = grid_points
        lines += [
            f"**Unfinished: {recorded - run} of the {recorded} grid points that sweep.json "
            "records (the product of its axes) have no row in runs.csv**: the sweep stopped "
            "before them, or a later sweep into this folder widened the grid. What follows is "
            "about the runs that have rows; running the sweep again with those axes runs the "
            "rest.",
            "",
        ]
    return lines


def _configuration_lines(
    folder: Path, runs: pd.DataFrame, grid_points: tuple[int, int] | None
) -> list[str]:
    """The report's title and configuration: the grid, the shared settings, the devices."""
    first = runs.iloc[0]

    def values(column: str) -> str:
        order = {m: i for i, m in enumerate(MODE_ORDER)}
        key = lambda v: (order.get(v, len(order)), v)  # noqa: E731
        return ", ".join(map(str, sorted(runs[column].unique(), key=key)))

    return [
        *_title_lines(f"Phase 12 report: {folder.name}", grid_points),
        "## Configuration",
        "",
        f"* grid (the runs in this folder): modes and ablations {values('mode')}; backends "
        f"{values('backend')}; k {values('inner_steps')}; seeds {values('seed')}",
        f"* {first['outer_steps']} outer steps, meta-batch {first['meta_batch']}, inner lr "
        f"{first['inner_lr']}, Adam lr {first['outer_lr']}, T {first['seq_len']}, "
        f"{first['num_signal_positions']} signal positions, {first['dtype']}",
        f"* device: {', '.join(sorted(runs['device_name'].astype(str).unique()))}; torch "
        f"{', '.join(sorted(runs['torch_version'].astype(str).unique()))}",
        "",
    ]


def _ablation_lines(runs: pd.DataFrame, histories: pd.DataFrame) -> list[str]:
    """The report's section on the curvature ablations (a sweep with some)."""
    during, short = share_during_training(histories), ablation_summary(runs)
    lines = [
        "## Curvature ablations",
        "",
        "Gain over FO (final query accuracy, seed-paired) of FULL and of each "
        "ablation of FULL, and the shares of the FULL meta-gradient that parts of "
        "attention's own second derivative carry at the runs' final parameters "
        "(‖g_FULL − g_ablated‖ / ‖g_FULL‖ on a held-out task; mean over seeds).",
        "",
        markdown_table(ablation_table(runs)),
        "",
        *(["### In short", ""] if short else []),
        *[f"{s}\n" for s in short],
        "### What the ablations show",
        "",
        *[f"* {s}" for s in findings(runs)],
        "",
    ]
    if len(during):
        lines += [
            "### The attention share during training",
            "",
            "attn_curvature_share of each run's parameters on the held-out "
            "task at its first and its last probe (after that many outer "
            "steps; mean ± std over seeds), from the histories' probe columns.",
            "",
            markdown_table(during),
            "",
        ]
    return lines + [
        "### The seed's Phase 12 table, completed",
        "",
        "Policy → which of attention's own curvature it trains with, FULL's "
        "attention share of the meta-gradient at its final parameters (mean over "
        "seeds), gain over FO (seed-paired, mean ± std), and whether that gain is more "
        "than two standard errors from zero.",
        "",
        markdown_table(phase12_table(runs)),
        "",
    ]


def _plain_report(
    folder: Path, runs: pd.DataFrame, out: Path, grid_points: tuple[int, int] | None
) -> None:
    """The report of a sweep of one (T, D, precision), written into `out`: results,
    interpretation, curvature ablations, speed, risk checks and figures."""
    summary = summarize(runs)
    gaps = full_minus_fo(runs)
    histories = load_histories(folder, runs)
    setting = run_setting(folder, runs)
    at_seed = at_seed_setting(setting, SEED_SETTING)
    devices = runs["device"].dropna().unique() if "device" in runs else []
    seed_device = (
        devices[0] if len(devices) == 1 and at_seed_setting(setting, SEED_SHAPES) else None
    )
    summary.to_csv(out / "summary.csv", index=False)
    gaps.to_csv(out / "full_minus_fo.csv", index=False)
    ablated = (runs["ablation"] != "none").any() and (runs["status"] == "OK").any()
    (out / "figures").mkdir()
    figures = _plain_figures(runs, gaps, histories, ablated, out / "figures")
    lines = [
        *_configuration_lines(folder, runs, grid_points),
        "## Results (final query accuracy, mean ± std over seeds)",
        "",
        markdown_table(results_table(summary, runs, at_seed)),
        "",
        _seed_column_note(setting, at_seed),
        "",
        "## Interpretation",
        "",
        *[f"* {s}" for s in interpretation(runs, summary, gaps, at_seed)],
        "",
        *(_ablation_lines(runs, histories) if ablated else []),
        "## Speed and memory",
        "",
        *_speed_lines(runs, summary, seed_device),
        "",
        *_risk_lines(folder, runs, setting),
        "## Figures",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figures],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def check_inputs(folder: str | Path, regimes_to_come: Iterable[tuple] = ()) -> None:
    """ValueError, as build_report raises it, for what the report would refuse in the
    runs now in `folder`: its runs.csv and, for a report of one regime, the OK runs'
    histories; the regimes counted with `regimes_to_come` ((T, D, precision) of the runs
    a sweep is about to add) among them."""
    if not (Path(folder) / RUNS_CSV).exists():
        return
    runs = load_runs(folder)
    if runs.empty:
        return
    to_come = pd.DataFrame(list(regimes_to_come), columns=list(REGIME_FIELDS))
    if regimes(pd.concat([runs[list(REGIME_FIELDS)], to_come])) == 1:
        load_histories(Path(folder), runs)


def build_report(folder: str | Path, grid: set[str] | None = None) -> Path:
    """Write the report of the sweep folder `folder` (OUTPUTS, replacing the last
    report's) and return the path of its report.md. The caller holds the folder's lock
    (phase12.io.FolderLock, as the command line does). `grid`, the run_ids of the grid
    the folder's sweep record names, makes the report say how many of them have no row.

    Everything is built aside and then moved in, all or nothing: ValueError, naming the
    file and the fix, for a runs.csv or history the report cannot read or a folder it
    cannot write, and the folder's last report stays as it was."""
    folder = Path(folder)
    runs = load_runs(folder)
    if runs.empty:
        raise ValueError(f"{folder / 'runs.csv'} holds no runs yet: run the sweep first")
    _remove_killed_builds(folder)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    except OSError as e:
        raise ValueError(f"cannot write the report into {folder} ({e.strerror})") from e
    last = staging / "last report"  # where _move_in puts the last report's outputs
    moved_in = False
    grid_points = None if grid is None else (len(grid & set(runs["run_id"])), len(grid))
    try:
        if regimes(runs) > 1:
            _map_report(folder, runs, staging, grid_points)
        else:
            _plain_report(folder, runs, staging, grid_points)
        _move_in(staging, folder, last)
        moved_in = True
    finally:  # kept if the last report's files could not all be put back (the error says)
        if moved_in or not (last.exists() and any(last.iterdir())):
            shutil.rmtree(staging, ignore_errors=True)
        if moved_in and staging.exists():
            print(f"warning: {staging} could not be deleted; delete it", file=sys.stderr)
    return folder / "report.md"


STAGING_PREFIX = ".report-"


def _remove_killed_builds(folder: Path) -> None:
    """Delete the staging folders of reports killed while building (no report runs while
    the caller holds the lock). One holding files of an earlier report that a failed
    roll-back kept is left, and named."""
    for stale in sorted(folder.glob(STAGING_PREFIX + "*")):
        last = stale / "last report"
        if last.is_dir() and any(last.iterdir()):
            print(f"warning: {last} holds an earlier report's files; delete it", file=sys.stderr)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _move_in(built: Path, folder: Path, last: Path) -> None:
    """Replace the OUTPUTS in `folder` with those in `built` (one absent there is removed),
    all or none: the old ones are moved to `last` first (renames within the folder), then
    the new ones in, report.md last, and on any failure every move is undone. ValueError
    naming the move for an OSError (and what could not be put back, if anything)."""
    last.mkdir()
    moves = [(folder / n, last / n) for n in OUTPUTS if os.path.lexists(folder / n)]
    moves += [(built / n, folder / n) for n in OUTPUTS if (built / n).exists()]
    moved: list[tuple[Path, Path]] = []
    try:
        for source, target in moves:
            os.replace(source, target)
            moved.append((source, target))
    except BaseException as e:  # Ctrl-C too: no half-replaced report
        stuck = []
        for source, target in reversed(moved):
            try:
                os.replace(target, source)
            except OSError:
                stuck.append(f"{source.name} is in {target.parent}")
        if isinstance(e, OSError) or stuck:
            source, target = moves[len(moved)]
            kept = "; ".join(stuck) if stuck else "the last report stays as it was"
            raise ValueError(f"the report could not move {source} to {target} ({e}); {kept}") from e
        raise
