"""What a run produces, by name: statuses, metric names, CSV columns and the result type.

Depends on nothing, so the analysis can read the engine's files without importing it.
The run row keeps the seed project's column names (SEED_COLUMNS, in its order) and adds
a few of its own after them (RUN_COLUMNS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STATUS_OK, STATUS_NONFINITE, STATUS_ERROR = "OK", "NONFINITE", "ERROR"
STATUS_UNSUPPORTED = "UNSUPPORTED"  # not run: beyond its backend's limits (phase12.sweep)
STATUSES = (STATUS_OK, STATUS_NONFINITE, STATUS_ERROR, STATUS_UNSUPPORTED)

# The names a run row's backend, mode and ablation columns take (phase12.backends and
# phase12.config define what each means: BACKENDS, Mode, ABLATIONS); its dtype column
# takes FLOAT64_TOLERANCE's keys.
BACKEND_NAMES = ("reference", "triton_fused", "triton_step")
MODES = ("FULL", "FO", "FO_STRICT")
ABLATION_NAMES = (
    "none",
    "no_attention_curvature",
    "no_attention_score_curvature",
    "no_attention_value_curvature",
    "frozen_softmax_stats",
    "once_differentiable_attention",
    "no_attention_param_curvature",
    "no_head_param_curvature",
)

# Per outer step, per seed: written by the outer step into its history tensor.
METRICS = ("loss", "acc", "attn_grad_norm_q", "attn_grad_norm_k", "attn_grad_norm_v")

# The seed project's mean outer-step seconds at k = 20 (docs/anchor-baselines.md), by
# (device type, backend, mode): the reference the benchmarks and reports compare with.
SEED_STEP_S = {
    ("cuda", "reference", "FULL"): 0.974,
    ("cuda", "reference", "FO"): 0.493,
    ("cuda", "triton_fused", "FULL"): 1.024,
    ("cuda", "triton_fused", "FO"): 0.559,
    ("cpu", "reference", "FULL"): 1.34,
}

# The setting the seed's numbers (SEED_STEP_S, its long run's accuracies) were measured
# at: this project's RunConfig defaults (a test keeps them equal). A step time depends on
# the shapes alone; a final accuracy on all of the setting.
SEED_SHAPES = {
    "meta_batch": 16,
    "shots": 16,
    "queries": 16,
    "seq_len": 32,
    "dim": 64,
    "num_classes": 5,
    "dtype": "float32",
}
SEED_SETTING = {
    **SEED_SHAPES,
    "outer_steps": 1000,
    "outer_lr": 1e-3,
    "inner_lr": 0.4,
    "signal_positions": 4,
    "noise_std": 0.5,
    "metric_window": 20,  # the final accuracy's window of outer steps
}

RUNS_CSV = "runs.csv"  # one row per run, in a run's --out folder or a sweep folder
# A run's per-step history (HISTORY_COLUMNS), gzip-compressed CSV (pandas reads it as
# it is; `zcat` shows it); folders written before 2026-11-28 hold plain RUN.csv.
HISTORY_DIR = "history"
HISTORY_SUFFIX = ".csv.gz"
RISK_CSV = "risk_checks.csv"
# "setting": what the checks ran at, the same JSON object on every row: every RunConfig
# field but the grid axes and the device (what runs' meta JSONs record, phase12.config's
# `settings`), the regime (REGIME_FIELDS) and the device type. Risk checks of earlier
# versions lack it.
RISK_COLUMNS = ["check", "status", "value", "details", "setting"]

# ||g_FULL - g_ABLATION|| / ||g_FULL|| of the meta-gradient at a run's final parameters on
# a held-out task (phase12.probes.curvature_shares): how much of the meta-gradient each
# part of attention's own second derivative carries.
CURVATURE_SHARES = (
    "attn_curvature_share",  # all of attention's own second derivative, every parameter
    "attn_curvature_share_qkv",  # the same on Wq, Wk, Wv only
    "attn_score_curvature_share",  # its score path
    "attn_value_curvature_share",  # its value path
    "softmax_stats_curvature_share",  # what freezing the softmax statistics changes
)
# ||g - g_float64|| / ||g_float64|| a run's FULL meta-gradient may show, by precision
# (RunConfig.dtype): 16 units of roundoff of its compute dtype (float64: 1e-12, for kernels
# against the reference). Measured at initialisation, k = 20, T = 32, D = 64 (reference,
# CPU): 4.6 units in float32, 4.1 in bfloat16, 3.2 in float16, 2.5 with autocast to
# bfloat16, 2.2 to float16; 16 leaves room for trained parameters (docs/benchmarks.md).
FLOAT64_TOLERANCE = {
    "float64": 1e-12,
    "float32": 16 * 2.0**-24,
    "bfloat16": 16 * 2.0**-8,
    "float16": 16 * 2.0**-11,
    "autocast_bfloat16": 16 * 2.0**-8,
    "autocast_float16": 16 * 2.0**-11,
}
# The static scale of the losses whose gradients a run takes, by precision: 2**10 where the
# model computes in float16 (its subnormals start at 6e-5; docs/benchmarks.md measures 2**8
# to 2**12 equally good and 2**16 overflowing), 1 otherwise (RunConfig.loss_scale).
LOSS_SCALES = {
    "float64": 1.0,
    "float32": 1.0,
    "bfloat16": 1.0,
    "float16": 2.0**10,
    "autocast_bfloat16": 1.0,
    "autocast_float16": 2.0**10,
}
# Measured on the held-out task (phase12.probes.probe) every `probe_every` outer steps and
# at the end of a run: sparse columns of the history (blank between probes); the run row
# holds the final values.
PROBES = ("rel_diff_probe", *CURVATURE_SHARES, "float64_meta_grad_error")
HISTORY_COLUMNS = ["step", *METRICS, *PROBES]

SEED_COLUMNS = [
    "backend",
    "mode",
    "inner_steps",
    "seed",
    "meta_batch",
    "outer_lr",
    "outer_steps",
    "inner_lr",
    "seq_len",
    "num_signal_positions",
    "dtype",
    "compute_dtype",
    "autocast",
    "final_loss",
    "final_acc",
    "attn_grad_present",
    "attn_grad_norm_q",
    "attn_grad_norm_k",
    "attn_grad_norm_v",
    "sdpa_input_gradgrad_ok",
    "rel_diff_probe",
    "wall_time_total_s",
    "mean_outer_step_time_s",
    "peak_cuda_mem_bytes",
    "status",
    "error",
    "convergence_delta",
]
# The fields a sweep's grid varies, by their RunConfig and runs.csv name: a run is one
# point of the grid. The last three, a regime, are what a robustness map varies.
GRID_FIELDS = ("mode", "backend", "inner_steps", "seed", "ablation", "seq_len", "dim", "dtype")
REGIME_FIELDS = GRID_FIELDS[-3:]
# Settings every run of one folder shares (the grid axes aside): rows that differ in one
# would be averaged together by the analysis as if they were seeds of one cell.
SETTING_COLUMNS = ("meta_batch", "outer_lr", "outer_steps", "inner_lr")
# The RunConfig fields a run's row repeats from its meta JSON, by column name: where the
# two differ (cell_holds), one was edited by hand.
CONFIG_COLUMNS = {
    **{f: f for f in (*GRID_FIELDS, *SETTING_COLUMNS)},
    "signal_positions": "num_signal_positions",
}
RUN_COLUMNS = SEED_COLUMNS + [
    "run_id",
    "dim",
    "loss_scale",
    "setup_time_s",  # building the run's state and capturing its CUDA graph (warm-up)
    "probe_time_s",  # the held-out probes, during training and at the end
    "attn_grad_norm",
    "nonfinite_step",
    "cuda_graph",
    "seeds_batched",
    "world_size",
    # sweep runners given this run's device (--devices naming it more than once): above 1,
    # the step and wall times include the other runners' turns on the device; blank for
    # a run no runner took (UNSUPPORTED, or left when every runner had died)
    "device_runners",
    "device",
    "device_name",
    "torch_version",
    "ablation",
    *CURVATURE_SHARES,
    # ||g - g_float64|| / ||g_float64|| of the FULL meta-gradient at the run's final
    # parameters on the held-out task (phase12.probes.float64_error)
    "float64_meta_grad_error",
]


@dataclass
class RunResult:
    """One run: its CSV row (keys of RUN_COLUMNS) and its per-step history (keys of
    HISTORY_COLUMNS, one list each; empty for a run that failed before training)."""

    row: dict
    history: dict[str, list] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.row["status"]


def cell_holds(cell, value) -> bool:
    """Whether a runs.csv cell (text as read, or a pandas value; blank, None or NaN where
    absent: not compared) holds a meta JSON's `value` (64.0 and "64" are 64)."""
    if cell is None or cell == "" or cell != cell:
        return True
    try:
        return float(cell) == float(value)
    except (TypeError, ValueError):
        return str(cell) == str(value)
