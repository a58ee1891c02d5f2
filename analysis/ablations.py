"""Phase 12's question, from a sweep with curvature ablations: does second-order signal
through attention turn into behaviour, and which part of attention carries it?

Every sentence is computed from runs.csv (the OK runs; `mode` holds the policy, see
analysis.summary.load_runs); its verdict words follow the numbers. Gains are
seed-paired differences of final query accuracy against FO; "beyond 2 SE" means the mean
paired difference is more than two standard errors (std / sqrt(seeds)) from zero, which
needs at least two seeds (with 3 seeds that is a loose bar: about p < 0.2 two-sided); a
difference the same in every seed (a standard error of zero) is called that instead.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ATTENTION_TERM = "no_attention_curvature"
# A seed-paired std below this is float rounding of equal differences: no spread.
NO_SPREAD = 1e-12
# What of attention's own second derivative each policy trains with.
ATTENTION_CURVATURE_KEPT = {
    "FULL": "all",
    "no_attention_curvature": "none",
    "no_attention_score_curvature": "value path",
    "no_attention_value_curvature": "score path",
    "frozen_softmax_stats": "all, softmax statistics constant",
    "once_differentiable_attention": "none (nor the head's through it)",
    "no_attention_param_curvature": "none reaches Wq, Wk, Wv",
    "no_head_param_curvature": "all",
}
PARTS = {  # what each ablation does to attention's own second derivative
    "dropping its score path": "no_attention_score_curvature",
    "dropping its value path": "no_attention_value_curvature",
    "holding the softmax statistics constant in it": "frozen_softmax_stats",
}


def paired(runs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per (backend, inner_steps): mean, std and count of the seed-paired a − b final
    accuracy, and whether it is clear (|mean| > 2 SE); no rows if a or b is absent."""
    ok = runs[runs["status"] == "OK"]
    wide = ok.pivot_table(
        index=["backend", "inner_steps", "seed"], columns="mode", values="final_acc"
    )
    if not {a, b} <= set(wide.columns):
        return pd.DataFrame(columns=["backend", "inner_steps", "mean", "std", "n", "clear"])
    d = (wide[a] - wide[b]).dropna().rename("d").reset_index()
    out = d.groupby(["backend", "inner_steps"])["d"].agg(mean="mean", std="std", n="count")
    se = out["std"] / np.sqrt(out["n"])
    out["clear"] = (out["mean"].abs() > np.maximum(2 * se, NO_SPREAD)) & (out["n"] >= 2)
    return out.reset_index()


def _fmt(row) -> str:
    spread = f" ± {row['std']:.4f}" if row["n"] >= 2 else " (one seed)"
    return f"{row['mean']:+.4f}{spread}"


def _beyond(row) -> str:
    if row["n"] < 2:  # one seed has no standard error to compare with
        return "no SE from one seed"
    if row["std"] <= NO_SPREAD:  # a standard error of zero: say what the seeds show instead
        zero = abs(row["mean"]) <= NO_SPREAD
        return f"{'zero' if zero else 'the same'} in each of {int(row['n'])} seeds"
    return "beyond 2 SE" if row["clear"] else "within 2 SE"


