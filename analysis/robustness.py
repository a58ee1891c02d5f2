"""The robustness map, from a sweep over sequence lengths, widths and precisions: does
FULL work, is it stable, is it practical, and how large is its second-order effect, per
regime (T, D, precision) of each backend and k?

Every cell is computed from runs.csv. "works": every FULL seed finished (status OK) and
its meta-gradient at the final parameters is float64's within the precision's stated
tolerance (phase12.schema.FLOAT64_TOLERANCE). Gains are seed-paired differences of final
query accuracy (analysis.ablations.paired); "beyond 2 SE" as there.
"""

from __future__ import annotations

import pandas as pd

from analysis.ablations import ATTENTION_TERM, _beyond, _fmt, paired
from analysis.summary import timed_devices
from phase12.schema import FLOAT64_TOLERANCE, REGIME_FIELDS, STATUS_UNSUPPORTED

NOT_SUPPORTED = "not supported"  # beyond the backend's limits: the sweep ran nothing
RUN_ERROR = "run error"  # a cell whose runs raised: no verdict on FULL
KEYS = ["backend", "inner_steps", *REGIME_FIELDS]
COLUMNS = ["backend", "k", "T", "D", "precision"]  # KEYS as the table names them


def regimes(runs: pd.DataFrame) -> int:
    """How many (T, D, precision) regimes the runs hold (by the columns present: runs.csv
    of older versions have no dim)."""
    present = [c for c in REGIME_FIELDS if c in runs]
    return len(runs.groupby(present)) if present else 1


def _works(full: pd.DataFrame, dtype: str) -> tuple[str, float]:
    """("yes" or why not, the largest float64 error of the FULL seeds)."""
    bad = full[full["status"] != "OK"]
    errors = pd.to_numeric(full.get("float64_meta_grad_error"), errors="coerce")
    error = errors.max()
    if (full["status"] == STATUS_UNSUPPORTED).all():
        return NOT_SUPPORTED, error
    if (bad["status"] == "ERROR").any():  # the run failed, not FULL: no verdict
        return f"{RUN_ERROR}: {bad[bad['status'] == 'ERROR'].iloc[0]['error']}", error
    if len(bad):
        first = bad.iloc[0]
        step = first.get("nonfinite_step")
        at = f" at step {int(step)}" if pd.notna(step) else ""
        return f"no: {len(bad)} of {len(full)} seeds {first['status']}{at}", error
    if errors.isna().any():  # an OK run has one; a blank is not a pass
        return f"no: float64 error missing in {errors.isna().sum()} of {len(full)} seeds", error
    tolerance = FLOAT64_TOLERANCE[dtype]
    if not error <= tolerance:
        return f"no: float64 error {error:.1e} > {tolerance:.1e}", error
    return "yes", error


def _difference(cell: pd.DataFrame, d: pd.DataFrame, other: str) -> str:
    if len(d):
        return f"{_fmt(d.iloc[0])} ({_beyond(d.iloc[0])})"
    runs = cell[cell["mode"] == other]
    if runs.empty:
        return "not run"
    if (runs["status"] == STATUS_UNSUPPORTED).all():
        return NOT_SUPPORTED
    return "no finished seed pairs"


