"""Run configuration: one frozen dataclass whose fields are checked when it is made.

Each field carries its help text (and its choices) in its metadata: the command line
generates its flags from these fields, so names, types, defaults and help live here
only. Whether a configuration can run on this
machine (CUDA present, Triton usable, sizes a backend holds) is decided by
`phase12.backends.device_for`.

Errors name fields, never command-line flags: `ConfigError.field` says which field is
at fault, and the command line puts its own flag in the field's place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from phase12.schema import GRID_FIELDS, LOSS_SCALES, MODES

__all__ = [
    "ABLATIONS",
    "LATER_SETTINGS",
    "ConfigError",
    "Curvature",
    "Mode",
    "RunConfig",
    "changed_settings",
    "option_help",
    "resolve_device",
    "settings",
]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the problem and the fix.

    `field` is the RunConfig field at fault (the message then starts with its name), or
    None when no single field is.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Mode(str, Enum):
    """How the meta-gradient treats the inner loop (see phase12.maml)."""

    FULL = "FULL"
    FO = "FO"
    FO_STRICT = "FO_STRICT"

    def __str__(self) -> str:  # 'FULL', not 'Mode.FULL', in run ids, CSVs and messages
        return self.value

    __format__ = str.__format__


PARAMS = ("Wq", "Wk", "Wv", "Wc", "bc")
ATTENTION_PARAMS = ("Wq", "Wk", "Wv")


@dataclass(frozen=True)
class Curvature:
    """What second-order signal the inner steps carry into the meta-gradient.

    `attention`: attention's own second derivative inside the inner gradient
    (kernels.reference.CURVATURES: "exact", "none", "score", "value",
    "frozen_softmax_stats", "once_differentiable"). `detached`: the parameters whose
    inner gradients are constants (FO detaches all of them).
    """

    attention: str = "exact"
    detached: frozenset[str] = frozenset()


# Curvature ablations of FULL (docs/attention-double-backward.md, "Curvature policies").
# An ablation is named for what it drops; Curvature.attention names the part of
# attention's own curvature that is kept (kernels.CURVATURES): dropping the score path
# keeps "value", and "none" keeps none of it.
ABLATIONS = {
    "none": Curvature(),
    "no_attention_curvature": Curvature(attention="none"),
    "no_attention_score_curvature": Curvature(attention="value"),
    "no_attention_value_curvature": Curvature(attention="score"),
    "frozen_softmax_stats": Curvature(attention="frozen_softmax_stats"),
    "once_differentiable_attention": Curvature(attention="once_differentiable"),
    "no_attention_param_curvature": Curvature(detached=frozenset(ATTENTION_PARAMS)),
    "no_head_param_curvature": Curvature(detached=frozenset(PARAMS) - set(ATTENTION_PARAMS)),
}
# A run's precision: (parameter and data dtype, compute dtype). The plain dtypes hold
# everything in that dtype; autocast_* keep float32 parameters, data and updates and run
# the model's forward under torch.autocast in the low-precision dtype (mixed precision:
# linear layers and attention in it, softmax and cross-entropy in float32).
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "autocast_bfloat16": (torch.float32, torch.bfloat16),
    "autocast_float16": (torch.float32, torch.float16),
}
CUDA_GRAPH = ("auto", "on", "off")
# The CPU torch.Generator (initial parameters everywhere; the task streams on the CPU)
# seeds from the low 32 bits only: seeds 2**32 apart would be the same run.
MAX_SEED = 2**32 - 1


def _option(default, help: str, *, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


def option_help(f: dataclasses.Field) -> tuple[str, tuple | None]:
    """(help, choices or None) of a RunConfig field."""
    return f.metadata["help"], f.metadata["choices"]


def inner_curvature(mode: str, ablation: str = "none") -> Curvature:
    """What the inner steps of `mode` (with an ablation of FULL) carry into the
    meta-gradient: FULL everything but what the ablation drops, FO and FO_STRICT nothing."""
    if ablation != "none" and mode != Mode.FULL:
        raise ConfigError(
            f"ablation {ablation} is an ablation of FULL; it does not apply to mode {mode}",
            "ablation",
        )
    if mode == Mode.FULL:
        return ABLATIONS[ablation]
    if mode not in (Mode.FO, Mode.FO_STRICT):
        raise ConfigError(f"mode {mode!r} is unknown; choose one of {', '.join(MODES)}", "mode")
    return Curvature(detached=frozenset(PARAMS))


@dataclass(frozen=True)
class RunConfig:
    """One Phase 12 run. Defaults are the seed project's frozen setting."""

    mode: Mode = _option(
        Mode.FULL,
        "FULL (second order), FO (first order) or FO_STRICT (first order, no inner graph)",
        choices=MODES,
    )
    inner_steps: int = _option(20, "inner SGD steps k")
    backend: str = _option(
        "reference",
        "reference: PyTorch attention; triton_fused: fused Triton attention kernels; "
        "triton_step: each inner step and its backward one fused Triton kernel of the whole "
        "model (the Triton backends need CUDA or TRITON_INTERPRET=1)",
    )
    ablation: str = _option(
        "none",
        "a curvature ablation of FULL: no_attention_curvature (attention's Jacobian a "
        "constant in the inner gradient), no_attention_score_curvature / "
        "no_attention_value_curvature (one path of attention's own second derivative "
        "dropped), frozen_softmax_stats (attention's log-sum-exp a constant there), "
        "once_differentiable_attention (attention's backward not differentiated at all), "
        "no_attention_param_curvature / no_head_param_curvature (the inner gradients of "
        "Wq, Wk, Wv / of Wc, bc detached)",
        choices=tuple(ABLATIONS),
    )
    seed: int = _option(0, "run seed (initial parameters and task stream)")
    outer_steps: int = _option(1000, "outer (meta) steps per run")
    meta_batch: int = _option(16, "tasks per outer step")
    inner_lr: float = _option(0.4, "inner SGD learning rate")
    outer_lr: float = _option(1e-3, "Adam learning rate on the meta-parameters")
    seq_len: int = _option(32, "sequence length T; token 0 queries")
    signal_positions: int = _option(4, "signal positions per task, in 1..T-1")
    dim: int = _option(64, "model width D")
    num_classes: int = _option(5, "classes per task")
    shots: int = _option(16, "support examples per task")
    queries: int = _option(16, "query examples per task")
    noise_std: float = _option(0.5, "std of the noise added to prototypes at signal positions")
    metric_window: int = _option(
        20,
        "final metrics average the last this-many outer steps (convergence_delta: the first "
        "this-many against the last, in runs of at least twice as many)",
    )
    probe_every: int = _option(
        0,
        "also measure the held-out probes (rel_diff_probe, the curvature shares, the float64 "
        "error) every this-many outer steps into the history; 0: at the end of the run only "
        "(each probe is seven eager meta-gradients: on a GPU, about 1 s at k = 20)",
    )
    device: str = _option("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    dtype: str = _option(
        "float32",
        "precision: float32, float64, bfloat16, float16 (parameters, data and compute in "
        "that dtype), or autocast_bfloat16, autocast_float16 (float32 parameters, the model "
        "run under torch.autocast in bfloat16 or float16)",
        choices=tuple(DTYPES),
    )
    cuda_graph: str = _option(
        "auto",
        "capture the whole outer step in a CUDA graph and replay it: auto (on CUDA, falling "
        "back to eager with a warning if capture fails), on (fail instead), off",
        choices=CUDA_GRAPH,
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(
                f"mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}", "mode"
            )
        object.__setattr__(self, "mode", Mode(self.mode))
        _check_fields(self)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of parameters, data and updates."""
        return DTYPES[self.dtype][0]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in."""
        return DTYPES[self.dtype][1]

    @property
    def loss_scale(self) -> float:
        """The static scale of the losses whose gradients are taken (phase12.schema.
        LOSS_SCALES: 2**10 when the model computes in float16, 1 otherwise)."""
        return LOSS_SCALES[self.dtype]

    def autocast(self, device: torch.device):
        """The context the model's forward runs in: torch.autocast for autocast_* runs,
        none otherwise."""
        if self.compute_dtype == self.torch_dtype:
            return contextlib.nullcontext()
        # No cast cache: a captured CUDA graph must cast the parameters on every replay.
        return torch.autocast(device.type, dtype=self.compute_dtype, cache_enabled=False)

    @property
    def policy(self) -> str:
        """The mode, or the ablation of FULL when there is one."""
        return str(self.mode) if self.ablation == "none" else self.ablation

    @property
    def inner_loop(self) -> dict:
        """The keyword arguments of phase12.maml's functions for this run."""
        return dict(
            mode=self.mode,
            steps=self.inner_steps,
            lr=self.inner_lr,
            backend=self.backend,
            ablation=self.ablation,
            loss_scale=self.loss_scale,
        )

    @property
    def run_id(self) -> str:
        """backend_policy_kK_seedS, then _TT, _DD and the precision where they are not the
        defaults (32, 64, float32)."""
        shape = {"seq_len": f"_T{self.seq_len}", "dim": f"_D{self.dim}", "dtype": f"_{self.dtype}"}
        default = RunConfig.__dataclass_fields__
        suffix = "".join(v for k, v in shape.items() if getattr(self, k) != default[k].default)
        return f"{self.backend}_{self.policy}_k{self.inner_steps}_seed{self.seed}{suffix}"


def _check_fields(c: RunConfig) -> None:
    """Every field's own value (nothing about the machine). Raises ConfigError."""
    named = (("cuda_graph", CUDA_GRAPH), ("dtype", tuple(DTYPES)), ("ablation", tuple(ABLATIONS)))
    for name, allowed in named:
        if getattr(c, name) not in allowed:
            raise ConfigError(
                f"{name} {getattr(c, name)!r} is unknown; choose one of {', '.join(allowed)}", name
            )
    inner_curvature(c.mode, c.ablation)
    if c.inner_steps < 0:
        raise ConfigError(
            f"inner_steps must be >= 0 (inner SGD steps); got {c.inner_steps}", "inner_steps"
        )
    positive = ("outer_steps", "meta_batch", "seq_len", "dim", "num_classes", "shots", "queries")
    for name in (*positive, "metric_window"):
        if getattr(c, name) <= 0:
            raise ConfigError(f"{name} must be positive; got {getattr(c, name)}", name)
    if c.probe_every < 0:
        raise ConfigError(
            f"probe_every must be >= 0 (0: probes at the end only); got {c.probe_every}",
            "probe_every",
        )
    # The most each rate is multiplied by before it meets the parameters' dtype: Adam's
    # first step is outer_lr / (1 - beta1), beta1 = 0.9 (torch.optim.Adam's default).
    for name, most, times in (
        ("inner_lr", 1.0, ""),
        ("outer_lr", 10.0, " times 10 (Adam's first step)"),
    ):
        value = getattr(c, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a positive finite number; got {value}", name)
        if c.dtype in DTYPES and value * most > torch.finfo(c.torch_dtype).max:
            raise ConfigError(
                f"{name} {value}{times} is beyond the largest {c.dtype} number, which the "
                "step multiplies it into; use a smaller rate",
                name,
            )
    if not (c.noise_std >= 0 and math.isfinite(c.noise_std)):
        raise ConfigError(f"noise_std must be a finite number >= 0; got {c.noise_std}", "noise_std")
    if c.dtype in DTYPES and c.noise_std * 10 > torch.finfo(c.torch_dtype).max:
        raise ConfigError(
            f"noise_std {c.noise_std} times a normal draw (up to about 10) is beyond the largest "
            f"{c.dtype} number, which the tasks are drawn in; use a smaller std",
            "noise_std",
        )
    if c.num_classes < 2:
        raise ConfigError(
            f"num_classes must be >= 2 (one class leaves nothing to learn); got {c.num_classes}",
            "num_classes",
        )
    if c.seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (token 0 queries); got {c.seq_len}", "seq_len")
    if not 1 <= c.signal_positions <= c.seq_len - 1:
        raise ConfigError(
            f"signal_positions must be in 1..seq_len-1 = 1..{c.seq_len - 1} (position 0 is the "
            f"query token); got {c.signal_positions} with seq_len {c.seq_len}",
            "signal_positions",
        )
    if not 0 <= c.seed <= MAX_SEED:
        raise ConfigError(f"seed must be in 0..2**32-1; got {c.seed}", "seed")


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA if present else CPU; anything else is checked, not silently replaced."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(
            f"device {device!r} is not a device name (try auto, cpu, cuda)", "device"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} asks for CUDA, but no CUDA device is available; use cpu",
                "device",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible",
                "device",
            )
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: only cpu and cuda devices are supported", "device")
    elif dev.index not in (None, 0):
        raise ConfigError(f"device {device!r}: the CPU is one device; use cpu", "device")
    return dev


