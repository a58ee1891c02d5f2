"""Run configuration: one frozen dataclass, validated before any work is done."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import torch

from kernels import BackendUnavailable, check_backend
from phase12.model import BACKENDS, FUSED_STEP, attention_backend

__all__ = ["ConfigError", "Mode", "RunConfig", "resolve_device"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the problem and the fix."""


class Mode(str, Enum):
    """How the meta-gradient treats the inner loop (see phase12.maml)."""

    FULL = "FULL"
    FO = "FO"
    FO_STRICT = "FO_STRICT"


MODES = tuple(m.value for m in Mode)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA if present else CPU; anything else is checked, not silently replaced."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a device name (try auto, cpu, cuda)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} asked for CUDA but no CUDA device is available; "
                "use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


@dataclass(frozen=True)
class RunConfig:
    """One Phase 12 run. Defaults are the seed project's frozen setting."""

    mode: str = "FULL"
    inner_steps: int = 20  # k
    backend: str = "reference"
    seed: int = 0
    outer_steps: int = 1000
    meta_batch: int = 16
    inner_lr: float = 0.4
    outer_lr: float = 1e-3
    seq_len: int = 32  # T, token 0 is the query token
    signal_positions: int = 4
    dim: int = 64  # D
    num_classes: int = 5
    shots: int = 16  # support examples per task
    queries: int = 16  # query examples per task
    noise_std: float = 0.5  # std of the noise added to prototypes at signal positions
    metric_window: int = 20  # final_* metrics average the last this-many outer steps
    device: str = "auto"
    dtype: str = "float32"
    cuda_graph: str = "auto"  # auto: capture the whole outer step on CUDA; on; off

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def run_id(self) -> str:
        return f"{self.backend}_{self.mode}_k{self.inner_steps}_seed{self.seed}"

    def validate(self) -> torch.device:
        """Check every field; return the resolved device. Raises ConfigError."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graph must be auto, on or off; got {self.cuda_graph!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.inner_steps < 0:
            raise ConfigError(f"--k must be >= 0 (inner SGD steps); got {self.inner_steps}")
        for name in (
            "outer_steps",
            "meta_batch",
            "seq_len",
            "dim",
            "num_classes",
            "shots",
            "queries",
            "metric_window",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if not value > 0 or value != value or value == float("inf"):
                raise ConfigError(f"{name} must be a positive finite number; got {value}")
        if self.noise_std < 0:
            raise ConfigError(f"noise_std must be >= 0; got {self.noise_std}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (token 0 queries); got {self.seq_len}")
        if not 1 <= self.signal_positions <= self.seq_len - 1:
            raise ConfigError(
                f"signal_positions must be in 1..seq_len-1 = 1..{self.seq_len - 1} (position 0 "
                f"is the query token); got {self.signal_positions} with seq_len {self.seq_len}"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0; got {self.seed}")
        device = resolve_device(self.device)
        if self.cuda_graph == "on" and device.type != "cuda":
            raise ConfigError("--cuda-graph on needs a CUDA device; use --cuda-graph off or auto")
        try:
            check_backend(attention_backend(self.backend), device)
        except BackendUnavailable as e:
            uses = (
                ""
                if self.backend == "triton_fused"
                else f"backend {self.backend} runs Triton kernels: "
            )
            raise ConfigError(uses + str(e)) from e
        if self.backend == FUSED_STEP:
            self._check_fused_step(device)
        return device

    def _check_fused_step(self, device: torch.device) -> None:
        from kernels.inner_step import check_shapes

        if self.dtype == "float64" and device.type == "cuda":
            raise ConfigError(
                f"backend {FUSED_STEP} runs float64 only in Triton's interpreter on the CPU; "
                "use --dtype float32 on CUDA"
            )
        try:
            for examples in (self.shots, self.queries):
                check_shapes(examples, self.seq_len, self.dim, self.num_classes)
        except ValueError as e:
            raise ConfigError(f"backend {FUSED_STEP}: {e}") from e