def robustness_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (backend, k, T, D, precision) with FULL runs; see the module docstring.
    Step time and peak memory are FULL's, with their ratio to float32's in the same
    (backend, k, T, D) where that was run; where several sweep runners shared the device
    of the cell's or of float32's FULL runs, the step time says so instead."""
    costs = {
        "step ms": ("mean_outer_step_time_s", 1e3),
        "peak MiB": ("peak_cuda_mem_bytes", 2.0**-20),
    }
    several_devices = len(timed_devices(runs)) > 1  # no mean or ratio joins their times
    columns = [column for column, _ in costs.values()]
    float32 = runs[
        (runs["dtype"] == "float32") & (runs["mode"] == "FULL") & (runs["status"] == "OK")
    ]
    shared_float32 = float32[float32["device_runners"] > 1].groupby(KEYS[:-1]).size().index
    float32 = float32[KEYS[:-1]].join(float32[columns].apply(pd.to_numeric, errors="coerce"))
    float32 = float32.groupby(KEYS[:-1])[columns].mean()
    rows = []
    for key, cell in runs.groupby(KEYS):
        full = cell[cell["mode"] == "FULL"]
        if full.empty:
            continue
        row = dict(zip(COLUMNS, key, strict=True))
        works, error = _works(full, row["precision"])
        ok = full[full["status"] == "OK"]
        nonfinite = int((cell["status"] == "NONFINITE").sum())
        spread = ok["final_acc"].std() if len(ok) > 1 else float("nan")
        row |= {
            "FULL works?": works,
            "float64 error": error,
            "seed std": spread,
            "non-finite runs": f"{nonfinite} of {len(cell)}",
        }
        for label, (column, unit) in costs.items():
            value = pd.to_numeric(ok[column], errors="coerce").mean() * unit
            at = key[:-1]
            base = float32.at[at, column] * unit if at in float32.index else float("nan")
            ratio = f" ({value / base:.2f}x fp32)" if base > 0 and value == value else ""
            if label == "step ms":  # a shared device's step time is not the backend's speed
                most = ok["device_runners"].max()
                if most > 1:
                    ratio = f" (device shared by {int(most)} runners)"
                elif at in shared_float32:
                    ratio = " (fp32 timed on a shared device)"
            row[label] = f"{value:.2f}{ratio}" if value == value else "n/a"
            if several_devices:
                row[label] = "n/a (several devices)"
        gain = paired(cell, "FULL", "FO")
        row["FULL − FO"] = _difference(cell, gain, "FO")
        row["gain"] = gain.iloc[0]["mean"] if len(gain) else float("nan")
        # blank where no seed pair was measured: not a verdict of "no"
        row["FULL − FO beyond 2 SE"] = bool(gain.iloc[0]["clear"]) if len(gain) else None
        needs = paired(cell, "FULL", ATTENTION_TERM)
        row["needs attention's curvature"] = _difference(cell, needs, ATTENTION_TERM)
        if works == NOT_SUPPORTED:  # nothing ran: no differences to speak of
            row["FULL − FO"] = row["needs attention's curvature"] = ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values(COLUMNS, ignore_index=True) if rows else pd.DataFrame()


def _gain_holds(table: pd.DataFrame) -> pd.Series:
    """Per row: FULL − FO is positive and beyond 2 SE (measured)."""
    return table["FULL − FO beyond 2 SE"].eq(True) & (table["gain"] > 0)


def findings(table: pd.DataFrame) -> list[str]:
    """Sentences computed from robustness_table: where FULL works, where its gain over FO
    holds (beyond 2 SE, positive) and where it vanishes, per backend and k."""
    out = []
    if table.empty:
        return out
    for (backend, k), t in table.groupby(["backend", "k"]):
        unsupported = t["FULL works?"] == NOT_SUPPORTED
        errors = t["FULL works?"].str.startswith(RUN_ERROR)
        t = t[~unsupported & ~errors]
        where = lambda mask, t=t: ", ".join(  # noqa: E731
            f"T={r.T} D={r.D} {r.precision}" for r in t[mask].itertuples()
        )
        broken = t["FULL works?"] != "yes"
        holds = _gain_holds(t) & ~broken
        unmeasured = t["FULL − FO beyond 2 SE"].isna() & ~broken  # no FO seed to pair
        shown_not = ~holds & ~broken & ~unmeasured
        out.append(
            f"{backend}, k={k}: FULL works in {int((~broken).sum())} of {len(t)} regimes"
            + (f"; not in {where(broken)}" if broken.any() else "")
            + (f" ({int(unsupported.sum())} more not supported)" if unsupported.any() else "")
            + (f" ({int(errors.sum())} more ended in ERROR: no verdict)" if errors.any() else "")
            + f". Its gain over FO holds (positive, beyond 2 SE) in {int(holds.sum())}"
            + (f" ({where(holds)})" if holds.any() else "")
            + f" and is not shown in {int(shown_not.sum())}"
            + (f" ({where(shown_not)})" if shown_not.any() else "")
            + (
                f"; it is not measured in {int(unmeasured.sum())} ({where(unmeasured)}: no "
                "finished FO run to pair with FULL's)"
                if unmeasured.any()
                else ""
            )
            + "."
        )
        out += _against_float32(t.assign(holds=holds), backend, k)
    return out + _across_backends(table)


def _across_backends(table: pd.DataFrame) -> list[str]:
    """How far the backends' FULL − FO are apart where two or more ran a regime (k, T, D,
    precision) and FULL works on each, and in how many of those the verdict differs."""
    works = table[(table["FULL works?"] == "yes") & table["gain"].notna()]  # FO ran too
    works = works.assign(holds=_gain_holds(works))
    shared = works.groupby(COLUMNS[1:]).filter(lambda g: g["backend"].nunique() > 1)
    if shared.empty:
        return []
    cells = shared.groupby(COLUMNS[1:])
    spread = cells["gain"].agg(lambda g: g.max() - g.min())
    differs = int((cells["holds"].nunique() > 1).sum())
    return [
        f"Across backends ({', '.join(sorted(shared['backend'].unique()))}), in the "
        f"{len(spread)} regimes FULL works on more than one: their FULL − FO are at most "
        f"{spread.max():.4f} apart (median {spread.median():.4f}); the verdict differs in "
        f"{differs} of {len(spread)}."
    ]


def _against_float32(t: pd.DataFrame, backend: str, k) -> list[str]:
    """Per precision: how far FULL − FO moves from float32's at the same (T, D), and in
    how many regimes the verdict (gain holds or not) differs."""
    works = t[(t["FULL works?"] == "yes") & t["gain"].notna()].set_index(["T", "D"])  # FO too
    base = works[works["precision"] == "float32"]
    out = []
    for precision, p in works[works["precision"] != "float32"].groupby("precision"):
        both = p.index.intersection(base.index)
        if both.empty:
            continue
        shift = p.loc[both, "gain"] - base.loc[both, "gain"]
        flips = int((p.loc[both, "holds"] != base.loc[both, "holds"]).sum())
        out.append(
            f"{backend}, k={k}, {precision} against float32 at the same T, D: FULL − FO moves "
            f"by {shift.min():+.4f} to {shift.max():+.4f}; the verdict differs in {flips} of "
            f"{len(both)} regimes."
        )
    return out