def settings(config: RunConfig) -> dict:
    """What the runs of one results folder share: every RunConfig field but the grid
    axes (phase12.schema.GRID_FIELDS) and the device, as JSON values."""
    fields = dataclasses.asdict(config)
    shared = {k: v for k, v in fields.items() if k not in (*GRID_FIELDS, "device")}
    return json.loads(json.dumps(shared))


# Settings added after results were first recorded, with the value that does what runs
# did before each existed: a sweep record or run meta JSON without one reads as that value
# (the committed sweeps from before probe_every probed at the end only).
LATER_SETTINGS = {"probe_every": 0}


def changed_settings(before: Mapping, config: RunConfig, *, absent_differs: bool) -> str | None:
    """How `config`'s settings differ from the recorded settings `before`, e.g.
    "outer_steps 3 there, 2 now"; None if they do not. A setting `before` lacks differs
    with `absent_differs` (a sweep's record holds them all) and is let pass without (a
    run's meta JSON from a version older than that setting)."""

    def shown(there, now) -> tuple[str, str]:  # as JSON where they would read the same
        plain = (str(there), str(now))
        return (json.dumps(there), json.dumps(now)) if plain[0] == plain[1] else plain

    changed = [
        "{} {} there, {} now".format(k, *shown(before.get(k, "absent"), v))
        for k, v in settings(config).items()
        if (k in before or absent_differs) and before.get(k) != v
    ]
    return "; ".join(changed) or None
