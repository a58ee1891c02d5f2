"""Summary statistics over seeds, computed with pandas from a sweep's runs.csv."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from phase12.schema import (
    ABLATION_NAMES,
    BACKEND_NAMES,
    CONFIG_COLUMNS,
    FLOAT64_TOLERANCE,
    GRID_FIELDS,
    LOSS_SCALES,
    MODES,
    PROBES,
    REGIME_FIELDS,
    RUN_COLUMNS,
    RUNS_CSV,
    SEED_COLUMNS,
    SEED_SETTING,
    SETTING_COLUMNS,
    STATUS_OK,
    STATUSES,
    cell_holds,
)

CELL = ["backend", "mode", "inner_steps"]
# What a run spent: never negative.
COSTS = [
    "wall_time_total_s",
    "mean_outer_step_time_s",
    "setup_time_s",
    "probe_time_s",
    "peak_cuda_mem_bytes",
]
SUMMARY_METRICS = [
    "final_acc",
    "final_loss",
    "attn_grad_norm_q",
    "attn_grad_norm_k",
    "attn_grad_norm_v",
    "attn_grad_norm",
    "rel_diff_probe",
    "mean_outer_step_time_s",
    "peak_cuda_mem_bytes",
]


def load_runs(folder: str | Path) -> pd.DataFrame:
    """The sweep's runs.csv, completed where older versions wrote less: ablation "none"
    where blank or absent, D from each run's meta JSON where the row has no dim, the
    combined attention grad norm derived if absent.

    ValueError, naming the file (and the line) and the fix, for a file that does not
    parse, ends in a partial line (pandas would read the fragment as a row of blanks),
    holds rows the analysis would misread (_check_values) or runs whose meta JSONs record
    other settings (recorded_settings)."""
    folder = Path(folder)
    path = folder / RUNS_CSV
    if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        raise ValueError(
            f"{path} ends in a partial line (a write cut short); the next sweep or run into "
            "this folder moves it aside, or delete the last line"
        )
    try:  # an empty file (created, then killed before its header): no runs, like a header
        runs = pd.read_csv(path) if path.stat().st_size else pd.DataFrame(columns=RUN_COLUMNS)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path} is not a runs.csv this program wrote ({type(e).__name__})") from e
    if "status" not in runs or "run_id" not in runs:
        raise ValueError(f"{path} is not a runs.csv this program wrote (no status/run_id column)")
    # A curvature ablation of FULL is a policy of its own: in the tables and figures it
    # stands where a mode stands (runs.csv of older versions have no ablation column).
    if "ablation" not in runs:
        runs["ablation"] = "none"
    if runs["run_id"].isna().any():  # named before any meta JSON is looked up by run_id
        _check_values(runs, path)
    # A blank ablation is "none" (older versions), but not where the run_id names an
    # ablation as the run's policy: such a row would count as a seed of FULL.
    blank = runs["ablation"].isna()
    ablations = [a for a in ABLATION_NAMES if a != "none"]
    names_one = [any(f"_{a}_k" in str(r) for a in ablations) for r in runs["run_id"]]
    wrong = blank.to_numpy() & np.array(names_one, dtype=bool)
    if wrong.any():
        raise ValueError(
            f"{path}, line {wrong.nonzero()[0][0] + 2}: the run has no ablation but its run_id "
            "names one; fill in its ablation or drop that row"
        )
    runs["ablation"] = runs["ablation"].astype(object).where(~blank, "none")
    if "dim" not in runs and len(runs):  # older versions kept D in the meta JSON alone
        runs["dim"] = [_meta_dim(folder, run_id) for run_id in runs["run_id"]]
    _check_values(runs, path)
    recorded_settings(folder, runs["run_id"], runs)
    runs["mode"] = runs["mode"].where(runs["ablation"] == "none", runs["ablation"])
    for column in ("device_runners", "seeds_batched"):  # older versions did not record them
        if column not in runs:
            runs[column] = float("nan")
    if "attn_grad_norm" not in runs:
        runs["attn_grad_norm"] = (
            runs[["attn_grad_norm_q", "attn_grad_norm_k", "attn_grad_norm_v"]] ** 2
        ).sum(axis=1) ** 0.5
    return runs


def _meta_dim(folder: Path, run_id) -> int:
    """The width D a run's meta JSON records; ValueError if it cannot be read."""
    path = folder / "meta" / f"{run_id}.json"
    try:
        return int(json.loads(path.read_text())["config"]["dim"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{folder / RUNS_CSV} has no dim column and {path} cannot tell the run's width "
            f"D ({type(e).__name__}); add the dim column"
        ) from e


def recorded_settings(folder: Path, run_ids: Iterable, rows: pd.DataFrame | None = None) -> dict:
    """The settings the runs' meta JSONs record (every field of the config each
    meta/RUN.json holds but the grid axes and the device), one value each. ValueError,
    naming two of the files, for runs whose recorded settings differ: the rest of a run's
    settings (noise, shots, classes, ...) are in no column, and the analysis would
    average such runs together. With `rows` (runs.csv as read, by run_id), ValueError too,
    naming the file, for a meta JSON whose grid point or other settings are not its row's
    (phase12.schema.CONFIG_COLUMNS: a hand edit). Runs without a meta JSON (older versions
    wrote none for some) and settings a JSON lacks (older versions) are let pass."""
    by_id = {} if rows is None else rows.set_index("run_id").to_dict("index")
    seen: dict[str, tuple] = {}  # setting -> (its JSON value, the file it was read from)
    for run_id in run_ids:
        path = folder / "meta" / f"{run_id}.json"
        if not path.exists():
            continue
        try:
            config = dict(json.loads(path.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} cannot be read ({type(e).__name__}), so its run's settings are "
                "unknown; fix it, or drop the run's row from runs.csv"
            ) from e
        row = by_id.get(run_id, {})
        for name, value in config.items():
            column = CONFIG_COLUMNS.get(name)
            if column is not None and not cell_holds(row.get(column), value):
                raise ValueError(
                    f"{path} records {name} {json.dumps(value)} but its row in "
                    f"{folder / RUNS_CSV} {row[column]}; fix the one that is wrong"
                )
            if name in GRID_FIELDS or name == "device":
                continue
            first = seen.setdefault(name, (json.dumps(value), path))
            if first[0] != json.dumps(value):
                raise ValueError(
                    f"{first[1]} and {path} record runs of several {name} ({first[0]}, "
                    f"{json.dumps(value)}); keep one setting a folder: move the others' rows, "
                    "meta JSONs and histories to a folder of their own"
                )
    return {name: json.loads(value) for name, (value, _) in seen.items()}


def run_setting(folder: Path, runs: pd.DataFrame) -> dict:
    """The setting of the runs (one regime of a loaded runs.csv), by RunConfig field
    name: what their rows hold (SETTING_COLUMNS, the regime, the signal positions) and
    what their meta JSONs record (recorded_settings)."""
    first = runs.iloc[0]
    return recorded_settings(folder, runs["run_id"]) | {
        "signal_positions": first["num_signal_positions"],
        **{c: first[c] for c in [*SETTING_COLUMNS, *REGIME_FIELDS]},
    }


def at_seed_setting(setting: dict, names: Iterable[str]) -> bool:
    """Whether `setting` (run_setting) is the seed's in every one of `names` (keys of
    phase12.schema.SEED_SETTING); a setting it lacks (older versions recorded less)
    counts as not the seed's."""
    return all(name in setting and setting[name] == SEED_SETTING[name] for name in names)


def _check_values(runs: pd.DataFrame, path: Path) -> None:
    """ValueError, naming the file, the line or column, and the fix, for a runs.csv the
    analysis would misread:

    * a column of the seed's row (SEED_COLUMNS), run_id or the device's and torch's names
      missing, text in a numeric column;
    * a row without its run_id, grid point (GRID_FIELDS) or settings (SETTING_COLUMNS and
      the signal positions), or with a mode, ablation, dtype or status the engine does
      not know, or an ablation of a mode other than FULL;
    * a backend the engine does not know; k or seed not a whole number >= 0, T below 2,
      D below 1; a negative or infinite time, memory or loss, a negative probe, a runner
      count or loss scale not above 0; an OK run without a final accuracy and loss, an
      accuracy outside 0..1;
    * one run or one grid point twice, or rows of several settings, which the analysis
      would average together as seeds of one cell."""
    settings = [*SETTING_COLUMNS, "num_signal_positions"]
    missing = [
        c for c in ["run_id", *SEED_COLUMNS, "device_name", "torch_version"] if c not in runs
    ]
    if missing:
        raise ValueError(
            f"{path} has no {', '.join(missing)} column; it is not a runs.csv of a run"
        )
    if runs.empty:  # a header alone: columns of no type, and nothing to misread
        return
    numeric = ["inner_steps", "seed", "seq_len", "dim", *settings, *SUMMARY_METRICS, *COSTS]
    numeric += ["loss_scale", "device_runners", *PROBES]

    def refuse(rows: pd.Series, what: str) -> None:
        if rows.any():
            line = rows.to_numpy().nonzero()[0][0] + 2  # the header is line 1
            raise ValueError(f"{path}, line {line}: the run {what}; fix or drop that row")

    def refuse_repeats(columns: list[str], what: str) -> None:
        twice = runs[runs.duplicated(columns, keep=False)]
        if len(twice):
            group = twice.groupby(columns, dropna=False, sort=False).ngroup()
            lines = ", ".join(str(i + 2) for i in twice.index[group == group.iloc[0]])
            raise ValueError(f"{path}, lines {lines}: {what}; keep one of them")

    refuse(runs["run_id"].isna(), "has no run_id")
    for column in [c for c in dict.fromkeys(numeric) if c in runs]:
        text = pd.to_numeric(runs[column], errors="coerce").isna() & runs[column].notna()
        refuse(text, f"has text in its numeric column {column}")
    cell = [c for c in GRID_FIELDS if c in runs]
    for column in [*cell, *settings]:
        refuse(runs[column].isna(), f"has no {column}")
    known = {
        "backend": BACKEND_NAMES,
        "mode": MODES,
        "ablation": ABLATION_NAMES,
        "dtype": tuple(FLOAT64_TOLERANCE),
        "status": STATUSES,
    }
    for column, names in known.items():
        refuse(~runs[column].isin(names), f"has a {column} not one of {', '.join(names)}")
    refuse(
        (runs["ablation"] != "none") & (runs["mode"] != "FULL"),
        "is an ablation of FULL but not FULL",
    )
    for column, least in [("inner_steps", 0), ("seed", 0), ("seq_len", 2), ("dim", 1)]:
        if column not in runs:  # older versions wrote no seq_len
            continue
        values = pd.to_numeric(runs[column])
        refuse(
            (values < least) | (values % 1 != 0), f"has a {column} not a whole number >= {least}"
        )
    if "device_runners" in runs:
        refuse(runs["device_runners"] <= 0, "has a device_runners not > 0")
    if "loss_scale" in runs:  # blank in rows of older versions
        expected = runs["dtype"].map(LOSS_SCALES)
        refuse(
            runs["loss_scale"].notna() & (runs["loss_scale"] != expected),
            "has a loss_scale other than its precision's (phase12.schema.LOSS_SCALES)",
        )
    # blank: not measured; infinite: overflowed in the run's precision (a value of its own)
    for column in [c for c in PROBES if c in runs]:
        refuse(runs[column] < 0, f"has a negative {column}")
    for column in [c for c in [*COSTS, "final_loss"] if c in runs]:
        refuse((runs[column] < 0) | np.isinf(runs[column]), f"has a negative or infinite {column}")
    ok = runs["status"] == STATUS_OK
    for column in ("final_acc", "final_loss"):
        refuse(ok & runs[column].isna(), f"is OK but has no {column}")
    refuse(
        runs["final_acc"].notna() & ~runs["final_acc"].between(0, 1), "has final_acc outside 0..1"
    )
    refuse_repeats(["run_id"], "one run twice")
    refuse_repeats(cell, f"runs of one ({', '.join(cell)})")
    for column in settings:
        values = runs[column].unique()
        if len(values) > 1:
            raise ValueError(
                f"{path} holds runs of several {column} ({', '.join(map(str, sorted(values)))}); "
                "keep one setting a folder"
            )


def timed_devices(runs: pd.DataFrame) -> list[str]:
    """The devices (by name) the OK runs were timed on, sorted."""
    ok = runs[runs["status"] == STATUS_OK]
    return sorted(ok["device_name"].dropna().astype(str).unique())


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per (backend, mode, inner_steps) of the OK runs.

    Columns: backend, mode, inner_steps, n_seeds, device_runners (the most sweep runners
    a seed's device had: above 1, its times include the others'), seeds_batched (the most
    seeds trained as one batch: above 1, a run's times are its share of the batch's), then
    METRIC_mean and METRIC_std for every metric in SUMMARY_METRICS (std is the sample std,
    NaN for one seed).
    """
    ok = runs[runs["status"] == "OK"]
    grouped = ok.groupby(CELL)
    out = grouped[SUMMARY_METRICS].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out.insert(0, "seeds_batched", grouped["seeds_batched"].max())
    out.insert(0, "device_runners", grouped["device_runners"].max())
    out.insert(0, "n_seeds", grouped["seed"].nunique())
    return out.reset_index()


GAP_COLUMNS = ["backend", "inner_steps", "n_seeds", "gap_mean", "gap_std", "spread"]


def full_minus_fo(
    runs: pd.DataFrame, metric: str = "final_acc", policy: str = "FULL"
) -> pd.DataFrame:
    """`policy` (FULL by default; any mode or ablation) - FO of `metric` per (backend,
    inner_steps), paired by seed (seeds where both finished OK).

    Columns: backend, inner_steps, n_seeds (pairs), gap_mean, gap_std (over seeds of the
    paired gap), spread (the larger seed-to-seed std of FULL and of FO over those seeds),
    exceeds_spread (NA with fewer than two seeds: no spread to compare with). No rows when
    the grid has no such pair.
    """
    ok = runs[runs["status"] == "OK"]
    wide = ok.pivot_table(index=["backend", "inner_steps", "seed"], columns="mode", values=metric)
    if not {policy, "FO"} <= set(wide.columns):
        return pd.DataFrame(columns=[*GAP_COLUMNS, "exceeds_spread"])
    pairs = wide[[policy, "FO"]].dropna()  # the seeds where both finished OK
    gap = (pairs[policy] - pairs["FO"]).rename("gap").reset_index()
    stats = gap.groupby(["backend", "inner_steps"])["gap"].agg(
        n_seeds="count", gap_mean="mean", gap_std="std"
    )
    cell = pairs.groupby(level=["backend", "inner_steps"])
    spread = cell.std().max(axis=1).rename("spread")  # over the same seeds as the gap
    out = stats.join(spread).reset_index()
    exceeds = out["gap_mean"].abs() > out["spread"]
    out["exceeds_spread"] = exceeds.astype("boolean").where(out["n_seeds"] >= 2)
    return out


def gains_over_fo(runs: pd.DataFrame, metric: str = "final_acc") -> pd.DataFrame:
    """full_minus_fo for every policy in `runs` but FO and FO_STRICT (column policy)."""
    policies = [m for m in runs["mode"].unique() if m not in ("FO", "FO_STRICT")]
    parts = [full_minus_fo(runs, metric, m).assign(policy=m) for m in policies]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