def phase12_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The seed's Phase 12 summary table, completed: per backend, policy and k, the
    measured attention-curvature share, the gain over FO and whether it is clear."""
    ok = runs[runs["status"] == "OK"]
    rows = []
    for policy in [m for m in ok["mode"].unique() if m not in ("FO", "FO_STRICT")]:
        for g in paired(runs, policy, "FO").itertuples():
            cell = ok[
                (ok["mode"] == policy)
                & (ok["inner_steps"] == g.inner_steps)
                & (ok["backend"] == g.backend)
            ]
            rows.append(
                {
                    "backend": g.backend,
                    "policy": policy,
                    "attention curvature trained with": ATTENTION_CURVATURE_KEPT.get(policy, ""),
                    "k": g.inner_steps,
                    "FULL's attention share at its parameters": cell["attn_curvature_share"].mean(),
                    "gain over FO": _fmt(g._asdict()),
                    "beyond 2 SE?": _yes_no(g._asdict()),
                }
            )
    return pd.DataFrame(rows).sort_values(["backend", "policy", "k"]) if rows else pd.DataFrame()


def _yes_no(row) -> str:
    """Whether a paired difference is beyond 2 SE: yes or no, or what the seeds show
    where there is no standard error (one seed) or it is zero."""
    if row["n"] < 2 or row["std"] <= NO_SPREAD:
        return _beyond(row)
    return "yes" if row["clear"] else "no"


def share_vs_gain(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Per OK run of a FULL policy: the share of FULL's meta-gradient that attention's
    own curvature carries at the run's final parameters, and its gain over the FO run of
    the same backend, k and seed; and the least-squares slope of gain on share with k as
    a fixed effect (shares and gains centred within each k, so the large gains of small k
    do not make the slope), with its standard error (keys slope, se, n). A policy whose
    runs equal another's exactly counts once (key same_as: {left out: the policy kept});
    runs of k = 0 (no inner step: every policy is the same computation, share and gain 0
    by construction) are no evidence and are left out."""
    ok = runs[(runs["status"] == "OK") & (runs["inner_steps"] > 0)]
    fo = ok[ok["mode"] == "FO"].set_index(["backend", "inner_steps", "seed"])["final_acc"]
    full = ok[~ok["mode"].isin(["FO", "FO_STRICT"])].copy()
    key = pd.MultiIndex.from_frame(full[["backend", "inner_steps", "seed"]])
    full["gain"] = full["final_acc"].to_numpy() - fo.reindex(key).to_numpy()
    full = full.dropna(subset=["gain", "attn_curvature_share"])
    ordered = full.sort_values(["backend", "inner_steps", "seed"])
    signature = {  # policy -> its runs' (accuracy, share), to find policies that are one
        mode: tuple(map(tuple, g[["final_acc", "attn_curvature_share"]].to_numpy()))
        for mode, g in ordered.groupby("mode")
    }
    first = {}  # signature -> the first policy with it
    same_as = {mode: first.setdefault(runs_of, mode) for mode, runs_of in signature.items()}
    kept = set(first.values())
    full = full[full["mode"].isin(kept)]
    fit = {
        "n": len(full),
        "slope": float("nan"),
        "se": float("nan"),
        "same_as": {m: policy for m, policy in same_as.items() if m != policy},
    }
    by_k = full.groupby("inner_steps")
    x = full["attn_curvature_share"] - by_k["attn_curvature_share"].transform("mean")
    y = full["gain"] - by_k["gain"].transform("mean")
    dof = len(full) - 1 - by_k.ngroups  # one slope and one mean per k
    if dof > 0 and (x**2).sum() > 0:
        slope = float((x * y).sum() / (x**2).sum())
        residual = ((y - slope * x) ** 2).sum() / dof
        fit.update(slope=slope, se=float(np.sqrt(residual / (x**2).sum())))
    return full, fit


def one_backend(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs of one backend when every backend gives the same final accuracies (to
    1e-6, as exact backends must), with a sentence saying so; else all runs."""
    ok = runs[runs["status"] == "OK"]
    wide = ok.pivot_table(
        index=["mode", "inner_steps", "seed"], columns="backend", values="final_acc"
    ).dropna()
    if wide.shape[1] < 2:
        return runs, ""
    diff = float((wide.max(axis=1) - wide.min(axis=1)).max())
    if diff > 1e-6:
        return runs, f"The backends differ by up to {diff:.1e} in final accuracy."
    first = sorted(wide.columns)[0]
    return runs[runs["backend"] == first], (
        f"Every backend ({', '.join(sorted(wide.columns))}) gives the same final accuracy in "
        f"every cell (largest difference {diff:.1e}); the sentences below are {first}'s."
    )


def summary(runs: pd.DataFrame) -> list[str]:
    """A few sentences a reader can cite (smallest k first); each number and each verdict
    word is computed here."""
    runs, _ = one_backend(runs)
    ok = runs[runs["status"] == "OK"]
    need = {"FULL", "FO", ATTENTION_TERM, "once_differentiable_attention"}
    adapted = ok[ok["inner_steps"] > 0]  # at k = 0 every policy is the same computation
    if not need <= set(adapted["mode"]):
        return []
    k = int(adapted["inner_steps"].min())

    def at(a: str, b: str = "FO"):
        d = paired(runs, a, b)
        d = d[d["inner_steps"] == k]
        return None if d.empty else d.iloc[0]

    full, without, once = at("FULL"), at(ATTENTION_TERM), at("once_differentiable_attention")
    needs, keeps = at("FULL", ATTENTION_TERM), at("FULL", "once_differentiable_attention")
    if any(r is None for r in (full, without, once, needs, keeps)):
        return []
    gain = full["clear"] and full["mean"] > 0
    needed = needs["clear"] and needs["mean"] > 0  # does FULL's gain need attention's own?
    if needs["clear"] and needs["mean"] < 0:
        attribution = "so attention's own curvature costs accuracy here."
    elif not gain:
        attribution = (
            "and FULL is behind FO beyond 2 SE: there is no gain to attribute."
            if full["clear"]
            else "and FULL's own gain over FO is not beyond 2 SE: there is no gain to attribute."
        )
    elif needed:
        attribution = "so part of this gain needs attention's own curvature."
    else:
        attribution = (
            "not distinguishable from zero: these seeds show no part of FULL's gain that "
            "needs attention's own curvature."
        )
    out = [
        f"At k = {k}, FULL − FO = {_fmt(full)} accuracy ({_beyond(full)}). Without "
        f"attention's own second derivative (no_attention_curvature) the gain over FO is "
        f"{_fmt(without)}; FULL − no_attention_curvature = {_fmt(needs)} ({_beyond(needs)}), "
        + attribution
        + f" With attention's backward not differentiated at all (the seed's accident) the "
        f"gain over FO is {_fmt(once)} ({_beyond(once)})"
        + (
            f", and FULL keeps a gain this policy loses (FULL − once_differentiable_attention "
            f"= {_fmt(keeps)}, {_beyond(keeps)}): that points at the curvature of the rest of "
            "the model reaching Wq, Wk, Wv through attention's first derivative."
            if gain and keeps["clear"] and keeps["mean"] > 0 and not needed
            else "."
        )
    ]
    frozen = at("frozen_softmax_stats")
    if frozen is not None:
        verdict = (
            "is not clearly different from FO"
            if not frozen["clear"]
            else "harms training against FO"
            if frozen["mean"] < 0
            else "still beats FO"
        )
        out.append(
            f"Holding the softmax statistics constant in the second-order path (the seed's "
            f"frozen-stats contract) {verdict} at k = {k}: {_fmt(frozen)} ({_beyond(frozen)})."
        )
    d = paired(runs, "FULL", ATTENTION_TERM).query("inner_steps > 0")
    gains = paired(runs, "FULL", "FO").query("inner_steps > 0")
    out.append(
        f"Over k = {', '.join(map(str, sorted(adapted['inner_steps'].unique())))}, FULL − "
        f"no_attention_curvature ranges from {d['mean'].min():+.4f} to {d['mean'].max():+.4f}, "
        f"against FULL − FO from {gains['mean'].min():+.4f} to {gains['mean'].max():+.4f}."
    )
    if (ok["inner_steps"] == 0).any():
        out.append(
            "At k = 0 no inner step is taken, so every policy is the same computation: its "
            "differences are zero by construction and are no evidence either way."
        )
    lengths = (
        ", ".join(map(str, sorted(ok["outer_steps"].unique()))) if "outer_steps" in ok else "?"
    )
    dtypes = ", ".join(map(str, sorted(ok["dtype"].unique()))) if "dtype" in ok else "?"
    seqs = ", ".join(map(str, sorted(ok["seq_len"].unique()))) if "seq_len" in ok else "?"
    seeds = int(ok.groupby(["mode", "inner_steps"])["seed"].nunique().min())
    out.append(
        f"What these data do not show: other tasks than this synthetic family, other shapes "
        f"than T = {seqs}, other precisions than {dtypes}, other run lengths than {lengths} "
        f"outer steps, more than {seeds} seeds per cell; a difference within 2 SE is not "
        "evidence either way."
    )
    return out


def findings(runs: pd.DataFrame) -> list[str]:
    """The answers, in order: how much of FULL's gain survives without attention's own
    curvature; which part carries it; whether the measured share predicts the gain."""
    ok = runs[runs["status"] == "OK"]
    if not {"FULL", "FO", ATTENTION_TERM} <= set(ok["mode"]):
        return [
            "The ablation findings need FULL, FO and no_attention_curvature runs; this grid "
            "lacks " + ", ".join(sorted({"FULL", "FO", ATTENTION_TERM} - set(ok["mode"]))) + "."
        ]
    runs, agreement = one_backend(runs)
    ok = runs[runs["status"] == "OK"]
    out = [agreement] if agreement else []
    key = ["backend", "inner_steps"]
    table = (
        paired(runs, "FULL", "FO")
        .merge(paired(runs, ATTENTION_TERM, "FO"), on=key, suffixes=("", "_w"))
        .merge(paired(runs, "FULL", ATTENTION_TERM), on=key, suffixes=("", "_n"))
    )
    for r in table.to_dict("records"):
        w = {k[:-2]: v for k, v in r.items() if k.endswith("_w")}
        n = {k[:-2]: v for k, v in r.items() if k.endswith("_n")}
        share = f" ({w['mean'] / r['mean']:.0%} of FULL's)" if r["clear"] and r["mean"] > 0 else ""
        out.append(
            f"{r['backend']}, k={r['inner_steps']}: FULL − FO = {_fmt(r)} ({_beyond(r)}); "
            f"without attention's own curvature the gain is {_fmt(w)}{share}; FULL − "
            f"no_attention_curvature = {_fmt(n)} ({_beyond(n)})."
        )
    once = paired(runs, "once_differentiable_attention", "FO")
    for o in once.itertuples():
        out.append(
            f"{o.backend}, k={o.inner_steps}: with attention's backward not differentiated at "
            f"all (once_differentiable_attention, the seed's accident) the gain over FO is "
            f"{_fmt(o._asdict())} ({_beyond(o._asdict())}); unlike no_attention_curvature, "
            "this control also drops the curvature of the rest of the model that reaches "
            "Wq, Wk, Wv through attention's backward."
        )
    same = ok.pivot_table(
        index=["backend", "inner_steps", "seed"], columns="mode", values="final_acc"
    )
    if {"once_differentiable_attention", "no_attention_param_curvature"} <= set(same.columns):
        diff = (same["once_differentiable_attention"] - same["no_attention_param_curvature"]).abs()
        if diff.max() == 0:
            out.append(
                "once_differentiable_attention and no_attention_param_curvature give identical "
                "final accuracies in every cell: in this model only the gradients of Wq, Wk, "
                "Wv pass through attention's backward, so not differentiating it is detaching "
                "them."
            )
    for part, ablation in PARTS.items():
        d = paired(runs, "FULL", ablation)
        for r in d.itertuples():
            out.append(
                f"{r.backend}, k={r.inner_steps}: {part} ({ablation}) changes "
                f"accuracy by {-r.mean:+.4f}"
                + (f" ± {r.std:.4f}" if r.n >= 2 else "")
                + f" against FULL ({_beyond(r._asdict())})."
            )
    _, fit = share_vs_gain(runs)
    if fit["slope"] == fit["slope"]:
        beyond = abs(fit["slope"]) > 2 * fit["se"]
        out.append(
            f"Across {fit['n']} runs of FULL and its ablations, within each k, the gain over "
            f"FO against FULL's attention share at the run's parameters has slope "
            f"{fit['slope']:+.3f} ± {fit['se']:.3f} (least squares with k as a fixed effect; "
            "one standard error"
            + "".join(
                f"; {m} counted once with {kept}, whose runs it equals exactly"
                for m, kept in sorted(fit["same_as"].items())
            )
            + "): "
            + (
                "beyond 2 SE."
                if beyond
                else "within 2 SE of zero: the share does not detectably predict the gain."
            )
        )
    return out


def _mean_std(values: pd.Series) -> str:
    spread = f" ± {values.std():.4f}" if len(values) > 1 else " (one seed)"
    return f"{values.mean():.4f}{spread}"


def share_during_training(histories: pd.DataFrame) -> pd.DataFrame:
    """attn_curvature_share at the first and the last probe of each run (the history's
    sparse probe columns), after how many outer steps each came, mean ± std over seeds per
    (backend, k, policy); empty when the histories hold no probes, or only the end's
    (probe_every 0: the first probe is the last)."""
    if "attn_curvature_share" not in histories:
        return pd.DataFrame()
    probed = histories.dropna(subset=["attn_curvature_share"]).sort_values("step")
    keys = ["backend", "inner_steps", "mode"]
    rows = []
    for key, g in probed.groupby(keys):
        runs = g.groupby("seed")
        first, last = runs.head(1), runs.tail(1)
        rows.append(
            dict(zip(["backend", "k", "policy"], key, strict=True))
            | {
                "first probe": int(first["step"].min()) + 1,
                "share there": _mean_std(first["attn_curvature_share"]),
                "last probe": int(last["step"].max()) + 1,
                "share at the end": _mean_std(last["attn_curvature_share"]),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty or (table["first probe"] == table["last probe"]).all():
        return pd.DataFrame()
    return table
